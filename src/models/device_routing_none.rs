//! Builds without CUDA route every token on the host (see `device_routing.rs`).

use super::moe::{ExpertAccess, MoeBlock};
use super::{Model, Routing};
use crate::error::Result;
use candle_core::Tensor;

/// Nothing to hold without CUDA.
#[derive(Debug, Default)]
pub(super) struct DeviceRoutes;

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
        _next: Option<(usize, Tensor)>,
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
