//! The literature's policies and miss modes in the live engine: every miss mode's actions are
//! the ones the simulator counts on the engine's own trace (same driver, same counts), `low-bit`
//! reads the second checkpoint, `substitute` runs resident experts, and every bad configuration is
//! refused with the key or file named.

use std::path::{Path, PathBuf};

use candle_core::Device;
use moe_harness::engine::{Engine, EngineConfig, MissMode, Sampler};
use moe_harness::experts::budget::Budget;
use moe_harness::experts::policies::PolicySpec;
use moe_harness::simulate::{simulate, Simulation};

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/glm4-moe-tiny")
        .join(name)
}

fn config(policy: &str, miss: MissMode) -> EngineConfig {
    EngineConfig {
        budget: Budget::SlotsPerLayer(8),
        policy: PolicySpec::parse(policy).unwrap(),
        miss,
        record_trace: true,
        low_bit: Some(shipped("mlx-2bit")),
        ..Default::default()
    }
}

const PROMPTS: [&[u32]; 3] = [&[12, 400, 77, 9, 1034], &[5, 6, 7, 8], &[300, 301, 2000]];

#[test]
fn every_miss_mode_counts_what_the_simulator_counts() {
    let model = shipped("mlx-4bit");
    let mut exact_logits = Vec::new();
    for (policy, miss) in [
        ("lru", MissMode::Load),
        ("lru", MissMode::Skip),
        ("lru", MissMode::Substitute),
        ("mrs", MissMode::Substitute),
        ("eam-2", MissMode::LowBit),
        ("lfru", MissMode::LowBit),
        ("layer-aware", MissMode::Skip),
    ] {
        let mut e = Engine::open(&model, Device::Cpu, config(policy, miss)).unwrap();
        let mut logits = Vec::new();
        for (p, ids) in PROMPTS.iter().enumerate() {
            e.set_prompt(p as u32);
            let g = e
                .generate_with(ids, 10, &mut Sampler::Greedy, &[], true)
                .unwrap();
            logits.push(g.step_logits);
        }
        let rows = e.take_trace();
        let stats = e.stats();
        let moe_layers: Vec<u32> = e.spec().moe.moe_layers.iter().map(|&l| l as u32).collect();
        let mut sim = Simulation::new(
            PolicySpec::parse(policy).unwrap(),
            Budget::SlotsPerLayer(8),
            &moe_layers,
        );
        sim.miss = miss;
        let r = simulate(&rows, &sim, |k| e.store.expert_bytes(k)).unwrap();
        let name = format!("{policy}/{miss}");
        assert_eq!(r.hits, stats.cache.hits, "{name}: hits");
        assert_eq!(r.misses, stats.cache.misses, "{name}: misses");
        assert_eq!(r.miss, stats.cache.miss, "{name}: miss actions");
        assert_eq!(
            r.prefetch.issued, stats.cache.prefetch.issued,
            "{name}: prefetches"
        );
        let m = stats.cache.miss;
        assert!(
            stats.cache.misses > 0,
            "{name}: no misses, the test proves nothing"
        );
        match miss {
            MissMode::Load => assert_eq!(m, Default::default(), "{name}"),
            MissMode::Skip => assert_eq!(m.dropped, stats.cache.misses, "{name}"),
            MissMode::Substitute => {
                assert_eq!(m.substituted + m.dropped, stats.cache.misses, "{name}");
                assert!(m.substituted > m.dropped, "{name}: {m:?}");
            }
            MissMode::LowBit => {
                assert_eq!(m.low_bit, stats.cache.misses, "{name}");
                assert!(
                    stats.low_bit_bytes > 0,
                    "{name}: the 2-bit copy was never read"
                );
            }
            MissMode::CpuCompute => unreachable!(),
        }
        if policy.starts_with("eam") {
            assert!(
                stats.cache.prefetch.issued > 0,
                "{name}: eam never prefetched"
            );
        }
        if miss == MissMode::Load {
            exact_logits = logits;
        } else {
            // A lossy miss changes what the token computes.
            assert_ne!(logits[0][0], exact_logits[0][0], "{name}: logits unchanged");
        }
    }
}

#[test]
fn bad_literature_configurations_are_refused() {
    let model = shipped("mlx-4bit");
    let err = |cfg: EngineConfig| {
        Engine::open(&model, Device::Cpu, cfg)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    // low-bit without a second checkpoint.
    let e = err(EngineConfig {
        low_bit: None,
        ..config("lru", MissMode::LowBit)
    });
    assert!(e.contains("low-bit") && e.contains("low_bit"), "{e}");
    // A second checkpoint of another model: named, with the field that differs.
    let other = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen3_moe-mlx4");
    let e = err(EngineConfig {
        low_bit: Some(other.clone()),
        ..config("lru", MissMode::LowBit)
    });
    assert!(
        e.contains(&other.join("config.json").display().to_string()) && e.contains("hidden_size"),
        "{e}"
    );
    // cpu-compute on the CPU.
    let e = err(config("lru", MissMode::CpuCompute));
    assert!(e.contains("cpu-compute") && e.contains("cuda"), "{e}");
    // adaptive-split without a profile.
    let e = err(config("adaptive-split", MissMode::Load));
    assert!(e.contains("adaptive-split") && e.contains("profile"), "{e}");
    // eam-0 and friends never parse.
    for bad in [
        "eam-0",
        "eam",
        "eam--1",
        "lfru-1.5",
        "mrs-0",
        "layer-aware--2",
    ] {
        assert!(PolicySpec::parse(bad).is_err(), "{bad}");
    }
    let e = PolicySpec::parse("eam-0").unwrap_err().to_string();
    assert!(e.contains("eam-0") && e.contains("at least 1"), "{e}");
}

#[test]
fn experiment_files_name_the_missing_key() {
    let d = tempfile::tempdir().unwrap();
    let model = shipped("mlx-4bit");
    let write = |cache: &str, backend: &str| {
        let body = format!(
            "name = \"t\"\n[model]\npath = \"{}\"\nbackend = \"{backend}\"\n[cache]\n{cache}\n[prompts]\ninline = [\"def f(x):\", \"import os\"]\nwarmup = 1\n",
            model.display()
        );
        let p = d.path().join("exp.toml");
        std::fs::write(&p, body).unwrap();
        moe_harness::experiment::load(&p, true)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let e = write("policy = \"lru\"\ncapacity = 8\nmiss = \"low-bit\"", "cpu");
    assert!(e.contains("cache.low_bit"), "{e}");
    let e = write(
        "policy = \"lru\"\ncapacity = 8\nmiss = \"low-bit\"\nlow_bit = \"nowhere\"",
        "cpu",
    );
    assert!(
        e.contains("cache.low_bit") && e.contains("config.json"),
        "{e}"
    );
    let e = write(
        "policy = \"lru\"\ncapacity = 8\nmiss = [\"load\", \"cpu-compute\"]",
        "cpu",
    );
    assert!(e.contains("cache.miss") && e.contains("cuda"), "{e}");
    let e = write("policy = \"eam-0\"\ncapacity = 8", "cpu");
    assert!(e.contains("eam-0"), "{e}");
}

#[test]
fn byte_budgets_and_profiles_replay_alike() {
    // A global byte budget of 1/8 of the expert bytes (where layer-aware and cross-layer
    // victims matter), and adaptive-split from a profile, per-layer bytes.
    let model = shipped("mlx-4bit");
    let reference = {
        let mut e = Engine::open(&model, Device::Cpu, config("lru", MissMode::Load)).unwrap();
        e.reconfigure(EngineConfig {
            budget: Budget::Unlimited,
            ..config("lru", MissMode::Load)
        })
        .unwrap();
        for (p, ids) in PROMPTS.iter().enumerate() {
            e.set_prompt(p as u32);
            e.generate(ids, 10, &mut Sampler::Greedy, &[]).unwrap();
        }
        moe_harness::simulate::profile_from_rows(&e.take_trace())
    };
    let probe = Engine::open(&model, Device::Cpu, config("lru", MissMode::Load)).unwrap();
    let total = probe.total_expert_bytes();
    let layers = probe.spec().num_moe_layers() as u64;
    for (policy, miss, budget) in [
        (
            "layer-aware",
            MissMode::Substitute,
            Budget::BytesGlobal(total / 8),
        ),
        ("lfru", MissMode::LowBit, Budget::BytesGlobal(total / 8)),
        (
            "eam-3",
            MissMode::Skip,
            Budget::BytesPerLayer(total / layers / 6),
        ),
        (
            "adaptive-split",
            MissMode::Load,
            Budget::BytesGlobal(total / 6),
        ),
        (
            "adaptive-split",
            MissMode::Substitute,
            Budget::BytesPerLayer(total / layers / 6),
        ),
    ] {
        let cfg = EngineConfig {
            budget,
            ..config(policy, miss)
        };
        let mut e = Engine::open(&model, Device::Cpu, config("lru", MissMode::Load)).unwrap();
        e.reconfigure_with(cfg, Some(reference.clone())).unwrap();
        for (p, ids) in PROMPTS.iter().enumerate() {
            e.set_prompt(p as u32);
            e.generate(ids, 10, &mut Sampler::Greedy, &[]).unwrap();
        }
        let rows = e.take_trace();
        let stats = e.stats();
        let moe_layers: Vec<u32> = e.spec().moe.moe_layers.iter().map(|&l| l as u32).collect();
        let mut sim = Simulation::new(PolicySpec::parse(policy).unwrap(), budget, &moe_layers);
        sim.miss = miss;
        sim.profile = Some(reference.clone());
        sim.working_set = e.spec().moe.top_k;
        let r = simulate(&rows, &sim, |k| e.store.expert_bytes(k)).unwrap();
        let name = format!("{policy}/{miss}/{budget}");
        assert!(
            stats.cache.misses > 0 && stats.cache.evictions > 0,
            "{name}"
        );
        assert_eq!(
            (r.hits, r.misses, r.miss, r.evictions),
            (
                stats.cache.hits,
                stats.cache.misses,
                stats.cache.miss,
                stats.cache.evictions
            ),
            "{name}"
        );
        assert!(
            r.peak_resident_bytes
                <= budget.bytes().unwrap() * if budget.per_layer() { layers } else { 1 },
            "{name}"
        );
    }
}

#[test]
fn the_literature_experiments_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exp =
        moe_harness::experiment::load(&root.join("experiments/literature.toml"), true).unwrap();
    // 11 policies × 3 budgets × 4 miss modes.
    assert_eq!(exp.cells.len(), 132);
    assert!(exp.low_bit.as_ref().unwrap().join("config.json").is_file());
    match moe_harness::experiment::load(&root.join("experiments/literature-cuda.toml"), true) {
        Ok(e) => assert!(e.cells.iter().any(|c| c.miss == MissMode::CpuCompute)),
        Err(e) => assert!(e.to_string().contains("model.backend"), "{e}"),
    }
}

#[test]
fn a_low_bit_cell_counts_its_reads_at_the_copy_s_size() {
    let d = tempfile::tempdir().unwrap();
    let body = format!(
        "name = \"lb\"\n[model]\npath = \"{}\"\n[cache]\npolicy = \"lru\"\ncapacity = 8\nmiss = \"low-bit\"\nlow_bit = \"{}\"\n[prompts]\ninline = [\"def f(x):\", \"import os\", \"class A:\"]\nwarmup = 1\n[generation]\nmax_new_tokens = 6\n[output]\ndir = \"out\"\nplots = false\n",
        shipped("mlx-4bit").display(),
        shipped("mlx-2bit").display()
    );
    let f = d.path().join("exp.toml");
    std::fs::write(&f, body).unwrap();
    let exp = moe_harness::experiment::load(&f, true).unwrap();
    let out = moe_harness::run::run(&exp, &moe_harness::run::RunOptions::default()).unwrap();
    let s: Vec<moe_harness::report::CellSummary> =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let c = &s[0];
    assert_eq!(c.low_bit_loads, c.accesses - c.hits, "{c:?}");
    assert!(c.low_bit_loads > 0 && c.kl_mean.is_some(), "{c:?}");
    // Every read is one 2-bit expert: smaller than the 4-bit one the budget counts.
    let per = c.low_bit_bytes as f64 / c.low_bit_loads as f64;
    assert!(
        per > 0.0 && per < c.expert_bytes as f64,
        "{per} vs {}",
        c.expert_bytes
    );
}
