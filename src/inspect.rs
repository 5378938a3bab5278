//! `harness inspect`: the compatibility report for a checkpoint directory or a bare
//! `config.json` — family, expert geometry, layout, key prefix, router, quantization, sizes and a
//! verdict. From a bare config, sizes are estimated at MLX affine `bits`/`group_size` with 16-bit
//! scales and biases, so a user can size GLM-4.7 or Kimi-K2.5 before downloading them.

use std::path::Path;

use serde::Serialize;

use crate::config::{ModelSpec, QuantParams};
use crate::error::{Error, Result};
use crate::experts::budget::human_bytes;
use crate::weights::{layout, Checkpoint};

/// The verdict of a compatibility check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    /// Runs as is.
    #[serde(rename = "drop-in")]
    DropIn,
    /// Runs; its tensors sit under a non-standard key prefix (detected automatically).
    #[serde(rename = "needs key prefix")]
    NeedsKeyPrefix,
    /// A dense model: nothing to load lazily.
    #[serde(rename = "dense: incompatible")]
    Dense,
    /// Unknown or unsupported model type.
    #[serde(rename = "unsupported")]
    Unsupported,
}

impl Verdict {
    /// True when the engine can run the model.
    pub fn runs(self) -> bool {
        matches!(self, Verdict::DropIn | Verdict::NeedsKeyPrefix)
    }
}

/// The report printed by `inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What was inspected.
    pub path: String,
    /// `model_type` from the config.
    pub model_type: String,
    /// The verdict.
    pub verdict: Verdict,
    /// Why, for non-runnable verdicts.
    pub reason: Option<String>,
    /// Whether the model has routed experts.
    pub moe: bool,
    /// Routed experts per MoE layer.
    pub routed_experts: Option<usize>,
    /// Experts per token.
    pub top_k: Option<usize>,
    /// Number of MoE layers.
    pub moe_layers: Option<usize>,
    /// Decoder layers.
    pub num_layers: Option<usize>,
    /// Shared-expert intermediate size (0 when none).
    pub shared_expert_intermediate: Option<usize>,
    /// `hidden × moe_intermediate` geometry.
    pub hidden_size: Option<usize>,
    /// Intermediate size of one routed expert.
    pub moe_intermediate_size: Option<usize>,
    /// Weight elements of one expert (three matrices).
    pub elements_per_expert: Option<u64>,
    /// `per_expert`, `stacked`, or `unknown (config only)`.
    pub layout: String,
    /// Detected key prefix of the decoder layers.
    pub key_prefix: Option<String>,
    /// Router kind.
    pub router: Option<String>,
    /// Attention kind: `gqa` or `mla`.
    pub attention: Option<String>,
    /// Quantization description.
    pub quantization: String,
    /// Whether sizes are measured from tensors or estimated from the config.
    pub sizes: &'static str,
    /// Bytes of one expert (all three projections, scales and biases included).
    pub bytes_per_expert: Option<u64>,
    /// Bytes of all routed experts.
    pub total_expert_bytes: Option<u64>,
    /// Bytes of everything else the engine keeps resident.
    pub dense_bytes: Option<u64>,
    /// Expert bytes touched per token (`moe_layers × top_k × bytes_per_expert`).
    pub expert_bytes_per_token: Option<u64>,
}

/// Builds the report. `est` sets the quantization assumed when only a config is given.
pub fn inspect(path: &Path, est: QuantParams) -> Result<Report> {
    let has_weights = path.is_dir()
        && (path.join("model.safetensors").exists()
            || path.join("model.safetensors.index.json").exists()
            || std::fs::read_dir(path)
                .map_err(|e| Error::io(path, e))?
                .flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "safetensors")));
    let spec = match crate::models::load_spec(path) {
        Ok(s) => s,
        Err(Error::DenseModel { model_type, .. }) => {
            return Ok(refused(
                path,
                model_type,
                Verdict::Dense,
                "a dense model has no routed experts to load lazily",
            ))
        }
        Err(Error::UnknownModel {
            model_type,
            supported,
            ..
        }) => {
            return Ok(refused(
                path,
                model_type,
                Verdict::Unsupported,
                &format!("model_type not supported (supported: {supported})"),
            ))
        }
        Err(e) => return Err(e),
    };
    let mut r = base(path, &spec);
    if let Some(reason) = &spec.unsupported {
        r.verdict = Verdict::Unsupported;
        r.reason = Some(reason.clone());
    }
    if has_weights && spec.unsupported.is_none() {
        let open =
            crate::experts::store::OpenCheckpoint::open(path, &spec, candle_core::Device::Cpu)?;
        let (ck, prefix, store) = (open.ck.clone(), open.prefix.clone(), &open.store);
        let lay = store.layout();
        let expert_total = store.total_bytes();
        let dense_bytes = open.dense_bytes(&spec);
        let first = crate::experts::ExpertKey {
            layer: spec.moe.moe_layers[0] as u32,
            expert: 0,
        };
        r.bytes_per_expert = Some(store.expert_bytes(first));
        r.total_expert_bytes = Some(expert_total);
        r.dense_bytes = Some(dense_bytes);
        r.layout = match lay {
            layout::ExpertLayout::PerExpert => "per_expert".into(),
            layout::ExpertLayout::Stacked => "stacked".into(),
        };
        r.key_prefix = Some(prefix.layers.clone());
        r.sizes = "measured from tensors";
        r.quantization = match &spec.quantization {
            Some(q) => describe_quant(q.default),
            None => format!("none ({:?})", dtype_of(&ck, &prefix)),
        };
        if prefix.is_nonstandard() && r.verdict == Verdict::DropIn {
            r.verdict = Verdict::NeedsKeyPrefix;
            r.reason = Some(format!(
                "tensors live under `{}`; detected and handled automatically",
                prefix.model
            ));
        }
    } else {
        let q = spec
            .quantization
            .as_ref()
            .and_then(|q| q.default)
            .unwrap_or(est);
        let el = spec.expert_elements();
        let per = quant_bytes(el, q);
        r.bytes_per_expert = Some(per);
        r.total_expert_bytes = Some(per * (spec.num_moe_layers() * spec.moe.num_experts) as u64);
        r.dense_bytes = Some(estimate_dense(&spec, q));
        r.quantization = format!("{} (assumed for the estimate)", describe_quant(Some(q)));
        r.sizes = "estimated from config";
    }
    r.expert_bytes_per_token = r
        .bytes_per_expert
        .map(|b| b * (spec.num_moe_layers() * spec.moe.top_k) as u64);
    Ok(r)
}

fn dtype_of(ck: &Checkpoint, prefix: &layout::Prefix) -> crate::weights::DType {
    ck.get(&format!("{}embed_tokens.weight", prefix.model))
        .map_or(crate::weights::DType::F32, |e| e.dtype)
}

fn describe_quant(q: Option<QuantParams>) -> String {
    match q {
        Some(q) => format!("MLX affine {}-bit, group {}", q.bits, q.group_size),
        None => "MLX affine (per-module)".into(),
    }
}

/// Bytes of `elements` weights at `q` with 16-bit scales and biases. Matrices are `[out, in]`
/// with groups along `in`; the count of groups is `elements / group_size` either way.
fn quant_bytes(elements: u64, q: QuantParams) -> u64 {
    elements * q.bits as u64 / 8 + 2 * 2 * elements / q.group_size as u64
}

fn estimate_dense(spec: &ModelSpec, q: QuantParams) -> u64 {
    let (h, v) = (spec.hidden_size as u64, spec.vocab_size as u64);
    let a = &spec.attention;
    let heads = a.num_heads as u64;
    let attn = match &spec.mla {
        Some(m) => {
            let (dq, c, dr) = (
                (m.qk_nope_head_dim + m.qk_rope_head_dim) as u64,
                m.kv_lora_rank as u64,
                m.qk_rope_head_dim as u64,
            );
            let q = match m.q_lora_rank {
                Some(r) => h * r as u64 + r as u64 * heads * dq,
                None => h * heads * dq,
            };
            q + h * (c + dr)
                + c * heads * (m.qk_nope_head_dim + m.v_head_dim) as u64
                + heads * m.v_head_dim as u64 * h
        }
        None => {
            h * (a.num_heads * a.head_dim) as u64 * 2 + h * (a.num_kv_heads * a.head_dim) as u64 * 2
        }
    };
    let mut el = v * h * if spec.tie_word_embeddings { 1 } else { 2 };
    let mut router = 0u64;
    for l in 0..spec.num_layers {
        el += attn;
        if spec.is_moe_layer(l) {
            router += (spec.moe.num_experts as u64) * h;
            el += spec.moe.shared_intermediate.map_or(0, |i| 3 * h * i as u64);
        } else {
            el += 3 * h * spec.dense_intermediate as u64;
        }
    }
    quant_bytes(el, q) + router * 2
}

fn base(path: &Path, s: &ModelSpec) -> Report {
    Report {
        path: path.display().to_string(),
        model_type: s.model_type.clone(),
        verdict: Verdict::DropIn,
        reason: None,
        moe: true,
        routed_experts: Some(s.moe.num_experts),
        top_k: Some(s.moe.top_k),
        moe_layers: Some(s.num_moe_layers()),
        num_layers: Some(s.num_layers),
        shared_expert_intermediate: Some(s.moe.shared_intermediate.unwrap_or(0)),
        hidden_size: Some(s.hidden_size),
        moe_intermediate_size: Some(s.moe.intermediate_size),
        elements_per_expert: Some(s.expert_elements()),
        layout: "unknown (config only)".into(),
        key_prefix: None,
        router: Some(s.moe.router.name().into()),
        attention: Some(attention_label(s)),
        quantization: String::new(),
        sizes: "",
        bytes_per_expert: None,
        total_expert_bytes: None,
        dense_bytes: None,
        expert_bytes_per_token: None,
    }
}

fn refused(path: &Path, model_type: String, verdict: Verdict, reason: &str) -> Report {
    Report {
        path: path.display().to_string(),
        model_type,
        verdict,
        reason: Some(reason.into()),
        moe: false,
        routed_experts: None,
        top_k: None,
        moe_layers: None,
        num_layers: None,
        shared_expert_intermediate: None,
        hidden_size: None,
        moe_intermediate_size: None,
        elements_per_expert: None,
        layout: "n/a".into(),
        key_prefix: None,
        router: None,
        attention: None,
        quantization: "n/a".into(),
        sizes: "n/a",
        bytes_per_expert: None,
        total_expert_bytes: None,
        dense_bytes: None,
        expert_bytes_per_token: None,
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |v: Option<usize>| v.map_or("-".to_string(), |v| v.to_string());
        let bytes = |v: Option<u64>| v.map_or("-".to_string(), human_bytes);
        writeln!(f, "{}", self.path)?;
        writeln!(f, "  model_type            {}", self.model_type)?;
        writeln!(
            f,
            "  verdict               {}",
            serde_json::to_value(self.verdict)
                .unwrap()
                .as_str()
                .unwrap_or("")
        )?;
        if let Some(r) = &self.reason {
            writeln!(f, "  reason                {r}")?;
        }
        if !self.moe {
            return Ok(());
        }
        writeln!(
            f,
            "  routed experts        {} per MoE layer, top-{}",
            opt(self.routed_experts),
            opt(self.top_k)
        )?;
        writeln!(
            f,
            "  MoE layers            {} of {}",
            opt(self.moe_layers),
            opt(self.num_layers)
        )?;
        writeln!(
            f,
            "  shared experts        {}",
            self.shared_expert_intermediate
                .map_or("-".into(), |i| if i == 0 {
                    "none".into()
                } else {
                    format!("intermediate {i}")
                })
        )?;
        writeln!(
            f,
            "  expert geometry       3 × {} × {} = {} elements",
            opt(self.hidden_size),
            opt(self.moe_intermediate_size),
            self.elements_per_expert.unwrap_or(0)
        )?;
        writeln!(
            f,
            "  router                {}",
            self.router.as_deref().unwrap_or("-")
        )?;
        writeln!(
            f,
            "  attention             {}",
            self.attention.as_deref().unwrap_or("-")
        )?;
        writeln!(f, "  layout                {}", self.layout)?;
        writeln!(
            f,
            "  key prefix            {}",
            self.key_prefix.as_deref().unwrap_or("-")
        )?;
        writeln!(f, "  quantization          {}", self.quantization)?;
        writeln!(f, "  sizes                 {}", self.sizes)?;
        writeln!(
            f,
            "  bytes per expert      {}",
            bytes(self.bytes_per_expert)
        )?;
        writeln!(
            f,
            "  total expert bytes    {}",
            bytes(self.total_expert_bytes)
        )?;
        writeln!(f, "  dense bytes           {}", bytes(self.dense_bytes))?;
        write!(
            f,
            "  expert bytes / token  {}",
            bytes(self.expert_bytes_per_token)
        )
    }
}

/// `gqa`, `mla`, or for a hybrid model its layer counts, e.g. `hybrid: 20 kda + 7 mla-nope`.
fn attention_label(s: &ModelSpec) -> String {
    use crate::config::LinearKind;
    let full = match &s.mla {
        Some(m) if m.rope => "mla",
        Some(_) => "mla-nope",
        None if s.hybrid.is_some() => "gated-gqa",
        None => "gqa",
    };
    let Some(h) = &s.hybrid else {
        return full.into();
    };
    let linear = s.num_layers - s.attention_layers();
    let name = match h.linear {
        LinearKind::GatedDeltaNet => "gated-deltanet",
        LinearKind::Kda => "kda",
    };
    format!("hybrid: {linear} {name} + {} {full}", s.attention_layers())
}
