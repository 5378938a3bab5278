//! GLM-4.5 / 4.6 / 4.7 (`glm4_moe`): GQA attention with partial RoPE, optional q/k norm and q/k/v
//! bias; a sigmoid `noaux_tc` router with groups; one shared expert block; the first
//! `first_k_dense_replace` layers dense. Mirrors HF transformers
//! `models/glm4_moe/{configuration,modeling}_glm4_moe.py`.
//! The MTP layer `model.layers.{num_hidden_layers}` is never read.

use std::path::Path;

use serde::Deserialize;

use crate::config::{
    parse_family, AttentionSpec, Family, KeyScheme, ModelSpec, MoeSpec, RopeFields, RouterSpec,
};
use crate::error::{Error, Result};

/// HF `Glm4MoeConfig`, field names unchanged; defaults only where HF has them.
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
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub use_qk_norm: bool,
    pub moe_intermediate_size: usize,
    pub num_experts_per_tok: usize,
    #[serde(default = "one")]
    pub n_shared_experts: usize,
    pub n_routed_experts: Option<usize>,
    pub num_local_experts: Option<usize>,
    #[serde(default = "onef")]
    pub routed_scaling_factor: f64,
    #[serde(default = "one")]
    pub n_group: usize,
    #[serde(default = "one")]
    pub topk_group: usize,
    #[serde(default = "one")]
    pub first_k_dense_replace: usize,
    #[serde(default = "yes")]
    pub norm_topk_prob: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(flatten)]
    pub rope: RopeFields,
    pub max_position_embeddings: Option<usize>,
}

fn eps() -> f64 {
    1e-5
}
fn one() -> usize {
    1
}
fn onef() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

impl Config {
    /// Parses the HF config JSON.
    pub fn parse(file: &Path, value: &serde_json::Value) -> Result<Self> {
        parse_family(file, value)
    }

    /// Resolves into the engine's [`ModelSpec`].
    pub fn spec(&self, file: &Path) -> Result<ModelSpec> {
        let (rope_theta, partial) = self.rope.resolve(file, 10_000.0, 0.5)?;
        let num_experts = self
            .n_routed_experts
            .or(self.num_local_experts)
            .ok_or_else(|| {
                Error::config(
                    file,
                    "n_routed_experts",
                    "missing (neither `n_routed_experts` nor `num_local_experts` is set)",
                )
            })?;
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        Ok(ModelSpec {
            path: file.to_path_buf(),
            model_type: "glm4_moe".into(),
            family: Family::Glm4Moe,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            rms_norm_eps: self.rms_norm_eps,
            attention: AttentionSpec {
                num_heads: self.num_attention_heads,
                num_kv_heads: self.num_key_value_heads,
                head_dim,
                rotary_dim: (head_dim as f64 * partial) as usize,
                qk_norm: self.use_qk_norm,
                qkv_bias: self.attention_bias,
                o_bias: false,
                rope_theta,
                sliding_window: None,
            },
            dense_intermediate: self.intermediate_size,
            moe: MoeSpec {
                num_experts,
                top_k: self.num_experts_per_tok,
                intermediate_size: self.moe_intermediate_size,
                router: RouterSpec::SigmoidNoauxTc {
                    n_group: self.n_group,
                    topk_group: self.topk_group,
                    norm_topk_prob: self.norm_topk_prob,
                    routed_scaling_factor: self.routed_scaling_factor,
                },
                shared_intermediate: (self.n_shared_experts > 0)
                    .then_some(self.moe_intermediate_size * self.n_shared_experts),
                moe_layers: (self.first_k_dense_replace..self.num_hidden_layers).collect(),
            },
            tie_word_embeddings: self.tie_word_embeddings,
            keys: KeyScheme {
                mlp: "mlp",
                stacked_mlp: "mlp",
                expert_proj: ["gate_proj", "up_proj", "down_proj"],
                shared: Some("shared_experts"),
            },
            quantization: None,
            mla: None,
            unsupported: None,
            max_position_embeddings: self.max_position_embeddings,
            hybrid: None,
        })
    }
}
