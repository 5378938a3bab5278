//! The lazy-expert engine: a [`Model`] with resident dense weights, an [`ExpertStore`] that reads
//! experts on demand, and the bounded cache ([`CacheCore`] deciding, this module holding the
//! materialised tensors). It runs prefill and decode, records the routing trace, and counts
//! hits, misses, bytes read and load time.

mod access;
mod device;
mod forward;
mod logits;
mod replay;
mod sampler;

pub use device::{describe, gpu_memory, Backend};
pub use replay::Replay;
pub use sampler::Sampler;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::config::ModelSpec;
use crate::error::{Error, Result};
use crate::experts::budget::Budget;
use crate::experts::cache::{CacheCore, CacheOptions, CacheStats};
use crate::experts::loader::{LoadStats, Loader};
use crate::experts::policies::FrequencyProfile;
use crate::experts::policies::PolicySpec;
use crate::experts::store::{ExpertStore, ExpertWeights, OpenCheckpoint};
use crate::experts::upload::{GpuExperts, Staging, TransferStats};
use crate::experts::ExpertKey;
use crate::models::layers::rows;
use crate::models::{GpuAttention, GpuDense, GpuGraph, GpuRouting, KvCache, Model, Routing};
use crate::trace::TraceRow;
use crate::weights::kernels::{self, Kernels};
use crate::weights::storage::{DeviceModel, IoMode};
use crate::weights::IoSetup;

pub use crate::experts::miss::MissMode;

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
    /// CPU through the page cache, `min(top_k, 4)` on the CPU with `direct`/`cold` reads and
    /// `min(top_k, 8)` on a GPU (parallel misses, asynchronous lookahead prefetch).
    pub load_threads: Option<usize>,
    /// Resident form of MLX-quantized experts on CUDA (packed, fused per token, by default).
    pub gpu_experts: GpuExperts,
    /// Attention kernels of decode tokens on CUDA (fused by default).
    pub gpu_attention: GpuAttention,
    /// Where decode tokens are routed on CUDA (on the device where every expert is resident,
    /// by default).
    pub gpu_routing: GpuRouting,
    /// Decode steps on CUDA from a captured CUDA graph where the step's work is all on the
    /// device (auto, the default) or launch by launch.
    pub gpu_graph: GpuGraph,
    /// MLX-quantized dense weights on CUDA: packed (default) or f32. Fixed when the engine
    /// opens.
    pub gpu_dense: GpuDense,
    /// On the CPU, dense weights are read in place from the memory map (default) or copied into
    /// memory (the comparison `harness bench --dense copied` makes). Fixed when the engine opens.
    pub dense: DenseForm,
    /// How expert misses read the shards.
    pub io: IoMode,
    /// The storage device misses are slowed down to, if any.
    pub storage: Option<DeviceModel>,
    /// How CUDA misses reach the copy engine (`auto`: straight from the page-locked shard
    /// mappings where that applies, else pinned staging).
    pub staging: Staging,
    /// CPU compute threads for the products (`None`: every core). Results are bit-identical
    /// for any count.
    pub threads: Option<usize>,
    /// Kernel kind of the CPU's packed 4-bit products.
    pub kernels: Kernels,
    /// The lower-precision copy of the same model that `low-bit` misses read (e.g. an MLX
    /// 2-bit checkpoint of it).
    pub low_bit: Option<std::path::PathBuf>,
}

named_enum! {
    /// Where the CPU reads dense weights from.
    pub enum DenseForm {
        /// In place in the checkpoint's memory map (held once, as file-backed pages).
        #[default]
        Mapped = "mapped",
        /// Copied into the heap at load (the mapped pages released).
        Copied = "copied",
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            budget: Budget::Unlimited,
            policy: PolicySpec::parse("lru").expect("lru is a policy"),
            miss: MissMode::Load,
            record_trace: false,
            load_threads: None,
            gpu_experts: GpuExperts::Fused,
            gpu_attention: GpuAttention::Fused,
            gpu_routing: GpuRouting::Device,
            gpu_graph: GpuGraph::Auto,
            gpu_dense: GpuDense::Packed,
            dense: DenseForm::Mapped,
            io: IoMode::PageCache,
            storage: None,
            staging: Staging::Auto,
            threads: None,
            kernels: Kernels::Exact,
            low_bit: None,
        }
    }
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
    /// Bytes read from the low-bit copy by `low-bit` misses (cumulative since it was opened).
    pub low_bit_bytes: u64,
    /// Prompt steps (token × MoE layer) whose routed experts ran expert by expert over the
    /// prompt's tokens (CPU prefill where the budget holds every expert of the layer).
    pub prompt_steps_by_expert: u64,
    /// Where gated decode steps' gates spent their time (process-wide, cumulative; CUDA).
    pub gates: crate::models::fallback::GateTimes,
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
    /// Bytes of the KV cache this sequence allocated.
    pub kv_bytes: u64,
    /// Bytes the OS read from storage during the decode steps (`/proc/self/io`, all threads of
    /// this process; `None` where the OS does not say).
    pub decode_device_bytes: Option<u64>,
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
    trace: Vec<TraceRow>,
    /// Engine-thread load time: prefill, decode.
    load_time: [Duration; 2],
    /// Prompt steps run expert by expert ([`EngineStats::prompt_steps_by_expert`]).
    by_expert: u64,
    prompt: u32,
    replay: Option<Replay>,
    /// Checkpoint bytes of the dense weights.
    dense_bytes: u64,
    /// The miss path's read setup.
    io: IoSetup,
    /// Kernels and compute threads every forward call runs with.
    compute: kernels::Context,
    /// The low-bit copy's store, with the directory it was opened from.
    low: Option<(std::path::PathBuf, Arc<ExpertStore>)>,
    /// On a GPU, the last generation's cache buffers, reused by the next that fits
    /// ([`KvCache::reuse`]): its decode steps then replay the CUDA graph captured on them.
    spare_kv: Option<KvCache>,
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
        let spec = crate::models::load_spec(dir)?;
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
        let open = OpenCheckpoint::open(dir, &spec, device.clone())?;
        let dense_bytes = open.dense_bytes(&spec);
        let (ck, prefix, store) = (open.ck, open.prefix, Arc::new(open.store));
        let io = ck.set_io(cfg.io, cfg.storage);
        check_budget(&spec, &store, &cfg)?;
        store.set_gpu_experts(cfg.gpu_experts);
        let tiles = device::tiles_for(&device, cfg.kernels);
        let model = Model::load(
            &ck,
            &spec,
            &prefix,
            store.layout(),
            &device,
            cfg.dense == DenseForm::Mapped,
            cfg.gpu_dense == GpuDense::Packed,
            tiles,
        )?;
        store.set_host_tiles(tiles);
        model.set_gpu_attention(cfg.gpu_attention);
        model.set_gpu_routing(cfg.gpu_routing);
        model.set_gpu_graph(cfg.gpu_graph);
        if !device.is_cpu() {
            // The dense weights now live on the device: the host never reads them again.
            ck.release_all();
        }
        store.apply_staging(cfg.staging)?;
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
        let low = open_low_bit(&spec, &device, &cfg, None)?;
        let moe_layers: Vec<u32> = spec.moe.moe_layers.iter().map(|&l| l as u32).collect();
        let core = CacheCore::with_options(
            &cfg.policy,
            cfg.budget,
            &moe_layers,
            cache_options(&spec, &store, &cfg, None),
        )?;
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
        let compute = compute_context(&device, &cfg)?;
        Ok(Engine {
            model,
            store,
            loader,
            core,
            payload,
            cfg,
            trace: Vec::new(),
            load_time: [Duration::ZERO; 2],
            by_expert: 0,
            prompt: 0,
            replay: None,
            dense_bytes,
            io,
            compute,
            low,
            spare_kv: None,
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

    /// CPU compute threads of the products (1 on a GPU, whose kernels do not use them).
    pub fn compute_threads(&self) -> usize {
        self.compute.threads()
    }

    /// What the products ran with, as reports name it: the kernel kind and the CPU's SIMD form
    /// (`int8/avx2`, `int8x2/avx512-vnni`, `exact/neon`), or `gpu` on a GPU.
    pub fn kernels_label(&self) -> String {
        if self.model.device().is_cpu() {
            device::cpu_kernels_label(self.compute.kernels, self.model.tiled_matrices() > 0)
        } else {
            // Only MLA layers have fused decode kernels: elsewhere the setting has no effect,
            // and the label says what ran.
            let mla = if self.model.has_mla() {
                ""
            } else {
                " (no MLA layer: tensor ops)"
            };
            // Tokens routed on the device so far (only where every expert is resident).
            let routed = crate::models::fallback::routed_on_device_count();
            let mut label = format!(
                "gpu/experts {}, attention {}{mla}, dense {}, routing {} ({routed} tokens on \
                 the device)",
                self.cfg.gpu_experts,
                self.cfg.gpu_attention,
                self.cfg.gpu_dense,
                self.cfg.gpu_routing
            );
            // How those routings were issued (a graph's replays issue nothing).
            let (one, split) = crate::models::fallback::router_counts();
            label += &format!(", routers issued in one launch {one}, as product + route {split}");
            // Decode steps captured into CUDA graphs and tokens run from them.
            let g = crate::models::fallback::graph_counts();
            label += &format!(
                ", graph {} ({} captures, {} tokens from a graph, {} of them queued ahead, {} \
                 with gates, {} of their {} misses copied by the gates)",
                self.cfg.gpu_graph,
                g.captures,
                g.tokens,
                g.ahead,
                g.gated,
                g.gate_copies,
                g.gated_misses
            );
            if let Some(ms) = g.gpu_ms {
                // Against the token's whole time, the host's share between launches.
                label += &format!(" taking {ms:.3} ms of GPU time each");
            }
            // Work that left the fused kernels in this process so far (models::fallback).
            let (e, a) = crate::models::fallback::counts();
            if e + a > 0 {
                label += &format!("; fell back: experts of {e} tokens, attention of {a} steps");
            }
            label
        }
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
        let low = open_low_bit(&self.model.spec, self.model.device(), &cfg, self.low.take())?;
        self.low = low;
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
            cache_options(&self.model.spec, &self.store, &cfg, profile),
        )?;
        self.store.set_gpu_experts(cfg.gpu_experts);
        self.model.set_gpu_attention(cfg.gpu_attention);
        self.model.set_gpu_routing(cfg.gpu_routing);
        self.model.set_gpu_graph(cfg.gpu_graph);
        self.io = self.store.checkpoint().set_io(cfg.io, cfg.storage);
        self.store.apply_staging(cfg.staging)?;
        let threads = load_threads(&self.model.spec, self.model.device(), &cfg);
        if threads != self.loader.threads() {
            self.loader = Loader::new(self.store.clone(), threads)?;
        }
        if (cfg.threads, cfg.kernels) != (self.cfg.threads, self.cfg.kernels) {
            self.compute = compute_context(self.model.device(), &cfg)?;
        }
        // Experts loaded from now on take the new kind's layout (the dense ones keep theirs).
        self.store
            .set_host_tiles(device::tiles_for(self.model.device(), cfg.kernels));
        // Fixed when the engine opened: the loaded weights keep their form.
        let (dense, gpu_dense) = (self.cfg.dense, self.cfg.gpu_dense);
        self.cfg = EngineConfig {
            dense,
            gpu_dense,
            ..cfg
        };
        self.reset_cache_contents();
        Ok(())
    }

    /// How misses read the shards now (the mode asked for, the one in effect, the device
    /// emulated).
    pub fn io(&self) -> &IoSetup {
        &self.io
    }

    /// Checkpoint bytes of the dense weights the model uses.
    pub fn dense_bytes(&self) -> u64 {
        self.dense_bytes
    }

    /// Checkpoint bytes of all routed experts.
    pub fn total_expert_bytes(&self) -> u64 {
        self.store.total_bytes()
    }

    /// Empties the cache and zeroes its counters (the trace is kept).
    pub fn reset_cache(&mut self) {
        self.core.reset();
        self.reset_cache_contents();
    }

    fn reset_cache_contents(&mut self) {
        self.payload.iter_mut().flatten().for_each(|p| *p = None);
        self.loader.settle();
        self.loader.clear();
        self.loader.reset_stats();
        self.load_time = [Duration::ZERO; 2];
        self.by_expert = 0;
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
    pub fn take_trace(&mut self) -> Vec<TraceRow> {
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
            low_bit_bytes: self.low.as_ref().map_or(0, |(_, s)| s.bytes_read()),
            prompt_steps_by_expert: self.by_expert,
            gates: crate::models::fallback::gate_times_so_far(),
        }
    }

    /// Refuses a sequence of `prompt` tokens plus `new_tokens` generated ones that the model is
    /// not built for (beyond `max_position_embeddings`) or whose prefill would not fit in the
    /// memory this machine has available, instead of running into an allocation abort.
    pub fn check_sequence(&self, prompt: usize, new_tokens: usize) -> Result<()> {
        let spec = &self.model.spec;
        let total = prompt + new_tokens.saturating_sub(1);
        if let Some(max) = spec.max_position_embeddings {
            if total > max {
                return Err(Error::Input(format!(
                    "{prompt} prompt tokens + {new_tokens} new tokens exceed the model's context of {max} tokens (max_position_embeddings)"
                )));
            }
        }
        let need = spec
            .sequence_bytes(0, prompt)
            .max(spec.sequence_bytes(total, 1));
        if let Some(avail) = available_memory() {
            if need > avail {
                return Err(Error::Input(format!(
                    "a {prompt}-token prompt needs about {:.1} GB for attention and the KV cache, more than the {:.1} GB of memory available",
                    need as f64 / 1e9,
                    avail as f64 / 1e9
                )));
            }
        }
        Ok(())
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
        self.check_sequence(prompt.len(), max_new)?;
        let tokens = prompt.len() + max_new;
        let mut kv = match self.spare_kv.take() {
            Some(kv) => kv.reuse(tokens),
            None => KvCache::with_capacity(tokens),
        };
        let t0 = Instant::now();
        let mut out = Vec::new();
        if max_new == 0 {
            return Ok(Generation {
                tokens: out,
                prefill: Duration::ZERO,
                decode: Duration::ZERO,
                prompt_len: prompt.len(),
                step_logits: Vec::new(),
                kv_bytes: 0,
                decode_device_bytes: Some(0),
            });
        }
        let mut kept = Vec::new();
        let (mut next, logits) =
            self.next_token(prompt, &mut kv, 0, sampler, keep_logits, max_new > 1)?;
        let prefill = t0.elapsed();
        out.push(next);
        kept.extend(logits);
        let dev0 = crate::weights::storage::device_read_bytes();
        let t1 = Instant::now();
        let mut step = 1;
        while out.len() < max_new && !stop.contains(&next) {
            let logits;
            let more = out.len() + 1 < max_new;
            (next, logits) = self.next_token(&[next], &mut kv, step, sampler, keep_logits, more)?;
            out.push(next);
            kept.extend(logits);
            step += 1;
        }
        let decode = t1.elapsed();
        // Prefetches for steps that will not come are still reading: let them finish, outside
        // the timed decode, so that the bytes read by this generation are all counted here.
        self.loader.settle();
        let decode_device_bytes = dev0
            .zip(crate::weights::storage::device_read_bytes())
            .map(|(b, a)| a.saturating_sub(b));
        let kv_bytes = kv.bytes();
        if self.model.device().is_cuda() {
            self.spare_kv = Some(kv);
        }
        Ok(Generation {
            tokens: out,
            prefill,
            decode,
            decode_device_bytes,
            prompt_len: prompt.len(),
            step_logits: kept,
            kv_bytes,
        })
    }
}

/// The cache options of an engine running `spec` with `cfg`.
fn cache_options(
    spec: &ModelSpec,
    store: &ExpertStore,
    cfg: &EngineConfig,
    profile: Option<FrequencyProfile>,
) -> CacheOptions {
    let first = ExpertKey {
        layer: spec.moe.moe_layers[0] as u32,
        expert: 0,
    };
    CacheOptions {
        classic: false,
        profile,
        working_set: spec.moe.top_k,
        miss: cfg.miss,
        unit_bytes: store.expert_bytes(first),
    }
}

/// Checks the miss mode against the device and opens (or keeps) the low-bit copy that
/// `low-bit` misses read: the same model (hidden size, expert count and shapes, MoE layers) in
/// another precision.
fn open_low_bit(
    spec: &ModelSpec,
    device: &Device,
    cfg: &EngineConfig,
    current: Option<(std::path::PathBuf, Arc<ExpertStore>)>,
) -> Result<Option<(std::path::PathBuf, Arc<ExpertStore>)>> {
    if let Some(why) = cfg.miss.refusal(device.is_cpu(), cfg.low_bit.is_some()) {
        return Err(Error::Input(why.into()));
    }
    let (MissMode::LowBit, Some(dir)) = (cfg.miss, &cfg.low_bit) else {
        return Ok(None);
    };
    if let Some((d, s)) = current {
        if &d == dir {
            return Ok(Some((d, s)));
        }
    }
    let low_spec = crate::models::load_spec(dir)?;
    let config = dir.join("config.json");
    let mismatch = |what: &str, a: String, b: String| {
        Error::format(
            &config,
            format!("low-bit checkpoint: {what} is {b}, but the model's is {a}; it must be the same model in another precision"),
        )
    };
    let shape = |s: &ModelSpec| {
        [
            s.hidden_size.to_string(),
            s.moe.num_experts.to_string(),
            s.moe.intermediate_size.to_string(),
            format!("{:?}", s.moe.moe_layers),
        ]
    };
    let names = [
        "hidden_size",
        "the routed expert count",
        "the expert intermediate size",
        "the MoE layers",
    ];
    for ((what, a), b) in names.iter().zip(shape(spec)).zip(shape(&low_spec)) {
        if a != b {
            return Err(mismatch(what, a, b));
        }
    }
    let open = OpenCheckpoint::open(dir, &low_spec, device.clone())?;
    Ok(Some((dir.clone(), Arc::new(open.store))))
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

/// Loader threads for `cfg` on `device` (see [`EngineConfig::load_threads`]).
/// The compute context of `cfg` on `device` (on a GPU the products run there: one host thread
/// drives them).
fn compute_context(device: &Device, cfg: &EngineConfig) -> Result<kernels::Context> {
    let threads = if device.is_cpu() {
        cfg.threads
    } else {
        Some(1)
    };
    kernels::Context::new(cfg.kernels, threads)
}

/// The loader threads `cfg` asks for, or the default measured per device and I/O mode
/// (docs/performance.md, loader defaults): on the CPU, inline through the page cache (a miss
/// is a memory copy; handing it to a thread costs more than it hides) and `min(top_k, 4)`
/// threads when misses go to storage (`direct`, `cold`: parallel reads hide their latency);
/// `min(top_k, 8)` on a GPU.
fn load_threads(spec: &ModelSpec, device: &Device, cfg: &EngineConfig) -> usize {
    cfg.load_threads.unwrap_or(if !device.is_cpu() {
        spec.moe.top_k.min(8)
    } else if cfg.io == IoMode::PageCache {
        0
    } else {
        spec.moe.top_k.min(4)
    })
}

/// `MemAvailable` of `/proc/meminfo` in bytes (Linux); `None` elsewhere.
pub fn available_memory() -> Option<u64> {
    crate::weights::storage::meminfo_bytes("MemAvailable")
}
