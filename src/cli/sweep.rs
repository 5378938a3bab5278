//! `harness plan`, `harness merge`, `harness slurm` and the cell selection of `harness run`:
//! a sweep's cells as independent jobs for whatever scheduler runs them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use moe_harness::run::slurm::SlurmOptions;
use moe_harness::run::{RunPlan, Selection};

/// Which cells `harness run` runs (default: all, then the merge).
#[derive(Args, Clone, Default)]
#[group(multiple = false)]
pub struct SelectArgs {
    /// Run only the cell with this id (see `harness plan`); no merge.
    #[arg(long)]
    cell: Option<String>,
    /// Run only the cell at this index (0-based, as `harness plan` lists them; a Slurm array
    /// task passes $SLURM_ARRAY_TASK_ID); no merge.
    #[arg(long)]
    index: Option<usize>,
    /// Run the cells whose index is I modulo N (`--shard I/N`, 0 <= I < N); no merge.
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
}

impl SelectArgs {
    /// The selection these flags ask for.
    pub fn selection(&self) -> Result<Selection> {
        Ok(match (&self.cell, self.index, &self.shard) {
            (Some(c), _, _) => Selection::Cell(c.clone()),
            (_, Some(i), _) => Selection::Index(i),
            (_, _, Some(s)) => Selection::shard(s)?,
            _ => Selection::All,
        })
    }
}

/// The experiment and run shape shared by plan and slurm.
#[derive(Args)]
pub struct RunShape {
    /// Experiment TOML.
    experiment: PathBuf,
    /// Results root (default: the experiment's `output.dir`, else ./results).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The `--quick` variant of the run (its own run id).
    #[arg(long)]
    quick: bool,
}

impl RunShape {
    fn plan(&self) -> Result<RunPlan> {
        let exp = moe_harness::experiment::load(&self.experiment, true)?;
        Ok(RunPlan::new(&exp, self.quick, self.out.clone())?)
    }
}

#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    shape: RunShape,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct MergeArgs {
    /// The run's results directory, as `harness plan` prints it (results/<experiment>/<run-id>),
    /// or its working directory (results/<experiment>/.<run-id>.partial).
    dir: PathBuf,
    /// Merge the cells that finished into <run-id>-partial/ and name the missing ones, instead
    /// of refusing.
    #[arg(long)]
    partial: bool,
}

#[derive(Args)]
pub struct SlurmArgs {
    #[command(flatten)]
    shape: RunShape,
    /// Slurm partition.
    #[arg(long)]
    partition: Option<String>,
    /// Time limit of each array task (and of the merge job), e.g. 04:00:00.
    #[arg(long)]
    time: Option<String>,
    /// GPUs per array task.
    #[arg(long)]
    gpus: Option<u32>,
    /// CPUs per array task.
    #[arg(long)]
    cpus_per_task: Option<u32>,
    /// Memory per array task, e.g. 64G.
    #[arg(long)]
    mem: Option<String>,
    /// At most this many array tasks at once (`--array=0-N%K`).
    #[arg(long)]
    array_parallelism: Option<usize>,
    /// Another `#SBATCH` option, e.g. --extra-sbatch=--account=lab (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    extra_sbatch: Vec<String>,
    /// Submit now (array, then the merge after it) and print the job ids, instead of printing
    /// the script.
    #[arg(long)]
    submit: bool,
}

/// `harness plan`.
pub fn cmd_plan(a: PlanArgs) -> Result<ExitCode> {
    let plan = a.shape.plan()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&plan.to_json())?);
        return Ok(ExitCode::SUCCESS);
    }
    let exp = &plan.exp;
    println!(
        "experiment {} ({}), run {}, {} cells",
        exp.name,
        exp.file.display(),
        plan.run_id,
        exp.cells.len()
    );
    println!("results:  {}", plan.final_dir.display());
    println!("cells in: {}", plan.work_dir.join("cells").display());
    println!(
        "{:>5}  {:<28} {:<14} {:<10} {:<5} status",
        "index", "cell", "policy", "budget", "miss"
    );
    for (i, c) in exp.cells.iter().enumerate() {
        println!(
            "{i:>5}  {:<28} {:<14} {:<10} {:<5} {}",
            c.id,
            c.policy.to_string(),
            c.budget.to_string(),
            c.miss.to_string(),
            plan.status(&c.id)
        );
    }
    let quick = if plan.quick { " --quick" } else { "" };
    let out = a
        .shape
        .out
        .as_ref()
        .map_or(String::new(), |o| format!(" --out {}", o.display()));
    println!(
        "one cell:  harness run {}{quick}{out} --index N",
        exp.file.display()
    );
    println!("merge:     harness merge {}", plan.final_dir.display());
    Ok(ExitCode::SUCCESS)
}

/// `harness merge`.
pub fn cmd_merge(a: MergeArgs) -> Result<ExitCode> {
    moe_harness::run::merge_dir(&a.dir, a.partial)?;
    Ok(ExitCode::SUCCESS)
}

/// `harness slurm`.
pub fn cmd_slurm(a: SlurmArgs) -> Result<ExitCode> {
    let plan = a.shape.plan()?;
    let o = SlurmOptions {
        partition: a.partition,
        time: a.time,
        gpus: a.gpus,
        cpus_per_task: a.cpus_per_task,
        mem: a.mem,
        array_parallelism: a.array_parallelism,
        extra: a.extra_sbatch,
        harness: None,
    };
    if a.submit {
        println!("{}", moe_harness::run::slurm::submit(&plan, &o)?);
    } else {
        print!("{}", moe_harness::run::slurm::script(&plan, &o)?);
    }
    Ok(ExitCode::SUCCESS)
}
