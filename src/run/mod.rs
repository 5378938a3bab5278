//! The experiment runner behind `harness run`: loads the model once, runs sweep cells
//! (policy × budget × miss mode) over the prompts through the real engine, and writes
//! `results/<experiment>/<run-id>/` — `trace.parquet`, `summary.parquet`, `summary.json`, the
//! experiment file, `env.json` and plots.
//!
//! Cells are written one file set each into the run's working directory
//! (`.<run-id>.partial/cells/`, see [`plan`]); [`merge`] assembles them into the run. A plain
//! `harness run` runs every cell and merges; `--cell`/`--index`/`--shard` run some cells in one
//! process and leave the merge to `harness merge`, so that a scheduler can run the cells of one
//! sweep side by side. An interrupted run resumes: finished cells are skipped.

mod cell;
pub mod merge;
pub mod plan;
pub mod slurm;
mod speed;

pub use cell::kl;
pub use merge::merge_dir;
pub use plan::{RunPlan, Selection};

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

use crate::engine::{Engine, EngineConfig, Sampler};
use crate::error::{Error, Result};
use crate::experiment::{BudgetSpec, Experiment, Prompt};
use crate::experts::budget::{Budget, Pool};
use crate::experts::policies::FrequencyProfile;
use crate::io::write_atomic;

use plan::{CellLock, LockMode};
use speed::{PassPrompt, ReplayTarget, Speed, Target};

/// Options of one `harness run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Results root (overrides the experiment's).
    pub out_root: Option<PathBuf>,
    /// CI-friendly quick mode: 3 prompts, 8 new tokens.
    pub quick: bool,
    /// Redo a run whose results already exist (with a selection: redo those cells).
    pub force: bool,
    /// Show a progress bar (only on a terminal).
    pub progress: bool,
    /// Which cells this process runs; [`Selection::All`] also merges.
    pub select: Selection,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            out_root: None,
            quick: false,
            force: false,
            progress: false,
            select: Selection::All,
        }
    }
}

/// Runs an experiment's selected cells. With [`Selection::All`], merges them and returns the
/// results directory; otherwise returns the run's working directory (merge it with
/// [`merge_dir`] once every cell is done).
pub fn run(exp: &Experiment, opts: &RunOptions) -> Result<PathBuf> {
    let plan = RunPlan::new(exp, opts.quick, opts.out_root.clone())?;
    let whole = opts.select == Selection::All;
    let indices = opts.select.indices(&plan)?;
    let merged = |plan: &RunPlan| {
        if whole {
            eprintln!(
                "results already complete at {} (use --force to run again)",
                plan.final_dir.display()
            );
        } else {
            eprintln!(
                "run {} is merged already ({}): its cells are done",
                plan.run_id,
                plan.final_dir.display()
            );
        }
        Ok(plan.final_dir.clone())
    };
    if plan.final_dir.exists() && !(whole && opts.force) {
        return merged(&plan);
    }
    // Writers of one run: a whole run or a merge alone; cell runs side by side, each cell by
    // one process. A second writer fails at once, naming the process that holds the run.
    let exp_dir = plan.exp_dir();
    std::fs::create_dir_all(&exp_dir).map_err(|e| Error::io(&exp_dir, e))?;
    let mode = if whole {
        LockMode::Exclusive
    } else {
        LockMode::Shared
    };
    let what = format!("results dir {}", plan.work_dir.display());
    let _lock = CellLock::take(&plan.lock_path(), mode, &what)?;
    if plan.final_dir.exists() {
        if !(whole && opts.force) {
            return merged(&plan);
        }
        std::fs::remove_dir_all(&plan.final_dir).map_err(|e| Error::io(&plan.final_dir, e))?;
    }
    let fresh = !plan.work_dir.exists();
    plan.write_work_files()?;
    let cells = &plan.exp.cells;
    if opts.force && !whole {
        for &i in &indices {
            let f = plan.cell_files(&cells[i].id);
            if f.summary.exists() {
                std::fs::remove_file(&f.summary).map_err(|e| Error::io(&f.summary, e))?;
            }
        }
    }
    let todo: Vec<usize> = indices
        .iter()
        .copied()
        .filter(|&i| !plan.cell_files(&cells[i].id).summary.exists())
        .collect();
    let done = indices.len() - todo.len();
    if done > 0 && !todo.is_empty() {
        eprintln!(
            "resuming {}: {done} of {} cells already done",
            plan.work_dir.display(),
            indices.len()
        );
    }
    if !todo.is_empty() {
        if let Err(e) = run_cells(&plan, &todo, opts.progress, !whole) {
            // A whole run that fails before its first cell (a bad prompt, a missing tokenizer)
            // leaves nothing behind; one that finished cells keeps them to resume.
            let any_done = cells
                .iter()
                .any(|c| plan.cell_files(&c.id).summary.exists());
            if whole && fresh && !any_done {
                let _ = std::fs::remove_dir_all(&plan.work_dir);
            }
            return Err(e);
        }
    } else if !whole {
        eprintln!("cell(s) already done in {}", plan.work_dir.display());
    }
    if whole {
        let (dir, summaries) = merge::assemble(&plan.work_dir, &plan.file(), false)?;
        eprintln!("{}", crate::report::summary_table(&summaries));
        eprintln!("results: {}", dir.display());
        return Ok(dir);
    }
    let left = cells
        .iter()
        .filter(|c| !plan.cell_files(&c.id).summary.exists())
        .count();
    if left == 0 {
        eprintln!(
            "every cell of run {} is done: harness merge {}",
            plan.run_id,
            plan.final_dir.display()
        );
    } else {
        eprintln!(
            "{left} of {} cells of run {} still to run; then: harness merge {}",
            cells.len(),
            plan.run_id,
            plan.final_dir.display()
        );
    }
    Ok(plan.work_dir.clone())
}

/// Loads the model, measures the references and runs the cells at `todo` (indices into the
/// plan's cells), writing each one's files. With `lock_cells`, each cell is run under its own
/// lock (cells of one sweep in other processes), and skipped if another process finished it.
fn run_cells(plan: &RunPlan, todo: &[usize], progress: bool, lock_cells: bool) -> Result<()> {
    let exp = &plan.exp;
    let root = &plan.root;
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
        speed::compute_config(exp, EngineConfig::default())
    } else {
        speed::storage_config(exp, EngineConfig::default())
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
    let mut speed = open_speed(exp, &mut engine, &prompts, &stop, root, device)?;
    check_memory_limit(exp, &engine, &speed, &all)?;
    let progress = progress_bar(progress, (todo.len() * all.len()) as u64);
    let ctx = cell::Ctx {
        exp,
        prompts: &prompts,
        stop: &stop,
        tmp_dir: &plan.work_dir,
        profile: speed.profile.as_ref(),
        progress: &progress,
    };
    let started = unix_now();
    for &i in todo {
        let cell = &exp.cells[i];
        let files = plan.cell_files(&cell.id);
        let _cell_lock = if lock_cells {
            let l = CellLock::take(
                &files.lock,
                LockMode::Exclusive,
                &format!("cell `{}` of run {}", cell.id, plan.run_id),
            )?;
            if files.summary.exists() {
                progress.inc(all.len() as u64);
                continue;
            }
            Some(l)
        } else {
            None
        };
        progress.set_message(cell.id.clone());
        let s = cell::run_cell(&ctx, &mut engine, &mut speed.speed, cell)?;
        let mut env = env_info(plan, &engine, &speed.speed, &truncated, started);
        env["cell"] = cell.id.clone().into();
        env["finished_unix"] = unix_now().into();
        write_atomic(
            &files.env,
            serde_json::to_string_pretty(&env)
                .unwrap_or_default()
                .as_bytes(),
        )?;
        // The summary last: its presence marks the cell done.
        write_atomic(
            &files.summary,
            serde_json::to_string_pretty(&s)
                .map_err(|e| Error::Input(e.to_string()))?
                .as_bytes(),
        )?;
    }
    progress.finish_and_clear();
    Ok(())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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

fn env_info(
    plan: &RunPlan,
    engine: &Engine,
    speed: &Speed,
    truncated: &[serde_json::Value],
    started: u64,
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
    let exp = &plan.exp;
    let var = |k: &str| std::env::var(k).ok();
    let slurm = var("SLURM_JOB_ID").map(|job| {
        serde_json::json!({
            "job_id": job,
            "array_job_id": var("SLURM_ARRAY_JOB_ID"),
            "array_task_id": var("SLURM_ARRAY_TASK_ID"),
            "node": var("SLURMD_NODENAME"),
        })
    });
    serde_json::json!({
        "run_id": plan.run_id,
        "host": plan::hostname(),
        "pid": std::process::id(),
        "slurm": slurm,
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
        "quick": plan.quick,
        "started_unix": started,
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
    let kv = se.spec().kv_bytes_per_token() * (longest + exp.generation.max_new_tokens) as u64
        + se.spec().recurrent_state_bytes();
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
