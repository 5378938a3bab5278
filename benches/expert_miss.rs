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

/// The miss path at GLM-4.7-Flash's expert size (5.31 MB, MLX 4-bit, a 2-layer `harness synth`
/// checkpoint in a temp dir beside the target directory) in each I/O mode, against the raw read
/// rate of the same experts measured in the same run and mode (`ExpertStore::read_rate`, the
/// storage bound's `B_read`). `cold` drops the page cache before every read.
fn miss_path_io_modes(c: &mut Criterion) {
    use moe_harness::engine::{Engine, EngineConfig};
    use moe_harness::weights::storage::IoMode;
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let model = dir.path().join("flash2");
    let cfg = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("experiments/configs/glm47-flash.json");
    moe_harness::synth::synth(
        &cfg,
        &model,
        moe_harness::synth::SynthLayout::Mlx(4),
        Some(2),
        0,
        2_000_000_000,
    )
    .unwrap();
    let mut g = c.benchmark_group("expert_miss_io");
    g.sample_size(10);
    for io in [IoMode::PageCache, IoMode::Direct, IoMode::Cold] {
        let e = Engine::open(
            &model,
            candle_core::Device::Cpu,
            EngineConfig {
                io,
                ..Default::default()
            },
        )
        .unwrap();
        let layer = e.spec().moe.moe_layers[0] as u32;
        let keys: Vec<ExpertKey> = (0..16).map(|expert| ExpertKey { layer, expert }).collect();
        let bytes = e.store.expert_bytes(keys[0]);
        g.throughput(Throughput::Bytes(bytes));
        let ck = e.store.checkpoint().clone();
        let name = format!("{io} ({})", e.io().effective);
        let mut i = 0;
        g.bench_function(BenchmarkId::new("load one expert", &name), |b| {
            b.iter(|| {
                if io == IoMode::Cold {
                    ck.drop_page_cache();
                }
                i = (i + 1) % keys.len();
                black_box(e.store.load(keys[i]).unwrap())
            })
        });
        g.bench_function(BenchmarkId::new("read bound (raw reads)", &name), |b| {
            b.iter(|| {
                if io == IoMode::Cold {
                    ck.drop_page_cache();
                }
                i = (i + 1) % keys.len();
                black_box(e.store.read_rate(&keys[i..=i], 1).unwrap())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, miss_path, miss_path_io_modes);
