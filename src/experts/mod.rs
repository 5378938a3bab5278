//! Routed experts: where they live on disk (`store`), the bounded cache that holds the ones in use
//! (`cache`), and the eviction policies that decide what leaves it (`policies`).
//!
//! An expert is never a tensor owned by the model: it is an [`ExpertKey`] resolved through the
//! cache at the moment the router selects it.

pub mod cache;
pub mod loader;
pub mod policies;
pub mod store;
pub mod upload;

/// Identity of one routed expert: decoder-layer index (as in the checkpoint keys) and expert id.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertKey {
    /// Decoder layer index `i` of `model.layers.{i}`.
    pub layer: u32,
    /// Routed expert id within the layer.
    pub expert: u32,
}
