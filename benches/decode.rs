//! Decode speed of the engine on the shipped model: unlimited budget (baseline) against the
//! smallest legal capacity (top-k slots per layer), and with trace recording on vs off (the
//! runner's logging overhead; target ≤ 2 %).
use std::hint::black_box;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use moe_harness::engine::{Engine, EngineConfig};
use moe_harness::experts::budget::Budget;
use moe_harness::models::KvCache;
use moe_harness::weights::kernels::Kernels;

use crate::common::{engine, shipped};

pub(crate) const STEPS: u32 = 16;
pub(crate) const PROMPT: [u32; 8] = [100, 200, 300, 400, 500, 600, 700, 800];

fn decode_steps(e: &mut Engine, kv: &mut KvCache) {
    let mut tok = 17;
    for s in 1..=STEPS {
        let (logits, _) = e.forward(&[tok], kv, s, true).unwrap();
        tok = moe_harness::models::layers::argmax(&logits[0]) as u32;
    }
    black_box(tok);
}

/// `iters` times: a prefill of `prompt` (not timed), then [`STEPS`] timed decode steps; the
/// trace, if recorded, is dropped after each.
pub(crate) fn timed_decode(e: &mut Engine, prompt: &[u32], iters: u64) -> std::time::Duration {
    let mut total = std::time::Duration::ZERO;
    for _ in 0..iters {
        let mut kv = KvCache::default();
        e.forward(prompt, &mut kv, 0, true).unwrap();
        let t = std::time::Instant::now();
        decode_steps(e, &mut kv);
        total += t.elapsed();
        let _ = e.take_trace();
    }
    total
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(STEPS as u64));
    g.sample_size(20);
    let dir = shipped("mlx-4bit");
    let top_k = moe_harness::models::load_spec(&dir).unwrap().moe.top_k;
    for (name, budget, trace) in [
        ("unlimited (baseline)", Budget::Unlimited, false),
        ("unlimited, trace on", Budget::Unlimited, true),
        ("smallest capacity", Budget::SlotsPerLayer(top_k), false),
    ] {
        let mut e = engine(&dir, budget, "lru", trace);
        g.bench_function(BenchmarkId::new("mlx4 16 tokens", name), |b| {
            b.iter_custom(|iters| timed_decode(&mut e, &PROMPT, iters))
        });
    }
    g.finish();
}

/// Decode cost of MLA vs GQA attention at equal hidden size (64): the DeepSeek-V3 fixture
/// (MLA, 4 heads, latent 64) against the Qwen3-MoE fixture (GQA, 4 heads / 2 KV heads), both
/// f32, 8 experts top-2, unlimited budget.
fn mla_vs_gqa(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    g.throughput(Throughput::Elements(STEPS as u64));
    g.sample_size(20);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    for (name, fixture) in [
        ("GQA qwen3_moe (baseline)", "qwen3_moe-f32"),
        ("MLA deepseek_v3", "deepseek_v3-f32"),
    ] {
        let mut e = engine(&root.join(fixture), Budget::Unlimited, "lru", false);
        g.bench_function(BenchmarkId::new("hidden 64, 16 tokens", name), |b| {
            b.iter_custom(|iters| timed_decode(&mut e, &[1, 2, 3, 4, 5, 6, 7, 8], iters))
        });
    }
    g.finish();
}

/// Decode cost of a linear-attention layer vs the full-attention layer of the same model, after a
/// 64-token prompt: Qwen3-Coder-Next's gated DeltaNet vs its gated GQA (hidden 2048; 16 q / 2 KV
/// heads of 256 vs 16 k / 32 v linear heads of 128), and Kimi-Linear's KDA vs its MLA without
/// RoPE (hidden 2304; 32 heads, latent 512 vs 32 KDA heads of 128). One-layer `harness synth`
/// checkpoints (MLX 4-bit, 16 small experts top-2, vocab 4096, random weights) differing only in
/// the layer's kind. Full attention's cost grows with the context, the linear state's does not.
fn deltanet_vs_gqa(c: &mut Criterion) {
    use moe_harness::synth::{synth, SynthLayout};
    let mut g = c.benchmark_group("hybrid attention");
    g.throughput(Throughput::Elements(STEPS as u64));
    g.sample_size(10);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(root.join("experiments/configs").join(f)).unwrap(),
        )
        .unwrap()
    };
    let prompt: Vec<u32> = (0..64).map(|i| 7 + 13 * i).collect();
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            "qwen3-coder-next.json",
            "hidden 2048 (Qwen3-Coder-Next), 16 tokens after 64",
            "gated full attention (baseline)",
            "gated DeltaNet",
        ),
        (
            "kimi-linear.json",
            "hidden 2304 (Kimi-Linear), 16 tokens after 64",
            "MLA without RoPE (baseline)",
            "KDA",
        ),
    ];
    for (file, id, full_name, linear_name) in cases {
        let base = read(file);
        for (name, kind) in [
            (full_name, "full_attention"),
            (linear_name, "linear_attention"),
        ] {
            let mut cfg = base.clone();
            cfg["num_hidden_layers"] = 1.into();
            cfg["layer_types"] = serde_json::json!([kind]);
            cfg["vocab_size"] = 4096.into();
            if cfg.get("linear_attn_config").is_some() {
                // Kimi-Linear: its 1-indexed lists must agree with layer_types; layer 0 is MoE.
                let (kda, full) = if kind == "linear_attention" {
                    (vec![1], vec![])
                } else {
                    (vec![], vec![1])
                };
                cfg["linear_attn_config"]["kda_layers"] = serde_json::json!(kda);
                cfg["linear_attn_config"]["full_attn_layers"] = serde_json::json!(full);
                cfg["first_k_dense_replace"] = 0.into();
                cfg["num_experts_per_token"] = 2.into();
            } else {
                cfg["num_experts_per_tok"] = 2.into();
            }
            cfg["num_experts"] = 16.into();
            let dir = tmp.path().join(format!("{file}-{kind}"));
            std::fs::create_dir_all(&dir).unwrap();
            let config = dir.join("config.json");
            std::fs::write(&config, cfg.to_string()).unwrap();
            synth(
                &config,
                &dir.join("ck"),
                SynthLayout::Mlx(4),
                None,
                0,
                2 << 30,
            )
            .unwrap();
            let mut e = engine(&dir.join("ck"), Budget::Unlimited, "lru", false);
            g.bench_function(BenchmarkId::new(id, name), |b| {
                b.iter_custom(|iters| timed_decode(&mut e, &prompt, iters))
            });
        }
    }
    g.finish();
}

/// Dense weights read in place from the memory map against copied into memory (the baseline):
/// the engine's load time and its decode speed, on the shipped model in both layouts (bf16 HF
/// and MLX 4-bit).
fn dense_in_place(c: &mut Criterion) {
    use moe_harness::engine::{DenseForm, EngineConfig};
    let mut g = c.benchmark_group("dense weights");
    g.sample_size(10);
    for layout in ["", "mlx-4bit"] {
        let dir = shipped(layout);
        let name = if layout.is_empty() { "bf16" } else { layout };
        for form in [DenseForm::Copied, DenseForm::Mapped] {
            let cfg = || EngineConfig {
                dense: form,
                ..Default::default()
            };
            g.bench_function(BenchmarkId::new(format!("{name} load"), form), |b| {
                b.iter(|| black_box(Engine::open(&dir, candle_core::Device::Cpu, cfg()).unwrap()))
            });
            let mut e = Engine::open(&dir, candle_core::Device::Cpu, cfg()).unwrap();
            g.bench_function(BenchmarkId::new(format!("{name} decode 16"), form), |b| {
                b.iter_custom(|iters| timed_decode(&mut e, &PROMPT, iters))
            });
        }
    }
    g.finish();
}

/// CPU decode over threads and kernel kinds on the CPU benchmark shape (glm4_moe, hidden 1024,
/// 8 layers, 64 experts of 512 top-4 + 1 shared, vocab 8192: `experiments/configs/
/// glm4-moe-cpu-bench.json`, MLX 4-bit, written into a tempdir), all experts resident: each
/// thread count's decode time. The 1 → 2 core speed-up is measured as one value, from paired
/// runs, by `cpu_scaling` (`scaling.rs`); the ratio of two rows here mixes in the drift between
/// runs seconds apart.
fn cpu_threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_threads");
    g.throughput(Throughput::Elements(STEPS as u64));
    g.sample_size(10);
    let (_d, dir) = crate::common::cpu_bench_checkpoint();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for kernels in [Kernels::Exact, Kernels::Int8x2, Kernels::Int8] {
        for threads in [1, 2.min(cores), cores]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
        {
            let mut e = Engine::open(
                &dir,
                candle_core::Device::Cpu,
                EngineConfig {
                    threads: Some(threads),
                    kernels,
                    ..Default::default()
                },
            )
            .unwrap();
            let name = format!("{kernels} {threads} threads");
            g.bench_function(
                BenchmarkId::new("glm4-moe-cpu-bench 16 tokens", name),
                |b| b.iter_custom(|iters| timed_decode(&mut e, &PROMPT, iters)),
            );
        }
    }
    g.finish();
}

criterion_group!(
    benches,
    decode,
    mla_vs_gqa,
    deltanet_vs_gqa,
    dense_in_place,
    cpu_threads
);
