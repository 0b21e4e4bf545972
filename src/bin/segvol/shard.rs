//! Folder jobs that scale out: `segvol segment DIR... --num-parts N --part-id I` takes every
//! N-th input of the sorted list (nnU-Net's `-num_parts` / `-part_id`), so N processes (a Slurm
//! job array, one process per GPU) share a cohort without a scheduler; `--skip-existing` makes
//! a rerun redo only what is missing; `--jsonl` appends one line per case to a file that all
//! parts may share (docs/scale-out.md).

use segvol::error::{Error, Result};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Default)]
pub struct ShardArgs {
    /// Split the inputs into N parts and run one (default: SLURM_ARRAY_TASK_COUNT when set).
    #[arg(long, value_name = "N")]
    num_parts: Option<usize>,
    /// The part to run, 0..N-1: inputs I, I+N, I+2N, ... of the sorted list (default:
    /// SLURM_ARRAY_TASK_ID less SLURM_ARRAY_TASK_MIN when set).
    #[arg(long, value_name = "I")]
    part_id: Option<usize>,
    /// Skip an input whose outputs all exist (they are written by rename, so an existing
    /// output is a finished one).
    #[arg(long)]
    pub skip_existing: bool,
    /// Append one JSON line per input (input, outputs, status, error, voxels, seconds) to FILE;
    /// each line is one append, so every part can share one file.
    #[arg(long, value_name = "FILE")]
    pub jsonl: Option<PathBuf>,
}

/// The part of the inputs this process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub id: usize,
    pub count: usize,
}

impl ShardArgs {
    /// The part from the flags, else from Slurm's array variables, else the whole list.
    /// `dir_output`: the run writes into `--out-dir` (one `--out` file cannot be shared, so
    /// Slurm's variables are ignored there and the flags refused).
    pub fn part(&self, dir_output: bool) -> Result<Part> {
        self.part_from(dir_output, |k| std::env::var(k).ok())
    }

    fn part_from(&self, dir_output: bool, env: impl Fn(&str) -> Option<String>) -> Result<Part> {
        let explicit = self.num_parts.is_some() || self.part_id.is_some();
        if explicit && !dir_output {
            return Err(Error::Usage(
                "--num-parts/--part-id split a list of inputs: use --out-dir".into(),
            ));
        }
        if !dir_output {
            return Ok(Part { id: 0, count: 1 });
        }
        let var = |k: &str| -> Result<Option<usize>> {
            match env(k) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                    Error::Usage(format!(
                        "{k}={}: expected a non-negative integer",
                        segvol::error::clip(&v)
                    ))
                }),
            }
        };
        let count = match self.num_parts {
            Some(n) => Some(n),
            None => var("SLURM_ARRAY_TASK_COUNT")?,
        };
        let id = match self.part_id {
            Some(i) => Some(i),
            None => match var("SLURM_ARRAY_TASK_ID")? {
                // Arrays may start anywhere (--array=1-6): parts count from the first task.
                Some(t) => {
                    let min = var("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
                    Some(t.checked_sub(min).ok_or_else(|| {
                        Error::Usage(format!(
                            "SLURM_ARRAY_TASK_ID={t} is below SLURM_ARRAY_TASK_MIN={min}"
                        ))
                    })?)
                }
                None => None,
            },
        };
        let (id, count) = match (id, count) {
            (None, None) => return Ok(Part { id: 0, count: 1 }),
            (Some(i), Some(n)) => (i, n),
            (None, Some(_)) => {
                return Err(Error::Usage(
                    "--num-parts without --part-id (and SLURM_ARRAY_TASK_ID is not set)".into(),
                ))
            }
            (Some(_), None) => {
                return Err(Error::Usage(
                    "--part-id without --num-parts (and SLURM_ARRAY_TASK_COUNT is not set)".into(),
                ))
            }
        };
        if count == 0 {
            return Err(Error::Usage("--num-parts 0: give at least one part".into()));
        }
        if id >= count {
            let from_slurm = if self.part_id.is_none() || self.num_parts.is_none() {
                " (from SLURM_ARRAY_TASK_*: an array with gaps, e.g. --array=0,3,7, cannot \
                 number the parts; give --num-parts and --part-id)"
            } else {
                ""
            };
            return Err(Error::Usage(format!(
                "--part-id {id} with --num-parts {count}: parts are numbered 0 to {}{from_slurm}",
                count - 1
            )));
        }
        Ok(Part { id, count })
    }
}

/// This part's inputs: the list sorted by path (the same on every process, whatever order the
/// arguments or the directory listing came in, duplicates kept for the caller's check), then
/// every `count`-th from `id`.
pub fn select(mut inputs: Vec<PathBuf>, part: Part) -> Vec<PathBuf> {
    if part.count == 1 {
        return inputs;
    }
    inputs.sort();
    inputs
        .into_iter()
        .enumerate()
        .filter(|(n, _)| n % part.count == part.id)
        .map(|(_, p)| p)
        .collect()
}

/// The `--jsonl` file, opened for appending before any work.
pub struct Log {
    file: Option<std::fs::File>,
    path: PathBuf,
    part: Part,
}

impl Log {
    pub fn open(path: Option<&Path>, part: Part) -> Result<Log> {
        let file = path
            .map(|p| {
                std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(p)
                    .map_err(|e| Error::io(p, e))
            })
            .transpose()?;
        Ok(Log {
            file,
            path: path.map(Path::to_path_buf).unwrap_or_default(),
            part,
        })
    }

    /// One case: `report` is `segment`'s per-volume report when it ran.
    pub fn done(&mut self, input: &Path, report: &Value) -> Result<()> {
        let voxels: Vec<Value> = report["prompts"]
            .as_array()
            .map(|ps| ps.iter().map(|p| p["voxels"].clone()).collect())
            .unwrap_or_default();
        self.line(json!({
            "input": input,
            "outputs": report["outputs"],
            "status": "done",
            "error": null,
            "voxels": voxels,
            "seconds": report["seconds"],
        }))
    }

    pub fn failed(&mut self, input: &Path, e: &Error) -> Result<()> {
        self.line(json!({
            "input": input,
            "outputs": [],
            "status": "failed",
            "error": e.to_string(),
            "exit_code": e.exit_code(),
            "voxels": null,
            "seconds": null,
        }))
    }

    pub fn skipped(&mut self, input: &Path, outputs: &[PathBuf]) -> Result<()> {
        self.line(json!({
            "input": input,
            "outputs": outputs,
            "status": "skipped",
            "error": null,
            "voxels": null,
            "seconds": null,
        }))
    }

    /// Appends `v` and a newline in one `write` on an `O_APPEND` file: the kernel places each
    /// write at the end as a whole, so lines from several processes never interleave (on a
    /// local file system; NFS does not promise it, docs/scale-out.md).
    fn line(&mut self, mut v: Value) -> Result<()> {
        let Some(f) = &mut self.file else {
            return Ok(());
        };
        v["part"] = json!(self.part.id);
        v["num_parts"] = json!(self.part.count);
        let mut bytes = serde_json::to_vec(&v).map_err(|e| Error::Internal(e.to_string()))?;
        bytes.push(b'\n');
        let n = f.write(&bytes).map_err(|e| Error::io(&self.path, e))?;
        if n != bytes.len() {
            return Err(Error::io(
                &self.path,
                std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    format!("short append ({n} of {} bytes)", bytes.len()),
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(n: Option<usize>, i: Option<usize>) -> ShardArgs {
        ShardArgs {
            num_parts: n,
            part_id: i,
            ..Default::default()
        }
    }

    #[test]
    fn parts_from_flags_and_slurm() {
        let none = |_: &str| None;
        assert_eq!(
            args(None, None).part_from(true, none).unwrap(),
            Part { id: 0, count: 1 }
        );
        assert_eq!(
            args(Some(3), Some(2)).part_from(true, none).unwrap(),
            Part { id: 2, count: 3 }
        );
        let slurm = |k: &str| match k {
            "SLURM_ARRAY_TASK_COUNT" => Some("6".to_string()),
            "SLURM_ARRAY_TASK_ID" => Some("4".to_string()),
            "SLURM_ARRAY_TASK_MIN" => Some("1".to_string()),
            _ => None,
        };
        assert_eq!(
            args(None, None).part_from(true, slurm).unwrap(),
            Part { id: 3, count: 6 }
        );
        // Flags win over the environment; one --out file ignores Slurm.
        assert_eq!(
            args(Some(2), Some(0)).part_from(true, slurm).unwrap(),
            Part { id: 0, count: 2 }
        );
        assert_eq!(
            args(None, None).part_from(false, slurm).unwrap(),
            Part { id: 0, count: 1 }
        );
        for (a, dir, want) in [
            (args(Some(3), Some(3)), true, "parts are numbered 0 to 2"),
            (args(Some(0), Some(0)), true, "--num-parts 0"),
            (args(Some(3), None), true, "--num-parts without --part-id"),
            (args(None, Some(1)), true, "--part-id without --num-parts"),
            (args(Some(3), Some(1)), false, "use --out-dir"),
        ] {
            let e = a.part_from(dir, none).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
            assert_eq!(e.exit_code(), 2);
        }
        let bad = |k: &str| (k == "SLURM_ARRAY_TASK_COUNT").then(|| "x".to_string());
        let e = args(None, Some(0)).part_from(true, bad).unwrap_err();
        assert!(e.to_string().contains("SLURM_ARRAY_TASK_COUNT=x"), "{e}");
    }

    #[test]
    fn every_input_in_exactly_one_part() {
        let inputs: Vec<PathBuf> = ["e", "a", "d", "b", "f", "c", "g"]
            .iter()
            .map(PathBuf::from)
            .collect();
        let mut all: Vec<PathBuf> = (0..3)
            .flat_map(|id| select(inputs.clone(), Part { id, count: 3 }))
            .collect();
        assert_eq!(
            select(inputs.clone(), Part { id: 1, count: 3 }),
            [PathBuf::from("b"), PathBuf::from("e")]
        );
        all.sort();
        let mut want = inputs;
        want.sort();
        assert_eq!(all, want);
    }
}
