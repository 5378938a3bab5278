//! `harness run` end to end on a fixture model: outputs, determinism, engine ≡ simulator,
//! sweep cell ≡ single run, resume after a kill, and bad experiment files.

use std::path::{Path, PathBuf};
use std::process::Command;

use moe_harness::experiment;
use moe_harness::report::CellSummary;
use moe_harness::run::{run, RunOptions};

fn write_experiment(dir: &Path, cache: &str) -> PathBuf {
    let model = crate::common::fixture("glm4_moe-mlx4");
    let body = format!(
        "name = \"t\"\n[model]\npath = \"{}\"\n[cache]\n{cache}\n[prompts]\ninline = [\"def f(x):\", \"import os\", \"class A:\", \"print(1)\"]\nwarmup = 1\n[generation]\nmax_new_tokens = 6\n[output]\ndir = \"out\"\n",
        model.display()
    );
    let p = dir.join("exp.toml");
    std::fs::write(&p, body).unwrap();
    p
}

fn run_file(file: &Path) -> PathBuf {
    let exp = experiment::load(file, true).unwrap();
    run(&exp, &RunOptions::default()).unwrap()
}

fn summaries(dir: &Path) -> Vec<CellSummary> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

fn harness(args: &[&str]) -> (i32, String, String) {
    crate::common::harness_in(None, args)
}

#[test]
fn run_writes_results_and_replays_to_the_same_hits() {
    let d = tempfile::tempdir().unwrap();
    let f = write_experiment(d.path(), "policy = [\"lru\", \"lfu\", \"lookahead\", \"lcp-0.25-128\", \"lfu-decay0.9\", \"lfru\", \"mrs\", \"layer-aware\", \"eam-2\", \"adaptive-split\"]\ncapacity = [2, 4]\nmiss = [\"load\", \"skip\", \"substitute\"]");
    let out = run_file(&f);
    for name in [
        "trace.parquet",
        "summary.parquet",
        "summary.json",
        "experiment.toml",
        "env.json",
        "hit_rate_vs_budget.png",
        "hit_rate_vs_budget.svg",
        "demand_hit_rate_vs_budget.png",
        "decode_tps_vs_budget.png",
        "hit_rate_per_layer.png",
        "hit_rate_over_decode.svg",
        "expert_frequency.png",
    ] {
        assert!(out.join(name).exists(), "missing {name}");
    }
    assert!(
        !out.join("cells").exists(),
        "per-cell scratch files are merged away"
    );
    let s = summaries(&out);
    assert_eq!(s.len(), 60);
    for c in &s {
        assert!(c.accesses > 0 && c.hits <= c.accesses, "{c:?}");
        assert!(
            c.belady_hit_rate + 1e-12 >= c.effective_hit_rate,
            "{}: Belady {} below {}",
            c.cell,
            c.belady_hit_rate,
            c.effective_hit_rate
        );
        if c.prefetch_issued == 0 {
            assert_eq!(c.effective_hit_rate, c.hit_rate, "{c:?}");
        }
        if c.miss != "load" {
            assert!(c.kl_mean.is_some() && c.top1_agreement.is_some(), "{c:?}");
        }
        let misses = c.accesses - c.hits;
        match c.miss.as_str() {
            "skip" => assert_eq!(c.dropped, misses, "{c:?}"),
            "substitute" => assert_eq!(c.substituted + c.dropped, misses, "{c:?}"),
            _ => assert_eq!(c.substituted + c.dropped, 0, "{c:?}"),
        }
        if c.policy == "lookahead" {
            assert!(c.prefetch_issued > 0, "{c:?}");
        }
    }
    // Summary Parquet carries the same rows as summary.json.
    assert_eq!(
        moe_harness::report::read_summary(&out.join("summary.parquet")).unwrap(),
        s
    );
    // Engine ≡ simulator: replaying each cell's trace through `harness simulate` gives its hits.
    let trace = out.join("trace.parquet");
    for c in s
        .iter()
        // Profile policies pin from the exact reference pass: a lossy cell's own routing differs.
        .filter(|c| {
            c.miss == "load" || !(c.policy.starts_with("static") || c.policy == "adaptive-split")
        })
    {
        let cap = c.capacity.unwrap().to_string();
        let (code, stdout, err) = harness(&[
            "simulate",
            "--trace",
            trace.to_str().unwrap(),
            "--cell",
            &c.cell,
            "--policy",
            &c.policy,
            "--capacity",
            &cap,
            "--warmup",
            "1",
            "--miss",
            &c.miss,
            "--json",
        ]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(
            v[0]["hits"].as_u64().unwrap(),
            c.hits,
            "{}: simulator vs engine hits",
            c.cell
        );
        assert_eq!(
            (
                v[0]["miss"]["substituted"].as_u64().unwrap(),
                v[0]["miss"]["dropped"].as_u64().unwrap()
            ),
            (c.substituted, c.dropped),
            "{}: simulator vs engine miss actions",
            c.cell
        );
        assert_eq!(v[0]["accesses"].as_u64().unwrap(), c.accesses, "{}", c.cell);
    }
    // `static-N` pins the N most frequent experts of an oracle profile; it needs N + top-k slots.
    let d2 = tempfile::tempdir().unwrap();
    let err = moe_harness::run::run(
        &experiment::load(
            &write_experiment(d2.path(), "policy = \"static-2\"\ncapacity = 3"),
            true,
        )
        .unwrap(),
        &RunOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("static-2") && err.contains("at least 4"),
        "{err}"
    );
    let st = run_file(&write_experiment(
        d2.path(),
        "policy = [\"static-2\", \"lru\"]\ncapacity = 5",
    ));
    let c = &summaries(&st)[0];
    let (code, stdout, err) = harness(&[
        "simulate",
        "--trace",
        st.join("trace.parquet").to_str().unwrap(),
        "--cell",
        &c.cell,
        "--policy",
        "static-2",
        "--capacity",
        "5",
        "--warmup",
        "1",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        v[0]["hits"].as_u64().unwrap(),
        c.hits,
        "static-2: simulator vs engine"
    );
    // `harness plot` redraws from the Parquet files alone.
    std::fs::remove_file(out.join("hit_rate_vs_budget.png")).unwrap();
    let (code, _, err) = harness(&["plot", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.join("hit_rate_vs_budget.png").exists());
}

#[test]
fn runs_are_deterministic_and_cells_independent() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let d3 = tempfile::tempdir().unwrap();
    let sweep = "policy = [\"lru\", \"lcp-0.25-128\"]\ncapacity = [2, 3]";
    let a = run_file(&write_experiment(d1.path(), sweep));
    let b = run_file(&write_experiment(d2.path(), sweep));
    let strip = |dir: &Path| -> Vec<_> {
        moe_harness::trace::read(&dir.join("trace.parquet"))
            .unwrap()
            .into_iter()
            .map(|mut c| {
                c.rows.iter_mut().for_each(|r| r.load_ns = 0);
                c
            })
            .collect()
    };
    assert_eq!(
        strip(&a),
        strip(&b),
        "two runs of one experiment give one trace"
    );
    // A sweep cell equals a single run of that cell.
    let single = run_file(&write_experiment(
        d3.path(),
        "policy = \"lcp-0.25-128\"\ncapacity = 3",
    ));
    let one = &summaries(&single)[0];
    let from_sweep = summaries(&a)
        .into_iter()
        .find(|c| c.cell == one.cell)
        .unwrap();
    assert_eq!(
        (one.hits, one.accesses, one.bytes_read, one.belady_hit_rate),
        (
            from_sweep.hits,
            from_sweep.accesses,
            from_sweep.bytes_read,
            from_sweep.belady_hit_rate
        )
    );
}

#[test]
fn interrupted_run_resumes_and_leaves_nothing_marked_complete() {
    let d = tempfile::tempdir().unwrap();
    let f = write_experiment(d.path(), "policy = [\"lru\", \"lfu\", \"lcp-0.25-128\", \"lookahead\"]\ncapacity = [2, 3, 4, 5, 6, 8]");
    let mut child = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(["run", f.to_str().unwrap()])
        .spawn()
        .unwrap();
    let root = d.path().join("out/t");
    let t0 = std::time::Instant::now();
    let done_cell = loop {
        let found = std::fs::read_dir(&root).ok().and_then(|mut it| {
            it.find_map(|e| {
                let p = e.ok()?.path().join("cells");
                std::fs::read_dir(&p)
                    .ok()?
                    .flatten()
                    // A cell's summary marks it done; its `.env.json` is written just before.
                    .find(|c| {
                        let name = c.file_name().to_string_lossy().into_owned();
                        name.ends_with(".json") && !name.ends_with(".env.json")
                    })
                    .map(|c| c.path())
            })
        });
        if let Some(p) = found {
            break p;
        }
        assert!(t0.elapsed().as_secs() < 120, "no cell finished in time");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    child.kill().unwrap();
    let status = child.wait().unwrap();
    let complete: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    // 24 cells take far longer than the first one: the kill must land mid-run for this test to
    // mean anything.
    assert!(
        !status.success(),
        "the run finished before it could be interrupted"
    );
    {
        assert!(
            complete.is_empty(),
            "a killed run must not leave a results directory marked complete"
        );
        assert!(done_cell.exists());
        let (code, _, err) = harness(&["run", f.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("resuming"), "{err}");
    }
    let dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(dirs.len(), 1);
    assert_eq!(summaries(&dirs[0].path()).len(), 24);
}

#[test]
fn bad_experiments_fail_clearly() {
    let d = tempfile::tempdir().unwrap();
    let f = write_experiment(d.path(), "polcy = \"lru\"");
    let (code, _, err) = harness(&["run", f.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("polcy") && err.contains("exp.toml"), "{err}");
    let f = write_experiment(d.path(), "capacity = 1");
    let (code, _, err) = harness(&["run", f.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("capacity 1") && err.contains("top-k"), "{err}");
    assert!(!d
        .path()
        .join("out/t")
        .read_dir()
        .map(|mut r| r.any(|e| !e.unwrap().file_name().to_string_lossy().starts_with('.')))
        .unwrap_or(false));
    let f = write_experiment(d.path(), "policy = \"belady\"");
    let (code, _, err) = harness(&["run", f.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("belady"), "{err}");
    std::fs::write(
        d.path().join("m.toml"),
        "[model]\npath = \"nowhere\"\n[prompts]\ninline = [\"a\"]\n",
    )
    .unwrap();
    let (code, _, err) = harness(&["run", d.path().join("m.toml").to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("nowhere") && err.contains("config.json"),
        "{err}"
    );
    let f = write_experiment(d.path(), "policy = \"lru\"");
    let (code, _, err) = harness(&["run", f.to_str().unwrap(), "--out", "/proc/no-such-place"]);
    assert_ne!(code, 0);
    assert!(err.contains("/proc/no-such-place"), "{err}");
}

#[test]
fn simulate_rejects_bad_traces_and_names() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("t.parquet");
    std::fs::write(&t, b"not parquet").unwrap();
    let (code, _, err) = harness(&[
        "simulate",
        "--trace",
        t.to_str().unwrap(),
        "--capacity",
        "2",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("t.parquet"), "{err}");
    let out = run_file(&write_experiment(
        d.path(),
        "policy = \"lru\"\ncapacity = 2",
    ));
    let trace = out.join("trace.parquet");
    let tr = trace.to_str().unwrap();
    let (code, _, err) = harness(&[
        "simulate",
        "--trace",
        tr,
        "--capacity",
        "2",
        "--policy",
        "clock",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("clock") && err.contains("lru"), "{err}");
    let (code, _, err) = harness(&[
        "simulate",
        "--trace",
        tr,
        "--capacity",
        "1",
        "--policy",
        "lru",
    ]);
    assert_ne!(code, 0, "capacity below top-k must fail: {err}");
    // Ids out of range for a model with fewer experts.
    let small =
        crate::common::edited_fixture("qwen3_moe-f32", |v| v["num_experts"] = serde_json::json!(4));
    let (code, _, err) = harness(&[
        "simulate",
        "--trace",
        tr,
        "--capacity",
        "2",
        "--model",
        small.path().to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("out of range") && err.contains("4 routed experts"),
        "{err}"
    );
    // A layer that is not a MoE layer of the model.
    let shallow = crate::common::edited_fixture("glm4_moe-mlx4", |v| {
        v["first_k_dense_replace"] = serde_json::json!(2)
    });
    let (code, _, err) = harness(&[
        "simulate",
        "--trace",
        tr,
        "--capacity",
        "2",
        "--model",
        shallow.path().to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("layer 1 is not a MoE layer"), "{err}");
}

/// An experiment with `[model] replay_on` and `[storage]`: the replayed cells measure speed on
/// the synth checkpoint (written once, then reused) and say so; the others on the model itself;
/// every cell carries its references (read rate, resident speed, storage bound).
#[test]
fn replay_on_measures_speed_at_other_sizes_and_says_what_produced_it() {
    let d = tempfile::tempdir().unwrap();
    let cfg = crate::common::fixture("glm4_moe-mlx4").join("config.json");
    let extra = format!(
        "replay_on = {{ config = \"{}\", layers = 3, layout = \"mlx8\", prompts = 2, policies = [\"lru\"] }}",
        cfg.display()
    );
    let f = write_experiment(d.path(), "policy = [\"lru\", \"lfu\"]\ncapacity = [2, 4]");
    let text = std::fs::read_to_string(&f)
        .unwrap()
        .replace("[cache]", &format!("{extra}\n[cache]"))
        .replace("max_new_tokens = 6", "max_new_tokens = 6\nrepeats = 2")
        + "[storage]\nio = \"cold\"\n";
    std::fs::write(&f, text).unwrap();
    let out = run_file(&f);
    let s = summaries(&out);
    assert_eq!(s.len(), 4);
    for c in &s {
        assert_eq!(c.repeats, 2, "{}", c.cell);
        assert!(c.decode_tps_min <= c.decode_tps && c.decode_tps <= c.decode_tps_max);
        assert!(c.storage_read_gbps > 0.0 && c.resident_decode_tps > 0.0);
        assert!(c.storage_bound_tps > 0.0 && c.storage_bound_fraction > 0.0);
        if c.policy == "lru" {
            assert!(
                c.io == "cold" || c.io_note.is_some(),
                "{}: io {} without a note",
                c.cell,
                c.io
            );
            assert!(
                c.speed_model.contains("random weights"),
                "{}",
                c.speed_model
            );
            assert!(c.routing.contains("replayed"), "{}", c.routing);
            assert!(c.bytes_read > 0);
        } else {
            assert!(c.speed_model.contains("glm4_moe-mlx4"), "{}", c.speed_model);
            assert_eq!(
                c.io, "page-cache",
                "the routing model reads through the page cache"
            );
            assert!(!c.routing.contains("replayed"));
        }
    }
    // Replay does not change the routing: the same hits as a run without it.
    let plain = run_file(&write_experiment(
        &d.path().join("plain").tap_mkdir(),
        "policy = [\"lru\", \"lfu\"]\ncapacity = [2, 4]",
    ));
    for (a, b) in s.iter().zip(summaries(&plain)) {
        assert_eq!(
            (a.cell.as_str(), a.hits, a.accesses),
            (b.cell.as_str(), b.hits, b.accesses)
        );
    }
    assert!(out.join("decode_tps_vs_budget.png").exists());
    assert!(out.join("decode_tps_vs_budget_2.png").exists());
    let synth = d.path().join("out/.synth");
    assert_eq!(
        std::fs::read_dir(&synth).unwrap().count(),
        1,
        "one cached checkpoint"
    );
    let env: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("env.json")).unwrap()).unwrap();
    assert!(
        env["speed_on_replay"]["storage_read_gbps"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{env}"
    );
}

trait TapMkdir {
    fn tap_mkdir(self) -> PathBuf;
}
impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> PathBuf {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn bad_storage_and_replay_settings_fail_clearly() {
    let d = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        ("[storage]\ndevice = \"floppy\"\n", "pcie4-nvme"),
        ("[storage]\ndevice = { read_gbps = 0.0 }\n", "read_gbps"),
        ("[storage]\nio = \"sometimes\"\n", "io = \"sometimes\""),
        (
            "[storage]\nstaging = \"registred\"\n",
            "staging = \"registred\"",
        ),
        (
            "[storage]\nmemory_limit = \"1KB\"\n",
            "below the dense weights",
        ),
    ];
    for (extra, words) in cases {
        let f = write_experiment(d.path(), "policy = \"lru\"\ncapacity = 2");
        let text = std::fs::read_to_string(&f).unwrap() + extra;
        std::fs::write(&f, text).unwrap();
        let (code, _, err) = harness(&["run", f.to_str().unwrap()]);
        assert_ne!(code, 0, "{extra}");
        assert!(
            err.contains(words) && err.contains("exp.toml"),
            "{extra}: {err}"
        );
    }
    // Registered shard mappings asked for on the CPU backend: refused, nothing written.
    let f = write_experiment(d.path(), "policy = \"lru\"\ncapacity = 2");
    let text = std::fs::read_to_string(&f).unwrap() + "[storage]\nstaging = \"registered\"\n";
    std::fs::write(&f, text).unwrap();
    let (code, _, err) = harness(&["run", f.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("staging `registered`") && err.contains("cuda"),
        "{err}"
    );
    // A replay checkpoint of another shape (8 → 16 experts) names both.
    let other = d.path().join("other.json");
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(crate::common::fixture("glm4_moe-mlx4").join("config.json"))
            .unwrap(),
    )
    .unwrap();
    cfg["n_routed_experts"] = serde_json::json!(16);
    std::fs::write(&other, cfg.to_string()).unwrap();
    let f = write_experiment(d.path(), "policy = \"lru\"\ncapacity = 2");
    let text = std::fs::read_to_string(&f).unwrap().replace(
        "[cache]",
        &format!(
            "replay_on = {{ config = \"{}\", layers = 3 }}\n[cache]",
            other.display()
        ),
    );
    std::fs::write(&f, text).unwrap();
    let (code, _, err) = harness(&["run", f.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("16 experts") && err.contains("8 experts") && err.contains("replay_on"),
        "{err}"
    );
}
