//! The conversation's random stream: ChaCha20 keyed by a seed, positioned by a word counter.
//!
//! Only `RngState` leaves this file. It is two plain numbers, so a snapshot can store it and a
//! restored conversation draws exactly the numbers the uninterrupted one would have drawn.

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

/// Where a conversation's random stream stands: everything needed to continue it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    pub seed: u64,
    /// ChaCha20 position in 32-bit words since the seed.
    pub word_pos: u128,
}

impl RngState {
    pub fn from_seed(seed: u64) -> Self {
        Self { seed, word_pos: 0 }
    }

    /// A fresh stream for a conversation that asked for no seed.
    pub fn from_entropy() -> Self {
        let bytes = uuid::Uuid::new_v4().into_bytes();
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&bytes[..8]);
        Self::from_seed(u64::from_le_bytes(seed))
    }
}

/// A live generator, rebuilt from and folded back into an `RngState` around each draw.
pub(super) struct StreamRng {
    seed: u64,
    rng: ChaCha20Rng,
}

impl StreamRng {
    pub(super) fn resume(state: &RngState) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(state.seed);
        rng.set_word_pos(state.word_pos);
        Self {
            seed: state.seed,
            rng,
        }
    }

    pub(super) fn state(&self) -> RngState {
        RngState {
            seed: self.seed,
            word_pos: self.rng.get_word_pos(),
        }
    }

    /// A uniform number in [0, 1) with 53 bits of precision.
    pub(super) fn next_unit(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}
