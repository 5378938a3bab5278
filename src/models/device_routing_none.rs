//! Builds without CUDA route every token on the host (see `device_routing.rs`).

use super::moe::{ExpertAccess, MoeBlock};
use super::{Model, Routing};
use crate::error::Result;
use candle_core::Tensor;

/// Nothing to hold without CUDA.
#[derive(Debug, Default)]
pub(super) struct DeviceRoutes;

/// The next MoE layer of a lookahead prediction (as with CUDA; never routed on the device here).
#[derive(Clone, Copy)]
#[allow(dead_code)] // built by the shared decoder, read only by the CUDA session
pub(super) struct Next<'a> {
    pub(super) layer: usize,
    pub(super) moe: &'a MoeBlock,
    pub(super) h: &'a Tensor,
    pub(super) norm: &'a super::layers::RmsNorm,
}

/// A decode token routed on the device: none without CUDA.
pub(super) struct Session<'a>(std::convert::Infallible, std::marker::PhantomData<&'a ()>);

impl Model {
    /// Always `None` without CUDA.
    pub(super) fn device_session(
        &self,
        _n_tokens: usize,
        _pos0: usize,
        _access: &dyn ExpertAccess,
        _gated: bool,
    ) -> Result<Option<Session<'_>>> {
        Ok(None)
    }
}

impl Session<'_> {
    pub(super) fn route(
        &mut self,
        _layer: usize,
        _moe: &MoeBlock,
        _x: &Tensor,
        _next: Option<Next<'_>>,
    ) -> Result<()> {
        match self.0 {}
    }

    pub(super) fn experts(&self, _layer: usize, _moe: &MoeBlock, _x: &Tensor) -> Result<Tensor> {
        match self.0 {}
    }

    pub(super) fn finish(self, _access: &mut dyn ExpertAccess, _pos0: usize) -> Result<Routing> {
        match self.0 {}
    }
}
