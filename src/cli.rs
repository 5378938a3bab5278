//! Command-line parsing (clap) and dispatch. Stage one: raw validated values from the command
//! line; stage two: the library objects built from them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use moe_harness::config::QuantParams;
use moe_harness::engine::{Engine, EngineConfig, MissMode, Sampler};
use moe_harness::experts::cache::Budget;
use moe_harness::experts::policies::PolicySpec;
use moe_harness::inspect;
use moe_harness::io::{parse_size, write_atomic, write_npy_f32};

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
    /// summaries and plots under results/<experiment>/<run-id>/.
    Run(RunArgs),
    /// Redraw the plots of a results directory from its Parquet files.
    Plot(PlotArgs),
    /// Replay a routing trace under every policy × budget and report hit rates.
    Simulate(SimulateArgs),
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
    /// Compute device: cpu, cuda or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Policies, comma-separated.
    #[arg(long, default_value = "lru,lookahead", value_delimiter = ',')]
    policy: Vec<String>,
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
    /// Expert loader threads (0: inline). Default: 0 on the CPU, min(top_k, 8) on a GPU.
    #[arg(long)]
    load_threads: Option<usize>,
    /// Prompt seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip the all-resident cell.
    #[arg(long)]
    no_resident: bool,
    /// Reader threads per expert upload on CUDA (default 4).
    #[arg(long)]
    read_threads: Option<usize>,
    /// Resident form of MLX-quantized experts on CUDA: packed (checkpoint bytes, decoded in the
    /// matrix-vector kernel) or f32 (decoded once at upload).
    #[arg(long, default_value = "packed", value_parser = ["packed", "f32"])]
    gpu_experts: String,
    /// Pinned staging buffers on CUDA: write-combined or cacheable.
    #[arg(long, default_value = "write-combined", value_parser = ["write-combined", "cacheable"])]
    staging: String,
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
    /// Comma-separated policies, e.g. lru,lfu,lcp,lookahead,belady.
    #[arg(long, default_value = "lru,lfu,lcp,lookahead,belady")]
    policy: String,
    /// Comma-separated expert slots per layer.
    #[arg(long)]
    capacity: Option<String>,
    /// Comma-separated byte budgets (needs --model or --expert-bytes for expert sizes).
    #[arg(long)]
    budget: Option<String>,
    /// How byte budgets are shared: one global pool, or split equally per layer.
    #[arg(long, default_value = "global", value_parser = ["global", "per-layer"])]
    pool: String,
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
    /// Print JSON (one object per policy × budget).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RunArgs {
    /// Experiment TOML, e.g. experiments/default.toml.
    experiment: PathBuf,
    /// Results root (default: the experiment's `output.dir`, else ./results).
    #[arg(long)]
    out: Option<PathBuf>,
    /// CI-friendly quick mode: 3 prompts, 1 warm-up, at most 8 new tokens.
    #[arg(long)]
    quick: bool,
    /// Run again even if complete results exist.
    #[arg(long)]
    force: bool,
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
    #[arg(long)]
    pub budget: Option<String>,
    /// How a byte budget is shared: one global pool, or split equally per layer.
    #[arg(long, default_value = "global", value_parser = ["global", "per-layer"])]
    pub pool: String,
    /// Eviction policy: lru, lfu, lfu-decay0.9, lcp-0.25-128, lookahead, static-N…
    #[arg(long, default_value = "lru")]
    pub policy: String,
    /// Miss handling: load (exact) or skip (drop the missing expert, renormalise).
    #[arg(long, default_value = "load")]
    pub miss: String,
    /// Compute device: cpu, cuda (needs --features cuda) or metal (--features metal).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Expert loader threads (0: load inline). Default: 0 on the CPU, min(top_k, 8) on a GPU.
    #[arg(long)]
    pub load_threads: Option<usize>,
    /// Resident form of MLX-quantized experts on CUDA: packed (checkpoint bytes, decoded in the
    /// matrix-vector kernel) or f32 (decoded once at upload).
    #[arg(long, default_value = "packed", value_parser = ["packed", "f32"])]
    pub gpu_experts: String,
}

impl CacheArgs {
    /// Builds the engine configuration.
    pub fn engine_config(&self, moe_layers: usize) -> Result<EngineConfig> {
        let budget = match (self.capacity, &self.budget) {
            (Some(n), _) => Budget::SlotsPerLayer(n),
            (None, Some(s)) => {
                let b = parse_size(s).with_context(|| format!("--budget {s}"))?;
                if self.pool == "per-layer" {
                    Budget::BytesPerLayer(b / moe_layers.max(1) as u64)
                } else {
                    Budget::BytesGlobal(b)
                }
            }
            (None, None) => Budget::Unlimited,
        };
        let policy =
            PolicySpec::parse(&self.policy).with_context(|| format!("--policy {}", self.policy))?;
        let miss: MissMode = self.miss.parse().context("--miss")?;
        Ok(EngineConfig {
            budget,
            policy,
            miss,
            record_trace: false,
            load_threads: self.load_threads,
            gpu_packed: self.gpu_experts == "packed",
        })
    }
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
            };
            moe_harness::run::run(&exp, &opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Simulate(a) => cmd_simulate(a).map(|_| ExitCode::SUCCESS),
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
            let device = moe_harness::engine::device(&a.device)?;
            let opts = moe_harness::bench::BenchOptions {
                policies: a.policy,
                capacities: a.capacity,
                prompts: a.prompts,
                prompt_len: a.prompt_len,
                new_tokens: a.tokens,
                load_threads: a.load_threads,
                seed: a.seed,
                resident: !a.no_resident,
                write_combined: a.staging == "write-combined",
                read_threads: a.read_threads,
                gpu_packed: a.gpu_experts == "packed",
                replay: a.replay.map(|p| (p, a.replay_cell)),
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

fn open_engine(model: &Path, cache: &CacheArgs, record: bool) -> Result<Engine> {
    let spec = moe_harness::config::load(model)?;
    let mut cfg = cache.engine_config(spec.num_moe_layers())?;
    cfg.record_trace = record;
    Ok(Engine::open_with_spec(
        model,
        spec,
        candle_core::Device::Cpu,
        cfg,
    )?)
}

fn cmd_logits(a: LogitsArgs) -> Result<()> {
    let tokens = parse_tokens(&a.tokens)?;
    let mut engine = open_engine(&a.model, &a.cache, false)?;
    let (logits, routing) = engine.logits(&tokens)?;
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
        "[{}] cache: {} accesses, hit rate {:.1}% ({} misses), {:.1} MB read, load {:.3}s, resident {:.1} MB | prefill {:.1} tok/s ({} tokens), decode {:.1} tok/s ({} tokens)",
        engine.config().policy,
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
    Ok(())
}

fn split_list(s: &str) -> Vec<&str> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .collect()
}

fn cmd_simulate(a: SimulateArgs) -> Result<()> {
    use moe_harness::simulate::{simulate_measured, SimOptions, TraceRow};
    let rows = moe_harness::trace::read(&a.trace)?;
    if rows.is_empty() {
        bail!("{}: the trace has no rows", a.trace.display());
    }
    let mut cells: Vec<&str> = Vec::new();
    for r in &rows {
        if !cells.contains(&r.cell.as_str()) {
            cells.push(&r.cell);
        }
    }
    let cell = match &a.cell {
        Some(c) if !cells.contains(&c.as_str()) => {
            bail!("--cell {c}: not in the trace (cells: {})", cells.join(", "))
        }
        Some(c) => c.clone(),
        None => {
            if cells.len() > 1 {
                eprintln!(
                    "the trace holds {} cells; replaying `{}` (choose with --cell)",
                    cells.len(),
                    cells[0]
                );
            }
            cells[0].to_string()
        }
    };
    let rows: Vec<TraceRow> = rows
        .iter()
        .filter(|r| r.cell == cell)
        .map(|r| TraceRow::from(&r.rec))
        .collect();
    let mut layers: Vec<u32> = rows.iter().map(|r| r.layer).collect();
    layers.sort_unstable();
    layers.dedup();
    // Expert sizes and id checks from the model, when given.
    let store = match &a.model {
        Some(dir) => {
            let spec = moe_harness::config::load(dir)?;
            for r in &rows {
                if !spec.is_moe_layer(r.layer as usize) {
                    bail!(
                        "{}: layer {} is not a MoE layer of {} (MoE layers: {:?})",
                        a.trace.display(),
                        r.layer,
                        dir.display(),
                        spec.moe.moe_layers
                    );
                }
                if let Some(e) = r
                    .experts
                    .iter()
                    .chain(r.lookahead.iter().flatten())
                    .find(|&&e| e as usize >= spec.moe.num_experts)
                {
                    bail!(
                        "{}: expert {e} at layer {} is out of range: {} has {} routed experts",
                        a.trace.display(),
                        r.layer,
                        dir.display(),
                        spec.moe.num_experts
                    );
                }
            }
            let ck = std::sync::Arc::new(moe_harness::weights::Checkpoint::open(dir)?);
            let prefix = moe_harness::weights::layout::detect_prefix(&ck)?;
            let lay = moe_harness::weights::layout::detect_experts(&ck, &spec, &prefix)?;
            Some(moe_harness::experts::store::ExpertStore::new(
                ck,
                &spec,
                &prefix,
                lay,
                candle_core::Device::Cpu,
            )?)
        }
        None => None,
    };
    let unit = a.expert_bytes.unwrap_or(1);
    let size =
        |k: moe_harness::experts::ExpertKey| store.as_ref().map_or(unit, |s| s.expert_bytes(k));
    let mut budgets = Vec::new();
    for c in a.capacity.as_deref().map(split_list).unwrap_or_default() {
        let n: usize = c
            .parse()
            .with_context(|| format!("--capacity: `{c}` is not a number of slots"))?;
        budgets.push(Budget::SlotsPerLayer(n));
    }
    for b in a.budget.as_deref().map(split_list).unwrap_or_default() {
        if store.is_none() && a.expert_bytes.is_none() {
            bail!("--budget needs expert sizes: pass --model DIR (the checkpoint the trace came from) or --expert-bytes N");
        }
        let n = parse_size(b).with_context(|| format!("--budget {b}"))?;
        budgets.push(if a.pool == "per-layer" {
            Budget::BytesPerLayer(n / layers.len().max(1) as u64)
        } else {
            Budget::BytesGlobal(n)
        });
    }
    if budgets.is_empty() {
        bail!("give --capacity N[,N…] and/or --budget SIZE[,SIZE…]");
    }
    let policies: Vec<PolicySpec> = split_list(&a.policy)
        .iter()
        .map(|p| PolicySpec::parse(p).with_context(|| format!("--policy {p}")))
        .collect::<Result<_>>()?;
    let mut results = Vec::new();
    for p in &policies {
        for b in &budgets {
            let opts = SimOptions {
                classic: a.unpinned,
                profile: None,
            };
            let res = if a.reset_per_prompt {
                let mut by: std::collections::BTreeMap<u32, Vec<TraceRow>> = Default::default();
                for r in &rows {
                    by.entry(r.prompt).or_default().push(r.clone());
                }
                let parts: Vec<_> = by
                    .values()
                    .map(|g| {
                        simulate_measured(g, p, *b, size, &layers, &opts, |r| r.prompt >= a.warmup)
                    })
                    .collect::<std::result::Result<_, _>>()?;
                moe_harness::simulate::merge_results(&parts)
            } else {
                simulate_measured(&rows, p, *b, size, &layers, &opts, |r| r.prompt >= a.warmup)?
            };
            results.push(res);
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print!("{}", moe_harness::simulate::format_table(&results));
    }
    Ok(())
}
