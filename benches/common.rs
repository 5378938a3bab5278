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
