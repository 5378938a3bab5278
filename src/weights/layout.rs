//! On-disk layout detection by probing tensor names: where the decoder layers live (the key
//! prefix: `model.` for most checkpoints, `language_model.model.` for Kimi-K2.5), and how routed
//! experts are stored (HF one tensor per expert and projection, or MLX stacked `switch_mlp` with
//! the expert axis first).

use crate::config::ModelSpec;
use crate::error::{Error, Result};

use super::Checkpoint;

/// Where the model's tensors live.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Prefix {
    /// Prefix of decoder layers, e.g. `model.layers.`.
    pub layers: String,
    /// Prefix of `embed_tokens` and `norm`, e.g. `model.`.
    pub model: String,
    /// Name of the output head module, e.g. `lm_head`.
    pub lm_head: String,
}

impl Prefix {
    /// `…layers.{i}.{rest}`.
    pub fn layer(&self, i: usize, rest: &str) -> String {
        format!("{}{i}.{rest}", self.layers)
    }
    /// True when the prefix differs from HF's default `model.`.
    pub fn is_nonstandard(&self) -> bool {
        self.model != "model."
    }
}

/// How routed experts are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpertLayout {
    /// `…experts.{e}.{proj}.weight` (HF hub originals).
    PerExpert,
    /// `…switch_mlp.{proj}.weight` with a leading expert axis (mlx-lm).
    Stacked,
}

/// Finds the layer prefix from the keys: the most common `X` of `X{digits}.` keys ending in
/// `layers.` whose `embed_tokens.weight` is present.
pub fn detect_prefix(ck: &Checkpoint) -> Result<Prefix> {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for key in ck.keys() {
        let mut search = 0;
        while let Some(pos) = key[search..].find("layers.") {
            let end = search + pos + "layers.".len();
            if key[end..].starts_with(|c: char| c.is_ascii_digit())
                && (end == "layers.".len() || key.as_bytes()[end - "layers.".len() - 1] == b'.')
            {
                *counts.entry(key[..end].to_string()).or_default() += 1;
                break;
            }
            search = end;
        }
    }
    let mut candidates: Vec<(usize, String)> = counts.into_iter().map(|(k, n)| (n, k)).collect();
    candidates.sort_by(|a, b| b.cmp(a));
    for (_, layers) in candidates {
        let model = layers.trim_end_matches("layers.").to_string();
        if ck.get(&format!("{model}embed_tokens.weight")).is_some() {
            let outer = model.strip_suffix("model.").unwrap_or("").to_string();
            return Ok(Prefix {
                layers,
                lm_head: format!("{outer}lm_head"),
                model,
            });
        }
    }
    Err(Error::MissingTensor {
        key: "…embed_tokens.weight".into(),
        dir: ck.dir().to_path_buf(),
        hint: " (no `<prefix>layers.<i>.…` keys with a matching `<prefix>embed_tokens.weight`: is this a language model checkpoint?)".into(),
    })
}

/// Detects the expert layout from the first MoE layer.
pub fn detect_experts(ck: &Checkpoint, spec: &ModelSpec, prefix: &Prefix) -> Result<ExpertLayout> {
    let layer = spec.moe.moe_layers[0];
    let mlp = spec.keys.mlp;
    let per = prefix.layer(
        layer,
        &format!("{mlp}.experts.0.{}.weight", spec.keys.expert_proj[0]),
    );
    let stacked = prefix.layer(
        layer,
        &format!("{}.switch_mlp.gate_proj.weight", spec.keys.stacked_mlp),
    );
    if ck.get(&per).is_some() {
        Ok(ExpertLayout::PerExpert)
    } else if ck.get(&stacked).is_some() {
        Ok(ExpertLayout::Stacked)
    } else {
        Err(Error::MissingTensor {
            key: per,
            dir: ck.dir().to_path_buf(),
            hint: format!(" (nor the MLX stacked `{stacked}`): cannot find the routed experts of MoE layer {layer}"),
        })
    }
}

/// The MoE module's name in a checkpoint of `layout` (mlx-lm renames Kimi-Linear's
/// `block_sparse_moe` to `mlp`).
pub fn moe_module(spec: &ModelSpec, layout: ExpertLayout) -> &'static str {
    match layout {
        ExpertLayout::PerExpert => spec.keys.mlp,
        ExpertLayout::Stacked => spec.keys.stacked_mlp,
    }
}
