//! The lazy-expert engine: a [`Model`] with resident dense weights, an [`ExpertStore`] that reads
//! experts on demand, and the bounded cache ([`CacheCore`] deciding, this module holding the
//! materialised tensors). It runs prefill and decode, records the routing trace, and counts
//! hits, misses, bytes read and load time.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::config::{self, ModelSpec};
use crate::error::{Error, Result};
use crate::experts::cache::{Budget, CacheCore, CacheOptions, CacheStats, Phase};
use crate::experts::loader::{LoadStats, Loader};
use crate::experts::policies::FrequencyProfile;
use crate::experts::policies::PolicySpec;
use crate::experts::store::{ExpertStore, ExpertWeights};
use crate::experts::upload::TransferStats;
use crate::experts::ExpertKey;
use crate::models::layers::{argmax, rows};
use crate::models::moe::{ExpertAccess, Route};
use crate::models::{KvCache, Model, Routing};
use crate::weights::{layout, Checkpoint};

/// What to do when a selected expert is not resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissMode {
    /// Load it and run it (exact).
    #[default]
    Load,
    /// Run the token without it, renormalising the remaining weights (flash-moe skip-fallback).
    /// The expert is still brought into the cache for later tokens, as a background loader would.
    Skip,
}

impl std::str::FromStr for MissMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "load" => Ok(MissMode::Load),
            "skip" => Ok(MissMode::Skip),
            _ => Err(Error::Input(format!(
                "unknown miss mode `{s}` (known: load, skip)"
            ))),
        }
    }
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Cache budget.
    pub budget: Budget,
    /// Eviction policy (and prefetch, for `lookahead`).
    pub policy: PolicySpec,
    /// Miss handling.
    pub miss: MissMode,
    /// Keep a per-(token, layer) routing trace.
    pub record_trace: bool,
    /// Expert loader threads: `Some(0)` loads inline on the engine thread; `None` picks 0 on the
    /// CPU and `min(top_k, 8)` on a GPU (parallel misses, asynchronous lookahead prefetch).
    pub load_threads: Option<usize>,
    /// On CUDA, keep MLX-quantized experts packed in GPU memory (decoded inside the
    /// matrix-vector kernel; default) instead of decoding them to f32 at upload.
    pub gpu_packed: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            budget: Budget::Unlimited,
            policy: PolicySpec::parse("lru").expect("lru is a policy"),
            miss: MissMode::Load,
            record_trace: false,
            load_threads: None,
            gpu_packed: true,
        }
    }
}

/// Routing of one recorded prompt, replayed instead of the router's (for speed runs on
/// random-weight checkpoints, whose own routing is unrealistic): the engine runs the same
/// numbers of prefill and decode tokens and, at every MoE layer, uses the recorded experts (and
/// the recorded lookahead predictions where the trace has them). Token ids and logits are then
/// meaningless; expert traffic is the recorded model's.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    /// By (position, layer): the route and the recorded lookahead prediction.
    routes: std::collections::HashMap<(u32, u32), ReplayedStep>,
    /// Prompt (prefill) length.
    pub prompt_len: usize,
    /// Tokens to generate (decode steps + 1).
    pub new_tokens: usize,
}

impl Replay {
    /// One replay per prompt of `rows` (in prompt order), checked against `spec`: MoE layers,
    /// expert ids, top-k, and contiguous positions.
    pub fn from_records(rows: &[StepRecord], spec: &ModelSpec) -> Result<Vec<Replay>> {
        let mut by_prompt: std::collections::BTreeMap<u32, Replay> = Default::default();
        let k = spec.moe.top_k;
        for (i, r) in rows.iter().enumerate() {
            let bad = |m: String| Error::Input(format!("replayed trace row {i}: {m}"));
            if !spec.is_moe_layer(r.layer as usize) {
                return Err(bad(format!(
                    "layer {} is not a MoE layer of this model",
                    r.layer
                )));
            }
            if r.experts.len() != k {
                return Err(bad(format!(
                    "{} experts, but this model routes top-{k}",
                    r.experts.len()
                )));
            }
            let n = spec.moe.num_experts as u32;
            let ids = r.experts.iter().chain(r.lookahead.iter().flatten());
            if let Some(e) = ids.copied().find(|&e| e >= n) {
                return Err(bad(format!("expert {e} ≥ num_experts = {n}")));
            }
            let weights = if r.weights.len() == k {
                r.weights.clone()
            } else {
                vec![1.0 / k as f32; k]
            };
            let rep = by_prompt.entry(r.prompt).or_default();
            match r.phase {
                Phase::Prefill => rep.prompt_len = rep.prompt_len.max(r.pos as usize + 1),
                Phase::Decode => rep.new_tokens = rep.new_tokens.max(r.step as usize + 1),
            }
            let route = Route {
                experts: r.experts.clone(),
                weights,
            };
            rep.routes
                .insert((r.pos, r.layer), (route, r.lookahead.clone()));
        }
        let layers = spec.num_moe_layers();
        by_prompt
            .into_iter()
            .map(|(p, mut rep)| {
                rep.new_tokens = rep.new_tokens.max(1);
                let want = (rep.prompt_len + rep.new_tokens - 1) * layers;
                if rep.prompt_len == 0 || rep.routes.len() != want {
                    return Err(Error::Input(format!(
                        "replayed trace, prompt {p}: {} rows for {} prefill and {} decode positions × {layers} MoE layers (expected {want}, positions 0.. with no gaps)",
                        rep.routes.len(),
                        rep.prompt_len,
                        rep.new_tokens - 1
                    )));
                }
                Ok(rep)
            })
            .collect()
    }
}

/// A replayed step: the route, and the lookahead prediction recorded for it.
type ReplayedStep = (Route, Option<Vec<u32>>);

/// One row of the routing trace: one token at one MoE layer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StepRecord {
    /// Prompt index within the run.
    pub prompt: u32,
    /// Forward call within the prompt: 0 = prefill, k = k-th decoded token.
    pub step: u32,
    /// Absolute token position.
    pub pos: u32,
    /// Prefill or decode.
    pub phase: Phase,
    /// Decoder layer.
    pub layer: u32,
    /// Selected experts, router order.
    pub experts: Vec<u32>,
    /// Their weights.
    pub weights: Vec<f32>,
    /// Experts the router lookahead predicted for this layer (decode with `lookahead` only).
    pub lookahead: Option<Vec<u32>>,
    /// Per selected expert: was it resident when demanded.
    pub hits: Vec<bool>,
    /// Nanoseconds the engine thread spent loading experts or waiting for them during this step
    /// (demand misses and prefetches; a load that finished on a loader thread before it was
    /// needed costs nothing here).
    pub load_ns: u64,
}

/// Counters of the engine beyond the cache's own.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EngineStats {
    /// Cache statistics (hits, misses, prefetches, resident bytes).
    pub cache: CacheStats,
    /// Expert bytes read from disk.
    pub bytes_read: u64,
    /// Seconds the engine thread spent loading experts or waiting for them.
    pub load_seconds: f64,
    /// Of which during decode steps.
    pub decode_load_seconds: f64,
    /// Checkpoint bytes of the experts resident now.
    pub resident_bytes: u64,
    /// Exposed and hidden load time, demand and prefetch.
    pub loads: LoadStats,
    /// Host→device transfer counters (cumulative since the engine was opened).
    pub transfer: TransferStats,
}

/// Result of [`Engine::generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// New tokens (without the prompt).
    pub tokens: Vec<u32>,
    /// Prefill wall time.
    pub prefill: Duration,
    /// Decode wall time (all decode steps).
    pub decode: Duration,
    /// Prompt length.
    pub prompt_len: usize,
    /// Logits each new token was sampled from (only when asked for).
    pub step_logits: Vec<Vec<f32>>,
}

impl Generation {
    /// Prompt tokens per second.
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_len as f64 / self.prefill.as_secs_f64().max(1e-9)
    }
    /// Generated tokens per second (the first token comes from prefill, so decode runs len-1 steps).
    pub fn decode_tps(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// Token sampling.
#[derive(Debug)]
pub enum Sampler {
    /// Argmax.
    Greedy,
    /// Softmax at a temperature, seeded.
    Temperature {
        /// Temperature (> 0).
        t: f32,
        /// Seeded generator.
        rng: Box<StdRng>,
    },
}

impl Sampler {
    /// Greedy when `temperature` is 0, else seeded sampling.
    pub fn new(temperature: f32, seed: u64) -> Self {
        if temperature <= 0.0 {
            Sampler::Greedy
        } else {
            Sampler::Temperature {
                t: temperature,
                rng: Box::new(StdRng::seed_from_u64(seed)),
            }
        }
    }
    /// Picks the next token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        match self {
            Sampler::Greedy => argmax(logits) as u32,
            Sampler::Temperature { t, rng } => {
                let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let p: Vec<f64> = logits
                    .iter()
                    .map(|&l| (((l - m) / *t) as f64).exp())
                    .collect();
                let mut r = rng.random::<f64>() * p.iter().sum::<f64>();
                for (i, &pi) in p.iter().enumerate() {
                    r -= pi;
                    if r <= 0.0 {
                        return i as u32;
                    }
                }
                (p.len() - 1) as u32
            }
        }
    }
}

/// The lazy-expert engine.
pub struct Engine {
    /// Dense model.
    pub model: Model,
    /// Expert handles and the miss path.
    pub store: Arc<ExpertStore>,
    loader: Loader,
    core: CacheCore,
    payload: Vec<Vec<Option<Arc<ExpertWeights>>>>,
    cfg: EngineConfig,
    trace: Vec<StepRecord>,
    /// Engine-thread load time: prefill, decode.
    load_time: [Duration; 2],
    prompt: u32,
    replay: Option<Replay>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model.spec.model_type)
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl Engine {
    /// Opens a checkpoint directory: reads the config, validates every tensor header, loads the
    /// dense weights and builds expert handles (no expert bytes are read).
    pub fn open(dir: &Path, device: Device, cfg: EngineConfig) -> Result<Self> {
        let spec = config::load(dir)?;
        Self::open_with_spec(dir, spec, device, cfg)
    }

    /// As [`Engine::open`] with an already-resolved spec.
    pub fn open_with_spec(
        dir: &Path,
        spec: ModelSpec,
        device: Device,
        cfg: EngineConfig,
    ) -> Result<Self> {
        if let Some(reason) = &spec.unsupported {
            return Err(Error::Input(format!("{}: {reason}", dir.display())));
        }
        if cfg.policy.needs_future() {
            return Err(Error::Input(format!(
                "policy `{}` needs the future of the trace: use it with `harness simulate` on a recorded trace, not in the live engine",
                cfg.policy
            )));
        }
        let ck = Arc::new(Checkpoint::open(dir)?);
        let prefix = layout::detect_prefix(&ck)?;
        let experts = layout::detect_experts(&ck, &spec, &prefix)?;
        let store = Arc::new(ExpertStore::new(
            ck.clone(),
            &spec,
            &prefix,
            experts,
            device.clone(),
        )?);
        check_budget(&spec, &store, &cfg)?;
        store.set_gpu_packed(cfg.gpu_packed);
        let model = Model::load(&ck, &spec, &prefix, &device)?;
        // On a GPU the cache holds MLX-quantized experts packed (their checkpoint bytes) and
        // anything else as f32 (4 bytes per weight); refuse budgets that cannot fit.
        if let Some((free, _)) = gpu_memory(&device) {
            let first = ExpertKey {
                layer: spec.moe.moe_layers[0] as u32,
                expert: 0,
            };
            let (per_dev, form) = if store.gpu_packed() {
                (store.expert_bytes(first) + 9 * 256, "packed")
            } else {
                (spec.expert_elements() * 4, "as f32")
            };
            let layers = spec.num_moe_layers() as u64;
            let all = spec.moe.num_experts as u64 * layers;
            let per = store.expert_bytes(first).max(1);
            let slots = match cfg.budget {
                Budget::SlotsPerLayer(n) => (n as u64 * layers).min(all),
                Budget::BytesPerLayer(b) => (b / per * layers).min(all),
                Budget::BytesGlobal(b) => (b / per).min(all),
                Budget::Unlimited => all,
            };
            if slots * per_dev > free {
                return Err(Error::Input(format!(
                    "budget {} holds {slots} experts, {:.1} GB {form} on the GPU, but only {:.1} GB of GPU memory is free (lower --capacity / --budget)",
                    cfg.budget,
                    (slots * per_dev) as f64 / 1e9,
                    free as f64 / 1e9
                )));
            }
        }
        let moe_layers: Vec<u32> = spec.moe.moe_layers.iter().map(|&l| l as u32).collect();
        let core = CacheCore::new(&cfg.policy, cfg.budget, &moe_layers)?;
        let loader = Loader::new(store.clone(), load_threads(&spec, &device, &cfg))?;
        let payload = (0..spec.num_layers)
            .map(|l| {
                if spec.is_moe_layer(l) {
                    vec![None; spec.moe.num_experts]
                } else {
                    Vec::new()
                }
            })
            .collect();
        Ok(Engine {
            model,
            store,
            loader,
            core,
            payload,
            cfg,
            trace: Vec::new(),
            load_time: [Duration::ZERO; 2],
            prompt: 0,
            replay: None,
        })
    }

    /// The resolved model spec.
    pub fn spec(&self) -> &ModelSpec {
        &self.model.spec
    }

    /// Expert loader threads in use (0: inline).
    pub fn load_threads(&self) -> usize {
        self.loader.threads()
    }

    /// The engine settings.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Replaces the cache configuration (policy, budget, miss mode, tracing): the cache restarts
    /// empty. The dense model stays loaded.
    pub fn reconfigure(&mut self, cfg: EngineConfig) -> Result<()> {
        self.reconfigure_with(cfg, None)
    }

    /// As [`Engine::reconfigure`], with a frequency profile for `static-N` policies.
    pub fn reconfigure_with(
        &mut self,
        cfg: EngineConfig,
        profile: Option<FrequencyProfile>,
    ) -> Result<()> {
        if cfg.policy.needs_future() {
            return Err(Error::Input(format!(
                "policy `{}` needs the future of the trace: use `harness simulate`",
                cfg.policy
            )));
        }
        check_budget(&self.model.spec, &self.store, &cfg)?;
        let moe_layers: Vec<u32> = self
            .model
            .spec
            .moe
            .moe_layers
            .iter()
            .map(|&l| l as u32)
            .collect();
        self.core = CacheCore::with_options(
            &cfg.policy,
            cfg.budget,
            &moe_layers,
            CacheOptions {
                classic: false,
                profile,
            },
        )?;
        self.store.set_gpu_packed(cfg.gpu_packed);
        let threads = load_threads(&self.model.spec, self.model.device(), &cfg);
        if threads != self.loader.threads() {
            self.loader = Loader::new(self.store.clone(), threads)?;
        }
        self.cfg = cfg;
        self.reset_cache_contents();
        Ok(())
    }

    /// Checkpoint bytes of all routed experts.
    pub fn total_expert_bytes(&self) -> u64 {
        let spec = &self.model.spec;
        spec.moe
            .moe_layers
            .iter()
            .flat_map(|&l| {
                (0..spec.moe.num_experts as u32).map(move |e| ExpertKey {
                    layer: l as u32,
                    expert: e,
                })
            })
            .map(|k| self.store.expert_bytes(k))
            .sum()
    }

    /// Empties the cache and zeroes its counters (the trace is kept).
    pub fn reset_cache(&mut self) {
        self.core.reset();
        self.reset_cache_contents();
    }

    fn reset_cache_contents(&mut self) {
        self.payload.iter_mut().flatten().for_each(|p| *p = None);
        self.loader.clear();
        self.loader.reset_stats();
        self.load_time = [Duration::ZERO; 2];
    }

    /// Replays recorded routing (see [`Replay`]) instead of the router's, or stops (`None`).
    pub fn set_replay(&mut self, replay: Option<Replay>) {
        self.replay = replay;
    }

    /// Sets the prompt index written into trace rows.
    pub fn set_prompt(&mut self, prompt: u32) {
        self.prompt = prompt;
    }

    /// Takes the recorded trace.
    pub fn take_trace(&mut self) -> Vec<StepRecord> {
        std::mem::take(&mut self.trace)
    }

    /// Current counters.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            cache: self.core.stats().clone(),
            bytes_read: self.store.bytes_read(),
            load_seconds: (self.load_time[0] + self.load_time[1]).as_secs_f64(),
            decode_load_seconds: self.load_time[1].as_secs_f64(),
            resident_bytes: self.core.resident_bytes(),
            loads: self.loader.stats(),
            transfer: self.store.transfer_stats(),
        }
    }

    /// One forward call over `tokens` after what `kv` holds.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        kv: &mut KvCache,
        step: u32,
        last_only: bool,
    ) -> Result<(Vec<Vec<f32>>, Routing)> {
        let phase = if step == 0 {
            Phase::Prefill
        } else {
            Phase::Decode
        };
        let Engine {
            model,
            store,
            loader,
            core,
            payload,
            cfg,
            trace,
            load_time,
            prompt,
            replay,
        } = self;
        let mut access = Access {
            store,
            loader,
            core,
            payload,
            cfg,
            trace: cfg.record_trace.then_some(trace),
            load_time,
            prompt: *prompt,
            step,
            phase,
            cur: None,
            pending: Vec::new(),
            replay: replay.as_ref(),
        };
        let (logits, routing) = model.forward(tokens, kv, &mut access, last_only)?;
        Ok((rows(&logits)?, routing))
    }

    /// Full-sequence prefill from an empty KV cache: logits `[T][vocab]` and routing.
    pub fn logits(&mut self, tokens: &[u32]) -> Result<(Vec<Vec<f32>>, Routing)> {
        let mut kv = KvCache::default();
        self.forward(tokens, &mut kv, 0, false)
    }

    /// Prefill then decode up to `max_new` tokens (stopping early at any of `stop`).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        sampler: &mut Sampler,
        stop: &[u32],
    ) -> Result<Generation> {
        self.generate_with(prompt, max_new, sampler, stop, false)
    }

    /// As [`Engine::generate`]; with `keep_logits` the sampled-from logits of every step are kept.
    pub fn generate_with(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        sampler: &mut Sampler,
        stop: &[u32],
        keep_logits: bool,
    ) -> Result<Generation> {
        let mut kv = KvCache::default();
        let t0 = Instant::now();
        let mut out = Vec::new();
        if max_new == 0 {
            return Ok(Generation {
                tokens: out,
                prefill: Duration::ZERO,
                decode: Duration::ZERO,
                prompt_len: prompt.len(),
                step_logits: Vec::new(),
            });
        }
        let mut kept = Vec::new();
        let (mut logits, _) = self.forward(prompt, &mut kv, 0, true)?;
        let mut next = sampler.sample(&logits[0]);
        let prefill = t0.elapsed();
        out.push(next);
        if keep_logits {
            kept.push(logits.swap_remove(0));
        }
        let t1 = Instant::now();
        let mut step = 1;
        while out.len() < max_new && !stop.contains(&next) {
            let (mut logits, _) = self.forward(&[next], &mut kv, step, true)?;
            next = sampler.sample(&logits[0]);
            out.push(next);
            if keep_logits {
                kept.push(logits.swap_remove(0));
            }
            step += 1;
        }
        Ok(Generation {
            tokens: out,
            prefill,
            decode: t1.elapsed(),
            prompt_len: prompt.len(),
            step_logits: kept,
        })
    }
}

/// Rejects budgets below one token's working set (top-k experts of one layer).
fn check_budget(spec: &ModelSpec, store: &ExpertStore, cfg: &EngineConfig) -> Result<()> {
    let budget = &cfg.budget;
    let k = spec.moe.top_k;
    // Pinned hot experts take slots for good: a step must still fit its top-k beside them.
    if let (crate::experts::policies::PolicySpec::Static { n }, Budget::SlotsPerLayer(c)) =
        (cfg.policy.eviction(), budget)
    {
        if *c < n + k {
            return Err(Error::Input(format!(
                "policy `static-{n}` at capacity {c}: {n} pinned experts plus one token's top-{k} need at least {} slots per layer",
                n + k
            )));
        }
    }
    let largest = spec
        .moe
        .moe_layers
        .iter()
        .map(|&l| {
            let mut sizes: Vec<u64> = (0..spec.moe.num_experts as u32)
                .map(|e| {
                    store.expert_bytes(ExpertKey {
                        layer: l as u32,
                        expert: e,
                    })
                })
                .collect();
            sizes.sort_unstable_by(|a, b| b.cmp(a));
            sizes[..k].iter().sum::<u64>()
        })
        .max()
        .unwrap_or(0);
    match *budget {
        Budget::SlotsPerLayer(n) if n < k => Err(Error::Input(format!(
            "capacity {n} is below top-k = {k}: one token's experts of a layer could not all be resident (smallest legal capacity: {k})"
        ))),
        Budget::BytesPerLayer(b) | Budget::BytesGlobal(b) if b < largest => Err(Error::Input(format!(
            "budget {b} bytes is below one token's working set: {k} experts of a layer need {largest} bytes"
        ))),
        _ => Ok(()),
    }
}

/// The engine side of [`ExpertAccess`]: resolves experts through the cache, loading misses.
struct Access<'a> {
    store: &'a ExpertStore,
    loader: &'a mut Loader,
    core: &'a mut CacheCore,
    payload: &'a mut Vec<Vec<Option<Arc<ExpertWeights>>>>,
    cfg: &'a EngineConfig,
    trace: Option<&'a mut Vec<StepRecord>>,
    load_time: &'a mut [Duration; 2],
    prompt: u32,
    step: u32,
    phase: Phase,
    cur: Option<Current>,
    /// Lookahead predictions made for (pos, layer), waiting for that step.
    pending: Vec<(u32, u32, Vec<u32>)>,
    replay: Option<&'a Replay>,
}

struct Current {
    layer: u32,
    pos: u32,
    hits: Vec<bool>,
    /// Experts of this step that missed.
    missed: Vec<u32>,
    load_ns: u64,
}

impl Current {
    fn new(layer: u32, pos: u32) -> Self {
        Current {
            layer,
            pos,
            hits: Vec::new(),
            missed: Vec::new(),
            load_ns: 0,
        }
    }
}

impl Access<'_> {
    fn evict(&mut self, keys: &[ExpertKey]) {
        for &k in keys {
            self.payload[k.layer as usize][k.expert as usize] = None;
            self.loader.cancel(k);
        }
    }

    /// Charges `ns` of engine-thread load time to the current step.
    fn charge(&mut self, ns: u64) {
        self.load_time[usize::from(self.phase == Phase::Decode)] += Duration::from_nanos(ns);
        if let Some(c) = self.cur.as_mut() {
            c.load_ns += ns;
        }
    }

    /// Starts loading `key` (inline or on a loader thread).
    fn submit(&mut self, key: ExpertKey, prefetch: bool) -> Result<()> {
        if self.payload[key.layer as usize][key.expert as usize].is_none() && !self.loader.has(key)
        {
            let ns = self.loader.submit(key, prefetch)?;
            self.charge(ns);
        }
        Ok(())
    }
}

impl ExpertAccess for Access<'_> {
    fn begin_step(&mut self, layer: u32, pos: usize, route: &Route) -> Result<()> {
        self.core.begin_step(layer, self.phase, &route.experts)?;
        self.cur = Some(Current::new(layer, pos as u32));
        // Every access of the step is decided up front, in route order (the cache sees exactly
        // what it would see one fetch at a time), so that all misses load in parallel.
        for &expert in &route.experts {
            let key = ExpertKey { layer, expert };
            let out = self
                .core
                .access(key, self.store.expert_bytes(key), u64::MAX)?;
            self.evict(&out.evicted);
            let c = self.cur.as_mut().expect("set above");
            c.hits.push(out.hit);
            if !out.hit {
                c.missed.push(expert);
                self.submit(key, false)?;
            }
        }
        Ok(())
    }

    fn fetch(&mut self, key: ExpertKey) -> Result<Option<Arc<ExpertWeights>>> {
        let missed = self
            .cur
            .as_ref()
            .is_some_and(|c| c.missed.contains(&key.expert));
        if missed && self.cfg.miss == MissMode::Skip {
            // Run without it; its load goes on and is claimed when it is next used.
            return Ok(None);
        }
        let slot = &mut self.payload[key.layer as usize][key.expert as usize];
        if let Some(w) = slot {
            return Ok(Some(w.clone()));
        }
        match self.loader.claim(key) {
            Some(r) => {
                let (w, waited) = r?;
                self.payload[key.layer as usize][key.expert as usize] = Some(w.clone());
                self.charge(waited);
                Ok(Some(w))
            }
            None => Err(Error::Input(format!(
                "internal: cache reports {key:?} resident but holds no tensors"
            ))),
        }
    }

    fn end_step(&mut self, route: &Route, prediction: Option<(u32, &[u32])>) -> Result<()> {
        let cur = self.cur.take().expect("end_step after begin_step");
        // Prefetch the predicted experts of the next MoE layer (decode only), before the step's
        // pins are released, as the simulator replays it.
        if let (Some((next_layer, experts)), Phase::Decode) = (prediction, self.phase) {
            self.cur = Some(Current::new(cur.layer, cur.pos));
            for &e in experts {
                let key = ExpertKey {
                    layer: next_layer,
                    expert: e,
                };
                let out = self
                    .core
                    .prefetch(key, self.store.expert_bytes(key), u64::MAX);
                self.evict(&out.evicted);
                if out.issued {
                    self.submit(key, true)?;
                }
            }
            let extra = self.cur.take().map_or(0, |c| c.load_ns);
            self.pending.push((cur.pos, next_layer, experts.to_vec()));
            self.record(cur, route, extra);
        } else {
            self.record(cur, route, 0);
        }
        self.core.end_step();
        Ok(())
    }

    fn wants_lookahead(&self) -> bool {
        self.phase == Phase::Decode && self.cfg.policy.prefetch()
    }

    fn replayed_routes(&self, layer: u32, pos0: usize, n: usize) -> Result<Option<Vec<Route>>> {
        let Some(rep) = self.replay else {
            return Ok(None);
        };
        (pos0..pos0 + n)
            .map(|p| {
                rep.routes
                    .get(&(p as u32, layer))
                    .map(|(r, _)| r.clone())
                    .ok_or_else(|| {
                        Error::Input(format!(
                            "replayed trace has no route for position {p} at layer {layer}"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn replayed_lookahead(&self, layer: u32, pos0: usize, n: usize) -> Option<Vec<Route>> {
        let rep = self.replay?;
        (pos0..pos0 + n)
            .map(|p| {
                let experts = rep.routes.get(&(p as u32, layer))?.1.clone()?;
                let w = 1.0 / experts.len().max(1) as f32;
                Some(Route {
                    weights: vec![w; experts.len()],
                    experts,
                })
            })
            .collect()
    }
}

impl Access<'_> {
    fn record(&mut self, cur: Current, route: &Route, extra_ns: u64) {
        let lookahead = self
            .pending
            .iter()
            .position(|(p, l, _)| *p == cur.pos && *l == cur.layer)
            .map(|i| self.pending.swap_remove(i).2);
        if let Some(trace) = self.trace.as_mut() {
            trace.push(StepRecord {
                prompt: self.prompt,
                step: self.step,
                pos: cur.pos,
                phase: self.phase,
                layer: cur.layer,
                experts: route.experts.clone(),
                weights: route.weights.clone(),
                lookahead,
                hits: cur.hits,
                load_ns: cur.load_ns + extra_ns,
            });
        }
    }
}

/// Loader threads for `cfg` on `device` (see [`EngineConfig::load_threads`]).
fn load_threads(spec: &ModelSpec, device: &Device, cfg: &EngineConfig) -> usize {
    cfg.load_threads.unwrap_or(if device.is_cpu() {
        0
    } else {
        spec.moe.top_k.min(8)
    })
}

/// The compute device for a backend name (`cpu`, `cuda`, `metal`), with a clear error when this
/// binary was built without that backend or the machine has no such device.
pub fn device(backend: &str) -> Result<Device> {
    let built = |feature: &str| {
        Error::Input(format!(
            "backend `{backend}`: this harness was built without `--features {feature}` (rebuild with `cargo build --release --features {feature}`)"
        ))
    };
    match backend {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            let dev = Device::new_cuda(0).map_err(|e| match e {
                candle_core::Error::NotCompiledWithCudaSupport => built("cuda"),
                e => Error::Input(format!("backend `cuda`: no usable CUDA device: {e}")),
            })?;
            crate::experts::upload::keep_pool_memory(&dev);
            Ok(dev)
        }
        "metal" => Device::new_metal(0).map_err(|e| match e {
            candle_core::Error::NotCompiledWithMetalSupport => built("metal"),
            e => Error::Input(format!("backend `metal`: no usable Metal device: {e}")),
        }),
        other => Err(Error::Input(format!(
            "unknown backend `{other}` (known: cpu, cuda, metal)"
        ))),
    }
}

/// Free and total memory of the current CUDA device, when this is a CUDA build on a GPU.
pub fn gpu_memory(dev: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        return candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
            .ok()
            .map(|(f, t)| (f as u64, t as u64));
    }
    let _ = dev;
    None
}
