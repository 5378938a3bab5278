//! The decoder layers on the CPU over host rows: the hidden state and each module's input and
//! output as f32 vectors (row-major `[T, H]`) from the embedding to the final norm, each module
//! in its host form (`forward_rows`), a module without one through its tensor ops on a tensor
//! of the rows. The tensor loop ([`Model::layers_forward`]) copied the hidden state out of and
//! back into a tensor at every module and ran the residual adds and a decode token's norms as
//! candle ops: serial work on the engine thread, between the parallel regions, that did not
//! shrink with threads. The same calls to the cache in the same order and the same bits as
//! the tensor loop (each host form is its tensor form's arithmetic).

use candle_core::Tensor;

use super::layers::via_tensor;
use super::moe::{ExpertAccess, MoeBlock, Route};
use super::profile::{Clock, Part};
use super::{Attn, Ffn, KvCache, LayerKv, Model, Routing};
use crate::error::Result;

/// Whether a CPU engine runs its decoder layers over host rows (`HARNESS_HOST_LAYERS=0`: the
/// tensor loop, for A/B runs, which the engine's kernel label then says).
pub(crate) fn host_layers_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("HARNESS_HOST_LAYERS").map_or(true, |v| v != "0"))
}

impl Attn {
    /// [`Attn::forward`] on the `t` rows `x` (no graph capture: the CPU).
    fn forward_rows(&self, x: &[f32], t: usize, pos0: usize, kv: &mut LayerKv) -> Result<Vec<f32>> {
        if let Attn::Gqa(a) = self {
            if let Some(y) = a.forward_rows(x, t, pos0, kv)? {
                return Ok(y);
            }
        }
        via_tensor(x, t, |xt| self.forward(xt, pos0, kv, None))
    }
}

impl Model {
    /// [`Model::layers_forward`] on the CPU over host rows: `h` is the embedded tokens `[n, H]`;
    /// returns the final norm of every row and the routing.
    pub(super) fn layers_rows(
        &self,
        mut h: Vec<f32>,
        n: usize,
        pos0: usize,
        kv: &mut KvCache,
        access: &mut dyn ExpertAccess,
        clock: &mut Option<Clock>,
    ) -> Result<(Vec<f32>, Routing)> {
        let mut routing = Vec::new();
        let lookahead = access.wants_lookahead();
        // `x` is the normalised input of the next module; each residual add and the norm after
        // it run together.
        let mut x = match self.layers.first() {
            Some(l) => l.input_norm.forward_rows(&h)?,
            None => self.norm.forward_rows(&h)?,
        };
        Clock::mark(clock, Part::Norms)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let a = layer.attn.forward_rows(&x, n, pos0, &mut kv.layers[i])?;
            Clock::mark(clock, Part::Attention)?;
            x = layer.post_norm.add_rows(&mut h, &a)?;
            Clock::mark(clock, Part::Norms)?;
            let y = match &layer.ffn {
                Ffn::Dense(mlp) => {
                    let y = mlp.forward_rows(&x, n)?;
                    Clock::mark(clock, Part::DenseMlp)?;
                    y
                }
                Ffn::Moe(moe) => {
                    let (routes, predictions, acts) =
                        self.routes_rows(i, moe, (&x, &h), pos0, n, lookahead, &*access)?;
                    Clock::mark(clock, Part::Router)?;
                    let pred_ref = predictions.as_ref().map(|(l, p)| (*l, p.as_slice()));
                    let y = moe.forward_rows(&x, n, pos0, &routes, pred_ref, access, acts)?;
                    Clock::mark(clock, Part::Experts)?;
                    routing.push((moe.layer, routes));
                    y
                }
            };
            let next_norm = match self.layers.get(i + 1) {
                Some(l) => &l.input_norm,
                None => &self.norm,
            };
            x = next_norm.add_rows(&mut h, &y)?;
            Clock::mark(clock, Part::Norms)?;
        }
        kv.len += n;
        Ok((x, routing))
    }

    /// [`Model::host_routes`] on rows (`x` the layer's normalised input, `h` the hidden
    /// state): the router's product on the host, with a decode step's shared-expert activations
    /// where they join it ([`MoeBlock::route_step_rows`]); with router lookahead, the tensor
    /// form (its two routers' logits in one product).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn routes_rows(
        &self,
        i: usize,
        moe: &MoeBlock,
        (x, h): (&[f32], &[f32]),
        pos0: usize,
        n: usize,
        lookahead: bool,
        access: &dyn ExpertAccess,
    ) -> Result<(Vec<Route>, Option<(u32, Vec<Route>)>, Option<Vec<f32>>)> {
        if lookahead && self.next_moe(i).is_some() {
            let dev = candle_core::Device::Cpu;
            let xt = Tensor::from_slice(x, (n, x.len() / n.max(1)), &dev)?;
            let ht = Tensor::from_slice(h, (n, h.len() / n.max(1)), &dev)?;
            let (routes, predictions) =
                self.host_routes(i, moe, &xt, &ht, pos0, n, lookahead, access)?;
            return Ok((routes, predictions, None));
        }
        let replayed = access.replayed_routes(moe.layer, pos0, n)?;
        let (routes, acts) = moe.route_step_rows(x, n, replayed)?;
        Ok((routes, None, acts))
    }
}
