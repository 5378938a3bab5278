//! Model configuration types: the one family-agnostic [`ModelSpec`] that the loader, the engine
//! and `inspect` share, and the helpers the family files use to fill it from HF's field names
//! (RoPE in both spellings, MLX quantization blocks, validation). The dispatch on `model_type`
//! lives with the families, in [`crate::models::load_spec`].
//!
//! Both spellings of a config load: hub originals (top-level `rope_theta`,
//! `partial_rotary_factor`, Qwen `num_experts`) and transformers ≥ 5 re-serialisations
//! (`rope_parameters`, Qwen `num_local_experts`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// MoE model types this harness runs.
pub const SUPPORTED_MOE: &[&str] = &[
    "glm4_moe",
    "qwen3_moe",
    "mixtral",
    "deepseek_v3",
    "kimi_k2",
    "kimi_k25",
    "glm4_moe_lite",
    "qwen3_next",
    "kimi_linear",
    "mistral3 (with a deepseek_v3 text model)",
];

/// Dense model types we recognise, so we can refuse them with the right reason.
pub(crate) const KNOWN_DENSE: &[&str] = &[
    "llama",
    "mistral",
    "mistral3",
    "ministral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "phi",
    "phi3",
    "glm",
    "glm4",
    "gpt2",
    "gpt_neox",
    "falcon",
    "starcoder2",
    "olmo",
    "olmo2",
    "cohere",
    "granite",
    "exaone",
];

/// Which family file implements the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// GLM-4.5 / 4.6 / 4.7 (`glm4_moe`).
    Glm4Moe,
    /// Qwen3-MoE (`qwen3_moe`).
    Qwen3Moe,
    /// Mixtral (`mixtral`).
    Mixtral,
    /// DeepSeek-V3 and Kimi-K2 text models (`deepseek_v3`, `kimi_k2`): MLA attention.
    DeepseekV3,
    /// GLM-4.7-Flash (`glm4_moe_lite`): MLA attention with GLM's MoE.
    Glm4MoeLite,
    /// Qwen3-Next / Qwen3-Coder-Next (`qwen3_next`): gated DeltaNet + gated full attention.
    Qwen3Next,
    /// Kimi-Linear (`kimi_linear`): Kimi Delta Attention + MLA without RoPE, DeepSeek-style MoE.
    KimiLinear,
}

/// Multi-head latent attention geometry (DeepSeek-V3 family).
#[derive(Debug, Clone, serde::Serialize)]
pub struct MlaSpec {
    /// Rank of the query compression (`None`: plain `q_proj`).
    pub q_lora_rank: Option<usize>,
    /// Rank of the key/value latent.
    pub kv_lora_rank: usize,
    /// Per-head query/key dims without RoPE.
    pub qk_nope_head_dim: usize,
    /// Per-head query/key dims with RoPE (one shared key head).
    pub qk_rope_head_dim: usize,
    /// Per-head value dims.
    pub v_head_dim: usize,
    /// RoPE on adjacent pairs (true) or rotate-half pairs (false).
    pub rope_interleave: bool,
    /// RoPE inverse frequencies (YaRN-adjusted when the config asks for it).
    pub inv_freq: Vec<f32>,
    /// Factor on cos/sin (YaRN `attention_factor`; 1 otherwise).
    pub attention_factor: f32,
    /// Softmax scale (`qk_head_dim^-0.5`, times YaRN mscale²).
    pub softmax_scale: f64,
    /// Biases on `q_a_proj`, `kv_a_proj_with_mqa` and `o_proj`.
    pub attention_bias: bool,
    /// Whether the `qk_rope` parts are rotated; false for Kimi-Linear's MLA, whose `qk_rope` part
    /// is a shared key without any position encoding (HF `KimiLinearAttention`).
    pub rope: bool,
}

/// Attention geometry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttentionSpec {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA).
    pub num_kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// Leading dimensions of each head that RoPE rotates (`head_dim * partial_rotary_factor`).
    pub rotary_dim: usize,
    /// RMSNorm over each query/key head before RoPE.
    pub qk_norm: bool,
    /// Bias on the q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection (Qwen3-MoE with `attention_bias`).
    pub o_bias: bool,
    /// RoPE base.
    pub rope_theta: f64,
    /// Sliding attention window, if any.
    pub sliding_window: Option<usize>,
}

/// How a router turns logits into (expert ids, weights).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RouterSpec {
    /// `softmax` over all experts, top-k, optional renormalisation (Qwen3-MoE).
    SoftmaxTopK {
        /// Renormalise the k weights to sum to one.
        norm_topk_prob: bool,
    },
    /// Top-k of the logits, softmax over those k (Mixtral).
    TopKSoftmax,
    /// Sigmoid scores with `e_score_correction_bias` and group-limited selection (DeepSeek-V3, GLM-4.x).
    SigmoidNoauxTc {
        /// Number of expert groups.
        n_group: usize,
        /// Groups kept per token.
        topk_group: usize,
        /// Renormalise the k weights.
        norm_topk_prob: bool,
        /// Final multiplier on the weights.
        routed_scaling_factor: f64,
    },
}

impl RouterSpec {
    /// Short name used in reports.
    pub fn name(&self) -> &'static str {
        match self {
            RouterSpec::SoftmaxTopK { .. } => "softmax-topk",
            RouterSpec::TopKSoftmax => "topk-softmax",
            RouterSpec::SigmoidNoauxTc { .. } => "sigmoid-noaux_tc",
        }
    }
}

/// Routed-expert geometry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MoeSpec {
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts selected per token.
    pub top_k: usize,
    /// Intermediate size of one routed expert.
    pub intermediate_size: usize,
    /// Router semantics.
    pub router: RouterSpec,
    /// Intermediate size of the always-on shared expert block, if any.
    pub shared_intermediate: Option<usize>,
    /// Decoder layers whose MLP is a MoE block.
    pub moe_layers: Vec<usize>,
}

/// Tensor-name scheme of a family (relative to `…layers.{i}.`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyScheme {
    /// The MoE module as the HF checkpoint names it: `mlp` or `block_sparse_moe`.
    pub mlp: &'static str,
    /// The MoE module in mlx-lm's stacked layout: `mlp` where mlx-lm renames it (Kimi-Linear),
    /// else the same as `mlp`.
    pub stacked_mlp: &'static str,
    /// Per-expert projection names in (gate, up, down) order: `gate_proj…` or `w1, w3, w2`.
    pub expert_proj: [&'static str; 3],
    /// Shared-expert module name, if the family has one.
    pub shared: Option<&'static str>,
}

/// MLX affine quantization parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct QuantParams {
    /// Consecutive inputs sharing one scale and bias.
    pub group_size: usize,
    /// Bits per weight.
    pub bits: usize,
}

/// The `quantization` block of an MLX config.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct QuantSpec {
    /// Default parameters.
    pub default: Option<QuantParams>,
    /// Per-module overrides keyed by module path; `None` means "left unquantized".
    pub overrides: BTreeMap<String, Option<QuantParams>>,
}

impl QuantSpec {
    /// Parameters in force for a module path (without `.weight`).
    pub fn for_module(&self, module: &str) -> Option<QuantParams> {
        match self.overrides.get(module) {
            Some(p) => *p,
            None => self.default,
        }
    }
}

/// A resolved, family-agnostic model description.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelSpec {
    /// Where it was read from.
    pub path: PathBuf,
    /// `model_type` as written in the config.
    pub model_type: String,
    /// Implementing family.
    pub family: Family,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// Decoder layers (MTP layers beyond this are ignored).
    pub num_layers: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Attention.
    pub attention: AttentionSpec,
    /// Intermediate size of dense MLP layers.
    pub dense_intermediate: usize,
    /// Routed experts.
    pub moe: MoeSpec,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Tensor naming.
    pub keys: KeyScheme,
    /// MLX quantization block, if any.
    pub quantization: Option<QuantSpec>,
    /// Multi-head latent attention, for the DeepSeek-V3 family (replaces GQA).
    pub mla: Option<MlaSpec>,
    /// Why the engine cannot run this model although `inspect` can size it.
    pub unsupported: Option<String>,
    /// The longest sequence (prompt + generated tokens) the model is built for
    /// (`max_position_embeddings`), when the config says.
    pub max_position_embeddings: Option<usize>,
    /// Hybrid attention (Qwen3-Next, Kimi-Linear): which layers are linear attention, and its shapes.
    pub hybrid: Option<HybridSpec>,
}

/// A decoder layer's token mixer in a hybrid model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// Linear attention with a recurrent state ([`LinearKind`]).
    LinearAttention,
    /// Full attention with a KV cache (Qwen3-Next's gated attention, Kimi-Linear's MLA).
    FullAttention,
}

impl LayerKind {
    /// Parses HF's `layer_types` (`linear_attention` / `full_attention` per decoder layer),
    /// checking its length against `num_hidden_layers`.
    pub fn parse_list(file: &Path, types: &[String], n: usize) -> Result<Vec<LayerKind>> {
        if types.len() != n {
            return Err(Error::config(
                file,
                "layer_types",
                format!("lists {} layers but num_hidden_layers is {n}", types.len()),
            ));
        }
        types
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                "linear_attention" => Ok(LayerKind::LinearAttention),
                "full_attention" => Ok(LayerKind::FullAttention),
                other => Err(Error::config(
                    file,
                    format!("layer_types[{i}]"),
                    format!("`{other}` (expected linear_attention or full_attention)"),
                )),
            })
            .collect()
    }
}

/// Serde helper for a field whose explicit `null` means something (`q_lora_rank: null`: no query
/// compression): absent → `None`, `null` → `Some(None)`, a number → `Some(Some(n))`.
pub fn explicit_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Option<usize>>, D::Error> {
    Option::<usize>::deserialize(d).map(Some)
}

/// The MoE layers named by HF's `mlp_layer_types` (`dense` / `sparse` per decoder layer),
/// checking its length against `num_hidden_layers`.
pub fn sparse_layers(file: &Path, types: &[String], n: usize) -> Result<Vec<usize>> {
    if types.len() != n {
        return Err(Error::config(
            file,
            "mlp_layer_types",
            format!("has {} entries for {n} layers", types.len()),
        ));
    }
    if let Some(bad) = types
        .iter()
        .find(|t| !matches!(t.as_str(), "dense" | "sparse"))
    {
        return Err(Error::config(
            file,
            "mlp_layer_types",
            format!("`{bad}` (known: dense, sparse)"),
        ));
    }
    Ok((0..n).filter(|&i| types[i] == "sparse").collect())
}

/// Which linear-attention module a hybrid model's linear layers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearKind {
    /// Qwen3-Next's gated DeltaNet (`linear_attn`): one decay per value head, grouped
    /// `in_proj_qkvz`/`in_proj_ba`, SiLU-gated output norm.
    GatedDeltaNet,
    /// Kimi Delta Attention (`self_attn`): one decay per key channel from a low-rank forget gate,
    /// separate q/k/v projections and convolutions, sigmoid-gated output norm.
    Kda,
}

/// Gated DeltaNet shapes (`linear_*` fields of the HF config).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeltaNetSpec {
    /// Query/key heads (`linear_num_key_heads`).
    pub num_k_heads: usize,
    /// Value heads (`linear_num_value_heads`), a multiple of the key heads.
    pub num_v_heads: usize,
    /// Per-head query/key dimension (`linear_key_head_dim`).
    pub k_head_dim: usize,
    /// Per-head value dimension (`linear_value_head_dim`).
    pub v_head_dim: usize,
    /// Depthwise convolution width (`linear_conv_kernel_dim`).
    pub conv_kernel: usize,
}

/// The hybrid-attention parts of a model: per-layer token mixers, the linear-attention module and
/// its shapes. (Qwen3-Next's full-attention layers gate their output, its RMSNorms are
/// zero-centred and its shared expert is sigmoid-gated; Kimi-Linear's full-attention layers are
/// MLA without RoPE: both follow from [`ModelSpec::family`] and [`ModelSpec::mla`].)
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HybridSpec {
    /// One per decoder layer.
    pub layer_types: Vec<LayerKind>,
    /// The linear-attention module.
    pub linear: LinearKind,
    /// The linear-attention layers' shapes (KDA: as many value heads as key heads, of one width).
    pub delta: DeltaNetSpec,
}

impl ModelSpec {
    /// Number of MoE layers.
    pub fn num_moe_layers(&self) -> usize {
        self.moe.moe_layers.len()
    }
    /// Whether decoder layer `i` is a MoE layer.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.moe.moe_layers.binary_search(&i).is_ok()
    }
    /// Weight elements of one routed expert (gate + up + down).
    pub fn expert_elements(&self) -> u64 {
        3 * self.hidden_size as u64 * self.moe.intermediate_size as u64
    }

    /// Bytes the KV cache holds per token (f32, every attention layer): keys and values of the
    /// KV heads, or for MLA the latent and the shared RoPE key. (linear-attention layers hold a
    /// fixed state instead: [`ModelSpec::recurrent_state_bytes`].)
    pub fn kv_bytes_per_token(&self) -> u64 {
        let per_layer = match &self.mla {
            Some(m) => m.kv_lora_rank + m.qk_rope_head_dim,
            None => 2 * self.attention.num_kv_heads * self.attention.head_dim,
        };
        4 * (per_layer * self.attention_layers()) as u64
    }

    /// Decoder layers that keep a KV cache (all but the DeltaNet ones).
    pub fn attention_layers(&self) -> usize {
        match &self.hybrid {
            Some(h) => h
                .layer_types
                .iter()
                .filter(|k| **k == LayerKind::FullAttention)
                .count(),
            None => self.num_layers,
        }
    }

    /// Bytes of the DeltaNet layers' per-sequence state (f32 recurrent matrices and convolution
    /// history), independent of the sequence length; 0 for other models.
    pub fn recurrent_state_bytes(&self) -> u64 {
        let Some(h) = &self.hybrid else {
            return 0;
        };
        let d = &h.delta;
        let linear = self.num_layers - self.attention_layers();
        let conv = (2 * d.num_k_heads * d.k_head_dim + d.num_v_heads * d.v_head_dim)
            * d.conv_kernel.saturating_sub(1);
        let state = d.num_v_heads * d.k_head_dim * d.v_head_dim;
        4 * (linear * (conv + state)) as u64
    }

    /// An upper estimate of the memory a forward pass over `prompt` new tokens after `past`
    /// cached ones needs beyond the weights: the KV cache (held twice while it grows), the
    /// attention scores and their softmax (`heads × prompt × (past + prompt)` f32 each), and the
    /// keys and values expanded per head.
    pub fn sequence_bytes(&self, past: usize, prompt: usize) -> u64 {
        let (t, s) = (prompt as u64, (past + prompt) as u64);
        let heads = self.attention.num_heads as u64;
        let per_head = match &self.mla {
            Some(m) => {
                (m.kv_lora_rank + m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) as u64
            }
            None => 2 * self.attention.head_dim as u64,
        };
        2 * self.kv_bytes_per_token() * s
            + 2 * 4 * heads * t * s
            + 4 * heads * s * per_head
            + self.recurrent_state_bytes()
    }
}

/// Reads `config.json` (given a checkpoint directory or the file itself) as JSON; returns the
/// file's path and its value. [`crate::models::load_spec`] resolves it into a [`ModelSpec`].
pub fn read_json(path: &Path) -> Result<(PathBuf, serde_json::Value)> {
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&file, format!("not valid JSON: {e}")))?;
    Ok((file, value))
}

/// Deserialises a family's flat HF config struct, naming the file and field on error.
pub fn parse_family<T: serde::de::DeserializeOwned>(
    file: &Path,
    value: &serde_json::Value,
) -> Result<T> {
    serde_json::from_value(value.clone()).map_err(|e| {
        let msg = e.to_string();
        // serde_json names the field in its message (`missing field `x``, `invalid type … for key`).
        let field = msg
            .split('`')
            .nth(1)
            .map(str::to_string)
            .unwrap_or_else(|| "?".to_string());
        Error::config(file, field, msg)
    })
}

/// RoPE settings in either spelling: `rope_parameters` (transformers ≥ 5) or top level (hub).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeFields {
    /// Top-level base (hub spelling).
    pub rope_theta: Option<f64>,
    /// Top-level partial factor (hub spelling).
    pub partial_rotary_factor: Option<f64>,
    /// Hub spelling of scaling.
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5 spelling.
    pub rope_parameters: Option<serde_json::Value>,
}

impl RopeFields {
    /// Resolves (theta, partial_rotary_factor), rejecting scaling types this engine lacks.
    pub fn resolve(
        &self,
        file: &Path,
        default_theta: f64,
        default_partial: f64,
    ) -> Result<(f64, f64)> {
        let mut theta = self.rope_theta;
        let mut partial = self.partial_rotary_factor;
        let mut scaling = self.rope_scaling.clone();
        if let Some(p) = &self.rope_parameters {
            let obj = p
                .as_object()
                .ok_or_else(|| Error::config(file, "rope_parameters", "must be an object"))?;
            if let Some(t) = obj.get("rope_theta") {
                theta = Some(t.as_f64().ok_or_else(|| {
                    Error::config(file, "rope_parameters.rope_theta", "must be a number")
                })?);
            }
            if let Some(f) = obj.get("partial_rotary_factor") {
                partial = Some(f.as_f64().ok_or_else(|| {
                    Error::config(
                        file,
                        "rope_parameters.partial_rotary_factor",
                        "must be a number",
                    )
                })?);
            }
            scaling = Some(p.clone());
        }
        if let Some(s) = scaling.filter(|s| !s.is_null()) {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            if kind != "default" {
                return Err(Error::config(
                    file,
                    "rope_scaling.rope_type",
                    format!("`{kind}` is not supported by this engine for this family (supported: default)"),
                ));
            }
        }
        Ok((
            theta.unwrap_or(default_theta),
            partial.unwrap_or(default_partial),
        ))
    }
}

/// A non-MLX quantization method (compressed-tensors int4, fp8, gptq…): `inspect` still sizes the
/// model (at the assumed MLX bits), the engine refuses it with this reason.
pub(crate) fn foreign_quantization(value: &serde_json::Value) -> Option<String> {
    let q = value
        .get("quantization_config")
        .or_else(|| value.get("quantization"))?;
    let m = q.get("quant_method").and_then(|m| m.as_str())?;
    (!matches!(m, "mlx" | "affine")).then(|| {
        format!("the checkpoint is quantized with `{m}`, which this engine does not read (supported: unquantized f32/f16/bf16 and MLX affine; convert with mlx_lm.convert)")
    })
}

pub(crate) fn parse_quantization(
    file: &Path,
    value: &serde_json::Value,
) -> Result<Option<QuantSpec>> {
    let q = match value
        .get("quantization")
        .or_else(|| value.get("quantization_config"))
    {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(q) => q,
    };
    let obj = q
        .as_object()
        .ok_or_else(|| Error::config(file, "quantization", "must be an object"))?;
    if obj
        .get("quant_method")
        .and_then(|m| m.as_str())
        .is_some_and(|m| !matches!(m, "mlx" | "affine"))
    {
        // Another format altogether (see `foreign_quantization`).
        return Ok(None);
    }
    let mut spec = QuantSpec::default();
    let get_params = |field: &str, v: &serde_json::Value| -> Result<QuantParams> {
        let p: QuantParams = serde_json::from_value(v.clone()).map_err(|e| {
            Error::config(file, field, format!("expected {{group_size, bits}}: {e}"))
        })?;
        if !matches!(p.bits, 2 | 4 | 8) {
            return Err(Error::config(
                file,
                field,
                format!("bits = {} not supported (supported: 2, 4, 8)", p.bits),
            ));
        }
        if p.group_size == 0 {
            return Err(Error::config(file, field, "group_size must be positive"));
        }
        Ok(p)
    };
    if obj.contains_key("bits") || obj.contains_key("group_size") {
        let mut d = serde_json::Map::new();
        for k in ["group_size", "bits"] {
            if let Some(v) = obj.get(k) {
                d.insert(k.to_string(), v.clone());
            }
        }
        spec.default = Some(get_params("quantization", &serde_json::Value::Object(d))?);
    }
    for (k, v) in obj {
        match v {
            serde_json::Value::Object(_) => {
                spec.overrides.insert(
                    k.clone(),
                    Some(get_params(&format!("quantization.{k}"), v)?),
                );
            }
            serde_json::Value::Bool(false) => {
                spec.overrides.insert(k.clone(), None);
            }
            _ => {}
        }
    }
    Ok(Some(spec))
}

pub(crate) fn validate(file: &Path, s: &ModelSpec) -> Result<()> {
    let positive = [
        ("vocab_size", s.vocab_size),
        ("hidden_size", s.hidden_size),
        ("num_hidden_layers", s.num_layers),
        ("num_attention_heads", s.attention.num_heads),
        ("num_key_value_heads", s.attention.num_kv_heads),
        ("head_dim", s.attention.head_dim),
        ("routed experts", s.moe.num_experts),
        ("num_experts_per_tok", s.moe.top_k),
        ("moe_intermediate_size", s.moe.intermediate_size),
    ];
    for (field, v) in positive {
        if v == 0 {
            return Err(Error::config(file, field, "must be positive"));
        }
    }
    if !s
        .attention
        .num_heads
        .is_multiple_of(s.attention.num_kv_heads)
    {
        return Err(Error::config(
            file,
            "num_key_value_heads",
            format!(
                "{} does not divide num_attention_heads {}",
                s.attention.num_kv_heads, s.attention.num_heads
            ),
        ));
    }
    if s.moe.top_k > s.moe.num_experts {
        return Err(Error::config(
            file,
            "num_experts_per_tok",
            format!(
                "{} exceeds the number of routed experts {}",
                s.moe.top_k, s.moe.num_experts
            ),
        ));
    }
    if let Some(m) = &s.mla {
        if m.qk_rope_head_dim % 2 != 0
            || m.qk_nope_head_dim + m.qk_rope_head_dim == 0
            || m.kv_lora_rank == 0
            || m.v_head_dim == 0
        {
            return Err(Error::config(
                file,
                "qk_rope_head_dim",
                "MLA dims must be positive and qk_rope_head_dim even",
            ));
        }
    } else if !s.attention.rotary_dim.is_multiple_of(2)
        || s.attention.rotary_dim > s.attention.head_dim
    {
        return Err(Error::config(
            file,
            "partial_rotary_factor",
            format!(
                "gives rotary dim {} for head_dim {}",
                s.attention.rotary_dim, s.attention.head_dim
            ),
        ));
    }
    if let RouterSpec::SigmoidNoauxTc {
        n_group,
        topk_group,
        ..
    } = s.moe.router
    {
        if n_group == 0 || !s.moe.num_experts.is_multiple_of(n_group) {
            return Err(Error::config(
                file,
                "n_group",
                format!(
                    "{n_group} does not divide the {} routed experts",
                    s.moe.num_experts
                ),
            ));
        }
        if topk_group == 0 || topk_group > n_group {
            return Err(Error::config(
                file,
                "topk_group",
                format!("{topk_group} must be in 1..={n_group}"),
            ));
        }
        if s.moe.num_experts / n_group < 2 {
            return Err(Error::config(
                file,
                "n_group",
                "each group needs at least 2 experts (group score = sum of top-2)",
            ));
        }
    }
    if s.moe.moe_layers.is_empty() {
        return Err(Error::config(
            file,
            "num_hidden_layers",
            "the config describes no MoE layer",
        ));
    }
    Ok(())
}
