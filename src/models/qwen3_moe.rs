//! Qwen3-MoE (`qwen3_moe`): GQA attention with per-head q/k RMSNorm and full RoPE; a softmax
//! top-k router with optional renormalisation; no shared expert; dense layers chosen by
//! `mlp_only_layers` and `decoder_sparse_step`. Mirrors HF transformers
//! `models/qwen3_moe/{configuration,modeling}_qwen3_moe.py`.

use std::path::Path;

use serde::Deserialize;

use crate::config::{
    parse_family, AttentionSpec, Family, KeyScheme, ModelSpec, MoeSpec, RopeFields, RouterSpec,
};
use crate::error::{Error, Result};

/// HF `Qwen3MoeConfig`, field names unchanged (hub `num_experts` or transformers-5 `num_local_experts`).
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
    #[serde(default)]
    pub attention_bias: bool,
    pub moe_intermediate_size: usize,
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
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(flatten)]
    pub rope: RopeFields,
    pub max_position_embeddings: Option<usize>,
}

fn eps() -> f64 {
    1e-6
}
fn one() -> usize {
    1
}

impl Config {
    /// Parses the HF config JSON.
    pub fn parse(file: &Path, value: &serde_json::Value) -> Result<Self> {
        parse_family(file, value)
    }

    /// Resolves into the engine's [`ModelSpec`].
    pub fn spec(&self, file: &Path) -> Result<ModelSpec> {
        let (rope_theta, _) = self.rope.resolve(file, 10_000.0, 1.0)?;
        let num_experts = self.num_experts.or(self.num_local_experts).ok_or_else(|| {
            Error::config(
                file,
                "num_experts",
                "missing (neither `num_experts` nor `num_local_experts` is set)",
            )
        })?;
        if self.decoder_sparse_step == 0 {
            return Err(Error::config(
                file,
                "decoder_sparse_step",
                "must be positive",
            ));
        }
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let moe_layers = (0..self.num_hidden_layers)
            .filter(|i| {
                !self.mlp_only_layers.contains(i) && (i + 1) % self.decoder_sparse_step == 0
            })
            .collect();
        Ok(ModelSpec {
            path: file.to_path_buf(),
            model_type: "qwen3_moe".into(),
            family: Family::Qwen3Moe,
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
                qkv_bias: self.attention_bias,
                o_bias: self.attention_bias,
                rope_theta,
                sliding_window: if self.use_sliding_window {
                    self.sliding_window
                } else {
                    None
                },
            },
            dense_intermediate: self.intermediate_size,
            moe: MoeSpec {
                num_experts,
                top_k: self.num_experts_per_tok,
                intermediate_size: self.moe_intermediate_size,
                router: RouterSpec::SoftmaxTopK {
                    norm_topk_prob: self.norm_topk_prob,
                },
                shared_intermediate: None,
                moe_layers,
            },
            tie_word_embeddings: self.tie_word_embeddings,
            keys: KeyScheme {
                mlp: "mlp",
                stacked_mlp: "mlp",
                expert_proj: ["gate_proj", "up_proj", "down_proj"],
                shared: None,
            },
            quantization: None,
            mla: None,
            unsupported: None,
            max_position_embeddings: self.max_position_embeddings,
            hybrid: None,
        })
    }
}
