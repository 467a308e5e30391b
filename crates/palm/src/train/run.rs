//! Pieces every trainer (language model, reward model, PPO) shares: the Ctrl-C stop flag, the
//! progress bar, the NaN/inf guard, and numbered checkpoint directories with rotation.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::{Error, Result};

static STOP: AtomicBool = AtomicBool::new(false);
static HANDLER: OnceLock<bool> = OnceLock::new();

/// The process-wide stop flag, set by Ctrl-C (SIGINT) and by SIGTERM/SIGHUP (what `timeout`,
/// `docker stop` and Slurm send; ctrlc's `termination` feature). The first call installs the
/// handler; a second signal while a trainer is saving exits at once (status 130).
pub fn stop_flag() -> &'static AtomicBool {
    HANDLER.get_or_init(|| {
        ctrlc::set_handler(|| {
            if STOP.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting without saving");
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: saving a checkpoint, then stopping (Ctrl-C again to quit now)");
        })
        .is_ok()
    });
    &STOP
}

/// A progress bar on stderr over `total` steps starting at `pos`; hidden when `quiet`.
/// Its message is meant for the latest loss and tokens/s.
pub fn progress_bar(total: u64, pos: u64, quiet: bool) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(
        Some(total),
        if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    if let Ok(style) = ProgressStyle::with_template(
        "{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} {msg} ETA {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_position(pos);
    pb
}

/// Errors when a loss (or any metric) is NaN or infinite, naming the step and the last good
/// checkpoint (which is left as it is).
pub fn check_finite(step: usize, what: &str, value: f64, last_good: Option<&Path>) -> Result<()> {
    if value.is_finite() {
        return Ok(());
    }
    let keep = match last_good {
        Some(p) => format!("the last good checkpoint is {}", p.display()),
        None => "no checkpoint was written yet".to_string(),
    };
    Err(Error::msg(format!(
        "step {step}: {what} is {value}; training stopped ({keep}). Try a lower --lr or stronger clipping"
    )))
}

/// Fault tests poison one gradient with `PALM_TEST_NAN_GRAD_AT_STEP=N`: at step N (the first
/// step is 1) the first element of the first gradient becomes NaN, after the backward pass and
/// before the trainer's guard. Returns whether it did; unset, nothing happens.
pub fn test_poison_gradient(step: usize, grads: &mut crate::train::optim::Grads) -> bool {
    static AT: OnceLock<Option<usize>> = OnceLock::new();
    let at = AT.get_or_init(|| {
        std::env::var("PALM_TEST_NAN_GRAD_AT_STEP")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if *at != Some(step) {
        return false;
    }
    match grads.iter_mut().flatten().find(|g| !g.is_empty()) {
        Some(g) => {
            g[0] = f32::NAN;
            true
        }
        None => false,
    }
}

/// Whether `log` already holds a record of `step` with `key`: a run resumed from its last
/// checkpoint (written after the final evaluation was logged) does not log that evaluation twice.
pub fn logged_at(log: &crate::train::metrics::MetricsLog, step: u64, key: &str) -> bool {
    log.records
        .iter()
        .any(|r| r.get("step").and_then(|s| s.as_u64()) == Some(step) && r.get(key).is_some())
}

/// `RUN_DIR/checkpoints/step-XXXXXX/` directories, written atomically, the last `keep` kept.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    pub dir: PathBuf,
    pub keep: usize,
}

impl Checkpoints {
    pub fn new(run_dir: &Path, keep: usize) -> Self {
        Self {
            dir: run_dir.join("checkpoints"),
            keep: keep.max(1),
        }
    }

    pub fn path(&self, step: usize) -> PathBuf {
        self.dir.join(format!("step-{step:06}"))
    }

    /// (step, directory) of every complete checkpoint, oldest first. A checkpoint whose write was
    /// interrupted between its two renames is found at `step-XXXXXX.old`.
    pub fn list(&self) -> Result<Vec<(usize, PathBuf)>> {
        if !self.dir.exists() {
            return Ok(vec![]);
        }
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))? {
            let name = entry
                .map_err(|e| Error::io(&self.dir, e))?
                .file_name()
                .to_string_lossy()
                .into_owned();
            let stem = name.strip_suffix(".old").unwrap_or(&name);
            let Some(step) = stem
                .strip_prefix("step-")
                .and_then(|s| s.parse::<usize>().ok())
            else {
                continue; // temporaries and foreign files
            };
            let dir = crate::checkpoint::resolve_dir(&self.path(step));
            if dir.is_dir() && !out.iter().any(|(s, _)| *s == step) {
                out.push((step, dir));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes the temporary directories of checkpoint writes that never finished (a process
    /// killed mid-write leaves `step-XXXXXX.tmp-PID`): called when a run starts or resumes, so
    /// they do not pile up. Returns how many were removed.
    pub fn clean_temporaries(&self) -> Result<usize> {
        if !self.dir.exists() {
            return Ok(0);
        }
        let mut n = 0;
        for entry in std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))? {
            let path = entry.map_err(|e| Error::io(&self.dir, e))?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_some_and(|n| n.starts_with("step-") && n.contains(".tmp-")) {
                std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
                tracing::info!(
                    "removed {}, left by an interrupted checkpoint write",
                    path.display()
                );
                n += 1;
            }
        }
        Ok(n)
    }

    pub fn latest(&self) -> Result<Option<(usize, PathBuf)>> {
        Ok(self.list()?.pop())
    }

    /// Writes checkpoint `step` (`fill` writes the files into a temporary directory), then removes
    /// the oldest ones beyond `keep`.
    pub fn write(&self, step: usize, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
        let path = self.path(step);
        crate::checkpoint::write_dir_atomic(&path, fill)?;
        let all = self.list()?;
        if all.len() > self.keep {
            for (_, dir) in &all[..all.len() - self.keep] {
                std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
        }
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_last_k() {
        let root = tempfile::tempdir().unwrap();
        let ck = Checkpoints::new(root.path(), 2);
        for s in [10, 20, 30] {
            ck.write(s, |d| crate::checkpoint::write_atomic(&d.join("x"), b"1"))
                .unwrap();
        }
        let steps: Vec<usize> = ck.list().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![20, 30]);
        assert_eq!(ck.latest().unwrap().unwrap().1, ck.path(30));
    }

    #[test]
    fn temporaries_of_interrupted_writes_are_cleaned() {
        let root = tempfile::tempdir().unwrap();
        let ck = Checkpoints::new(root.path(), 2);
        ck.write(10, |d| crate::checkpoint::write_atomic(&d.join("x"), b"1"))
            .unwrap();
        let stale = ck.dir.join("step-000020.tmp-99999");
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(stale.join("x"), b"half").unwrap();
        assert_eq!(ck.clean_temporaries().unwrap(), 1);
        assert!(!stale.exists());
        let steps: Vec<usize> = ck.list().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![10], "complete checkpoints are kept");
    }

    #[test]
    fn nan_guard_names_the_step() {
        assert!(check_finite(3, "loss", 1.5, None).is_ok());
        let e = check_finite(7, "loss", f64::NAN, Some(Path::new("/r/step-000005")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("step 7: loss is NaN") && e.contains("step-000005"),
            "{e}"
        );
    }
}
