//! Routed experts: where they live on disk (`store`), the bounded cache that holds the ones in use
//! (`cache`), and the eviction policies that decide what leaves it (`policies`).
//!
//! An expert is never a tensor owned by the model: it is an [`ExpertKey`] resolved through the
//! cache at the moment the router selects it.

pub mod budget;
pub mod cache;
pub mod loader;
pub mod miss;
pub mod policies;
pub mod store;
pub mod upload;

/// Decoder layer ids at or above this are refused (tables are indexed by layer id; a trace with an
/// absurd id must be an error, not a 16 GiB allocation).
pub const MAX_LAYER_ID: u32 = 1 << 16;
/// Expert ids at or above this are refused (they would make the per-layer id maps huge).
pub const MAX_EXPERT_ID: u32 = 1 << 20;

/// Identity of one routed expert: decoder-layer index (as in the checkpoint keys) and expert id.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertKey {
    /// Decoder layer index `i` of `model.layers.{i}`.
    pub layer: u32,
    /// Routed expert id within the layer.
    pub expert: u32,
}

/// Which part of generation a step belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Processing the prompt.
    Prefill,
    /// Generating tokens one at a time.
    Decode,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Prefill => "prefill",
            Phase::Decode => "decode",
        })
    }
}

impl std::str::FromStr for Phase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "prefill" => Ok(Phase::Prefill),
            "decode" => Ok(Phase::Decode),
            other => Err(format!(
                "unknown phase `{other}`; expected prefill or decode"
            )),
        }
    }
}
