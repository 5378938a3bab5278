//! Decode speed of the engine on the shipped model: unlimited budget (baseline) against the
//! smallest legal capacity (top-k slots per layer), and with trace recording on vs off (the
//! runner's logging overhead; target ≤ 2 %).
use std::hint::black_box;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use moe_harness::engine::Engine;
use moe_harness::experts::cache::Budget;
use moe_harness::models::KvCache;

use crate::common::{engine, shipped};

const STEPS: u32 = 16;
const PROMPT: [u32; 8] = [100, 200, 300, 400, 500, 600, 700, 800];

fn decode_steps(e: &mut Engine, kv: &mut KvCache) {
    let mut tok = 17;
    for s in 1..=STEPS {
        let (logits, _) = e.forward(&[tok], kv, s, true).unwrap();
        tok = moe_harness::models::layers::argmax(&logits[0]) as u32;
    }
    black_box(tok);
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(STEPS as u64));
    g.sample_size(20);
    let dir = shipped("mlx-4bit");
    let top_k = moe_harness::config::load(&dir).unwrap().moe.top_k;
    for (name, budget, trace) in [
        ("unlimited (baseline)", Budget::Unlimited, false),
        ("unlimited, trace on", Budget::Unlimited, true),
        ("smallest capacity", Budget::SlotsPerLayer(top_k), false),
    ] {
        let mut e = engine(&dir, budget, "lru", trace);
        g.bench_function(BenchmarkId::new("mlx4 16 tokens", name), |b| {
            // Prefill outside the timed part; only the decode steps are measured.
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                for _ in 0..iters {
                    let mut kv = KvCache::default();
                    e.forward(&PROMPT, &mut kv, 0, true).unwrap();
                    let t = std::time::Instant::now();
                    decode_steps(&mut e, &mut kv);
                    total += t.elapsed();
                    let _ = e.take_trace();
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decode);
