//! Qwen3-Next / Qwen3-Coder-Next (`qwen3_next`): configuration only. Its expert geometry (512
//! experts, top-10, a sigmoid-gated shared expert) is read so that `harness inspect` sizes the
//! model; the hybrid attention (gated DeltaNet linear attention with a full-attention layer every
//! `full_attention_interval`) is not implemented by the engine, which refuses the model with
//! that reason.

use std::path::Path;

use serde::Deserialize;

use crate::config::{
    parse_family, AttentionSpec, Family, KeyScheme, ModelSpec, MoeSpec, RopeFields, RouterSpec,
};
use crate::error::{Error, Result};

/// HF `Qwen3NextConfig` fields used here, names unchanged.
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    #[serde(default)]
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: Option<usize>,
    #[serde(default = "eps")]
    pub rms_norm_eps: f64,
    pub moe_intermediate_size: usize,
    #[serde(default)]
    pub shared_expert_intermediate_size: usize,
    pub num_experts_per_tok: usize,
    pub num_experts: Option<usize>,
    pub num_local_experts: Option<usize>,
    #[serde(default = "one")]
    pub decoder_sparse_step: usize,
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "four")]
    pub full_attention_interval: usize,
    #[serde(flatten)]
    pub rope: RopeFields,
}

fn eps() -> f64 {
    1e-6
}
fn one() -> usize {
    1
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
        let num_experts = self
            .num_experts
            .or(self.num_local_experts)
            .ok_or_else(|| Error::config(file, "num_experts", "missing"))?;
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let step = self.decoder_sparse_step.max(1);
        Ok(ModelSpec {
            path: file.to_path_buf(),
            model_type: "qwen3_next".into(),
            family: Family::Qwen3Next,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            rms_norm_eps: self.rms_norm_eps,
            attention: AttentionSpec {
                num_heads: self.num_attention_heads,
                num_kv_heads: self.num_key_value_heads,
                head_dim,
                rotary_dim: head_dim,
                qk_norm: true,
                qkv_bias: false,
                o_bias: false,
                rope_theta: self.rope.rope_theta.unwrap_or(10_000.0),
                sliding_window: None,
            },
            dense_intermediate: self.intermediate_size,
            moe: MoeSpec {
                num_experts,
                top_k: self.num_experts_per_tok,
                intermediate_size: self.moe_intermediate_size,
                router: RouterSpec::SoftmaxTopK { norm_topk_prob: self.norm_topk_prob },
                shared_intermediate: (self.shared_expert_intermediate_size > 0).then_some(self.shared_expert_intermediate_size),
                moe_layers: (0..self.num_hidden_layers).filter(|i| !self.mlp_only_layers.contains(i) && (i + 1) % step == 0).collect(),
            },
            tie_word_embeddings: self.tie_word_embeddings,
            keys: KeyScheme { mlp: "mlp", expert_proj: ["gate_proj", "up_proj", "down_proj"], shared: Some("shared_expert") },
            quantization: None,
            mla: None,
            unsupported: Some(format!(
                "qwen3_next uses hybrid attention (gated DeltaNet linear attention, full attention every {} layers), which this engine does not implement; `harness inspect` sizes it, `harness simulate` replays its traces",
                self.full_attention_interval
            )),
        })
    }
}
