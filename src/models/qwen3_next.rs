//! Qwen3-Next / Qwen3-Coder-Next (`qwen3_next`): configuration only. Its expert geometry (512
//! experts, top-10, a sigmoid-gated shared expert) is read so that `harness inspect` sizes the
//! model; the hybrid attention (gated DeltaNet linear attention with a full-attention layer every
//! `full_attention_interval`) is not implemented by the engine, which refuses the model with
//! that reason.

use std::path::Path;

use serde::Deserialize;

use crate::config::{parse_family, Family, ModelSpec};
use crate::error::Result;

/// HF `Qwen3NextConfig`: Qwen3-MoE's fields plus the shared expert and the hybrid attention.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// The fields it shares with Qwen3-MoE.
    #[serde(flatten)]
    pub base: super::qwen3_moe::Config,
    /// Intermediate size of the (sigmoid-gated) shared expert.
    #[serde(default)]
    pub shared_expert_intermediate_size: usize,
    /// A full-attention layer every this many layers; the others are gated DeltaNet.
    #[serde(default = "four")]
    pub full_attention_interval: usize,
}

fn four() -> usize {
    4
}

impl Config {
    /// Parses the HF config JSON.
    pub fn parse(file: &Path, value: &serde_json::Value) -> Result<Self> {
        parse_family(file, value)
    }

    /// Resolves into a [`ModelSpec`] marked unsupported by the engine.
    pub fn spec(&self, file: &Path) -> Result<ModelSpec> {
        let mut spec = self.base.spec(file)?;
        spec.model_type = "qwen3_next".into();
        spec.family = Family::Qwen3Next;
        spec.moe.shared_intermediate = (self.shared_expert_intermediate_size > 0)
            .then_some(self.shared_expert_intermediate_size);
        spec.keys.shared = Some("shared_expert");
        spec.unsupported = Some(format!(
            "qwen3_next uses hybrid attention (gated DeltaNet linear attention, full attention every {} layers), which this engine does not implement; `harness inspect` sizes it, `harness simulate` replays its traces",
            self.full_attention_interval
        ));
        Ok(spec)
    }
}
