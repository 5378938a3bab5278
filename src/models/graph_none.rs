//! Builds without CUDA run every decode step uncaptured (see `graph.rs`).

use candle_core::Tensor;

use super::moe::ExpertAccess;
use super::{KvCache, Model, Routing};
use crate::error::Result;

/// Nothing to hold without CUDA.
#[derive(Debug, Default)]
pub(super) struct Graphs;

impl Model {
    /// Always `None` without CUDA.
    pub(super) fn decode_graphed(
        &self,
        _tokens: &[u32],
        _kv: &mut KvCache,
        _access: &mut dyn ExpertAccess,
    ) -> Result<Option<(Tensor, Routing)>> {
        Ok(None)
    }

    /// Always `None` without CUDA.
    pub(super) fn greedy_graphed(
        &self,
        _token: u32,
        _kv: &mut KvCache,
        _access: &mut dyn ExpertAccess,
        _ahead: bool,
    ) -> Result<Option<(u32, Routing)>> {
        Ok(None)
    }
}
