//! A run's plan: its id, where it works and where it lands, its cells with stable indices, and
//! which of them a process runs (`--cell`, `--index`, `--shard`). The plan is what makes a sweep
//! schedulable by anything that can start `harness run … --index N` — a Slurm array, `xargs -P`,
//! a Kubernetes indexed Job — with `harness merge` assembling the run afterwards.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::experiment::Experiment;

/// The file in a run's working directory that says what the run is.
pub const PLAN_FILE: &str = "plan.json";

/// A run of an experiment: quick mode applied, paths resolved.
#[derive(Debug, Clone)]
pub struct RunPlan {
    /// The experiment as this run runs it (`--quick` applied).
    pub exp: Experiment,
    /// Whether `--quick` shaped it.
    pub quick: bool,
    /// Results root.
    pub root: PathBuf,
    /// Stable id: a hash of the experiment file, the model config and the quick flag.
    pub run_id: String,
    /// Where the finished run lands: `<root>/<experiment>/<run-id>/`.
    pub final_dir: PathBuf,
    /// Where cells are written until the merge: `<root>/<experiment>/.<run-id>.partial/`.
    pub work_dir: PathBuf,
}

/// What `plan.json` records: enough for `harness merge` to assemble the run without the
/// experiment file or the model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlanFile {
    /// Run id.
    pub run_id: String,
    /// Experiment name.
    pub experiment: String,
    /// The experiment file the plan came from.
    pub experiment_file: PathBuf,
    /// Model directory.
    pub model_dir: PathBuf,
    /// Results root (`--out`).
    pub out_root: PathBuf,
    /// `--quick`.
    pub quick: bool,
    /// Backend the experiment asks for.
    pub backend: String,
    /// Whether the merge draws figures.
    pub plots: bool,
    /// Emulated storage device, if any.
    pub storage_device: Option<serde_json::Value>,
    /// The cells in index order.
    pub cells: Vec<PlannedCell>,
}

/// One cell of a plan.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlannedCell {
    /// Position in the sweep (the `--index` / array task id).
    pub index: usize,
    /// Stable cell id.
    pub id: String,
    /// Policy.
    pub policy: String,
    /// Budget as written (`cap8`, `25%`, `2GiB`, `unlimited`).
    pub budget: String,
    /// Miss mode.
    pub miss: String,
}

/// Which cells one process runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every cell, then the merge (a plain `harness run`).
    All,
    /// The cell with this id.
    Cell(String),
    /// The cell at this index.
    Index(usize),
    /// Cells whose index is `i` modulo `n`.
    Shard {
        /// This shard, `0 ≤ i < n`.
        i: usize,
        /// Number of shards.
        n: usize,
    },
}

impl Selection {
    /// Parses `--shard I/N`.
    pub fn shard(s: &str) -> Result<Selection> {
        let bad = || {
            Error::Input(format!(
                "--shard `{s}`: expected I/N with 0 <= I < N, e.g. --shard 0/4"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let i: usize = i.trim().parse().map_err(|_| bad())?;
        let n: usize = n.trim().parse().map_err(|_| bad())?;
        if n == 0 || i >= n {
            return Err(bad());
        }
        Ok(Selection::Shard { i, n })
    }

    /// The indices of the cells of `plan` this selection runs.
    pub fn indices(&self, plan: &RunPlan) -> Result<Vec<usize>> {
        let cells = &plan.exp.cells;
        let n = cells.len();
        Ok(match self {
            Selection::All => (0..n).collect(),
            Selection::Index(i) if *i < n => vec![*i],
            Selection::Index(i) => {
                return Err(Error::Input(format!(
                    "--index {i} is out of range: {} has {n} cells (0..={})",
                    plan.exp.file.display(),
                    n.saturating_sub(1)
                )))
            }
            Selection::Cell(id) => match cells.iter().position(|c| &c.id == id) {
                Some(i) => vec![i],
                None => {
                    let ids: Vec<&str> = cells.iter().map(|c| c.id.as_str()).collect();
                    return Err(Error::Input(format!(
                        "--cell `{id}`: {} has no such cell (cells: {})",
                        plan.exp.file.display(),
                        ids.join(", ")
                    )));
                }
            },
            Selection::Shard { i, n: shards } => (0..n).filter(|k| k % shards == *i).collect(),
        })
    }
}

impl RunPlan {
    /// The plan of `exp` under `--quick` and `--out`.
    pub fn new(exp: &Experiment, quick: bool, out_root: Option<PathBuf>) -> Result<RunPlan> {
        let mut exp = exp.clone();
        if quick {
            exp.prompts.truncate(3);
            exp.warmup.truncate(1);
            exp.generation.max_new_tokens = exp.generation.max_new_tokens.min(8);
            exp.generation.repeats = 1;
            // Speed is measured on the experiment's own model: no real-size replay checkpoint.
            exp.replay_on = None;
        }
        let root = out_root.unwrap_or_else(|| exp.out_root.clone());
        let run_id = run_id(&exp, quick)?;
        let exp_dir = root.join(&exp.name);
        Ok(RunPlan {
            final_dir: exp_dir.join(&run_id),
            work_dir: exp_dir.join(format!(".{run_id}.partial")),
            exp,
            quick,
            root,
            run_id,
        })
    }

    /// `<root>/<experiment>/`.
    pub fn exp_dir(&self) -> PathBuf {
        self.root.join(&self.exp.name)
    }

    /// The lock every writer of this run takes (exclusive for a whole run or a merge, shared
    /// for cell runs).
    pub fn lock_path(&self) -> PathBuf {
        self.exp_dir().join(format!(".{}.lock", self.run_id))
    }

    /// What `plan.json` holds.
    pub fn file(&self) -> PlanFile {
        let exp = &self.exp;
        PlanFile {
            run_id: self.run_id.clone(),
            experiment: exp.name.clone(),
            experiment_file: absolute(&exp.file),
            model_dir: absolute(&exp.model_dir),
            out_root: absolute(&self.root),
            quick: self.quick,
            backend: exp.backend.as_str().to_string(),
            plots: exp.plots,
            storage_device: exp
                .storage
                .device
                .as_ref()
                .map(|(n, d)| serde_json::json!({"name": n, "model": d})),
            cells: exp
                .cells
                .iter()
                .enumerate()
                .map(|(index, c)| PlannedCell {
                    index,
                    id: c.id.clone(),
                    policy: c.policy.to_string(),
                    budget: c.budget.to_string(),
                    miss: c.miss.to_string(),
                })
                .collect(),
        }
    }

    /// Writes `plan.json` and a copy of the experiment file into the working directory, unless
    /// they are there already (then checks that they are this run's).
    pub fn write_work_files(&self) -> Result<()> {
        let cells = self.work_dir.join("cells");
        std::fs::create_dir_all(&cells).map_err(|e| Error::io(&cells, e))?;
        let plan_path = self.work_dir.join(PLAN_FILE);
        if plan_path.exists() {
            let found = read_plan(&self.work_dir)?;
            if found.run_id != self.run_id || found.cells != self.file().cells {
                return Err(Error::format(
                    &plan_path,
                    format!(
                        "belongs to run `{}` with other cells, not to run `{}` of {}: remove {} or pass another --out",
                        found.run_id,
                        self.run_id,
                        self.exp.file.display(),
                        self.work_dir.display()
                    ),
                ));
            }
        } else {
            let json = serde_json::to_string_pretty(&self.file())
                .map_err(|e| Error::Input(e.to_string()))?;
            crate::io::write_atomic(&plan_path, json.as_bytes())?;
        }
        let copy = self.work_dir.join("experiment.toml");
        if !copy.exists() {
            let text = std::fs::read(&self.exp.file).map_err(|e| Error::io(&self.exp.file, e))?;
            crate::io::write_atomic(&copy, &text)?;
        }
        Ok(())
    }

    /// `(summary, trace, environment)` files of cell `id` in the working directory; the summary
    /// is written last, so a cell is done exactly when its summary exists.
    pub fn cell_files(&self, id: &str) -> CellFiles {
        CellFiles::new(&self.work_dir, id)
    }

    /// The plan as `harness plan --json` prints it.
    pub fn to_json(&self) -> serde_json::Value {
        let cells: Vec<serde_json::Value> = self
            .exp
            .cells
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let f = self.cell_files(&c.id);
                serde_json::json!({
                    "index": index,
                    "id": c.id,
                    "policy": c.policy.to_string(),
                    "budget": c.budget.to_string(),
                    "miss": c.miss.to_string(),
                    "status": self.status(&c.id),
                    "summary": f.summary,
                    "trace": f.trace,
                })
            })
            .collect();
        serde_json::json!({
            "experiment": self.exp.name,
            "experiment_file": self.exp.file,
            "run_id": self.run_id,
            "quick": self.quick,
            "results_dir": self.final_dir,
            "work_dir": self.work_dir,
            "cells": cells,
        })
    }

    /// `merged` (the run is complete), `done`, `running` (a process holds its lock) or `todo`.
    pub fn status(&self, id: &str) -> &'static str {
        if self.final_dir.exists() {
            return "merged";
        }
        let f = self.cell_files(id);
        if f.summary.exists() {
            "done"
        } else if f.lock.exists() && CellLock::held(&f.lock) {
            "running"
        } else {
            "todo"
        }
    }
}

/// The files of one cell in a run's working directory.
#[derive(Debug, Clone)]
pub struct CellFiles {
    /// `cells/<id>.json`: the summary row; its presence marks the cell done.
    pub summary: PathBuf,
    /// `cells/<id>.parquet`: the cell's routing trace.
    pub trace: PathBuf,
    /// `cells/<id>.env.json`: the process that ran it (host, device, references).
    pub env: PathBuf,
    /// `cells/<id>.lock`: held while a process runs the cell.
    pub lock: PathBuf,
}

impl CellFiles {
    /// The files of cell `id` under `work_dir`.
    pub fn new(work_dir: &Path, id: &str) -> CellFiles {
        let cells = work_dir.join("cells");
        CellFiles {
            summary: cells.join(format!("{id}.json")),
            trace: cells.join(format!("{id}.parquet")),
            env: cells.join(format!("{id}.env.json")),
            lock: cells.join(format!("{id}.lock")),
        }
    }
}

/// Reads `plan.json` of a working directory.
pub fn read_plan(work_dir: &Path) -> Result<PlanFile> {
    let path = work_dir.join(PLAN_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(&path, e.to_string()))
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

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// How a lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// One holder (a whole run, a merge, one cell).
    Exclusive,
    /// Many holders (cell runs of one sweep, side by side).
    Shared,
}

/// A lock file holding its owner's pid and host; released when dropped or when the process
/// ends (an advisory `flock`, which NFS and Lustre with `-o flock` carry across machines).
#[derive(Debug)]
pub struct CellLock {
    file: std::fs::File,
    mode: LockMode,
}

impl Drop for CellLock {
    fn drop(&mut self) {
        // An exclusive owner's name goes with it, so that no later refusal names a stale pid.
        if self.mode == LockMode::Exclusive {
            let _ = self.file.set_len(0);
        }
    }
}

impl CellLock {
    /// Takes `path` in `mode` for the results in `what`; fails at once, naming the owner, if
    /// another process holds it.
    pub fn take(path: &Path, mode: LockMode, what: &str) -> Result<CellLock> {
        use std::io::{Read, Seek, Write};
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let got = match mode {
            LockMode::Exclusive => file.try_lock(),
            LockMode::Shared => file.try_lock_shared(),
        };
        match got {
            Ok(()) => {
                if mode == LockMode::Exclusive {
                    file.set_len(0).map_err(|e| Error::io(path, e))?;
                    file.rewind().map_err(|e| Error::io(path, e))?;
                    write!(file, "{} on {}", std::process::id(), hostname())
                        .map_err(|e| Error::io(path, e))?;
                }
                Ok(CellLock { file, mode })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut owner = String::new();
                let _ = file.read_to_string(&mut owner);
                let owner = owner.trim();
                Err(Error::Input(format!(
                    "{what} in use by {} (wait for it to finish, or pass another --out)",
                    if owner.is_empty() {
                        "another harness process (cells of this sweep running)".to_string()
                    } else {
                        format!("pid {owner}")
                    }
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(path, e)),
        }
    }

    /// Whether some process holds `path` now.
    pub fn held(path: &Path) -> bool {
        let Ok(file) = std::fs::OpenOptions::new().read(true).open(path) else {
            return false;
        };
        match file.try_lock_shared() {
            Ok(()) => {
                let _ = file.unlock();
                false
            }
            Err(_) => true,
        }
    }
}

/// This machine's host name (`uname -n`), or `unknown`.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for `buf.len()` bytes; gethostname NUL-terminates within it
    // on success (a truncated name is cut at the last byte we read below).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len() - 1);
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
