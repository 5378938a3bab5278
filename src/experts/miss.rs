//! Miss modes: what a token runs when an expert its router selected is not resident.
//!
//! The access driver ([`crate::experts::cache::CacheCore::step`]) decides a [`MissAction`] for
//! every demand miss of a step, so the live engine and the simulator count the same
//! substitutions, drops, low-bit reads and host computations on the same routing. Whatever the
//! mode, a missed expert still enters the cache (the engine loads it in the background once the
//! token's experts ran, as a background loader would): hits and evictions are the policy's alone
//! and the same for every mode; only what a miss costs the token, and its exactness, differ.
//!
//! | mode | the token runs | source |
//! |---|---|---|
//! | `load` | the expert, after loading it (exact) | — |
//! | `skip` | without it; the kept weights renormalised to the routed total | flash-moe's skip fallback; AdapMoE's adaptive gating |
//! | `substitute` | the resident expert of the same layer (not selected by this token) most often co-selected with the missed one so far in the run, with the missed one's weight; `skip` when none is resident | cache-aware routing (Skliar et al., 2024) |
//! | `low-bit` | a lower-precision copy read from a second checkpoint (e.g. MLX 2-bit), counted at its own size | HOBBIT (Tang et al., 2024) |
//! | `cpu-compute` | the expert computed on the host from host memory, its output copied to the GPU (CUDA only; exact) | Fiddler (Kamahori et al., 2024), llama.cpp `--n-cpu-moe` |

use std::collections::HashMap;

use serde::Serialize;

named_enum! {
    /// What to do when a selected expert is not resident.
    pub enum MissMode {
        /// Load it and run it (exact).
        #[default]
        Load = "load",
        /// Run the token without it, renormalising the remaining weights.
        Skip = "skip",
        /// Run the most co-selected resident expert of the layer in its place.
        Substitute = "substitute",
        /// Run a lower-precision copy from a second checkpoint (`low_bit`).
        LowBit = "low-bit",
        /// Compute it on the host from host memory (CUDA backend only).
        CpuCompute = "cpu-compute",
    }
}

impl MissMode {
    /// Why this mode cannot run on a CPU-only backend or without a second checkpoint, if it
    /// cannot (the one wording the experiment loader and the engine both give).
    pub fn refusal(self, on_cpu: bool, has_low_bit: bool) -> Option<&'static str> {
        match self {
            MissMode::CpuCompute if on_cpu => Some(
                "`cpu-compute` computes missed experts on the host instead of copying them to \
                 the GPU: it needs a GPU backend (model.backend = \"cuda\" / --device cuda); on \
                 the CPU every expert runs on the host already",
            ),
            MissMode::LowBit if !has_low_bit => Some(
                "`low-bit` reads a second, lower-precision checkpoint of the same model (e.g. an \
                 MLX 2-bit copy): give its directory as low_bit in [cache] (or --low-bit DIR)",
            ),
            _ => None,
        }
    }
}

/// What the token runs for one missed expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissAction {
    /// Wait for the expert's load.
    Load,
    /// Run without it.
    Drop,
    /// Run this resident expert of the same layer instead.
    Substitute(u32),
    /// Run its low-precision copy.
    LowBit,
    /// Compute it on the host.
    Host,
}

/// Counters of the miss actions (recorded like the cache's other counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MissStats {
    /// Misses served by a substitute expert.
    pub substituted: u64,
    /// Misses the token ran without (`skip`, or `substitute` with nothing resident).
    pub dropped: u64,
    /// Misses served by a low-precision copy.
    pub low_bit: u64,
    /// Misses computed on the host.
    pub host: u64,
}

/// Per layer, how often each pair of experts was selected for the same token.
#[derive(Debug, Clone, Default)]
pub struct CoActivation {
    pairs: HashMap<(u32, u32, u32), u32>,
}

impl CoActivation {
    /// Counts every pair of `experts` (one token's selection at `layer`).
    pub fn record(&mut self, layer: u32, experts: &[u32]) {
        for (i, &a) in experts.iter().enumerate() {
            for &b in &experts[i + 1..] {
                let (x, y) = if a < b { (a, b) } else { (b, a) };
                *self.pairs.entry((layer, x, y)).or_insert(0) += 1;
            }
        }
    }

    /// Times `a` and `b` were selected together at `layer`.
    pub fn count(&self, layer: u32, a: u32, b: u32) -> u32 {
        let (x, y) = if a < b { (a, b) } else { (b, a) };
        self.pairs.get(&(layer, x, y)).copied().unwrap_or(0)
    }

    /// The candidate most often selected with `missed` (ties, zero counts included, to the
    /// lowest id); `None` when there are no candidates.
    pub fn best(&self, layer: u32, missed: u32, candidates: &[u32]) -> Option<u32> {
        candidates
            .iter()
            .map(|&c| (self.count(layer, missed, c), c))
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
            .map(|(_, c)| c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_co_selected_candidate_substitutes() {
        let mut c = CoActivation::default();
        c.record(3, &[1, 2, 5]);
        c.record(3, &[5, 1, 7]);
        c.record(4, &[1, 9]);
        assert_eq!(c.count(3, 1, 5), 2);
        assert_eq!(c.count(3, 5, 1), 2);
        assert_eq!(c.count(4, 1, 5), 0);
        assert_eq!(c.best(3, 1, &[2, 5, 7]), Some(5));
        // Ties (2 and 7 once each with 1) go to the lowest id; all-zero too.
        assert_eq!(c.best(3, 1, &[7, 2]), Some(2));
        assert_eq!(c.best(3, 8, &[9, 4]), Some(4));
        assert_eq!(c.best(3, 1, &[]), None);
        assert!(MissMode::CpuCompute
            .refusal(true, true)
            .unwrap()
            .contains("cuda"));
        assert!(MissMode::CpuCompute.refusal(false, false).is_none());
        assert!(MissMode::LowBit
            .refusal(false, false)
            .unwrap()
            .contains("low_bit"));
        assert!(MissMode::LowBit.refusal(true, true).is_none());
    }
}
