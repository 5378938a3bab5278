//! `harness bench`: speed of the lazy-expert engine over a budget sweep, against the limits of
//! the machine measured in the same run.
//!
//! For every cell (policy × slots per layer) the engine decodes the same seeded prompts (greedy,
//! so every cell sees the same tokens until its budget changes the numbers it computes), after a
//! warm-up prompt that is excluded. A `resident` cell loads every routed expert (an unlimited
//! budget), runs the measured prompts once and then measures them again: the all-resident decode
//! speed of this engine.
//!
//! Reported per cell: decode hit rate `h`, decode tokens/s, expert bytes moved per token, the
//! achieved host→device rate of the miss path next to a pinned copy of one expert's size measured
//! in the same run (`B`), the link bound `B / M` (`M` the expert bytes the cell moved per token,
//! demand misses and prefetches: `(1 − h) · E · s` for a policy that does not prefetch, `E`
//! experts per token, `s` bytes per expert) and the serial bound `1 / (1/R + M/B)` (`R` the
//! all-resident speed) with the fractions of them achieved; for prefetching policies, the share
//! of prefetch load time hidden behind compute. A prefetch that turns a miss into a hit still
//! crosses the link, so both bounds count it (before 2026-12-03 they counted demand misses only,
//! which credited a prefetching policy's hits as free).

use std::path::Path;
use std::time::Duration;

use candle_core::Device;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::engine::{Engine, EngineConfig, EngineStats, MissMode, Replay, Sampler};
use crate::error::{Error, Result};
use crate::experts::budget::Budget;
use crate::experts::policies::PolicySpec;
use crate::experts::upload::{GpuExperts, Staging};
use crate::experts::ExpertKey;
use crate::weights::storage::{DeviceModel, IoMode};

/// What to sweep.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Policies (e.g. `lru`, `lookahead`).
    pub policies: Vec<PolicySpec>,
    /// Expert slots per MoE layer (0: unlimited, starting cold like every other cell).
    pub capacities: Vec<usize>,
    /// Measured prompts per cell.
    pub prompts: usize,
    /// Tokens per prompt (random ids from the vocabulary, seeded).
    pub prompt_len: usize,
    /// New tokens per prompt.
    pub new_tokens: usize,
    /// Loader threads (`None`: the engine's default for the device).
    pub load_threads: Option<usize>,
    /// CPU compute threads (`None`: every core).
    pub threads: Option<usize>,
    /// Kernel kind of the CPU's packed products.
    pub kernels: crate::weights::kernels::Kernels,
    /// Prompt seed.
    pub seed: u64,
    /// Also measure the all-resident cell.
    pub resident: bool,
    /// How CUDA misses reach the copy engine (registered mappings or pinned staging).
    pub staging: Staging,
    /// Reader threads per upload (CUDA; `None`: the store's default).
    pub read_threads: Option<usize>,
    /// Resident form of MLX-quantized experts on CUDA.
    pub gpu_experts: GpuExperts,
    /// Attention kernels of decode tokens on CUDA.
    pub gpu_attention: crate::models::GpuAttention,
    /// Where decode tokens are routed on CUDA.
    pub gpu_routing: crate::models::GpuRouting,
    /// Decode steps on CUDA from a captured graph (auto) or launch by launch.
    pub gpu_graph: crate::models::GpuGraph,
    /// MLX-quantized dense weights on CUDA.
    pub gpu_dense: crate::models::GpuDense,
    /// Dense weights in place (default) or copied, on the CPU.
    pub dense: crate::engine::DenseForm,
    /// How misses read the shards.
    pub io: IoMode,
    /// The storage device to emulate, if any.
    pub storage: Option<DeviceModel>,
    /// Replay the routing of a recorded trace (Parquet, and optionally one of its cells)
    /// instead of the router's: its first prompt is the warm-up, the next `prompts` are
    /// measured, each with its recorded prompt length and number of new tokens.
    pub replay: Option<(std::path::PathBuf, Option<String>)>,
    /// What a miss runs (`load`, or `cpu-compute` on CUDA to time Fiddler's host computation;
    /// the lossy modes are measured by experiments, which also report their drift).
    pub miss: MissMode,
    /// After each cell's measured prompts, run them once more with the decoder's parts timed
    /// ([`crate::models::profile`]) and report decode milliseconds per token by part.
    pub profile: bool,
}

/// One measured cell.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    /// `resident`, or `<policy>_cap<N>`.
    pub cell: String,
    /// Policy.
    pub policy: String,
    /// Slots per layer (`None`: unlimited).
    pub capacity: Option<usize>,
    /// Loader threads used.
    pub load_threads: usize,
    /// Decode-phase demand hit rate.
    pub hit_rate: f64,
    /// Decode tokens per second.
    pub decode_tps: f64,
    /// Prefill tokens per second over the measured prompts (in the resident cell every expert is
    /// already loaded: pure compute).
    pub prefill_tps: f64,
    /// Decoded tokens measured.
    pub decode_tokens: u64,
    /// Expert bytes moved per decoded token (demand misses and prefetches).
    pub bytes_per_token: f64,
    /// Milliseconds per token the engine thread spent loading or waiting for experts.
    pub exposed_load_ms_per_token: f64,
    /// Host→device rate of the miss path's copies (bytes/s), when on a GPU.
    pub h2d_rate: Option<f64>,
    /// Rate each upload's copy got on the GPU copy engine (bytes over CUDA-event copy time).
    pub dma_rate: Option<f64>,
    /// Rate of the whole miss path: bytes over the wall-clock time uploads were running.
    pub miss_path_rate: Option<f64>,
    /// Rate of the copies gated decode steps made themselves (the gates' loads from the
    /// registered mappings: bytes over their GPU time), when any ran.
    pub step_copy_rate: Option<f64>,
    /// `B / bytes_per_token` tokens/s: every byte the cell moved (demand misses and
    /// prefetches) across the link at `B` (`None` when nothing moves or `B` is unknown). For a
    /// policy that does not prefetch, `bytes_per_token = (1 − h) · E · s`.
    pub link_bound_tps: Option<f64>,
    /// `decode_tps / link_bound_tps`.
    pub link_bound_fraction: Option<f64>,
    /// `1 / (1/R + bytes_per_token / B)` tokens/s, `R` the all-resident decode speed of this
    /// run: the speed if compute stayed as resident and every byte the cell moved (demand
    /// misses and prefetches) crossed the link at `B` with no overlap (the link bound itself
    /// ignores compute).
    pub serial_bound_tps: Option<f64>,
    /// `decode_tps / serial_bound_tps` (above 1 when prefetch overlaps loads with compute).
    pub serial_bound_fraction: Option<f64>,
    /// Share of used prefetches' load time the engine never waited for.
    pub prefetch_hidden: Option<f64>,
    /// Prefetches issued per decoded token.
    pub prefetches_per_token: f64,
    /// Bytes the OS read from storage per decoded token (`/proc/self/io`), next to the
    /// requested `bytes_per_token`.
    pub device_bytes_per_token: Option<f64>,
    /// `1 / (1/R + bytes_per_token / B_read)`, `R` the all-resident decode speed of this run and
    /// `B_read` the storage read rate measured before the cells; none where misses are copied
    /// straight from registered mappings (they read nothing: the serial bound applies).
    pub storage_bound_tps: Option<f64>,
    /// `decode_tps / storage_bound_tps`.
    pub storage_bound_fraction: Option<f64>,
    /// With `--profile`: decode milliseconds per token by part of the decoder (and `total`),
    /// from a second, profiled pass over the measured prompts (the device synchronized at every
    /// part boundary, so its total exceeds `1000 / decode_tps`).
    pub decode_ms_by_part: Option<std::collections::BTreeMap<String, f64>>,
    /// With `--profile`: prefill milliseconds per prompt token by part, from the same pass.
    pub prefill_ms_by_part: Option<std::collections::BTreeMap<String, f64>>,
    /// `--profile`: of `decode_ms_by_part`, the ms per token in the compute threads' parallel
    /// regions, by part (the rest ran on the engine thread alone).
    pub decode_parallel_ms_by_part: Option<std::collections::BTreeMap<String, f64>>,
    /// `--profile`: the same for prompt tokens.
    pub prefill_parallel_ms_by_part: Option<std::collections::BTreeMap<String, f64>>,
    /// Where the gates of gated decode steps spent their time in this cell (CUDA lazy cells run
    /// from a graph; `None` where no gate ran).
    pub gate_times: Option<crate::models::fallback::GateTimes>,
}

/// The report of one `harness bench` run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// Model directory.
    pub model: String,
    /// Device name.
    pub device: String,
    /// CPU compute threads of the products (1 on a GPU).
    pub compute_threads: usize,
    /// Kernel kind and SIMD form of the products (`int8/avx2`, `exact/neon`, `gpu/…`), as the
    /// engine's label read when the run ended (so it counts every cell's fallbacks and tokens
    /// routed on the device).
    pub kernels: String,
    /// `router`, or the replayed trace and cell.
    pub routing: String,
    /// The miss mode of the cells.
    pub miss: String,
    /// How misses reached the copy engine in this run: `registered (…)` (straight from the
    /// page-locked shard mappings), `write-combined` or `cacheable` staging (with the reason
    /// when `auto` could not register), `no` off CUDA.
    pub staging: String,
    /// Form of resident experts on the device: `packed` (MLX-quantized experts kept as their
    /// checkpoint bytes) or `f32`.
    pub resident_form: String,
    /// Checkpoint bytes of one expert (`s`).
    pub expert_bytes: u64,
    /// Routed experts per token over all MoE layers (`E`).
    pub experts_per_token: usize,
    /// Pinned host→device copy of `s` bytes, bytes/s (`B`), measured in this run.
    pub pinned_h2d_rate: Option<f64>,
    /// Pinned copies of `s` bytes each waited for before the next (one miss's pattern).
    pub pinned_single_h2d_rate: Option<f64>,
    /// Pageable host→device copy of `s` bytes, bytes/s, measured in this run.
    pub pageable_h2d_rate: Option<f64>,
    /// How misses read the shards: the mode asked for, the one in effect, the emulated device.
    pub io: crate::weights::IoSetup,
    /// The rate this machine read whole experts at, in the run's I/O mode and loader threads,
    /// measured before the cells (bytes/s): the storage bound's `B_read`.
    pub storage_read_rate: f64,
    /// The cells.
    pub rows: Vec<BenchRow>,
}

/// Runs the sweep on an opened engine.
pub fn bench(
    model_dir: &Path,
    device: Device,
    opts: &BenchOptions,
    mut progress: impl FnMut(&BenchRow),
) -> Result<BenchReport> {
    if opts.prompts == 0 || opts.new_tokens < 2 || opts.prompt_len == 0 {
        return Err(Error::Input(
            "bench needs at least 1 prompt of at least 1 token and 2 new tokens".into(),
        ));
    }
    let policies = &opts.policies;
    let config = |budget, policy: &PolicySpec| EngineConfig {
        budget,
        policy: policy.clone(),
        miss: opts.miss,
        record_trace: false,
        load_threads: opts.load_threads,
        gpu_experts: opts.gpu_experts,
        gpu_attention: opts.gpu_attention,
        gpu_routing: opts.gpu_routing,
        gpu_graph: opts.gpu_graph,
        gpu_dense: opts.gpu_dense,
        dense: opts.dense,
        io: opts.io,
        storage: opts.storage,
        staging: opts.staging,
        threads: opts.threads,
        kernels: opts.kernels,
        low_bit: None,
    };
    let lru = PolicySpec::parse("lru").expect("lru is a policy");
    let mut engine = Engine::open(model_dir, device.clone(), config(Budget::Unlimited, &lru))?;
    if let Some(n) = opts.read_threads {
        engine.store.set_read_threads(n);
    }
    let spec = engine.spec().clone();
    let first = ExpertKey {
        layer: spec.moe.moe_layers[0] as u32,
        expert: 0,
    };
    let s = engine.store.expert_bytes(first);
    let e_per_token = spec.moe.top_k * spec.num_moe_layers();
    let baseline = h2d_baseline(&device, s as usize, 20)?;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let vocab = spec.vocab_size as u32;
    let (replays, routing) = match &opts.replay {
        Some((path, cell)) => {
            let (reps, cell) = load_replays(path, cell.as_deref(), &spec)?;
            let n = reps.len().min(opts.prompts + 1);
            let routing = format!("replay of {} (cell `{cell}`)", path.display());
            (reps.into_iter().take(n).map(Some).collect(), routing)
        }
        None => (vec![None; opts.prompts + 1], "router".to_string()),
    };
    let mut prompts: Vec<BenchPrompt> = replays
        .into_iter()
        .map(|replay| {
            let (len, new) = replay
                .as_ref()
                .map_or((opts.prompt_len, opts.new_tokens), |r| {
                    (r.prompt_len, r.new_tokens)
                });
            BenchPrompt {
                ids: (0..len).map(|_| rng.random_range(0..vocab)).collect(),
                new_tokens: new,
                replay,
            }
        })
        .collect();
    let warmup = prompts.remove(0);
    let measured = prompts;
    let mut report = BenchReport {
        model: model_dir.display().to_string(),
        device: format!("{device:?}"),
        compute_threads: engine.compute_threads(),
        kernels: engine.kernels_label(),
        routing,
        miss: opts.miss.to_string(),
        staging: engine.store.staging_label(),
        resident_form:
            if engine.store.gpu_packed() || (device.is_cpu() && engine.store.quantized()) {
                "packed"
            } else {
                "f32"
            }
            .into(),
        expert_bytes: s,
        experts_per_token: e_per_token,
        pinned_h2d_rate: baseline.map(|b| b.pinned),
        pinned_single_h2d_rate: baseline.map(|b| b.pinned_single),
        pageable_h2d_rate: baseline.map(|b| b.pageable),
        io: engine.io().clone(),
        storage_read_rate: storage_read_rate(&engine, opts.seed)?,
        rows: Vec::new(),
    };
    let mut cells: Vec<(String, PolicySpec, Option<usize>)> = Vec::new();
    let budget = |cap: Option<usize>| cap.map_or(Budget::Unlimited, Budget::SlotsPerLayer);
    if opts.resident {
        cells.push(("resident".into(), lru.clone(), None));
    }
    for p in policies {
        for &c in &opts.capacities {
            let (name, cap) = match c {
                0 => (format!("{p}_unlimited"), None),
                c => (format!("{p}_cap{c}"), Some(c)),
            };
            cells.push((name, p.clone(), cap));
        }
    }
    // Every cell's configuration is checked before anything is measured.
    for (_, policy, cap) in &cells {
        engine.reconfigure(config(budget(*cap), policy))?;
    }
    for (name, policy, cap) in cells {
        engine.reconfigure(config(budget(cap), &policy))?;
        if engine.io().effective == IoMode::Cold {
            engine.store.checkpoint().drop_page_cache();
        }
        // The resident cell holds every routed expert (on a GPU its decode tokens are then
        // routed on the device), loaded before its warm-up.
        if name == "resident" {
            engine.load_all_experts()?;
        }
        // Warm-up (excluded): the resident cell runs the measured prompts themselves.
        let warm: Vec<&BenchPrompt> = if name == "resident" {
            measured.iter().collect()
        } else {
            vec![&warmup]
        };
        for w in warm {
            w.generate(&mut engine)?;
        }
        let before = engine.stats();
        let mut decode = Duration::ZERO;
        let mut tokens = 0u64;
        let mut device_bytes = Some(0u64);
        let (mut prefill, mut prompt_tokens) = (Duration::ZERO, 0usize);
        for m in &measured {
            let g = m.generate(&mut engine)?;
            decode += g.decode;
            prefill += g.prefill;
            prompt_tokens += g.prompt_len;
            tokens += g.tokens.len().saturating_sub(1) as u64;
            device_bytes = device_bytes.zip(g.decode_device_bytes).map(|(a, b)| a + b);
        }
        let after = engine.stats();
        let mut row = measure(
            &name, &policy, cap, &engine, &before, &after, decode, tokens, &report,
        );
        row.prefill_tps = prompt_tokens as f64 / prefill.as_secs_f64().max(1e-12);
        // Decode steps only, like `bytes_per_token`: prefill reads are not counted in either.
        row.device_bytes_per_token = device_bytes.map(|b| b as f64 / tokens.max(1) as f64);
        // Misses copied straight from registered mappings read nothing: no storage bound.
        let reads = !engine.store.registered();
        if let Some(res) = report.rows.iter().find(|r| r.cell == "resident" && reads) {
            let bound = storage_bound_tps(
                res.decode_tps,
                row.bytes_per_token,
                report.storage_read_rate,
            );
            row.storage_bound_tps = Some(bound);
            row.storage_bound_fraction = Some(row.decode_tps / bound);
        }
        let resident = report.rows.iter().find(|r| r.cell == "resident");
        if let (Some(res), Some(b)) = (resident, report.pinned_h2d_rate) {
            // The storage bound's form, with the pinned copy rate for the read rate.
            let bound = storage_bound_tps(res.decode_tps, row.bytes_per_token, b);
            row.serial_bound_tps = Some(bound);
            row.serial_bound_fraction = Some(row.decode_tps / bound);
        }
        if opts.profile {
            engine.model.set_profiling(true);
            let p0 = engine.model.profile();
            for m in &measured {
                m.generate(&mut engine)?;
            }
            let p = engine.model.profile();
            engine.model.set_profiling(false);
            let named = |m: std::collections::BTreeMap<&'static str, f64>| {
                m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            };
            let (d, f) = (p.decode.since(&p0.decode), p.prefill.since(&p0.prefill));
            row.decode_ms_by_part = Some(named(d.ms_per_token()));
            row.prefill_ms_by_part = Some(named(f.ms_per_token()));
            row.decode_parallel_ms_by_part = Some(named(d.parallel_ms_per_token()));
            row.prefill_parallel_ms_by_part = Some(named(f.parallel_ms_per_token()));
        }
        progress(&row);
        report.rows.push(row);
    }
    // The label as the run ends: what every cell ran (fallbacks, tokens routed on the device).
    report.kernels = engine.kernels_label();
    Ok(report)
}

/// The storage bound on decode speed: `1 / (1/R + bytes_per_token / read_rate)` — the speed if
/// compute stayed as all-resident (`R` tokens/s) and every expert byte moved per token was read
/// from storage at `read_rate` bytes/s, with no overlap.
pub fn storage_bound_tps(resident_tps: f64, bytes_per_token: f64, read_rate: f64) -> f64 {
    1.0 / (1.0 / resident_tps.max(1e-12) + bytes_per_token / read_rate.max(1e-12))
}

/// The rate (bytes/s) this machine reads whole experts at, in the engine's current I/O mode,
/// with its loader threads (at least one): 64 experts (or all, if fewer) at seeded random
/// places in the shards, after dropping the page cache in `cold` mode.
pub fn storage_read_rate(engine: &Engine, seed: u64) -> Result<f64> {
    let spec = engine.spec();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5e1ec7);
    let mut keys: Vec<ExpertKey> = spec
        .moe
        .moe_layers
        .iter()
        .flat_map(|&l| {
            (0..spec.moe.num_experts as u32).map(move |e| ExpertKey {
                layer: l as u32,
                expert: e,
            })
        })
        .collect();
    for i in (1..keys.len()).rev() {
        keys.swap(i, rng.random_range(0..=i));
    }
    keys.truncate(64);
    if engine.io().effective == IoMode::Cold {
        engine.store.checkpoint().drop_page_cache();
    }
    engine.store.read_rate(&keys, engine.load_threads().max(1))
}

/// One bench prompt: random token ids, and the routing to replay, if any.
struct BenchPrompt {
    ids: Vec<u32>,
    new_tokens: usize,
    replay: Option<Replay>,
}

impl BenchPrompt {
    fn generate(&self, engine: &mut Engine) -> Result<crate::engine::Generation> {
        engine.set_replay(self.replay.clone());
        let g = engine.generate(&self.ids, self.new_tokens, &mut Sampler::Greedy, &[]);
        engine.set_replay(None);
        g
    }
}

/// The prompts of one cell of a trace file (the first cell when none is named), as replays.
fn load_replays(
    path: &Path,
    cell: Option<&str>,
    spec: &crate::config::ModelSpec,
) -> Result<(Vec<Replay>, String)> {
    if crate::simulate::is_aggregate(&crate::trace::TraceFile::open(path)?) {
        return Err(Error::Input(format!(
            "{}: an aggregate-only trace (expert activation counts without access order) has no per-token routing to replay",
            path.display()
        )));
    }
    let cells = crate::trace::read(path)?;
    let chosen = crate::trace::select_cell(path, &cells, cell)?;
    let cell = chosen.cell.clone();
    if chosen.rows.is_empty() {
        return Err(Error::Input(format!(
            "{}: no rows for cell `{cell}`",
            path.display()
        )));
    }
    let reps = Replay::from_rows(&chosen.rows, spec)
        .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    if reps.len() < 2 {
        return Err(Error::Input(format!(
            "{}: cell `{cell}` has {} prompt(s); a replay needs one warm-up prompt and at least one to measure",
            path.display(),
            reps.len()
        )));
    }
    Ok((reps, cell))
}

#[allow(clippy::too_many_arguments)]
fn measure(
    name: &str,
    policy: &PolicySpec,
    cap: Option<usize>,
    engine: &Engine,
    before: &EngineStats,
    after: &EngineStats,
    decode: Duration,
    tokens: u64,
    report: &BenchReport,
) -> BenchRow {
    let d = |a: u64, b: u64| a.saturating_sub(b) as f64;
    let (ca, cb) = (&after.cache, &before.cache);
    let accesses = d(ca.decode.accesses, cb.decode.accesses);
    let hits = d(ca.decode.hits, cb.decode.hits);
    let h = if accesses > 0.0 { hits / accesses } else { 1.0 };
    let prefetches = d(ca.prefetch.issued, cb.prefetch.issued);
    let s = report.expert_bytes as f64;
    let n = tokens.max(1) as f64;
    let tps = tokens as f64 / decode.as_secs_f64().max(1e-12);
    let transfer = after.transfer.since(&before.transfer);
    let bytes_per_token = (accesses - hits + prefetches) * s / n;
    // Every byte moved, prefetches included: a prefetching policy's hits still cross the link.
    let link_bound_tps = report
        .pinned_h2d_rate
        .filter(|_| bytes_per_token > 0.0)
        .map(|b| b / bytes_per_token);
    BenchRow {
        cell: name.to_string(),
        policy: policy.to_string(),
        capacity: cap,
        load_threads: engine.load_threads(),
        hit_rate: h,
        decode_tps: tps,
        prefill_tps: 0.0,
        decode_tokens: tokens,
        bytes_per_token,
        exposed_load_ms_per_token: (after.decode_load_seconds - before.decode_load_seconds)
            .max(0.0)
            * 1e3
            / n,
        h2d_rate: transfer.h2d_rate(),
        dma_rate: transfer.dma_rate(),
        miss_path_rate: transfer.path_rate(),
        step_copy_rate: transfer.step_rate(),
        link_bound_tps,
        link_bound_fraction: link_bound_tps.map(|b| tps / b),
        serial_bound_tps: None,
        serial_bound_fraction: None,
        prefetch_hidden: after.loads.since(&before.loads).prefetch_hidden(),
        prefetches_per_token: prefetches / n,
        device_bytes_per_token: None,
        storage_bound_tps: None,
        storage_bound_fraction: None,
        decode_ms_by_part: None,
        prefill_ms_by_part: None,
        decode_parallel_ms_by_part: None,
        prefill_parallel_ms_by_part: None,
        gate_times: Some(after.gates.since(&before.gates)).filter(|g| g.gates > 0),
    }
}

/// Host→device copy rates of one buffer, in bytes per second.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct H2dBaseline {
    /// Pinned source, copies queued back to back, one synchronization at the end.
    pub pinned: f64,
    /// Pinned source, each copy waited for before the next (the pattern of one miss).
    pub pinned_single: f64,
    /// Pageable source, queued back to back.
    pub pageable: f64,
}

/// Host→device copy rates measured on `device` for one buffer of `bytes` bytes, each the mean
/// over `reps` copies after one warm-up copy. `None` off CUDA.
pub fn h2d_baseline(device: &Device, bytes: usize, reps: usize) -> Result<Option<H2dBaseline>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return cuda_baseline(dev, bytes, reps.max(1)).map(Some);
    }
    let _ = (device, bytes, reps);
    Ok(None)
}

/// The pinned and pageable copy loops of [`h2d_baseline`] on one CUDA device.
#[cfg(feature = "cuda")]
fn cuda_baseline(dev: &candle_core::CudaDevice, bytes: usize, reps: usize) -> Result<H2dBaseline> {
    use candle_core::cuda_backend::cudarc::driver::CudaSlice;
    let driver = |what: &str, e: candle_core::cuda_backend::cudarc::driver::DriverError| {
        Error::Input(format!("CUDA {what}: {e}"))
    };
    let ctx = dev.cuda_stream().context().clone();
    let stream = ctx.new_stream().map_err(|e| driver("stream", e))?;
    // SAFETY: filled below before any copy.
    let mut pinned = unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes.max(1), 0) }
        .map_err(|e| driver("pinned allocation", e))?;
    pinned
        .as_mut_slice()
        .map_err(|e| driver("pinned buffer", e))?
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = i as u8);
    let pageable: Vec<u8> = (0..bytes.max(1)).map(|i| i as u8).collect();
    // SAFETY: every element is written by the copies before anything reads it (nothing does).
    let mut dst: CudaSlice<u8> =
        unsafe { stream.alloc::<u8>(bytes.max(1)) }.map_err(|e| driver("allocation", e))?;
    let mut time = |pinned_src: bool, each: bool| -> Result<f64> {
        let mut once = || {
            if pinned_src {
                stream.memcpy_htod(&pinned, &mut dst)
            } else {
                stream.memcpy_htod(&pageable, &mut dst)
            }
            .map_err(|e| driver("host→device copy", e))
        };
        once()?;
        stream.synchronize().map_err(|e| driver("stream", e))?;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            once()?;
            if each {
                stream.synchronize().map_err(|e| driver("stream", e))?;
            }
        }
        stream.synchronize().map_err(|e| driver("stream", e))?;
        Ok((bytes * reps) as f64 / t.elapsed().as_secs_f64())
    };
    Ok(H2dBaseline {
        pinned: time(true, false)?,
        pinned_single: time(true, true)?,
        pageable: time(false, false)?,
    })
}

/// The report as a fixed-width table.
pub fn format_report(r: &BenchReport) -> String {
    let gb = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{:.1}", v / 1e9));
    let f2 = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
    let mut out = format!(
        "model {} on {} ({} compute threads, kernels {}; staging: {}, experts resident {}, routing: {}, misses: {}): s = {:.2} MB per expert, E = {} experts per token; H2D of s bytes in this run: pinned {} GB/s (one copy at a time: {}), pageable {} GB/s\n",
        r.model,
        r.device,
        r.compute_threads,
        r.kernels,
        r.staging,
        r.resident_form,
        r.routing,
        r.miss,
        r.expert_bytes as f64 / 1e6,
        r.experts_per_token,
        gb(r.pinned_h2d_rate),
        gb(r.pinned_single_h2d_rate),
        gb(r.pageable_h2d_rate),
    );
    out.push_str(&format!(
        "storage: io {} (asked {}{}){}; experts read at {:.2} GB/s in this run (B_read)\n",
        r.io.effective,
        r.io.asked,
        r.io.note
            .as_deref()
            .map_or(String::new(), |n| format!("; {n}")),
        r.io.device
            .map_or(String::new(), |d| format!(", emulating {d}")),
        r.storage_read_rate / 1e9,
    ));
    let t1 = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
    out.push_str(&format!(
        "{:<18} {:>3} {:>6} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>6} {:>8} {:>8} {:>9} {:>9} {:>9} {:>6} {:>9} {:>6} {:>7}\n",
        "cell",
        "thr",
        "h",
        "tok/s",
        "pre t/s",
        "MB/tok",
        "dev MB/t",
        "load ms/t",
        "stor t/s",
        "frac",
        "h2d GB/s",
        "dma GB/s",
        "path GB/s",
        "step GB/s",
        "link t/s",
        "frac",
        "serial t/s",
        "frac",
        "hidden"
    ));
    for row in &r.rows {
        out.push_str(&format!(
            "{:<18} {:>3} {:>6.3} {:>8.1} {:>8.1} {:>9.1} {:>9} {:>9.2} {:>9} {:>6} {:>8} {:>8} {:>9} {:>9} {:>9} {:>6} {:>9} {:>6} {:>7}\n",
            row.cell,
            row.load_threads,
            row.hit_rate,
            row.decode_tps,
            row.prefill_tps,
            row.bytes_per_token / 1e6,
            row.device_bytes_per_token
                .map_or("-".to_string(), |v| format!("{:.1}", v / 1e6)),
            row.exposed_load_ms_per_token,
            t1(row.storage_bound_tps),
            f2(row.storage_bound_fraction),
            gb(row.h2d_rate),
            gb(row.dma_rate),
            gb(row.miss_path_rate),
            gb(row.step_copy_rate),
            t1(row.link_bound_tps),
            f2(row.link_bound_fraction),
            t1(row.serial_bound_tps),
            f2(row.serial_bound_fraction),
            f2(row.prefetch_hidden),
        ));
    }
    if r.rows.iter().any(|row| row.gate_times.is_some()) {
        out.push_str(&gate_table(&r.rows));
    }
    let how = if crate::models::profile::host_only() {
        "a second, profiled pass: host time issuing each part, the device not synchronized: HARNESS_PROFILE_HOST"
    } else {
        "a second, profiled pass: the device synchronized at every part boundary"
    };
    // Each part's time, then of it the time in the compute threads' parallel regions.
    type ByPart = Option<std::collections::BTreeMap<String, f64>>;
    type Of = fn(&BenchRow) -> &ByPart;
    let within = "of which in the compute threads' parallel regions (the rest ran on the engine thread alone)";
    let tables: [(String, Of); 4] = [
        (format!("decode ms per token by part ({how})"), |r| {
            &r.decode_ms_by_part
        }),
        (
            format!("prefill ms per prompt token by part ({how})"),
            |r| &r.prefill_ms_by_part,
        ),
        (format!("decode ms per token by part, {within}"), |r| {
            &r.decode_parallel_ms_by_part
        }),
        (
            format!("prefill ms per prompt token by part, {within}"),
            |r| &r.prefill_parallel_ms_by_part,
        ),
    ];
    for (title, of) in tables {
        let cells = r
            .rows
            .iter()
            .filter_map(|row| Some((&row.cell[..], of(row).as_ref()?)));
        out.push_str(&crate::models::profile::table(&title, cells.collect()));
    }
    out
}

/// The gated cells' gate times: per gate, microseconds from its start to its post (`post`),
/// waiting for the host's answer (`wait`: the host's turn, `host`, and the rest, `link`: the
/// post and the answer crossing the link and being noticed), from the answer to its end
/// (`after`: addresses, the step's own copies, the grid's end) and from its end to the next
/// gate (`between`: the layer's compute); `in gates` = milliseconds per token inside gates.
fn gate_table(rows: &[BenchRow]) -> String {
    let mut out = format!(
        "gated decode steps, microseconds per gate (GPU global timer; host: its own clock)\n{:<18} {:>8} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>11}\n",
        "cell", "gates/t", "post", "wait", "host", "link", "after", "between", "in gates ms/t"
    );
    for row in rows {
        let Some(g) = &row.gate_times else { continue };
        let us = |ns: u64| ns as f64 / 1e3 / g.gates as f64;
        let inside = (g.post_ns + g.wait_ns + g.after_ns) as f64 / 1e6;
        out.push_str(&format!(
            "{:<18} {:>8.1} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>8.2} {:>11.3}\n",
            row.cell,
            g.gates as f64 / row.decode_tokens.max(1) as f64,
            us(g.post_ns),
            us(g.wait_ns),
            us(g.host_ns),
            us(g.wait_ns.saturating_sub(g.host_ns)),
            us(g.after_ns),
            us(g.between_ns),
            inside / row.decode_tokens.max(1) as f64,
        ));
    }
    out
}
