//! One sweep cell: the routing pass on the experiment's model (trace, hit rates, Belady bound,
//! quality drift of skip cells), then the speed passes (on the model itself, or replayed on the
//! `replay_on` checkpoint), each reading storage as `[storage]` says.

use std::path::Path;

use indicatif::ProgressBar;

use crate::engine::{Engine, EngineConfig, MissMode, Sampler};
use crate::error::{Error, Result};
use crate::experiment::{Cell, Experiment};
use crate::experts::budget::Budget;
use crate::experts::policies::{FrequencyProfile, PolicySpec};
use crate::experts::Phase;
use crate::report::CellSummary;
use crate::simulate::Simulation;
use crate::trace::{self, CellTrace, TraceRow};

use super::speed::{self, Pass, PassPrompt, Speed, Target};

/// What every cell of a run shares.
pub(super) struct Ctx<'a> {
    pub exp: &'a Experiment,
    /// The routing prompts: warm-up first, then the measured ones.
    pub prompts: &'a [PassPrompt],
    pub stop: &'a [u32],
    pub tmp_dir: &'a Path,
    pub profile: Option<&'a FrequencyProfile>,
    pub progress: &'a ProgressBar,
}

/// Resolves a cell's budget against a model with `total` expert bytes over `layers` MoE layers.
pub(super) fn budget_of(cell: &Cell, exp: &Experiment, total: u64, layers: usize) -> Budget {
    super::resolve_budget(cell.budget, exp.pool, total, layers)
}

/// Runs one cell; writes its trace into `cells/<id>.parquet`.
pub(super) fn run_cell(
    ctx: &Ctx,
    engine: &mut Engine,
    speed: &mut Speed,
    cell: &Cell,
) -> Result<CellSummary> {
    let exp = ctx.exp;
    let spec = engine.spec().clone();
    let total = engine.total_expert_bytes();
    let budget = budget_of(cell, exp, total, spec.num_moe_layers());
    let cfg = EngineConfig {
        budget,
        policy: cell.policy.clone(),
        miss: cell.miss,
        record_trace: true,
        load_threads: exp.load_threads,
        low_bit: exp.low_bit.clone(),
        ..engine.config().clone()
    };
    let profile = cell
        .policy
        .needs_profile()
        .then(|| ctx.profile.cloned())
        .flatten();
    let named = |e: Error| Error::Input(format!("cell `{}`: {e}", cell.id));
    engine
        .reconfigure_with(cfg.clone(), profile.clone())
        .map_err(named)?;
    let _ = engine.take_trace();
    // The cell's own memory peak: the previous cell's cache is gone, the dense weights are not.
    crate::memory::reset_peak();
    let replay = speed.replay_for(&cell.policy).is_some();
    if !replay {
        speed::cool(engine);
    }
    let sampler = || Sampler::new(exp.generation.temperature, exp.generation.seed);
    let routed = speed::pass(
        engine,
        ctx.prompts,
        exp.carry_over,
        sampler(),
        ctx.stop,
        cell.miss != MissMode::Load,
        || ctx.progress.inc(1),
    )?;
    let rows = engine.take_trace();
    let warm_n = ctx.prompts.iter().filter(|p| p.warm).count();
    let hits = hit_counts(&rows, warm_n as u32);
    let belady = belady_hit_rate(engine, &rows, budget, exp.carry_over, warm_n as u32)?;
    // Every mode but `load` is checked against the exact model: the lossy ones for their drift,
    // `cpu-compute` to show it is exact.
    let (kl, top1) = if cell.miss != MissMode::Load {
        let d = drift(engine, &routed.generations)?;
        engine.reconfigure_with(cfg.clone(), profile.clone())?;
        d
    } else {
        (None, None)
    };

    // Speed: the routing pass itself and `repeats − 1` more on this model, or `repeats` replays
    // of the routing on the replay checkpoint.
    let mut passes: Vec<Pass> = Vec::new();
    match speed.replay_for(&cell.policy) {
        None => {
            passes.push(routed.clone());
            for _ in 1..exp.generation.repeats {
                engine.reconfigure_with(
                    EngineConfig {
                        record_trace: false,
                        ..cfg.clone()
                    },
                    profile.clone(),
                )?;
                speed::cool(engine);
                passes.push(speed::pass(
                    engine,
                    ctx.prompts,
                    exp.carry_over,
                    sampler(),
                    ctx.stop,
                    false,
                    || {},
                )?);
            }
        }
        Some(rt) => {
            let se = &mut rt.engine;
            let prompts = speed::replay_prompts(&rows, se, warm_n, rt.slice, exp.generation.seed)?;
            let total = se.total_expert_bytes();
            let scfg = EngineConfig {
                budget: budget_of(cell, exp, total, se.spec().num_moe_layers()),
                record_trace: false,
                ..cfg.clone()
            };
            let scfg = speed::storage_config(exp, scfg);
            for _ in 0..exp.generation.repeats {
                se.reconfigure_with(scfg.clone(), profile.clone())
                    .map_err(named)?;
                speed::cool(se);
                passes.push(speed::pass(
                    se,
                    &prompts,
                    exp.carry_over,
                    Sampler::Greedy,
                    &[],
                    false,
                    || {},
                )?);
            }
        }
    }
    trace::write(
        &ctx.tmp_dir
            .join("cells")
            .join(format!("{}.parquet", cell.id)),
        &[CellTrace {
            cell: cell.id.clone(),
            rows,
        }],
    )?;

    let routing = speed.routing.clone();
    // Both models are open in this process: both hold their dense weights.
    let dense = engine.dense_bytes() + speed.replay.as_ref().map_or(0, |r| r.engine.dense_bytes());
    let (se, target): (&Engine, Target) = match speed.replay_for(&cell.policy) {
        Some(rt) => (&rt.engine, rt.target.clone()),
        None => (&*engine, speed.own.clone()),
    };
    let replayed = !std::ptr::eq(se, &*engine);
    let first = &passes[0];
    let mut tps: Vec<f64> = passes.iter().map(Pass::decode_tps).collect();
    tps.sort_by(f64::total_cmp);
    let median = |v: &[f64]| v[v.len() / 2];
    let mut pre: Vec<f64> = passes
        .iter()
        .map(|p| p.prefill_tokens as f64 / p.prefill_s.max(1e-9))
        .collect();
    pre.sort_by(f64::total_cmp);
    let bpt = first.bytes_per_decode_token(target.expert_bytes);
    let bound = crate::bench::storage_bound_tps(target.resident_tps, bpt, target.read_rate);
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let (ca, cb) = (&routed.cache_after, &routed.cache_before);
    let issued = ca.prefetch.issued - cb.prefetch.issued;
    let used = ca.prefetch.used - cb.prefetch.used;
    let fraction = match budget {
        Budget::Unlimited => 1.0,
        Budget::SlotsPerLayer(n) => n as f64 / spec.moe.num_experts as f64,
        Budget::BytesGlobal(b) => b as f64 / total as f64,
        Budget::BytesPerLayer(b) => (b * spec.num_moe_layers() as u64) as f64 / total as f64,
    };
    let rss = passes.iter().fold(routed.rss, |r, p| r.max(p.rss));
    let cache_peak = if replayed {
        first.cache_after.peak_resident_bytes
    } else {
        routed.cache_after.peak_resident_bytes
    };
    let io = se.io();
    let summary = CellSummary {
        cell: cell.id.clone(),
        policy: cell.policy.to_string(),
        capacity: budget.slots().map(|n| n as u64),
        budget_bytes: budget.bytes(),
        budget_fraction: fraction.min(1.0),
        pool: exp.pool.to_string(),
        miss: cell.miss.to_string(),
        prompts: routed.measured,
        tokens_generated: routed
            .generations
            .iter()
            .map(|(_, g)| g.tokens.len() as u64)
            .sum(),
        accesses: hits.0,
        hits: hits.1,
        hit_rate: ratio(hits.1, hits.0),
        hit_rate_prefill: ratio(hits.3, hits.2),
        hit_rate_decode: ratio(hits.1 - hits.3, hits.0 - hits.2),
        effective_hit_rate: 1.0 - ratio((hits.0 - hits.1) + issued, hits.0).min(1.0),
        belady_hit_rate: belady,
        prefetch_issued: issued,
        prefetch_precision: (issued > 0).then(|| ratio(used, issued)),
        // Recall as the cache defines it: prefetches used / (used + demand misses).
        prefetch_recall: (issued > 0).then(|| ratio(used, used + (hits.0 - hits.1))),
        speed_model: target.model.clone(),
        routing: if replayed {
            format!("{routing}, replayed")
        } else {
            routing
        },
        expert_bytes: target.expert_bytes,
        cache_budget_bytes: {
            let layers = se.spec().num_moe_layers() as u64;
            let all = se.total_expert_bytes();
            match budget_of(cell, exp, all, layers as usize) {
                Budget::Unlimited => all,
                Budget::SlotsPerLayer(n) => (n as u64 * target.expert_bytes * layers).min(all),
                Budget::BytesPerLayer(b) => (b * layers).min(all),
                Budget::BytesGlobal(b) => b.min(all),
            }
        },
        device: crate::engine::describe(se.model.device()),
        threads: se.compute_threads(),
        kernels: se.kernels_label(),
        host: super::plan::hostname(),
        io: io.effective.to_string(),
        io_note: io.note.clone(),
        staging: se.store.staging_label(),
        storage_device: exp
            .storage
            .device
            .as_ref()
            .map(|(name, d)| format!("{name}: {d}")),
        bytes_read: first.bytes_read,
        device_read_bytes: first.device_read_bytes,
        page_cache_bytes: se.store.checkpoint().page_cache_bytes(),
        storage_late_reads: se.store.checkpoint().emulator_stats().map(|s| s.late),
        load_seconds: first.load_seconds,
        prefill_tps: median(&pre),
        decode_tps: median(&tps),
        decode_tps_min: tps[0],
        decode_tps_max: tps[tps.len() - 1],
        repeats: passes.len() as u64,
        ttft_seconds: first.ttft_s / first.measured.max(1) as f64,
        bytes_per_token: bpt,
        storage_read_gbps: target.read_rate / 1e9,
        resident_decode_tps: target.resident_tps,
        storage_bound_tps: bound,
        storage_bound_fraction: median(&tps) / bound,
        memory: crate::memory::MemoryReport::new(
            rss,
            dense,
            cache_peak,
            routed.kv_bytes.max(first.kv_bytes),
        ),
        kl_mean: kl,
        top1_agreement: top1,
        substituted: ca.miss.substituted - cb.miss.substituted,
        dropped: ca.miss.dropped - cb.miss.dropped,
        low_bit_loads: ca.miss.low_bit - cb.miss.low_bit,
        low_bit_bytes: routed.low_bit_bytes,
        host_computed: ca.miss.host - cb.miss.host,
    };
    // The replay checkpoint's cache is this cell's: give its memory back before the next one.
    if let Some(rt) = speed.replay_for(&cell.policy) {
        rt.engine.reset_cache();
    }
    Ok(summary)
}

/// (accesses, hits, prefill accesses, prefill hits) of the measured prompts' rows.
fn hit_counts(rows: &[TraceRow], warm_n: u32) -> (u64, u64, u64, u64) {
    let (mut acc, mut hit, mut acc_p, mut hit_p) = (0u64, 0u64, 0u64, 0u64);
    for r in rows.iter().filter(|r| r.prompt >= warm_n) {
        let h = r.hits.iter().filter(|&&h| h).count() as u64;
        acc += r.hits.len() as u64;
        hit += h;
        if r.phase == Phase::Prefill {
            acc_p += r.hits.len() as u64;
            hit_p += h;
        }
    }
    (acc, hit, acc_p, hit_p)
}

/// Belady's hit rate on a cell's own trace at the cell's budget (measured prompts only).
fn belady_hit_rate(
    engine: &Engine,
    rows: &[TraceRow],
    budget: Budget,
    carry_over: bool,
    warm_n: u32,
) -> Result<f64> {
    let moe_layers: Vec<u32> = engine
        .spec()
        .moe
        .moe_layers
        .iter()
        .map(|&l| l as u32)
        .collect();
    let mut sim = Simulation::new(PolicySpec::Belady, budget, &moe_layers);
    sim.warmup_prompts = warm_n;
    sim.reset_per_prompt = !carry_over;
    let res = crate::simulate::simulate(rows, &sim, |k| engine.store.expert_bytes(k))?;
    Ok(res.hit_rate)
}

/// KL(exact ‖ cell) and top-1 agreement of a cell's (every miss mode but `load`)
/// sampled-from distributions, against an exact (unlimited, load) teacher-forced pass over the
/// same tokens.
fn drift(
    engine: &mut Engine,
    runs: &[(Vec<u32>, crate::engine::Generation)],
) -> Result<(Option<f64>, Option<f64>)> {
    engine.reconfigure(EngineConfig {
        budget: Budget::Unlimited,
        policy: PolicySpec::Lru,
        miss: MissMode::Load,
        record_trace: false,
        ..engine.config().clone()
    })?;
    let (mut kl_sum, mut agree, mut n) = (0.0, 0u64, 0u64);
    for (prompt, g) in runs {
        if g.tokens.is_empty() {
            continue;
        }
        let mut seq = prompt.clone();
        seq.extend_from_slice(&g.tokens[..g.tokens.len() - 1]);
        let (exact, _) = engine.logits(&seq)?;
        for (k, skip) in g.step_logits.iter().enumerate() {
            let e = &exact[prompt.len() - 1 + k];
            kl_sum += kl(e, skip);
            agree +=
                (crate::models::layers::argmax(e) == crate::models::layers::argmax(skip)) as u64;
            n += 1;
        }
    }
    let _ = engine.take_trace();
    Ok(if n == 0 {
        (None, None)
    } else {
        (Some(kl_sum / n as f64), Some(agree as f64 / n as f64))
    })
}

/// KL divergence between the softmax distributions of two logit vectors, KL(p ‖ q).
pub fn kl(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let lsm = |l: &[f32]| {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z = l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
        l.iter().map(move |&x| x as f64 - z).collect::<Vec<f64>>()
    };
    let (lp, lq) = (lsm(p_logits), lsm(q_logits));
    lp.iter()
        .zip(&lq)
        .map(|(a, b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}
