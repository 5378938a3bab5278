//! Where a run's tokens/s come from and what they are measured against.
//!
//! Speed is measured on the experiment's model itself, or — with `[model] replay_on` — on a
//! random-weight checkpoint of a real model's shapes (written by `harness synth` on first use and
//! cached under the results root) that replays the experiment model's routing, so hit rates are
//! the real routing's and expert sizes the real model's. Every pass reads misses the way
//! `[storage]` says (page cache, direct, cold; optionally slowed to an emulated device). Before
//! the cells, the run measures the two references every tok/s is read against: this machine's
//! read rate for whole experts in that mode (`B_read`) and the all-resident decode speed (`R`).

use std::path::{Path, PathBuf};

use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::engine::{Engine, EngineConfig, Generation, Replay, Sampler};
use crate::error::{Error, Result};
use crate::experiment::{Experiment, ReplayOn};
use crate::experts::budget::Budget;
use crate::experts::cache::CacheStats;
use crate::experts::ExpertKey;
use crate::memory::Rss;
use crate::trace::TraceRow;
use crate::weights::storage::IoMode;

/// One prompt of a pass.
#[derive(Debug, Clone)]
pub(super) struct PassPrompt {
    /// A warm-up prompt (run, not measured).
    pub warm: bool,
    /// Token ids.
    pub ids: Vec<u32>,
    /// Tokens to generate.
    pub new_tokens: usize,
    /// Routing to replay instead of the router's.
    pub replay: Option<Replay>,
}

/// What one pass over the prompts measured (measured prompts only, except memory).
#[derive(Debug, Clone, Default)]
pub(super) struct Pass {
    pub prefill_s: f64,
    pub decode_s: f64,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    pub measured: u64,
    pub ttft_s: f64,
    /// Expert bytes the miss path read.
    pub bytes_read: u64,
    /// Bytes `low-bit` misses read from the low-precision copy.
    pub low_bit_bytes: u64,
    /// Bytes the OS read from storage (all threads).
    pub device_read_bytes: Option<u64>,
    pub load_seconds: f64,
    /// Cache counters at the first measured prompt, and at the end.
    pub cache_before: CacheStats,
    pub cache_after: CacheStats,
    pub kv_bytes: u64,
    pub rss: Rss,
    pub generations: Vec<(Vec<u32>, Generation)>,
}

impl Pass {
    pub fn decode_tps(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_s.max(1e-9)
    }

    /// Expert bytes moved per decoded token: decode-phase demand misses and prefetches.
    pub fn bytes_per_decode_token(&self, expert_bytes: u64) -> f64 {
        let (a, b) = (&self.cache_after, &self.cache_before);
        let misses = (a.decode.accesses - b.decode.accesses) - (a.decode.hits - b.decode.hits);
        let prefetch = a.prefetch.bytes - b.prefetch.bytes;
        (misses * expert_bytes + prefetch) as f64 / self.decode_tokens.max(1) as f64
    }
}

/// Runs the prompts through `engine` as configured: warm-up prompts first (not measured), a fresh
/// cache per prompt unless `carry_over`, a sampler from `sampler()` for the whole pass. With
/// `keep_logits` the measured prompts keep their sampled-from logits.
pub(super) fn pass(
    engine: &mut Engine,
    prompts: &[PassPrompt],
    carry_over: bool,
    mut sampler: Sampler,
    stop: &[u32],
    keep_logits: bool,
    mut tick: impl FnMut(),
) -> Result<Pass> {
    let mut p = Pass {
        rss: Rss::now().unwrap_or_default(),
        ..Pass::default()
    };
    let mut started = false;
    let (mut bytes0, mut load0, mut dev0, mut low0) = (0, 0.0, None, 0);
    for (i, pr) in prompts.iter().enumerate() {
        if !carry_over && i > 0 {
            engine.reset_cache();
        }
        if !pr.warm && !started {
            started = true;
            let s = engine.stats();
            (bytes0, load0, low0) = (s.bytes_read, s.load_seconds, s.low_bit_bytes);
            dev0 = crate::weights::storage::device_read_bytes();
            p.cache_before = s.cache;
        }
        engine.set_prompt(i as u32);
        engine.set_replay(pr.replay.clone());
        let g = engine.generate_with(
            &pr.ids,
            pr.new_tokens,
            &mut sampler,
            stop,
            keep_logits && !pr.warm,
        );
        engine.set_replay(None);
        let g = g?;
        if let Some(now) = Rss::now() {
            p.rss = p.rss.max(now);
        }
        p.kv_bytes = p.kv_bytes.max(g.kv_bytes);
        if !pr.warm {
            p.measured += 1;
            p.prefill_s += g.prefill.as_secs_f64();
            p.decode_s += g.decode.as_secs_f64();
            p.prefill_tokens += g.prompt_len as u64;
            p.decode_tokens += g.tokens.len().saturating_sub(1) as u64;
            p.ttft_s += g.prefill.as_secs_f64();
            p.generations.push((pr.ids.clone(), g));
        }
        tick();
    }
    let s = engine.stats();
    p.bytes_read = s.bytes_read - bytes0;
    p.low_bit_bytes = s.low_bit_bytes.saturating_sub(low0);
    p.load_seconds = s.load_seconds - load0;
    p.device_read_bytes = dev0
        .zip(crate::weights::storage::device_read_bytes())
        .map(|(b, a)| a.saturating_sub(b));
    p.cache_after = s.cache;
    Ok(p)
}

/// A model speed is measured on, with the references measured before the cells.
#[derive(Debug, Clone)]
pub(super) struct Target {
    /// What the speed figures stand for (`models/glm4-moe-tiny/mlx-4bit`, or the synth).
    pub model: String,
    /// Checkpoint bytes of one expert.
    pub expert_bytes: u64,
    /// Read rate for whole experts in the run's I/O mode (bytes/s): `B_read`.
    pub read_rate: f64,
    /// All-resident decode speed (tokens/s): `R`.
    pub resident_tps: f64,
}

/// The replay checkpoint of `[model] replay_on`.
pub(super) struct ReplayTarget {
    pub engine: Engine,
    pub target: Target,
    /// What of each cell's trace is replayed.
    pub slice: ReplaySlice,
    /// Policies whose cells are replayed (`None`: all).
    pub policies: Option<Vec<crate::experts::policies::PolicySpec>>,
}

/// Where each cell's speed is measured.
pub(super) struct Speed {
    /// Where the routing comes from.
    pub routing: String,
    /// The experiment's own model.
    pub own: Target,
    /// The replay checkpoint, if any.
    pub replay: Option<ReplayTarget>,
}

impl Speed {
    /// The replay target of a cell of `policy`, if its speed is measured by replay.
    pub fn replay_for(
        &mut self,
        policy: &crate::experts::policies::PolicySpec,
    ) -> Option<&mut ReplayTarget> {
        self.replay
            .as_mut()
            .filter(|r| r.policies.as_ref().is_none_or(|ps| ps.contains(policy)))
    }
}

/// Opens the replay checkpoint (writing it on first use) with the run's storage settings and
/// checks that it can replay `routing`'s traces: the same MoE layers, experts and top-k.
pub(super) fn open_replay(
    r: &ReplayOn,
    exp: &Experiment,
    routing: &Engine,
    out_root: &Path,
    device: candle_core::Device,
) -> Result<Engine> {
    let dir = synth_dir(r, out_root)?;
    let spec = crate::models::load_spec(&dir)?;
    let want = routing.spec();
    let (a, b) = (&spec.moe, &want.moe);
    if a.num_experts != b.num_experts || a.top_k != b.top_k || a.moe_layers != b.moe_layers {
        return Err(Error::config(
            &exp.file,
            "model.replay_on",
            format!(
                "{} has {} experts top-{} at MoE layers {:?}, but the routing model {} has {} experts top-{} at {:?}: a replay needs the same",
                r.config.display(),
                a.num_experts,
                a.top_k,
                a.moe_layers,
                exp.model_dir.display(),
                b.num_experts,
                b.top_k,
                b.moe_layers
            ),
        ));
    }
    Engine::open(&dir, device, storage_config(exp, EngineConfig::default()))
}

/// `cfg` with the run's storage settings.
pub(super) fn storage_config(exp: &Experiment, cfg: EngineConfig) -> EngineConfig {
    EngineConfig {
        io: exp.storage.io,
        storage: exp.storage.device.as_ref().map(|(_, d)| *d),
        staging: exp.storage.staging,
        ..compute_config(exp, cfg)
    }
}

/// `cfg` with the experiment's `[engine]` compute settings (threads, kernels).
pub(super) fn compute_config(exp: &Experiment, cfg: EngineConfig) -> EngineConfig {
    EngineConfig {
        threads: exp.threads,
        kernels: exp.kernels,
        ..cfg
    }
}

/// The synth checkpoint for `r`, written deterministically (seed 0) on first use into
/// `<out_root>/.synth/<name>/` through a temporary directory, so a half-written one is never
/// used.
fn synth_dir(r: &ReplayOn, out_root: &Path) -> Result<PathBuf> {
    let text = std::fs::read(&r.config).map_err(|e| Error::io(&r.config, e))?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text
        .iter()
        .chain(format!("{}/{}", r.layers, r.layout).as_bytes())
    {
        h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
    }
    let stem = r
        .config
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned());
    let root = out_root.join(".synth");
    let dir = root.join(format!(
        "{stem}-{}L-{}-{:08x}",
        r.layers, r.layout, h as u32
    ));
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    // Cells of one sweep running side by side (array tasks) write it once: the others wait.
    // The lock is on the `.synth` directory itself (flock works on a directory's descriptor),
    // so no lock file is left next to the checkpoints.
    let lock_path = root.clone();
    let lock = std::fs::File::open(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    if lock.try_lock().is_err() {
        eprintln!("waiting for another process writing {} …", dir.display());
        lock.lock().map_err(|e| Error::io(&lock_path, e))?;
    }
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    let tmp = root.join(format!(
        ".tmp-{}-{}",
        super::plan::hostname(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!(
        "writing the replay checkpoint ({} at {} layers, {}) to {} (once)",
        r.config.display(),
        r.layers,
        r.layout,
        dir.display()
    );
    crate::synth::synth(&r.config, &tmp, r.layout, Some(r.layers), 0, 2_000_000_000)?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another run wrote it meanwhile.
        Err(_) if dir.join("config.json").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(Error::io(&dir, e)),
    }
}

/// What of a recorded trace a replay runs: the last `warmup` warm-up prompts (`None`: all), the
/// first `prompts` measured ones (`None`: all), at most `max_new_tokens` new tokens each.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ReplaySlice {
    pub warmup: Option<usize>,
    pub prompts: Option<usize>,
    pub max_new_tokens: Option<usize>,
}

/// One pass prompt per prompt of a recorded trace (in prompt order, `warm_n` warm-up prompts
/// first), replaying its routing with seeded token ids from the engine's vocabulary, cut as
/// `slice` says.
pub(super) fn replay_prompts(
    rows: &[TraceRow],
    engine: &Engine,
    warm_n: usize,
    slice: ReplaySlice,
    seed: u64,
) -> Result<Vec<PassPrompt>> {
    let reps = Replay::from_rows(rows, engine.spec())?;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7e91a7);
    let vocab = engine.spec().vocab_size as u32;
    let warm_n = warm_n.min(reps.len());
    let skip_warm = warm_n - slice.warmup.unwrap_or(warm_n).min(warm_n);
    let measured = slice.prompts.unwrap_or(usize::MAX);
    Ok(reps
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i >= skip_warm && *i < warm_n.saturating_add(measured))
        .map(|(i, r)| PassPrompt {
            warm: i < warm_n,
            ids: (0..r.prompt_len)
                .map(|_| rng.random_range(0..vocab))
                .collect(),
            new_tokens: slice
                .max_new_tokens
                .map_or(r.new_tokens, |m| m.min(r.new_tokens)),
            replay: Some(r),
        })
        .collect())
}

/// The rate at which `engine` reads whole experts in its I/O mode (`B_read`), and its
/// all-resident decode speed over `prompts` (`R`): an unlimited cache is filled by one pass,
/// then the measured prompts run again with every expert they use resident.
pub(super) fn references(
    engine: &mut Engine,
    prompts: &[PassPrompt],
    seed: u64,
    stop: &[u32],
) -> Result<(f64, f64)> {
    let read_rate = crate::bench::storage_read_rate(engine, seed)?;
    let cfg = EngineConfig {
        budget: Budget::Unlimited,
        ..engine.config().clone()
    };
    engine.reconfigure(EngineConfig {
        record_trace: false,
        ..cfg
    })?;
    let measured: Vec<PassPrompt> = prompts.iter().filter(|p| !p.warm).cloned().collect();
    let fill: Vec<PassPrompt> = measured
        .iter()
        .cloned()
        .map(|p| PassPrompt { warm: true, ..p })
        .chain(measured.iter().cloned())
        .collect();
    let p = pass(engine, &fill, true, Sampler::Greedy, stop, false, || {})?;
    // Every expert was resident: give that memory back before the cells.
    engine.reset_cache();
    Ok((read_rate, p.decode_tps()))
}

/// Drops the shards from the page cache when the run reads `cold`.
pub(super) fn cool(engine: &Engine) {
    if engine.io().effective == IoMode::Cold {
        engine.store.checkpoint().drop_page_cache();
    }
}

/// Checkpoint bytes of one expert of `engine`'s model.
pub(super) fn expert_bytes(engine: &Engine) -> u64 {
    engine.store.expert_bytes(ExpertKey {
        layer: engine.spec().moe.moe_layers[0] as u32,
        expert: 0,
    })
}
