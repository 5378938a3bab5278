//! `harness bench` on the shipped model (CPU): the sweep's bookkeeping must agree with itself.

use std::path::Path;

use candle_core::Device;
use moe_harness::bench::{bench, BenchOptions};
use moe_harness::experts::policies::PolicySpec;

/// Small sweep options on the CPU (other tests override what they need).
pub(crate) fn opts() -> BenchOptions {
    BenchOptions {
        policies: vec![PolicySpec::Lru, PolicySpec::parse("lookahead").unwrap()],
        capacities: vec![4, 8],
        prompts: 2,
        prompt_len: 8,
        new_tokens: 8,
        load_threads: Some(2),
        seed: 3,
        resident: true,
        staging: Default::default(),
        read_threads: None,
        gpu_experts: Default::default(),
        gpu_attention: Default::default(),
        gpu_routing: Default::default(),
        gpu_graph: Default::default(),
        gpu_dense: Default::default(),
        dense: Default::default(),
        io: Default::default(),
        storage: None,
        threads: None,
        kernels: Default::default(),
        replay: None,
        miss: Default::default(),
        profile: false,
    }
}

#[test]
fn profiled_pass_times_every_part_of_decode_and_prefill() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/glm4-moe-tiny/mlx-4bit");
    let o = BenchOptions {
        capacities: vec![4],
        policies: vec![PolicySpec::Lru],
        profile: true,
        ..opts()
    };
    let r = bench(&model, Device::Cpu, &o, |_| {}).unwrap();
    let profiles = r.rows.iter().flat_map(|row| {
        let decode = row.decode_ms_by_part.as_ref().expect("profiled");
        let prefill = row.prefill_ms_by_part.as_ref().expect("profiled");
        [(row, decode), (row, prefill)]
    });
    for (row, p) in profiles {
        for part in moe_harness::models::profile::PARTS {
            // Only steps routed on a GPU wait for their routes.
            if part == "wait" {
                assert_eq!(p[part], 0.0, "{}: {p:?}", row.cell);
                continue;
            }
            assert!(p[part] > 0.0, "{}: {part} {p:?}", row.cell);
        }
        let parts = moe_harness::models::profile::PARTS;
        let sum: f64 = p
            .iter()
            .filter(|(k, _)| parts.contains(&k.as_str()))
            .map(|(_, v)| v)
            .sum();
        assert!((sum - p["total"]).abs() < 1e-9 * sum, "{p:?}");
        // Time in parallel regions is part of the time, and there is some exactly where a
        // region ran.
        assert!(p["parallel"] <= p["total"], "{p:?}");
        assert_eq!(p["regions"] > 0.0, p["parallel"] > 0.0, "{p:?}");
    }
    for row in &r.rows {
        for (all, par) in [
            (&row.decode_ms_by_part, &row.decode_parallel_ms_by_part),
            (&row.prefill_ms_by_part, &row.prefill_parallel_ms_by_part),
        ] {
            let (all, par) = (all.as_ref().unwrap(), par.as_ref().expect("profiled"));
            for part in moe_harness::models::profile::PARTS {
                assert!(
                    par[part] >= 0.0 && par[part] <= all[part],
                    "{part}: {par:?} {all:?}"
                );
            }
        }
    }
    // Without --profile nothing is timed, and the model splits prefill from decode calls.
    let r = bench(&model, Device::Cpu, &opts(), |_| {}).unwrap();
    assert!(r
        .rows
        .iter()
        .all(|row| row.decode_ms_by_part.is_none() && row.prefill_ms_by_part.is_none()));
    let mut e = moe_harness::engine::Engine::open(&model, Device::Cpu, Default::default()).unwrap();
    e.model.set_profiling(true);
    e.generate(
        &[1, 2, 3, 4, 5],
        4,
        &mut moe_harness::engine::Sampler::Greedy,
        &[],
    )
    .unwrap();
    let p = e.model.profile();
    assert_eq!((p.prefill.calls, p.prefill.tokens), (1, 5));
    assert_eq!((p.decode.calls, p.decode.tokens), (3, 3));
}

#[test]
fn bench_sweep_accounts_bytes_and_hits() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/glm4-moe-tiny/mlx-4bit");
    let r = bench(&model, Device::Cpu, &opts(), |_| {}).unwrap();
    assert_eq!(r.rows.len(), 1 + 2 * 2);
    let res = &r.rows[0];
    assert_eq!(res.cell, "resident");
    assert_eq!(
        res.hit_rate, 1.0,
        "the resident pass re-runs the warm-up prompts"
    );
    assert_eq!(res.bytes_per_token, 0.0);
    assert_eq!(r.experts_per_token, 4 * 5);
    for row in &r.rows {
        assert!(
            row.prefill_tps.is_finite() && row.prefill_tps > 0.0,
            "{}: prefill {}",
            row.cell,
            row.prefill_tps
        );
    }
    for row in &r.rows[1..] {
        assert_eq!(row.decode_tokens, 2 * 7);
        assert!(
            row.hit_rate < 1.0,
            "{}: a 4-8 slot cache must miss",
            row.cell
        );
        let demand = (1.0 - row.hit_rate) * r.experts_per_token as f64 * r.expert_bytes as f64;
        let prefetch = row.prefetches_per_token * r.expert_bytes as f64;
        assert!(
            (row.bytes_per_token - demand - prefetch).abs() < 1e-6 * demand.max(1.0),
            "{}: bytes per token {} vs misses {demand} + prefetches {prefetch}",
            row.cell,
            row.bytes_per_token
        );
        if row.policy == "lru" {
            assert_eq!(row.prefetches_per_token, 0.0);
        } else {
            assert!(row.prefetches_per_token > 0.0, "{}", row.cell);
        }
        // No GPU: no link numbers.
        assert!(row.link_bound_tps.is_none() && row.h2d_rate.is_none());
    }
    // A bigger cache never hits less under LRU on the same tokens.
    assert!(r.rows[2].hit_rate >= r.rows[1].hit_rate);
}

#[test]
fn bench_rejects_empty_sweeps_and_bad_policies() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/glm4-moe-tiny/mlx-4bit");
    let mut o = opts();
    o.prompts = 0;
    assert!(bench(&model, Device::Cpu, &o, |_| {}).is_err());
    // Policy names are parsed at the command line, before anything opens.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_harness"))
        .args([
            "bench",
            "--model",
            model.to_str().unwrap(),
            "--policy",
            "lru,lru2",
        ])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("--policy") && e.contains("lru2"), "{e}");
    // A capacity below top-k is refused before any cell runs.
    let mut o = opts();
    o.capacities = vec![8, 2];
    let mut ran = 0;
    let e = bench(&model, Device::Cpu, &o, |_| ran += 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("capacity 2 is below top-k"), "{e}");
    assert_eq!(ran, 0, "cells ran before the bad capacity was refused");
}

/// A cell replaying a recorded trace under the recording's own policy and budget sees exactly
/// the recording's decode hit rate (same warm-up prompt, same accesses, same prefetches).
#[test]
fn bench_replay_reproduces_the_recorded_hit_rate() {
    use moe_harness::engine::{Engine, EngineConfig, Sampler};
    use moe_harness::experts::budget::Budget;
    use moe_harness::experts::Phase;
    use moe_harness::trace::CellTrace;
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/glm4-moe-tiny/mlx-4bit");
    let mut e = Engine::open(
        &model,
        Device::Cpu,
        EngineConfig {
            budget: Budget::SlotsPerLayer(6),
            policy: PolicySpec::parse("lookahead").unwrap(),
            record_trace: true,
            ..Default::default()
        },
    )
    .unwrap();
    for p in 0..3u32 {
        e.set_prompt(p);
        let ids: Vec<u32> = (0..9).map(|i| (i * 37 + p * 11) % 256).collect();
        e.generate(&ids, 6, &mut Sampler::Greedy, &[]).unwrap();
    }
    let recs = e.take_trace();
    let (mut hits, mut acc) = (0usize, 0usize);
    for r in recs
        .iter()
        .filter(|r| r.prompt > 0 && r.phase == Phase::Decode)
    {
        hits += r.hits.iter().filter(|&&h| h).count();
        acc += r.hits.len();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace.parquet");
    let cell = |rows: Vec<_>| {
        vec![CellTrace {
            cell: "rec".into(),
            rows,
        }]
    };
    moe_harness::trace::write(&path, &cell(recs.clone())).unwrap();

    let mut o = opts();
    o.policies = vec![PolicySpec::parse("lookahead").unwrap()];
    o.capacities = vec![6];
    o.resident = false;
    o.prompts = 5; // more than the trace holds: its 2 measured prompts are used
    o.replay = Some((path.clone(), None));
    let r = bench(&model, Device::Cpu, &o, |_| {}).unwrap();
    assert!(r.routing.contains("replay"), "{}", r.routing);
    let row = &r.rows[0];
    assert_eq!(row.decode_tokens, 2 * 5);
    assert_eq!(row.hit_rate, hits as f64 / acc as f64);

    // One prompt is not enough (nothing left to measure after the warm-up).
    let one = recs.into_iter().filter(|r| r.prompt == 0).collect();
    moe_harness::trace::write(&path, &cell(one)).unwrap();
    let m = bench(&model, Device::Cpu, &o, |_| {})
        .unwrap_err()
        .to_string();
    assert!(m.contains("warm-up"), "{m}");
}
