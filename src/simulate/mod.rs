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

use std::path::PathBuf;

use crate::experts::budget::{Budget, Pool};
use crate::experts::cache::{
    ratio, CacheCore, CacheError, CacheOptions, CacheStats, Step, StepOutcome,
};
use crate::experts::policies::{FrequencyProfile, PolicySpec};
use crate::experts::ExpertKey;
use crate::trace::TraceRow;

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
/// giving each expert's checkpoint bytes. The one entry point of the simulator.
pub fn simulate(
    rows: &[TraceRow],
    sim: &Simulation,
    expert_size: impl Fn(ExpertKey) -> u64,
) -> Result<SimResult, SimError> {
    if !sim.reset_per_prompt {
        return replay_fresh(rows, 0, sim, &expert_size);
    }
    // A fresh cache per prompt: each prompt's rows (rows of one prompt are contiguous in a run's
    // trace) replay on their own, with their own next-use numbering, and the counts add up.
    let mut parts = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut start = 0;
    while start < rows.len() {
        let p = rows[start].prompt;
        let end = start + rows[start..].iter().take_while(|r| r.prompt == p).count();
        if !seen.insert(p) {
            return Err(SimError::Prompts {
                row: start,
                prompt: p,
            });
        }
        parts.push(replay_fresh(&rows[start..end], start, sim, &expert_size)?);
        start = end;
    }
    if parts.is_empty() {
        return replay_fresh(rows, 0, sim, &expert_size);
    }
    Ok(merge_results(&parts))
}

/// Replays `rows` (the trace's rows from index `first`) through a fresh cache.
fn replay_fresh(
    rows: &[TraceRow],
    first: usize,
    sim: &Simulation,
    expert_size: &impl Fn(ExpertKey) -> u64,
) -> Result<SimResult, SimError> {
    let profile = match (&sim.profile, sim.policy.needs_profile()) {
        (Some(p), _) => Some(p.clone()),
        (None, true) => Some(profile_from_rows(rows)),
        (None, false) => None,
    };
    let options = CacheOptions {
        classic: sim.classic,
        profile,
    };
    let mut cache = CacheCore::with_options(&sim.policy, sim.budget, &sim.moe_layers, options)?;
    replay(&mut cache, rows, first, expert_size, |r| {
        r.prompt >= sim.warmup_prompts
    })?;
    Ok(SimResult::from_cache(&cache))
}

/// Replays `rows` through `cache` in the engine's order (see the module doc), one
/// [`CacheCore::step`] per row, counting only the rows `measure` accepts (recording is left on).
/// Row numbers in errors start at `first`.
fn replay(
    cache: &mut CacheCore,
    rows: &[TraceRow],
    first: usize,
    expert_size: &impl Fn(ExpertKey) -> u64,
    measure: impl Fn(&TraceRow) -> bool,
) -> Result<(), SimError> {
    let spec = cache.spec().clone();
    let next_uses = if spec.needs_future() {
        demand_next_uses(rows)
    } else {
        Vec::new()
    };
    let positions = (spec.needs_future() && spec.prefetch()).then(|| KeyPositions::new(rows));
    // next_layer[l] = the MoE layer after layer l in execution order (u32::MAX: none).
    let moe_layers = cache.moe_layers();
    let mut next_layer = vec![u32::MAX; moe_layers.iter().max().map_or(0, |&m| m as usize + 1)];
    for w in moe_layers.windows(2) {
        next_layer[w[0] as usize] = w[1];
    }
    let mut pos = 0usize;
    let mut out = StepOutcome::default();
    for (r, row) in rows.iter().enumerate() {
        // The prediction made for the next row while this one ran: the next MoE layer of the
        // same token.
        let prediction = rows.get(r + 1).and_then(|next| {
            let same_token = next.prompt == row.prompt
                && next.step == row.step
                && next.pos == row.pos
                && next.phase == row.phase
                && next_layer.get(row.layer as usize) == Some(&next.layer);
            same_token
                .then_some(next.lookahead.as_deref())
                .flatten()
                .map(|p| (next.layer, p))
        });
        let step = Step {
            layer: row.layer,
            phase: row.phase,
            experts: &row.experts,
            prediction,
        };
        cache.set_recording(measure(row));
        let after = pos + row.experts.len();
        cache
            .step(
                &step,
                expert_size,
                |key, prefetch| {
                    if prefetch {
                        positions
                            .as_ref()
                            .map_or(u64::MAX, |p| p.next_at_or_after(key, after as u64))
                    } else {
                        let n = next_uses.get(pos).copied().unwrap_or(u64::MAX);
                        pos += 1;
                        n
                    }
                },
                &mut out,
            )
            .map_err(|source| SimError::Row {
                row: first + r,
                prompt: row.prompt,
                step: row.step,
                pos: row.pos,
                layer: row.layer,
                source,
            })?;
        pos = after;
    }
    cache.set_recording(true);
    Ok(())
}

/// `harness simulate`: every policy × budget over one cell of a trace file.
#[derive(Debug, Clone)]
pub struct TraceStudy {
    /// The trace file (see [`crate::trace`] for the schema).
    pub trace: PathBuf,
    /// Which cell of a multi-cell run trace (default: the first).
    pub cell: Option<String>,
    /// Policies.
    pub policies: Vec<PolicySpec>,
    /// Expert slots per layer.
    pub capacities: Vec<usize>,
    /// Byte budgets, shared as `pool` says.
    pub budgets: Vec<u64>,
    /// How byte budgets are shared.
    pub pool: Pool,
    /// The checkpoint the trace came from: expert sizes, and layer/expert ids checked against it.
    pub model: Option<PathBuf>,
    /// Size of every expert when no model is given (byte budgets need one of the two).
    pub expert_bytes: Option<u64>,
    /// Prompts below this index are replayed but not counted.
    pub warmup_prompts: u32,
    /// Empty the cache at every new prompt.
    pub reset_per_prompt: bool,
    /// Classic (libCacheSim) mode.
    pub classic: bool,
}

/// Runs a [`TraceStudy`]: one [`SimResult`] per policy × budget, policies outermost.
pub fn study(s: &TraceStudy) -> crate::error::Result<Vec<SimResult>> {
    use crate::error::Error;
    let cells = crate::trace::read(&s.trace)?;
    let rows = &crate::trace::select_cell(&s.trace, &cells, s.cell.as_deref())?.rows;
    if rows.is_empty() {
        return Err(Error::format(&s.trace, "the trace has no rows"));
    }
    let mut layers: Vec<u32> = rows.iter().map(|r| r.layer).collect();
    layers.sort_unstable();
    layers.dedup();
    // Expert sizes and id checks from the model, when given.
    let store = match &s.model {
        Some(dir) => {
            let spec = crate::models::load_spec(dir)?;
            check_rows(&s.trace, rows, &spec, dir)?;
            let open =
                crate::experts::store::OpenCheckpoint::open(dir, &spec, candle_core::Device::Cpu)?;
            Some(open.store)
        }
        None => None,
    };
    let unit = s.expert_bytes.unwrap_or(1);
    let size = |k: ExpertKey| store.as_ref().map_or(unit, |st| st.expert_bytes(k));
    let mut budgets: Vec<Budget> = s
        .capacities
        .iter()
        .map(|&n| Budget::SlotsPerLayer(n))
        .collect();
    if !s.budgets.is_empty() && store.is_none() && s.expert_bytes.is_none() {
        return Err(Error::Input("--budget needs expert sizes: pass --model DIR (the checkpoint the trace came from) or --expert-bytes N".into()));
    }
    budgets.extend(
        s.budgets
            .iter()
            .map(|&b| Budget::from_bytes(b, s.pool, layers.len())),
    );
    if budgets.is_empty() {
        return Err(Error::Input(
            "give --capacity N[,N…] and/or --budget SIZE[,SIZE…]".into(),
        ));
    }
    let mut results = Vec::new();
    for p in &s.policies {
        for &b in &budgets {
            let mut sim = Simulation::new(p.clone(), b, &layers);
            sim.classic = s.classic;
            sim.warmup_prompts = s.warmup_prompts;
            sim.reset_per_prompt = s.reset_per_prompt;
            results.push(simulate(rows, &sim, size)?);
        }
    }
    Ok(results)
}

/// Checks a trace's layers and expert ids against the model it is said to come from.
fn check_rows(
    trace: &std::path::Path,
    rows: &[TraceRow],
    spec: &crate::config::ModelSpec,
    dir: &std::path::Path,
) -> crate::error::Result<()> {
    use crate::error::Error;
    for r in rows {
        if !spec.is_moe_layer(r.layer as usize) {
            return Err(Error::Input(format!(
                "{}: layer {} is not a MoE layer of {} (MoE layers: {:?})",
                trace.display(),
                r.layer,
                dir.display(),
                spec.moe.moe_layers
            )));
        }
        if let Some(e) = r
            .experts
            .iter()
            .chain(r.lookahead.iter().flatten())
            .find(|&&e| e as usize >= spec.moe.num_experts)
        {
            return Err(Error::Input(format!(
                "{}: expert {e} at layer {} is out of range: {} has {} routed experts",
                trace.display(),
                r.layer,
                dir.display(),
                spec.moe.num_experts
            )));
        }
    }
    Ok(())
}

/// For every demand access in replay order, the number of the next demand access of the same
/// expert (`u64::MAX` if none): Belady's input.
pub fn demand_next_uses(rows: &[TraceRow]) -> Vec<u64> {
    let n: usize = rows.iter().map(|r| r.experts.len()).sum();
    let mut next = vec![u64::MAX; n];
    let mut last = DenseKeyMap::new(u64::MAX);
    let mut i = n;
    for row in rows.iter().rev() {
        for &expert in row.experts.iter().rev() {
            i -= 1;
            let slot = last.get_mut(ExpertKey {
                layer: row.layer,
                expert,
            });
            next[i] = *slot;
            *slot = i as u64;
        }
    }
    next
}

/// Counts expert uses in `rows` (the profile `static-<N>` pins from).
pub fn profile_from_rows(rows: &[TraceRow]) -> FrequencyProfile {
    let mut counts = DenseKeyMap::new(0u64);
    for row in rows {
        for &expert in &row.experts {
            *counts.get_mut(ExpertKey {
                layer: row.layer,
                expert,
            }) += 1;
        }
    }
    let mut p = FrequencyProfile::new();
    for (layer, c) in counts.layers.into_iter().enumerate() {
        if !c.is_empty() {
            p.set_layer(layer as u32, c);
        }
    }
    p
}

/// A value per (layer, expert), stored densely.
struct DenseKeyMap<T: Clone> {
    fill: T,
    layers: Vec<Vec<T>>,
}

impl<T: Clone> DenseKeyMap<T> {
    fn new(fill: T) -> Self {
        DenseKeyMap {
            fill,
            layers: Vec::new(),
        }
    }

    fn get_mut(&mut self, key: ExpertKey) -> &mut T {
        let (l, e) = (key.layer as usize, key.expert as usize);
        if self.layers.len() <= l {
            self.layers.resize(l + 1, Vec::new());
        }
        let v = &mut self.layers[l];
        if v.len() <= e {
            v.resize(e + 1, self.fill.clone());
        }
        &mut v[e]
    }

    fn get(&self, key: ExpertKey) -> Option<&T> {
        self.layers
            .get(key.layer as usize)?
            .get(key.expert as usize)
    }
}

/// Demand positions of every expert, for the next-use of prefetches under Belady.
struct KeyPositions {
    map: DenseKeyMap<Vec<u64>>,
}

impl KeyPositions {
    fn new(rows: &[TraceRow]) -> Self {
        let mut map = DenseKeyMap::new(Vec::new());
        let mut i = 0u64;
        for row in rows {
            for &expert in &row.experts {
                map.get_mut(ExpertKey {
                    layer: row.layer,
                    expert,
                })
                .push(i);
                i += 1;
            }
        }
        KeyPositions { map }
    }

    fn next_at_or_after(&self, key: ExpertKey, pos: u64) -> u64 {
        let Some(v) = self.map.get(key) else {
            return u64::MAX;
        };
        let i = v.partition_point(|&p| p < pos);
        v.get(i).copied().unwrap_or(u64::MAX)
    }
}

/// Sums the results of replays of consecutive parts of one trace (one per prompt when the cache
/// is emptied between prompts) into one result.
fn merge_results(parts: &[SimResult]) -> SimResult {
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
