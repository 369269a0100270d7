//! One writer per run directory.
//!
//! `blipd pretrain`, `resume` and `finetune` hold an exclusive advisory lock (`flock`) on
//! `<run dir>/.blipd.lock` (`.blipd-rank<R>.lock` for rank R > 0 of a data-parallel job) for as long as
//! they write there. The file holds the holder's pid, so a second process is refused with a message
//! naming it. The operating system drops the lock when its process dies, also on `kill -9`: a lock
//! file left by a dead process is taken over (with a note naming the old pid), never a reason to stop.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};

/// A held run-directory lock; released on drop (and by the OS when the process dies).
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    _file: File,
}

/// The lock file of `rank` in `dir`.
pub fn lock_path(dir: &Path, rank: usize) -> PathBuf {
    if rank == 0 {
        dir.join(".blipd.lock")
    } else {
        dir.join(format!(".blipd-rank{rank}.lock"))
    }
}

impl RunLock {
    /// Takes the lock of `dir` (created if missing) for `rank`, or fails naming the process that holds
    /// it. `what` names the command in the message (e.g. `"pretrain"`).
    pub fn acquire(dir: &Path, rank: usize, what: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let path = lock_path(dir, rank);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        let mut previous = String::new();
        // A lock file that is not text (or unreadable) only loses the old pid for the message.
        let _ = file.read_to_string(&mut previous);
        let holder = parse_holder(&previous);
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(TrainError::Locked {
                    dir: dir.to_path_buf(),
                    holder: holder
                        .map(|h| format!("pid {} ({})", h.0, h.1))
                        .unwrap_or_else(|| "another process".into()),
                    lock: path,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(TrainError::io(&path, e)),
        }
        if let Some((pid, cmd)) = holder.filter(|h| h.0 != std::process::id()) {
            tracing::info!(
                "{}: taking over the lock left by pid {pid} ({cmd}), which no longer holds it",
                dir.display()
            );
        }
        let me = format!("{} blipd {what}\n", std::process::id());
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(me.as_bytes()))
            .and_then(|_| file.flush())
            .map_err(|e| TrainError::io(&path, e))?;
        Ok(Self { path, _file: file })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `"<pid> <what…>"` → (pid, what).
fn parse_holder(text: &str) -> Option<(u32, String)> {
    let line = text.lines().next()?.trim();
    let (pid, rest) = line.split_once(' ').unwrap_or((line, ""));
    Some((pid.parse().ok()?, rest.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_pid_and_a_released_lock_is_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let first = RunLock::acquire(&dir, 0, "pretrain").unwrap();
        let text = std::fs::read_to_string(first.path()).unwrap();
        assert_eq!(text, format!("{} blipd pretrain\n", std::process::id()));
        // flock locks belong to the open file description: a second open in this process conflicts
        // exactly as another process would.
        let err = RunLock::acquire(&dir, 0, "resume").unwrap_err().to_string();
        println!("{err}");
        assert!(
            err.contains(&format!("pid {} (blipd pretrain)", std::process::id())),
            "{err}"
        );
        assert!(err.contains(&dir.display().to_string()), "{err}");
        // Another rank has its own lock.
        let other = RunLock::acquire(&dir, 1, "pretrain").unwrap();
        assert!(other.path().ends_with(".blipd-rank1.lock"));
        drop(first);
        // A stale file (as a killed process leaves it) is taken over.
        std::fs::write(lock_path(&dir, 0), "999999999 blipd pretrain\n").unwrap();
        let again = RunLock::acquire(&dir, 0, "resume").unwrap();
        let text = std::fs::read_to_string(again.path()).unwrap();
        assert_eq!(text, format!("{} blipd resume\n", std::process::id()));
    }

    #[test]
    fn holder_parsing() {
        assert_eq!(
            parse_holder("12 blipd pretrain\n"),
            Some((12, "blipd pretrain".into()))
        );
        assert_eq!(parse_holder("12"), Some((12, String::new())));
        assert_eq!(parse_holder("junk"), None);
        assert_eq!(parse_holder(""), None);
    }
}
