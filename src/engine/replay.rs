//! Replayed routing: the routes (and lookahead predictions) of a recorded trace, used by the
//! engine instead of its router's, so a random-weight checkpoint of a real model's shape gets that
//! model's expert traffic.

use crate::config::ModelSpec;
use crate::error::{Error, Result};
use crate::experts::Phase;
use crate::models::moe::Route;
use crate::trace::TraceRow;

/// Routing of one recorded prompt, replayed instead of the router's (for speed runs on
/// random-weight checkpoints, whose own routing is unrealistic): the engine runs the same
/// numbers of prefill and decode tokens and, at every MoE layer, uses the recorded experts (and
/// the recorded lookahead predictions where the trace has them). Token ids and logits are then
/// meaningless; expert traffic is the recorded model's.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    /// By (position, layer): the route and the recorded lookahead prediction.
    routes: std::collections::HashMap<(u32, u32), ReplayedStep>,
    /// Prompt (prefill) length.
    pub prompt_len: usize,
    /// Tokens to generate (decode steps + 1).
    pub new_tokens: usize,
}

impl Replay {
    /// One replay per prompt of `rows` (in prompt order), checked against `spec`: MoE layers,
    /// expert ids, top-k, and contiguous positions.
    pub fn from_rows(rows: &[TraceRow], spec: &ModelSpec) -> Result<Vec<Replay>> {
        let mut by_prompt: std::collections::BTreeMap<u32, Replay> = Default::default();
        let k = spec.moe.top_k;
        for (i, r) in rows.iter().enumerate() {
            let bad = |m: String| Error::Input(format!("replayed trace row {i}: {m}"));
            if !spec.is_moe_layer(r.layer as usize) {
                return Err(bad(format!(
                    "layer {} is not a MoE layer of this model",
                    r.layer
                )));
            }
            if r.experts.len() != k {
                return Err(bad(format!(
                    "{} experts, but this model routes top-{k}",
                    r.experts.len()
                )));
            }
            let n = spec.moe.num_experts as u32;
            let ids = r.experts.iter().chain(r.lookahead.iter().flatten());
            if let Some(e) = ids.copied().find(|&e| e >= n) {
                return Err(bad(format!("expert {e} ≥ num_experts = {n}")));
            }
            let weights = if r.weights.len() == k {
                r.weights.clone()
            } else {
                vec![1.0 / k as f32; k]
            };
            let rep = by_prompt.entry(r.prompt).or_default();
            match r.phase {
                Phase::Prefill => rep.prompt_len = rep.prompt_len.max(r.pos as usize + 1),
                Phase::Decode => rep.new_tokens = rep.new_tokens.max(r.step as usize + 1),
            }
            let route = Route {
                experts: r.experts.clone(),
                weights,
            };
            rep.routes
                .insert((r.pos, r.layer), (route, r.lookahead.clone()));
        }
        let layers = spec.num_moe_layers();
        by_prompt
            .into_iter()
            .map(|(p, mut rep)| {
                rep.new_tokens = rep.new_tokens.max(1);
                let want = (rep.prompt_len + rep.new_tokens - 1) * layers;
                if rep.prompt_len == 0 || rep.routes.len() != want {
                    return Err(Error::Input(format!(
                        "replayed trace, prompt {p}: {} rows for {} prefill and {} decode positions × {layers} MoE layers (expected {want}, positions 0.. with no gaps)",
                        rep.routes.len(),
                        rep.prompt_len,
                        rep.new_tokens - 1
                    )));
                }
                Ok(rep)
            })
            .collect()
    }

    /// The recorded routes of tokens `pos0..pos0 + n` at MoE `layer`.
    pub fn routes(&self, layer: u32, pos0: usize, n: usize) -> Result<Vec<Route>> {
        (pos0..pos0 + n)
            .map(|p| {
                self.routes
                    .get(&(p as u32, layer))
                    .map(|(r, _)| r.clone())
                    .ok_or_else(|| {
                        Error::Input(format!(
                            "replayed trace has no route for position {p} at layer {layer}"
                        ))
                    })
            })
            .collect()
    }

    /// The recorded lookahead predictions for MoE `layer` at tokens `pos0..pos0 + n`, when the
    /// trace has them all (uniform weights: only the experts matter to the cache).
    pub fn lookahead(&self, layer: u32, pos0: usize, n: usize) -> Option<Vec<Route>> {
        (pos0..pos0 + n)
            .map(|p| {
                let experts = self.routes.get(&(p as u32, layer))?.1.clone()?;
                let w = 1.0 / experts.len().max(1) as f32;
                Some(Route {
                    weights: vec![w; experts.len()],
                    experts,
                })
            })
            .collect()
    }
}

/// A replayed step: the route, and the lookahead prediction recorded for it.
type ReplayedStep = (Route, Option<Vec<u32>>);
