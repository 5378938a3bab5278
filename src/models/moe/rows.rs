//! The MoE block on host rows (f32, row-major, on the CPU): what the decoder's host loop
//! ([`crate::models::Model`]'s `layers_rows`) runs, with the tensor form's calls to the cache and
//! its bits. Parts without a host form (experts not held on the host, a gated shared expert, one
//! compute thread's expert-by-expert loop) run the tensor ops on a tensor of the rows.

use std::sync::Arc;

use candle_core::Tensor;

use crate::error::Result;
use crate::experts::store::ExpertWeights;
use crate::experts::ExpertKey;
use crate::models::layers::via_tensor;

/// A step's fetched experts: each kept one's weights and router weight, in router order.
pub(super) type Fetched = Vec<(Arc<ExpertWeights>, f32)>;

use super::{
    expert_blocks, experts_apart, gate_up_block, host_experts_rows, host_mats, host_moe_on,
    prefill, shared_by_router_on, ExpertAccess, HostMats, MoeBlock, Route, Router,
};
use crate::weights::host::HostMatrix;

impl Router {
    /// [`Router::route`] of the `t` rows `xs`: the gate's product on the host, each row's
    /// selection as there.
    pub fn route_rows(&self, xs: &[f32], t: usize) -> Result<Vec<Route>> {
        let h = xs.len() / t.max(1);
        // A prompt's tokens routed a token a block over the threads, the gate's product and the
        // selection of each: the gate's 64–512 rows made few row blocks (four of 16 rows for 64
        // experts: 68 µs a layer for a 16-token prompt at 16 threads on the host, 90 at 2 on
        // the VM), and the selections ran one after another on the engine thread. A row's
        // product alone is its product among others (the kernels' contract): the same bits.
        if t > 1 && crate::weights::kernels::splits(t * h * self.experts) {
            return crate::weights::kernels::par_map(t, &|i| {
                self.gate
                    .forward_rows(&xs[i * h..(i + 1) * h], 1)
                    .map(|l| self.select(&l))
            })?
            .into_iter()
            .collect();
        }
        let logits = self.gate.forward_rows(xs, t)?;
        let e = logits.len() / t.max(1);
        Ok(logits
            .chunks_exact(e.max(1))
            .map(|l| self.select(l))
            .collect())
    }
}

impl MoeBlock {
    /// The shared expert's matrices where a decode step of `t` rows runs them beside the router
    /// and the routed experts ([`MoeBlock::route_step_rows`]): one row, an ungated shared expert
    /// of host matrices, several threads and no more than the router picks (one routed expert a
    /// thread: with more threads the experts run in row blocks, the shared expert among them).
    fn shared_by_router(&self, t: usize) -> Option<HostMats<'_>> {
        let threads = crate::weights::kernels::current_threads();
        self.fusable_shared()
            .and_then(|s| s.host_mats())
            .filter(|_| t == 1 && threads > 1 && !expert_blocks(self.router.top_k, false))
            .filter(|_| host_moe_on() && shared_by_router_on())
    }

    /// A step's routes — `replayed` (a trace's) or the router's on the `t` rows `xs` — and, for
    /// a decode step that runs its shared expert beside them ([`MoeBlock::shared_by_router`]),
    /// that expert's activations `silu(gate x) · up x`, computed in the router's parallel region
    /// (its down product then joins the routed experts' region, [`MoeBlock::forward_rows`]).
    /// Two parallel regions a step instead of four (the router's, the routed experts', the
    /// shared expert's gate and up, its down), each of which ends on the slower thread (at 2
    /// threads on the 2-core VM: ≈ +2 % decode, alternated A/B). Each row is computed as in its
    /// own product: the same routes and bits.
    pub fn route_step_rows(
        &self,
        xs: &[f32],
        t: usize,
        replayed: Option<Vec<Route>>,
    ) -> Result<(Vec<Route>, Option<Vec<f32>>)> {
        let Some((gate, up, _)) = self.shared_by_router(t) else {
            let routes = match replayed {
                Some(r) => r,
                None => self.router.route_rows(xs, t)?,
            };
            return Ok((routes, None));
        };
        let router = match replayed {
            Some(_) => None,
            None => self.router.gate.host_matrix(),
        };
        // Blocks of whole tile pairs (16 rows): the shared expert's rows in four blocks a
        // thread, the router's (64–512 rows of one matrix, not two) in one a thread.
        let threads = crate::weights::kernels::current_threads();
        let mut rows = vec![gate.rows()];
        let mut per = vec![gate.rows().div_ceil(4 * threads).next_multiple_of(16)];
        if let Some(g) = router {
            rows.push(g.rows());
            per.push(g.rows().div_ceil(threads).next_multiple_of(16));
        }
        let mut ys = crate::weights::kernels::by_product_blocks(
            &rows,
            &per,
            &vec![1; rows.len()],
            |i, b| match (i, router) {
                (0, _) => gate_up_block(gate, up, b, xs, None),
                (_, Some(g)) => g.matmul_range_q(b, xs, None),
                (_, None) => Vec::new(),
            },
        )
        .into_iter();
        let acts = ys.next().unwrap_or_default();
        let routes = match (replayed, ys.next()) {
            (Some(r), _) => r,
            (None, Some(logits)) => vec![self.router.select(&logits)],
            (None, None) => self.router.route_rows(xs, t)?,
        };
        Ok((routes, Some(acts)))
    }

    /// [`MoeBlock::forward`] on the `t` rows `xs` (normalised): the same calls to `access` in
    /// the same order and the same bits, without a tensor between the steps where the experts
    /// are host matrices. `shared_acts`: a decode step's shared-expert activations from
    /// [`MoeBlock::route_step_rows`] (its down product left to do).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_rows(
        &self,
        xs: &[f32],
        t: usize,
        pos0: usize,
        routes: &[Route],
        predictions: Option<(u32, &[Route])>,
        access: &mut dyn ExpertAccess,
        shared_acts: Option<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let acts = shared_acts.filter(|_| t == 1);
        let h = xs.len() / t.max(1);
        if t > 1 && access.never_evicts(self.layer) {
            // As `forward`: each expert once over all the tokens that chose it.
            let shared = self
                .fusable_shared()
                .and_then(|s| s.host_mats())
                .filter(|_| host_moe_on());
            let step = (self.layer, pos0, routes, predictions);
            let routed = prefill::routed_by_expert(step, xs, access, shared)?;
            return self.add_shared_rows(routed, xs, t, shared.is_some(), None);
        }
        if !crate::weights::kernels::parallel() {
            // One thread: the tensor loop fetches and runs the experts one by one.
            return via_tensor(xs, t, |x| {
                self.forward_tensors(x, pos0, routes, predictions, access)
            });
        }
        let mut out = Vec::with_capacity(xs.len());
        let mut shared_done = false;
        for (i, route) in routes.iter().enumerate() {
            let xr = &xs[i * h..(i + 1) * h];
            let pred = predictions.map(|(l, p)| (l, p[i].experts.as_slice()));
            access.begin_step(self.layer, pos0 + i, route, pred)?;
            let (fetched, kept) = self.fetch_step(route, access)?;
            match self.host_step_rows(xr, &fetched, kept, route, t == 1, acts.as_deref()) {
                Some((row, with_shared)) => {
                    shared_done = with_shared;
                    out.extend(row);
                }
                None => {
                    let xt = Tensor::from_slice(xr, (1, h), &candle_core::Device::Cpu)?;
                    let y = experts_apart(&xt, &fetched, kept, route)?;
                    out.extend(y.flatten_all()?.to_vec1::<f32>()?);
                }
            }
            access.end_step(route)?;
        }
        self.add_shared_rows(out, xs, t, shared_done, acts.as_deref())
    }

    /// The step's experts fetched in router order: `(weights, router weight)` of each kept one,
    /// and the kept experts' total router weight.
    pub(super) fn fetch_step(
        &self,
        route: &Route,
        access: &mut dyn ExpertAccess,
    ) -> Result<(Fetched, f32)> {
        let mut fetched = Vec::with_capacity(route.experts.len());
        let mut kept = 0f32;
        for (&e, &w) in route.experts.iter().zip(&route.weights) {
            let key = ExpertKey {
                layer: self.layer,
                expert: e,
            };
            if let Some(ew) = access.fetch(key)? {
                kept += w;
                fetched.push((ew, w));
            }
        }
        Ok((fetched, kept))
    }

    /// A token's routed output (`H` values) from its row `xs` where its experts are host
    /// matrices and the context has several threads: where the threads outnumber them, all of
    /// them as row blocks over the threads in two parallel regions ([`host_experts_rows`]),
    /// with `shared` (a decode token) the shared expert's matrices in the same blocks where
    /// the threads outnumber them too, its output added (`routed + shared`, as
    /// [`MoeBlock::add_shared`]); else one expert a thread, with `acts` (the shared expert's
    /// activations, [`MoeBlock::route_step_rows`]) its down product's row blocks among them.
    /// The weighted sum on the host with the candle ops' f32 arithmetic ([`prefill::combine`]).
    /// Returns whether the shared expert is in the output. The same bits as the tensor-op
    /// forms. `None`: not such a step. `HARNESS_HOST_MOE=0` keeps the shared expert apart (for
    /// A/B runs; the engine's kernel label then says so).
    pub(super) fn host_step_rows(
        &self,
        xs: &[f32],
        fetched: &[(Arc<ExpertWeights>, f32)],
        kept: f32,
        route: &Route,
        shared: bool,
        acts: Option<&[f32]>,
    ) -> Option<(Vec<f32>, bool)> {
        if crate::weights::kernels::current_threads() < 2 {
            return None;
        }
        let mut mats = host_mats(fetched.iter().map(|(ew, _)| &**ew))?;
        let picks: Vec<(usize, usize, f32)> = fetched
            .iter()
            .enumerate()
            .map(|(g, (_, w))| (g, 0, *w))
            .collect();
        let mut row = vec![0f32; xs.len()];
        if !expert_blocks(fetched.len(), false) {
            // One expert a thread, each on its thread alone (an index that did not run: the
            // caller's tensor-op form instead).
            let down = acts.and_then(|a| Some((self.fusable_shared()?.host_mats()?.2, a)));
            let (ys, shared_y) = experts_and_down(&mats, xs, down)?;
            prefill::combine(&mut row, &picks, &ys, kept, route);
            if let Some(s) = &shared_y {
                row.iter_mut().zip(s).for_each(|(o, s)| *o += s);
            }
            return Some((row, shared_y.is_some()));
        }
        // With `acts` (a step that kept fewer experts than there are threads, its misses
        // skipped), the shared expert's down product is left to `add_shared_rows`.
        let shared = self
            .fusable_shared()
            .and_then(|s| s.host_mats())
            .filter(|_| shared && acts.is_none())
            .filter(|_| host_moe_on() && expert_blocks(fetched.len() + 1, false));
        mats.extend(shared);
        let mut ys = host_experts_rows(&mats, &vec![xs; mats.len()]);
        let shared_y = shared.and_then(|_| ys.pop());
        prefill::combine(&mut row, &picks, &ys, kept, route);
        if let Some(s) = &shared_y {
            row.iter_mut().zip(s).for_each(|(o, s)| *o += s);
        }
        Some((row, shared_y.is_some()))
    }

    /// [`MoeBlock::add_shared`] on rows: `routed` plus the shared expert's output on `xs`
    /// (candle's f32 add; from `acts`, its activations, where given: the same bits), unless it
    /// is already in `routed`; a gated shared expert (Qwen3-Next) through the tensor ops.
    fn add_shared_rows(
        &self,
        mut routed: Vec<f32>,
        xs: &[f32],
        t: usize,
        shared_done: bool,
        acts: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        match (&self.shared, &self.shared_gate) {
            (None, _) => Ok(routed),
            _ if shared_done => Ok(routed),
            (Some(s), None) => {
                let down = acts.and_then(|a| Some((s.host_mats()?.2, a)));
                let y = match down {
                    Some((down, a)) => down.matmul_rows(a),
                    None => s.forward_rows(xs, t)?,
                };
                routed.iter_mut().zip(&y).for_each(|(r, y)| *r += y);
                Ok(routed)
            }
            (Some(_), Some(_)) => {
                let h = xs.len() / t.max(1);
                let r = Tensor::from_vec(routed, (t, h), &candle_core::Device::Cpu)?;
                via_tensor(xs, t, |x| self.add_shared(r, x, false))
            }
        }
    }
}

/// A decode step's outputs from [`experts_and_down`]: each routed expert's, and the shared
/// expert's where its down product ran among them.
type StepOutputs = (Vec<Vec<f32>>, Option<Vec<f32>>);

/// One part of a decode step's parallel region in [`experts_and_down`].
enum Part {
    /// A routed expert, whole.
    Expert(usize),
    /// Rows of the shared expert's down product.
    Down(std::ops::Range<usize>),
}

/// A decode token's routed experts `mats` on its row `xs`, one a thread, and with `down` the
/// shared expert's down product on its activations in row blocks beside them, in one parallel
/// region: each expert's output ([`crate::models::layers::host_expert_rows`]'s bits) and the
/// shared expert's. The pool deals its blocks as contiguous ranges, one a thread: the parts are
/// ordered so that each range holds its share of the experts and two of the down blocks (with
/// all the experts first, one thread's range would be down blocks alone: it would run out first,
/// take a whole expert from another's range, and end up to a third of an expert's time after the
/// others). `None`: a part did not run (not expected).
fn experts_and_down(
    mats: &[HostMats<'_>],
    xs: &[f32],
    down: Option<(&HostMatrix, &[f32])>,
) -> Option<StepOutputs> {
    let threads = crate::weights::kernels::current_threads().max(1);
    let (ne, rows) = (mats.len(), down.map_or(0, |(d, _)| d.rows()));
    let per = rows.div_ceil(2 * threads).next_multiple_of(16).max(16);
    let nd = rows.div_ceil(per);
    let parts: Vec<Part> = (0..threads)
        .flat_map(|k| {
            let experts = (k * ne / threads..(k + 1) * ne / threads).map(Part::Expert);
            let blocks = (k * nd / threads..(k + 1) * nd / threads)
                .map(|j| Part::Down(j * per..((j + 1) * per).min(rows)));
            experts.chain(blocks)
        })
        .collect();
    let ys = crate::weights::kernels::par_map(parts.len(), &|u| match (&parts[u], down) {
        (Part::Expert(i), _) => {
            let (gate, up, d) = mats[*i];
            crate::models::layers::host_expert_rows(gate, up, d, xs)
        }
        (Part::Down(b), Some((d, a))) => d.matmul_range_q(b.clone(), a, None),
        (Part::Down(_), None) => Vec::new(),
    })
    .ok()?;
    let mut experts: Vec<Option<Vec<f32>>> = vec![None; ne];
    let mut shared = down.map(|_| Vec::with_capacity(rows));
    // The down blocks in row order: the parts hold them in order, range by range.
    for (part, y) in parts.iter().zip(ys) {
        match part {
            Part::Expert(i) => experts[*i] = Some(y),
            Part::Down(_) => shared.as_mut()?.extend(y),
        }
    }
    Some((experts.into_iter().collect::<Option<Vec<_>>>()?, shared))
}
