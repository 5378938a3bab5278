//! DeepSeek-V3 (`deepseek_v3`), Kimi-K2 (`kimi_k2`, also the `text_config` of `kimi_k25`) and
//! GLM-4.7-Flash (`glm4_moe_lite`): multi-head latent attention (`mla.rs`) with the sigmoid
//! `noaux_tc` router, shared experts and leading dense layers. Mirrors HF transformers
//! `models/deepseek_v3/` and `models/glm4_moe_lite/` (whose attention is DeepSeek-V3's); the
//! families differ only in config defaults and in how dense layers are chosen. MTP layers
//! (`model.layers.{num_hidden_layers}`) are never read.

use std::path::Path;

use serde::Deserialize;

use crate::config::{
    explicit_null, parse_family, sparse_layers, AttentionSpec, Family, KeyScheme, MlaSpec,
    ModelSpec, MoeSpec, RouterSpec,
};
use crate::error::{Error, Result};

/// Which defaults and dense-layer rule apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `deepseek_v3` / `kimi_k2`: MoE from `first_k_dense_replace` (default 3) on.
    DeepseekV3,
    /// `glm4_moe_lite`: MoE where `mlp_layer_types` says `sparse` (default: all but layer 0).
    Glm4MoeLite,
}

/// HF `DeepseekV3Config` / `Glm4MoeLiteConfig` fields, names unchanged; `None` = HF default.
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)]
pub struct Config {
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub moe_intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub n_shared_experts: Option<usize>,
    pub n_routed_experts: Option<usize>,
    pub num_local_experts: Option<usize>,
    pub routed_scaling_factor: Option<f64>,
    pub kv_lora_rank: Option<usize>,
    #[serde(default, deserialize_with = "explicit_null")]
    pub q_lora_rank: Option<Option<usize>>,
    pub qk_rope_head_dim: Option<usize>,
    pub v_head_dim: Option<usize>,
    pub qk_nope_head_dim: Option<usize>,
    pub n_group: Option<usize>,
    pub topk_group: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    pub first_k_dense_replace: Option<usize>,
    pub mlp_layer_types: Option<Vec<String>>,
    pub norm_topk_prob: Option<bool>,
    pub rms_norm_eps: Option<f64>,
    pub rope_interleave: Option<bool>,
    pub attention_bias: Option<bool>,
    pub tie_word_embeddings: Option<bool>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<serde_json::Value>,
    pub rope_parameters: Option<serde_json::Value>,
    pub max_position_embeddings: Option<usize>,
    pub original_max_position_embeddings: Option<usize>,
}

struct Defaults {
    vocab: usize,
    hidden: usize,
    inter: usize,
    moe_inter: usize,
    layers: usize,
    heads: usize,
    routed: usize,
    scaling: f64,
    q_lora: Option<usize>,
    kv_lora: usize,
    rope: usize,
    v: usize,
    nope: usize,
    n_group: usize,
    topk_group: usize,
    top_k: usize,
    eps: f64,
    max_pos: usize,
}

const DSV3: Defaults = Defaults {
    vocab: 129280,
    hidden: 7168,
    inter: 18432,
    moe_inter: 2048,
    layers: 61,
    heads: 128,
    routed: 256,
    scaling: 2.5,
    q_lora: Some(1536),
    kv_lora: 512,
    rope: 64,
    v: 128,
    nope: 128,
    n_group: 8,
    topk_group: 4,
    top_k: 8,
    eps: 1e-6,
    max_pos: 4096,
};

const GLM_LITE: Defaults = Defaults {
    vocab: 154880,
    hidden: 2048,
    inter: 10240,
    moe_inter: 1536,
    layers: 47,
    heads: 20,
    routed: 64,
    scaling: 1.8,
    q_lora: Some(768),
    kv_lora: 512,
    rope: 64,
    v: 256,
    nope: 192,
    n_group: 1,
    topk_group: 1,
    top_k: 4,
    eps: 1e-5,
    max_pos: 202752,
};

/// Resolves a DeepSeek-V3-family config (`model_type` as written) into a [`ModelSpec`].
pub fn spec(
    file: &Path,
    value: &serde_json::Value,
    model_type: &str,
    variant: Variant,
) -> Result<ModelSpec> {
    let c: Config = parse_family(file, value)?;
    let d = if variant == Variant::Glm4MoeLite {
        GLM_LITE
    } else {
        DSV3
    };
    let layers = c.num_hidden_layers.unwrap_or(d.layers);
    let heads = c.num_attention_heads.unwrap_or(d.heads);
    let (nope, rope, v) = (
        c.qk_nope_head_dim.unwrap_or(d.nope),
        c.qk_rope_head_dim.unwrap_or(d.rope),
        c.v_head_dim.unwrap_or(d.v),
    );
    let moe_inter = c.moe_intermediate_size.unwrap_or(d.moe_inter);
    let shared = c.n_shared_experts.unwrap_or(1);
    let moe_layers: Vec<usize> = match (variant, &c.mlp_layer_types) {
        (Variant::Glm4MoeLite, Some(types)) => sparse_layers(file, types, layers)?,
        // HF builds `["dense"] + ["sparse"] * (n - 1)` when `mlp_layer_types` is absent.
        (Variant::Glm4MoeLite, None) => (1..layers).collect(),
        (Variant::DeepseekV3, _) => (c.first_k_dense_replace.unwrap_or(3)..layers).collect(),
    };
    let (theta, rope_kind) = rope_settings(file, &c)?;
    let (inv_freq, attention_factor, mscale_sq) = rope_frequencies(
        rope,
        theta,
        &rope_kind,
        c.original_max_position_embeddings
            .or(c.max_position_embeddings)
            .unwrap_or(d.max_pos),
    );
    let qk = nope + rope;
    let mla = MlaSpec {
        q_lora_rank: c.q_lora_rank.unwrap_or(d.q_lora),
        kv_lora_rank: c.kv_lora_rank.unwrap_or(d.kv_lora),
        qk_nope_head_dim: nope,
        qk_rope_head_dim: rope,
        v_head_dim: v,
        rope_interleave: c.rope_interleave.unwrap_or(true),
        inv_freq,
        attention_factor,
        softmax_scale: (qk as f64).powf(-0.5) * mscale_sq,
        attention_bias: c.attention_bias.unwrap_or(false),
        rope: true,
    };
    Ok(ModelSpec {
        path: file.to_path_buf(),
        model_type: model_type.to_string(),
        family: if variant == Variant::Glm4MoeLite {
            Family::Glm4MoeLite
        } else {
            Family::DeepseekV3
        },
        vocab_size: c.vocab_size.unwrap_or(d.vocab),
        hidden_size: c.hidden_size.unwrap_or(d.hidden),
        num_layers: layers,
        rms_norm_eps: c.rms_norm_eps.unwrap_or(d.eps),
        // GQA fields kept for reporting: MLA has `heads` query heads of width nope + rope.
        attention: AttentionSpec {
            num_heads: heads,
            num_kv_heads: heads,
            head_dim: qk,
            rotary_dim: rope,
            qk_norm: false,
            qkv_bias: false,
            o_bias: false,
            rope_theta: theta,
            sliding_window: None,
        },
        dense_intermediate: c.intermediate_size.unwrap_or(d.inter),
        moe: MoeSpec {
            num_experts: c
                .n_routed_experts
                .or(c.num_local_experts)
                .unwrap_or(d.routed),
            top_k: c.num_experts_per_tok.unwrap_or(d.top_k),
            intermediate_size: moe_inter,
            router: RouterSpec::SigmoidNoauxTc {
                n_group: c.n_group.unwrap_or(d.n_group),
                topk_group: c.topk_group.unwrap_or(d.topk_group),
                norm_topk_prob: c.norm_topk_prob.unwrap_or(true),
                routed_scaling_factor: c.routed_scaling_factor.unwrap_or(d.scaling),
            },
            shared_intermediate: (shared > 0).then_some(moe_inter * shared),
            moe_layers,
        },
        tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
        keys: KeyScheme {
            mlp: "mlp",
            stacked_mlp: "mlp",
            expert_proj: ["gate_proj", "up_proj", "down_proj"],
            shared: Some("shared_experts"),
        },
        quantization: None,
        mla: Some(mla),
        unsupported: None,
        max_position_embeddings: c.max_position_embeddings,
        hybrid: None,
    })
}

/// RoPE scaling as the config states it.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeKind {
    /// Plain RoPE.
    Default,
    /// YaRN.
    Yarn {
        /// Context extension factor.
        factor: f64,
        /// Pre-extension context length.
        original_max: Option<usize>,
        /// High-frequency boundary (rotations).
        beta_fast: f64,
        /// Low-frequency boundary (rotations).
        beta_slow: f64,
        /// `mscale`.
        mscale: Option<f64>,
        /// `mscale_all_dim`.
        mscale_all_dim: Option<f64>,
        /// Explicit `attention_factor`.
        attention_factor: Option<f64>,
        /// Round the correction range to integers (HF default true).
        truncate: bool,
    },
}

fn rope_settings(file: &Path, c: &Config) -> Result<(f64, RopeKind)> {
    // HF: a top-level `rope_scaling` wins over `rope_parameters`.
    let params = c
        .rope_scaling
        .as_ref()
        .filter(|v| !v.is_null())
        .or(c.rope_parameters.as_ref().filter(|v| !v.is_null()));
    let theta = c
        .rope_theta
        .or_else(|| {
            c.rope_parameters
                .as_ref()
                .and_then(|p| p.get("rope_theta"))
                .and_then(|t| t.as_f64())
        })
        .unwrap_or(10_000.0);
    let Some(p) = params else {
        return Ok((theta, RopeKind::Default));
    };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let f = |k: &str| p.get(k).and_then(|v| v.as_f64());
    match kind {
        "default" => Ok((theta, RopeKind::Default)),
        "yarn" => Ok((
            theta,
            RopeKind::Yarn {
                factor: f("factor").ok_or_else(|| {
                    Error::config(file, "rope_scaling.factor", "YaRN needs a factor")
                })?,
                original_max: p
                    .get("original_max_position_embeddings")
                    .and_then(|v| v.as_u64())
                    .map(|v| v as usize),
                beta_fast: f("beta_fast").filter(|b| *b != 0.0).unwrap_or(32.0),
                beta_slow: f("beta_slow").filter(|b| *b != 0.0).unwrap_or(1.0),
                mscale: f("mscale"),
                mscale_all_dim: f("mscale_all_dim"),
                attention_factor: f("attention_factor"),
                truncate: p.get("truncate").and_then(|t| t.as_bool()).unwrap_or(true),
            },
        )),
        other => Err(Error::config(
            file,
            "rope_scaling.rope_type",
            format!("`{other}` is not supported for this family (supported: default, yarn)"),
        )),
    }
}

fn get_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

/// Inverse frequencies, cos/sin factor and softmax-scale multiplier (mscale²), as HF's
/// `modeling_rope_utils` computes them (f32 where torch uses f32).
pub fn rope_frequencies(
    dim: usize,
    base: f64,
    kind: &RopeKind,
    default_original_max: usize,
) -> (Vec<f32>, f32, f64) {
    let half = dim / 2;
    let pos_freqs: Vec<f32> = (0..half)
        .map(|i| (base as f32).powf((2 * i) as f32 / dim as f32))
        .collect();
    match kind {
        RopeKind::Default => (pos_freqs.iter().map(|p| 1.0 / p).collect(), 1.0, 1.0),
        RopeKind::Yarn {
            factor,
            original_max,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
            attention_factor,
            truncate,
        } => {
            let orig = original_max.unwrap_or(default_original_max) as f64;
            let corr = |rot: f64| {
                dim as f64 * (orig / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln())
            };
            let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
            if *truncate {
                low = low.floor();
                high = high.ceil();
            }
            low = low.max(0.0);
            high = high.min(dim as f64 - 1.0);
            if low == high {
                high += 0.001;
            }
            let inv: Vec<f32> = (0..half)
                .map(|i| {
                    let ramp =
                        ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                    let extrap = 1.0 - ramp;
                    let (extra, inter) =
                        (1.0 / pos_freqs[i], 1.0 / (*factor as f32 * pos_freqs[i]));
                    inter * (1.0 - extrap) + extra * extrap
                })
                .collect();
            let af = match (attention_factor, mscale, mscale_all_dim) {
                (Some(a), _, _) => *a,
                (None, Some(m), Some(a)) if *m != 0.0 && *a != 0.0 => {
                    get_mscale(*factor, *m) / get_mscale(*factor, *a)
                }
                _ => get_mscale(*factor, 1.0),
            };
            let m2 = match mscale_all_dim {
                Some(a) if *a != 0.0 => get_mscale(*factor, *a).powi(2),
                _ => 1.0,
            };
            (inv, af as f32, m2)
        }
    }
}
