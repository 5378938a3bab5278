//! A decode token's routes chosen on the GPU, for MoE layers whose routed experts are all
//! resident in the fused form (CUDA).
//!
//! On the host path every MoE layer copies its router logits to the host, so the GPU idles
//! while the host selects the experts and launches their kernels. Here `moe_route` (one warp)
//! applies the router's selection rule to the logits on the device and writes the chosen
//! experts' addresses into the layer's launch table in device memory, which the fused expert
//! kernels then read (`moe_gate_up_at`, `moe_down_at`): the host never waits inside a token.
//! (The kernel's source sits with the fused kernels', [`super::fused`], whose table it fills.)
//! The ids and weights also go to a buffer the caller copies back once per token, for the
//! cache's bookkeeping and the trace. This is only sound where every expert a router may pick
//! is resident (so the step only hits and the cache's state does not depend on when the host
//! learns the route); the caller checks that.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr,
    LaunchConfig, PushKernelArg, SyncOnDrop,
};
use candle_core::{Storage, Tensor};

use super::cuda::{driver, DevicePacked};
use super::fused::{kernels, Entries, Form, Table, MAX_EXPERTS, MAX_K};
use super::gates::Gates;
use crate::error::{Error, Result};
use crate::experts::store::{ExpertMats, ExpertWeights};
use crate::weights::cuda::{DeviceMatrix, Packed};

/// A router's selection rule as `moe_route` applies it (see `models::moe::Router::select`).
#[derive(Debug, Clone, PartialEq)]
pub enum RouteRule {
    /// Softmax, top-k of the probabilities, renormalised when `norm`.
    SoftmaxTopK {
        /// Renormalise the chosen probabilities.
        norm: bool,
    },
    /// Top-k of the logits, softmax over the chosen (Mixtral).
    TopKSoftmax,
    /// Sigmoid scores, top-k of score + bias within the best groups (DeepSeek-V3 `noaux_tc`).
    SigmoidGroups {
        /// Groups of experts.
        n_group: usize,
        /// Groups kept.
        topk_group: usize,
        /// Renormalise the chosen scores.
        norm: bool,
        /// Factor on the weights.
        scale: f32,
        /// The score correction bias, one per expert.
        bias: Option<Vec<f32>>,
    },
}

/// A route's rule and destinations as the router kernels take them (`Rule` in their source):
/// device addresses (0: none) and the rule's parameters.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Rule {
    router: u64,
    bias: u64,
    out: u64,
    table: u64,
    launch: u64,
    n: u32,
    k: u32,
    kind: u32,
    norm: u32,
    n_group: u32,
    topk_group: u32,
    scale: f32,
    pad: u32,
}

// SAFETY: plain-old-data with the C layout of the kernels' `Rule`.
unsafe impl DeviceRepr for Rule {}

/// Threads of a `moe_router` block (two router rows at a time, four warps each).
const BLOCK: u32 = 256;

/// What `moe_router` keeps between launches: the logits it computes (two layers' worth) and
/// its block counter (zero between launches: the last block returns it to 0). One a device,
/// kept while its launches (captured graphs among them) may run.
pub struct RouterScratch {
    logits: CudaSlice<f32>,
    counter: CudaSlice<u32>,
}

impl RouterScratch {
    /// The scratch on `dev`.
    pub fn new(dev: &candle_core::CudaDevice) -> Result<Self> {
        let stream = dev.cuda_stream();
        let alloc = |e| driver("router scratch allocation", e);
        Ok(RouterScratch {
            logits: stream.alloc_zeros::<f32>(2 * MAX_EXPERTS).map_err(alloc)?,
            counter: stream.alloc_zeros::<u32>(1).map_err(alloc)?,
        })
    }
}

/// The next MoE layer's predicted route, chosen in the same launch as this layer's
/// ([`ResidentLayer::route_with`]): that layer's tables (its rule), router matrix, the hidden
/// state the prediction is made from, and the RMS norm before that layer's MoE block.
pub struct Ahead<'a> {
    /// The next MoE layer's tables.
    pub layer: &'a ResidentLayer,
    /// Its router matrix `[E, H]`.
    pub router: &'a Tensor,
    /// The hidden state `[1, H]`.
    pub h: &'a Tensor,
    /// The norm's scale `[H]`.
    pub norm: &'a Tensor,
    /// The norm's epsilon.
    pub eps: f32,
}

/// The device address of `len` contiguous f32 values of a tensor's storage on `stream`'s
/// device, with its guard; `None` where it is not that.
fn f32_at<'a>(
    st: &'a Storage,
    layout: &candle_core::Layout,
    len: usize,
    stream: &'a CudaStream,
) -> Option<(u64, SyncOnDrop<'a>)> {
    let Storage::Cuda(cs) = st else {
        return None;
    };
    let s = cs.as_cuda_slice::<f32>().ok()?;
    let start = layout.start_offset();
    if !layout.is_contiguous() || layout.shape().elem_count() != len || s.len() < start + len {
        return None;
    }
    let (base, guard) = s.device_ptr(stream);
    Some((base + 4 * start as u64, guard))
}

/// One MoE layer's device routing: every routed expert resident in the fused form, with the
/// device tables `moe_route` reads (each expert's addresses) and writes (the fused launch's
/// entries); or, for a layer whose experts may miss ([`ResidentLayer::gated`]), only the
/// launch table, which the layer's gate fills with the host's answer ([`super::gates`]).
pub struct ResidentLayer {
    /// Held so their buffers outlive every kernel that reads them (see `Drop`); none for a
    /// gated layer (the caller holds the experts a step's gate was given).
    experts: Vec<Arc<ExpertWeights>>,
    /// The layer's experts.
    n: usize,
    form: Form,
    /// Each expert's addresses (not for a gated layer).
    table: Option<CudaSlice<Packed>>,
    launch: CudaSlice<Table>,
    bias: Option<CudaSlice<f32>>,
    rule: RouteRule,
    top_k: usize,
    shared: bool,
}

impl std::fmt::Debug for ResidentLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResidentLayer")
            .field("experts", &self.n)
            .field("gated", &self.table.is_none())
            .field("rule", &self.rule)
            .field("top_k", &self.top_k)
            .field("shared", &self.shared)
            .finish()
    }
}

fn packed(ew: &ExpertWeights) -> Option<&DevicePacked> {
    match &ew.mats {
        ExpertMats::DevicePacked(p) => Some(p),
        _ => None,
    }
}

impl ResidentLayer {
    /// The tables for a layer whose experts are `experts` (every one resident: `Some`), with
    /// the layer's shared expert (its gate, up and down matrices) and its router's `rule`
    /// choosing `top_k`; `None` where the device cannot route this layer: an expert missing or
    /// not in the fused form, forms that differ, more than [`MAX_K`] experts a token or
    /// [`MAX_EXPERTS`] a layer, a grouping `moe_route` does not take, or kernels that failed to
    /// compile.
    pub fn build(
        experts: &[Option<Arc<ExpertWeights>>],
        shared: Option<[&DeviceMatrix; 3]>,
        rule: &RouteRule,
        top_k: usize,
    ) -> Result<Option<Self>> {
        let Some(held) = experts.iter().cloned().collect::<Option<Vec<_>>>() else {
            return Ok(None);
        };
        let Some(list) = held.iter().map(|e| packed(e)).collect::<Option<Vec<_>>>() else {
            return Ok(None);
        };
        let Some(&first) = list.first() else {
            return Ok(None);
        };
        if !DevicePacked::fusable(first, list.iter().copied()) {
            return Ok(None);
        }
        let stream = first.dev.cuda_stream();
        // The compute stream waits for each expert's upload here, once.
        let mut addrs = Vec::with_capacity(3 * list.len());
        for p in &list {
            let (base, _read) = p.buf.device_ptr(&stream);
            addrs.extend(p.packed_at(base));
        }
        let table = stream
            .clone_htod(&addrs)
            .map_err(|e| driver("expert table upload", e))?;
        Self::with_table(
            first,
            list.len(),
            Some(table),
            held.clone(),
            shared,
            rule,
            top_k,
        )
    }

    /// The tables of a layer of `n` experts whose experts may miss: `moe_route` chooses its
    /// experts on the device, the layer's gate ([`ResidentLayer::gate`]) waits for the host to
    /// make them resident and fills the launch with their addresses. `like` is any expert of
    /// the layer in the fused form (its form is kept, not the expert); `None` where the device
    /// cannot route the layer (as [`ResidentLayer::build`]).
    pub fn gated(
        like: &ExpertWeights,
        n: usize,
        shared: Option<[&DeviceMatrix; 3]>,
        rule: &RouteRule,
        top_k: usize,
    ) -> Result<Option<Self>> {
        match packed(like) {
            Some(p) if DevicePacked::fusable(p, std::iter::empty()) => {
                Self::with_table(p, n, None, Vec::new(), shared, rule, top_k)
            }
            _ => Ok(None),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn with_table(
        first: &DevicePacked,
        n: usize,
        table: Option<CudaSlice<Packed>>,
        held: Vec<Arc<ExpertWeights>>,
        shared: Option<[&DeviceMatrix; 3]>,
        rule: &RouteRule,
        top_k: usize,
    ) -> Result<Option<Self>> {
        let groups_ok = match rule {
            RouteRule::SigmoidGroups {
                n_group,
                topk_group,
                bias,
                ..
            } => {
                (1..=64).contains(n_group)
                    && n.is_multiple_of(*n_group)
                    && (1..=*n_group).contains(topk_group)
                    && bias.as_ref().is_none_or(|b| b.len() == n)
            }
            _ => true,
        };
        if !groups_ok
            || top_k == 0
            || top_k > MAX_K.min(n)
            || n > MAX_EXPERTS
            || kernels(&first.dev).is_none()
        {
            return Ok(None);
        }
        let stream = first.dev.cuda_stream();
        let shared = first.shared_fits(shared);
        let mut entries = Table::default();
        if let Some(mats) = shared {
            let slots = [
                &mut entries.gate[top_k],
                &mut entries.up[top_k],
                &mut entries.down[top_k],
            ];
            for (slot, m) in slots.into_iter().zip(mats) {
                *slot = m.packed(&stream).0;
            }
            entries.w[top_k] = 1.0;
        }
        let launch = stream
            .clone_htod(&[entries])
            .map_err(|e| driver("launch table upload", e))?;
        let bias = match rule {
            RouteRule::SigmoidGroups { bias: Some(b), .. } => Some(
                stream
                    .clone_htod(b)
                    .map_err(|e| driver("router bias upload", e))?,
            ),
            _ => None,
        };
        Ok(Some(ResidentLayer {
            experts: held,
            n,
            form: first.form(),
            table,
            launch,
            bias,
            rule: rule.clone(),
            top_k,
            shared: shared.is_some(),
        }))
    }

    /// Whether the tables were built from exactly these resident experts.
    pub fn holds(&self, experts: &[Option<Arc<ExpertWeights>>]) -> bool {
        self.table.is_some()
            && experts.len() == self.experts.len()
            && experts
                .iter()
                .zip(&self.experts)
                .all(|(a, b)| a.as_ref().is_some_and(|a| Arc::ptr_eq(a, b)))
    }

    /// Whether the layer's shared expert runs in the fused launch.
    pub fn shared_in_launch(&self) -> bool {
        self.shared
    }

    /// This layer's rule for the router kernels, writing ids and weight bits to `out`, the
    /// logits from the router matrix at `router` (`moe_router` only); the caller sets where
    /// the fused launch's table is, for a layer with an expert table.
    fn rule(&self, router: u64, out: u64) -> Rule {
        let (kind, norm, n_group, topk_group, scale) = match &self.rule {
            RouteRule::SoftmaxTopK { norm } => (0u32, *norm, 1, 1, 1.0f32),
            RouteRule::TopKSoftmax => (1, false, 1, 1, 1.0),
            RouteRule::SigmoidGroups {
                n_group,
                topk_group,
                norm,
                scale,
                ..
            } => (2, *norm, *n_group as u32, *topk_group as u32, *scale),
        };
        let stream = self.form.dev.cuda_stream();
        // The bias and the expert table are made once with the layer and only read: their
        // addresses stay valid while it lives, and the compute stream made them.
        let bias = self.bias.as_ref().map_or(0, |b| b.device_ptr(&stream).0);
        let table = self.table.as_ref().map_or(0, |t| t.device_ptr(&stream).0);
        Rule {
            router,
            bias,
            out,
            table,
            launch: 0,
            n: self.n as u32,
            k: self.top_k as u32,
            kind,
            norm: u32::from(norm),
            n_group,
            topk_group,
            scale,
            pad: 0,
        }
    }

    /// Chooses one token's experts from its router `logits` `[1, E]` (f32, this device):
    /// ids into `out[..k]`, weight bits into `out[k..2k]`; into the fused launch's table too
    /// when `for_launch` (a lookahead prediction only needs the ids; a gated layer's launch is
    /// filled by its gate).
    pub fn route(
        &mut self,
        logits: &Tensor,
        out: &mut CudaViewMut<'_, u32>,
        for_launch: bool,
    ) -> Result<()> {
        let n = self.n;
        let f = kernels(&self.form.dev).ok_or_else(|| {
            Error::Input("internal: the router kernel is unavailable after it compiled".into())
        })?;
        if out.len() < 2 * self.top_k || logits.elem_count() != n {
            return Err(Error::Input(format!(
                "internal: router output of {} values for {n} experts, top-{}",
                logits.elem_count(),
                self.top_k
            )));
        }
        let logits = logits.contiguous()?;
        let stream = self.form.dev.cuda_stream();
        let (st, layout) = logits.storage_and_layout();
        let Some((lp, _lg)) = f32_at(&st, layout, n, &stream) else {
            return Err(Error::Input(
                "internal: router logits are not f32 on the GPU".into(),
            ));
        };
        let (op, _og) = out.device_ptr_mut(&stream);
        let mut rule = self.rule(0, op);
        let (tp, _tg) = self.launch.device_ptr_mut(&stream);
        if for_launch && rule.table != 0 {
            rule.launch = tp;
        }
        let mut b = stream.launch_builder(f.route);
        b.arg(&lp).arg(&rule);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: (8 * n) as u32,
        };
        // SAFETY: one warp reads the `n` logits and (kind 2) `n` biases, keeps two `n`-float
        // arrays in the shared memory sized for them, reads table entries of the ids it chose
        // (< n, 3 each), writes `2k` values of `out` (checked above) and entries below k ≤ 16
        // of the launch table.
        unsafe { b.launch(cfg) }.map_err(|e| driver("router kernel", e))?;
        Ok(())
    }

    /// The layer's router and route in one launch (`moe_router`): the router matrix `router`
    /// `[E, H]` times `x` `[1, H]`, this layer's route into `out[..2k]` (and the launch table,
    /// as [`ResidentLayer::route`] with `for_launch`), and with `ahead` the next MoE layer's
    /// router on the RMS norm of its hidden state and that layer's route into `out[2k..4k]`.
    /// `false`, launching nothing, where a router or an input is not f32 in this device's
    /// memory (the caller then computes the logits and calls [`ResidentLayer::route`]).
    pub fn route_with(
        &mut self,
        router: &Tensor,
        x: &Tensor,
        ahead: Option<Ahead<'_>>,
        out: &mut CudaViewMut<'_, u32>,
        scratch: &mut RouterScratch,
    ) -> Result<bool> {
        let Some(f) = kernels(&self.form.dev) else {
            return Ok(false);
        };
        let (n, k) = (self.n, self.top_k);
        let cols = x.elem_count();
        let rows = n + ahead.as_ref().map_or(0, |a| a.layer.n);
        let words = if ahead.is_some() { 4 * k } else { 2 * k };
        if out.len() < words
            || router.dims() != [n, cols]
            || rows > scratch.logits.len()
            || ahead.as_ref().is_some_and(|a| {
                a.layer.top_k != k
                    || a.router.dims() != [a.layer.n, cols]
                    || a.h.elem_count() != cols
                    || a.norm.elem_count() != cols
            })
        {
            return Ok(false);
        }
        let stream = self.form.dev.cuda_stream();
        let (sw, lw) = router.storage_and_layout();
        let (sx, lx) = x.storage_and_layout();
        let Some(((wp, _wg), (xp, _xg))) =
            f32_at(&sw, lw, n * cols, &stream).zip(f32_at(&sx, lx, cols, &stream))
        else {
            return Ok(false);
        };
        let guards = ahead.as_ref().map(|a| {
            (
                a.router.storage_and_layout(),
                a.h.storage_and_layout(),
                a.norm.storage_and_layout(),
            )
        });
        let next = match (&ahead, &guards) {
            (Some(a), Some(((sr, lr), (sh, lh), (sg, lg)))) => {
                let ptrs = f32_at(sr, lr, a.layer.n * cols, &stream)
                    .zip(f32_at(sh, lh, cols, &stream))
                    .zip(f32_at(sg, lg, cols, &stream));
                let Some((((rp, rg), (hp, hg)), (gp, gg))) = ptrs else {
                    return Ok(false);
                };
                Some((a, rp, hp, gp, [rg, hg, gg]))
            }
            _ => None,
        };
        let (op, _og) = out.device_ptr_mut(&stream);
        let mut a = self.rule(wp, op);
        let (tp, _tg) = self.launch.device_ptr_mut(&stream);
        if a.table != 0 {
            a.launch = tp;
        }
        let (b, two, hp, gp, eps) = match &next {
            Some((ah, rp, hp, gp, _)) => {
                let b = ah.layer.rule(*rp, op + 4 * 2 * k as u64);
                (b, 1u32, *hp, *gp, ah.eps)
            }
            None => (Rule::default(), 0, 0, 0, 0.0),
        };
        let cols_u = cols as u32;
        let aligned = |p: u64| p.is_multiple_of(16);
        let vec = u32::from(
            cols.is_multiple_of(4)
                && [wp, xp].into_iter().all(aligned)
                && next
                    .as_ref()
                    .is_none_or(|(_, rp, hp, gp, _)| [*rp, *hp, *gp].into_iter().all(aligned)),
        );
        // Two rows a block (the grid strides past 2048 rows).
        let blocks = (rows as u32).div_ceil(2).clamp(1, 1024);
        let (lp, _lg) = scratch.logits.device_ptr_mut(&stream);
        let (cp, _cg) = scratch.counter.device_ptr_mut(&stream);
        let mut l = stream.launch_builder(f.router);
        l.arg(&a)
            .arg(&b)
            .arg(&two)
            .arg(&xp)
            .arg(&hp)
            .arg(&gp)
            .arg(&eps);
        l.arg(&cols_u).arg(&vec).arg(&lp).arg(&cp);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: (8 * rows) as u32,
        };
        // SAFETY: the grid reads `rows` router rows of `cols` floats (both matrices checked
        // `[n, cols]` above) and `cols` floats of `x`, `h` and the norm's scale, writes `rows`
        // floats of the scratch (checked) and one counter; its last block keeps 2·rows floats
        // in the shared memory sized for them and writes `words` values of `out` (checked) and
        // entries below k ≤ 16 of the launch table, reading table entries of ids < n.
        unsafe { l.launch(cfg) }.map_err(|e| driver("router kernel", e))?;
        Ok(true)
    }

    /// The routed experts `moe_route` chose last for this layer (and the shared expert when
    /// it is in the launch) on `x` `[1, H]`, in the two fused launches.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let entries = self.top_k + usize::from(self.shared);
        self.form
            .launch_fused(x, entries, Entries::Device(&self.launch))?
            .ok_or_else(|| {
                Error::Input("internal: the fused expert kernels are unavailable".into())
            })
    }
}

impl ResidentLayer {
    /// Queues a gated layer's gate as MoE slot `slot` of `gates`: it publishes the route words
    /// `out` (`moe_route`'s ids and weights, then any prediction's) and fills the launch with
    /// the host's answer.
    pub fn gate(&mut self, gates: &mut Gates, slot: usize, out: &CudaView<'_, u32>) -> Result<()> {
        if self.table.is_some() {
            return Err(Error::Input("internal: a gate on a resident layer".into()));
        }
        gates.launch(&self.form.dev, slot, out, self.top_k, &mut self.launch)
    }

    /// The addresses a gated layer's gate is answered with for `experts` (router order): each
    /// must be in the layer's fused form (the caller keeps them until the step has run).
    pub fn addresses(&self, experts: &[Arc<ExpertWeights>]) -> Result<Vec<[Packed; 3]>> {
        let stream = self.form.dev.cuda_stream();
        experts
            .iter()
            .map(|e| match packed(e) {
                Some(p) if self.form.holds(p) => Ok(p.packed_at(p.buf.device_ptr(&stream).0)),
                _ => Err(Error::Input(
                    "a graph step with gates was given an expert that is not on the GPU in its \
                     layer's fused form"
                        .into(),
                )),
            })
            .collect()
    }
}

impl Drop for ResidentLayer {
    fn drop(&mut self) {
        // Kernels queued on the compute stream read these experts' buffers through the table
        // without recording it: they finish before the experts can be freed.
        let _ = self.launch.stream().synchronize();
    }
}
