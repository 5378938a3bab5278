//! Shared setup for the benchmarks.
use std::path::PathBuf;

use moe_harness::engine::{Engine, EngineConfig};
use moe_harness::experts::budget::Budget;
use moe_harness::experts::policies::PolicySpec;

/// The model shipped in the repo, in the given layout (`""` = HF bf16, `"mlx-4bit"`).
pub fn shipped(layout: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/glm4-moe-tiny")
        .join(layout)
}

/// An engine on `dir` with the given budget and policy.
pub fn engine(dir: &std::path::Path, budget: Budget, policy: &str, trace: bool) -> Engine {
    let cfg = EngineConfig {
        budget,
        policy: PolicySpec::parse(policy).unwrap(),
        record_trace: trace,
        ..Default::default()
    };
    Engine::open(dir, candle_core::Device::Cpu, cfg).unwrap()
}

/// The CPU benchmark shape (`experiments/configs/glm4-moe-cpu-bench.json`: glm4_moe, hidden
/// 1024, 8 layers, 64 experts of 512 top-4 + 1 shared, vocab 8192) synthesized as MLX 4-bit
/// into a tempdir: the tempdir (keep it alive) and the checkpoint's folder.
pub fn cpu_bench_checkpoint() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("m");
    let cfg = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("experiments/configs/glm4-moe-cpu-bench.json");
    moe_harness::synth::synth(
        &cfg,
        &dir,
        moe_harness::synth::SynthLayout::Mlx(4),
        None,
        0,
        1 << 30,
    )
    .unwrap();
    (d, dir)
}
