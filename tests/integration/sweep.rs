//! Sweeps as independent cell jobs: `harness plan`, `harness run --index/--cell/--shard`,
//! `harness merge` and `harness slurm`, against a single-process run of the same experiment.
//! (The real-Slurm test is `scripts/slurm_test.sh`, run by `scripts/test.sh`.)

use std::path::{Path, PathBuf};
use std::process::Command;

fn harness_in(dir: &Path, args: &[&str]) -> (i32, String, String) {
    crate::common::harness_in(Some(dir), args)
}

/// A 6-cell experiment on the MLX 4-bit fixture (3 policies × 2 capacities).
fn experiment(dir: &Path) -> PathBuf {
    let model = crate::common::fixture("glm4_moe-mlx4");
    let body = format!(
        "name = \"sw\"\n[model]\npath = \"{}\"\n[cache]\npolicy = [\"lru\", \"lfu\", \"lookahead\"]\ncapacity = [2, 4]\n[prompts]\ninline = [\"def f(x):\", \"import os\", \"class A:\"]\nwarmup = 1\n[generation]\nmax_new_tokens = 5\n[output]\nplots = false\n",
        model.display()
    );
    let p = dir.join("exp.toml");
    std::fs::write(&p, body).unwrap();
    p
}

/// Fields that are measurements of the machine at the time (timings, memory, the OS's
/// counters): everything else in a summary row is a function of the experiment alone.
const MEASURED: &[&str] = &[
    "load_seconds",
    "prefill_tps",
    "decode_tps",
    "decode_tps_min",
    "decode_tps_max",
    "ttft_seconds",
    "storage_read_gbps",
    "resident_decode_tps",
    "storage_bound_tps",
    "storage_bound_fraction",
    "peak_rss_bytes",
    "rss_anon_bytes",
    "rss_file_bytes",
    "overhead_bytes",
    "device_read_bytes",
    "page_cache_bytes",
];

fn deterministic(dir: &Path) -> (Vec<serde_json::Value>, Vec<moe_harness::trace::CellTrace>) {
    let mut rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    for r in &mut rows {
        for k in MEASURED {
            r.as_object_mut().unwrap().remove(*k);
        }
    }
    let mut trace = moe_harness::trace::read(&dir.join("trace.parquet")).unwrap();
    for c in &mut trace {
        c.rows.iter_mut().for_each(|r| r.load_ns = 0);
    }
    (rows, trace)
}

fn plan_json(dir: &Path, f: &Path, out: &Path, quick: bool) -> serde_json::Value {
    let (f, out) = (f.to_str().unwrap(), out.to_str().unwrap());
    let mut args = vec!["plan", f, "--out", out, "--json"];
    if quick {
        args.push("--quick");
    }
    let (code, stdout, err) = harness_in(dir, &args);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&stdout).unwrap()
}

#[test]
fn cells_run_apart_then_merged_equal_a_single_process_run() {
    let d = tempfile::tempdir().unwrap();
    let f = experiment(d.path());
    let (fs, single, cells) = (
        f.to_str().unwrap(),
        d.path().join("single"),
        d.path().join("cells"),
    );
    let (code, _, err) = harness_in(d.path(), &["run", fs, "--out", single.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");

    let plan = plan_json(d.path(), &f, &cells, false);
    let planned = plan["cells"].as_array().unwrap();
    assert_eq!(planned.len(), 6);
    for (i, c) in planned.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["status"], "todo");
    }
    let results = PathBuf::from(plan["results_dir"].as_str().unwrap());
    let out = cells.to_str().unwrap();
    // Cells in three ways, two processes side by side, in an order unlike the plan's.
    let spawn = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_harness"))
            .current_dir(d.path())
            .args(["run", fs, "--out", out])
            .args(args)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = spawn(&["--shard", "1/2"]);
    let b = spawn(&["--index", "4"]);
    for c in [a, b] {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let id0 = planned[0]["id"].as_str().unwrap();
    let (code, _, err) = harness_in(d.path(), &["run", fs, "--out", out, "--cell", id0]);
    assert_eq!(code, 0, "{err}");
    // Merging before every cell is done names the missing one and merges nothing.
    let (code, _, err) = harness_in(d.path(), &["merge", results.to_str().unwrap()]);
    assert_ne!(code, 0);
    let missing = planned[2]["id"].as_str().unwrap();
    assert!(
        err.contains("1 of 6 cells") && err.contains(missing) && err.contains("--index 2"),
        "{err}"
    );
    assert!(!results.exists());
    // --partial merges what is there, into its own directory, and says what is left out.
    let (code, _, err) = harness_in(d.path(), &["merge", results.to_str().unwrap(), "--partial"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("left out: ") && err.contains(missing), "{err}");
    let partial = results.with_file_name(format!(
        "{}-partial",
        results.file_name().unwrap().to_string_lossy()
    ));
    let env: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(partial.join("env.json")).unwrap()).unwrap();
    assert_eq!(env["partial"], true);
    assert_eq!(env["missing_cells"][0], missing);
    assert_eq!(deterministic(&partial).0.len(), 5);
    // Rerunning a done cell is a no-op.
    let done = PathBuf::from(planned[4]["summary"].as_str().unwrap());
    let before = std::fs::metadata(&done).unwrap().modified().unwrap();
    let (code, _, err) = harness_in(d.path(), &["run", fs, "--out", out, "--index", "4"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("already done"), "{err}");
    assert_eq!(
        std::fs::metadata(&done).unwrap().modified().unwrap(),
        before
    );
    // The last cell, then the merge.
    let (code, _, err) = harness_in(d.path(), &["run", fs, "--out", out, "--index", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("every cell of run"), "{err}");
    let (code, _, err) = harness_in(d.path(), &["merge", results.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(!partial.exists(), "a full merge supersedes the partial one");
    assert!(!results
        .with_file_name(format!(
            ".{}.partial",
            results.file_name().unwrap().to_string_lossy()
        ))
        .exists());

    let single_dir = single.join("sw").join(results.file_name().unwrap());
    let (s_rows, s_trace) = deterministic(&single_dir);
    let (m_rows, m_trace) = deterministic(&results);
    assert_eq!(
        s_rows, m_rows,
        "merged summary rows differ from the single run's"
    );
    assert_eq!(
        s_trace, m_trace,
        "merged trace differs from the single run's"
    );
    for r in &m_rows {
        assert!(!r["host"].as_str().unwrap().is_empty());
    }
    let env: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(results.join("env.json")).unwrap()).unwrap();
    assert_eq!(env["cells"].as_object().unwrap().len(), 6);
    assert_eq!(env["partial"], false);
    assert_eq!(env["hosts"].as_array().unwrap().len(), 1);
    // Merging again, or running again, finds the run complete.
    let (code, _, err) = harness_in(d.path(), &["merge", results.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("already merged"), "{err}");
    let plan = plan_json(d.path(), &f, &cells, false);
    assert_eq!(plan["cells"][0]["status"], "merged");
}

#[test]
fn bad_selections_and_broken_cells_fail_clearly() {
    let d = tempfile::tempdir().unwrap();
    let f = experiment(d.path());
    let fs = f.to_str().unwrap();
    let out = d.path().join("o");
    let os = out.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--index", "6"], "--index 6 is out of range"),
        (&["--shard", "2/2"], "--shard `2/2`"),
        (&["--shard", "x"], "expected I/N"),
        (&["--shard", "0/0"], "expected I/N"),
        (&["--cell", "nope"], "no such cell"),
    ];
    for (args, want) in cases {
        let mut a = vec!["run", fs, "--out", os];
        a.extend_from_slice(args);
        let (code, _, err) = harness_in(d.path(), &a);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let (code, _, err) = harness_in(d.path(), &["run", fs, "--index", "0", "--shard", "0/2"]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot be used with"), "{err}");

    let plan = plan_json(d.path(), &f, &out, false);
    let results = plan["results_dir"].as_str().unwrap().to_string();
    let (code, _, err) = harness_in(d.path(), &["merge", &results]);
    assert_ne!(code, 0);
    assert!(err.contains("not a run"), "{err}");
    for i in ["0", "1"] {
        let (code, _, err) = harness_in(d.path(), &["run", fs, "--out", os, "--index", i]);
        assert_eq!(code, 0, "{err}");
    }
    let c0 = &plan["cells"][0];
    let summary = PathBuf::from(c0["summary"].as_str().unwrap());
    let good = std::fs::read(&summary).unwrap();
    // A half-written summary: the merge refuses it, names the file and merges nothing.
    std::fs::write(&summary, &good[..good.len() / 2]).unwrap();
    let (code, _, err) = harness_in(d.path(), &["merge", &results, "--partial"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("broken cell") && err.contains(&summary.display().to_string()),
        "{err}"
    );
    let partial = format!("{results}-partial");
    let rows: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&partial).join("summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(rows.len(), 1, "the broken cell is left out");
    std::fs::write(&summary, &good).unwrap();
    // A cell from another run (another experiment file or model config): refused.
    let env_path = summary.with_file_name(format!("{}.env.json", c0["id"].as_str().unwrap()));
    let env = std::fs::read_to_string(&env_path).unwrap();
    let run_id = plan["run_id"].as_str().unwrap();
    std::fs::write(&env_path, env.replace(run_id, "0badc0de")).unwrap();
    let (code, _, err) = harness_in(d.path(), &["merge", &results, "--partial"]);
    assert!(
        err.contains("cells of different runs cannot be merged"),
        "{err}"
    );
    assert_eq!(code, 0);
    std::fs::write(&env_path, env).unwrap();
    // A cell the plan does not have: refused outright.
    let stray = summary.with_file_name("lru_cap99_load.json");
    std::fs::write(&stray, &good).unwrap();
    let (code, _, err) = harness_in(d.path(), &["merge", &results, "--partial"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("lru_cap99_load") && err.contains("not in this run's plan"),
        "{err}"
    );
    std::fs::remove_file(&stray).unwrap();
    // A truncated trace.
    let trace = PathBuf::from(c0["trace"].as_str().unwrap());
    std::fs::write(&trace, b"PAR1").unwrap();
    let (code, _, err) = harness_in(d.path(), &["merge", &results]);
    assert_ne!(code, 0);
    assert!(err.contains(&trace.display().to_string()), "{err}");
}

#[test]
fn slurm_script_runs_one_cell_per_array_task_then_merges() {
    let d = tempfile::tempdir().unwrap();
    let f = experiment(d.path());
    let fs = f.to_str().unwrap();
    let out = d.path().join("o");
    let (code, script, err) = harness_in(
        d.path(),
        &[
            "slurm",
            fs,
            "--out",
            out.to_str().unwrap(),
            "--quick",
            "--partition",
            "gpu",
            "--time",
            "02:00:00",
            "--gpus",
            "1",
            "--array-parallelism",
            "2",
            "--extra-sbatch=--account=lab",
        ],
    );
    assert_eq!(code, 0, "{err}");
    for want in [
        "#SBATCH --array=0-5%2\n",
        "#SBATCH --partition=gpu\n",
        "#SBATCH --time=02:00:00\n",
        "#SBATCH --gpus=1\n",
        "#SBATCH --account=lab\n",
        "--index \"$SLURM_ARRAY_TASK_ID\"",
        "--quick",
        "--dependency=afterok:$array",
        "merge",
    ] {
        assert!(script.contains(want), "missing {want:?} in\n{script}");
    }
    let quick = plan_json(d.path(), &f, &out, true);
    let wrap = script.lines().find(|l| l.contains("--wrap=")).unwrap();
    assert!(
        wrap.contains(" merge ") && wrap.contains(quick["results_dir"].as_str().unwrap()),
        "the merge job merges the quick run's results dir:\n{script}"
    );
    // The script is valid bash.
    let path = d.path().join("sweep.sbatch");
    std::fs::write(&path, &script).unwrap();
    let st = Command::new("bash").arg("-n").arg(&path).status().unwrap();
    assert!(st.success());
    // Inside an array task it runs that task's cell (no Slurm needed to check that).
    let st = Command::new("bash")
        .arg(&path)
        .env("SLURM_JOB_ID", "77")
        .env("SLURM_ARRAY_TASK_ID", "3")
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let quick = plan_json(d.path(), &f, &out, true);
    assert_eq!(quick["cells"][3]["status"], "done");
    assert_eq!(quick["cells"][2]["status"], "todo");
    let env: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(quick["cells"][3]["summary"].as_str().unwrap()).with_file_name(format!(
                "{}.env.json",
                quick["cells"][3]["id"].as_str().unwrap()
            )),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(env["slurm"]["array_task_id"], "3");
    // --submit without Slurm's client says so.
    let out2 = Command::new(env!("CARGO_BIN_EXE_harness"))
        .current_dir(d.path())
        .args(["slurm", fs, "--submit"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(!out2.status.success());
    let err = String::from_utf8_lossy(&out2.stderr);
    assert!(err.contains("`sbatch` is not on PATH"), "{err}");
    let (code, _, err) = harness_in(d.path(), &["slurm", fs, "--array-parallelism", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("--array-parallelism 0"), "{err}");
}
