//! The MoE block: router (both kinds), shared experts, and the per-token routed-expert loop that
//! resolves every selected expert through an [`ExpertAccess`] (the engine's bounded cache), so
//! experts are loaded only when a router selects them.

use std::sync::Arc;

use candle_core::Tensor;

use crate::config::{ModelSpec, RouterSpec};
use crate::error::Result;
use crate::experts::store::ExpertWeights;
use crate::experts::ExpertKey;
use crate::weights::Vb;

use super::layers::{expert_forward, rows, silu_mul, Linear, Mlp};
use crate::weights::host::HostMatrix;

mod prefill;
mod rows;

/// One token's routing decision: expert ids (in the router's top-k order) and their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Selected experts.
    pub experts: Vec<u32>,
    /// Their weights (after renormalisation and scaling).
    pub weights: Vec<f32>,
}

/// How the MoE block obtains experts: the engine implements this over its cache.
pub trait ExpertAccess {
    /// Starts the step of token `pos` at MoE `layer`: the cache decides every access of the
    /// step (the route's experts, and the router-lookahead `prediction` for the next MoE layer
    /// of this token, if lookahead is on) before any expert runs.
    fn begin_step(
        &mut self,
        layer: u32,
        pos: usize,
        route: &Route,
        prediction: Option<(u32, &[u32])>,
    ) -> Result<()>;
    /// Resolves an expert; `None` means "skip it" (skip-on-miss mode).
    fn fetch(&mut self, key: ExpertKey) -> Result<Option<std::sync::Arc<ExpertWeights>>>;
    /// Ends the step, after its experts ran.
    fn end_step(&mut self, route: &Route) -> Result<()>;
    /// Whether the caller should compute router-lookahead predictions.
    fn wants_lookahead(&self) -> bool;
    /// Every routed expert of MoE `layer`, where all are resident and the cache's state cannot
    /// depend on when a step of this layer is reported (the steps only hit): a decode token
    /// may then be routed on the device and its steps reported after it ran. `None`: not so.
    fn resident_layer(&self, _layer: u32) -> Option<&[Option<Arc<ExpertWeights>>]> {
        None
    }
    /// MoE `layer`'s expert slots, resident (`Some`) or not, and whether every miss is loaded
    /// and run (miss mode `load`): a decode token may then be routed on the device with the
    /// host answering each MoE layer's gate in turn (`models::device_routing`). `None`: not so.
    fn gated_layer(&self, _layer: u32) -> Option<&[Option<Arc<ExpertWeights>>]> {
        None
    }
    /// Whether no step of MoE `layer` can evict an expert (the budget holds all of the layer's
    /// experts): a prompt's experts may then be fetched for all its tokens before any runs.
    fn never_evicts(&self, _layer: u32) -> bool {
        false
    }
    /// Counts `steps` prompt steps whose routed experts ran expert by expert (reported in the
    /// engine's statistics, so a run shows which path it took).
    fn ran_by_expert(&mut self, _steps: usize) {}
    /// Routes replayed from a recorded trace for tokens `pos0..pos0 + n` at MoE `layer`, used
    /// instead of the router's (speed runs on random-weight checkpoints); `None`: use the router.
    fn replayed_routes(&self, _layer: u32, _pos0: usize, _n: usize) -> Result<Option<Vec<Route>>> {
        Ok(None)
    }
    /// Recorded lookahead predictions for MoE `layer` at tokens `pos0..pos0 + n`, when the
    /// replayed trace has them; `None`: predict with the router.
    fn replayed_lookahead(&self, _layer: u32, _pos0: usize, _n: usize) -> Option<Vec<Route>> {
        None
    }
}

/// A router: gate matrix plus selection rule.
#[derive(Debug)]
pub struct Router {
    gate: Linear,
    bias: Option<Vec<f32>>,
    spec: RouterSpec,
    top_k: usize,
    /// Routed experts: the gate's outputs.
    experts: usize,
}

impl Router {
    /// Loads the gate module `vb` (`weight`, and `e_score_correction_bias` for sigmoid routers:
    /// under the gate, or beside it in the MoE module `block` where mlx-lm's Kimi-Linear keeps it).
    pub fn load(vb: &Vb, block: &Vb, spec: &ModelSpec) -> Result<Self> {
        let e = spec.moe.num_experts;
        let gate = Linear::load(vb, e, spec.hidden_size, false)?;
        let bias = match spec.moe.router {
            RouterSpec::SigmoidNoauxTc { .. } => {
                let leaf = "e_score_correction_bias";
                let key = if !vb.has(leaf) && block.has(leaf) {
                    block.key(leaf)
                } else {
                    vb.key(leaf)
                };
                Some(vb.ck.f32_vec(&key, &[e])?)
            }
            _ => None,
        };
        Ok(Router {
            gate,
            bias,
            spec: spec.moe.router.clone(),
            top_k: spec.moe.top_k,
            experts: e,
        })
    }

    /// The router's logits for every row of `x` `[T, H]`, on `x`'s device.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.gate.forward(x)
    }

    /// The gate matrix `[E, H]` where it is f32 in a CUDA device's memory without a bias (what
    /// the one-launch router kernel takes).
    #[cfg(feature = "cuda")]
    pub fn device_f32(&self) -> Option<&Tensor> {
        self.gate.device_f32()
    }

    /// The selection rule as the device router kernel applies it.
    #[cfg(feature = "cuda")]
    pub fn rule(&self) -> crate::experts::upload::RouteRule {
        use crate::experts::upload::RouteRule;
        match &self.spec {
            RouterSpec::SoftmaxTopK { norm_topk_prob } => RouteRule::SoftmaxTopK {
                norm: *norm_topk_prob,
            },
            RouterSpec::TopKSoftmax => RouteRule::TopKSoftmax,
            RouterSpec::SigmoidNoauxTc {
                n_group,
                topk_group,
                norm_topk_prob,
                routed_scaling_factor,
            } => RouteRule::SigmoidGroups {
                n_group: *n_group,
                topk_group: *topk_group,
                norm: *norm_topk_prob,
                scale: *routed_scaling_factor as f32,
                bias: self.bias.clone(),
            },
        }
    }

    /// Routes every row of `x` `[T, H]`.
    pub fn route(&self, x: &Tensor) -> Result<Vec<Route>> {
        let logits = rows(&self.gate.forward(x)?)?;
        Ok(logits.iter().map(|l| self.select(l)).collect())
    }

    /// Selection rule on one token's logits, as in HF transformers.
    pub fn select(&self, logits: &[f32]) -> Route {
        let k = self.top_k;
        match &self.spec {
            RouterSpec::SoftmaxTopK { norm_topk_prob } => {
                let p = softmax(logits);
                let ids = top_k(&p, k);
                let mut w: Vec<f32> = ids.iter().map(|&i| p[i]).collect();
                if *norm_topk_prob {
                    let s: f32 = w.iter().sum();
                    w.iter_mut().for_each(|x| *x /= s);
                }
                Route {
                    experts: ids.iter().map(|&i| i as u32).collect(),
                    weights: w,
                }
            }
            RouterSpec::TopKSoftmax => {
                let p = softmax(logits);
                let ids = top_k(&p, k);
                let s: f32 = ids.iter().map(|&i| p[i]).sum();
                Route {
                    experts: ids.iter().map(|&i| i as u32).collect(),
                    weights: ids.iter().map(|&i| p[i] / s).collect(),
                }
            }
            RouterSpec::SigmoidNoauxTc {
                n_group,
                topk_group,
                norm_topk_prob,
                routed_scaling_factor,
            } => {
                let scores: Vec<f32> = logits.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
                let bias = self.bias.as_deref().unwrap_or(&[]);
                let mut choice: Vec<f32> = scores
                    .iter()
                    .enumerate()
                    .map(|(i, s)| s + bias.get(i).copied().unwrap_or(0.0))
                    .collect();
                let per = choice.len() / n_group;
                let group_scores: Vec<f32> = (0..*n_group)
                    .map(|g| {
                        let grp = &choice[g * per..(g + 1) * per];
                        top_k(grp, 2).iter().map(|&i| grp[i]).sum()
                    })
                    .collect();
                let keep = top_k(&group_scores, *topk_group);
                for g in 0..*n_group {
                    if !keep.contains(&g) {
                        // HF transformers 5 masks dropped groups with -inf (4.x used 0.0).
                        choice[g * per..(g + 1) * per]
                            .iter_mut()
                            .for_each(|c| *c = f32::NEG_INFINITY);
                    }
                }
                let ids = top_k(&choice, k);
                let mut w: Vec<f32> = ids.iter().map(|&i| scores[i]).collect();
                if *norm_topk_prob {
                    let s: f32 = w.iter().sum::<f32>() + 1e-20;
                    w.iter_mut().for_each(|x| *x /= s);
                }
                w.iter_mut()
                    .for_each(|x| *x *= *routed_scaling_factor as f32);
                Route {
                    experts: ids.iter().map(|&i| i as u32).collect(),
                    weights: w,
                }
            }
        }
    }
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// Indices of the `k` largest values, largest first (lower index first on ties).
pub fn top_k(x: &[f32], k: usize) -> Vec<usize> {
    // One pass keeping the best `k` in order (a router's k is small; a sort of every index per
    // token and layer was a visible part of the engine thread's serial work): an index goes
    // before the first kept one it beats by `total_cmp`, so among equal values the lower
    // index, seen first, stays first — the order of a stable sort by descending value.
    let k = k.min(x.len());
    let mut best: Vec<usize> = Vec::with_capacity(k + 1);
    for (i, v) in x.iter().enumerate() {
        if best.len() == k && best.last().is_none_or(|&j| v.total_cmp(&x[j]).is_le()) {
            continue;
        }
        let at = best.partition_point(|&j| v.total_cmp(&x[j]).is_le());
        best.insert(at, i);
        best.truncate(k);
    }
    best
}

/// One expert on one token. An expert held on the host (a `cpu-compute` miss of a GPU engine)
/// runs on the host: the token's activations go to the host and its output comes back.
fn run_expert(xt: &Tensor, ew: &ExpertWeights) -> Result<Tensor> {
    let host = matches!(ew.mats, crate::experts::store::ExpertMats::Host { .. });
    if host && !xt.device().is_cpu() {
        let cpu = candle_core::Device::Cpu;
        let y = expert_forward(&xt.to_device(&cpu)?, ew)?;
        return Ok(y.to_device(xt.device())?);
    }
    expert_forward(xt, ew)
}

/// A host-held expert's gate, up and down matrices.
pub(super) type HostMats<'a> = (&'a HostMatrix, &'a HostMatrix, &'a HostMatrix);

/// Every expert's matrices where all are host-held (else `None`).
pub(super) fn host_mats<'a>(
    experts: impl Iterator<Item = &'a ExpertWeights>,
) -> Option<Vec<HostMats<'a>>> {
    use crate::experts::store::ExpertMats;
    experts
        .map(|ew| match &ew.mats {
            ExpertMats::Host { gate, up, down } => Some((gate, up, down)),
            _ => None,
        })
        .collect()
}

/// Whether `n` experts run by row blocks over all the threads ([`host_experts_rows`]): a
/// decode token's where the context has more threads than experts (one expert a thread would
/// leave some idle; with fewer threads it balances as well and keeps each expert's products on
/// one thread's cache); a prompt's (`prompt`) wherever there are threads to share: their token
/// counts differ (1 to 16 a 16-token prompt's, the shared expert all of them), and one expert a
/// thread waited on the largest (16-core host: 1.14× prefill at 16 threads, ≈ 40 experts a
/// layer) and left the shared expert to three regions of its own, its quantizing and silu on
/// the engine thread alone (where the experts outnumbered the threads four to one: 2–8
/// threads). `HARNESS_EXPERT_BLOCKS=0` keeps one expert a thread, `HARNESS_PROMPT_BLOCKS=0` a
/// prompt's where threads do not outnumber them (for A/B runs).
pub(super) fn expert_blocks(n: usize, prompt: bool) -> bool {
    let threads = crate::weights::kernels::current_threads();
    expert_blocks_on() && (threads > n || (prompt && threads > 1 && prompt_blocks_on()))
}

/// Whether [`expert_blocks`] cuts a prompt's experts into blocks where they outnumber the
/// threads (`HARNESS_PROMPT_BLOCKS=0`: no, for A/B runs, which
/// the engine's kernel label then says).
pub(crate) fn prompt_blocks_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("HARNESS_PROMPT_BLOCKS").map_or(true, |v| v != "0"))
}

/// Whether [`MoeBlock`]'s decode step may run its shared expert in its routed experts' row
/// blocks (`HARNESS_HOST_MOE=0`: apart, for A/B runs, which the engine's kernel label then
/// says).
pub(crate) fn host_moe_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("HARNESS_HOST_MOE").map_or(true, |v| v != "0"))
}

/// Whether a decode token's shared expert computes its gate and up in the router's parallel
/// region and its down in the routed experts' ([`MoeBlock::route_step_rows`];
/// `HARNESS_SHARED_BY_ROUTER=0`: in regions of their own, for A/B runs, which the engine's kernel
/// label then says).
pub(crate) fn shared_by_router_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("HARNESS_SHARED_BY_ROUTER").map_or(true, |v| v != "0"))
}

/// Whether [`expert_blocks`] may say yes: not with `HARNESS_EXPERT_BLOCKS=0` (an A/B run, which
/// the engine's kernel label then says).
pub(crate) fn expert_blocks_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("HARNESS_EXPERT_BLOCKS").map_or(true, |v| v != "0"))
}

/// Experts `mats[i]` on their input rows `inputs[i]` (`T_i` rows of `H`): `[T_i, H]` each,
/// row-major, bit-identical to [`super::layers::host_expert_rows`] of each, computed in two parallel regions
/// over all the context's threads: the gate and up rows of every expert in blocks, then the down
/// rows. One expert a thread (the form before) left all but `top_k` threads idle through a
/// decode step's experts, the larger part of the step, and a prompt's experts — as many
/// tokens each as chose them — unevenly loaded. A row is computed the same way in any block,
/// so the split does not change a bit.
pub(super) fn host_experts_rows(mats: &[HostMats<'_>], inputs: &[&[f32]]) -> Vec<Vec<f32>> {
    use crate::weights::kernels::{by_product_blocks, current_threads};
    use crate::weights::QuantizedRows;
    let threads = current_threads();
    let tokens: Vec<usize> = mats
        .iter()
        .zip(inputs)
        // An input row is the hidden state: the down matrix's output size.
        .map(|(m, x)| (x.len() / m.2.rows().max(1)).max(1))
        .collect();
    // Blocks of rows of each expert, sized by its tokens: units of equal work (rows × tokens),
    // two per thread in each region for a decode step (its experts one token each: the same
    // blocks as by rows alone) and four for a prompt's (experts chosen by 1 to 16 tokens: finer
    // blocks balance them; on the 16-core host, ABBA: 16 threads prefill 1.12×, four rounds
    // 1.04–1.18×; decode with four 0.97×, with eight 0.79×; sized by rows × (tokens + c), the
    // weights' reading counted apart, was slower for every c tried, 4 to 64: the work is the
    // products), each a multiple of 16 rows (whole pairs of tiles of a tiled matrix: the
    // 512-bit kernels take two at once).
    let units = if tokens.iter().any(|&t| t > 1) { 4 } else { 2 };
    let per = |rows: &[usize]| -> Vec<usize> {
        let work: usize = rows.iter().zip(&tokens).map(|(r, t)| r * t).sum();
        let unit = work.div_ceil(units * threads);
        rows.iter()
            .zip(&tokens)
            .map(|(&r, &t)| unit.div_ceil(t).clamp(16, r.max(16)).next_multiple_of(16))
            .collect()
    };
    // Gate and up, block by block, and each block's silu(z) · u as `host_expert_rows` computes
    // it (element by element, so the same bits in any block; in the region, not after it on
    // the engine thread: a step's e^-z per gate value were a serial stretch of every layer).
    // A prompt's inputs quantized once for the int8 kernels, by the blocks of each expert that
    // need them together ([`QuantizedRows`]), shared by all its blocks (each thread quantized
    // every input it took a block of, checking each against its last ones first: on the
    // 16-core host the threads spent 7.7× the time quantizing that one thread did), where an
    // expert has several blocks; one block's input, and a decode token's (short), its thread
    // quantizes as its own (no wait on another thread, and no shared room made on one thread
    // and freed on the engine thread: a 16-token prompt's ~80 rooms, four allocations each,
    // took 12–27 µs a layer to free on the VM's engine thread).
    let once = |per: &[usize], rows: &[usize]| -> Vec<Option<QuantizedRows>> {
        (0..mats.len())
            .map(|i| (tokens[i] > 1 && rows[i] > per[i]).then(QuantizedRows::default))
            .collect()
    };
    let rows: Vec<usize> = mats.iter().map(|m| m.0.rows()).collect();
    let per_in = per(&rows);
    let q_in = once(&per_in, &rows);
    let acts = by_product_blocks(&rows, &per_in, &tokens, |i, b| {
        let (gate, up, _) = mats[i];
        let q = q_in[i].as_ref().and_then(|q| q.get(inputs[i], gate.cols()));
        gate_up_block(gate, up, b, inputs[i], q)
    });
    // Down, block by block.
    let rows: Vec<usize> = mats.iter().map(|m| m.2.rows()).collect();
    let per_acts = per(&rows);
    let q_acts = once(&per_acts, &rows);
    by_product_blocks(&rows, &per_acts, &tokens, |i, b| {
        let q = q_acts[i]
            .as_ref()
            .and_then(|q| q.get(&acts[i], mats[i].2.cols()));
        mats[i].2.matmul_range_q(b, &acts[i], q)
    })
}

/// Rows `b` of an expert's activations `silu(gate x) · up x` on its inputs `xs` (`q`: them
/// quantized, as [`crate::weights::host::HostMatrix::matmul_range_q`] takes it): what every
/// block of a gate/up region computes, the same bits as the whole product's rows.
pub(super) fn gate_up_block(
    gate: &HostMatrix,
    up: &HostMatrix,
    b: std::ops::Range<usize>,
    xs: &[f32],
    q: Option<&crate::weights::kernels::q4::QuantizedInput>,
) -> Vec<f32> {
    silu_mul(
        &gate.matmul_range_q(b.clone(), xs, q),
        &up.matmul_range_q(b, xs, q),
    )
}

/// `acc + y` in router order (the first expert's output as is).
fn add(acc: Option<Tensor>, y: Tensor) -> Result<Tensor> {
    Ok(match acc {
        Some(a) => (a + y)?,
        None => y,
    })
}

/// The routed output of one token from its experts' weighted sum `acc` (`None`: every expert
/// skipped): with skip-on-miss, the kept experts are renormalised to the full routed weight.
fn finish(acc: Option<Tensor>, kept: f32, route: &Route, xt: &Tensor) -> Result<Tensor> {
    let total: f32 = route.weights.iter().sum();
    Ok(match acc {
        Some(a) if kept < total => (a * (total / kept) as f64)?,
        Some(a) => a,
        None => xt.zeros_like()?,
    })
}

/// A token's fetched experts `(weights, router weight)` on `xt` `[1, H]`, one expert a thread
/// (side by side on the context's threads), weighted and added in router order, then
/// [`finish`]ed: the sums of the one-by-one loop.
fn experts_apart(
    xt: &Tensor,
    fetched: &[(Arc<ExpertWeights>, f32)],
    kept: f32,
    route: &Route,
) -> Result<Tensor> {
    let ys = crate::weights::kernels::par_map(fetched.len(), &|i| {
        let (ew, w) = &fetched[i];
        run_expert(xt, ew).and_then(|y| Ok((y * *w as f64)?))
    });
    let mut acc: Option<Tensor> = None;
    for y in ys? {
        acc = Some(add(acc, y?)?);
    }
    finish(acc, kept, route, xt)
}

/// A token's routed experts in the fused GPU kernels, where every one is packed on the GPU in
/// one form (`--gpu-experts fused`), with `shared` (an ungated shared expert's MLP) in the same
/// launches when its packed matrices have that form: `(output, whether shared is in it)`;
/// `None` otherwise (and always in builds without CUDA).
fn fused_experts(
    xt: &Tensor,
    fetched: &[(Arc<ExpertWeights>, f32)],
    shared: Option<&Mlp>,
) -> Result<Option<(Tensor, bool)>> {
    #[cfg(feature = "cuda")]
    {
        use crate::experts::store::ExpertMats;
        let mut list = Vec::with_capacity(fetched.len());
        let mut others = false;
        for (ew, w) in fetched {
            match &ew.mats {
                ExpertMats::DevicePacked(p) if p.fused() => list.push((p, *w)),
                _ => others = true,
            }
        }
        if others {
            // Experts asked to run fused beside experts of another form: counted.
            if !list.is_empty() {
                super::fallback::experts();
            }
            return Ok(None);
        }
        let shared = shared.and_then(Mlp::device_matrices);
        let out = crate::experts::upload::DevicePacked::forward_fused(xt, &list, shared)?;
        if out.is_none() && !list.is_empty() {
            super::fallback::experts();
        }
        Ok(out)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (xt, fetched, shared);
        Ok(None)
    }
}

/// A MoE block: router, shared experts, and routed experts resolved through [`ExpertAccess`].
#[derive(Debug)]
pub struct MoeBlock {
    /// Decoder layer index.
    pub layer: u32,
    /// The router.
    pub router: Router,
    shared: Option<Mlp>,
    /// Qwen3-Next: the shared expert's output is scaled by `sigmoid(shared_expert_gate(x))`.
    shared_gate: Option<Linear>,
}

impl MoeBlock {
    /// Loads the router and shared experts of decoder layer `layer` from the module `vb`
    /// (`…layers.{i}.mlp`).
    pub fn load(vb: &Vb, spec: &ModelSpec, layer: usize) -> Result<Self> {
        let router = Router::load(&vb.pp("gate"), vb, spec)?;
        let shared = match (spec.keys.shared, spec.moe.shared_intermediate) {
            (Some(name), Some(inter)) => Some(Mlp::load(&vb.pp(name), spec.hidden_size, inter)?),
            _ => None,
        };
        let shared_gate = match spec.family {
            crate::config::Family::Qwen3Next if shared.is_some() => Some(Linear::load(
                &vb.pp("shared_expert_gate"),
                1,
                spec.hidden_size,
                false,
            )?),
            _ => None,
        };
        Ok(MoeBlock {
            layer: layer as u32,
            router,
            shared,
            shared_gate,
        })
    }

    /// Runs the block on `x` `[T, H]` (already normalised) given its routes; `predictions[t]` is
    /// the lookahead guess for the next MoE layer (`next_layer`) of token `t`.
    pub fn forward(
        &self,
        x: &Tensor,
        pos0: usize,
        routes: &[Route],
        predictions: Option<(u32, &[Route])>,
        access: &mut dyn ExpertAccess,
    ) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
            // On the CPU the row form runs the block (a prompt expert by expert, a decode step's
            // experts together on the threads; one thread's loop comes back to
            // `forward_tensors`).
            let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let t = routes.len();
            let y = self.forward_rows(&xs, t, pos0, routes, predictions, access, None)?;
            return Ok(Tensor::from_vec(y, x.dims(), x.device())?);
        }
        self.forward_tensors(x, pos0, routes, predictions, access)
    }

    /// [`MoeBlock::forward`] by tensor ops, token by token: on a GPU (the fused kernels where
    /// the experts take them), and the CPU's one-thread loop (each expert fetched and run in
    /// turn).
    fn forward_tensors(
        &self,
        x: &Tensor,
        pos0: usize,
        routes: &[Route],
        predictions: Option<(u32, &[Route])>,
        access: &mut dyn ExpertAccess,
    ) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(routes.len());
        // A single decode token on a GPU: the shared expert may join the routed experts' fused
        // launches (HF's `routed + shared` in one sum).
        let mut shared_done = false;
        let fusable_shared = self.fusable_shared().filter(|_| routes.len() == 1);
        for (t, route) in routes.iter().enumerate() {
            let xt = x.narrow(0, t, 1)?;
            let pred = predictions.map(|(l, p)| (l, p[t].experts.as_slice()));
            access.begin_step(self.layer, pos0 + t, route, pred)?;
            let mut acc: Option<Tensor> = None;
            let mut kept = 0f32;
            let gpu = !xt.device().is_cpu();
            if gpu || crate::weights::kernels::parallel() {
                // Fetch the step's experts in router order, then compute them together: in the
                // fused kernels on a GPU, side by side on several CPU threads; either way added
                // in router order (the same sums as one by one).
                let fetched;
                (fetched, kept) = self.fetch_step(route, access)?;
                if gpu {
                    // Only with every routed expert kept (skip-on-miss rescales the routed sum).
                    let shared = fusable_shared.filter(|_| fetched.len() == route.experts.len());
                    acc = match fused_experts(&xt, &fetched, shared)? {
                        Some((y, with_shared)) => {
                            shared_done = with_shared;
                            Some(y)
                        }
                        None => {
                            let mut acc: Option<Tensor> = None;
                            for (ew, w) in &fetched {
                                let y = (run_expert(&xt, ew)? * *w as f64)?;
                                acc = Some(add(acc, y)?);
                            }
                            acc
                        }
                    };
                    access.end_step(route)?;
                    outs.push(finish(acc, kept, route, &xt)?);
                    continue;
                }
                // Several CPU threads with activations other than f32 (the row form takes
                // f32): the experts side by side.
                let y = experts_apart(&xt, &fetched, kept, route)?;
                access.end_step(route)?;
                outs.push(y);
                continue;
            }
            for (&e, &w) in route.experts.iter().zip(&route.weights) {
                let Some(ew) = access.fetch(ExpertKey {
                    layer: self.layer,
                    expert: e,
                })?
                else {
                    continue;
                };
                kept += w;
                let y = (run_expert(&xt, &ew)? * w as f64)?;
                acc = Some(add(acc, y)?);
            }
            access.end_step(route)?;
            outs.push(finish(acc, kept, route, &xt)?);
        }
        let routed = Tensor::cat(&outs, 0)?;
        self.add_shared(routed, x, shared_done)
    }

    /// The shared expert when it may join the routed experts' fused launch (an ungated one;
    /// its matrices must also be packed on the GPU: `Mlp::device_matrices`).
    pub fn fusable_shared(&self) -> Option<&Mlp> {
        match (&self.shared, &self.shared_gate) {
            (Some(s), None) => Some(s),
            _ => None,
        }
    }

    /// `routed` plus the shared expert's output on `x` (gated for Qwen3-Next), unless it is
    /// already in `routed` (`shared_done`).
    pub fn add_shared(&self, routed: Tensor, x: &Tensor, shared_done: bool) -> Result<Tensor> {
        Ok(match (&self.shared, &self.shared_gate) {
            _ if shared_done => routed,
            (Some(s), Some(g)) => {
                let gate = candle_nn::ops::sigmoid(&g.forward(x)?)?;
                (routed + s.forward(x)?.broadcast_mul(&gate)?)?
            }
            (Some(s), None) => (routed + s.forward(x)?)?,
            (None, _) => routed,
        })
    }
}

#[cfg(test)]
mod tests {
    /// `top_k` is the first `k` of a stable sort by descending value (`total_cmp`): ties to
    /// the lower index, NaNs where `total_cmp` puts them, every `k` up to past the length.
    #[test]
    fn top_k_is_the_head_of_a_stable_descending_sort() {
        let mut s = 7u64;
        for case in 0..400 {
            let n = 1 + case % 70;
            let x: Vec<f32> = (0..n)
                .map(|i| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    match (s >> 59, i % 11) {
                        (_, 3) => f32::NAN,
                        (_, 5) => -f32::NAN,
                        (0..=9, _) => ((s >> 40) % 5) as f32, // many ties
                        _ => (s >> 40) as f32 / 1e6 - 8.0,
                    }
                })
                .collect();
            let mut sorted: Vec<usize> = (0..n).collect();
            sorted.sort_by(|&a, &b| x[b].total_cmp(&x[a]));
            for k in [0, 1, 2, 4, 8, n, n + 3] {
                let want: Vec<usize> = sorted.iter().copied().take(k).collect();
                assert_eq!(super::top_k(&x, k), want, "case {case}, k {k}, {x:?}");
            }
        }
    }
}
