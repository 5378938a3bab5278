//! A prompt's routed experts on the CPU, one expert at a time over all the tokens that chose it.
//!
//! Per token, the MoE block runs each of its experts on that token alone: a prompt of `T`
//! tokens streams `T · k` experts' weights. Here the prompt's steps are reported to the cache in
//! token order exactly as the per-token loop reports them (same calls, same order, so the same
//! hits, misses and trace rows), then every distinct expert runs once on the rows of the tokens
//! that chose it (the packed kernels share each unpacked chunk among up to four inputs), and
//! each token's outputs are summed in its router order with the per-token loop's arithmetic: the
//! result is bit-identical to it (integration test
//! `prompt_experts_run_by_expert_give_the_token_by_token_bits`).
//!
//! Only where the layer can never evict ([`ExpertAccess::never_evicts`]): an expert fetched for
//! an early token is then still the cache's when a later token's step runs, so holding every
//! fetched expert until the group runs holds nothing beyond the budget.

use std::sync::Arc;

use candle_core::Tensor;

use crate::error::Result;
use crate::experts::store::{ExpertMats, ExpertWeights};
use crate::experts::ExpertKey;
use crate::models::layers::{expert_forward, host_expert_rows};

use super::{ExpertAccess, HostMats, Route};

/// Bytes of expert outputs a chunk of the prompt holds at once (the tokens of a chunk are
/// reported, then computed; a long prompt runs as several chunks).
const CHUNK_BYTES: usize = 8 << 20;

/// A prompt's step at a MoE layer: the layer, the first token's position, the tokens' routes
/// and any lookahead predictions (as [`super::MoeBlock::forward`] takes them).
pub(super) type Step<'a> = (u32, usize, &'a [Route], Option<(u32, &'a [Route])>);

/// One distinct expert of a chunk and the chunk tokens that chose it, in token order.
struct Group {
    weights: Arc<ExpertWeights>,
    tokens: Vec<usize>,
}

/// The routed output `[T, H]` (row-major) of the rows `xs` (normalised) for `routes`, token by token
/// through `access` and expert by expert through the kernels; `predictions` as
/// [`super::MoeBlock::forward`] takes them. With `shared` (the layer's ungated shared expert,
/// host-held) its output on every token is added to each token's routed sum (`routed +
/// shared`, [`super::MoeBlock::add_shared`]'s f32 add) in the same parallel region, and its
/// matrices join the routed experts' row blocks where those run ([`run_groups`]): two parallel
/// regions a chunk for all instead of three more for it, and its silu in them.
pub(super) fn routed_by_expert(
    (layer, pos0, routes, predictions): Step<'_>,
    xs: &[f32],
    access: &mut dyn ExpertAccess,
    shared: Option<HostMats<'_>>,
) -> Result<Vec<f32>> {
    let t_all = routes.len();
    let h = xs.len() / t_all.max(1);
    let top_k = routes
        .iter()
        .map(|r| r.experts.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let chunk = (CHUNK_BYTES / (top_k * h * 4).max(1)).max(1);
    let mut out = vec![0f32; t_all * h];
    for c0 in (0..t_all).step_by(chunk) {
        let c1 = (c0 + chunk).min(t_all);
        // The steps, in token order: (group, row in the group, weight) per kept expert.
        let mut groups: Vec<Group> = Vec::new();
        let mut picks: Vec<Vec<(usize, usize, f32)>> = Vec::with_capacity(c1 - c0);
        let mut kept = Vec::with_capacity(c1 - c0);
        for t in c0..c1 {
            let route = &routes[t];
            let pred = predictions.map(|(l, p)| (l, p[t].experts.as_slice()));
            access.begin_step(layer, pos0 + t, route, pred)?;
            let mut mine = Vec::with_capacity(route.experts.len());
            let mut k = 0f32;
            for (&e, &w) in route.experts.iter().zip(&route.weights) {
                let Some(ew) = access.fetch(ExpertKey { layer, expert: e })? else {
                    continue;
                };
                k += w;
                // By identity: a substitute or low-bit copy is a different expert's weights.
                let g = match groups.iter().position(|g| Arc::ptr_eq(&g.weights, &ew)) {
                    Some(g) => g,
                    None => {
                        groups.push(Group {
                            weights: ew,
                            tokens: Vec::new(),
                        });
                        groups.len() - 1
                    }
                };
                mine.push((g, groups[g].tokens.len(), w));
                groups[g].tokens.push(t);
            }
            access.end_step(route)?;
            picks.push(mine);
            kept.push(k);
        }
        let chunk_xs = &xs[c0 * h..c1 * h];
        let (ys, shared_ys) = run_groups(&groups, xs, h, shared.map(|m| (m, chunk_xs)))?;
        access.ran_by_expert(c1 - c0);
        // Each token's sum (and shared output) on the threads, a block of tokens each: the
        // same f32 operations per row as one after another.
        let work = (c1 - c0) * h * (top_k + 1);
        crate::weights::kernels::by_blocks(&mut out[c0 * h..c1 * h], h, work, |start, row| {
            let i = start / h;
            combine(row, &picks[i], &ys, kept[i], &routes[c0 + i]);
            if let Some(s) = &shared_ys {
                row.iter_mut()
                    .zip(&s[i * h..(i + 1) * h])
                    .for_each(|(o, s)| *o += s);
            }
        });
    }
    Ok(out)
}

/// Each group's expert on its tokens' rows of `xs`: `[tokens, H]` per group: row blocks of every
/// group's expert over all the threads ([`super::host_experts_rows`]) where all are host-held and
/// there are threads to share, else groups side by side on the context's threads (each product
/// then on its thread alone). With `shared` (an expert's matrices and its input rows), that
/// expert's output too: in the same blocks where they run, else product by product over the
/// threads ([`host_expert_rows`], [`super::Mlp::forward`]'s bits).
#[allow(clippy::type_complexity)]
fn run_groups(
    groups: &[Group],
    xs: &[f32],
    h: usize,
    shared: Option<(HostMats<'_>, &[f32])>,
) -> Result<(Vec<Vec<f32>>, Option<Vec<f32>>)> {
    // Several threads, every group host-held: row blocks of every expert over all the threads
    // at once, sized by the group's tokens.
    if super::expert_blocks(groups.len() + usize::from(shared.is_some()), true) {
        if let Some(mut mats) = super::host_mats(groups.iter().map(|g| &*g.weights)) {
            // Every group's token rows, gathered into one buffer over the threads.
            let order: Vec<usize> = groups
                .iter()
                .flat_map(|g| g.tokens.iter().copied())
                .collect();
            let all = crate::weights::kernels::gather_rows(order.len(), h, |r| {
                &xs[order[r] * h..(order[r] + 1) * h]
            });
            let mut at = 0;
            let mut inputs: Vec<&[f32]> = groups
                .iter()
                .map(|g| {
                    at += g.tokens.len() * h;
                    &all[at - g.tokens.len() * h..at]
                })
                .collect();
            if let Some((m, x)) = shared {
                mats.push(m);
                inputs.push(x);
            }
            let mut ys = super::host_experts_rows(&mats, &inputs);
            let shared_y = shared.and_then(|_| ys.pop());
            return Ok((ys, shared_y));
        }
    }
    let shared_y = shared.map(|((gate, up, down), x)| host_expert_rows(gate, up, down, x));
    let ys = crate::weights::kernels::par_map(groups.len(), &|i| run_group(&groups[i], xs, h))?
        .into_iter()
        .collect::<Result<_>>()?;
    Ok((ys, shared_y))
}

/// One group: packed host experts take all its rows in one product; any other form runs each
/// row as the per-token loop does (its multi-row product is different arithmetic).
fn run_group(g: &Group, xs: &[f32], h: usize) -> Result<Vec<f32>> {
    let rows = |t: usize| &xs[t * h..(t + 1) * h];
    if let ExpertMats::Host { gate, up, down } = &g.weights.mats {
        return Ok(host_expert_rows(gate, up, down, &gather_rows(g, xs, h)));
    }
    let mut out = Vec::with_capacity(g.tokens.len() * h);
    for &t in &g.tokens {
        let xt = Tensor::from_slice(rows(t), (1, h), &candle_core::Device::Cpu)?;
        out.extend(
            expert_forward(&xt, &g.weights)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
    }
    Ok(out)
}

/// The group's tokens' rows of `xs`, in token order.
fn gather_rows(g: &Group, xs: &[f32], h: usize) -> Vec<f32> {
    let mut input = Vec::with_capacity(g.tokens.len() * h);
    for &t in &g.tokens {
        input.extend_from_slice(&xs[t * h..(t + 1) * h]);
    }
    input
}

/// One token's routed output into `row`: its experts' outputs weighted and added in router
/// order, rescaled where skip-on-miss dropped some (zeros where it dropped all), with the same
/// f32 operations as the per-token loop's candle ops (`y · w + 0`, `a + b`, `a · s + 0`).
pub(super) fn combine(
    row: &mut [f32],
    picks: &[(usize, usize, f32)],
    ys: &[Vec<f32>],
    kept: f32,
    route: &Route,
) {
    let h = row.len();
    for (n, &(g, i, w)) in picks.iter().enumerate() {
        let y = &ys[g][i * h..(i + 1) * h];
        if n == 0 {
            for (o, v) in row.iter_mut().zip(y) {
                *o = v * w + 0.0;
            }
        } else {
            for (o, v) in row.iter_mut().zip(y) {
                *o += v * w + 0.0;
            }
        }
    }
    let total: f32 = route.weights.iter().sum();
    if !picks.is_empty() && kept < total {
        let s = total / kept; // the loop's `a * (total / kept) as f64`, back in f32 in candle
        for o in row.iter_mut() {
            *o = *o * s + 0.0;
        }
    }
}
