//! Atomic files and checkpoint directories.
//!
//! A checkpoint is a directory holding `config.json`, `model.safetensors` and, for training runs,
//! `optimizer.safetensors` and `trainer.json`. It is written into a temporary sibling directory,
//! every file fsynced, then renamed into place; the previous version is moved aside first and
//! removed last, so a kill at any moment leaves a complete checkpoint at `dir` or `dir.old`.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A temporary path next to `path` (same filesystem, so rename is atomic).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "file".into());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn sync_dir(dir: &Path) {
    // Best effort: directories cannot be fsynced on every platform.
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

/// fsync `tmp`, rename it to `path`, fsync the parent directory. Temporaries of `path` left by
/// processes that died mid-write (kill -9) go too.
pub fn fsync_and_rename(tmp: &Path, path: &Path) -> Result<()> {
    let f = File::open(tmp).map_err(|e| Error::io(tmp, e))?;
    f.sync_all().map_err(|e| Error::io(tmp, e))?;
    drop(f);
    std::fs::rename(tmp, path).map_err(|e| Error::io(path, e))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    remove_dead_temp_files(path);
    Ok(())
}

/// Removes `.NAME.tmp-PID` files beside `path` whose process is gone (best effort; where
/// `/proc` cannot tell, nothing is removed).
fn remove_dead_temp_files(path: &Path) {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    if !Path::new("/proc/self").exists() {
        return;
    }
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file.strip_prefix(&prefix) else {
            continue;
        };
        let gone = pid.parse::<u32>().is_ok_and(|pid| {
            pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists()
        });
        if gone && entry.path().is_file() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Writes bytes atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    fsync_and_rename(&tmp, path)
}

/// Writes pretty JSON atomically.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::msg(e.to_string()))?;
    write_atomic(path, format!("{text}\n").as_bytes())
}

/// Reads a JSON file with the path in every error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Crash tests widen the window between a checkpoint's files and its rename with
/// `PALM_TEST_CHECKPOINT_DELAY_MS`, so a kill lands inside a write; unset, nothing happens.
fn test_delay() {
    if let Some(ms) = std::env::var("PALM_TEST_CHECKPOINT_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Directory writes ([`write_dir_atomic`]) made by this process so far, for the fault hook.
static DIR_WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Fault tests make the N-th directory write of the process fail with
/// `PALM_TEST_FAIL_CHECKPOINT_WRITE=N` (counted from 1, over every [`write_dir_atomic`]: periodic
/// checkpoints, final models): after its files are in the temporary directory, the largest is
/// cut in half and the write fails as a full disk does (`StorageFull`, "No space left on
/// device"). Unset, nothing happens.
fn test_fault(tmp: &Path) -> Result<()> {
    let n = DIR_WRITES.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    let Some(fail_at) = std::env::var("PALM_TEST_FAIL_CHECKPOINT_WRITE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    else {
        return Ok(());
    };
    if n != fail_at {
        return Ok(());
    }
    // the largest file (the weights, usually): the one a full disk stops
    let victim = std::fs::read_dir(tmp)
        .map_err(|e| Error::io(tmp, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| Some((std::fs::metadata(&p).ok().filter(|m| m.is_file())?.len(), p)))
        .max();
    let victim = match victim.as_ref().map(|(_, p)| p) {
        Some(f) => {
            // a write cut short: half of the file reached the disk
            let cut = |e| Error::io(f, e);
            let len = std::fs::metadata(f).map_err(cut)?.len();
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(f)
                .map_err(cut)?;
            file.set_len(len / 2).map_err(cut)?;
            f.clone()
        }
        None => tmp.to_path_buf(),
    };
    Err(Error::io(
        victim,
        std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "No space left on device (injected by PALM_TEST_FAIL_CHECKPOINT_WRITE)",
        ),
    ))
}

/// Removes `DIR.tmp-*` siblings of `dir` (this process's own included), and `.DIR.tmp-*`
/// directories: scratch copies made at [`temp_path`] of `dir` (as exporting a merged policy
/// does) by a process killed before it removed them.
fn remove_stale_temporaries(dir: &Path) -> Result<()> {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Ok(());
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Ok(()); // no parent yet: nothing left behind
    };
    let prefix = format!("{}.tmp-", name.to_string_lossy());
    let scratch = format!(".{prefix}");
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.starts_with(&prefix) || file.starts_with(&scratch) {
            let p = entry.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
    }
    Ok(())
}

fn with_suffix(dir: &Path, suffix: &str) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Builds a directory atomically: `fill` writes into a fresh temporary directory, which then
/// replaces `dir`. On error (in `fill`, or while syncing and renaming: a full disk, a file over
/// the size limit) the temporary directory is removed, `dir` is untouched, and the error names
/// `dir`. Temporary directories of earlier writes of `dir` that never finished (a process killed
/// mid-write leaves `DIR.tmp-PID`) are removed first.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = with_suffix(dir, &format!(".tmp-{}", std::process::id()));
    remove_stale_temporaries(dir)?;
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let written = fill(&tmp).and_then(|()| {
        test_fault(&tmp)?;
        test_delay();
        sync_all_files(&tmp)
    });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::msg(format!(
            "could not write {} (any earlier version of it is kept): {e}",
            dir.display()
        )));
    }
    swap_into_place(&tmp, dir)
}

/// fsyncs every file of `tmp` and then `tmp` itself.
fn sync_all_files(tmp: &Path) -> Result<()> {
    for entry in std::fs::read_dir(tmp).map_err(|e| Error::io(tmp, e))? {
        let p = entry.map_err(|e| Error::io(tmp, e))?.path();
        if p.is_file() {
            File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&p, e))?;
        }
    }
    sync_dir(tmp);
    Ok(())
}

/// Moves the complete `tmp` to `dir`: the previous `dir` goes to `dir.old` first and is removed
/// last, so `dir` or `dir.old` holds a complete version at every moment.
fn swap_into_place(tmp: &Path, dir: &Path) -> Result<()> {
    let old = with_suffix(dir, ".old");
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(tmp, dir).map_err(|e| Error::io(dir, e))?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent);
    }
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

/// Where a checkpoint directory really is: `dir`, or `dir.old` if a write was interrupted
/// between its two renames.
pub fn resolve_dir(dir: &Path) -> PathBuf {
    if !dir.exists() {
        let old = with_suffix(dir, ".old");
        if old.exists() {
            return old;
        }
    }
    dir.to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_write_replaces_and_failed_write_keeps_old() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        write_dir_atomic(&dir, |d| write_atomic(&d.join("a"), b"one")).unwrap();
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"one");
        write_dir_atomic(&dir, |d| write_atomic(&d.join("a"), b"two")).unwrap();
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"two");
        let r = write_dir_atomic(&dir, |_| Err(Error::msg("killed")));
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains(&dir.display().to_string()) && e.contains("killed"),
            "the error names the directory and the cause: {e}"
        );
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temp left behind");
    }

    #[test]
    fn a_killed_writer_s_temporary_is_removed_by_the_next_write() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("checkpoint");
        // what kill -9 during a write leaves: another pid's half-written temporary
        let stale = root.path().join("checkpoint.tmp-424242");
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(stale.join("model.safetensors"), b"half").unwrap();
        // and a scratch copy at temp_path(dir), with its own write's temporary inside
        let scratch = root.path().join(".checkpoint.tmp-424243.tmp-424243");
        std::fs::create_dir_all(&scratch).unwrap();
        write_dir_atomic(&dir, |d| write_atomic(&d.join("a"), b"ok")).unwrap();
        assert!(!stale.exists() && !scratch.exists());
        let names: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "only the checkpoint is left");
    }

    #[test]
    fn a_dead_writer_s_temporary_file_is_removed_by_the_next_write() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("summary.json");
        // pid 0 is never a process that could still be writing
        let stale = root.path().join(".summary.json.tmp-0");
        std::fs::write(&stale, b"half").unwrap();
        write_atomic(&path, b"{}").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{}");
        if Path::new("/proc/self").exists() {
            assert!(!stale.exists(), "the dead writer's temporary is removed");
        }
    }

    #[test]
    fn interrupted_swap_is_found_at_old() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        let old = root.path().join("ckpt.old");
        std::fs::create_dir_all(&old).unwrap();
        assert_eq!(resolve_dir(&dir), old);
    }
}
