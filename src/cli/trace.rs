//! `harness trace synth|export|import|info`: routing traces made, converted and inspected
//! without running a model.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};

use moe_harness::trace::import::Format;

/// `harness trace …`.
#[derive(Args)]
pub struct TraceArgs {
    #[command(subcommand)]
    cmd: TraceCmd,
}

#[derive(Subcommand)]
enum TraceCmd {
    /// Write a seeded synthetic trace of any length (Zipf popularity per layer plus temporal
    /// reuse), streamed to Parquet row group by row group.
    Synth(SynthTraceArgs),
    /// Convert a trace to another simulator's input.
    Export(ExportArgs),
    /// Convert routing recorded by another engine (vLLM, SGLang, Megatron-Core, llama.cpp,
    /// MoE-Infinity) into a harness trace.
    Import(ImportArgs),
    /// Rows, accesses, row groups, cells and provenance of a trace file.
    Info(InfoArgs),
}

#[derive(Args)]
struct SynthTraceArgs {
    /// Output Parquet file.
    #[arg(long)]
    out: PathBuf,
    /// Demand accesses to write (rounded down to whole tokens).
    #[arg(long)]
    accesses: u64,
    /// MoE layers (ids 0..N).
    #[arg(long, default_value_t = 48)]
    layers: u32,
    /// Routed experts per layer.
    #[arg(long, default_value_t = 512)]
    experts: u32,
    /// Experts selected per token and layer.
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// Zipf exponent of each layer's expert popularity.
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    /// Probability that an expert slot reuses one of the previous token's experts.
    #[arg(long, default_value_t = 0.5)]
    reuse: f64,
    /// Seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    /// libCacheSim's `oracleGeneral` binary (u32 time, u64 object id = layer·2^20 + expert,
    /// u32 size 1, i64 next access index or -1), one record per demand access.
    Libcachesim,
}

#[derive(Args)]
struct ExportArgs {
    /// Target format.
    #[arg(long, value_enum)]
    to: ExportFormat,
    /// Trace Parquet.
    input: PathBuf,
    /// Output file.
    output: PathBuf,
    /// Which cell of a multi-cell run trace (default: the first).
    #[arg(long)]
    cell: Option<String>,
}

#[derive(Args)]
struct ImportArgs {
    /// Source format: vllm (routed-experts JSON / .npz / .npy), sglang (per_token
    /// expert_distribution_recorder_*.pt), megatron (router_trace_rank*.jsonl), llama.cpp
    /// (moe-trace CSV), moe-infinity (activation-count .npy, aggregate only). See the README,
    /// "Importing routing from other engines".
    #[arg(long = "from", value_parser = parse_format)]
    from: Format,
    /// Input files (several: their requests follow one another, as prompts 0, 1, …).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output trace Parquet.
    #[arg(long)]
    out: PathBuf,
    /// Checkpoint the routing came from: its expert count and top-k check the ids.
    #[arg(long, conflicts_with = "config")]
    model: Option<PathBuf>,
    /// A bare config.json of the model, in place of --model.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct InfoArgs {
    /// Trace Parquet.
    trace: PathBuf,
}

fn parse_format(s: &str) -> std::result::Result<Format, String> {
    s.parse::<Format>().map_err(|e| e.to_string())
}

/// Runs `harness trace …`.
pub fn cmd_trace(a: TraceArgs) -> Result<()> {
    match a.cmd {
        TraceCmd::Synth(a) => {
            let layers: Vec<u32> = (0..a.layers).collect();
            let per_token = a.layers as u64 * a.top_k.min(a.experts as usize) as u64;
            if a.layers == 0 || a.experts == 0 || a.top_k == 0 {
                anyhow::bail!("--layers, --experts and --top-k must be at least 1");
            }
            if a.top_k > a.experts as usize {
                anyhow::bail!("--top-k {} exceeds --experts {}", a.top_k, a.experts);
            }
            let tokens = (a.accesses / per_token) as usize;
            if tokens == 0 {
                anyhow::bail!(
                    "--accesses {} is less than one token ({per_token} accesses)",
                    a.accesses
                );
            }
            let meta = vec![
                ("moe_harness.source".to_string(), "synthetic".to_string()),
                (
                    "moe_harness.synthetic".to_string(),
                    format!(
                        "seed={} tokens={tokens} layers={} experts={} top_k={} zipf={} reuse={}",
                        a.seed, a.layers, a.experts, a.top_k, a.zipf, a.reuse
                    ),
                ),
            ];
            let mut w = moe_harness::trace::TraceWriter::create(&a.out, "", meta)?;
            let mut g = moe_harness::synth::SyntheticTrace::new(
                a.seed, tokens, &layers, a.experts, a.top_k, a.zipf, a.reuse,
            );
            while let Some(rows) = g.next_token() {
                for r in rows {
                    w.push(r)?;
                }
            }
            let rows = w.finish()?;
            eprintln!(
                "wrote {}: {rows} rows, {} accesses ({tokens} tokens × {} layers × top-{})",
                a.out.display(),
                tokens as u64 * per_token,
                a.layers,
                a.top_k
            );
            Ok(())
        }
        TraceCmd::Export(a) => match a.to {
            ExportFormat::Libcachesim => {
                let n = moe_harness::simulate::export::libcachesim(
                    &a.input,
                    a.cell.as_deref(),
                    &a.output,
                )?;
                eprintln!("wrote {}: {n} requests", a.output.display());
                Ok(())
            }
        },
        TraceCmd::Import(a) => {
            let model = match (&a.model, &a.config) {
                (Some(dir), _) => Some(moe_harness::models::load_spec(dir)?),
                (None, Some(cfg)) => Some(moe_harness::models::load_spec(cfg)?),
                (None, None) => None,
            };
            let source = a.model.as_ref().or(a.config.as_ref());
            let summary = moe_harness::trace::import::import(
                a.from,
                &a.inputs,
                &a.out,
                model.as_ref(),
                source,
            )?;
            eprintln!("{summary}");
            Ok(())
        }
        TraceCmd::Info(a) => {
            let f = moe_harness::trace::TraceFile::open(&a.trace)?;
            println!("file: {}", a.trace.display());
            println!("rows: {}", f.rows());
            println!("row groups: {}", f.groups());
            for (k, v) in f.key_values() {
                if k.starts_with("moe_harness.") {
                    println!("{}: {v}", k.trim_start_matches("moe_harness."));
                }
            }
            Ok(())
        }
    }
}
