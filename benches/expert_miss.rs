//! The expert miss path: positioned read + dequantize + materialise of one expert, against a
//! plain memcpy of the same number of bytes (the ratio is the cost of the miss path per byte).
use std::hint::black_box;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use moe_harness::experts::budget::Budget;
use moe_harness::experts::ExpertKey;

use crate::common::{engine, shipped};

fn miss_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("expert_miss");
    for layout in ["mlx-4bit", ""] {
        let e = engine(&shipped(layout), Budget::Unlimited, "lru", false);
        let key = ExpertKey {
            layer: e.spec().moe.moe_layers[0] as u32,
            expert: 7,
        };
        let bytes = e.store.expert_bytes(key);
        let name = if layout.is_empty() { "bf16" } else { layout };
        g.throughput(Throughput::Bytes(bytes));
        g.bench_with_input(BenchmarkId::new("read+dequantize", name), &key, |b, &k| {
            b.iter(|| black_box(e.store.load(k).unwrap()))
        });
        let src = vec![7u8; bytes as usize];
        let mut dst = vec![0u8; bytes as usize];
        g.bench_with_input(
            BenchmarkId::new("memcpy (baseline)", name),
            &bytes,
            |b, _| {
                b.iter(|| {
                    dst.copy_from_slice(black_box(&src));
                    black_box(&dst);
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, miss_path);
