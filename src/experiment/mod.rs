//! Experiment files: a TOML that names a model, policies, budgets, miss handling, prompts and
//! generation settings. Two stages, as in ripgrep: a raw serde struct that rejects unknown keys,
//! then a resolved [`Experiment`] with every path checked and every list expanded into a sweep
//! of [`Cell`]s (the cartesian product; each cell is one run).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::{Backend, MissMode};
use crate::error::{Error, Result};
use crate::experts::budget::parse_size;
use crate::experts::budget::Pool;
use crate::experts::policies::PolicySpec;
use crate::experts::upload::Staging;
use crate::weights::kernels::Kernels;
use crate::weights::storage::{DeviceModel, IoMode};

/// The values of a key that takes one value or a list (`policy = "lru"` or
/// `policy = ["lru", "lfu"]`), each checked with `parse`; an empty list is an error (it would
/// silently sweep nothing).
fn one_or_many<T>(
    file: &Path,
    field: &str,
    v: &toml::Value,
    what: &str,
    parse: impl Fn(&toml::Value) -> std::result::Result<T, String>,
) -> Result<Vec<T>> {
    let items: Vec<&toml::Value> = match v {
        toml::Value::Array(list) if list.is_empty() => {
            return Err(Error::config(
                file,
                field,
                format!("an empty list sweeps nothing: give {what}, or a list of them, or leave the key out"),
            ))
        }
        toml::Value::Array(list) => list.iter().collect(),
        one => vec![one],
    };
    items
        .into_iter()
        .map(|x| {
            parse(x).map_err(|why| {
                Error::config(
                    file,
                    field,
                    format!("`{x}`: {why} (expected {what}, or a list of them)"),
                )
            })
        })
        .collect()
}

/// A string naming one value of a serde enum (`load`, `skip`…).
fn named<T: serde::de::DeserializeOwned>(v: &toml::Value) -> std::result::Result<T, String> {
    match v {
        toml::Value::String(_) => v
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string().trim_end().to_string()),
        _ => Err("not a string".into()),
    }
}

/// The experiment file as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawExperiment {
    /// Experiment name (default: the file stem); names the results directory.
    pub name: Option<String>,
    /// Free text.
    pub description: Option<String>,
    /// Which model.
    pub model: RawModel,
    /// Policies, budgets, miss handling.
    #[serde(default)]
    pub cache: RawCache,
    /// Prompts.
    pub prompts: RawPrompts,
    /// Generation.
    #[serde(default)]
    pub generation: RawGeneration,
    /// Output.
    #[serde(default)]
    pub output: RawOutput,
    /// Storage.
    #[serde(default)]
    pub storage: RawStorage,
    /// How the CPU computes.
    #[serde(default)]
    pub engine: RawEngine,
}

/// `[engine]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawEngine {
    /// CPU compute threads (default: every core).
    pub threads: Option<usize>,
    /// `exact` (default) or `int8` packed 4-bit products on the CPU.
    pub kernels: Option<Kernels>,
}

/// `[model]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// Checkpoint directory, relative to the experiment file.
    pub path: Option<String>,
    /// Environment variable that, when set, overrides `path` (for big local models).
    pub env: Option<String>,
    /// Bundled `config.json` for `harness inspect` when the weights are absent.
    pub config: Option<String>,
    /// Where to get the weights, shown when they are missing.
    pub download: Option<String>,
    /// `cpu` (default), `cuda` or `metal`.
    pub backend: Option<Backend>,
    /// Measure speed on a random-weight checkpoint of a real model's shapes (written by
    /// `harness synth` on first use and cached), replaying this model's routing: hit rates come
    /// from this model, tokens/s from real expert sizes.
    pub replay_on: Option<RawReplayOn>,
}

/// `[model] replay_on = { config = "…", layers = N, layout = "mlx4", prompts = N }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawReplayOn {
    /// The real model's `config.json`, relative to the experiment file.
    pub config: String,
    /// Keep its first N decoder layers (their MoE layers must be this model's).
    pub layers: usize,
    /// `mlx4` (default), `mlx8` or `bf16`.
    #[serde(default = "default_layout")]
    pub layout: String,
    /// Replay only the first N measured prompts (default: all).
    pub prompts: Option<usize>,
    /// Replay only the cells of these policies (default: every cell); the others measure speed
    /// on the experiment's own model, and say so.
    pub policies: Option<Vec<String>>,
    /// Replay at most this many new tokens of each prompt (default: all recorded).
    pub max_new_tokens: Option<usize>,
    /// Replay only the last N warm-up prompts (default: all).
    pub warmup: Option<usize>,
}

fn default_layout() -> String {
    "mlx4".into()
}

/// `[storage]`: how expert misses reach storage, and what storage they stand for.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    /// `page-cache` (default), `direct` or `cold`.
    pub io: Option<IoMode>,
    /// A preset name, or `{ read_gbps, latency_us, queue_depth }`.
    pub device: Option<toml::Value>,
    /// Refuse cells whose dense weights + expert cache + KV cache would exceed this (`32GiB`).
    pub memory_limit: Option<String>,
    /// How CUDA misses reach the copy engine: `auto` (default), `registered`, `write-combined`
    /// or `cacheable`.
    pub staging: Option<Staging>,
}

/// `[cache]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    /// Policy name(s).
    #[serde(default = "default_policy")]
    pub policy: toml::Value,
    /// Expert slots per MoE layer (a positive integer or a list of them).
    pub capacity: Option<toml::Value>,
    /// Byte budgets: sizes (`512MiB`) or fractions of total expert bytes (`25%`, `0.25`).
    pub budget: Option<toml::Value>,
    /// `global` (one pool, default) or `per-layer` for byte budgets.
    pub pool: Option<Pool>,
    /// `load` (default), `skip`, `substitute`, `low-bit`, `cpu-compute`, or a list of them.
    #[serde(default = "default_miss")]
    pub miss: toml::Value,
    /// The lower-precision checkpoint of the same model that `low-bit` misses read (relative
    /// to the experiment file).
    pub low_bit: Option<PathBuf>,
    /// Keep the cache between prompts, as in a serving session (default true).
    #[serde(default = "yes")]
    pub carry_over: bool,
    /// Expert loader threads (0: load inline on the engine thread). Default: on the CPU 0
    /// through the page cache, `min(top_k, 4)` with direct/cold reads; `min(top_k, 8)` on a GPU.
    pub load_threads: Option<usize>,
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache {
            policy: default_policy(),
            capacity: None,
            budget: None,
            pool: None,
            load_threads: None,
            miss: default_miss(),
            low_bit: None,
            carry_over: true,
        }
    }
}

/// `[prompts]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrompts {
    /// A file: plain text (one prompt per line) or JSONL with `prompt` and optional `id`.
    pub file: Option<String>,
    /// Prompts inline.
    pub inline: Option<Vec<String>>,
    /// Wrap each prompt in the model's chat template (`tokenizer_config.json`).
    #[serde(default)]
    pub chat_template: bool,
    /// Leading prompts run first and excluded from statistics.
    #[serde(default)]
    pub warmup: usize,
    /// Use only the first N prompts (after warm-up).
    pub limit: Option<usize>,
    /// A prompt longer than the model's context (or than memory allows) is cut to its last
    /// tokens that fit, and the cut is recorded in `env.json`, instead of failing the run.
    #[serde(default)]
    pub truncate: bool,
}

/// `[generation]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawGeneration {
    /// New tokens per prompt.
    #[serde(default = "default_max_new")]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[serde(default)]
    pub temperature: f32,
    /// Sampling seed.
    #[serde(default)]
    pub seed: u64,
    /// Speed is measured this many times per cell (min, median and max are reported).
    #[serde(default = "one")]
    pub repeats: usize,
}

fn one() -> usize {
    1
}

impl Default for RawGeneration {
    fn default() -> Self {
        RawGeneration {
            max_new_tokens: default_max_new(),
            temperature: 0.0,
            seed: 0,
            repeats: 1,
        }
    }
}

/// `[output]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutput {
    /// Results root, relative to the experiment file (default: `results/` of the working directory).
    pub dir: Option<String>,
    /// Also draw plots after the run (default true).
    pub plots: Option<bool>,
}

fn default_policy() -> toml::Value {
    toml::Value::String("lru".into())
}
fn default_miss() -> toml::Value {
    toml::Value::String("load".into())
}
fn default_max_new() -> usize {
    32
}
fn yes() -> bool {
    true
}

/// A budget as the experiment states it (fractions resolve once the model is known).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetSpec {
    /// No limit.
    Unlimited,
    /// Expert slots per MoE layer.
    Capacity(usize),
    /// Bytes.
    Bytes(u64),
    /// Fraction of the model's total expert bytes.
    Fraction(f64),
}

impl std::fmt::Display for BudgetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BudgetSpec::Unlimited => write!(f, "unlimited"),
            BudgetSpec::Capacity(n) => write!(f, "cap{n}"),
            BudgetSpec::Bytes(b) => write!(f, "{b}B"),
            BudgetSpec::Fraction(x) => write!(f, "{}pct", x * 100.0),
        }
    }
}

/// One run of the sweep.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// Stable id, e.g. `lru_cap8_load`.
    pub id: String,
    /// Policy.
    #[serde(serialize_with = "ser_display")]
    pub policy: PolicySpec,
    /// Budget.
    pub budget: BudgetSpec,
    /// Miss handling.
    pub miss: MissMode,
}

fn ser_display<S: serde::Serializer, T: std::fmt::Display>(
    v: &T,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
}

/// One prompt.
#[derive(Debug, Clone, Serialize)]
pub struct Prompt {
    /// Its id (line number or JSONL `id`).
    pub id: String,
    /// Where it was written: `file:line`, or `inline[n]`, for error messages.
    pub source: String,
    /// Its text.
    pub text: String,
}

/// A resolved experiment.
#[derive(Debug, Clone, Serialize)]
pub struct Experiment {
    /// Name.
    pub name: String,
    /// The experiment file.
    pub file: PathBuf,
    /// Checkpoint directory.
    pub model_dir: PathBuf,
    /// Compute backend.
    pub backend: Backend,
    /// Sweep cells.
    pub cells: Vec<Cell>,
    /// How byte budgets are shared.
    pub pool: Pool,
    /// Keep the cache between prompts.
    pub carry_over: bool,
    /// Expert loader threads (`None`: the engine's default for the device).
    pub load_threads: Option<usize>,
    /// The low-precision copy `low-bit` misses read.
    pub low_bit: Option<PathBuf>,
    /// CPU compute threads (`None`: every core).
    pub threads: Option<usize>,
    /// Kernel kind of the CPU's packed products.
    pub kernels: Kernels,
    /// Warm-up prompts (run first, excluded from statistics).
    pub warmup: Vec<Prompt>,
    /// Measured prompts.
    pub prompts: Vec<Prompt>,
    /// Apply the chat template.
    pub chat_template: bool,
    /// Cut prompts that do not fit instead of failing.
    pub truncate: bool,
    /// Generation settings.
    pub generation: RawGeneration,
    /// Results root.
    pub out_root: PathBuf,
    /// Draw plots.
    pub plots: bool,
    /// The file as parsed (written back into the results).
    pub raw: RawExperiment,
    /// How misses reach storage.
    pub storage: StorageSpec,
    /// Where speed is measured, when not on the model itself.
    pub replay_on: Option<ReplayOn>,
}

/// `[storage]` resolved.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StorageSpec {
    /// How misses read the shards.
    pub io: IoMode,
    /// The emulated device: its name (a preset's, or `custom`) and figures.
    pub device: Option<(String, DeviceModel)>,
    /// Memory cells may use (dense + expert cache + KV), bytes.
    pub memory_limit: Option<u64>,
    /// How CUDA misses reach the copy engine.
    pub staging: Staging,
}

/// `[model] replay_on` resolved.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayOn {
    /// The real model's config.json.
    pub config: PathBuf,
    /// Decoder layers kept.
    pub layers: usize,
    /// Checkpoint layout.
    pub layout: crate::synth::SynthLayout,
    /// Measured prompts replayed (`None`: all).
    pub prompts: Option<usize>,
    /// Policies whose cells are replayed (`None`: all).
    pub policies: Option<Vec<PolicySpec>>,
    /// New tokens replayed per prompt (`None`: all recorded).
    pub max_new_tokens: Option<usize>,
    /// Warm-up prompts replayed (the last N; `None`: all).
    pub warmup: Option<usize>,
}

/// Reads and resolves an experiment file. `check_model` verifies the model directory exists.
pub fn load(file: &Path, check_model: bool) -> Result<Experiment> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let raw: RawExperiment = toml::from_str(&text)
        .map_err(|e| Error::format(file, e.to_string().trim_end().to_string()))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let name = raw.name.clone().unwrap_or_else(|| {
        file.file_stem()
            .map_or("experiment".into(), |s| s.to_string_lossy().into_owned())
    });
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(Error::config(
            file,
            "name",
            format!("`{name}` cannot name a results directory"),
        ));
    }
    if raw.engine.threads == Some(0) {
        return Err(Error::config(
            file,
            "engine.threads",
            "0: at least one thread",
        ));
    }
    let model_dir = resolve_model(file, base, &raw.model, check_model)?;
    let backend = raw.model.backend.unwrap_or_default();
    let pool = raw.cache.pool.unwrap_or_default();
    let policies: Vec<PolicySpec> = one_or_many(
        file,
        "cache.policy",
        &raw.cache.policy,
        "a policy name",
        |v| match v {
            toml::Value::String(p) => PolicySpec::parse(p).map_err(|e| e.to_string()),
            _ => Err("not a string".into()),
        },
    )?;
    if let Some(p) = policies.iter().find(|p| p.needs_future()) {
        return Err(Error::config(
            file,
            "cache.policy",
            format!("`{p}` needs the future of the trace; the runner replays it automatically as the bound on every plot (use `harness simulate` for more)"),
        ));
    }
    let mut budgets = Vec::new();
    if let Some(c) = &raw.cache.capacity {
        let caps = one_or_many(
            file,
            "cache.capacity",
            c,
            "a positive integer (expert slots per MoE layer)",
            |v| match v {
                toml::Value::Integer(n) if *n >= 1 => Ok(*n as usize),
                toml::Value::Integer(_) => Err("capacity must be at least 1".into()),
                _ => Err("not an integer".into()),
            },
        )?;
        budgets.extend(caps.into_iter().map(BudgetSpec::Capacity));
    }
    if let Some(b) = &raw.cache.budget {
        budgets.extend(one_or_many(
            file,
            "cache.budget",
            b,
            "a size (\"512MiB\"), a byte count, or a fraction (\"25%\" or 0.25)",
            parse_budget,
        )?);
    }
    if budgets.is_empty() {
        budgets.push(BudgetSpec::Unlimited);
    }
    let misses: Vec<MissMode> = one_or_many(
        file,
        "cache.miss",
        &raw.cache.miss,
        "`load`, `skip`, `substitute`, `low-bit` or `cpu-compute`",
        named,
    )?;
    let low_bit = raw.cache.low_bit.as_ref().map(|d| base.join(d));
    for m in &misses {
        if let Some(why) = m.refusal(backend == Backend::Cpu, low_bit.is_some()) {
            let key = if *m == MissMode::LowBit {
                "cache.low_bit"
            } else {
                "cache.miss"
            };
            return Err(Error::config(file, key, why));
        }
    }
    if misses.contains(&MissMode::LowBit) {
        match &low_bit {
            Some(d) if !d.join("config.json").is_file() => {
                return Err(Error::config(
                    file,
                    "cache.low_bit",
                    format!(
                        "{} has no config.json: not a checkpoint directory",
                        d.display()
                    ),
                ))
            }
            _ => {}
        }
    }
    let mut cells = Vec::new();
    for p in &policies {
        for b in &budgets {
            for m in &misses {
                let id = format!("{p}_{b}_{m}");
                if cells.iter().any(|c: &Cell| c.id == id) {
                    return Err(Error::config(
                        file,
                        "cache",
                        format!("cell `{id}` appears twice (duplicate list entries?)"),
                    ));
                }
                cells.push(Cell {
                    id,
                    policy: p.clone(),
                    budget: *b,
                    miss: *m,
                });
            }
        }
    }
    let mut prompts = read_prompts(file, base, &raw.prompts)?;
    if raw.prompts.warmup >= prompts.len() {
        return Err(Error::config(
            file,
            "prompts.warmup",
            format!(
                "{} warm-up prompts leave none of the {} prompts to measure",
                raw.prompts.warmup,
                prompts.len()
            ),
        ));
    }
    let mut measured = prompts.split_off(raw.prompts.warmup);
    match raw.prompts.limit {
        Some(0) => {
            return Err(Error::config(
                file,
                "prompts.limit",
                "0 measures no prompt: give at least 1, or leave the key out for all",
            ))
        }
        Some(n) => measured.truncate(n),
        None => {}
    }
    if raw.generation.temperature < 0.0 || !raw.generation.temperature.is_finite() {
        return Err(Error::config(
            file,
            "generation.temperature",
            "must be finite and ≥ 0",
        ));
    }
    if raw.generation.repeats == 0 {
        return Err(Error::config(
            file,
            "generation.repeats",
            "0 measures nothing: give at least 1",
        ));
    }
    let storage = resolve_storage(file, &raw.storage)?;
    let replay_on = match &raw.model.replay_on {
        None => None,
        Some(r) => {
            let config = base.join(&r.config);
            if !config.exists() {
                return Err(Error::config(
                    file,
                    "model.replay_on.config",
                    format!("{} does not exist", config.display()),
                ));
            }
            if r.layers == 0 {
                return Err(Error::config(
                    file,
                    "model.replay_on.layers",
                    "must be at least 1",
                ));
            }
            if r.prompts == Some(0) {
                return Err(Error::config(
                    file,
                    "model.replay_on.prompts",
                    "0 replays nothing: give at least 1, or leave the key out",
                ));
            }
            Some(ReplayOn {
                config,
                layers: r.layers,
                layout: r.layout.parse().map_err(|e: Error| {
                    Error::config(file, "model.replay_on.layout", e.to_string())
                })?,
                prompts: r.prompts,
                warmup: r.warmup,
                max_new_tokens: match r.max_new_tokens {
                    Some(n) if n < 2 => {
                        return Err(Error::config(
                            file,
                            "model.replay_on.max_new_tokens",
                            "must be at least 2 (the first token comes from the prefill)",
                        ))
                    }
                    n => n,
                },
                policies: match &r.policies {
                    None => None,
                    Some(list) => Some(
                        list.iter()
                            .map(|p| {
                                PolicySpec::parse(p).map_err(|e| {
                                    Error::config(file, "model.replay_on.policies", e.to_string())
                                })
                            })
                            .collect::<Result<Vec<_>>>()?,
                    ),
                },
            })
        }
    };
    let out_root = match &raw.output.dir {
        Some(d) => base.join(d),
        None => PathBuf::from("results"),
    };
    Ok(Experiment {
        name,
        file: file.to_path_buf(),
        model_dir,
        backend,
        cells,
        pool,
        carry_over: raw.cache.carry_over,
        load_threads: raw.cache.load_threads,
        low_bit,
        threads: raw.engine.threads,
        kernels: raw.engine.kernels.unwrap_or_default(),
        warmup: prompts,
        prompts: measured,
        chat_template: raw.prompts.chat_template,
        truncate: raw.prompts.truncate,
        generation: raw.generation.clone(),
        out_root,
        plots: raw.output.plots.unwrap_or(true),
        raw,
        storage,
        replay_on,
    })
}

fn resolve_storage(file: &Path, s: &RawStorage) -> Result<StorageSpec> {
    let device = match &s.device {
        None => None,
        Some(toml::Value::String(name)) => Some((
            name.clone(),
            DeviceModel::preset(name).map_err(|e| Error::config(file, "storage.device", e))?,
        )),
        Some(v @ toml::Value::Table(_)) => {
            let m: DeviceModel = v.clone().try_into().map_err(|e: toml::de::Error| {
                Error::config(
                    file,
                    "storage.device",
                    format!(
                        "{} (expected {{ read_gbps = …, latency_us = …, queue_depth = … }})",
                        e.to_string().trim_end()
                    ),
                )
            })?;
            m.check()
                .map_err(|e| Error::config(file, "storage.device", e))?;
            Some(("custom".to_string(), m))
        }
        Some(other) => {
            return Err(Error::config(
                file,
                "storage.device",
                format!("`{other}`: give a preset name or {{ read_gbps = …, latency_us = …, queue_depth = … }}"),
            ))
        }
    };
    let memory_limit = match &s.memory_limit {
        None => None,
        Some(m) => Some(
            parse_size(m)
                .map_err(|e| Error::config(file, "storage.memory_limit", e.to_string()))?,
        ),
    };
    Ok(StorageSpec {
        io: s.io.unwrap_or_default(),
        device,
        memory_limit,
        staging: s.staging.unwrap_or_default(),
    })
}

fn resolve_model(file: &Path, base: &Path, m: &RawModel, check: bool) -> Result<PathBuf> {
    let from_env = m.env.as_ref().and_then(std::env::var_os).map(PathBuf::from);
    let dir = match (&from_env, &m.path) {
        (Some(d), _) => d.clone(),
        (None, Some(p)) => base.join(p),
        (None, None) => {
            return Err(Error::config(
                file,
                "model.path",
                "missing (give `path`, or `env` naming a variable that holds the path)",
            ))
        }
    };
    if check && !dir.join("config.json").exists() {
        let mut msg = format!("no model at {} (no config.json there)", dir.display());
        if let Some(v) = &m.env {
            msg.push_str(&format!(
                "; put the checkpoint there or set ${v} to its directory"
            ));
        }
        if let Some(d) = &m.download {
            msg.push_str(&format!("; get it from {d}"));
        }
        if let Some(c) = &m.config {
            msg.push_str(&format!(
                "; `harness inspect {}` sizes it without the weights",
                base.join(c).display()
            ));
        }
        return Err(Error::config(
            file,
            if from_env.is_some() {
                m.env.as_deref().unwrap_or("model.env")
            } else {
                "model.path"
            },
            msg,
        ));
    }
    Ok(dir)
}

fn parse_budget(v: &toml::Value) -> std::result::Result<BudgetSpec, String> {
    match v {
        toml::Value::Float(f) if *f > 0.0 && *f <= 1.0 => Ok(BudgetSpec::Fraction(*f)),
        toml::Value::Integer(i) if *i > 0 => Ok(BudgetSpec::Bytes(*i as u64)),
        toml::Value::String(s) if s.trim_end().ends_with('%') => {
            let x: f64 = s
                .trim_end()
                .trim_end_matches('%')
                .trim()
                .parse()
                .map_err(|_| format!("`{s}` is not a percentage"))?;
            if !(x > 0.0 && x <= 100.0) {
                return Err(format!("`{s}` must be in (0, 100]%"));
            }
            Ok(BudgetSpec::Fraction(x / 100.0))
        }
        toml::Value::String(s) => match parse_size(s) {
            Ok(0) => Err("a budget of 0 bytes holds nothing".into()),
            Ok(n) => Ok(BudgetSpec::Bytes(n)),
            Err(e) => Err(e.to_string()),
        },
        toml::Value::Float(_) => Err("a fraction must be in (0, 1]".into()),
        toml::Value::Integer(_) => Err("a byte count must be positive".into()),
        _ => Err("not a size, byte count or fraction".into()),
    }
}

mod prompts;
use prompts::read_prompts;

#[cfg(test)]
mod tests;
