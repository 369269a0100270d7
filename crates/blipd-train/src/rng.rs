//! Checkpointable random number streams.
//!
//! Every random draw of a run comes from a [`TrainRng`] (ChaCha8, a counter-based generator),
//! whose complete state is (seed, stream, word position). That state is saved in checkpoints
//! as [`RngState`], so a resumed run draws exactly the numbers the uninterrupted run would have.

use rand::RngCore;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Stream ids that keep the run's random streams independent for one seed.
pub mod streams {
    /// Stage randomness (noise, timesteps, dropout masks...), one per rank: `STAGE + rank`.
    pub const STAGE: u64 = 0x5354_0000_0000;
    /// Data order: `DATA + epoch`.
    pub const DATA: u64 = 0x4441_0000_0000;
    /// Sampling during training: `SAMPLE + step` (independent of the training stream).
    pub const SAMPLE: u64 = 0x5341_0000_0000;
}

/// A seedable, serialisable random generator (ChaCha8). Implements [`rand::RngCore`], so all
/// of `rand::Rng` (and `rand_distr`) works on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainRng {
    inner: ChaCha8Rng,
}

impl TrainRng {
    /// The generator for `seed` on stream `stream`.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut inner = ChaCha8Rng::seed_from_u64(seed);
        inner.set_stream(stream);
        Self { inner }
    }

    /// The complete state of the generator.
    pub fn state(&self) -> RngState {
        let seed = self.inner.get_seed();
        RngState {
            seed: seed.iter().map(|b| format!("{b:02x}")).collect(),
            stream: self.inner.get_stream(),
            word_pos: self.inner.get_word_pos().to_string(),
        }
    }

    /// Rebuilds a generator from [`TrainRng::state`].
    pub fn from_state(state: &RngState) -> Result<Self, String> {
        if state.seed.len() != 64 {
            return Err(format!(
                "rng seed must be 64 hex digits, got {}",
                state.seed.len()
            ));
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&state.seed[2 * i..2 * i + 2], 16)
                .map_err(|e| format!("rng seed `{}`: {e}", state.seed))?;
        }
        let word_pos: u128 = state
            .word_pos
            .parse()
            .map_err(|e| format!("rng word_pos `{}`: {e}", state.word_pos))?;
        let mut inner = ChaCha8Rng::from_seed(seed);
        inner.set_stream(state.stream);
        inner.set_word_pos(word_pos);
        Ok(Self { inner })
    }
}

impl RngCore for TrainRng {
    fn next_u32(&mut self) -> u32 {
        self.inner.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        self.inner.fill_bytes(dst)
    }
}

/// Serialised [`TrainRng`] state: 32-byte key as hex, stream, and 128-bit word position as a
/// decimal string (JSON numbers cannot hold 128 bits).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngState {
    pub seed: String,
    pub stream: u64,
    pub word_pos: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn state_round_trip_continues_the_stream() {
        let mut a = TrainRng::new(42, streams::STAGE + 3);
        for _ in 0..37 {
            a.next_u32();
        }
        let state = a.state();
        let json = serde_json::to_string(&state).unwrap();
        let mut b = TrainRng::from_state(&serde_json::from_str(&json).unwrap()).unwrap();
        let xs: Vec<u64> = (0..100).map(|_| a.random()).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.random()).collect();
        assert_eq!(xs, ys);
    }

    #[test]
    fn streams_differ() {
        let mut a = TrainRng::new(1, 0);
        let mut b = TrainRng::new(1, 1);
        assert_ne!(a.next_u64(), b.next_u64());
    }
}
