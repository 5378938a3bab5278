//! Routing recorded by other engines, as harness traces: `harness trace import --from FORMAT`.
//!
//! Each format's parser turns its records into rows in the order the recording engine ran them
//! (a batched pass layer by layer, all its tokens at each layer) and hands them to one [`Sink`],
//! which checks them (ids within the model's expert count, one top-k per layer, every token at
//! the same set of layers) and writes the trace through a temporary file, so a failed import
//! leaves nothing behind. What a format records and what had to be reconstructed is stored in
//! the Parquet key-value metadata (`harness trace info` prints it).
//!
//! | format | input | prompt | phase / pos |
//! |---|---|---|---|
//! | `vllm` | completion JSON (v0.21: `prompt_routed_experts` + `routed_experts` lists; v0.22+: base64 `.npy`), `.npz` with both arrays, or a bare `.npy` `[tokens, layers, top_k]` | one per request (choice) | recorded (bare `.npy`: unknown, all rows decode) |
//! | `sglang` | `expert_distribution_recorder_*.pt` (`per_token` mode) | one per forward pass | from `forward_mode` and `positions` |
//! | `megatron` | `router_trace_rank*.jsonl` (Megatron-Core `RouterTracer`) | one per micro-batch | prefill; pos = token index in the micro-batch |
//! | `llama.cpp` | `moe-trace` CSV (`layer,expert` rows, PR ggml-org/llama.cpp#28544) | one per file | prefill for multi-token passes, then decode |
//! | `moe-infinity` | `.npy [sequences, layers, experts]` activation counts | one per sequence | none: aggregate-only (no access order) |

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::config::ModelSpec;
use crate::error::{Error, Result};
use crate::experts::{Phase, MAX_EXPERT_ID};
use crate::trace::{TraceRow, TraceWriter};

mod engines;
mod logs;
pub mod npy;
pub mod torch;

/// The formats `harness trace import` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// vLLM `--enable-return-routed-experts` output.
    Vllm,
    /// SGLang expert-distribution recorder, `per_token` dumps.
    Sglang,
    /// Megatron-Core `--moe-routing-trace-path` JSONL.
    Megatron,
    /// llama.cpp `moe-trace` CSV.
    LlamaCpp,
    /// MoE-Infinity expert activation matrices (aggregate only).
    MoeInfinity,
}

/// The names [`Format`] parses from, as error messages list them.
pub const FORMATS: &str = "vllm, sglang, megatron, llama.cpp, moe-infinity";

impl FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "vllm" => Format::Vllm,
            "sglang" => Format::Sglang,
            "megatron" | "megatron-core" | "megatron-lm" => Format::Megatron,
            "llama.cpp" | "llamacpp" | "llama-cpp" => Format::LlamaCpp,
            "moe-infinity" | "moe_infinity" | "moeinfinity" => Format::MoeInfinity,
            other => {
                return Err(Error::Input(format!(
                    "unknown trace format `{other}`; supported formats: {FORMATS}"
                )))
            }
        })
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Vllm => "vllm",
            Format::Sglang => "sglang",
            Format::Megatron => "megatron",
            Format::LlamaCpp => "llama.cpp",
            Format::MoeInfinity => "moe-infinity",
        })
    }
}

/// What an import wrote.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Output file.
    pub out: PathBuf,
    /// Rows written.
    pub rows: u64,
    /// Demand accesses written.
    pub accesses: u64,
    /// Prompts (requests, passes, micro-batches or sequences, as the format has them).
    pub prompts: u64,
    /// Distinct layers.
    pub layers: usize,
    /// Records skipped, and why.
    pub skipped: Vec<String>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "wrote {}: {} rows, {} accesses, {} prompts, {} layers",
            self.out.display(),
            self.rows,
            self.accesses,
            self.prompts,
            self.layers
        )?;
        for s in &self.skipped {
            write!(f, "\n  skipped: {s}")?;
        }
        Ok(())
    }
}

/// One row as a parser produces it.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub prompt: u32,
    pub step: u32,
    pub pos: u32,
    pub phase: Phase,
    /// Layer as the format numbers it (mapped by [`Sink::layer`] when needed).
    pub layer: u32,
    pub experts: Vec<u32>,
    /// Identifies the row's token for the every-layer check (unique per token of the import).
    pub token: u64,
}

/// Checks rows and writes them.
pub(crate) struct Sink<'a> {
    writer: TraceWriter,
    spec: Option<&'a ModelSpec>,
    /// The file being read (named in errors).
    pub file: PathBuf,
    top_k: HashMap<u32, (usize, String)>,
    tokens: HashMap<u64, (u32, String)>,
    layers: std::collections::BTreeSet<u32>,
    check_top_k: bool,
    summary: Summary,
    prompts: std::collections::BTreeSet<u32>,
}

impl<'a> Sink<'a> {
    /// The layer a format numbered `index` (decoder layer, or MoE-layer ordinal when the axis
    /// has one entry per MoE layer of the model and `ordinal_axis` is its length).
    pub fn layer(&self, index: usize, axis: usize) -> u32 {
        match self.spec {
            Some(s) if axis == s.moe.moe_layers.len() && axis != s.num_layers => s
                .moe
                .moe_layers
                .get(index)
                .map_or(index as u32, |&l| l as u32),
            _ => index as u32,
        }
    }

    /// True if `layer` is not a MoE layer of the model (rows there are not routing).
    pub fn dense(&self, layer: u32) -> bool {
        self.spec.is_some_and(|s| !s.is_moe_layer(layer as usize))
    }

    /// Notes a skipped record.
    pub fn skip(&mut self, why: String) {
        if self.summary.skipped.len() < 20 {
            self.summary.skipped.push(why);
        }
    }

    /// Checks and writes one row; `at` names its record in errors.
    pub fn row(&mut self, at: &str, r: Row) -> Result<()> {
        let bad = |m: String| Error::format(&self.file, format!("{at}: {m}"));
        if r.experts.is_empty() {
            return Err(bad(format!("layer {}: no experts selected", r.layer)));
        }
        let n = self
            .spec
            .map_or(MAX_EXPERT_ID as usize, |s| s.moe.num_experts);
        for (j, &e) in r.experts.iter().enumerate() {
            if e as usize >= n {
                return Err(bad(match self.spec {
                    Some(_) => format!(
                        "layer {}: expert {e} is out of range: the model has {n} routed experts",
                        r.layer
                    ),
                    None => format!(
                        "layer {}: expert {e} is out of range (ids must be < {n})",
                        r.layer
                    ),
                }));
            }
            if r.experts[..j].contains(&e) {
                return Err(bad(format!(
                    "layer {}: expert {e} selected twice for one token",
                    r.layer
                )));
            }
        }
        if let Some(s) = self.spec {
            if !s.is_moe_layer(r.layer as usize) {
                return Err(bad(format!(
                    "layer {} is not a MoE layer of the model (MoE layers: {:?})",
                    r.layer, s.moe.moe_layers
                )));
            }
        }
        if self.check_top_k {
            let k = r.experts.len();
            if let Some(s) = self.spec.filter(|s| s.moe.top_k != k) {
                return Err(bad(format!(
                    "layer {}: {k} experts for one token, but the model routes top-{}",
                    r.layer, s.moe.top_k
                )));
            }
            match self.top_k.get(&r.layer) {
                Some((k0, first)) if *k0 != k => {
                    return Err(bad(format!(
                    "layer {}: top-k varies within the layer: {k} experts here, {k0} at {first}",
                    r.layer
                )))
                }
                Some(_) => {}
                None => {
                    self.top_k.insert(r.layer, (k, at.to_string()));
                }
            }
        }
        let e = self
            .tokens
            .entry(r.token)
            .or_insert_with(|| (0, at.to_string()));
        e.0 += 1;
        self.layers.insert(r.layer);
        self.prompts.insert(r.prompt);
        self.summary.rows += 1;
        self.summary.accesses += r.experts.len() as u64;
        self.writer.push(TraceRow {
            prompt: r.prompt,
            step: r.step,
            pos: r.pos,
            phase: r.phase,
            layer: r.layer,
            experts: r.experts,
            weights: Vec::new(),
            lookahead: None,
            hits: Vec::new(),
            load_ns: 0,
        })
    }

    fn finish(self) -> Result<Summary> {
        let n = self.layers.len() as u32;
        if self.check_top_k {
            if let Some((_, (c, at))) = self.tokens.iter().find(|(_, (c, _))| *c != n) {
                return Err(Error::format(
                    &self.file,
                    format!("{at}: this token has routing at {c} of the trace's {n} MoE layers (layers missing from some tokens)"),
                ));
            }
        }
        let mut summary = self.summary;
        summary.layers = self.layers.len();
        summary.prompts = self.prompts.len() as u64;
        self.writer.finish()?;
        Ok(summary)
    }
}

/// Imports `inputs` (read in order, their prompts numbered on from one another) as `format`
/// into a trace at `out`, checking ids against `spec` when given (`source` names it).
pub fn import(
    format: Format,
    inputs: &[PathBuf],
    out: &Path,
    spec: Option<&ModelSpec>,
    source: Option<&PathBuf>,
) -> Result<Summary> {
    let files = inputs
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let (prompt, phase, order) = match format {
        Format::Vllm => (
            "request",
            "recorded (a bare .npy: unknown, rows marked decode)",
            "execution",
        ),
        Format::Sglang => (
            "forward pass (a batch; requests are not identified)",
            "from forward_mode; pos from positions",
            "execution",
        ),
        Format::Megatron => (
            "micro-batch",
            "prefill (training forward); pos = token index in the micro-batch",
            "execution",
        ),
        Format::LlamaCpp => (
            "input file",
            "prefill for multi-token passes, then decode",
            "execution",
        ),
        Format::MoeInfinity => ("sequence", "unknown", "aggregate"),
    };
    let meta = vec![
        ("moe_harness.source".to_string(), "import".to_string()),
        ("moe_harness.format".to_string(), format.to_string()),
        ("moe_harness.files".to_string(), files),
        (
            "moe_harness.model".to_string(),
            source.map_or("none".into(), |p| p.display().to_string()),
        ),
        ("moe_harness.prompt".to_string(), prompt.to_string()),
        ("moe_harness.phase".to_string(), phase.to_string()),
        ("moe_harness.order".to_string(), order.to_string()),
    ];
    let mut sink = Sink {
        writer: TraceWriter::create(out, "", meta)?,
        spec,
        file: inputs.first().cloned().unwrap_or_default(),
        top_k: HashMap::new(),
        tokens: HashMap::new(),
        layers: Default::default(),
        check_top_k: format != Format::MoeInfinity,
        summary: Summary {
            out: out.to_path_buf(),
            ..Summary::default()
        },
        prompts: Default::default(),
    };
    let mut next_prompt = 0u32;
    let mut next_token = 0u64;
    for input in inputs {
        sink.file = input.clone();
        let (p, t) = match format {
            Format::Vllm => engines::vllm(&mut sink, input, next_prompt, next_token)?,
            Format::Sglang => engines::sglang(&mut sink, input, next_prompt, next_token)?,
            Format::Megatron => logs::megatron(&mut sink, input, next_prompt, next_token)?,
            Format::LlamaCpp => logs::llama_cpp(&mut sink, input, next_prompt, next_token)?,
            Format::MoeInfinity => logs::moe_infinity(&mut sink, input, next_prompt, next_token)?,
        };
        next_prompt = p;
        next_token = t;
    }
    if sink.summary.rows == 0 {
        return Err(Error::Input(format!(
            "{}: no routing found in the input{}",
            inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            if sink.summary.skipped.is_empty() {
                String::new()
            } else {
                format!(" (skipped: {})", sink.summary.skipped.join("; "))
            }
        )));
    }
    sink.finish()
}

/// Converts a routing value to an expert id: negative values (padding) give `None`; non-integers
/// are an error naming `at`.
pub(crate) fn id(file: &Path, at: &str, v: f64) -> Result<Option<u32>> {
    if v.fract() != 0.0 || !v.is_finite() {
        return Err(Error::format(
            file,
            format!("{at}: expert id {v} is not an integer"),
        ));
    }
    if v < 0.0 {
        return Ok(None);
    }
    if v >= MAX_EXPERT_ID as f64 {
        return Err(Error::format(
            file,
            format!("{at}: expert id {v} is out of range (ids must be < {MAX_EXPERT_ID})"),
        ));
    }
    Ok(Some(v as u32))
}
