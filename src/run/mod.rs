//! The experiment runner behind `harness run`: loads the model once, runs every sweep cell
//! (policy × budget × miss mode) over the prompts through the real engine, and writes
//! `results/<experiment>/<run-id>/` — `trace.parquet`, `summary.parquet`, `summary.json`, the
//! experiment file, `env.json` and plots. Everything is written into a hidden temp directory that
//! is renamed when complete; an interrupted run resumes there, skipping finished cells.

mod cell;
mod speed;

pub use cell::kl;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

use crate::engine::{Engine, EngineConfig, Sampler};
use crate::error::{Error, Result};
use crate::experiment::{BudgetSpec, Experiment, Prompt};
use crate::experts::budget::{Budget, Pool};
use crate::experts::policies::FrequencyProfile;
use crate::io::write_atomic;
use crate::report::CellSummary;
use crate::trace;

use speed::{PassPrompt, ReplayTarget, Speed, Target};

/// Options of one `harness run`.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Results root (overrides the experiment's).
    pub out_root: Option<PathBuf>,
    /// CI-friendly quick mode: 3 prompts, 8 new tokens.
    pub quick: bool,
    /// Redo a run whose results already exist.
    pub force: bool,
    /// Show a progress bar (only on a terminal).
    pub progress: bool,
}

/// Runs an experiment; returns the results directory.
pub fn run(exp: &Experiment, opts: &RunOptions) -> Result<PathBuf> {
    let mut exp = exp.clone();
    if opts.quick {
        exp.prompts.truncate(3);
        exp.warmup.truncate(1);
        exp.generation.max_new_tokens = exp.generation.max_new_tokens.min(8);
        exp.generation.repeats = 1;
        // Speed is measured on the experiment's own model: no real-size replay checkpoint.
        exp.replay_on = None;
    }
    let root = opts
        .out_root
        .clone()
        .unwrap_or_else(|| exp.out_root.clone());
    let run_id = run_id(&exp, opts.quick)?;
    let final_dir = root.join(&exp.name).join(&run_id);
    let tmp_dir = root.join(&exp.name).join(format!(".{run_id}.partial"));
    if final_dir.exists() && !opts.force {
        eprintln!(
            "results already complete at {} (use --force to run again)",
            final_dir.display()
        );
        return Ok(final_dir);
    }
    // One writer per results directory: a second run of the same experiment waits for nothing
    // and fails at once, naming the process that holds it.
    let exp_dir = root.join(&exp.name);
    std::fs::create_dir_all(&exp_dir).map_err(|e| Error::io(&exp_dir, e))?;
    let _lock = RunLock::take(&exp_dir.join(format!(".{run_id}.lock")), &tmp_dir)?;
    if final_dir.exists() {
        if !opts.force {
            eprintln!(
                "results completed by another run at {}",
                final_dir.display()
            );
            return Ok(final_dir);
        }
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }

    let tok_path = exp.model_dir.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| Error::format(&tok_path, format!("cannot load the tokenizer: {e}")))?;
    let template = if exp.chat_template {
        Some(crate::chat::ChatTemplate::load(&exp.model_dir)?)
    } else {
        None
    };
    let encode = |p: &Prompt| -> Result<Vec<u32>> {
        let text = match &template {
            Some(t) => t.render(&p.text)?,
            None => p.text.clone(),
        };
        let ids = tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| Error::Input(format!("{}: tokenizing the prompt: {e}", p.source)))?
            .get_ids()
            .to_vec();
        if ids.is_empty() {
            return Err(Error::Input(format!(
                "{}: the prompt encodes to no tokens",
                p.source
            )));
        }
        Ok(ids)
    };
    let sources: Vec<&Prompt> = exp.warmup.iter().chain(&exp.prompts).collect();
    let mut all: Vec<(bool, Vec<u32>)> = Vec::with_capacity(sources.len());
    for (i, p) in sources.iter().enumerate() {
        all.push((i < exp.warmup.len(), encode(p)?));
    }
    let stop: Vec<u32> = tokenizer.token_to_id("<|endoftext|>").into_iter().collect();

    let device = exp
        .backend
        .device()
        .map_err(|e| Error::config(&exp.file, "model.backend", e.to_string()))?;
    // With a replay checkpoint, `[storage]` is about its misses: the experiment's model only
    // routes (and times the cells that are not replayed) through the page cache, and its rows
    // say so. Without one, the experiment's model reads misses as `[storage]` says.
    let own_cfg = if exp.replay_on.is_some() {
        EngineConfig::default()
    } else {
        speed::storage_config(&exp, EngineConfig::default())
    };
    let mut engine = Engine::open(&exp.model_dir, device.clone(), own_cfg)?;
    // Every prompt must fit the model's context and this machine's memory before any cell runs.
    let new_tokens = exp.generation.max_new_tokens;
    let mut truncated = Vec::new();
    for ((_, ids), p) in all.iter_mut().zip(&sources) {
        if let Err(e) = engine.check_sequence(ids.len(), new_tokens) {
            if !exp.truncate {
                return Err(Error::Input(format!(
                    "{}: {e} (shorten the prompt, or set `[prompts] truncate = true` in {} to keep its last tokens that fit)",
                    p.source,
                    exp.file.display()
                )));
            }
            let fits = |n: usize| engine.check_sequence(n, new_tokens).is_ok();
            let (mut lo, mut hi) = (0usize, ids.len());
            while lo + 1 < hi {
                let mid = (lo + hi) / 2;
                if fits(mid) {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            if lo == 0 {
                return Err(Error::Input(format!("{}: {e}", p.source)));
            }
            truncated.push(serde_json::json!({
                "prompt": p.source,
                "tokens": ids.len(),
                "kept_last": lo,
            }));
            let cut = ids.len() - lo;
            ids.drain(..cut);
        }
    }
    if !truncated.is_empty() {
        eprintln!(
            "{} prompt(s) cut to their last tokens that fit (recorded in env.json)",
            truncated.len()
        );
    }
    let prompts: Vec<PassPrompt> = all
        .iter()
        .map(|(warm, ids)| PassPrompt {
            warm: *warm,
            ids: ids.clone(),
            new_tokens,
            replay: None,
        })
        .collect();
    let mut speed = open_speed(&exp, &mut engine, &prompts, &stop, &root, device)?;
    check_memory_limit(&exp, &engine, &speed, &all)?;
    std::fs::create_dir_all(tmp_dir.join("cells")).map_err(|e| Error::io(&tmp_dir, e))?;
    let progress = progress_bar(opts.progress, (exp.cells.len() * all.len()) as u64);
    let finished = exp
        .cells
        .iter()
        .filter(|c| {
            tmp_dir
                .join("cells")
                .join(format!("{}.json", c.id))
                .exists()
        })
        .count();
    if finished > 0 {
        eprintln!(
            "resuming {}: {finished} of {} cells already done",
            tmp_dir.display(),
            exp.cells.len()
        );
    }
    let ctx = cell::Ctx {
        exp: &exp,
        prompts: &prompts,
        stop: &stop,
        tmp_dir: &tmp_dir,
        profile: speed.profile.as_ref(),
        progress: &progress,
    };
    let mut summaries = Vec::new();
    for cell in &exp.cells {
        let done = tmp_dir.join("cells").join(format!("{}.json", cell.id));
        if done.exists() {
            let s: CellSummary = serde_json::from_str(
                &std::fs::read_to_string(&done).map_err(|e| Error::io(&done, e))?,
            )
            .map_err(|e| Error::format(&done, e.to_string()))?;
            summaries.push(s);
            progress.inc(all.len() as u64);
            continue;
        }
        progress.set_message(cell.id.clone());
        let s = cell::run_cell(&ctx, &mut engine, &mut speed.speed, cell)?;
        write_atomic(
            &done,
            serde_json::to_string_pretty(&s)
                .map_err(|e| Error::Input(e.to_string()))?
                .as_bytes(),
        )?;
        summaries.push(s);
    }
    progress.finish_and_clear();

    // Merge the cells into the run's files.
    let mut cells = Vec::new();
    for cell in &exp.cells {
        cells.extend(trace::read(
            &tmp_dir.join("cells").join(format!("{}.parquet", cell.id)),
        )?);
    }
    trace::write(&tmp_dir.join("trace.parquet"), &cells)?;
    crate::report::write_summary(&tmp_dir, &summaries)?;
    std::fs::copy(&exp.file, tmp_dir.join("experiment.toml"))
        .map_err(|e| Error::io(&exp.file, e))?;
    write_atomic(
        &tmp_dir.join("env.json"),
        serde_json::to_string_pretty(&env_info(
            &exp,
            opts.quick,
            &engine,
            &speed.speed,
            &truncated,
        ))
        .unwrap_or_default()
        .as_bytes(),
    )?;
    if exp.plots {
        crate::report::plot_dir(&tmp_dir)?;
    }
    std::fs::remove_dir_all(tmp_dir.join("cells")).map_err(|e| Error::io(&tmp_dir, e))?;
    std::fs::rename(&tmp_dir, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    eprintln!("{}", crate::report::summary_table(&summaries));
    eprintln!("results: {}", final_dir.display());
    Ok(final_dir)
}

/// Resolves a cell's budget against the model.
pub fn resolve_budget(
    b: BudgetSpec,
    pool: Pool,
    total_expert_bytes: u64,
    moe_layers: usize,
) -> Budget {
    match b {
        BudgetSpec::Unlimited => Budget::Unlimited,
        BudgetSpec::Capacity(n) => Budget::SlotsPerLayer(n),
        BudgetSpec::Bytes(n) => Budget::from_bytes(n, pool, moe_layers),
        BudgetSpec::Fraction(f) => Budget::from_bytes(
            (f * total_expert_bytes as f64).round() as u64,
            pool,
            moe_layers,
        ),
    }
}

fn progress_bar(enabled: bool, n: u64) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(n);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} prompts · {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// A stable run id: a hash of the experiment file, the model config and the quick flag.
fn run_id(exp: &Experiment, quick: bool) -> Result<String> {
    let text = std::fs::read(&exp.file).map_err(|e| Error::io(&exp.file, e))?;
    let cfg = std::fs::read(exp.model_dir.join("config.json")).unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text
        .iter()
        .chain(&cfg)
        .chain(std::iter::once(&(quick as u8)))
    {
        h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
    }
    Ok(format!(
        "{}{:08x}",
        if quick { "quick-" } else { "" },
        h as u32
    ))
}

fn env_info(
    exp: &Experiment,
    quick: bool,
    engine: &Engine,
    speed: &Speed,
    truncated: &[serde_json::Value],
) -> serde_json::Value {
    let git = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
    });
    let target = |t: &Target, e: &Engine| {
        serde_json::json!({
            "model": t.model,
            "expert_bytes": t.expert_bytes,
            "io": e.io(),
            "storage_read_gbps": t.read_rate / 1e9,
            "resident_decode_tps": t.resident_tps,
        })
    };
    serde_json::json!({
        "harness_version": env!("CARGO_PKG_VERSION"),
        "git_commit": git,
        "backend": exp.backend.as_str(),
        "device": crate::engine::describe(engine.model.device()),
        "truncated_prompts": truncated,
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "memory_available_bytes": crate::engine::available_memory(),
        "model_dir": exp.model_dir.display().to_string(),
        "routing": speed.routing,
        "speed_on_model": target(&speed.own, engine),
        "speed_on_replay": speed.replay.as_ref().map(|r| target(&r.target, &r.engine)),
        "storage_device": exp.storage.device.as_ref().map(|(n, d)| serde_json::json!({"name": n, "model": d})),
        "quick": quick,
        "started_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "elapsed_note": "timings are wall-clock on this machine; compare ratios within one run",
    })
}

/// The speed setup and the profile `static-N` cells pin from.
struct SpeedSetup {
    speed: Speed,
    profile: Option<FrequencyProfile>,
}

/// Opens the replay checkpoint if the experiment has one and measures the references every
/// tok/s is read against (`B_read`, `R`); runs the reference routing pass (unlimited budget)
/// where a profile or a replay needs it.
fn open_speed(
    exp: &Experiment,
    engine: &mut Engine,
    prompts: &[PassPrompt],
    stop: &[u32],
    root: &Path,
    device: candle_core::Device,
) -> Result<SpeedSetup> {
    let needs_profile = exp.cells.iter().any(|c| c.policy.needs_profile());
    let reference = if needs_profile || exp.replay_on.is_some() {
        engine.reconfigure(EngineConfig {
            record_trace: true,
            ..engine.config().clone()
        })?;
        let sampler = Sampler::new(exp.generation.temperature, exp.generation.seed);
        speed::pass(engine, prompts, true, sampler, stop, false, || {})?;
        Some(engine.take_trace())
    } else {
        None
    };
    let profile = match (&reference, needs_profile) {
        (Some(rows), true) => Some(crate::simulate::profile_from_rows(rows)),
        _ => None,
    };
    let warm_n = prompts.iter().filter(|p| p.warm).count();
    let own_name = exp.model_dir.display().to_string();
    let (read_rate, resident_tps) = speed::references(engine, prompts, exp.generation.seed, stop)?;
    let own = Target {
        model: own_name.clone(),
        expert_bytes: speed::expert_bytes(engine),
        read_rate,
        resident_tps,
    };
    report_target(&own, engine, exp);
    let replay = match &exp.replay_on {
        None => None,
        Some(r) => {
            let mut se = speed::open_replay(r, exp, engine, root, device)?;
            let rows = reference.as_deref().unwrap_or_default();
            let slice = speed::ReplaySlice {
                warmup: r.warmup,
                prompts: r.prompts,
                max_new_tokens: r.max_new_tokens,
            };
            let replays = speed::replay_prompts(rows, &se, warm_n, slice, exp.generation.seed)?;
            let (read_rate, resident_tps) =
                speed::references(&mut se, &replays, exp.generation.seed, &[])?;
            let target = Target {
                model: format!(
                    "{} at {} layers, {} (random weights)",
                    r.config.display(),
                    r.layers,
                    r.layout
                ),
                expert_bytes: speed::expert_bytes(&se),
                read_rate,
                resident_tps,
            };
            report_target(&target, &se, exp);
            Some(ReplayTarget {
                engine: se,
                target,
                slice,
                policies: r.policies.clone(),
            })
        }
    };
    let speed = Speed {
        routing: format!("router of {own_name}"),
        own,
        replay,
    };
    Ok(SpeedSetup { speed, profile })
}

fn report_target(t: &Target, engine: &Engine, exp: &Experiment) {
    eprintln!(
        "speed on {} ({} per expert), io {}{}: experts read at {:.2} GB/s, all-resident decode {:.1} tok/s",
        t.model,
        crate::experts::budget::human_bytes(t.expert_bytes),
        engine.io().effective,
        exp.storage
            .device
            .as_ref()
            .filter(|_| engine.io().device.is_some())
            .map_or(String::new(), |(n, d)| format!(", emulating {n} ({d})")),
        t.read_rate / 1e9,
        t.resident_tps
    );
}

/// Refuses, before any cell runs, a cell whose dense weights + expert cache + KV cache would
/// exceed `[storage] memory_limit`.
fn check_memory_limit(
    exp: &Experiment,
    engine: &Engine,
    speed: &SpeedSetup,
    prompts: &[(bool, Vec<u32>)],
) -> Result<()> {
    let Some(limit) = exp.storage.memory_limit else {
        return Ok(());
    };
    let replay = speed.speed.replay.as_ref();
    let se = replay.map_or(engine, |r| &r.engine);
    let dense = engine.dense_bytes() + replay.map_or(0, |r| r.engine.dense_bytes());
    let expert_bytes = replay.map_or(&speed.speed.own, |r| &r.target).expert_bytes;
    let longest = prompts.iter().map(|(_, p)| p.len()).max().unwrap_or(0);
    let kv = se.spec().kv_bytes_per_token() * (longest + exp.generation.max_new_tokens) as u64;
    let total = se.total_expert_bytes();
    let layers = se.spec().num_moe_layers() as u64;
    let gb = |b: u64| b as f64 / 1e9;
    if dense + kv > limit {
        return Err(Error::config(
            &exp.file,
            "storage.memory_limit",
            format!(
                "{:.2} GB is below the dense weights ({:.2} GB) and KV cache ({:.2} GB) alone",
                gb(limit),
                gb(dense),
                gb(kv)
            ),
        ));
    }
    for c in &exp.cells {
        let cache = match cell::budget_of(c, exp, total, layers as usize) {
            Budget::Unlimited => total,
            Budget::SlotsPerLayer(n) => (n as u64 * layers).min(exp_slots(se)) * expert_bytes,
            Budget::BytesPerLayer(b) => b * layers,
            Budget::BytesGlobal(b) => b,
        };
        if dense + cache + kv > limit {
            return Err(Error::config(
                &exp.file,
                "storage.memory_limit",
                format!(
                    "cell `{}` needs {:.2} GB (dense {:.2} + expert cache {:.2} + KV {:.2}), more than the limit of {:.2} GB",
                    c.id,
                    gb(dense + cache + kv),
                    gb(dense),
                    gb(cache),
                    gb(kv),
                    gb(limit)
                ),
            ));
        }
    }
    Ok(())
}

/// Every routed expert of `engine`'s model.
fn exp_slots(engine: &Engine) -> u64 {
    (engine.spec().moe.num_experts * engine.spec().num_moe_layers()) as u64
}

/// An exclusive lock on one run's results (released when dropped, or when the process ends).
struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// Takes the lock file `path` (holding the owner's pid) for the results being written to
    /// `dir`; fails at once, naming the owner, if another run holds it.
    fn take(path: &Path, dir: &Path) -> Result<RunLock> {
        use std::io::{Read, Seek, Write};
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0).map_err(|e| Error::io(path, e))?;
                file.rewind().map_err(|e| Error::io(path, e))?;
                write!(file, "{}", std::process::id()).map_err(|e| Error::io(path, e))?;
                Ok(RunLock { _file: file })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                Err(Error::Input(format!(
                    "results dir {} in use by pid {} (another `harness run` of the same experiment; wait for it, or pass another --out)",
                    dir.display(),
                    if pid.trim().is_empty() { "?" } else { pid.trim() }
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(path, e)),
        }
    }
}
