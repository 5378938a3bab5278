//! `harness bench` on the shipped model (CPU): the sweep's bookkeeping must agree with itself.

use std::path::Path;

use candle_core::Device;
use moe_harness::bench::{bench, BenchOptions};

fn opts() -> BenchOptions {
    BenchOptions {
        policies: vec!["lru".into(), "lookahead".into()],
        capacities: vec![4, 8],
        prompts: 2,
        prompt_len: 8,
        new_tokens: 8,
        load_threads: Some(2),
        seed: 3,
        resident: true,
        write_combined: true,
        read_threads: None,
        gpu_packed: true,
    }
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
    let mut o = opts();
    o.policies = vec!["lru2".into()];
    let e = bench(&model, Device::Cpu, &o, |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("--policy lru2"), "{e}");
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
