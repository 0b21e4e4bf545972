//! Files in and out: NIfTI volumes with their geometry, prompts in voxel or millimetre
//! coordinates, and atomic writes.

pub mod coords;
pub mod nifti;
pub mod nrrd;
pub mod prompt;

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Reads a CT volume from any input segvol accepts, chosen by its name (NIfTI: `.nii`,
/// `.nii.gz`; NRRD: `.nrrd`). Every command reads its inputs through here, so a new format is
/// one arm.
pub fn read_input(path: &Path) -> Result<nifti::Volume> {
    let name = path.to_string_lossy().to_ascii_lowercase();
    if name.ends_with(".nrrd") || name.ends_with(".nhdr") {
        return nrrd::read_volume(path);
    }
    nifti::read_volume(path)
}

/// Temporary files being written now: what a SIGINT or SIGTERM handler must remove
/// ([`remove_pending_temp_files`]).
static PENDING: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn pending() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    // A writer that panicked leaves a valid list behind.
    PENDING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes every temporary file of an atomic write still in progress, and returns how many
/// it removed. Called on SIGINT/SIGTERM before exiting: holding the registry lock, it cannot
/// interleave with a rename, so each output is either complete or absent.
pub fn remove_pending_temp_files() -> usize {
    let mut list = pending();
    let n = list
        .drain(..)
        .filter(|p| std::fs::remove_file(p).is_ok())
        .count();
    // Later writes would leave files behind that no one removes: keep the lock (the caller
    // exits) by leaking the guard.
    std::mem::forget(list);
    n
}

/// Writes `bytes` to `path` atomically ([`write_atomic_with`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })
}

/// Writes `path` through `write`, which creates and fills a temporary file in the same
/// directory (`.<name>.tmp-<pid>`); the temporary is renamed to `path` when `write` succeeds,
/// removed when it fails, and removed by [`remove_pending_temp_files`] on a signal. A failure
/// never leaves a partial file under the final name, or a temporary behind.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Usage(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    pending().push(tmp.clone());
    let result = write(&tmp).and_then(|()| {
        hold_for_tests(&tmp);
        let mut list = pending();
        let renamed = std::fs::rename(&tmp, path);
        list.retain(|p| p != &tmp);
        renamed
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        pending().retain(|p| p != &tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Fault injection for the signal tests (tests/signals.rs): with `SEGVOL_TEST_HOLD_TEMP_MS`
/// set, a finished temporary file waits that long before its rename, so a test can signal a
/// run while a temporary file exists. Unset (always, outside those tests) it costs one lookup.
fn hold_for_tests(tmp: &Path) {
    if let Some(ms) = std::env::var("SEGVOL_TEST_HOLD_TEMP_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        eprintln!("segvol: test hold: {} for {ms} ms", tmp.display());
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}
