//! One forward call through the cache ([`Access`]), and loading every expert (the
//! all-resident state).

use super::access::Access;
use candle_core::Tensor;

use super::{kernels, rows, Engine, KvCache, Routing, Sampler};
use crate::error::{Error, Result};
use crate::experts::budget::Budget;
use crate::experts::cache::StepOutcome;
use crate::experts::{ExpertKey, Phase};
use crate::models::layers::greedy_token;
use crate::models::Model;

impl Engine {
    /// One forward call over `tokens` after what `kv` holds.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        kv: &mut KvCache,
        step: u32,
        last_only: bool,
    ) -> Result<(Vec<Vec<f32>>, Routing)> {
        let (logits, routing) = self.forward_tensor(tokens, kv, step, last_only)?;
        Ok((rows(&logits)?, routing))
    }

    /// As [`Engine::forward`] with the logits left where they were computed.
    fn forward_tensor(
        &mut self,
        tokens: &[u32],
        kv: &mut KvCache,
        step: u32,
        last_only: bool,
    ) -> Result<(Tensor, Routing)> {
        let record = self.cfg.record_trace;
        self.with_access(step, record, |model, access| {
            model.forward(tokens, kv, access, last_only)
        })
    }

    /// The token sampled after `tokens` (forward step `step`, last position only), and its
    /// logits when `keep`. A greedy sampler whose logits are not kept takes the argmax where the
    /// logits are (on a GPU only the index comes back; a decode step run from a CUDA graph picks
    /// it inside the graph, and with `more` — another step follows unless this token stops the
    /// sequence — queues the next step's launch before reading this one's); every other case
    /// samples on the host.
    pub(super) fn next_token(
        &mut self,
        tokens: &[u32],
        kv: &mut KvCache,
        step: u32,
        sampler: &mut Sampler,
        keep: bool,
        more: bool,
    ) -> Result<(u32, Option<Vec<f32>>)> {
        // Only a CUDA model runs decode steps from a graph: elsewhere the attempt would cost a
        // round trip through the compute context every token for nothing.
        let graphs = self.model.device().is_cuda();
        if let (true, true, false, &[t]) = (graphs, sampler.is_greedy(), keep, tokens) {
            let record = self.cfg.record_trace;
            let graphed = self.with_access(step, record, |model, access| {
                model.decode_greedy(t, kv, access, more)
            })?;
            if let Some((next, _)) = graphed {
                return Ok((next, None));
            }
        }
        let (logits, _) = self.forward_tensor(tokens, kv, step, true)?;
        if sampler.is_greedy() && !keep {
            return Ok((greedy_token(&logits)?, None));
        }
        let mut rows = rows(&logits)?;
        let row = rows
            .pop()
            .ok_or_else(|| Error::Input("internal: no logits row".into()))?;
        Ok((sampler.sample(&row), keep.then_some(row)))
    }

    /// Runs `f` with the model and the cache's [`Access`] for forward step `step` (0: the
    /// prefill), writing trace rows when `record`. On the CPU it runs in the compute context
    /// (kernels, threads); a GPU's calls stay on this thread, where its CUDA context is current.
    fn with_access<R: Send>(
        &mut self,
        step: u32,
        record: bool,
        f: impl FnOnce(&Model, &mut Access<'_>) -> Result<R> + Send,
    ) -> Result<R> {
        let phase = if step == 0 {
            Phase::Prefill
        } else {
            Phase::Decode
        };
        let Engine {
            model,
            store,
            loader,
            core,
            payload,
            cfg,
            trace,
            load_time,
            by_expert,
            prompt,
            replay,
            low,
            compute,
            ..
        } = self;
        let mut access = Access {
            store,
            low: low.as_ref().map(|(_, s)| &**s),
            loader,
            core,
            payload,
            cfg,
            trace: record.then_some(trace),
            load_time,
            by_expert,
            prompt: *prompt,
            step,
            phase,
            replay: replay.as_ref(),
            cur: None,
            pending: Vec::new(),
            outcome: StepOutcome::default(),
        };
        if model.device().is_cpu() {
            kernels::with(compute, || f(model, &mut access))
        } else {
            f(model, &mut access)
        }
    }

    /// Loads every routed expert of the model into the cache, as prefill steps that choose all
    /// experts of a layer (not traced): the all-resident state, in which a GPU routes decode
    /// tokens on the device. Needs an unlimited budget.
    pub fn load_all_experts(&mut self) -> Result<()> {
        if self.cfg.budget != Budget::Unlimited {
            return Err(Error::Input(format!(
                "loading every expert needs an unlimited cache budget, not {:?} (drop \
                 --capacity / --budget)",
                self.cfg.budget
            )));
        }
        let n = self.model.spec.moe.num_experts;
        use crate::models::moe::{ExpertAccess, Route};
        let route = Route {
            experts: (0..n as u32).collect(),
            weights: vec![1.0 / n as f32; n],
        };
        let layers = self.model.spec.moe.moe_layers.clone();
        self.with_access(0, false, |_, access| {
            for &l in &layers {
                let layer = l as u32;
                access.begin_step(layer, 0, &route, None)?;
                for &expert in &route.experts {
                    access.fetch(ExpertKey { layer, expert })?;
                }
                access.end_step(&route)?;
            }
            Ok(())
        })
    }
}
