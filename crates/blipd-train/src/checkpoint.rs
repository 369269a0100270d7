//! Checkpoint folders: atomic commit, checksums, retention, and discovery of the newest valid one.
//!
//! Layout: `<run_dir>/checkpoints/step-000001000/` holding whatever the trainer wrote (weights,
//! optimizer state, RNG streams, data cursor, config, the stage's own files) plus
//! `manifest.json`, which lists every file with its size and its XXH3-64 checksum.
//!
//! A checkpoint is written into `step-….tmp/`; every file and folder is fsync'ed, the manifest is
//! written last, then the folder is renamed to its final name and the parent folder fsync'ed. A
//! process killed at any point leaves either the previous set of checkpoints or a `.tmp` folder
//! that discovery ignores (and [`remove_stale`] deletes). On load, every file is re-hashed and
//! compared with the manifest; a checkpoint that fails is skipped with a warning.
//!
//! XXH3-64 is a non-cryptographic 64-bit hash (xxhash-rust): it detects truncation, partial
//! writes and bit rot, which is what is needed here, at memory speed (tens of GB/s) rather
//! than SHA-256's few hundred MB/s per core on multi-GB optimizer states. It does not protect
//! against deliberate tampering.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::error::{Result, TrainError};

/// Folder under the run directory that holds the checkpoints.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// Name of the manifest file inside a checkpoint.
pub const MANIFEST: &str = "manifest.json";
const MANIFEST_FORMAT: &str = "blipd-checkpoint-1";
const PREFIX: &str = "step-";

/// Size and checksum of one file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    pub bytes: u64,
    /// XXH3-64 of the file's bytes, 16 hex digits.
    pub xxh3_64: String,
}

/// `manifest.json` of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub step: u64,
    /// Relative path (with `/`) → digest, for every file of the checkpoint but the manifest.
    pub files: BTreeMap<String, FileDigest>,
}

/// A committed checkpoint folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointRef {
    pub step: u64,
    pub dir: PathBuf,
}

/// `<run_dir>/checkpoints`.
pub fn checkpoints_root(run_dir: &Path) -> PathBuf {
    run_dir.join(CHECKPOINTS_DIR)
}

/// Final folder of the checkpoint of `step`.
pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_root(run_dir).join(format!("{PREFIX}{step:09}"))
}

fn parse_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Committed checkpoints (final names only), by ascending step. Does not verify them.
pub fn list_checkpoints(run_dir: &Path) -> Result<Vec<CheckpointRef>> {
    let root = checkpoints_root(run_dir);
    let rd = match std::fs::read_dir(&root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainError::io(&root, e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| TrainError::io(&root, e))?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(parse_step) else {
            continue;
        };
        if entry.path().is_dir() {
            out.push(CheckpointRef {
                step,
                dir: entry.path(),
            });
        }
    }
    out.sort_by_key(|c| c.step);
    Ok(out)
}

/// Size and XXH3-64 of a file, streaming.
pub fn digest_file(path: &Path) -> Result<FileDigest> {
    let mut f = File::open(path).map_err(|e| TrainError::io(path, e))?;
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| TrainError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileDigest {
        bytes,
        xxh3_64: format!("{:016x}", h.digest()),
    })
}

fn walk_files(
    root: &Path,
    dir: &Path,
    out: &mut Vec<(String, PathBuf)>,
    dirs: &mut Vec<PathBuf>,
) -> Result<()> {
    dirs.push(dir.to_path_buf());
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| TrainError::io(dir, e))?
        .collect::<std::io::Result<_>>()
        .map_err(|e| TrainError::io(dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let ft = e.file_type().map_err(|err| TrainError::io(&p, err))?;
        if ft.is_dir() {
            walk_files(root, &p, out, dirs)?;
        } else if ft.is_file() {
            let rel = p
                .strip_prefix(root)
                .expect("walked path is under root")
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            if rel != MANIFEST {
                out.push((rel, p));
            }
        }
    }
    Ok(())
}

fn fsync_path(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| TrainError::io(path, e))
}

/// Reads the manifest of `dir` and checks every file against it (size and checksum).
pub fn verify_checkpoint(dir: &Path) -> Result<Manifest> {
    let mpath = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&mpath).map_err(|e| TrainError::io(&mpath, e))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| TrainError::Json {
        path: mpath.clone(),
        source: e,
    })?;
    if manifest.format != MANIFEST_FORMAT {
        return Err(TrainError::Checkpoint {
            path: dir.to_path_buf(),
            reason: format!(
                "manifest format `{}`, expected `{MANIFEST_FORMAT}`",
                manifest.format
            ),
        });
    }
    for (rel, want) in &manifest.files {
        let p = dir.join(rel);
        let got = digest_file(&p)?;
        if got.bytes != want.bytes {
            return Err(TrainError::Corrupt {
                path: p,
                reason: format!("{} bytes, manifest says {}", got.bytes, want.bytes),
            });
        }
        if got.xxh3_64 != want.xxh3_64 {
            return Err(TrainError::Corrupt {
                path: p,
                reason: format!(
                    "xxh3-64 {} differs from the manifest's {}",
                    got.xxh3_64, want.xxh3_64
                ),
            });
        }
    }
    Ok(manifest)
}

/// A committed checkpoint that failed verification, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub checkpoint: CheckpointRef,
    pub reason: String,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.checkpoint.dir.display(), self.reason)
    }
}

/// A checkpoint that verified, with its manifest.
pub type ValidCheckpoint = (CheckpointRef, Manifest);

/// The newest checkpoint that verifies, and every newer one that does not (newest first, each with
/// its reason). Renames nothing.
pub fn scan_checkpoints(run_dir: &Path) -> Result<(Option<ValidCheckpoint>, Vec<Rejected>)> {
    let mut rejected = Vec::new();
    for c in list_checkpoints(run_dir)?.into_iter().rev() {
        let reason = match verify_checkpoint(&c.dir) {
            Ok(m) if m.step == c.step => return Ok((Some((c, m)), rejected)),
            Ok(m) => format!("its manifest is for step {}", m.step),
            Err(e) => e.to_string(),
        };
        rejected.push(Rejected {
            checkpoint: c,
            reason,
        });
    }
    Ok((None, rejected))
}

/// Renames rejected checkpoints to `step-….invalid` (kept for inspection, ignored from then on) with a
/// warning, so that later checkpoints of the resumed run can take their names and retention does not
/// count them.
pub fn set_aside(rejected: &[Rejected]) -> Result<()> {
    for r in rejected {
        tracing::warn!("skipping invalid checkpoint {r}");
        quarantine(&r.checkpoint.dir)?;
    }
    Ok(())
}

/// The newest checkpoint that verifies; invalid ones newer than it are set aside ([`set_aside`]).
pub fn latest_valid_checkpoint(run_dir: &Path) -> Result<Option<(CheckpointRef, Manifest)>> {
    let (valid, rejected) = scan_checkpoints(run_dir)?;
    set_aside(&rejected)?;
    Ok(valid)
}

fn quarantine(dir: &Path) -> Result<()> {
    let mut target = dir.with_extension("invalid");
    let mut i = 1;
    while target.exists() {
        target = dir.with_extension(format!("invalid{i}"));
        i += 1;
    }
    std::fs::rename(dir, &target).map_err(|e| TrainError::io(dir, e))?;
    tracing::warn!("moved {} to {}", dir.display(), target.display());
    Ok(())
}

/// Removes leftovers of interrupted writes and deletions (`*.tmp`, `*.trash` folders).
pub fn remove_stale(run_dir: &Path) -> Result<()> {
    let root = checkpoints_root(run_dir);
    let Ok(rd) = std::fs::read_dir(&root) else {
        return Ok(());
    };
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(PREFIX) && (name.ends_with(".tmp") || name.ends_with(".trash")) {
            tracing::info!("removing stale {}", entry.path().display());
            std::fs::remove_dir_all(entry.path()).map_err(|e| TrainError::io(entry.path(), e))?;
        }
    }
    Ok(())
}

/// Deletes all but the newest `keep_last` committed checkpoints (`0` keeps all). Each is first
/// renamed to `….trash` so that a half-deleted folder is never mistaken for a checkpoint.
pub fn prune_checkpoints(run_dir: &Path, keep_last: usize) -> Result<Vec<PathBuf>> {
    if keep_last == 0 {
        return Ok(Vec::new());
    }
    let all = list_checkpoints(run_dir)?;
    let n = all.len().saturating_sub(keep_last);
    let mut removed = Vec::new();
    for c in all.into_iter().take(n) {
        remove_committed(&c.dir)?;
        removed.push(c.dir);
    }
    Ok(removed)
}

fn remove_committed(dir: &Path) -> Result<()> {
    let trash = dir.with_extension("trash");
    if trash.exists() {
        std::fs::remove_dir_all(&trash).map_err(|e| TrainError::io(&trash, e))?;
    }
    std::fs::rename(dir, &trash).map_err(|e| TrainError::io(dir, e))?;
    std::fs::remove_dir_all(&trash).map_err(|e| TrainError::io(&trash, e))
}

/// A checkpoint being written. Write files under [`PendingCheckpoint::dir`], then
/// [`PendingCheckpoint::commit`]. Dropping it without committing leaves a `.tmp` folder that
/// discovery ignores.
#[derive(Debug)]
pub struct PendingCheckpoint {
    step: u64,
    tmp: PathBuf,
    final_dir: PathBuf,
}

impl PendingCheckpoint {
    /// Creates `<run_dir>/checkpoints/step-….tmp/` (emptied if a previous attempt left it).
    pub fn begin(run_dir: &Path, step: u64) -> Result<Self> {
        let final_dir = checkpoint_dir(run_dir, step);
        let tmp = final_dir.with_extension("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        Ok(Self {
            step,
            tmp,
            final_dir,
        })
    }

    /// The folder to write into.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// Hashes and fsyncs every file, writes and fsyncs the manifest, renames the folder to its
    /// final name (replacing an older checkpoint of the same step) and fsyncs the parent.
    pub fn commit(self) -> Result<CheckpointRef> {
        let mut files = Vec::new();
        let mut dirs = Vec::new();
        walk_files(&self.tmp, &self.tmp, &mut files, &mut dirs)?;
        let mut digests = BTreeMap::new();
        for (rel, path) in &files {
            fsync_path(path)?;
            digests.insert(rel.clone(), digest_file(path)?);
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT.to_string(),
            step: self.step,
            files: digests,
        };
        let mpath = self.tmp.join(MANIFEST);
        let text = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
        let mut f = File::create(&mpath).map_err(|e| TrainError::io(&mpath, e))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| TrainError::io(&mpath, e))?;
        for d in dirs.iter().rev() {
            fsync_path(d)?;
        }
        if self.final_dir.exists() {
            remove_committed(&self.final_dir)?;
        }
        std::fs::rename(&self.tmp, &self.final_dir).map_err(|e| TrainError::io(&self.tmp, e))?;
        let parent = self.final_dir.parent().expect("checkpoint has a parent");
        fsync_path(parent)?;
        Ok(CheckpointRef {
            step: self.step,
            dir: self.final_dir,
        })
    }
}

/// Writes `bytes` to `path` and fsyncs it.
pub fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| TrainError::io(path, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| TrainError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_ckpt(run: &Path, step: u64, content: &str) -> CheckpointRef {
        let p = PendingCheckpoint::begin(run, step).unwrap();
        std::fs::write(p.dir().join("a.txt"), content).unwrap();
        std::fs::create_dir_all(p.dir().join("stage")).unwrap();
        std::fs::write(p.dir().join("stage/b.bin"), [1u8, 2, 3]).unwrap();
        p.commit().unwrap()
    }

    #[test]
    fn commit_verify_and_detect_corruption() {
        let t = tempfile::tempdir().unwrap();
        let run = t.path();
        let c1 = write_ckpt(run, 10, "ten");
        let c2 = write_ckpt(run, 20, "twenty");
        let m = verify_checkpoint(&c2.dir).unwrap();
        assert_eq!(m.files.len(), 2);
        assert!(m.files.contains_key("stage/b.bin"));
        // An interrupted write is ignored.
        let pending = PendingCheckpoint::begin(run, 30).unwrap();
        std::fs::write(pending.dir().join("a.txt"), "partial").unwrap();
        drop(pending);
        assert_eq!(list_checkpoints(run).unwrap().len(), 2);
        // Flip one byte of the newest: it is skipped and set aside, the older one is chosen.
        let f = c2.dir.join("a.txt");
        std::fs::write(&f, "twentY").unwrap();
        let err = verify_checkpoint(&c2.dir).unwrap_err();
        assert!(err.to_string().contains("a.txt"), "{err}");
        let (latest, _) = latest_valid_checkpoint(run).unwrap().unwrap();
        assert_eq!(latest, c1);
        assert_eq!(list_checkpoints(run).unwrap(), vec![c1.clone()]);
        remove_stale(run).unwrap();
        assert!(!checkpoint_dir(run, 30).with_extension("tmp").exists());
        // Truncation is caught by size.
        std::fs::write(c1.dir.join("stage/b.bin"), [1u8]).unwrap();
        let err = verify_checkpoint(&c1.dir).unwrap_err();
        assert!(err.to_string().contains("bytes"), "{err}");
    }

    #[test]
    fn prune_keeps_newest() {
        let t = tempfile::tempdir().unwrap();
        for s in [1, 2, 3, 4] {
            write_ckpt(t.path(), s, "x");
        }
        let removed = prune_checkpoints(t.path(), 2).unwrap();
        assert_eq!(removed.len(), 2);
        let left: Vec<u64> = list_checkpoints(t.path())
            .unwrap()
            .iter()
            .map(|c| c.step)
            .collect();
        assert_eq!(left, vec![3, 4]);
        // Re-committing an existing step replaces it.
        write_ckpt(t.path(), 4, "again");
        let text = std::fs::read_to_string(checkpoint_dir(t.path(), 4).join("a.txt")).unwrap();
        assert_eq!(text, "again");
    }
}
