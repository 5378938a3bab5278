//! Kimi-Linear (`kimi_linear`): Kimi Delta Attention ([`super::kda`]) in most layers and MLA
//! without RoPE ([`super::mla`], `rope: false`) in the others, a DeepSeek-V3-style MoE (sigmoid
//! `noaux_tc` router, shared experts, leading dense layers) under `block_sparse_moe` with Mixtral's
//! `w1`/`w3`/`w2` expert names. Mirrors HF transformers
//! `models/kimi_linear/{configuration,modeling}_kimi_linear.py` and reads both spellings of its
//! config: the hub's (`linear_attn_config` with 1-indexed `kda_layers`/`full_attn_layers`,
//! `num_experts`, `num_experts_per_token`, …) and transformers' re-serialisation (which adds
//! `layer_types`, `mlp_layer_types`, `linear_head_dim`, …).

use std::path::Path;

use serde::Deserialize;

use crate::config::{
    explicit_null, parse_family, sparse_layers, AttentionSpec, DeltaNetSpec, Family, HybridSpec,
    KeyScheme, LayerKind, LinearKind, MlaSpec, ModelSpec, MoeSpec, RouterSpec,
};
use crate::error::{Error, Result};

/// The hub's `linear_attn_config` block.
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)]
pub struct LinearAttnConfig {
    pub head_dim: Option<usize>,
    pub num_heads: Option<usize>,
    pub short_conv_kernel_size: Option<usize>,
    /// 1-indexed.
    pub kda_layers: Option<Vec<usize>>,
    /// 1-indexed.
    pub full_attn_layers: Option<Vec<usize>>,
}

/// HF `KimiLinearConfig` fields in the hub spelling (transformers' aliases accepted); `None` = HF
/// default (Kimi-Linear-48B-A3B's values).
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)]
pub struct Config {
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub moe_intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    #[serde(alias = "n_shared_experts")]
    pub num_shared_experts: Option<usize>,
    #[serde(alias = "num_local_experts")]
    pub num_experts: Option<usize>,
    #[serde(alias = "num_experts_per_tok")]
    pub num_experts_per_token: Option<usize>,
    #[serde(alias = "n_group")]
    pub num_expert_group: Option<usize>,
    pub topk_group: Option<usize>,
    #[serde(alias = "norm_topk_prob")]
    pub moe_renormalize: Option<bool>,
    pub routed_scaling_factor: Option<f64>,
    pub moe_router_activation_func: Option<String>,
    pub moe_layer_freq: Option<usize>,
    pub first_k_dense_replace: Option<usize>,
    pub mlp_layer_types: Option<Vec<String>>,
    pub kv_lora_rank: Option<usize>,
    #[serde(default, deserialize_with = "explicit_null")]
    pub q_lora_rank: Option<Option<usize>>,
    pub qk_rope_head_dim: Option<usize>,
    pub qk_nope_head_dim: Option<usize>,
    pub v_head_dim: Option<usize>,
    pub mla_use_nope: Option<bool>,
    pub attention_bias: Option<bool>,
    pub rms_norm_eps: Option<f64>,
    pub hidden_act: Option<String>,
    pub tie_word_embeddings: Option<bool>,
    #[serde(alias = "max_position_embeddings")]
    pub model_max_length: Option<usize>,
    pub layer_types: Option<Vec<String>>,
    pub linear_attn_config: Option<LinearAttnConfig>,
    pub linear_head_dim: Option<usize>,
    pub linear_num_heads: Option<usize>,
    pub linear_conv_kernel_dim: Option<usize>,
}

impl Config {
    /// Parses the HF config JSON.
    pub fn parse(file: &Path, value: &serde_json::Value) -> Result<Self> {
        parse_family(file, value)
    }

    /// Per-layer token mixers: `layer_types`, else the 1-indexed lists of `linear_attn_config`,
    /// else HF's default (full attention at every fourth layer but the first); where both are
    /// given they must agree.
    fn layer_types(&self, file: &Path, n: usize) -> Result<Vec<LayerKind>> {
        let lac = self.linear_attn_config.as_ref();
        let from_lists = match lac.map(|l| (&l.kda_layers, &l.full_attn_layers)) {
            Some((Some(kda), Some(full))) => {
                let mut kinds = vec![None; n];
                for (list, kind, field) in [
                    (full, LayerKind::FullAttention, "full_attn_layers"),
                    (kda, LayerKind::LinearAttention, "kda_layers"),
                ] {
                    for &l in list {
                        if l == 0 || l > n {
                            return Err(Error::config(
                                file,
                                format!("linear_attn_config.{field}"),
                                format!("layer {l} is outside 1..={n} (the lists are 1-indexed)"),
                            ));
                        }
                        kinds[l - 1] = Some(kind);
                    }
                }
                if let Some(i) = kinds.iter().position(Option::is_none) {
                    return Err(Error::config(
                        file,
                        "linear_attn_config",
                        format!(
                            "layer {} is in neither kda_layers nor full_attn_layers",
                            i + 1
                        ),
                    ));
                }
                Some(kinds.into_iter().map(Option::unwrap).collect::<Vec<_>>())
            }
            _ => None,
        };
        let explicit = match &self.layer_types {
            Some(types) => Some(LayerKind::parse_list(file, types, n)?),
            None => None,
        };
        match (explicit, from_lists) {
            (Some(a), Some(b)) if a != b => Err(Error::config(
                file,
                "layer_types",
                "disagrees with linear_attn_config.kda_layers / full_attn_layers",
            )),
            (Some(a), _) | (None, Some(a)) => Ok(a),
            (None, None) => Ok((0..n)
                .map(|i| {
                    if i > 0 && i % 4 == 0 {
                        LayerKind::FullAttention
                    } else {
                        LayerKind::LinearAttention
                    }
                })
                .collect()),
        }
    }

    /// MoE layers: `mlp_layer_types`, else those from `first_k_dense_replace` (default 1) on.
    fn moe_layers(&self, file: &Path, n: usize) -> Result<Vec<usize>> {
        if let Some(f) = self.moe_layer_freq.filter(|&f| f != 1) {
            return Err(Error::config(
                file,
                "moe_layer_freq",
                format!("{f}: HF transformers ignores it (every layer from first_k_dense_replace is MoE) and mlx-lm honours it, so there is no single reference; only 1 is supported"),
            ));
        }
        let first = self.first_k_dense_replace.unwrap_or(1);
        match &self.mlp_layer_types {
            Some(types) => sparse_layers(file, types, n),
            None => Ok((first.min(n)..n).collect()),
        }
    }

    /// Resolves into the engine's [`ModelSpec`].
    pub fn spec(&self, file: &Path) -> Result<ModelSpec> {
        if self.mla_use_nope == Some(false) {
            return Err(Error::config(
                file,
                "mla_use_nope",
                "false: HF transformers' Kimi-Linear (the reference this engine matches) has no RoPE in its MLA layers",
            ));
        }
        if let Some(f) = self
            .moe_router_activation_func
            .as_deref()
            .filter(|f| *f != "sigmoid")
        {
            return Err(Error::config(
                file,
                "moe_router_activation_func",
                format!("`{f}` (Kimi-Linear's router is sigmoid)"),
            ));
        }
        if let Some(a) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(Error::config(
                file,
                "hidden_act",
                format!("`{a}` (only silu is supported)"),
            ));
        }
        let n = self.num_hidden_layers.unwrap_or(27);
        let heads = self.num_attention_heads.unwrap_or(32);
        let (nope, rope, v) = (
            self.qk_nope_head_dim.unwrap_or(128),
            self.qk_rope_head_dim.unwrap_or(64),
            self.v_head_dim.unwrap_or(128),
        );
        let lac = self.linear_attn_config.as_ref();
        let (lh, ld, lk) = (
            lac.and_then(|l| l.num_heads)
                .or(self.linear_num_heads)
                .unwrap_or(32),
            lac.and_then(|l| l.head_dim)
                .or(self.linear_head_dim)
                .unwrap_or(128),
            lac.and_then(|l| l.short_conv_kernel_size)
                .or(self.linear_conv_kernel_dim)
                .unwrap_or(4),
        );
        let delta = DeltaNetSpec {
            num_k_heads: lh,
            num_v_heads: lh,
            k_head_dim: ld,
            v_head_dim: ld,
            conv_kernel: lk,
        };
        delta.check(file)?;
        let moe_inter = self.moe_intermediate_size.unwrap_or(1024);
        let shared = self.num_shared_experts.unwrap_or(1);
        let qk = nope + rope;
        Ok(ModelSpec {
            path: file.to_path_buf(),
            model_type: "kimi_linear".into(),
            family: Family::KimiLinear,
            vocab_size: self.vocab_size.unwrap_or(163_840),
            hidden_size: self.hidden_size.unwrap_or(2304),
            num_layers: n,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-5),
            attention: AttentionSpec {
                num_heads: heads,
                num_kv_heads: heads,
                head_dim: qk,
                rotary_dim: 0,
                qk_norm: false,
                qkv_bias: false,
                o_bias: false,
                rope_theta: 10_000.0,
                sliding_window: None,
            },
            dense_intermediate: self.intermediate_size.unwrap_or(9216),
            moe: MoeSpec {
                num_experts: self.num_experts.unwrap_or(256),
                top_k: self.num_experts_per_token.unwrap_or(8),
                intermediate_size: moe_inter,
                router: RouterSpec::SigmoidNoauxTc {
                    n_group: self.num_expert_group.unwrap_or(1),
                    topk_group: self.topk_group.unwrap_or(1),
                    norm_topk_prob: self.moe_renormalize.unwrap_or(true),
                    routed_scaling_factor: self.routed_scaling_factor.unwrap_or(2.446),
                },
                shared_intermediate: (shared > 0).then_some(moe_inter * shared),
                moe_layers: self.moe_layers(file, n)?,
            },
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            keys: KeyScheme {
                mlp: "block_sparse_moe",
                stacked_mlp: "mlp",
                expert_proj: ["w1", "w3", "w2"],
                shared: Some("shared_experts"),
            },
            quantization: None,
            mla: Some(MlaSpec {
                q_lora_rank: self.q_lora_rank.unwrap_or(None),
                kv_lora_rank: self.kv_lora_rank.unwrap_or(512),
                qk_nope_head_dim: nope,
                qk_rope_head_dim: rope,
                v_head_dim: v,
                rope_interleave: false,
                inv_freq: Vec::new(),
                attention_factor: 1.0,
                softmax_scale: (qk as f64).powf(-0.5),
                attention_bias: self.attention_bias.unwrap_or(false),
                rope: false,
            }),
            unsupported: None,
            max_position_embeddings: self.model_max_length,
            hybrid: Some(HybridSpec {
                layer_types: self.layer_types(file, n)?,
                linear: LinearKind::Kda,
                delta,
            }),
        })
    }
}
