//! Mixtral (`mixtral`): GQA attention with full RoPE and an optional sliding window; the router
//! takes the top-k logits and softmaxes over those k; experts are `block_sparse_moe.experts.{e}`
//! with `w1` (gate), `w3` (up), `w2` (down). Mirrors HF transformers
//! `models/mixtral/{configuration,modeling}_mixtral.py`.

use std::path::Path;

use serde::Deserialize;

use crate::config::{
    parse_family, AttentionSpec, Family, KeyScheme, ModelSpec, MoeSpec, RopeFields, RouterSpec,
};
use crate::error::Result;

/// HF `MixtralConfig`, field names unchanged.
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: Option<usize>,
    #[serde(default = "eps")]
    pub rms_norm_eps: f64,
    pub num_experts_per_tok: usize,
    pub num_local_experts: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub sliding_window: Option<usize>,
    #[serde(flatten)]
    pub rope: RopeFields,
    pub max_position_embeddings: Option<usize>,
}

fn eps() -> f64 {
    1e-5
}

impl Config {
    /// Parses the HF config JSON.
    pub fn parse(file: &Path, value: &serde_json::Value) -> Result<Self> {
        parse_family(file, value)
    }

    /// Resolves into the engine's [`ModelSpec`]. Every layer is a MoE layer; the experts'
    /// intermediate size is `intermediate_size`.
    pub fn spec(&self, file: &Path) -> Result<ModelSpec> {
        let (rope_theta, _) = self.rope.resolve(file, 1_000_000.0, 1.0)?;
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        Ok(ModelSpec {
            path: file.to_path_buf(),
            model_type: "mixtral".into(),
            family: Family::Mixtral,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            rms_norm_eps: self.rms_norm_eps,
            attention: AttentionSpec {
                num_heads: self.num_attention_heads,
                num_kv_heads: self.num_key_value_heads,
                head_dim,
                rotary_dim: head_dim,
                qk_norm: false,
                qkv_bias: false,
                o_bias: false,
                rope_theta,
                sliding_window: self.sliding_window,
            },
            dense_intermediate: self.intermediate_size,
            moe: MoeSpec {
                num_experts: self.num_local_experts,
                top_k: self.num_experts_per_tok,
                intermediate_size: self.intermediate_size,
                router: RouterSpec::TopKSoftmax,
                shared_intermediate: None,
                moe_layers: (0..self.num_hidden_layers).collect(),
            },
            tie_word_embeddings: self.tie_word_embeddings,
            keys: KeyScheme {
                mlp: "block_sparse_moe",
                stacked_mlp: "block_sparse_moe",
                expert_proj: ["w1", "w3", "w2"],
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
