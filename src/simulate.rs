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

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::experts::cache::{
    ratio, Budget, CacheCore, CacheError, CacheOptions, CacheStats, Phase,
};
use crate::experts::policies::{FrequencyProfile, PolicySpec};
use crate::experts::ExpertKey;

/// One (token, MoE layer) step of a routing trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceRow {
    /// Prompt index within the run.
    pub prompt: u32,
    /// Forward step within the prompt (prefill chunk or decode step).
    pub step: u32,
    /// Token position.
    pub pos: u32,
    /// Prefill or decode.
    pub phase: Phase,
    /// Decoder layer index.
    pub layer: u32,
    /// Experts the router selected, in the order the engine accessed them.
    pub experts: Vec<u32>,
    /// Router weights of `experts` (not used by the replay).
    pub weights: Option<Vec<f32>>,
    /// Experts predicted for this layer while the previous MoE layer of the same token ran
    /// (`None` for the first MoE layer and for prefill rows).
    pub lookahead: Option<Vec<u32>>,
}

/// Replay options beyond spec and budget.
#[derive(Debug, Clone, Default)]
pub struct SimOptions {
    /// Classic (libCacheSim) mode: no step pins, every access its own step.
    pub classic: bool,
    /// Frequency profile for `static-<N>`; when absent, [`simulate_with`] counts it from the
    /// replayed rows themselves (an oracle profile).
    pub profile: Option<FrequencyProfile>,
}

/// Errors of a replay.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    /// The cache could not be built.
    #[error(transparent)]
    Cache(#[from] CacheError),
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

/// Replays `rows` with a fresh cache (pinned mode unless `classic`). For `static-<N>` the
/// frequency profile is counted from `rows` (see [`simulate_with`] to pass another).
pub fn simulate(
    rows: &[TraceRow],
    spec: &PolicySpec,
    budget: Budget,
    expert_size: impl Fn(ExpertKey) -> u64,
    moe_layers: &[u32],
    classic: bool,
) -> Result<SimResult, SimError> {
    let opts = SimOptions {
        classic,
        profile: None,
    };
    simulate_with(rows, spec, budget, expert_size, moe_layers, &opts)
}

/// [`simulate`] counting only the rows `measure` accepts: the others (e.g. warm-up prompts)
/// are replayed, so they fill the cache, but not counted (see [`CacheCore::set_recording`]).
pub fn simulate_rows(
    rows: &[TraceRow],
    spec: &PolicySpec,
    budget: Budget,
    expert_size: impl Fn(ExpertKey) -> u64,
    moe_layers: &[u32],
    classic: bool,
    measure: impl Fn(&TraceRow) -> bool,
) -> Result<SimResult, SimError> {
    let opts = SimOptions {
        classic,
        profile: None,
    };
    simulate_measured(rows, spec, budget, expert_size, moe_layers, &opts, measure)
}

/// [`simulate`] with explicit [`SimOptions`].
pub fn simulate_with(
    rows: &[TraceRow],
    spec: &PolicySpec,
    budget: Budget,
    expert_size: impl Fn(ExpertKey) -> u64,
    moe_layers: &[u32],
    opts: &SimOptions,
) -> Result<SimResult, SimError> {
    simulate_measured(rows, spec, budget, expert_size, moe_layers, opts, |_| true)
}

/// The general form: explicit [`SimOptions`] and a `measure` filter (see [`simulate_rows`]).
pub fn simulate_measured(
    rows: &[TraceRow],
    spec: &PolicySpec,
    budget: Budget,
    expert_size: impl Fn(ExpertKey) -> u64,
    moe_layers: &[u32],
    opts: &SimOptions,
    measure: impl Fn(&TraceRow) -> bool,
) -> Result<SimResult, SimError> {
    let profile = match (&opts.profile, spec.needs_profile()) {
        (Some(p), _) => Some(p.clone()),
        (None, true) => Some(profile_from_rows(rows)),
        (None, false) => None,
    };
    let options = CacheOptions {
        classic: opts.classic,
        profile,
    };
    let mut cache = CacheCore::with_options(spec, budget, moe_layers, options)?;
    replay_measured(&mut cache, rows, expert_size, measure)?;
    Ok(SimResult::from_cache(&cache))
}

/// Replays `rows` through an existing cache in the engine's order (see the module doc).
pub fn replay(
    cache: &mut CacheCore,
    rows: &[TraceRow],
    expert_size: impl Fn(ExpertKey) -> u64,
) -> Result<(), SimError> {
    replay_measured(cache, rows, expert_size, |_| true)
}

/// [`replay`] with counting on only for the rows `measure` accepts (recording is left on).
pub fn replay_measured(
    cache: &mut CacheCore,
    rows: &[TraceRow],
    expert_size: impl Fn(ExpertKey) -> u64,
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
    let mut evicted = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        let fail = |source: CacheError| SimError::Row {
            row: r,
            prompt: row.prompt,
            step: row.step,
            pos: row.pos,
            layer: row.layer,
            source,
        };
        cache.set_recording(measure(row));
        cache
            .begin_step(row.layer, row.phase, &row.experts)
            .map_err(fail)?;
        for &expert in &row.experts {
            let key = ExpertKey {
                layer: row.layer,
                expert,
            };
            let next_use = next_uses.get(pos).copied().unwrap_or(u64::MAX);
            pos += 1;
            evicted.clear();
            cache
                .access_into(key, expert_size(key), next_use, &mut evicted)
                .map_err(fail)?;
        }
        if spec.prefetch() {
            if let Some(next) = rows.get(r + 1) {
                let same_token = next.prompt == row.prompt
                    && next.step == row.step
                    && next.pos == row.pos
                    && next.phase == Phase::Decode
                    && next_layer.get(row.layer as usize) == Some(&next.layer);
                if let (true, Some(predicted)) = (same_token, &next.lookahead) {
                    for &expert in predicted {
                        let key = ExpertKey {
                            layer: next.layer,
                            expert,
                        };
                        let next_use = positions
                            .as_ref()
                            .map_or(u64::MAX, |p| p.next_at_or_after(key, pos as u64));
                        evicted.clear();
                        cache.prefetch_into(key, expert_size(key), next_use, &mut evicted);
                    }
                }
            }
        }
        cache.end_step();
    }
    cache.set_recording(true);
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

/// A plain-text table of results, one line per result.
pub fn format_table(results: &[SimResult]) -> String {
    let pct = |x: f64| format!("{:.2}", 100.0 * x);
    let opt = |x: Option<f64>| x.map_or("-".to_string(), pct);
    let header = [
        "policy",
        "budget",
        "mode",
        "accesses",
        "hit%",
        "prefill%",
        "decode%",
        "pf-prec%",
        "pf-recall%",
    ];
    let rows: Vec<[String; 9]> = results
        .iter()
        .map(|r| {
            [
                r.policy.clone(),
                r.budget.clone(),
                if r.classic { "classic" } else { "pinned" }.to_string(),
                r.accesses.to_string(),
                pct(r.hit_rate),
                if r.prefill.accesses > 0 {
                    pct(r.prefill.hit_rate)
                } else {
                    "-".into()
                },
                if r.decode.accesses > 0 {
                    pct(r.decode.hit_rate)
                } else {
                    "-".into()
                },
                opt(r.prefetch.precision),
                opt(r.prefetch.recall),
            ]
        })
        .collect();
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[&str]| {
        for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
            let sep = if i == 0 { "" } else { "  " };
            if i < 3 {
                let _ = write!(out, "{sep}{c:<w$}");
            } else {
                let _ = write!(out, "{sep}{c:>w$}");
            }
        }
        out.push('\n');
    };
    line(&mut out, &header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(|s| s.as_str()).collect();
        line(&mut out, &cells);
    }
    out
}

/// SplitMix64: a tiny seeded generator, stable across dependency versions.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n.
    fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize % n.max(1)
    }
}

/// A seeded synthetic routing trace for tests and benchmarks: one prompt, `tokens` tokens, each
/// through every layer of `layers` (token-major, rows in execution order).
///
/// Each layer has its own popularity order (a seeded permutation of `0..num_experts`); an expert
/// slot is, with probability `reuse`, one of the same layer's experts of the previous token
/// (temporal locality), otherwise a Zipf(`zipf_s`) draw over the popularity order; the `top_k`
/// experts of a row are distinct. The first `max(1, tokens / 8)` tokens are prefill (step 0),
/// the rest decode (steps 1, 2, …). Decode rows after the first layer carry a `lookahead`
/// prediction: the true experts, each replaced with probability 1/4 by a Zipf draw.
pub fn synthetic_trace(
    seed: u64,
    tokens: usize,
    layers: &[u32],
    num_experts: u32,
    top_k: usize,
    zipf_s: f64,
    reuse: f64,
) -> Vec<TraceRow> {
    let n = num_experts.max(1) as usize;
    let k = top_k.min(n);
    let mut rng = SplitMix64(seed ^ 0x6D6F_652D_6861_726E);
    let mut cdf: Vec<f64> = Vec::with_capacity(n);
    let mut acc = 0.0;
    for r in 0..n {
        acc += 1.0 / ((r + 1) as f64).powf(zipf_s);
        cdf.push(acc);
    }
    let perms: Vec<Vec<u32>> = layers
        .iter()
        .map(|_| {
            let mut p: Vec<u32> = (0..n as u32).collect();
            for i in (1..n).rev() {
                p.swap(i, rng.below(i + 1));
            }
            p
        })
        .collect();
    let zipf = |rng: &mut SplitMix64, perm: &[u32]| -> u32 {
        let u = rng.unit() * acc;
        perm[cdf.partition_point(|&c| c <= u).min(n - 1)]
    };
    let n_prefill = (tokens / 8).max(1).min(tokens);
    let mut prev: Vec<Vec<u32>> = vec![Vec::new(); layers.len()];
    let mut rows = Vec::with_capacity(tokens * layers.len());
    for t in 0..tokens {
        let phase = if t < n_prefill {
            Phase::Prefill
        } else {
            Phase::Decode
        };
        let step = if phase == Phase::Prefill {
            0
        } else {
            (t - n_prefill + 1) as u32
        };
        for (li, &layer) in layers.iter().enumerate() {
            // The previous token's experts of this layer, in random order: reuse candidates.
            let mut recent = std::mem::take(&mut prev[li]);
            for i in (1..recent.len()).rev() {
                recent.swap(i, rng.below(i + 1));
            }
            let mut experts: Vec<u32> = Vec::with_capacity(k);
            while experts.len() < k {
                let e = if !recent.is_empty() && rng.unit() < reuse {
                    recent.pop().expect("non-empty")
                } else {
                    zipf(&mut rng, &perms[li])
                };
                if !experts.contains(&e) {
                    experts.push(e);
                }
            }
            let lookahead = (phase == Phase::Decode && li > 0).then(|| {
                let mut p: Vec<u32> = Vec::with_capacity(k);
                for &e in &experts {
                    let guess = if rng.unit() < 0.25 {
                        zipf(&mut rng, &perms[li])
                    } else {
                        e
                    };
                    if !p.contains(&guess) {
                        p.push(guess);
                    }
                }
                p
            });
            prev[li] = experts.clone();
            rows.push(TraceRow {
                prompt: 0,
                step,
                pos: t as u32,
                phase,
                layer,
                weights: Some(vec![1.0 / k as f32; k]),
                experts,
                lookahead,
            });
        }
    }
    rows
}

/// Sums the results of replays of consecutive parts of one trace (e.g. one per prompt when the
/// cache is emptied between prompts) into one result.
pub fn merge_results(parts: &[SimResult]) -> SimResult {
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
mod tests {
    use super::*;

    fn row(step: u32, phase: Phase, layer: u32, experts: &[u32], la: Option<&[u32]>) -> TraceRow {
        TraceRow {
            prompt: 0,
            step,
            pos: step,
            phase,
            layer,
            experts: experts.to_vec(),
            weights: None,
            lookahead: la.map(|v| v.to_vec()),
        }
    }

    fn spec(s: &str) -> PolicySpec {
        PolicySpec::parse(s).unwrap()
    }

    #[test]
    fn next_uses_number_demands_globally() {
        let rows = vec![
            row(0, Phase::Decode, 0, &[1, 2], None),
            row(0, Phase::Decode, 1, &[1], None),
            row(1, Phase::Decode, 0, &[2, 1], None),
        ];
        // accesses: 0:(0,1) 1:(0,2) 2:(1,1) 3:(0,2) 4:(0,1)
        assert_eq!(
            demand_next_uses(&rows),
            vec![4, 3, u64::MAX, u64::MAX, u64::MAX]
        );
    }

    #[test]
    fn prefetch_only_into_the_next_layer_of_the_same_token() {
        // Layers 0, 1; 2 slots each. Token 1: layer 1's lookahead [5] is prefetched during
        // layer 0 and hits. Token 2's layer-1 row has a lookahead too, but the row before it is
        // token 1's layer 1, not token 2's layer 0: no prefetch.
        let rows = vec![
            row(1, Phase::Decode, 0, &[0], None),
            row(1, Phase::Decode, 1, &[5], Some(&[5])),
            row(2, Phase::Decode, 1, &[6], Some(&[6])),
        ];
        let r = simulate(
            &rows,
            &spec("lookahead"),
            Budget::SlotsPerLayer(2),
            |_| 1,
            &[0, 1],
            false,
        )
        .unwrap();
        assert_eq!(r.prefetch.issued, 1);
        assert_eq!(r.prefetch.used, 1);
        assert_eq!(r.hits, 1);
        assert_eq!(r.per_layer[1].hits, 1);
        // Without lookahead the same trace has no hit and no prefetch.
        let r = simulate(
            &rows,
            &spec("lru"),
            Budget::SlotsPerLayer(2),
            |_| 1,
            &[0, 1],
            false,
        )
        .unwrap();
        assert_eq!((r.hits, r.prefetch.issued), (0, 0));
        // Prefill rows never trigger prefetch even when the next row is the next layer.
        let mut rows = rows;
        rows[1].phase = Phase::Prefill;
        rows[0].phase = Phase::Prefill;
        let r = simulate(
            &rows,
            &spec("lookahead"),
            Budget::SlotsPerLayer(2),
            |_| 1,
            &[0, 1],
            false,
        )
        .unwrap();
        assert_eq!(r.prefetch.issued, 0);
    }

    #[test]
    fn row_errors_name_the_row() {
        let rows = vec![row(3, Phase::Decode, 0, &[0, 1, 2], None)];
        let e = simulate(
            &rows,
            &spec("lru"),
            Budget::SlotsPerLayer(2),
            |_| 1,
            &[0],
            false,
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("trace row 0 (prompt 0, step 3"), "{msg}");
        assert!(
            msg.contains("budget below one token's working set"),
            "{msg}"
        );
        // Classic mode has no pins: the same row fits by evicting.
        let r = simulate(
            &rows,
            &spec("lru"),
            Budget::SlotsPerLayer(2),
            |_| 1,
            &[0],
            true,
        )
        .unwrap();
        assert_eq!(r.evictions, 1);
    }

    #[test]
    fn synthetic_trace_is_seeded_and_well_formed() {
        let layers = [1, 2, 5];
        let a = synthetic_trace(7, 40, &layers, 16, 4, 1.1, 0.5);
        let b = synthetic_trace(7, 40, &layers, 16, 4, 1.1, 0.5);
        let c = synthetic_trace(8, 40, &layers, 16, 4, 1.1, 0.5);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 120);
        for (i, r) in a.iter().enumerate() {
            assert_eq!(r.layer, layers[i % 3]);
            assert_eq!(r.pos as usize, i / 3);
            assert_eq!(r.experts.len(), 4);
            let mut e = r.experts.clone();
            e.sort();
            e.dedup();
            assert_eq!(e.len(), 4, "duplicate experts in {r:?}");
            assert!(r.experts.iter().all(|&x| x < 16));
            let first_layer = r.layer == 1;
            assert_eq!(
                r.lookahead.is_some(),
                r.phase == Phase::Decode && !first_layer,
                "{r:?}"
            );
        }
        assert_eq!(
            a.iter().filter(|r| r.phase == Phase::Prefill).count(),
            5 * 3
        );
    }

    #[test]
    fn synthetic_locality_and_skew_raise_lru_hits() {
        let layers = [0, 1];
        let hr = |s: f64, reuse: f64| {
            let rows = synthetic_trace(3, 2000, &layers, 64, 4, s, reuse);
            simulate(
                &rows,
                &spec("lru"),
                Budget::SlotsPerLayer(8),
                |_| 1,
                &layers,
                false,
            )
            .unwrap()
            .hit_rate
        };
        let base = hr(0.0, 0.0); // uniform, no reuse: about 8/64 hits per slot pick
        assert!(base < 0.2, "{base}");
        assert!(hr(1.2, 0.0) > base + 0.1);
        assert!(hr(0.0, 0.8) > base + 0.3);
    }

    #[test]
    fn result_serializes_with_the_documented_fields() {
        let rows = synthetic_trace(1, 20, &[0, 1], 8, 2, 1.0, 0.3);
        let r = simulate(
            &rows,
            &spec("lfu"),
            Budget::SlotsPerLayer(4),
            |_| 1,
            &[0, 1],
            false,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        for f in [
            "policy",
            "capacity",
            "budget_bytes",
            "accesses",
            "hits",
            "hit_rate",
            "per_layer",
        ] {
            assert!(v.get(f).is_some(), "missing {f}");
        }
        assert_eq!(v["policy"], "lfu");
        assert_eq!(v["capacity"], 4);
        assert_eq!(v["per_layer"][1]["layer"], 1);
        let sum: u64 = r.per_layer.iter().map(|l| l.accesses).sum();
        assert_eq!(sum, r.accesses);
        assert_eq!(r.accesses, 20 * 2 * 2);
        assert_eq!(r.prefill.accesses + r.decode.accesses, r.accesses);
        let t = format_table(&[r.clone(), r]);
        assert_eq!(t.lines().count(), 3);
        assert!(t.lines().nth(1).unwrap().starts_with("lfu "), "{t}");
        assert!(t.contains("hit%"));
    }

    #[test]
    fn unmeasured_rows_warm_the_cache_but_are_not_counted() {
        // Prompt 0 (warm-up) loads 0 and 1; prompt 1 demands them again: both hit, and only
        // prompt 1's two accesses are counted.
        let mut rows = vec![
            row(0, Phase::Decode, 0, &[0, 1], None),
            row(0, Phase::Decode, 0, &[0, 1], None),
        ];
        rows[1].prompt = 1;
        let r = simulate_rows(
            &rows,
            &spec("lru"),
            Budget::SlotsPerLayer(2),
            |_| 1,
            &[0],
            false,
            |r| r.prompt >= 1,
        )
        .unwrap();
        assert_eq!((r.accesses, r.hits, r.misses, r.bytes_loaded), (2, 2, 0, 0));
        assert_eq!(r.per_layer[0].accesses, 2);
        assert_eq!(r.peak_resident_bytes, 2);
        let all = simulate(
            &rows,
            &spec("lru"),
            Budget::SlotsPerLayer(2),
            |_| 1,
            &[0],
            false,
        )
        .unwrap();
        assert_eq!((all.accesses, all.hits), (4, 2));
    }

    #[test]
    fn static_uses_the_trace_profile_by_default() {
        // Expert 0 is used at every step; 1, 2, 3 rotate. 2 slots, static-1 keeps 0 forever:
        // 0 misses once, the rotating ones always miss (each evicts the other slot).
        let rows: Vec<TraceRow> = (0..9u32)
            .map(|t| row(t, Phase::Decode, 0, &[0, 1 + t % 3], None))
            .collect();
        let r = simulate(
            &rows,
            &spec("static-1"),
            Budget::SlotsPerLayer(2),
            |_| 1,
            &[0],
            false,
        )
        .unwrap();
        assert_eq!(r.hits, 8);
        // An explicit profile that pins expert 1 instead: 0 and the rotation share one slot.
        let mut p = FrequencyProfile::new();
        p.add(
            ExpertKey {
                layer: 0,
                expert: 1,
            },
            5,
        );
        let opts = SimOptions {
            classic: false,
            profile: Some(p),
        };
        let r = simulate_with(
            &rows,
            &spec("static-1"),
            Budget::SlotsPerLayer(2),
            |_| 1,
            &[0],
            &opts,
        );
        // Profile pins expert 1 instead. t0 [0, 1]: both load, 1 for good. t1 [0, 2]: 0 hits, 2
        // needs a slot, but 1 is pinned by the profile and 0 by the step -> row 1 fails.
        assert!(
            matches!(
                r,
                Err(SimError::Row {
                    row: 1,
                    source: CacheError::BudgetTooSmall { .. },
                    ..
                })
            ),
            "{r:?}"
        );
    }
}
