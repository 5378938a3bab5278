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
//!
//! Where experts may miss (a lazy cell, miss mode `load`), a token runs from a captured graph
//! too, with a gate after each MoE layer's router (`experts::upload::Gates`): the host follows
//! the step layer by layer ([`Session::serve`]), reporting each step to the cache as it is
//! posted (the same order, hits, loads and trace rows as the host path) and answering with the
//! chosen experts' addresses; the step holds those experts until it has run.

use std::sync::{Arc, MutexGuard};

use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::{Device, Tensor};

use super::layers::{Mlp, RmsNorm};
use super::moe::{ExpertAccess, MoeBlock, Route};
use super::{Ffn, Model, Routing};
use crate::error::{Error, Result};
use crate::experts::store::ExpertWeights;
use crate::experts::upload::{
    Ahead, Collector, Fill, FillHold, Gates, ResidentLayer, RouterScratch,
};
use crate::experts::ExpertKey;
use crate::weights::cuda::driver;

/// A model's device-routing state: each decoder layer's resident-expert tables and the buffer
/// of one token's routes.
#[derive(Default)]
pub(super) struct DeviceRoutes {
    layers: Vec<Option<ResidentLayer>>,
    /// Each MoE layer's gated tables (made once: they hold no expert).
    gated: Vec<Option<ResidentLayer>>,
    gates: Option<Gates>,
    /// The experts the gates of the step in flight were answered with, dropped once it ran.
    held: Vec<Arc<ExpertWeights>>,
    /// What the copies the step in flight makes itself need until it has run.
    fills: FillHold,
    out: Option<CudaSlice<u32>>,
    /// The scratch of the one-launch router (`moe_router`).
    router: Option<RouterScratch>,
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

/// The next MoE layer of a lookahead prediction ([`Session::route`]): its decoder layer, MoE
/// block, the hidden state the prediction is made from and the norm before that block.
#[derive(Clone, Copy)]
pub(super) struct Next<'a> {
    pub(super) layer: usize,
    pub(super) moe: &'a MoeBlock,
    pub(super) h: &'a Tensor,
    pub(super) norm: &'a RmsNorm,
}

/// Whether a layer's router and routes run in one launch where they can (`moe_router`);
/// `HARNESS_FUSED_ROUTER=0` keeps the cuBLAS product and one router kernel per route (for A/B
/// runs).
fn fused_router() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("HARNESS_FUSED_ROUTER").map_or(true, |v| v != "0"))
}

/// One decode token routed on the device.
pub(super) struct Session<'a> {
    state: MutexGuard<'a, DeviceRoutes>,
    k: usize,
    experts: usize,
    /// The MoE layers routed so far, in order, each with the MoE layer its lookahead predicted.
    ran: Vec<(usize, Option<usize>)>,
    /// The token's experts may miss: each MoE layer waits at a gate for the host.
    gated: bool,
}

impl Model {
    /// A session for the decode token at `pos0` when it can be routed on the device: one token,
    /// a CUDA device, `--gpu-routing device`, routes not replayed from a trace, and every
    /// routed expert of every MoE layer resident in one fused form; or, with `gated` (the step
    /// is to run from a graph whose gates the host serves), experts that may miss but load in
    /// that form. `None` otherwise.
    pub(super) fn device_session<'a>(
        &'a self,
        n_tokens: usize,
        pos0: usize,
        access: &dyn ExpertAccess,
        gated: bool,
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
        let resident = moes
            .iter()
            .all(|&(i, _)| access.resident_layer(i as u32).is_some());
        if !resident {
            // Tables of an all-resident cell before would hold its experts past their eviction.
            if state.layers.iter().any(Option::is_some) {
                state.layers.iter_mut().for_each(|l| *l = None);
                state.generation += 1;
            }
            return match gated {
                true => self.gated_session(dev, state, &moes, access),
                false => Ok(None),
            };
        }
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
        self.session_with(dev, state, moes.len(), false)
    }

    /// A session whose MoE layers wait at gates (see the module doc), where every layer has an
    /// expert resident in the fused form (whose form its gated tables keep) and the cache loads
    /// every miss; `None` otherwise.
    fn gated_session<'a>(
        &'a self,
        dev: &candle_core::CudaDevice,
        mut state: MutexGuard<'a, DeviceRoutes>,
        moes: &[(usize, &MoeBlock)],
        access: &dyn ExpertAccess,
    ) -> Result<Option<Session<'a>>> {
        // With cudarc's per-buffer events on (`HARNESS_CUDA_EVENTS=1`), freeing an expert makes
        // its copy stream wait for the compute stream, which waits at a gate for that stream.
        if dev.cuda_stream().context().is_event_tracking() {
            return Ok(None);
        }
        state.gated.resize_with(self.layers.len(), || None);
        for &(i, moe) in moes {
            let Some(held) = access.gated_layer(i as u32) else {
                return Ok(None);
            };
            if state.gated[i].is_some() {
                continue;
            }
            let Some(like) = held.iter().flatten().next() else {
                return Ok(None);
            };
            let rule = moe.router.rule();
            let shared = moe.fusable_shared().and_then(Mlp::device_matrices);
            match ResidentLayer::gated(like, held.len(), shared, &rule, self.spec.moe.top_k)? {
                Some(t) => state.gated[i] = Some(t),
                None => return Ok(None),
            }
            state.generation += 1;
        }
        if state.gates.as_ref().is_none_or(|g| g.slots() != moes.len()) {
            state.gates = Some(Gates::new(dev, moes.len())?);
            state.generation += 1;
        }
        self.session_with(dev, state, moes.len(), true)
    }

    fn session_with<'a>(
        &'a self,
        dev: &candle_core::CudaDevice,
        mut state: MutexGuard<'a, DeviceRoutes>,
        moes: usize,
        gated: bool,
    ) -> Result<Option<Session<'a>>> {
        let k = self.spec.moe.top_k;
        let len = 4 * k * moes;
        if state.out.as_ref().is_none_or(|o| o.len() != len) {
            let out = dev
                .cuda_stream()
                .alloc_zeros::<u32>(len)
                .map_err(|e| driver("allocation", e))?;
            state.out = Some(out);
            state.generation += 1;
        }
        if state.router.is_none() {
            state.router = Some(RouterScratch::new(dev)?);
            state.generation += 1;
        }
        Ok(Some(Session {
            state,
            k,
            experts: self.spec.moe.num_experts,
            ran: Vec::with_capacity(moes),
            gated,
        }))
    }
}

impl Session<'_> {
    /// Which tables and buffers the session's launches use: equal generations, equal ones.
    pub(super) fn generation(&self) -> u64 {
        self.state.generation | (u64::from(self.gated) << 63)
    }

    /// Whether the token's MoE layers wait at gates for the host ([`Session::serve`]).
    pub(super) fn gated(&self) -> bool {
        self.gated
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
    /// `next`, also the lookahead prediction for the next MoE layer from the hidden state
    /// `h` — in one launch where both routers are f32 on the device (`moe_router`), else the
    /// logits first, then the router kernel for each.
    pub(super) fn route(
        &mut self,
        layer: usize,
        moe: &MoeBlock,
        x: &Tensor,
        next: Option<Next<'_>>,
    ) -> Result<()> {
        let (k, slot) = (self.k, self.ran.len());
        let DeviceRoutes {
            layers,
            gated,
            gates,
            out,
            router,
            ..
        } = &mut *self.state;
        let out = out
            .as_mut()
            .ok_or_else(|| Error::Input("internal: device routes without a buffer".into()))?;
        let tables = if self.gated { gated } else { layers };
        let missing = || Error::Input("internal: a MoE layer without device tables".into());
        let o = 4 * k * slot;
        let words = if next.is_some() { 4 * k } else { 2 * k };
        let fused = match (moe.router.device_f32(), router.as_mut(), fused_router()) {
            (Some(w), Some(scratch), true) => {
                let mut view = out.slice_mut(o..o + words);
                match &next {
                    None => {
                        let table = tables[layer].as_mut().ok_or_else(missing)?;
                        table.route_with(w, x, None, &mut view, scratch)?
                    }
                    Some(n) => match n.moe.router.device_f32() {
                        Some(nw) if n.layer > layer => {
                            let (lo, hi) = tables.split_at_mut(n.layer);
                            let table = lo[layer].as_mut().ok_or_else(missing)?;
                            let ahead = Ahead {
                                layer: hi[0].as_ref().ok_or_else(missing)?,
                                router: nw,
                                h: n.h,
                                norm: n.norm.weight(),
                                eps: n.norm.eps(),
                            };
                            table.route_with(w, x, Some(ahead), &mut view, scratch)?
                        }
                        _ => false,
                    },
                }
            }
            _ => false,
        };
        super::fallback::router_issued(fused);
        if !fused {
            let logits = moe.router.logits(x)?;
            let table = tables[layer].as_mut().ok_or_else(missing)?;
            table.route(&logits, &mut out.slice_mut(o..o + 2 * k), true)?;
            if let Some(n) = &next {
                let logits = n.moe.router.logits(&n.norm.forward(n.h)?)?;
                let table = tables[n.layer].as_mut().ok_or_else(missing)?;
                table.route(&logits, &mut out.slice_mut(o + 2 * k..o + 4 * k), false)?;
            }
        }
        if self.gated {
            let gates = gates
                .as_mut()
                .ok_or_else(|| Error::Input("internal: a gated step without gates".into()))?;
            let table = tables[layer].as_mut().ok_or_else(missing)?;
            table.gate(gates, slot, &out.slice(o..o + words))?;
        }
        self.ran.push((layer, next.map(|n| n.layer)));
        Ok(())
    }

    /// The MoE block's output on `x` `[1, H]` from the experts routed last for `layer`.
    pub(super) fn experts(&self, layer: usize, moe: &MoeBlock, x: &Tensor) -> Result<Tensor> {
        let tables = match self.gated {
            true => &self.state.gated,
            false => &self.state.layers,
        };
        let table = tables[layer]
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
            let (route, prediction) = self.parse(layer, next, &host[o..o + 4 * k])?;
            let layer = layer as u32;
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

    /// MoE layer `layer`'s route and its lookahead prediction for layer `next` from its route
    /// words `w` (ids, weight bits, the prediction's ids).
    #[allow(clippy::type_complexity)]
    fn parse<'w>(
        &self,
        layer: usize,
        next: Option<usize>,
        w: &'w [u32],
    ) -> Result<(Route, Option<(u32, &'w [u32])>)> {
        let k = self.k;
        let (ids, predicted) = (&w[..k], &w[2 * k..3 * k]);
        if ids
            .iter()
            .chain(next.map_or(&[][..], |_| predicted))
            .any(|&e| e as usize >= self.experts)
        {
            return Err(Error::Input(format!(
                "the router of layer {layer} chose no valid expert on the device (its logits \
                 are not finite)"
            )));
        }
        let route = Route {
            experts: ids.to_vec(),
            weights: w[k..2 * k].iter().map(|&b| f32::from_bits(b)).collect(),
        };
        Ok((route, next.map(|j| (j as u32, predicted))))
    }

    /// Follows a launched gated step (see the module doc) layer by layer: waits for each MoE
    /// layer's gate to post its routes, reports the step to `access` (which loads its misses)
    /// and answers with the chosen experts' addresses; the token's routing. `alive` is asked
    /// while waiting (an error: the step failed on the device). On an error every gate not yet
    /// answered stops the step (see `experts::upload::Gates`).
    pub(super) fn serve(
        &mut self,
        access: &mut dyn ExpertAccess,
        pos0: usize,
        mut alive: impl FnMut() -> Result<()>,
    ) -> Result<Routing> {
        let _gated = crate::experts::store::GatedStep::start();
        self.gates_mut()?.next_token();
        let fills = crate::experts::upload::collect_step_fills(crate::experts::upload::MAX_FILLS);
        let mut routing = Vec::with_capacity(self.ran.len());
        for slot in 0..self.ran.len() {
            match self.serve_layer(slot, access, pos0, &mut alive, &fills) {
                Ok(route) => routing.push((self.ran[slot].0 as u32, vec![route])),
                Err(e) => {
                    self.gates_mut()?.abort_from(slot);
                    return Err(e);
                }
            }
        }
        self.state.fills = fills.finish();
        super::fallback::gate_copies(self.state.fills.experts());
        super::fallback::routed_on_device();
        Ok(routing)
    }

    fn gates_mut(&mut self) -> Result<&mut Gates> {
        self.state
            .gates
            .as_mut()
            .ok_or_else(|| Error::Input("internal: a gated step without gates".into()))
    }

    /// Gate `slot` of the step: its route, once the step is reported and the gate answered.
    fn serve_layer(
        &mut self,
        slot: usize,
        access: &mut dyn ExpertAccess,
        pos0: usize,
        alive: &mut impl FnMut() -> Result<()>,
        fills: &Collector,
    ) -> Result<Route> {
        let k = self.k;
        let (layer, next) = self.ran[slot];
        let words = if next.is_some() { 4 * k } else { 2 * k };
        let mut w = self.gates_mut()?.wait(slot, words, alive)?;
        w.resize(4 * k, 0);
        let (route, prediction) = self.parse(layer, next, &w)?;
        // The chosen experts not held as the step begins: the misses the gate may copy.
        let held = access.gated_layer(layer as u32).unwrap_or_default();
        let missing = (route.experts.iter())
            .filter(|&&e| held.get(e as usize).is_none_or(Option::is_none))
            .count();
        super::fallback::gated_misses(missing as u64);
        access.begin_step(layer as u32, pos0, &route, prediction)?;
        let mut fetched = Vec::with_capacity(k);
        for &expert in &route.experts {
            let key = ExpertKey {
                layer: layer as u32,
                expert,
            };
            fetched.push(access.fetch(key)?.ok_or_else(|| {
                Error::Input(format!(
                    "internal: layer {layer} expert {expert} was not loaded for a gated step"
                ))
            })?);
        }
        self.answer(slot, layer, &fetched, &fills.take())?;
        access.end_step(&route)?;
        Ok(route)
    }

    /// Answers gate `slot` (MoE layer `layer`) with `experts`' addresses and the copies the
    /// step makes for those the cache loaded without copying; the step holds them until it
    /// has run.
    fn answer(
        &mut self,
        slot: usize,
        layer: usize,
        experts: &[Arc<ExpertWeights>],
        fills: &[Fill],
    ) -> Result<()> {
        let entries = self.state.gated[layer]
            .as_ref()
            .ok_or_else(|| Error::Input("internal: a MoE layer without gated tables".into()))?
            .addresses(experts)?;
        self.state.held.extend(experts.iter().cloned());
        self.gates_mut()?.answer(slot, &entries, fills)
    }

    /// Drops the experts the gates of the step were answered with, once it has run, and
    /// counts the GPU time of the copies it made and where its gates' time went.
    pub(super) fn release(&mut self) {
        let state = &mut *self.state;
        if let Some(g) = state.gates.as_mut() {
            state.fills.add_ns(g.filled_ns());
            super::fallback::gate_times(&g.times());
        }
        state.fills = FillHold::default();
        state.held.clear();
    }
}
