//! `harness merge`: assembles a run from its cell files — the one path from cells to results,
//! taken by a plain `harness run` after its last cell and by a sweep whose cells ran as
//! separate processes (Slurm array tasks, `xargs -P`, Kubernetes indexed Jobs).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::report::CellSummary;
use crate::trace::{self, CellTrace};

use super::plan::{read_plan, CellFiles, CellLock, LockMode, PlanFile, PLAN_FILE};

/// Where a results path leads.
enum Located {
    /// A working directory with a plan.
    Work(PathBuf),
    /// A merged run.
    Merged(PathBuf),
}

/// Finds the run behind `dir`: its working directory (`.<run-id>.partial`, holding
/// `plan.json`), or the final directory `<root>/<experiment>/<run-id>` whose working directory
/// sits beside it.
fn locate(dir: &Path) -> Result<Located> {
    if dir.join(PLAN_FILE).exists() {
        return Ok(Located::Work(dir.to_path_buf()));
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let work = dir
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!(".{name}.partial"));
    if work.join(PLAN_FILE).exists() {
        return Ok(Located::Work(work));
    }
    if dir.join("summary.json").exists() {
        return Ok(Located::Merged(dir.to_path_buf()));
    }
    Err(Error::Input(format!(
        "{}: not a run — neither it nor {} holds {PLAN_FILE} (cell runs write it when they start; `harness plan EXPERIMENT.toml` prints the results dir to pass here)",
        dir.display(),
        work.display()
    )))
}

/// `harness merge DIR [--partial]`: checks that every planned cell is present and sound, then
/// writes the run's files exactly as a single-process run does. With `partial`, merges the
/// cells that are there into `<run-id>-partial/` (the sweep can go on, and a later full merge
/// still works) and names the missing ones. Returns the merged directory.
pub fn merge_dir(dir: &Path, partial: bool) -> Result<PathBuf> {
    let work = match locate(dir)? {
        Located::Merged(d) => {
            eprintln!("{} is already merged", d.display());
            return Ok(d);
        }
        Located::Work(w) => w,
    };
    let plan = read_plan(&work)?;
    let exp_dir = work.parent().unwrap_or(Path::new(".")).to_path_buf();
    let final_dir = exp_dir.join(&plan.run_id);
    if final_dir.exists() {
        eprintln!("{} is already merged", final_dir.display());
        return Ok(final_dir);
    }
    let _lock = CellLock::take(
        &exp_dir.join(format!(".{}.lock", plan.run_id)),
        LockMode::Exclusive,
        &format!("results dir {}", work.display()),
    )?;
    let (dir, summaries) = assemble(&work, &plan, partial)?;
    eprintln!("{}", crate::report::summary_table(&summaries));
    eprintln!("results: {}", dir.display());
    Ok(dir)
}

/// One cell's files, read and checked.
struct ReadCell {
    summary: CellSummary,
    trace: Vec<CellTrace>,
    env: serde_json::Value,
}

/// Reads cell `id` of `plan`; `Ok(None)` when it has not finished (no summary yet).
fn read_cell(work: &Path, plan: &PlanFile, id: &str) -> Result<Option<ReadCell>> {
    let f = CellFiles::new(work, id);
    if !f.summary.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&f.summary).map_err(|e| Error::io(&f.summary, e))?;
    let summary: CellSummary = serde_json::from_str(&text)
        .map_err(|e| Error::format(&f.summary, format!("not a cell summary: {e}")))?;
    if summary.cell != id {
        return Err(Error::format(
            &f.summary,
            format!("holds cell `{}`, not `{id}`", summary.cell),
        ));
    }
    let text = std::fs::read_to_string(&f.env).map_err(|e| Error::io(&f.env, e))?;
    let env: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&f.env, format!("not a cell environment: {e}")))?;
    let run = env["run_id"].as_str().unwrap_or("?");
    if run != plan.run_id {
        return Err(Error::format(
            &f.env,
            format!(
                "was run for run `{run}` (another experiment file or model config), not `{}`: cells of different runs cannot be merged",
                plan.run_id
            ),
        ));
    }
    let trace = trace::read(&f.trace)?;
    if trace.len() != 1 || trace[0].cell != id {
        return Err(Error::format(
            &f.trace,
            format!("expected the trace of cell `{id}` alone"),
        ));
    }
    Ok(Some(ReadCell {
        summary,
        trace,
        env,
    }))
}

/// Writes the run's files from the cells of `work` into a fresh directory and renames it into
/// place: `<run-id>/` (every cell present; the working directory is removed) or, with
/// `partial`, `<run-id>-partial/` (the working directory stays). The caller holds the run's
/// exclusive lock.
pub(super) fn assemble(
    work: &Path,
    plan: &PlanFile,
    partial: bool,
) -> Result<(PathBuf, Vec<CellSummary>)> {
    let exp_dir = work.parent().unwrap_or(Path::new(".")).to_path_buf();
    // Files in cells/ that the plan does not name come from another sweep.
    let cells_dir = work.join("cells");
    let planned: std::collections::HashSet<&str> =
        plan.cells.iter().map(|c| c.id.as_str()).collect();
    for entry in std::fs::read_dir(&cells_dir).map_err(|e| Error::io(&cells_dir, e))? {
        let name = entry
            .map_err(|e| Error::io(&cells_dir, e))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        let Some(id) = name.strip_suffix(".json") else {
            continue;
        };
        let id = id.strip_suffix(".env").unwrap_or(id);
        if !planned.contains(id) {
            return Err(Error::format(
                cells_dir.join(&name),
                format!(
                    "cell `{id}` is not in this run's plan ({}): it comes from another experiment; remove it",
                    work.join(PLAN_FILE).display()
                ),
            ));
        }
    }
    let mut cells = Vec::new();
    let mut missing = Vec::new();
    let mut broken = Vec::new();
    for c in &plan.cells {
        match read_cell(work, plan, &c.id) {
            Ok(Some(r)) => cells.push(r),
            Ok(None) => missing.push(c),
            Err(e) => broken.push((c, e)),
        }
    }
    let rerun = |c: &super::plan::PlannedCell| {
        format!(
            "harness run {}{} --out {} --index {}",
            plan.experiment_file.display(),
            if plan.quick { " --quick" } else { "" },
            plan.out_root.display(),
            c.index
        )
    };
    if !broken.is_empty() {
        let list: Vec<String> = broken
            .iter()
            .map(|(c, e)| {
                format!(
                    "  {} (index {}): {e}\n    rerun: {}",
                    c.id,
                    c.index,
                    rerun(c)
                )
            })
            .collect();
        let msg = format!(
            "{} broken cell(s) in {} — remove their files and run them again:\n{}",
            broken.len(),
            cells_dir.display(),
            list.join("\n")
        );
        if !partial {
            return Err(Error::Input(msg));
        }
        eprintln!("{msg}\n(left out of the partial merge)");
    }
    let left_out: Vec<&super::plan::PlannedCell> = missing
        .iter()
        .copied()
        .chain(broken.iter().map(|(c, _)| *c))
        .collect();
    if !missing.is_empty() && !partial {
        let list: Vec<String> = missing
            .iter()
            .map(|c| format!("  {} (index {}): {}", c.id, c.index, rerun(c)))
            .collect();
        return Err(Error::Input(format!(
            "{} of {} cells have not finished in {} (merge with --partial to assemble what is there):\n{}",
            missing.len(),
            plan.cells.len(),
            work.display(),
            list.join("\n")
        )));
    }
    if cells.is_empty() {
        return Err(Error::Input(format!(
            "no finished cell in {}: nothing to merge",
            work.display()
        )));
    }

    let target = if partial && !left_out.is_empty() {
        exp_dir.join(format!("{}-partial", plan.run_id))
    } else {
        exp_dir.join(&plan.run_id)
    };
    let tmp = exp_dir.join(format!(".{}.merging-{}", plan.run_id, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let traces: Vec<CellTrace> = cells
        .iter_mut()
        .flat_map(|c| std::mem::take(&mut c.trace))
        .collect();
    let summaries: Vec<CellSummary> = cells.iter().map(|c| c.summary.clone()).collect();
    let written = (|| -> Result<()> {
        trace::write(&tmp.join("trace.parquet"), &traces)?;
        crate::report::write_summary(&tmp, &summaries)?;
        for f in ["experiment.toml", PLAN_FILE] {
            std::fs::copy(work.join(f), tmp.join(f)).map_err(|e| Error::io(work.join(f), e))?;
        }
        let env = merged_env(plan, &cells, &left_out);
        crate::io::write_atomic(
            &tmp.join("env.json"),
            serde_json::to_string_pretty(&env)
                .unwrap_or_default()
                .as_bytes(),
        )?;
        if plan.plots {
            crate::report::plot_dir(&tmp)?;
        }
        Ok(())
    })();
    drop(traces);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(|e| Error::io(&target, e))?;
    }
    std::fs::rename(&tmp, &target).map_err(|e| Error::io(&target, e))?;
    if left_out.is_empty() {
        std::fs::remove_dir_all(work).map_err(|e| Error::io(work, e))?;
        // A partial merge made earlier is superseded.
        let stale = exp_dir.join(format!("{}-partial", plan.run_id));
        let _ = std::fs::remove_dir_all(stale);
    } else {
        let ids: Vec<&str> = left_out.iter().map(|c| c.id.as_str()).collect();
        eprintln!(
            "partial merge: {} of {} cells; left out: {} (recorded in env.json)",
            cells.len(),
            plan.cells.len(),
            ids.join(", ")
        );
    }
    Ok((target, summaries))
}

/// `env.json` of a merged run: the plan, the processes that ran its cells (host, device,
/// references), and — for readers of single-process runs — the first cell's process fields at
/// the top level.
fn merged_env(
    plan: &PlanFile,
    cells: &[ReadCell],
    left_out: &[&super::plan::PlannedCell],
) -> serde_json::Value {
    let mut env = cells[0].env.clone();
    let mut hosts: Vec<String> = Vec::new();
    let mut per_cell = serde_json::Map::new();
    for c in cells {
        let h = format!(
            "{} ({})",
            c.env["host"].as_str().unwrap_or("?"),
            c.env["device"].as_str().unwrap_or("?")
        );
        if !hosts.contains(&h) {
            hosts.push(h);
        }
        per_cell.insert(c.summary.cell.clone(), c.env.clone());
    }
    if let Some(o) = env.as_object_mut() {
        o.remove("cell");
        o.remove("finished_unix");
        o.insert("experiment".into(), plan.experiment.clone().into());
        o.insert("quick".into(), plan.quick.into());
        o.insert("hosts".into(), hosts.into());
        o.insert("partial".into(), (!left_out.is_empty()).into());
        o.insert(
            "missing_cells".into(),
            left_out
                .iter()
                .map(|c| serde_json::Value::from(c.id.clone()))
                .collect::<Vec<_>>()
                .into(),
        );
        o.insert(
            "process_note".into(),
            "top-level host/device/reference fields are the first cell's process; `cells` has each cell's"
                .into(),
        );
        o.insert("cells".into(), per_cell.into());
    }
    env
}
