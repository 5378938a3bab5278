//! Qwen3-Next / Qwen3-Coder-Next (`qwen3_next`): Qwen3-MoE's experts and router (softmax top-k,
//! `norm_topk_prob`) with a sigmoid-gated shared expert, and hybrid attention: gated DeltaNet
//! linear attention ([`super::deltanet`]) in most layers and gated full attention (output gate
//! from a doubled `q_proj`, zero-centred q/k norms, partial RoPE) every `full_attention_interval`
//! layers, or as `layer_types` lists them. Every RMSNorm but DeltaNet's gated one is
//! zero-centred (scale `1 + weight`). Mirrors HF transformers
//! `models/qwen3_next/{configuration,modeling}_qwen3_next.py`.

use std::path::Path;

use serde::Deserialize;

use crate::config::{
    parse_family, DeltaNetSpec, Family, HybridSpec, LayerKind, LinearKind, ModelSpec,
};
use crate::error::{Error, Result};

/// HF `Qwen3NextConfig`: Qwen3-MoE's fields plus the shared expert and the hybrid attention.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// The fields it shares with Qwen3-MoE.
    #[serde(flatten)]
    pub base: super::qwen3_moe::Config,
    /// Intermediate size of the (sigmoid-gated) shared expert.
    #[serde(default)]
    pub shared_expert_intermediate_size: usize,
    /// A full-attention layer every this many layers; the others are gated DeltaNet (used when
    /// `layer_types` is absent).
    #[serde(default = "four")]
    pub full_attention_interval: usize,
    /// `linear_attention` or `full_attention` per decoder layer.
    pub layer_types: Option<Vec<String>>,
    /// DeltaNet query/key heads.
    #[serde(default = "sixteen")]
    pub linear_num_key_heads: usize,
    /// DeltaNet value heads.
    #[serde(default = "thirty_two")]
    pub linear_num_value_heads: usize,
    /// DeltaNet query/key head dimension.
    #[serde(default = "one_twenty_eight")]
    pub linear_key_head_dim: usize,
    /// DeltaNet value head dimension.
    #[serde(default = "one_twenty_eight")]
    pub linear_value_head_dim: usize,
    /// DeltaNet convolution width.
    #[serde(default = "four")]
    pub linear_conv_kernel_dim: usize,
}

fn four() -> usize {
    4
}
fn sixteen() -> usize {
    16
}
fn thirty_two() -> usize {
    32
}
fn one_twenty_eight() -> usize {
    128
}

impl Config {
    /// Parses the HF config JSON.
    pub fn parse(file: &Path, value: &serde_json::Value) -> Result<Self> {
        parse_family(file, value)
    }

    /// Resolves into the engine's [`ModelSpec`].
    pub fn spec(&self, file: &Path) -> Result<ModelSpec> {
        let mut spec = self.base.spec(file)?;
        let n = self.base.num_hidden_layers;
        let layer_types = match &self.layer_types {
            Some(types) => LayerKind::parse_list(file, types, n)?,
            None => {
                if self.full_attention_interval == 0 {
                    return Err(Error::config(
                        file,
                        "full_attention_interval",
                        "must be positive",
                    ));
                }
                (0..n)
                    .map(|i| {
                        if (i + 1) % self.full_attention_interval == 0 {
                            LayerKind::FullAttention
                        } else {
                            LayerKind::LinearAttention
                        }
                    })
                    .collect()
            }
        };
        let delta = DeltaNetSpec {
            num_k_heads: self.linear_num_key_heads,
            num_v_heads: self.linear_num_value_heads,
            k_head_dim: self.linear_key_head_dim,
            v_head_dim: self.linear_value_head_dim,
            conv_kernel: self.linear_conv_kernel_dim,
        };
        delta.check(file)?;
        let (_, partial) = self.base.rope.resolve(file, 10_000.0, 0.25)?;
        let hd = spec.attention.head_dim;
        spec.attention.rotary_dim = (hd as f64 * partial) as usize;
        spec.model_type = "qwen3_next".into();
        spec.family = Family::Qwen3Next;
        spec.moe.shared_intermediate = (self.shared_expert_intermediate_size > 0)
            .then_some(self.shared_expert_intermediate_size);
        spec.keys.shared = Some("shared_expert");
        spec.hybrid = Some(HybridSpec {
            layer_types,
            linear: LinearKind::GatedDeltaNet,
            delta,
        });
        Ok(spec)
    }
}
