//! Cached VAE posterior moments of the shards' target images (`blipd data encode-latents`).
//!
//! Stage 2 encodes every target image with the frozen VAE on every step; the posterior does not
//! change while the VAE and the target preprocessing stay the same, so it can be computed once. What
//! is cached is the posterior itself — its mean and standard deviation, `[4, h, w]` each per pair —
//! not one sample of it, so every step still draws fresh noise (`latent = mean + std·ε`), exactly as
//! the online path does.
//!
//! A cache is keyed by [`MomentsKey`]: a SHA-256 of the VAE's weights, the target side in pixels and
//! the name of the resize/crop rule. Each shard gets a side file `<shard>.moments-<key id>.safetensors`
//! (tensors `mean` and `std`, `[rows, 4, h, w]` f32, in the shard's row order; the key and the
//! shard's SHA-256 in the header metadata), and `moments.json` lists the caches of the folder. A cache
//! made with another VAE, another size or crop, or for a shard whose bytes changed since, is *stale*:
//! [`open_cache`] says so and why, and stage 2 stops rather than train on the wrong latents (the trap
//! other trainers' latent caches fall into).
//!
//! Files are written atomically (temporary name, fsync, rename), one shard at a time, so an interrupted
//! run leaves whole files and is resumed by running it again.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::shards::{sha256_bytes, write_atomic, Manifest, ShardEntry};

/// `moments.json` format tag.
pub const MOMENTS_FORMAT: &str = "blipd-moments-v1";
/// The index file in a shard folder.
pub const INDEX_NAME: &str = "moments.json";
/// The resize/crop rule stage 2 applies to targets (`blipd_data::preprocess::vae_target`).
pub const TARGET_CROP: &str = "shorter-side-catmull-rom-center-crop";

/// What a cache was computed with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MomentsKey {
    /// SHA-256 of the VAE's parameters (module order, f32 little-endian).
    pub vae_sha256: String,
    /// Target side in pixels.
    pub size: usize,
    /// The target resize/crop rule ([`TARGET_CROP`]).
    pub crop: String,
}

impl MomentsKey {
    /// A short id of the key (16 hex digits of its SHA-256), used in file names.
    pub fn id(&self) -> String {
        sha256_bytes(format!("{}|{}|{}", self.vae_sha256, self.size, self.crop).as_bytes())[..16]
            .to_string()
    }

    /// Why `self` (a cache's key) is not `want` (this run's), in words.
    fn differences(&self, want: &MomentsKey) -> String {
        let mut why = Vec::new();
        if self.vae_sha256 != want.vae_sha256 {
            why.push(format!(
                "it was made with VAE weights {}…, this run's VAE is {}…",
                &self.vae_sha256[..12.min(self.vae_sha256.len())],
                &want.vae_sha256[..12.min(want.vae_sha256.len())]
            ));
        }
        if self.size != want.size {
            why.push(format!(
                "it holds {}-pixel targets, this run uses {}",
                self.size, want.size
            ));
        }
        if self.crop != want.crop {
            why.push(format!(
                "it used crop rule {:?}, this run {:?}",
                self.crop, want.crop
            ));
        }
        why.join("; ")
    }
}

/// One shard's side file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MomentsShard {
    /// The shard's `index` in the manifest.
    pub index: u64,
    /// Side file name (in the shard folder).
    pub file: String,
    /// SHA-256 of the shard file the moments were computed from.
    pub shard_sha256: String,
    pub rows: u64,
}

/// One cache: a key and its side files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MomentsCache {
    pub key: MomentsKey,
    /// `[channels, h, w]` of one pair's mean (and std).
    pub latent_shape: [usize; 3],
    pub shards: Vec<MomentsShard>,
}

/// `moments.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MomentsIndex {
    pub format: String,
    pub caches: Vec<MomentsCache>,
}

impl MomentsIndex {
    /// `dir/moments.json`, `None` when there is none.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(INDEX_NAME);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DataError::io(&path, e)),
        };
        let idx: MomentsIndex = serde_json::from_str(&text).map_err(|e| DataError::Shard {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if idx.format != MOMENTS_FORMAT {
            return Err(DataError::Shard {
                path,
                reason: format!("format {:?}, expected {MOMENTS_FORMAT:?}", idx.format),
            });
        }
        Ok(Some(idx))
    }

    /// Writes `dir/moments.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self).expect("index serialises");
        text.push('\n');
        write_atomic(&dir.join(INDEX_NAME), text.as_bytes())
    }

    /// The cache of `key`, created empty when absent.
    pub fn cache_mut(&mut self, key: &MomentsKey, latent_shape: [usize; 3]) -> &mut MomentsCache {
        if let Some(i) = self.caches.iter().position(|c| &c.key == key) {
            return &mut self.caches[i];
        }
        self.caches.push(MomentsCache {
            key: key.clone(),
            latent_shape,
            shards: Vec::new(),
        });
        self.caches.last_mut().expect("just pushed")
    }
}

/// The side file name of `shard` for `key`.
pub fn file_name(shard: &ShardEntry, key: &MomentsKey) -> String {
    format!("{}.moments-{}.safetensors", shard.file, key.id())
}

/// Whether `entry` is an up-to-date side file of `shard`.
pub fn is_current(dir: &Path, entry: &MomentsShard, shard: &ShardEntry) -> bool {
    entry.index == shard.index
        && entry.shard_sha256 == shard.sha256
        && entry.rows == shard.rows
        && dir.join(&entry.file).is_file()
}

/// Writes one shard's side file: `mean` and `std`, `[rows, c, h, w]` f32 each.
pub fn write_shard(
    dir: &Path,
    shard: &ShardEntry,
    key: &MomentsKey,
    [c, h, w]: [usize; 3],
    mean: &[f32],
    std: &[f32],
) -> Result<MomentsShard> {
    let rows = shard.rows as usize;
    let n = rows * c * h * w;
    let file = file_name(shard, key);
    let path = dir.join(&file);
    if mean.len() != n || std.len() != n {
        return Err(DataError::Shard {
            path,
            reason: format!(
                "{} mean and {} std values for {rows} rows of [{c}, {h}, {w}]",
                mean.len(),
                std.len()
            ),
        });
    }
    let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let (mb, sb) = (bytes(mean), bytes(std));
    let shape = vec![rows, c, h, w];
    let views = vec![
        (
            "mean",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), &mb)
                .expect("sizes checked"),
        ),
        (
            "std",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &sb)
                .expect("sizes checked"),
        ),
    ];
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), MOMENTS_FORMAT.to_string());
    meta.insert(
        "key".to_string(),
        serde_json::to_string(key).expect("key serialises"),
    );
    meta.insert("shard_sha256".to_string(), shard.sha256.clone());
    let data = safetensors::serialize(views, Some(meta)).map_err(|e| DataError::Shard {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    write_atomic(&path, &data)?;
    Ok(MomentsShard {
        index: shard.index,
        file,
        shard_sha256: shard.sha256.clone(),
        rows: shard.rows,
    })
}

/// What [`open_cache`] found.
pub enum CacheStatus {
    /// No cache in the folder: compute latents online.
    None,
    /// A current cache for the key, covering every shard.
    Ready(MomentsReader),
    /// Caches exist but none fits; the reason, in words.
    Stale(String),
}

/// The cache of `key` in shard folder `dir` (whose manifest is `manifest`), if one is current.
pub fn open_cache(dir: &Path, manifest: &Manifest, key: &MomentsKey) -> Result<CacheStatus> {
    let Some(index) = MomentsIndex::load(dir)? else {
        return Ok(CacheStatus::None);
    };
    if index.caches.is_empty() {
        return Ok(CacheStatus::None);
    }
    let Some(cache) = index.caches.iter().find(|c| &c.key == key) else {
        let why = index
            .caches
            .iter()
            .map(|c| c.key.differences(key))
            .collect::<Vec<_>>()
            .join(" | ");
        return Ok(CacheStatus::Stale(format!(
            "the latent cache in {} does not fit this run: {why}",
            dir.display()
        )));
    };
    let mut files = HashMap::new();
    for shard in &manifest.shards {
        let Some(entry) = cache.shards.iter().find(|e| e.index == shard.index) else {
            return Ok(CacheStatus::Stale(format!(
                "the latent cache in {} has no moments for shard {} ({}): it was made before that \
                 shard existed",
                dir.display(),
                shard.index,
                shard.file
            )));
        };
        if !is_current(dir, entry, shard) {
            return Ok(CacheStatus::Stale(format!(
                "the latent cache file {} was made from another version of shard {} (its SHA-256 or \
                 row count changed, or the file is missing)",
                dir.join(&entry.file).display(),
                shard.file
            )));
        }
        files.insert(shard.index, dir.join(&entry.file));
    }
    let reader = MomentsReader::new(manifest, files, cache.latent_shape)?;
    Ok(CacheStatus::Ready(reader))
}

/// Reads pairs' moments from a cache's side files (one positioned read per tensor and pair).
pub struct MomentsReader {
    latent_shape: [usize; 3],
    /// Per position in the manifest's `shards`: the side file and its `mean`/`std` byte offsets.
    shards: Vec<(PathBuf, File, u64, u64)>,
}

impl MomentsReader {
    fn new(
        manifest: &Manifest,
        files: HashMap<u64, PathBuf>,
        latent_shape: [usize; 3],
    ) -> Result<Self> {
        let per = latent_shape.iter().product::<usize>() as u64 * 4;
        let mut shards = Vec::with_capacity(manifest.shards.len());
        for shard in &manifest.shards {
            let path = files[&shard.index].clone();
            let bad = |reason: String| DataError::Shard {
                path: path.clone(),
                reason,
            };
            let file = File::open(&path).map_err(|e| DataError::io(&path, e))?;
            let mut len8 = [0u8; 8];
            file.read_exact_at(&mut len8, 0)
                .map_err(|e| DataError::io(&path, e))?;
            let header_len = u64::from_le_bytes(len8);
            if header_len > 1 << 24 {
                return Err(bad(format!("header of {header_len} bytes")));
            }
            let mut header = vec![0u8; header_len as usize];
            file.read_exact_at(&mut header, 8)
                .map_err(|e| DataError::io(&path, e))?;
            let meta: serde_json::Value =
                serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
            let offset = |name: &str| -> Result<u64> {
                let t = &meta[name];
                let want = [
                    shard.rows as usize,
                    latent_shape[0],
                    latent_shape[1],
                    latent_shape[2],
                ];
                let shape: Vec<usize> = serde_json::from_value(t["shape"].clone())
                    .map_err(|_| bad(format!("no tensor `{name}`")))?;
                if t["dtype"] != "F32" || shape != want {
                    return Err(bad(format!(
                        "`{name}` is {} {shape:?}, expected F32 {want:?}",
                        t["dtype"]
                    )));
                }
                let start = t["data_offsets"][0]
                    .as_u64()
                    .ok_or_else(|| bad(format!("`{name}` has no data offsets")))?;
                Ok(8 + header_len + start)
            };
            let (m, s) = (offset("mean")?, offset("std")?);
            let end = m.max(s) + shard.rows * per;
            let size = file.metadata().map_err(|e| DataError::io(&path, e))?.len();
            if size < end {
                return Err(bad(format!("{size} bytes, the header needs {end}")));
            }
            shards.push((path, file, m, s));
        }
        Ok(Self {
            latent_shape,
            shards,
        })
    }

    /// `[c, h, w]` of one pair's moments.
    pub fn latent_shape(&self) -> [usize; 3] {
        self.latent_shape
    }

    /// Appends the mean and std of the pair at row `row` of shard position `shard`.
    pub fn read(
        &self,
        shard: usize,
        row: u64,
        mean: &mut Vec<f32>,
        std: &mut Vec<f32>,
    ) -> Result<()> {
        let (path, file, m, s) = &self.shards[shard];
        let n = self.latent_shape.iter().product::<usize>();
        let mut buf = vec![0u8; n * 4];
        for (base, out) in [(*m, mean), (*s, std)] {
            file.read_exact_at(&mut buf, base + row * n as u64 * 4)
                .map_err(|e| DataError::io(path, e))?;
            out.extend(
                buf.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Ok(())
    }
}
