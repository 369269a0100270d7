//! Streams pairs from a shard folder into per-rank batches with a resumable cursor.
//!
//! **Order.** The samples are the rows of the shards listed in `manifest.json` (`len` of them). Each epoch
//! has one global order, a pure function of `(seed, epoch)` and the manifest: the row groups ("blocks") are
//! permuted, then the rows inside each run of `window_blocks` consecutive blocks are permuted (a
//! block-windowed shuffle, so a reader holds at most `window_blocks` row groups; `window_blocks` ≥ number
//! of blocks gives a full permutation). With `shuffle = false` the order is the shard order.
//!
//! **Ranks.** Like `blipd_train::EpochSampler` (`DistributedSampler`, `drop_last`): a call
//! [`PairLoader::next_items`]`(n)` consumes the next global batch of `n · world_size` positions of the
//! order, and rank `r` gets positions `[r·n, (r+1)·n)` of it; an epoch ends when fewer than a global batch
//! remain. Every item carries its *global key* `epoch · len + position`, which does not depend on the world
//! size.
//!
//! **Cursor.** [`LoaderState`] is `(seed, epoch, position)` plus what it is valid for (`len`, the manifest
//! fingerprint, the shuffle settings). Since the order does not depend on the world size, a state saved at
//! world size 4 resumes at world size 2 (or 8) exactly where the global stream stopped.

use crate::composite::stable_hash;
use crate::error::{DataError, Result};
use crate::imageio::{decode_image, ReadLimits};
use crate::shards::{Manifest, PairRecord, ShardReader};
use crate::synthetic::SplitMix;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Loader settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoaderOptions {
    pub seed: u64,
    pub shuffle: bool,
    /// Row groups mixed together by the in-window shuffle.
    pub window_blocks: usize,
    pub rank: usize,
    pub world_size: usize,
    /// Decode images (false: items carry only the encoded bytes).
    pub decode: bool,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions {
            seed: 0,
            shuffle: true,
            window_blocks: 16,
            rank: 0,
            world_size: 1,
            decode: true,
        }
    }
}

/// Resumable cursor of a [`PairLoader`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoaderState {
    pub seed: u64,
    pub epoch: u64,
    /// Position in the epoch's global order, in samples (a multiple of the global batch).
    pub position: u64,
    pub len: u64,
    pub fingerprint: String,
    pub shuffle: bool,
    pub window_blocks: usize,
}

/// One pair, decoded.
#[derive(Debug, Clone)]
pub struct PairItem {
    /// `epoch · len + position`: stable across world sizes (seed per-sample randomness from it).
    pub key: u64,
    pub record: PairRecord,
    /// Decoded input (subject on a new background); empty when `decode = false`.
    pub input: image::RgbImage,
    /// Decoded target (original image); empty when `decode = false`.
    pub target: image::RgbImage,
    /// Where the pair is stored: its shard's position in the manifest's `shards` list and its row in
    /// that shard (what a per-shard side file such as a latent cache is indexed by).
    pub location: RowLocation,
}

/// A pair's place in the shard folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowLocation {
    /// Position of the shard in [`Manifest::shards`].
    pub shard: usize,
    /// Row in that shard (0-based, across its row groups).
    pub row: u64,
}

#[derive(Debug, Clone, Copy)]
struct Block {
    shard: usize,
    group: usize,
    rows: u32,
    /// The group's first row in its shard.
    first: u64,
}

/// See the module docs.
pub struct PairLoader {
    dir: PathBuf,
    manifest: Manifest,
    opts: LoaderOptions,
    blocks: Vec<Block>,
    len: u64,
    epoch: u64,
    position: u64,
    order: Vec<(u32, u32)>,
    readers: HashMap<usize, ShardReader>,
    cache: VecDeque<(usize, Arc<Vec<PairRecord>>)>,
    limits: ReadLimits,
}

fn shuffle<T>(v: &mut [T], rng: &mut SplitMix) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i + 1);
        v.swap(i, j);
    }
}

impl PairLoader {
    /// Opens `dir/manifest.json`; only the shards it lists are read.
    pub fn open(dir: &Path, opts: LoaderOptions) -> Result<Self> {
        if opts.world_size == 0 || opts.rank >= opts.world_size {
            return Err(DataError::Config(format!(
                "loader rank {} of world size {}",
                opts.rank, opts.world_size
            )));
        }
        let manifest = Manifest::load(dir)?.ok_or_else(|| {
            DataError::Config(format!(
                "no {} in {}",
                crate::shards::MANIFEST_NAME,
                dir.display()
            ))
        })?;
        let mut blocks = Vec::new();
        let mut shards: Vec<usize> = (0..manifest.shards.len()).collect();
        shards.sort_by_key(|&i| manifest.shards[i].index);
        for s in shards {
            let mut first = 0;
            for (g, &rows) in manifest.shards[s].row_groups.iter().enumerate() {
                if rows > 0 {
                    blocks.push(Block {
                        shard: s,
                        group: g,
                        rows: rows as u32,
                        first,
                    });
                }
                first += rows;
            }
        }
        let len = blocks.iter().map(|b| u64::from(b.rows)).sum();
        let mut l = PairLoader {
            dir: dir.to_path_buf(),
            manifest,
            opts,
            blocks,
            len,
            epoch: 0,
            position: 0,
            order: Vec::new(),
            readers: HashMap::new(),
            cache: VecDeque::new(),
            limits: ReadLimits::default(),
        };
        l.order = l.order_of(0);
        Ok(l)
    }

    /// Samples per epoch.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The global order of `epoch` as (block, row in block).
    fn order_of(&self, epoch: u64) -> Vec<(u32, u32)> {
        let mut blocks: Vec<u32> = (0..self.blocks.len() as u32).collect();
        let mut rng = SplitMix::new(stable_hash(
            &format!("blipd-loader/epoch/{epoch}"),
            self.opts.seed,
        ));
        if self.opts.shuffle {
            shuffle(&mut blocks, &mut rng);
        }
        let window = self.opts.window_blocks.max(1);
        let mut order = Vec::with_capacity(self.len as usize);
        for win in blocks.chunks(window) {
            let start = order.len();
            for &b in win {
                for r in 0..self.blocks[b as usize].rows {
                    order.push((b, r));
                }
            }
            if self.opts.shuffle {
                shuffle(&mut order[start..], &mut rng);
            }
        }
        order
    }

    /// Global order positions (within the current epoch) of this rank's next `n` items, advancing the
    /// cursor; also returns the epoch they belong to.
    fn next_positions(&mut self, n: usize) -> Result<(u64, u64)> {
        let global = (n * self.opts.world_size) as u64;
        if global == 0 || global > self.len {
            return Err(DataError::Config(format!(
                "global batch {global} ({n} × {} ranks) does not fit in {} samples",
                self.opts.world_size, self.len
            )));
        }
        if self.position + global > self.len {
            self.epoch += 1;
            self.position = 0;
            self.order = self.order_of(self.epoch);
        }
        let start = self.position + (self.opts.rank * n) as u64;
        self.position += global;
        Ok((self.epoch, start))
    }

    fn group(&mut self, block: usize) -> Result<Arc<Vec<PairRecord>>> {
        if let Some((_, g)) = self.cache.iter().find(|(b, _)| *b == block) {
            return Ok(g.clone());
        }
        let Block {
            shard, group, rows, ..
        } = self.blocks[block];
        if !self.readers.contains_key(&shard) {
            if self.readers.len() >= 64 {
                self.readers.clear();
            }
            let path = self.dir.join(&self.manifest.shards[shard].file);
            self.readers.insert(shard, ShardReader::open(&path)?);
        }
        let recs = self.readers[&shard].read_group(group)?;
        if recs.len() != rows as usize {
            return Err(DataError::Shard {
                path: self.dir.join(&self.manifest.shards[shard].file),
                reason: format!(
                    "row group {group} has {} rows, the manifest says {rows}",
                    recs.len()
                ),
            });
        }
        let recs = Arc::new(recs);
        if self.cache.len() > self.opts.window_blocks.max(1) {
            self.cache.pop_front();
        }
        self.cache.push_back((block, recs.clone()));
        Ok(recs)
    }

    /// Records (undecoded) of this rank's next `n` items, with their keys.
    pub fn next_records(&mut self, n: usize) -> Result<Vec<(u64, PairRecord)>> {
        Ok(self
            .next_located(n)?
            .into_iter()
            .map(|(k, r, _)| (k, r))
            .collect())
    }

    /// [`Self::next_records`] with each record's place in the shards.
    fn next_located(&mut self, n: usize) -> Result<Vec<(u64, PairRecord, RowLocation)>> {
        let (epoch, start) = self.next_positions(n)?;
        let mut out = Vec::with_capacity(n);
        for p in start..start + n as u64 {
            let (b, r) = self.order[p as usize];
            let g = self.group(b as usize)?;
            let blk = self.blocks[b as usize];
            let loc = RowLocation {
                shard: blk.shard,
                row: blk.first + u64::from(r),
            };
            out.push((epoch * self.len + p, g[r as usize].clone(), loc));
        }
        Ok(out)
    }

    /// This rank's next `n` items, images decoded (in parallel).
    pub fn next_items(&mut self, n: usize) -> Result<Vec<PairItem>> {
        let recs = self.next_located(n)?;
        let decode = self.opts.decode;
        let limits = self.limits;
        recs.into_par_iter()
            .map(|(key, record, location)| {
                let (input, target) = if decode {
                    let d = |bytes: &[u8], what: &str| {
                        decode_image(bytes, &format!("{} {what}", record.image_id), &limits)
                            .map(|i| i.to_rgb8())
                    };
                    (
                        d(&record.input_image, "input")?,
                        d(&record.target_image, "target")?,
                    )
                } else {
                    (image::RgbImage::new(0, 0), image::RgbImage::new(0, 0))
                };
                Ok(PairItem {
                    key,
                    record,
                    input,
                    target,
                    location,
                })
            })
            .collect()
    }

    pub fn state(&self) -> LoaderState {
        LoaderState {
            seed: self.opts.seed,
            epoch: self.epoch,
            position: self.position,
            len: self.len,
            fingerprint: self.manifest.fingerprint.clone(),
            shuffle: self.opts.shuffle,
            window_blocks: self.opts.window_blocks,
        }
    }

    /// Restores a cursor from [`PairLoader::state`] (any world size).
    pub fn load_state(&mut self, state: &LoaderState) -> Result<()> {
        let mismatch = |what: &str, saved: String, now: String| {
            DataError::Config(format!(
                "loader state is for {what} {saved}, this loader has {now}"
            ))
        };
        if state.len != self.len {
            return Err(mismatch("len", state.len.to_string(), self.len.to_string()));
        }
        if state.fingerprint != self.manifest.fingerprint {
            return Err(mismatch(
                "dataset fingerprint",
                state.fingerprint.clone(),
                self.manifest.fingerprint.clone(),
            ));
        }
        if state.shuffle != self.opts.shuffle || state.window_blocks != self.opts.window_blocks {
            return Err(mismatch(
                "shuffle/window_blocks",
                format!("{}/{}", state.shuffle, state.window_blocks),
                format!("{}/{}", self.opts.shuffle, self.opts.window_blocks),
            ));
        }
        if state.position > self.len {
            return Err(mismatch(
                "position",
                state.position.to_string(),
                format!("len {}", self.len),
            ));
        }
        self.opts.seed = state.seed;
        self.epoch = state.epoch;
        self.position = state.position;
        self.order = self.order_of(self.epoch);
        Ok(())
    }

    /// [`PairLoader::state`] as JSON (for `BatchSource::state`).
    pub fn state_json(&self) -> serde_json::Value {
        serde_json::to_value(self.state()).expect("loader state serialises")
    }

    /// [`PairLoader::load_state`] from JSON.
    pub fn load_state_json(&mut self, v: &serde_json::Value) -> Result<()> {
        let s: LoaderState = serde_json::from_value(v.clone())
            .map_err(|e| DataError::Config(format!("bad loader state: {e}")))?;
        self.load_state(&s)
    }
}
