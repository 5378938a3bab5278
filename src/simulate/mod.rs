//! Trace replay: the simulator core, independent of any file format.
//!
//! This module exists to answer "what hit rate would policy P get with budget B on this routing
//! trace?" in milliseconds instead of re-running the model. It replays [`TraceRow`]s through the
//! very [`CacheCore`] the engine uses, in the engine's order, so a replay of an engine trace gives
//! the engine's hit counts.
//!
//! # Replay order (must equal the engine's)
//! For each row, in trace order (= engine execution order):
//! 1. `begin_step(row.layer, row.phase, &row.experts)` (pins the row's experts);
//! 2. one demand access per expert of `row.experts`, in listed order;
//! 3. if the policy prefetches ([`PolicySpec::prefetch`]) and the *next* row is the next MoE
//!    layer of the same token (same prompt, step and pos, decode phase), prefetch the next row's
//!    `lookahead` experts, in listed order: the engine predicts layer l+1's experts while layer l
//!    runs;
//! 4. `end_step()`.
//!
//! # Belady's next-use positions
//! Demand accesses are numbered 0, 1, 2, … in replay order over the whole trace; an access
//! carries the number of the next demand of the same expert (`u64::MAX`: none). One global
//! numbering is right for every budget: a pool only ever compares entries of its own, and the
//! global order restricted to one layer is that layer's own order, so per-layer pools see the
//! same ordering as with a per-layer numbering, and a global pool needs the global one. A
//! prefetch carries the first demand of its expert at or after the next row.

use serde::Serialize;

use crate::experts::budget::Budget;
use crate::experts::cache::{ratio, CacheCore, CacheError, CacheStats};
use crate::experts::miss::{MissMode, MissStats};
use crate::experts::policies::{FrequencyProfile, PolicySpec};
use crate::experts::ExpertKey;
use crate::trace::{RowBlock, TraceRow};

pub mod export;
mod future;
mod replay;
mod stream;

pub use future::{demand_at, prefetch_at, Backward, BlockFuture, ProfileCounter};
pub use stream::{is_aggregate, study, StudyStats, TraceStudy};

/// One replay: a policy at a budget over a trace, and how the trace is to be read.
#[derive(Debug, Clone)]
pub struct Simulation {
    /// The policy.
    pub policy: PolicySpec,
    /// The budget.
    pub budget: Budget,
    /// The MoE layers, in execution order (prefetches go to the layer after a row's).
    pub moe_layers: Vec<u32>,
    /// Classic (libCacheSim) mode: no step pins, every access its own step.
    pub classic: bool,
    /// Frequency profile for `static-<N>`; when absent it is counted from the replayed rows
    /// themselves (an oracle profile).
    pub profile: Option<FrequencyProfile>,
    /// Rows of prompts below this index are replayed (they fill the cache) but not counted, as
    /// the runner's warm-up prompts are.
    pub warmup_prompts: u32,
    /// Empty the cache at every new prompt (runs with `carry_over = false`).
    pub reset_per_prompt: bool,
    /// Experts a step demands (the router's top-k): the least `adaptive-split` leaves a layer;
    /// 0 = the largest row of the trace.
    pub working_set: usize,
    /// What a miss runs: counted in [`SimResult::miss`] exactly as the engine counts it.
    pub miss: MissMode,
    /// Bytes of one expert, the unit `adaptive-split` divides byte budgets in (0: the size of
    /// expert 0 of the first MoE layer).
    pub unit_bytes: u64,
}

impl Simulation {
    /// A pinned-mode replay of `policy` at `budget` over `moe_layers`, counting every row.
    pub fn new(policy: PolicySpec, budget: Budget, moe_layers: &[u32]) -> Self {
        Simulation {
            policy,
            budget,
            moe_layers: moe_layers.to_vec(),
            classic: false,
            profile: None,
            warmup_prompts: 0,
            reset_per_prompt: false,
            working_set: 0,
            miss: MissMode::Load,
            unit_bytes: 0,
        }
    }
}

/// Errors of a replay.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    /// The cache could not be built.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A per-prompt replay met a prompt whose rows are split by another prompt's.
    #[error("trace row {row}: rows of prompt {prompt} appear again after another prompt's; a replay that empties the cache per prompt needs each prompt's rows together")]
    Prompts {
        /// Row index in the trace.
        row: usize,
        /// The prompt.
        prompt: u32,
    },
    /// A row failed (e.g. its experts do not fit the budget).
    #[error("trace row {row} (prompt {prompt}, step {step}, pos {pos}, layer {layer}): {source}")]
    Row {
        /// Row index in the trace.
        row: usize,
        /// Its prompt.
        prompt: u32,
        /// Its step.
        step: u32,
        /// Its token position.
        pos: u32,
        /// Its layer.
        layer: u32,
        /// What went wrong.
        #[source]
        source: CacheError,
    },
}

impl From<SimError> for crate::error::Error {
    fn from(e: SimError) -> Self {
        crate::error::Error::Stage(Box::new(e))
    }
}

/// Accesses and hits of one phase.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PhaseResult {
    /// Demand accesses.
    pub accesses: u64,
    /// Hits.
    pub hits: u64,
    /// hits / accesses.
    pub hit_rate: f64,
}

/// Accesses and hits of one MoE layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LayerResult {
    /// Decoder layer index.
    pub layer: u32,
    /// Demand accesses.
    pub accesses: u64,
    /// Hits.
    pub hits: u64,
    /// hits / accesses.
    pub hit_rate: f64,
}

/// Prefetch outcome of a replay.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PrefetchResult {
    /// Prefetches that loaded an expert.
    pub issued: u64,
    /// Of which demanded while still resident.
    pub used: u64,
    /// Of which evicted unused.
    pub wasted: u64,
    /// Bytes of the wasted ones.
    pub wasted_bytes: u64,
    /// Bytes loaded by prefetches.
    pub bytes: u64,
    /// Prefetches dropped for lack of evictable room.
    pub dropped: u64,
    /// Prefetches skipped because the expert was resident.
    pub already_resident: u64,
    /// used / issued (`null` if none issued).
    pub precision: Option<f64>,
    /// used / (used + demand misses) (`null` if nothing was loaded).
    pub recall: Option<f64>,
}

/// Outcome of one replay (one policy, one budget).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimResult {
    /// Canonical policy name.
    pub policy: String,
    /// Budget in its string form.
    pub budget: String,
    /// Slots per layer, for a slot budget.
    pub capacity: Option<usize>,
    /// Bytes (per layer or global), for a byte budget.
    pub budget_bytes: Option<u64>,
    /// True if replayed in classic (unpinned) mode.
    pub classic: bool,
    /// Demand accesses.
    pub accesses: u64,
    /// Demand hits.
    pub hits: u64,
    /// Demand misses.
    pub misses: u64,
    /// hits / accesses.
    pub hit_rate: f64,
    /// Prefill rows only.
    pub prefill: PhaseResult,
    /// Decode rows only.
    pub decode: PhaseResult,
    /// Per MoE layer.
    pub per_layer: Vec<LayerResult>,
    /// Evictions.
    pub evictions: u64,
    /// Bytes loaded by demand misses.
    pub bytes_loaded: u64,
    /// Peak resident bytes.
    pub peak_resident_bytes: u64,
    /// Prefetch counters.
    pub prefetch: PrefetchResult,
    /// The miss mode replayed.
    pub miss_mode: String,
    /// What the misses ran (substitutions, drops, low-bit copies, host computations).
    pub miss: MissStats,
}

impl SimResult {
    /// The result of whatever ran through `cache` (a replay or the live engine).
    pub fn from_cache(cache: &CacheCore) -> SimResult {
        let s: &CacheStats = cache.stats();
        let phase = |p: crate::experts::cache::PhaseStats| PhaseResult {
            accesses: p.accesses,
            hits: p.hits,
            hit_rate: ratio(p.hits, p.accesses),
        };
        SimResult {
            policy: cache.spec().to_string(),
            budget: cache.budget().to_string(),
            capacity: cache.budget().slots(),
            budget_bytes: cache.budget().bytes(),
            classic: cache.is_classic(),
            miss_mode: cache.miss_mode().to_string(),
            miss: s.miss,
            accesses: s.accesses,
            hits: s.hits,
            misses: s.misses,
            hit_rate: s.hit_rate(),
            prefill: phase(s.prefill),
            decode: phase(s.decode),
            per_layer: s
                .per_layer
                .iter()
                .map(|l| LayerResult {
                    layer: l.layer,
                    accesses: l.accesses,
                    hits: l.hits,
                    hit_rate: ratio(l.hits, l.accesses),
                })
                .collect(),
            evictions: s.evictions,
            bytes_loaded: s.bytes_loaded,
            peak_resident_bytes: s.peak_resident_bytes,
            prefetch: PrefetchResult {
                issued: s.prefetch.issued,
                used: s.prefetch.used,
                wasted: s.prefetch.wasted,
                wasted_bytes: s.prefetch.wasted_bytes,
                bytes: s.prefetch.bytes,
                dropped: s.prefetch.dropped,
                already_resident: s.prefetch.already_resident,
                precision: s.prefetch_precision(),
                recall: s.prefetch_recall(),
            },
        }
    }
}

/// Replays `rows` (one cell's trace, in execution order) as `sim` says, with `expert_size`
/// giving each expert's checkpoint bytes. The in-memory entry point of the simulator; a trace
/// file is replayed by [`study`] block by block through the same [`replay::Replayer`].
pub fn simulate(
    rows: &[TraceRow],
    sim: &Simulation,
    expert_size: impl Fn(ExpertKey) -> u64,
) -> Result<SimResult, SimError> {
    let block = RowBlock::from_rows(rows);
    let future = sim
        .policy
        .needs_future()
        .then(|| Backward::new(sim.reset_per_prompt).block(&block));
    let profiles = (sim.profile.is_none() && sim.policy.needs_profile()).then(|| {
        let mut c = ProfileCounter::new(sim.reset_per_prompt);
        c.add(&block);
        c
    });
    let mut sim = sim.clone();
    if sim.unit_bytes == 0 {
        sim.unit_bytes = first_expert_bytes(&sim, &expert_size);
    }
    let sim = &sim;
    let mut r = replay::Replayer::new(sim, profiles.as_ref())?;
    r.feed(
        &block,
        future.as_ref(),
        None,
        profiles.as_ref(),
        &expert_size,
    )?;
    Ok(r.finish())
}

/// Bytes of expert 0 of the first MoE layer (the unit of `adaptive-split` byte budgets).
pub(crate) fn first_expert_bytes(sim: &Simulation, size: &dyn Fn(ExpertKey) -> u64) -> u64 {
    sim.moe_layers
        .first()
        .map_or(0, |&layer| size(ExpertKey { layer, expert: 0 }))
}

/// For every demand access in replay order, the number of the next demand access of the same
/// expert (`u64::MAX` if none): Belady's input.
pub fn demand_next_uses(rows: &[TraceRow]) -> Vec<u64> {
    let f = Backward::new(false).block(&RowBlock::from_rows(rows));
    f.demand
        .iter()
        .enumerate()
        .map(|(i, &d)| demand_at(i as u64, d))
        .collect()
}

/// Counts expert uses in `rows` (the profile `static-<N>` pins from).
pub fn profile_from_rows(rows: &[TraceRow]) -> FrequencyProfile {
    let mut c = ProfileCounter::new(false);
    c.add(&RowBlock::from_rows(rows));
    c.profile(0)
}

/// Sums the results of replays of consecutive parts of one trace (one per prompt when the cache
/// is emptied between prompts) into one result.
pub(crate) fn merge_results(parts: &[SimResult]) -> SimResult {
    let Some(first) = parts.first() else {
        panic!("merge_results needs at least one part");
    };
    let mut out = first.clone();
    for p in &parts[1..] {
        out.accesses += p.accesses;
        out.hits += p.hits;
        out.misses += p.misses;
        out.prefill.accesses += p.prefill.accesses;
        out.prefill.hits += p.prefill.hits;
        out.decode.accesses += p.decode.accesses;
        out.decode.hits += p.decode.hits;
        for l in &p.per_layer {
            match out.per_layer.iter_mut().find(|o| o.layer == l.layer) {
                Some(o) => {
                    o.accesses += l.accesses;
                    o.hits += l.hits;
                }
                None => out.per_layer.push(*l),
            }
        }
        out.evictions += p.evictions;
        out.miss.substituted += p.miss.substituted;
        out.miss.dropped += p.miss.dropped;
        out.miss.low_bit += p.miss.low_bit;
        out.miss.host += p.miss.host;
        out.bytes_loaded += p.bytes_loaded;
        out.peak_resident_bytes = out.peak_resident_bytes.max(p.peak_resident_bytes);
        let (a, b) = (&mut out.prefetch, &p.prefetch);
        a.issued += b.issued;
        a.used += b.used;
        a.wasted += b.wasted;
        a.wasted_bytes += b.wasted_bytes;
        a.bytes += b.bytes;
        a.dropped += b.dropped;
        a.already_resident += b.already_resident;
    }
    out.hit_rate = ratio(out.hits, out.accesses);
    out.prefill.hit_rate = ratio(out.prefill.hits, out.prefill.accesses);
    out.decode.hit_rate = ratio(out.decode.hits, out.decode.accesses);
    for l in &mut out.per_layer {
        l.hit_rate = ratio(l.hits, l.accesses);
    }
    out.per_layer.sort_by_key(|l| l.layer);
    let pf = &mut out.prefetch;
    pf.precision = (pf.issued > 0).then(|| ratio(pf.used, pf.issued));
    pf.recall = (pf.used + out.misses > 0).then(|| ratio(pf.used, pf.used + out.misses));
    out
}

#[cfg(test)]
mod tests;
