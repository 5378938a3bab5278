//! The experiment runner behind `harness run`: loads the model once, runs every sweep cell
//! (policy × budget × miss mode) over the prompts through the real engine, and writes
//! `results/<experiment>/<run-id>/` — `trace.parquet`, `summary.parquet`, `summary.json`, the
//! experiment file, `env.json` and plots. Everything is written into a hidden temp directory that
//! is renamed when complete; an interrupted run resumes there, skipping finished cells.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

use crate::engine::{Engine, EngineConfig, MissMode, Sampler};
use crate::error::{Error, Result};
use crate::experiment::{BudgetSpec, Cell, Experiment, Prompt};
use crate::experts::budget::{Budget, Pool};
use crate::experts::policies::{FrequencyProfile, PolicySpec};
use crate::experts::Phase;
use crate::io::write_atomic;
use crate::report::CellSummary;
use crate::simulate::Simulation;
use crate::trace::{self, CellTrace, TraceRow};

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
    let mut engine = Engine::open(&exp.model_dir, device, EngineConfig::default())?;
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
    std::fs::create_dir_all(tmp_dir.join("cells")).map_err(|e| Error::io(&tmp_dir, e))?;
    let total_expert_bytes = engine.total_expert_bytes();
    // `static-N` pins the most frequent experts of a profile: an unlimited-budget pass over the
    // same prompts (an oracle profile, as `harness simulate` derives one from a trace).
    let cell_profile = if exp.cells.iter().any(|c| c.policy.needs_profile()) {
        Some(profile(&mut engine, &exp, &all, &stop)?)
    } else {
        None
    };
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
        let s = run_cell(
            &mut engine,
            &exp,
            cell,
            &all,
            &stop,
            total_expert_bytes,
            &tmp_dir,
            &progress,
            cell_profile.as_ref(),
        )?;
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
            engine.model.device(),
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

#[allow(clippy::too_many_arguments)]
fn run_cell(
    engine: &mut Engine,
    exp: &Experiment,
    cell: &Cell,
    prompts: &[(bool, Vec<u32>)],
    stop: &[u32],
    total_expert_bytes: u64,
    tmp_dir: &Path,
    progress: &ProgressBar,
    profile: Option<&FrequencyProfile>,
) -> Result<CellSummary> {
    let spec = engine.spec().clone();
    let budget = resolve_budget(
        cell.budget,
        exp.pool,
        total_expert_bytes,
        spec.num_moe_layers(),
    );
    let cfg = EngineConfig {
        budget,
        policy: cell.policy.clone(),
        miss: cell.miss,
        record_trace: true,
        load_threads: exp.load_threads,
        ..Default::default()
    };
    let cell_profile = if cell.policy.needs_profile() {
        profile.cloned()
    } else {
        None
    };
    engine
        .reconfigure_with(cfg.clone(), cell_profile.clone())
        .map_err(|e| Error::Input(format!("cell `{}`: {e}", cell.id)))?;
    let _ = engine.take_trace();
    // The cell's own memory peak: the previous cell's cache is gone, the dense weights are not.
    crate::memory::reset_peak();
    let mut rss = crate::memory::Rss::now().unwrap_or_default();
    let mut kv_bytes = 0u64;
    let mut sampler = Sampler::new(exp.generation.temperature, exp.generation.seed);
    let (mut prefill_s, mut decode_s, mut prefill_tok, mut decode_tok, mut ttft, mut measured) =
        (0.0, 0.0, 0u64, 0u64, 0.0, 0u64);
    let mut generated = Vec::new();
    let mut stats_before = None;
    let mut bytes_before = 0;
    let mut load_before = 0.0;
    for (i, (warm, ids)) in prompts.iter().enumerate() {
        if !exp.carry_over && i > 0 {
            engine.reset_cache();
        }
        if !warm && stats_before.is_none() {
            let s = engine.stats();
            bytes_before = s.bytes_read;
            load_before = s.load_seconds;
            stats_before = Some(s.cache);
        }
        engine.set_prompt(i as u32);
        let keep = cell.miss == MissMode::Skip && !warm;
        let g =
            engine.generate_with(ids, exp.generation.max_new_tokens, &mut sampler, stop, keep)?;
        if let Some(now) = crate::memory::Rss::now() {
            rss = rss.max(now);
        }
        kv_bytes = kv_bytes.max(g.kv_bytes);
        if !warm {
            measured += 1;
            prefill_s += g.prefill.as_secs_f64();
            decode_s += g.decode.as_secs_f64();
            prefill_tok += g.prompt_len as u64;
            decode_tok += g.tokens.len().saturating_sub(1) as u64;
            ttft += g.prefill.as_secs_f64();
            generated.push((ids.clone(), g));
        }
        progress.inc(1);
    }
    let stats = engine.stats();
    let before = stats_before.unwrap_or_default();
    let rows = engine.take_trace();
    // Hit counts come from the trace of the measured prompts (warm-up rows excluded).
    let warm_n = prompts.iter().filter(|p| p.0).count() as u32;
    let (mut acc, mut hit, mut acc_p, mut hit_p) = (0u64, 0u64, 0u64, 0u64);
    for r in rows.iter().filter(|r| r.prompt >= warm_n) {
        let h = r.hits.iter().filter(|&&h| h).count() as u64;
        acc += r.hits.len() as u64;
        hit += h;
        if r.phase == Phase::Prefill {
            acc_p += r.hits.len() as u64;
            hit_p += h;
        }
    }
    let belady = belady_hit_rate(engine, &rows, budget, exp.carry_over, warm_n)?;
    trace::write(
        &tmp_dir.join("cells").join(format!("{}.parquet", cell.id)),
        &[CellTrace {
            cell: cell.id.clone(),
            rows,
        }],
    )?;
    let (kl, top1) = if cell.miss == MissMode::Skip {
        drift(engine, &generated)?
    } else {
        (None, None)
    };
    // Restore the cell's configuration after the exact re-run of the drift check.
    if cell.miss == MissMode::Skip {
        engine.reconfigure_with(cfg, cell_profile)?;
    }
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let issued = stats.cache.prefetch.issued - before.prefetch.issued;
    let used = stats.cache.prefetch.used - before.prefetch.used;
    let capacity = match budget {
        Budget::SlotsPerLayer(n) => Some(n as u64),
        _ => None,
    };
    let fraction = match budget {
        Budget::Unlimited => 1.0,
        Budget::SlotsPerLayer(n) => n as f64 / spec.moe.num_experts as f64,
        Budget::BytesGlobal(b) => b as f64 / total_expert_bytes as f64,
        Budget::BytesPerLayer(b) => {
            (b * spec.num_moe_layers() as u64) as f64 / total_expert_bytes as f64
        }
    };
    Ok(CellSummary {
        cell: cell.id.clone(),
        policy: cell.policy.to_string(),
        capacity,
        budget_bytes: budget.bytes(),
        budget_fraction: fraction.min(1.0),
        pool: exp.pool.to_string(),
        miss: cell.miss.to_string(),
        prompts: measured,
        tokens_generated: generated.iter().map(|(_, g)| g.tokens.len() as u64).sum(),
        accesses: acc,
        hits: hit,
        hit_rate: ratio(hit, acc),
        hit_rate_prefill: ratio(hit_p, acc_p),
        hit_rate_decode: ratio(hit - hit_p, acc - acc_p),
        effective_hit_rate: 1.0 - ratio((acc - hit) + issued, acc).min(1.0),
        belady_hit_rate: belady,
        prefetch_issued: issued,
        prefetch_precision: (issued > 0).then(|| ratio(used, issued)),
        // Recall as the cache defines it: prefetches used / (used + demand misses).
        prefetch_recall: (issued > 0).then(|| ratio(used, used + (acc - hit))),
        bytes_read: stats.bytes_read - bytes_before,
        load_seconds: stats.load_seconds - load_before,
        prefill_tps: prefill_tok as f64 / prefill_s.max(1e-9),
        decode_tps: decode_tok as f64 / decode_s.max(1e-9),
        ttft_seconds: ttft / measured.max(1) as f64,
        memory: crate::memory::MemoryReport::new(
            rss,
            engine.dense_bytes(),
            stats.cache.peak_resident_bytes,
            kv_bytes,
        ),
        kl_mean: kl,
        top1_agreement: top1,
    })
}

/// Expert selection counts of the prompts under an unlimited budget.
fn profile(
    engine: &mut Engine,
    exp: &Experiment,
    prompts: &[(bool, Vec<u32>)],
    stop: &[u32],
) -> Result<FrequencyProfile> {
    engine.reconfigure(EngineConfig {
        record_trace: true,
        ..EngineConfig::default()
    })?;
    let mut sampler = Sampler::new(exp.generation.temperature, exp.generation.seed);
    for (_, ids) in prompts {
        engine.generate(ids, exp.generation.max_new_tokens, &mut sampler, stop)?;
    }
    Ok(crate::simulate::profile_from_rows(&engine.take_trace()))
}

/// Belady's hit rate on a cell's own trace at the cell's budget (measured prompts only).
fn belady_hit_rate(
    engine: &Engine,
    rows: &[TraceRow],
    budget: Budget,
    carry_over: bool,
    warm_n: u32,
) -> Result<f64> {
    let moe_layers: Vec<u32> = engine
        .spec()
        .moe
        .moe_layers
        .iter()
        .map(|&l| l as u32)
        .collect();
    let mut sim = Simulation::new(PolicySpec::Belady, budget, &moe_layers);
    sim.warmup_prompts = warm_n;
    sim.reset_per_prompt = !carry_over;
    let res = crate::simulate::simulate(rows, &sim, |k| engine.store.expert_bytes(k))?;
    Ok(res.hit_rate)
}

/// KL(exact ‖ skip) and top-1 agreement of a skip cell's sampled-from distributions, against an
/// exact (unlimited, load) teacher-forced pass over the same tokens.
fn drift(
    engine: &mut Engine,
    runs: &[(Vec<u32>, crate::engine::Generation)],
) -> Result<(Option<f64>, Option<f64>)> {
    engine.reconfigure(EngineConfig::default())?;
    let (mut kl_sum, mut agree, mut n) = (0.0, 0u64, 0u64);
    for (prompt, g) in runs {
        if g.tokens.is_empty() {
            continue;
        }
        let mut seq = prompt.clone();
        seq.extend_from_slice(&g.tokens[..g.tokens.len() - 1]);
        let (exact, _) = engine.logits(&seq)?;
        for (k, skip) in g.step_logits.iter().enumerate() {
            let e = &exact[prompt.len() - 1 + k];
            kl_sum += kl(e, skip);
            agree +=
                (crate::models::layers::argmax(e) == crate::models::layers::argmax(skip)) as u64;
            n += 1;
        }
    }
    let _ = engine.take_trace();
    Ok(if n == 0 {
        (None, None)
    } else {
        (Some(kl_sum / n as f64), Some(agree as f64 / n as f64))
    })
}

/// KL divergence between the softmax distributions of two logit vectors, KL(p ‖ q).
pub fn kl(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let lsm = |l: &[f32]| {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z = l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
        l.iter().map(move |&x| x as f64 - z).collect::<Vec<f64>>()
    };
    let (lp, lq) = (lsm(p_logits), lsm(q_logits));
    lp.iter()
        .zip(&lq)
        .map(|(a, b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
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
    device: &candle_core::Device,
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
    serde_json::json!({
        "harness_version": env!("CARGO_PKG_VERSION"),
        "git_commit": git,
        "backend": exp.backend.as_str(),
        "device": crate::engine::describe(device),
        "truncated_prompts": truncated,
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "model_dir": exp.model_dir.display().to_string(),
        "quick": quick,
        "started_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "elapsed_note": "timings are wall-clock on this machine; compare ratios within one run",
    })
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
