//! `harness slurm`: a sweep as a Slurm job array — one array task per cell
//! (`harness run EXP --index $SLURM_ARRAY_TASK_ID`) and a merge job that runs once every task
//! succeeded (`--dependency=afterok`). The script submits itself: `bash sweep.sbatch` submits
//! the array and the merge; `sbatch sweep.sbatch` submits the array alone.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

use super::plan::RunPlan;

/// What the array's `#SBATCH` lines ask for.
#[derive(Debug, Clone, Default)]
pub struct SlurmOptions {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--time` (per array task, and for the merge job).
    pub time: Option<String>,
    /// `--gpus` per array task.
    pub gpus: Option<u32>,
    /// `--cpus-per-task`.
    pub cpus_per_task: Option<u32>,
    /// `--mem` per array task.
    pub mem: Option<String>,
    /// At most this many tasks at once (`--array=0-N%K`).
    pub array_parallelism: Option<usize>,
    /// More `#SBATCH` options, each as written after `#SBATCH` (`--account=lab`).
    pub extra: Vec<String>,
    /// The harness binary the tasks run (default: this one).
    pub harness: Option<PathBuf>,
}

/// Quotes `s` for a POSIX shell.
fn sh(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn abs(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| Error::io(p, e))
}

/// Where a sweep's script and Slurm logs go: `<root>/<experiment>/slurm/`.
pub fn slurm_dir(plan: &RunPlan) -> PathBuf {
    plan.exp_dir().join("slurm")
}

/// The array job script of `plan`'s sweep. Creates the log directory (Slurm does not).
pub fn script(plan: &RunPlan, o: &SlurmOptions) -> Result<String> {
    let n = plan.exp.cells.len();
    if n == 0 {
        return Err(Error::Input(format!(
            "{} has no cells to run",
            plan.exp.file.display()
        )));
    }
    for (what, v) in [
        ("--partition", &o.partition),
        ("--time", &o.time),
        ("--mem", &o.mem),
    ] {
        if let Some(v) = v {
            if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c == '\'') {
                return Err(Error::Input(format!(
                    "{what} `{v}`: expected one word without spaces or quotes"
                )));
            }
        }
    }
    for e in &o.extra {
        if !e.starts_with('-') || e.contains('\n') {
            return Err(Error::Input(format!(
                "--extra-sbatch `{e}`: expected one sbatch option such as --account=lab"
            )));
        }
    }
    if o.array_parallelism == Some(0) {
        return Err(Error::Input(
            "--array-parallelism 0: at least one task must run at a time".into(),
        ));
    }
    let harness = match &o.harness {
        Some(h) => abs(h)?,
        None => std::env::current_exe()
            .map_err(|e| Error::Input(format!("cannot find this harness binary's path: {e}")))?,
    };
    // The tasks start in this directory (`--chdir`), so the experiment path stays as the user
    // gave it: model paths resolved from it, and recorded in the summaries, then read exactly as
    // in a single-process `harness run` from here.
    let exp_file = plan.exp.file.clone();
    let root = abs(&plan.root)?;
    let results = abs(&plan.final_dir)?;
    let logs = abs(&slurm_dir(plan))?;
    let cwd =
        std::env::current_dir().map_err(|e| Error::Input(format!("no working directory: {e}")))?;
    std::fs::create_dir_all(&logs).map_err(|e| Error::io(&logs, e))?;
    let name = format!("moe-{}", plan.exp.name);
    let path = |p: &Path| sh(&p.display().to_string());
    let mut s = String::new();
    s += "#!/bin/bash\n";
    s += &format!(
        "# moe-harness sweep: experiment `{}` ({}), run {}, {n} cells as one Slurm array.\n",
        plan.exp.name,
        exp_file.display(),
        plan.run_id
    );
    s += "#   bash THIS_FILE     submits the array and a merge job that runs after it (afterok)\n";
    s += &format!(
        "#   sbatch THIS_FILE   submits the array alone; then: harness merge {}\n",
        results.display()
    );
    s += "# Resubmitting after an interruption skips the cells that finished.\n";
    s += &format!("#SBATCH --job-name={name}\n");
    s += &format!(
        "#SBATCH --array=0-{}{}\n",
        n - 1,
        o.array_parallelism
            .map_or(String::new(), |k| format!("%{k}"))
    );
    s += &format!("#SBATCH --output={}/%x-%A_%a.out\n", logs.display());
    s += &format!("#SBATCH --chdir={}\n", cwd.display());
    if let Some(p) = &o.partition {
        s += &format!("#SBATCH --partition={p}\n");
    }
    if let Some(t) = &o.time {
        s += &format!("#SBATCH --time={t}\n");
    }
    if let Some(g) = o.gpus {
        s += &format!("#SBATCH --gpus={g}\n");
    }
    if let Some(c) = o.cpus_per_task {
        s += &format!("#SBATCH --cpus-per-task={c}\n");
    }
    if let Some(m) = &o.mem {
        s += &format!("#SBATCH --mem={m}\n");
    }
    for e in &o.extra {
        s += &format!("#SBATCH {e}\n");
    }
    s += "set -euo pipefail\n";
    s += &format!("HARNESS={}\n", path(&harness));
    s += "if [ -z \"${SLURM_ARRAY_TASK_ID:-}\" ]; then\n";
    s += "  if [ -n \"${SLURM_JOB_ID:-}\" ]; then\n";
    s += "    echo \"this script is an array job: submit it with sbatch, or run it with bash to submit it\" >&2; exit 2\n";
    s += "  fi\n";
    s += &format!("  mkdir -p {}\n", path(&logs));
    s += "  array=$(sbatch --parsable \"$0\")\n";
    s += "  array=${array%%;*}\n";
    let merge_cmd = format!("{} merge {}", path(&harness), path(&results));
    let mut merge_opts = vec![
        format!("--job-name={name}-merge"),
        "--dependency=afterok:$array".to_string(),
        "--kill-on-invalid-dep=yes".to_string(),
        format!("--output={}/%x-%j.out", logs.display()),
        format!("--chdir={}", cwd.display()),
    ];
    if let Some(p) = &o.partition {
        merge_opts.push(format!("--partition={p}"));
    }
    if let Some(t) = &o.time {
        merge_opts.push(format!("--time={t}"));
    }
    let quoted: Vec<String> = merge_opts
        .iter()
        .map(|m| {
            if m.contains("$array") {
                format!("\"{m}\"")
            } else {
                sh(m)
            }
        })
        .collect();
    s += &format!(
        "  merge=$(sbatch --parsable {} --wrap={})\n",
        quoted.join(" "),
        sh(&merge_cmd)
    );
    s += "  merge=${merge%%;*}\n";
    s += &format!("  echo \"array job $array ({n} tasks), merge job $merge\"\n");
    s += "  exit 0\n";
    s += "fi\n";
    s += &format!(
        "exec \"$HARNESS\" run {} --index \"$SLURM_ARRAY_TASK_ID\" --out {}{}\n",
        path(&exp_file),
        path(&root),
        if plan.quick { " --quick" } else { "" }
    );
    Ok(s)
}

/// `harness slurm --submit`: writes the script to `<root>/<experiment>/slurm/<run-id>.sbatch`
/// and runs it with bash (which submits the array and the merge); returns its report
/// (`array job A (N tasks), merge job M`).
pub fn submit(plan: &RunPlan, o: &SlurmOptions) -> Result<String> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("sbatch").is_file()))
        .unwrap_or(false);
    if !found {
        return Err(Error::Input(
            "--submit: `sbatch` is not on PATH (Slurm's client). Without it, write the script with `harness slurm EXP > sweep.sbatch` and run `bash sweep.sbatch` where Slurm is".into(),
        ));
    }
    let text = script(plan, o)?;
    let path = slurm_dir(plan).join(format!("{}.sbatch", plan.run_id));
    crate::io::write_atomic(&path, text.as_bytes())?;
    let out = std::process::Command::new("bash")
        .arg(&path)
        .output()
        .map_err(|e| Error::io(&path, e))?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        return Err(Error::Input(format!(
            "submitting {} failed ({}): {}{}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout
        )));
    }
    Ok(format!("{stdout}\nscript: {}", path.display()))
}
