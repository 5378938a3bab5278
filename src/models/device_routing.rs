//! Decode tokens routed on the GPU (`--gpu-routing device`, the default on CUDA).
//!
//! On the host path each MoE layer of a decode token copies its router logits to the host, the
//! host chooses the experts, asks the cache for them and launches their kernels: the GPU idles
//! at every MoE layer. Where every routed expert of every MoE layer is resident in the fused
//! form (an all-resident cell), no step can miss, so the cache's state does not depend on when
//! the host learns a route: the router kernel chooses the experts on the device and writes
//! their addresses into the fused launch's table (`experts::upload::ResidentLayer`), and the
//! token's routes (and lookahead predictions) come back in one copy after its last layer, when
//! the steps are reported to the cache in layer order — the same steps, hits and trace rows as
//! the host path, with one wait per token instead of one per MoE layer.

use std::sync::MutexGuard;

use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::{Device, Tensor};

use super::layers::Mlp;
use super::moe::{ExpertAccess, MoeBlock, Route};
use super::{Ffn, Model, Routing};
use crate::error::{Error, Result};
use crate::experts::upload::ResidentLayer;
use crate::experts::ExpertKey;
use crate::weights::cuda::driver;

/// A model's device-routing state: each decoder layer's resident-expert tables and the buffer
/// of one token's routes.
#[derive(Default)]
pub(super) struct DeviceRoutes {
    layers: Vec<Option<ResidentLayer>>,
    out: Option<CudaSlice<u32>>,
    /// Counts the times a table or the routes buffer was made anew (a captured CUDA graph of
    /// a decode step wrote through the old ones).
    generation: u64,
}

impl std::fmt::Debug for DeviceRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceRoutes")
            .field("layers", &self.layers.iter().flatten().count())
            .finish()
    }
}

/// One decode token routed on the device.
pub(super) struct Session<'a> {
    state: MutexGuard<'a, DeviceRoutes>,
    k: usize,
    experts: usize,
    /// The MoE layers routed so far, in order, each with the MoE layer its lookahead predicted.
    ran: Vec<(usize, Option<usize>)>,
}

impl Model {
    /// A session for the decode token at `pos0` when it can be routed on the device: one token,
    /// a CUDA device, `--gpu-routing device`, routes not replayed from a trace, and every
    /// routed expert of every MoE layer resident in one fused form; `None` otherwise.
    pub(super) fn device_session<'a>(
        &'a self,
        n_tokens: usize,
        pos0: usize,
        access: &dyn ExpertAccess,
    ) -> Result<Option<Session<'a>>> {
        let Device::Cuda(dev) = &self.device else {
            return Ok(None);
        };
        if n_tokens != 1 || !self.device_routing() {
            return Ok(None);
        }
        let moes: Vec<(usize, &MoeBlock)> = self
            .layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match &l.ffn {
                Ffn::Moe(m) => Some((i, m)),
                Ffn::Dense(_) => None,
            })
            .collect();
        let Some(&(first, _)) = moes.first() else {
            return Ok(None);
        };
        if access.replayed_routes(first as u32, pos0, 1)?.is_some() {
            return Ok(None);
        }
        let mut state = self.device_routes.lock().unwrap_or_else(|e| e.into_inner());
        state.layers.resize_with(self.layers.len(), || None);
        for &(i, moe) in &moes {
            let Some(held) = access.resident_layer(i as u32) else {
                return Ok(None);
            };
            if state.layers[i].as_ref().is_some_and(|t| t.holds(held)) {
                continue;
            }
            // Dropping the old tables waits for the kernels that read them.
            state.layers[i] = None;
            state.generation += 1;
            let rule = moe.router.rule();
            let shared = moe.fusable_shared().and_then(Mlp::device_matrices);
            match ResidentLayer::build(held, shared, &rule, self.spec.moe.top_k)? {
                Some(t) => state.layers[i] = Some(t),
                None => return Ok(None),
            }
        }
        let k = self.spec.moe.top_k;
        let len = 4 * k * moes.len();
        if state.out.as_ref().is_none_or(|o| o.len() != len) {
            let out = dev
                .cuda_stream()
                .alloc_zeros::<u32>(len)
                .map_err(|e| driver("allocation", e))?;
            state.out = Some(out);
            state.generation += 1;
        }
        Ok(Some(Session {
            state,
            k,
            experts: self.spec.moe.num_experts,
            ran: Vec::with_capacity(moes.len()),
        }))
    }
}

impl Session<'_> {
    /// Which tables and buffers the session's launches use: equal generations, equal ones.
    pub(super) fn generation(&self) -> u64 {
        self.state.generation
    }

    /// The MoE layers routed so far, in order, each with the layer its lookahead predicted.
    pub(super) fn layers_ran(&self) -> &[(usize, Option<usize>)] {
        &self.ran
    }

    /// Counts the layers of a replayed CUDA graph as routed (what [`Session::route`] recorded
    /// when the graph was captured), so that [`Session::finish`] reports them.
    pub(super) fn replayed(&mut self, ran: &[(usize, Option<usize>)]) {
        self.ran = ran.to_vec();
    }

    /// Routes decoder layer `layer`'s MoE block on its normalised input `x` `[1, H]`; with
    /// `next`, also the lookahead prediction for MoE layer `next.0` from its router `logits`.
    pub(super) fn route(
        &mut self,
        layer: usize,
        moe: &MoeBlock,
        x: &Tensor,
        next: Option<(usize, Tensor)>,
    ) -> Result<()> {
        let (k, slot) = (self.k, self.ran.len());
        let state = &mut *self.state;
        let out = state
            .out
            .as_mut()
            .ok_or_else(|| Error::Input("internal: device routes without a buffer".into()))?;
        let missing = || Error::Input("internal: a MoE layer without device tables".into());
        let logits = moe.router.logits(x)?;
        let o = 4 * k * slot;
        let table = state.layers[layer].as_mut().ok_or_else(missing)?;
        table.route(&logits, &mut out.slice_mut(o..o + 2 * k), true)?;
        if let Some((j, logits)) = &next {
            let table = state.layers[*j].as_mut().ok_or_else(missing)?;
            table.route(logits, &mut out.slice_mut(o + 2 * k..o + 4 * k), false)?;
        }
        self.ran.push((layer, next.map(|(j, _)| j)));
        Ok(())
    }

    /// The MoE block's output on `x` `[1, H]` from the experts routed last for `layer`.
    pub(super) fn experts(&self, layer: usize, moe: &MoeBlock, x: &Tensor) -> Result<Tensor> {
        let table = self.state.layers[layer]
            .as_ref()
            .ok_or_else(|| Error::Input("internal: a MoE layer without device tables".into()))?;
        let y = table.forward(x)?;
        moe.add_shared(y, x, table.shared_in_launch())
    }

    /// The device buffer of the token's routes (what [`Session::finish_with`] reads back).
    pub(super) fn routes(&self) -> Result<&CudaSlice<u32>> {
        self.state
            .out
            .as_ref()
            .ok_or_else(|| Error::Input("internal: device routes without a buffer".into()))
    }

    /// Copies the token's routes back (the token's one wait) and reports each MoE layer's
    /// step to `access` in layer order, as the host path would have: the token's routing.
    pub(super) fn finish(self, access: &mut dyn ExpertAccess, pos0: usize) -> Result<Routing> {
        let out = self.routes()?;
        let host = out
            .stream()
            .clone_dtoh(out)
            .map_err(|e| driver("routes copy", e))?;
        self.finish_with(&host, access, pos0)
    }

    /// As [`Session::finish`] with the routes buffer already copied to the host (`host`).
    pub(super) fn finish_with(
        self,
        host: &[u32],
        access: &mut dyn ExpertAccess,
        pos0: usize,
    ) -> Result<Routing> {
        let k = self.k;
        if host.len() < 4 * k * self.ran.len() {
            return Err(Error::Input("internal: a short copy of the routes".into()));
        }
        let mut routing = Vec::with_capacity(self.ran.len());
        for (slot, &(layer, next)) in self.ran.iter().enumerate() {
            let o = 4 * k * slot;
            let ids = &host[o..o + k];
            let predicted = &host[o + 2 * k..o + 3 * k];
            if ids
                .iter()
                .chain(next.map_or(&[][..], |_| predicted))
                .any(|&e| e as usize >= self.experts)
            {
                return Err(Error::Input(format!(
                    "the router of layer {layer} chose no valid expert on the device (its \
                     logits are not finite)"
                )));
            }
            let route = Route {
                experts: ids.to_vec(),
                weights: host[o + k..o + 2 * k]
                    .iter()
                    .map(|&b| f32::from_bits(b))
                    .collect(),
            };
            let layer = layer as u32;
            let prediction = next.map(|j| (j as u32, predicted));
            access.begin_step(layer, pos0, &route, prediction)?;
            for &expert in &route.experts {
                if access.fetch(ExpertKey { layer, expert })?.is_none() {
                    return Err(Error::Input(format!(
                        "internal: layer {layer} expert {expert} ran on the device but the \
                         cache does not hold it"
                    )));
                }
            }
            access.end_step(&route)?;
            routing.push((layer, vec![route]));
        }
        super::fallback::routed_on_device();
        Ok(routing)
    }
}
