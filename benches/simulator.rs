//! Simulator throughput (accesses/s, single thread) of every policy on a large seeded synthetic
//! trace (Zipf-skewed with temporal locality). Set MOE_BENCH_ACCESSES to change its size
//! (default 50 M accesses under `cargo bench`: 48 layers × 512 experts × top-10, Qwen3-Coder-Next's shape).
use std::hint::black_box;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use moe_harness::experts::cache::Budget;
use moe_harness::experts::policies::PolicySpec;
use moe_harness::simulate::{simulate, synthetic_trace};

fn throughput(c: &mut Criterion) {
    // `cargo bench` passes --bench; under `cargo test` the bench only smoke-runs, on a small trace.
    let default = if std::env::args().any(|a| a == "--bench") { 50_000_000 } else { 200_000 };
    let accesses: usize = std::env::var("MOE_BENCH_ACCESSES").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (layers, experts, top_k) = (48u32, 512u32, 10usize);
    let tokens = accesses / (layers as usize * top_k);
    let moe_layers: Vec<u32> = (0..layers).collect();
    let rows = synthetic_trace(42, tokens, &moe_layers, experts, top_k, 1.1, 0.5);
    let n: u64 = rows.iter().map(|r| r.experts.len() as u64).sum();
    let mut g = c.benchmark_group("simulator");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n));
    for p in ["lru", "lfu", "lcp-0.25-128", "lfu-decay0.9", "lookahead", "static-16", "belady"] {
        let spec = PolicySpec::parse(p).unwrap();
        g.bench_with_input(BenchmarkId::new(format!("{} accesses", n), p), &spec, |b, spec| {
            b.iter(|| black_box(simulate(&rows, spec, Budget::SlotsPerLayer(64), |_| 1, &moe_layers, false).unwrap().hits))
        });
    }
    g.finish();
}

criterion_group!(benches, throughput);
