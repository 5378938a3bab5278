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
    expert_blocks, experts_apart, host_experts_rows, host_mats, host_moe_on, prefill, ExpertAccess,
    MoeBlock, Route, Router,
};

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
    /// [`MoeBlock::forward`] on the `t` rows `xs` (normalised): the same calls to `access` in
    /// the same order and the same bits, without a tensor between the steps where the experts
    /// are host matrices.
    pub fn forward_rows(
        &self,
        xs: &[f32],
        t: usize,
        pos0: usize,
        routes: &[Route],
        predictions: Option<(u32, &[Route])>,
        access: &mut dyn ExpertAccess,
    ) -> Result<Vec<f32>> {
        let h = xs.len() / t.max(1);
        if t > 1 && access.never_evicts(self.layer) {
            // As `forward`: each expert once over all the tokens that chose it.
            let shared = self
                .fusable_shared()
                .and_then(|s| s.host_mats())
                .filter(|_| host_moe_on());
            let step = (self.layer, pos0, routes, predictions);
            let routed = prefill::routed_by_expert(step, xs, access, shared)?;
            return self.add_shared_rows(routed, xs, t, shared.is_some());
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
            match self.host_step_rows(xr, &fetched, kept, route, t == 1) {
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
        self.add_shared_rows(out, xs, t, shared_done)
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
    /// [`MoeBlock::add_shared`]); else one expert a thread. The weighted sum on the host with
    /// the candle ops' f32 arithmetic ([`prefill::combine`]). Returns whether the shared expert
    /// is in the output. The same bits as the tensor-op forms. `None`: not such a step.
    /// `HARNESS_HOST_MOE=0` keeps the shared expert apart (for A/B runs; the engine's kernel
    /// label then says so).
    pub(super) fn host_step_rows(
        &self,
        xs: &[f32],
        fetched: &[(Arc<ExpertWeights>, f32)],
        kept: f32,
        route: &Route,
        shared: bool,
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
            let ys: Vec<Vec<f32>> = crate::weights::kernels::par_map(mats.len(), &|i| {
                let (gate, up, down) = mats[i];
                crate::models::layers::host_expert_rows(gate, up, down, xs)
            })
            .ok()?;
            prefill::combine(&mut row, &picks, &ys, kept, route);
            return Some((row, false));
        }
        let shared = self
            .fusable_shared()
            .and_then(|s| s.host_mats())
            .filter(|_| shared && host_moe_on() && expert_blocks(fetched.len() + 1, false));
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
    /// (candle's f32 add), unless it is already in `routed`; a gated shared expert (Qwen3-Next)
    /// through the tensor ops.
    fn add_shared_rows(
        &self,
        mut routed: Vec<f32>,
        xs: &[f32],
        t: usize,
        shared_done: bool,
    ) -> Result<Vec<f32>> {
        match (&self.shared, &self.shared_gate) {
            (None, _) => Ok(routed),
            _ if shared_done => Ok(routed),
            (Some(s), None) => {
                let y = s.forward_rows(xs, t)?;
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
