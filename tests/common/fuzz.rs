//! Shared settings of the structure-aware fuzz tests (docs/reliability.md, "Fuzzing").
//!
//! Every fuzz test runs a fixed number of cases per `cargo test` run (seconds) and more under
//! `SEGVOL_FUZZ_CASES=N` for a long campaign; each case must end in `Ok` or a typed
//! [`segvol::Error`], never a panic, an abort or an unbounded allocation. The address space of
//! the test process is capped ([`cap_memory`]) so an allocation that a small input should never
//! cause fails the test instead of exhausting the machine.

use proptest::test_runner::{Config, FileFailurePersistence};

/// The address-space cap of a fuzz test process: a few hundred MiB of working memory for inputs
/// of a few KiB, plus room for the test harness's threads.
pub const MEMORY_CAP_BYTES: u64 = 4 << 30;

/// Cases per property: `SEGVOL_FUZZ_CASES`, else `default` (sized so each property runs in
/// about a second on a 2-core machine).
pub fn cases(default: u32) -> u32 {
    std::env::var("SEGVOL_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The proptest configuration of a fuzz property: `cases(default)` cases, no failure files
/// written into the source tree (a failing case is printed with its seed instead).
pub fn config(default: u32) -> Config {
    Config {
        cases: cases(default),
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    }
}

/// Caps the process's address space at [`MEMORY_CAP_BYTES`] (idempotent; lowers only).
/// An input that makes the reader allocate without limit then fails with an allocation error
/// (the test aborts) instead of taking the machine's memory.
pub fn cap_memory() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_AS, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur == libc::RLIM_INFINITY || lim.rlim_cur > MEMORY_CAP_BYTES {
            lim.rlim_cur = MEMORY_CAP_BYTES;
            let _ = libc::setrlimit(libc::RLIMIT_AS, &lim);
        }
    }
}
