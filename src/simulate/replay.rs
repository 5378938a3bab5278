//! One (policy, budget) replay fed block by block: the cache, its position in the trace, and
//! the per-prompt restarts. The in-memory replay and the streaming one both drive it, so they
//! cannot differ.

use std::collections::HashSet;

use super::future::{demand_at, prefetch_at, BlockFuture, ProfileCounter};
use super::{merge_results, SimError, SimResult, Simulation};
use crate::experts::cache::{CacheCore, CacheOptions, Step, StepOutcome};
use crate::experts::ExpertKey;
use crate::trace::{RowBlock, RowRef};

/// The row after a block (the first row of the next block), with its prefetch next-uses.
pub(crate) type NextRow<'a> = Option<(RowRef<'a>, &'a [u64])>;

/// A replay in progress.
pub(crate) struct Replayer<'s> {
    sim: &'s Simulation,
    cache: CacheCore,
    /// Finished prompts' results (per-prompt replays only).
    parts: Vec<SimResult>,
    prompts: HashSet<u32>,
    prompt: Option<u32>,
    /// Demand accesses replayed so far (the forward position of the next one).
    pos: u64,
    next_layer: Vec<u32>,
    out: StepOutcome,
}

impl<'s> Replayer<'s> {
    /// A fresh replay of `sim`; `profiles` gives oracle profiles when the policy needs one and
    /// the simulation has none.
    pub(crate) fn new(
        sim: &'s Simulation,
        profiles: Option<&ProfileCounter>,
    ) -> Result<Self, SimError> {
        let cache = Self::fresh_cache(sim, profiles, 0)?;
        let moe_layers = cache.moe_layers();
        let mut next_layer = vec![u32::MAX; moe_layers.iter().max().map_or(0, |&m| m as usize + 1)];
        for w in moe_layers.windows(2) {
            next_layer[w[0] as usize] = w[1];
        }
        Ok(Replayer {
            sim,
            cache,
            parts: Vec::new(),
            prompts: HashSet::new(),
            prompt: None,
            pos: 0,
            next_layer,
            out: StepOutcome::default(),
        })
    }

    fn fresh_cache(
        sim: &Simulation,
        profiles: Option<&ProfileCounter>,
        prompt: u32,
    ) -> Result<CacheCore, SimError> {
        let profile = match (&sim.profile, sim.policy.needs_profile()) {
            (Some(p), _) => Some(p.clone()),
            (None, true) => profiles.map(|c| c.profile(prompt)),
            (None, false) => None,
        };
        let options = CacheOptions {
            classic: sim.classic,
            profile,
            working_set: match sim.working_set {
                0 => profiles.map_or(0, ProfileCounter::widest_row),
                n => n,
            },
            miss: sim.miss,
            unit_bytes: sim.unit_bytes,
        };
        Ok(CacheCore::with_options(
            &sim.policy,
            sim.budget,
            &sim.moe_layers,
            options,
        )?)
    }

    /// Replays the rows of `b` (with their next-uses when the policy needs the future); `next`
    /// is the row that follows the block in the trace.
    pub(crate) fn feed(
        &mut self,
        b: &RowBlock,
        future: Option<&BlockFuture>,
        next: NextRow<'_>,
        profiles: Option<&ProfileCounter>,
        expert_size: &dyn Fn(ExpertKey) -> u64,
    ) -> Result<(), SimError> {
        let needs_future = self.cache.spec().needs_future();
        for r in 0..b.len() {
            let row = b.row(r);
            if self.sim.reset_per_prompt && self.prompt != Some(row.prompt) {
                if !self.prompts.insert(row.prompt) {
                    return Err(SimError::Prompts {
                        row: b.row_index[r],
                        prompt: row.prompt,
                    });
                }
                if self.prompt.is_some() {
                    let fresh = Self::fresh_cache(self.sim, profiles, row.prompt)?;
                    let done = std::mem::replace(&mut self.cache, fresh);
                    self.parts.push(SimResult::from_cache(&done));
                } else if profiles.is_some() && self.sim.policy.needs_profile() {
                    self.cache = Self::fresh_cache(self.sim, profiles, row.prompt)?;
                }
                self.prompt = Some(row.prompt);
            }
            // The prediction made for the next row while this one ran: the next MoE layer of
            // the same token.
            let (following, following_uses) = if r + 1 < b.len() {
                let la = &b.lookahead;
                let uses = future.map_or(&[][..], |f| {
                    &f.prefetch[la.offsets[r + 1]..la.offsets[r + 2]]
                });
                (Some(b.row(r + 1)), uses)
            } else {
                match next {
                    Some((n, u)) => (Some(n), u),
                    None => (None, &[][..]),
                }
            };
            let prediction = following.and_then(|next| {
                let same_token = next.prompt == row.prompt
                    && next.step == row.step
                    && next.pos == row.pos
                    && next.phase == row.phase
                    && self.next_layer.get(row.layer as usize) == Some(&next.layer);
                same_token
                    .then_some(next.lookahead)
                    .flatten()
                    .map(|p| (next.layer, p))
            });
            let step = Step {
                layer: row.layer,
                phase: row.phase,
                experts: row.experts,
                prediction,
                weights: row.weights,
                request: row.prompt,
            };
            self.cache
                .set_recording(row.prompt >= self.sim.warmup_prompts);
            let first = b.experts.offsets[r];
            let mut k = 0usize;
            let pos = self.pos;
            let after = pos + row.experts.len() as u64;
            let demand = future.map(|f| &f.demand[first..first + row.experts.len()]);
            self.cache
                .step(
                    &step,
                    expert_size,
                    |key, prefetch| {
                        if !needs_future {
                            return u64::MAX;
                        }
                        let Some(demand) = demand else {
                            return u64::MAX;
                        };
                        if prefetch {
                            let Some((_, predicted)) = prediction else {
                                return u64::MAX;
                            };
                            predicted
                                .iter()
                                .position(|&e| e == key.expert)
                                .and_then(|j| following_uses.get(j))
                                .map_or(u64::MAX, |&u| prefetch_at(after, u))
                        } else {
                            let n = demand
                                .get(k)
                                .map_or(u64::MAX, |&d| demand_at(pos + k as u64, d));
                            k += 1;
                            n
                        }
                    },
                    &mut self.out,
                )
                .map_err(|source| SimError::Row {
                    row: b.row_index[r],
                    prompt: row.prompt,
                    step: row.step,
                    pos: row.pos,
                    layer: row.layer,
                    source,
                })?;
            self.pos = after;
        }
        self.cache.set_recording(true);
        Ok(())
    }

    /// The result of everything fed.
    pub(crate) fn finish(mut self) -> SimResult {
        if self.parts.is_empty() {
            return SimResult::from_cache(&self.cache);
        }
        self.parts.push(SimResult::from_cache(&self.cache));
        merge_results(&self.parts)
    }
}
