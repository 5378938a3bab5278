//! Command-line parsing (clap) and dispatch. Stage one: raw validated values from the command
//! line; stage two: the library objects built from them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use moe_harness::config::QuantParams;
use moe_harness::engine::{Backend, DenseForm, Engine, EngineConfig, MissMode, Sampler};
use moe_harness::experts::budget::{parse_size, Budget, Pool};
use moe_harness::experts::policies::PolicySpec;
use moe_harness::experts::upload::{GpuExperts, Staging};
use moe_harness::inspect;
use moe_harness::io::{write_atomic, write_npy_f32};
use moe_harness::models::{GpuAttention, GpuDense, GpuGraph, GpuRouting};
use moe_harness::weights::kernels::Kernels;
use moe_harness::weights::storage::{DeviceModel, IoMode};

mod sweep;
mod trace;

#[derive(Parser)]
#[command(
    name = "harness",
    version,
    about = "Lazy expert loading for Mixture-of-Experts LLMs: engine, cache policies, experiments"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compatibility report for a checkpoint directory or a bare config.json.
    Inspect(InspectArgs),
    /// Full-sequence prefill: write logits (NumPy f32 [T, vocab]) and optionally the routing.
    Logits(LogitsArgs),
    /// Generate text or tokens through the lazy-expert engine.
    Generate(GenerateArgs),
    /// Run an experiment file: every policy × budget cell over its prompts, with traces,
    /// summaries and plots under results/<experiment>/<run-id>/ (or some cells: --cell,
    /// --index, --shard; then `harness merge`).
    Run(RunArgs),
    /// The cells of an experiment's sweep: indices, ids, status, where their files go.
    Plan(sweep::PlanArgs),
    /// Assemble a run from its cells (after cell runs on a cluster).
    Merge(sweep::MergeArgs),
    /// A Slurm job array script for an experiment's sweep (one task per cell, then the merge).
    Slurm(sweep::SlurmArgs),
    /// Redraw the plots of a results directory from its Parquet files.
    Plot(PlotArgs),
    /// Replay a routing trace under every policy × budget and report hit rates.
    Simulate(SimulateArgs),
    /// Make, convert, import (vLLM, SGLang, Megatron-Core, llama.cpp, MoE-Infinity) and
    /// inspect routing traces.
    Trace(trace::TraceArgs),
    /// Write a random-weight checkpoint with a real model's shapes and layout (for speed runs).
    Synth(SynthArgs),
    /// Decode speed over a budget sweep against the host→device link, measured in the same run.
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// Checkpoint directory (e.g. one written by `harness synth`).
    #[arg(long)]
    model: PathBuf,
    /// Compute device.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    device: Backend,
    /// Policies, comma-separated.
    #[arg(long, default_value = "lru,lookahead", value_delimiter = ',')]
    policy: Vec<PolicySpec>,
    /// What a miss runs: load, or cpu-compute (--device cuda: the expert computed on the host).
    #[arg(long, value_enum, default_value_t = MissMode::Load)]
    miss: MissMode,
    /// Expert slots per MoE layer, comma-separated.
    #[arg(long, default_value = "8,16,32", value_delimiter = ',')]
    capacity: Vec<usize>,
    /// Measured prompts per cell.
    #[arg(long, default_value_t = 3)]
    prompts: usize,
    /// Tokens per prompt (seeded random ids).
    #[arg(long, default_value_t = 16)]
    prompt_len: usize,
    /// New tokens per prompt.
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Expert loader threads (0: inline). Default: on the CPU 0 with --io page-cache, min(top_k, 4) with direct/cold; min(top_k, 8) on a GPU.
    #[arg(long)]
    load_threads: Option<usize>,
    /// Prompt seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip the all-resident cell.
    #[arg(long)]
    no_resident: bool,
    /// Also time each part of the decoder (attention, norms, router, experts, dense MLP,
    /// lm_head) in a second pass over each cell's prompts, the device synchronized between parts.
    #[arg(long)]
    profile: bool,
    /// Reader threads per expert upload on CUDA (default 4).
    #[arg(long)]
    read_threads: Option<usize>,
    #[command(flatten)]
    gpu: GpuArgs,
    #[command(flatten)]
    storage: StorageArgs,
    #[command(flatten)]
    compute: ComputeArgs,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Replay the routing of a recorded trace (e.g. a run's trace.parquet from a real model of
    /// the same shape) instead of the router's: realistic expert traffic on a `harness synth`
    /// checkpoint. Its first prompt is the warm-up; prompt lengths and token counts are the
    /// trace's.
    #[arg(long)]
    replay: Option<PathBuf>,
    /// The trace cell to replay (default: the file's first).
    #[arg(long, requires = "replay")]
    replay_cell: Option<String>,
}

#[derive(Args)]
struct SynthArgs {
    /// The model's config.json (e.g. experiments/configs/glm47-flash.json).
    #[arg(long)]
    config: PathBuf,
    /// mlx4, mlx8 or bf16.
    #[arg(long, default_value = "mlx4")]
    layout: String,
    /// Output directory (must not hold a checkpoint).
    #[arg(long)]
    out: PathBuf,
    /// Keep only the first N decoder layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Approximate shard size, e.g. 2GB.
    #[arg(long, default_value = "2GB")]
    shard_size: String,
}

#[derive(Args)]
struct SimulateArgs {
    /// Trace Parquet (see the README's trace schema).
    #[arg(long)]
    trace: PathBuf,
    /// Comma-separated policies, e.g. lru,lfu,lcp,lookahead,belady, and the literature's lfru,
    /// mrs, layer-aware, eam-K, adaptive-split (README). static-N and adaptive-split pin / split
    /// from a frequency profile: here the trace's own (an oracle profile); adaptive-split on a
    /// byte budget needs expert sizes (--model or --expert-bytes).
    #[arg(
        long,
        default_value = "lru,lfu,lcp,lookahead,belady",
        value_delimiter = ','
    )]
    policy: Vec<PolicySpec>,
    /// Comma-separated expert slots per layer.
    #[arg(long, value_delimiter = ',')]
    capacity: Vec<usize>,
    /// Comma-separated byte budgets (needs --model or --expert-bytes for expert sizes).
    #[arg(long, value_delimiter = ',', value_parser = size_arg)]
    budget: Vec<u64>,
    /// How byte budgets are shared: one global pool, or split equally per layer.
    #[arg(long, value_enum, default_value_t = Pool::Global)]
    pool: Pool,
    /// Checkpoint the trace came from: gives expert sizes and checks layer/expert ids.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Size of every expert in bytes, when no --model is given.
    #[arg(long)]
    expert_bytes: Option<u64>,
    /// Which cell of a multi-cell run trace to replay (default: the first).
    #[arg(long)]
    cell: Option<String>,
    /// Prompts with index below N are replayed (they fill the cache) but not counted, as the
    /// runner's warm-up prompts are.
    #[arg(long, default_value_t = 0)]
    warmup: u32,
    /// Empty the cache at every new prompt (runs with carry_over = false).
    #[arg(long)]
    reset_per_prompt: bool,
    /// Classic mode: every access stands alone, no step pinning (compare with libCacheSim).
    #[arg(long)]
    unpinned: bool,
    /// Miss mode to count (substitutions, drops, low-bit reads, host computations) as the
    /// engine would; hits do not depend on it.
    #[arg(long, value_enum, default_value_t = MissMode::Load)]
    miss: MissMode,
    /// Print JSON (one object per policy × budget).
    #[arg(long)]
    json: bool,
    /// Print to stderr how the replay ran: accesses, passes over the file, wall time (file
    /// reading included), accesses/s and peak resident memory.
    #[arg(long)]
    stats: bool,
}

#[derive(Args)]
struct RunArgs {
    /// Experiment TOML, e.g. experiments/default.toml.
    experiment: PathBuf,
    /// Results root (default: the experiment's `output.dir`, else ./results).
    #[arg(long)]
    out: Option<PathBuf>,
    /// CI-friendly quick mode: 3 prompts, 1 warm-up, at most 8 new tokens, one repeat, speed
    /// measured on the experiment's own model (no `replay_on` checkpoint).
    #[arg(long)]
    quick: bool,
    /// Run again even if complete results exist (with a selection: run those cells again).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    select: sweep::SelectArgs,
}

#[derive(Args)]
struct PlotArgs {
    /// A results directory (results/<experiment>/<run-id>).
    dir: PathBuf,
}

#[derive(Args)]
struct InspectArgs {
    /// Checkpoint directory or config.json.
    path: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Bits assumed when estimating sizes from a bare config.
    #[arg(long, default_value_t = 4)]
    bits: usize,
    /// Group size assumed when estimating sizes from a bare config.
    #[arg(long, default_value_t = 64)]
    group_size: usize,
}

/// Cache options shared by every engine command.
#[derive(Args, Clone)]
pub struct CacheArgs {
    /// Expert slots per MoE layer.
    #[arg(long, conflicts_with = "budget")]
    pub capacity: Option<usize>,
    /// Expert bytes across all layers, e.g. 512MiB, 2GB (checkpoint bytes of the experts).
    #[arg(long, value_parser = size_arg)]
    pub budget: Option<u64>,
    /// How a byte budget is shared: one global pool, or split equally per layer.
    #[arg(long, value_enum, default_value_t = Pool::Global)]
    pub pool: Pool,
    /// Eviction policy: lru, lfu, lfu-decay0.9, lcp-0.25-128, lookahead, static-N, lfru, mrs,
    /// layer-aware, eam-K, adaptive-split… (static-N and adaptive-split need a profile, so they
    /// run in experiments and `simulate`, not here).
    #[arg(long, default_value = "lru")]
    pub policy: PolicySpec,
    /// Miss handling: load (exact), skip (drop the missing expert, renormalise), substitute (the
    /// most co-selected resident expert), low-bit (a lower-precision copy: needs --low-bit DIR),
    /// cpu-compute (compute it on the host: needs --device cuda).
    #[arg(long, value_enum, default_value_t = MissMode::Load)]
    pub miss: MissMode,
    /// The lower-precision copy of the model that `--miss low-bit` reads (e.g. MLX 2-bit).
    #[arg(long)]
    pub low_bit: Option<PathBuf>,
    /// Compute device: cpu, cuda (needs --features cuda) or metal (--features metal).
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub device: Backend,
    /// Expert loader threads (0: load inline). Default: on the CPU 0 with --io page-cache, min(top_k, 4) with direct/cold; min(top_k, 8) on a GPU.
    #[arg(long)]
    pub load_threads: Option<usize>,
    /// Load every routed expert before the run (needs an unlimited budget): the all-resident
    /// path, where a CUDA GPU routes decode tokens on the device.
    #[arg(long)]
    pub all_resident: bool,
    #[command(flatten)]
    pub gpu: GpuArgs,
    #[command(flatten)]
    pub storage: StorageArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// The kernel forms and placements of the GPU path, and the CPU's dense form (engine commands
/// and `bench`).
#[derive(Args, Clone)]
pub struct GpuArgs {
    /// Resident form of MLX-quantized experts on CUDA: fused (checkpoint bytes; a token's
    /// experts in two fused launches), packed (checkpoint bytes, one matrix-vector launch per
    /// projection) or f32 (decoded once at upload).
    #[arg(long, value_enum, default_value_t = GpuExperts::Fused)]
    pub gpu_experts: GpuExperts,
    /// Attention kernels of decode tokens on CUDA: fused (MLA in two fused kernels between the
    /// projections) or ops (one tensor op per step).
    #[arg(long, value_enum, default_value_t = GpuAttention::Fused)]
    pub gpu_attention: GpuAttention,
    /// Where decode tokens are routed on CUDA: device (the router kernel chooses the experts;
    /// all resident, the routes come back once per token; in a lazy cell under a graph, each
    /// MoE layer's gate waits for the host) or host (router logits copied back at every MoE
    /// layer).
    #[arg(long, value_enum, default_value_t = GpuRouting::Device)]
    pub gpu_routing: GpuRouting,
    /// Decode steps on CUDA from a captured CUDA graph: auto (where every attention layer is MLA
    /// with its fused kernels and every MoE layer is routed on the device, each token after the
    /// captured one is one graph launch; in a lazy cell with a gate at each MoE layer where the
    /// host loads the misses), resident (graphs only where every expert is resident) or off
    /// (launch by launch).
    #[arg(long, value_enum, default_value_t = GpuGraph::Auto)]
    pub gpu_graph: GpuGraph,
    /// MLX-quantized dense weights on CUDA: packed (checkpoint bytes, packed matrix-vector
    /// kernel) or f32 (decoded once at load).
    #[arg(long, value_enum, default_value_t = GpuDense::Packed)]
    pub gpu_dense: GpuDense,
    /// Dense weights on the CPU: read in place from the memory map, or copied into memory.
    #[arg(long, value_enum, default_value_t = DenseForm::Mapped)]
    pub dense: DenseForm,
}

/// How the CPU computes (engine commands and `bench`).
#[derive(Args, Clone)]
pub struct ComputeArgs {
    /// CPU compute threads for the products (default: every core). Results are bit-identical
    /// for any count.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Packed 4-bit products on the CPU: exact (f32 activations, the reference path) or int8
    /// (activations quantized per 32 once per product, integer dot products: faster, within
    /// the 4-bit tolerance of HF, see README Backends).
    #[arg(long, value_enum, default_value_t = Kernels::Exact)]
    pub kernels: Kernels,
}

/// How expert misses reach storage (engine commands and `bench`).
#[derive(Args, Clone)]
pub struct StorageArgs {
    /// How misses read the shards: page-cache (served from memory after the first touch),
    /// direct (bypass the page cache), cold (direct, and the shards dropped from the page cache
    /// first).
    #[arg(long, value_enum, default_value_t = IoMode::PageCache)]
    pub io: IoMode,
    /// Emulate a storage device: a preset (apple-m2-ssd, apple-m2-pro-ssd, pcie4-nvme, sata-ssd)
    /// or figures `read_gbps=5,latency_us=80,queue_depth=8`. Reads never complete earlier than
    /// that device would finish them.
    #[arg(long, value_parser = device_arg)]
    pub storage_device: Option<DeviceModel>,
    /// How CUDA misses reach the copy engine: auto (registered where it applies), registered
    /// (copied straight from the page-locked shard mappings), or pinned staging buffers.
    #[arg(long, value_enum, default_value_t = Staging::Auto)]
    pub staging: Staging,
}

/// A storage device on the command line: a preset name, or `read_gbps=…[,latency_us=…][,queue_depth=…]`.
fn device_arg(s: &str) -> std::result::Result<DeviceModel, String> {
    if !s.contains('=') {
        return DeviceModel::preset(s);
    }
    let mut m = DeviceModel {
        read_gbps: 0.0,
        latency_us: 80.0,
        queue_depth: 8,
    };
    for kv in s.split(',') {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("`{kv}`: expected key=value"))?;
        let num = |v: &str| {
            v.trim()
                .parse::<f64>()
                .map_err(|_| format!("`{v}` is not a number"))
        };
        match k.trim() {
            "read_gbps" => m.read_gbps = num(v)?,
            "latency_us" => m.latency_us = num(v)?,
            "queue_depth" => {
                m.queue_depth = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("queue_depth `{v}` is not a whole number"))?
            }
            other => {
                return Err(format!(
                    "unknown key `{other}` (known: read_gbps, latency_us, queue_depth)"
                ))
            }
        }
    }
    m.check()?;
    Ok(m)
}

impl CacheArgs {
    /// Builds the engine configuration.
    pub fn engine_config(&self, moe_layers: usize) -> EngineConfig {
        let budget = match (self.capacity, self.budget) {
            (Some(n), _) => Budget::SlotsPerLayer(n),
            (None, Some(b)) => Budget::from_bytes(b, self.pool, moe_layers),
            (None, None) => Budget::Unlimited,
        };
        EngineConfig {
            budget,
            policy: self.policy.clone(),
            miss: self.miss,
            record_trace: false,
            load_threads: self.load_threads,
            gpu_experts: self.gpu.gpu_experts,
            gpu_attention: self.gpu.gpu_attention,
            gpu_routing: self.gpu.gpu_routing,
            gpu_graph: self.gpu.gpu_graph,
            gpu_dense: self.gpu.gpu_dense,
            dense: self.gpu.dense,
            io: self.storage.io,
            storage: self.storage.storage_device,
            staging: self.storage.staging,
            threads: self.compute.threads,
            kernels: self.compute.kernels,
            low_bit: self.low_bit.clone(),
        }
    }
}

/// A byte size on the command line (`512MiB`, `2GB`, `1048576`).
fn size_arg(s: &str) -> std::result::Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

#[derive(Args)]
struct LogitsArgs {
    /// Checkpoint directory.
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(long)]
    tokens: String,
    /// Output .npy file (f32 [T, vocab]).
    #[arg(long)]
    out: PathBuf,
    /// Also write routing JSON: {"<layer>": [[experts of token 0], …]}.
    #[arg(long)]
    routing: Option<PathBuf>,
    /// Run the first N tokens as one prefill and each later token as a decode step of its own
    /// (teacher-forced; the same logits as one full pass, through the decode path).
    #[arg(long)]
    prefill: Option<usize>,
    #[command(flatten)]
    cache: CacheArgs,
}

#[derive(Args)]
struct GenerateArgs {
    /// Checkpoint directory.
    #[arg(long)]
    model: PathBuf,
    /// Prompt text (needs the model's tokenizer.json).
    #[arg(long, conflicts_with = "tokens")]
    prompt: Option<String>,
    /// Prompt token ids, comma-separated.
    #[arg(long)]
    tokens: Option<String>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the memory report (peak RSS and its parts) as JSON here.
    #[arg(long)]
    memory_json: Option<PathBuf>,
    #[command(flatten)]
    cache: CacheArgs,
}

/// Parses the command line and runs the command.
pub fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Inspect(a) => cmd_inspect(a),
        Cmd::Logits(a) => cmd_logits(a).map(|_| ExitCode::SUCCESS),
        Cmd::Generate(a) => cmd_generate(a).map(|_| ExitCode::SUCCESS),
        Cmd::Run(a) => {
            let exp = moe_harness::experiment::load(&a.experiment, true)?;
            let opts = moe_harness::run::RunOptions {
                out_root: a.out,
                quick: a.quick,
                force: a.force,
                progress: true,
                select: a.select.selection()?,
            };
            moe_harness::run::run(&exp, &opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Plan(a) => sweep::cmd_plan(a),
        Cmd::Merge(a) => sweep::cmd_merge(a),
        Cmd::Slurm(a) => sweep::cmd_slurm(a),
        Cmd::Simulate(a) => cmd_simulate(a).map(|_| ExitCode::SUCCESS),
        Cmd::Trace(a) => trace::cmd_trace(a).map(|_| ExitCode::SUCCESS),
        Cmd::Synth(a) => {
            let layout: moe_harness::synth::SynthLayout = a.layout.parse()?;
            let shard = parse_size(&a.shard_size)
                .with_context(|| format!("--shard-size {}", a.shard_size))?;
            let r = moe_harness::synth::synth(
                &a.config,
                &a.out,
                layout,
                a.layers,
                a.seed,
                shard.max(1 << 20),
            )?;
            eprintln!(
                "wrote {} tensors, {:.2} GB in {} shards to {}",
                r.tensors,
                r.bytes as f64 / 1e9,
                r.shards,
                r.dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench(a) => {
            let device = a.device.device()?;
            let opts = moe_harness::bench::BenchOptions {
                policies: a.policy,
                capacities: a.capacity,
                prompts: a.prompts,
                prompt_len: a.prompt_len,
                new_tokens: a.tokens,
                load_threads: a.load_threads,
                seed: a.seed,
                resident: !a.no_resident,
                staging: a.storage.staging,
                read_threads: a.read_threads,
                gpu_experts: a.gpu.gpu_experts,
                gpu_attention: a.gpu.gpu_attention,
                gpu_routing: a.gpu.gpu_routing,
                gpu_graph: a.gpu.gpu_graph,
                gpu_dense: a.gpu.gpu_dense,
                dense: a.gpu.dense,
                io: a.storage.io,
                storage: a.storage.storage_device,
                threads: a.compute.threads,
                kernels: a.compute.kernels,
                replay: a.replay.map(|p| (p, a.replay_cell)),
                miss: a.miss,
                profile: a.profile,
            };
            let r = moe_harness::bench::bench(&a.model, device, &opts, |row| {
                eprintln!(
                    "{}: h {:.3}, {:.1} tok/s",
                    row.cell, row.hit_rate, row.decode_tps
                )
            })?;
            print!("{}", moe_harness::bench::format_report(&r));
            if let Some(p) = &a.json {
                moe_harness::io::write_atomic(p, serde_json::to_string_pretty(&r)?.as_bytes())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Plot(a) => {
            moe_harness::report::plot_dir(&a.dir)?;
            eprintln!("plots written to {}", a.dir.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn cmd_inspect(a: InspectArgs) -> Result<ExitCode> {
    let est = QuantParams {
        bits: a.bits,
        group_size: a.group_size,
    };
    if !matches!(a.bits, 2 | 4 | 8) || a.group_size == 0 {
        bail!("--bits must be 2, 4 or 8 and --group-size positive");
    }
    let r = inspect::inspect(&a.path, est)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{r}");
    }
    // A report was produced either way; a model the engine cannot run still exits non-zero so
    // scripts can branch on it.
    Ok(if r.verdict.runs() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// Parses `1,2,3` into token ids.
pub fn parse_tokens(s: &str) -> Result<Vec<u32>> {
    let toks: Result<Vec<u32>> = s
        .split(',')
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<u32>().with_context(|| format!("--tokens: `{t}` is not a token id (expected comma-separated non-negative integers)")))
        .collect();
    let toks = toks?;
    if toks.is_empty() {
        bail!("--tokens: no token ids given");
    }
    Ok(toks)
}

/// Opens the engine on the device `--device` names (never silently another one).
fn open_engine(model: &Path, cache: &CacheArgs, record: bool) -> Result<Engine> {
    let spec = moe_harness::models::load_spec(model)?;
    let mut cfg = cache.engine_config(spec.num_moe_layers());
    cfg.record_trace = record;
    let device = cache.device.device()?;
    let mut engine = Engine::open_with_spec(model, spec, device, cfg)?;
    if cache.all_resident {
        engine.load_all_experts()?;
    }
    Ok(engine)
}

fn cmd_logits(a: LogitsArgs) -> Result<()> {
    let tokens = parse_tokens(&a.tokens)?;
    let mut engine = open_engine(&a.model, &a.cache, false)?;
    let (logits, routing) = match a.prefill {
        Some(n) => engine.logits_stepwise(&tokens, n)?,
        None => engine.logits(&tokens)?,
    };
    let flat: Vec<f32> = logits.iter().flatten().copied().collect();
    write_npy_f32(&a.out, &flat, &[logits.len(), engine.spec().vocab_size])?;
    if let Some(path) = &a.routing {
        let map: serde_json::Map<String, serde_json::Value> = routing
            .iter()
            .map(|(l, routes)| {
                (
                    l.to_string(),
                    serde_json::json!(routes.iter().map(|r| &r.experts).collect::<Vec<_>>()),
                )
            })
            .collect();
        write_atomic(path, serde_json::to_string(&map)?.as_bytes())?;
    }
    let s = engine.stats();
    eprintln!(
        "device: {} (kernels {}, {} threads; staging {})",
        moe_harness::engine::describe(engine.model.device()),
        engine.kernels_label(),
        engine.compute_threads(),
        engine.store.staging_label()
    );
    eprintln!(
        "wrote {} ({} × {}); cache: {} accesses, {} hits, {} misses, {} expert bytes read",
        a.out.display(),
        logits.len(),
        engine.spec().vocab_size,
        s.cache.accesses,
        s.cache.hits,
        s.cache.accesses - s.cache.hits,
        s.bytes_read
    );
    Ok(())
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let tok_path = a.model.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        Some(
            tokenizers::Tokenizer::from_file(&tok_path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?,
        )
    } else {
        None
    };
    let prompt: Vec<u32> = match (&a.prompt, &a.tokens) {
        (Some(text), _) => {
            let tk = tokenizer.as_ref().with_context(|| {
                format!("--prompt needs {} (or pass --tokens)", tok_path.display())
            })?;
            tk.encode(text.as_str(), false)
                .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?
                .get_ids()
                .to_vec()
        }
        (None, Some(t)) => parse_tokens(t)?,
        (None, None) => bail!("give --prompt TEXT or --tokens IDS"),
    };
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let mut engine = open_engine(&a.model, &a.cache, false)?;
    let mut sampler = Sampler::new(a.temperature, a.seed);
    let stop: Vec<u32> = tokenizer
        .as_ref()
        .and_then(|t| t.token_to_id("<|endoftext|>"))
        .into_iter()
        .collect();
    let g = engine.generate(&prompt, a.max_tokens, &mut sampler, &stop)?;
    if let Some(line) = moe_harness::models::layers::greedy_check_report(g.tokens.len()) {
        eprintln!("{line}");
    }
    match &tokenizer {
        Some(tk) => {
            let text = tk
                .decode(&g.tokens, false)
                .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
            println!("{}{}", a.prompt.as_deref().unwrap_or(""), text);
        }
        None => println!(
            "{}",
            g.tokens
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
    let s = engine.stats();
    let misses = s.cache.accesses - s.cache.hits;
    eprintln!(
        "[{} on {} ({}, {} threads), io {}{}] cache: {} accesses, hit rate {:.1}% ({} misses), {:.1} MB read, load {:.3}s, resident {:.1} MB | prefill {:.1} tok/s ({} tokens), decode {:.1} tok/s ({} tokens)",
        engine.config().policy,
        moe_harness::engine::describe(engine.model.device()),
        engine.kernels_label(),
        engine.compute_threads(),
        engine.io().effective,
        engine
            .io()
            .device
            .map_or(String::new(), |d| format!(", storage {d}")),
        s.cache.accesses,
        100.0 * s.cache.hits as f64 / s.cache.accesses.max(1) as f64,
        misses,
        s.bytes_read as f64 / 1e6,
        s.load_seconds,
        s.resident_bytes as f64 / 1e6,
        g.prefill_tps(),
        g.prompt_len,
        g.decode_tps(),
        g.tokens.len()
    );
    if let Some(rss) = moe_harness::memory::Rss::now() {
        let m = moe_harness::memory::MemoryReport::new(
            rss,
            engine.dense_bytes(),
            s.cache.peak_resident_bytes,
            g.kv_bytes,
        );
        eprintln!("memory: {}", m.line());
        if let Some(path) = &a.memory_json {
            write_atomic(path, serde_json::to_string_pretty(&m)?.as_bytes())?;
        }
    }
    Ok(())
}

fn cmd_simulate(a: SimulateArgs) -> Result<()> {
    let study = moe_harness::simulate::TraceStudy {
        trace: a.trace,
        cell: a.cell,
        policies: a.policy,
        capacities: a.capacity,
        budgets: a.budget,
        pool: a.pool,
        model: a.model,
        expert_bytes: a.expert_bytes,
        warmup_prompts: a.warmup,
        reset_per_prompt: a.reset_per_prompt,
        classic: a.unpinned,
        miss: a.miss,
    };
    let (results, stats) = moe_harness::simulate::study(&study)?;
    if a.stats {
        let rss = moe_harness::memory::Rss::now();
        eprintln!(
            "simulate: {} accesses in {} rows ({} row groups), {} replays, {} passes ({} s), {:.2} s = {:.1} M accesses/s per replay; temporary file {} MB; peak RSS {}",
            stats.accesses,
            stats.rows,
            stats.row_groups,
            stats.replays,
            stats.passes,
            stats
                .pass_seconds
                .iter()
                .map(|s| format!("{s:.2}"))
                .collect::<Vec<_>>()
                .join(" + "),
            stats.seconds,
            stats.accesses as f64 / stats.seconds / 1e6,
            stats.future_bytes / 1_000_000,
            rss.map_or("unknown".into(), |r| format!("{} MB", r.peak / 1_000_000)),
        );
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print!("{}", moe_harness::report::simulation_table(&results));
    }
    Ok(())
}
