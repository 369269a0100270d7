//! Where batches come from, and a resumable shuffled sampler.

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::rng::{streams, TrainRng};

/// A resumable source of batches for one rank.
///
/// `state` must capture everything that decides the following batches (cursor, epoch, RNG
/// streams), so that `load_state(state())` in a fresh process yields exactly the batches the
/// original would have yielded next. The trainer saves it in every checkpoint.
pub trait BatchSource {
    type Batch;
    /// The next micro-batch of this rank.
    fn next_batch(&mut self) -> Result<Self::Batch>;
    /// The resumable state (cursor, epoch, RNG).
    fn state(&self) -> serde_json::Value;
    /// Restores a state returned by [`BatchSource::state`].
    fn load_state(&mut self, state: &serde_json::Value) -> Result<()>;
}

/// Resumable state of an [`EpochSampler`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerState {
    pub seed: u64,
    pub epoch: u64,
    /// Position in the epoch's global order, in samples (a multiple of the global batch).
    pub position: u64,
    pub len: u64,
}

/// Shuffled indices over `len` samples, epoch by epoch, split across ranks (like
/// `DistributedSampler` with `drop_last=True`): each epoch is a permutation drawn from the
/// data-order stream `(seed, DATA + epoch)`; a step takes the next `batch_size · world_size`
/// indices of it and rank `r` gets the `r`-th slice. The state is (epoch, position in samples),
/// so resuming continues inside an epoch, also with a different world size.
#[derive(Clone, Debug)]
pub struct EpochSampler {
    len: usize,
    batch_size: usize,
    rank: usize,
    world_size: usize,
    shuffle: bool,
    seed: u64,
    epoch: u64,
    position: usize,
    order: Vec<usize>,
}

impl EpochSampler {
    pub fn new(len: usize, batch_size: usize, seed: u64, shuffle: bool) -> Self {
        let mut s = Self {
            len,
            batch_size,
            rank: 0,
            world_size: 1,
            shuffle,
            seed,
            epoch: 0,
            position: 0,
            order: Vec::new(),
        };
        s.order = s.order_of(0);
        s
    }

    /// Selects this rank's slice of every global batch.
    pub fn with_rank(mut self, rank: usize, world_size: usize) -> Self {
        assert!(
            world_size > 0 && rank < world_size,
            "rank {rank} of {world_size}"
        );
        self.rank = rank;
        self.world_size = world_size;
        self
    }

    fn order_of(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            let mut rng = TrainRng::new(self.seed, streams::DATA + epoch);
            order.shuffle(&mut rng);
        }
        order
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Indices of the next micro-batch of this rank.
    pub fn next_indices(&mut self) -> Result<Vec<usize>> {
        let global = self.batch_size * self.world_size;
        if global == 0 || global > self.len {
            return Err(TrainError::data(format!(
                "global batch {global} (batch {} × {} ranks) does not fit in {} samples",
                self.batch_size, self.world_size, self.len
            )));
        }
        if self.position + global > self.len {
            self.epoch += 1;
            self.position = 0;
            self.order = self.order_of(self.epoch);
        }
        let start = self.position + self.rank * self.batch_size;
        let out = self.order[start..start + self.batch_size].to_vec();
        self.position += global;
        Ok(out)
    }

    pub fn state(&self) -> SamplerState {
        SamplerState {
            seed: self.seed,
            epoch: self.epoch,
            position: self.position as u64,
            len: self.len as u64,
        }
    }

    pub fn load_state(&mut self, state: &SamplerState) -> Result<()> {
        if state.len != self.len as u64 {
            return Err(TrainError::data(format!(
                "sampler state is for {} samples, the dataset has {}",
                state.len, self.len
            )));
        }
        self.seed = state.seed;
        self.epoch = state.epoch;
        self.position = state.position as usize;
        self.order = self.order_of(self.epoch);
        Ok(())
    }
}

/// A [`BatchSource`] over an [`EpochSampler`] whose batch builder also receives each sample's
/// *global key*: its position in the run's stream of samples, `epoch · len + position in the epoch's
/// order`. The key of a sample does not depend on how the global batch is split (1 rank × 2B,
/// 2 ranks × B, or gradient accumulation), so randomness derived from it (e.g. a per-sample stream
/// `TrainRng::new(seed, base + key)`) makes runs with different world sizes draw the same numbers.
pub struct KeyedSource<F> {
    pub sampler: EpochSampler,
    batch_size: usize,
    rank: usize,
    world_size: usize,
    make: F,
}

impl<F, T> KeyedSource<F>
where
    F: FnMut(&[usize], &[u64]) -> Result<T>,
{
    /// `sampler` must be for one rank of one; use [`KeyedSource::with_rank`] to split.
    pub fn new(sampler: EpochSampler, batch_size: usize, make: F) -> Self {
        Self {
            sampler,
            batch_size,
            rank: 0,
            world_size: 1,
            make,
        }
    }

    /// This rank's slice of every global batch ([`EpochSampler::with_rank`]).
    pub fn with_rank(mut self, rank: usize, world_size: usize) -> Self {
        self.sampler = self.sampler.with_rank(rank, world_size);
        self.rank = rank;
        self.world_size = world_size;
        self
    }
}

impl<F, T> crate::fit::RankSlice for KeyedSource<F>
where
    F: FnMut(&[usize], &[u64]) -> Result<T>,
{
    fn rank_slice(self, rank: usize, world_size: usize) -> Result<Self> {
        Ok(self.with_rank(rank, world_size))
    }
}

impl<F, T> BatchSource for KeyedSource<F>
where
    F: FnMut(&[usize], &[u64]) -> Result<T>,
{
    type Batch = T;

    fn next_batch(&mut self) -> Result<T> {
        let idx = self.sampler.next_indices()?;
        // After the call, `position` is the end of the global batch this slice belongs to.
        let s = self.sampler.state();
        let global = (self.batch_size * self.world_size) as u64;
        let start = s.epoch * s.len + s.position - global + (self.rank * self.batch_size) as u64;
        let keys: Vec<u64> = (0..idx.len() as u64).map(|j| start + j).collect();
        (self.make)(&idx, &keys)
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(self.sampler.state()).expect("sampler state serialises")
    }

    fn load_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let s: SamplerState = serde_json::from_value(state.clone())
            .map_err(|e| TrainError::data(format!("bad sampler state: {e}")))?;
        self.sampler.load_state(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_permutations_and_resume_continues() {
        let mut a = EpochSampler::new(10, 3, 7, true);
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.extend(a.next_indices().unwrap());
        }
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 9, "one epoch without repeats");
        let state = a.state();
        let next: Vec<Vec<usize>> = (0..5).map(|_| a.next_indices().unwrap()).collect();
        assert_eq!(a.epoch(), 2);
        let mut b = EpochSampler::new(10, 3, 7, true);
        b.load_state(&state).unwrap();
        let again: Vec<Vec<usize>> = (0..5).map(|_| b.next_indices().unwrap()).collect();
        assert_eq!(next, again);
    }

    #[test]
    fn ranks_split_the_global_batch() {
        let mut r0 = EpochSampler::new(16, 2, 1, true).with_rank(0, 2);
        let mut r1 = EpochSampler::new(16, 2, 1, true).with_rank(1, 2);
        let mut single = EpochSampler::new(16, 4, 1, true);
        for _ in 0..6 {
            let mut both = r0.next_indices().unwrap();
            both.extend(r1.next_indices().unwrap());
            assert_eq!(both, single.next_indices().unwrap());
        }
    }

    #[test]
    fn keyed_source_keys_do_not_depend_on_the_split() {
        let keys = |rank: usize, world: usize, batch: usize, steps: usize| {
            let s = EpochSampler::new(10, batch, 3, true);
            let mut src = KeyedSource::new(s, batch, |idx: &[usize], k: &[u64]| {
                Ok(idx
                    .iter()
                    .copied()
                    .zip(k.iter().copied())
                    .collect::<Vec<_>>())
            })
            .with_rank(rank, world);
            (0..steps)
                .map(|_| src.next_batch().unwrap())
                .collect::<Vec<_>>()
        };
        let single = keys(0, 1, 4, 5);
        let (r0, r1) = (keys(0, 2, 2, 5), keys(1, 2, 2, 5));
        for i in 0..5 {
            let mut both = r0[i].clone();
            both.extend(r1[i].clone());
            assert_eq!(both, single[i]);
        }
        // Epochs of 10 samples with a global batch of 4: 8 per epoch, keys jump to 10, 20, ...
        let k: Vec<u64> = single.iter().flatten().map(|p| p.1).collect();
        assert_eq!(&k[..12], &[0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13]);
    }
}
