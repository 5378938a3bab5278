//! The engine side of [`ExpertAccess`]: every step goes through [`CacheCore::step`] (the one step
//! protocol the simulator replays), and this module only acts on its outcome — frees evicted
//! payloads, loads misses (inline or on loader threads), starts prefetch loads once the step's
//! experts have run, and writes the step's trace row.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::experts::cache::{CacheCore, Step, StepOutcome};
use crate::experts::loader::Loader;
use crate::experts::miss::MissAction;
use crate::experts::store::{ExpertStore, ExpertWeights};
use crate::experts::{ExpertKey, Phase};
use crate::models::moe::{ExpertAccess, Route};
use crate::trace::TraceRow;

use super::replay::Replay;
use super::EngineConfig;

/// Resolves experts through the cache for one forward call.
pub(super) struct Access<'a> {
    pub(super) store: &'a ExpertStore,
    /// The low-precision copy (`low-bit` misses).
    pub(super) low: Option<&'a ExpertStore>,
    pub(super) loader: &'a mut Loader,
    pub(super) core: &'a mut CacheCore,
    pub(super) payload: &'a mut [Vec<Option<Arc<ExpertWeights>>>],
    pub(super) cfg: &'a EngineConfig,
    pub(super) trace: Option<&'a mut Vec<TraceRow>>,
    /// Engine-thread load time: prefill, decode.
    pub(super) load_time: &'a mut [Duration; 2],
    /// Prompt steps run expert by expert.
    pub(super) by_expert: &'a mut u64,
    pub(super) prompt: u32,
    pub(super) step: u32,
    pub(super) phase: Phase,
    pub(super) replay: Option<&'a Replay>,
    /// The open step.
    pub(super) cur: Option<Current>,
    /// Lookahead predictions made for (pos, layer), waiting for that step's trace row.
    pub(super) pending: Vec<(u32, u32, Vec<u32>)>,
    /// Reused outcome buffer.
    pub(super) outcome: StepOutcome,
}

/// The open step.
pub(super) struct Current {
    layer: u32,
    pos: u32,
    hits: Vec<bool>,
    /// Experts of this step that missed, with what the token runs for each.
    missed: Vec<(u32, MissAction)>,
    /// Misses whose loads start once the step's experts ran (every mode but `load`).
    deferred: Vec<ExpertKey>,
    /// Prefetches to start once the step's experts ran.
    prefetch: Vec<ExpertKey>,
    load_ns: u64,
}

impl Access<'_> {
    /// Charges `ns` of engine-thread load time to the current step.
    fn charge(&mut self, ns: u64) {
        self.load_time[usize::from(self.phase == Phase::Decode)] += Duration::from_nanos(ns);
        if let Some(c) = self.cur.as_mut() {
            c.load_ns += ns;
        }
    }

    /// Starts loading `key` (inline or on a loader thread; on this thread when `here`).
    fn submit(&mut self, key: ExpertKey, prefetch: bool, here: bool) -> Result<()> {
        if self.payload[key.layer as usize][key.expert as usize].is_none() && !self.loader.has(key)
        {
            let ns = if here {
                self.loader.load_here(key)?
            } else {
                self.loader.submit(key, prefetch)?
            };
            self.charge(ns);
        }
        Ok(())
    }
}

impl ExpertAccess for Access<'_> {
    fn begin_step(
        &mut self,
        layer: u32,
        pos: usize,
        route: &Route,
        prediction: Option<(u32, &[u32])>,
    ) -> Result<()> {
        let step = Step {
            layer,
            phase: self.phase,
            experts: &route.experts,
            prediction,
            weights: &route.weights,
            request: self.prompt,
        };
        let store = self.store;
        self.core.step(
            &step,
            |k| store.expert_bytes(k),
            |_, _| u64::MAX,
            &mut self.outcome,
        )?;
        if let Some((next, experts)) = prediction {
            if self.phase == Phase::Decode && self.cfg.policy.prefetch() {
                self.pending.push((pos as u32, next, experts.to_vec()));
            }
        }
        let out = std::mem::take(&mut self.outcome);
        for &k in &out.evicted {
            self.payload[k.layer as usize][k.expert as usize] = None;
            self.loader.cancel(k);
        }
        let mut deferred = Vec::new();
        // All misses of the step are known up front, so they load in parallel: the loader
        // threads take all but the last, which this thread loads meanwhile (the step waits for
        // every one of them, and a step's only miss then costs no thread hand-off). Where misses
        // are copied straight from registered mappings there is no read to overlap, only one
        // link that parallel copies share, so this thread copies them all (no slower in an
        // alternated A/B, faster at high hit rates: docs/performance.md); loader threads then
        // serve prefetches. A miss the token does not wait for loads after the step's experts
        // ran.
        let all_here = self.store.registered();
        let last = out
            .misses
            .iter()
            .zip(&out.actions)
            .rposition(|(_, &a)| a == MissAction::Load);
        for (i, (&k, &a)) in out.misses.iter().zip(&out.actions).enumerate() {
            if a == MissAction::Load {
                self.submit(k, false, all_here || Some(i) == last)?;
            } else {
                deferred.push(k);
            }
        }
        self.cur = Some(Current {
            layer,
            pos: pos as u32,
            hits: out.hits.clone(),
            missed: out
                .misses
                .iter()
                .zip(&out.actions)
                .map(|(k, &a)| (k.expert, a))
                .collect(),
            deferred,
            prefetch: out.prefetched.clone(),
            load_ns: 0,
        });
        self.outcome = out;
        Ok(())
    }

    fn fetch(&mut self, key: ExpertKey) -> Result<Option<Arc<ExpertWeights>>> {
        let action = self.cur.as_ref().and_then(|c| {
            c.missed
                .iter()
                .find(|(e, _)| *e == key.expert)
                .map(|&(_, a)| a)
        });
        match action {
            None | Some(MissAction::Load) => self.resident(key),
            // Run without it; its load goes on and is claimed when it is next used.
            Some(MissAction::Drop) => Ok(None),
            Some(MissAction::Substitute(s)) => self.resident(ExpertKey {
                layer: key.layer,
                expert: s,
            }),
            Some(MissAction::LowBit) => {
                let low = self.low.ok_or_else(|| {
                    Error::Input("internal: a low-bit miss without a low-bit checkpoint".into())
                })?;
                let t = Instant::now();
                let w = low.load(key)?;
                self.charge(t.elapsed().as_nanos() as u64);
                Ok(Some(w))
            }
            Some(MissAction::Host) => {
                let t = Instant::now();
                let w = self.store.load_on_host(key)?;
                self.charge(t.elapsed().as_nanos() as u64);
                Ok(Some(w))
            }
        }
    }

    fn end_step(&mut self, route: &Route) -> Result<()> {
        // The loads of misses the token did not wait for, then the prefetches: both start once
        // the step's own experts have run, so they never delay them.
        let (deferred, prefetch) = self
            .cur
            .as_mut()
            .map(|c| {
                (
                    std::mem::take(&mut c.deferred),
                    std::mem::take(&mut c.prefetch),
                )
            })
            .unwrap_or_default();
        let loads = deferred.into_iter().map(|k| (k, false));
        for (k, is_prefetch) in loads.chain(prefetch.into_iter().map(|k| (k, true))) {
            self.submit(k, is_prefetch, false)?;
        }
        self.finish_step(route)
    }

    fn wants_lookahead(&self) -> bool {
        self.phase == Phase::Decode && self.cfg.policy.prefetch()
    }

    fn resident_layer(&self, layer: u32) -> Option<&[Option<Arc<ExpertWeights>>]> {
        // Every expert held: each step of the layer hits, evicts nothing and loads nothing
        // (a held expert is never also loading), so the outcome does not depend on when the
        // step is reported.
        let held = self.payload.get(layer as usize)?;
        (!held.is_empty() && held.iter().all(Option::is_some)).then_some(held.as_slice())
    }

    fn gated_layer(&self, layer: u32) -> Option<&[Option<Arc<ExpertWeights>>]> {
        // Every miss loaded and run, routes from the router (not a replayed trace), a decode
        // token: each step is reported before its experts run, as on the host path.
        let exact = self.core.miss_mode() == crate::experts::miss::MissMode::Load;
        let held = self.payload.get(layer as usize)?;
        (exact && self.replay.is_none() && self.phase == Phase::Decode && !held.is_empty())
            .then_some(held.as_slice())
    }

    fn ran_by_expert(&mut self, steps: usize) {
        *self.by_expert += steps as u64;
    }

    fn never_evicts(&self, layer: u32) -> bool {
        // Per-layer slots for every expert of the layer, or no budget at all; byte budgets
        // (and a shared global pool) are left to the per-token loop.
        match self.core.budget() {
            crate::experts::budget::Budget::Unlimited => true,
            crate::experts::budget::Budget::SlotsPerLayer(n) => self
                .payload
                .get(layer as usize)
                .is_some_and(|held| !held.is_empty() && n >= held.len()),
            _ => false,
        }
    }

    fn replayed_routes(&self, layer: u32, pos0: usize, n: usize) -> Result<Option<Vec<Route>>> {
        match self.replay {
            Some(rep) => rep.routes(layer, pos0, n).map(Some),
            None => Ok(None),
        }
    }

    fn replayed_lookahead(&self, layer: u32, pos0: usize, n: usize) -> Option<Vec<Route>> {
        self.replay?.lookahead(layer, pos0, n)
    }
}

impl Access<'_> {
    /// A resident expert's tensors: held, or claimed from its (possibly still running) load.
    fn resident(&mut self, key: ExpertKey) -> Result<Option<Arc<ExpertWeights>>> {
        let slot = &mut self.payload[key.layer as usize][key.expert as usize];
        if let Some(w) = slot {
            return Ok(Some(w.clone()));
        }
        match self.loader.claim(key) {
            Some(r) => {
                let (w, waited) = r?;
                self.payload[key.layer as usize][key.expert as usize] = Some(w.clone());
                self.charge(waited);
                Ok(Some(w))
            }
            None => Err(Error::Input(format!(
                "internal: cache reports {key:?} resident but holds no tensors"
            ))),
        }
    }

    /// Closes the step: writes its trace row.
    fn finish_step(&mut self, route: &Route) -> Result<()> {
        let cur = self.cur.take().expect("end_step after begin_step");
        let lookahead = self
            .pending
            .iter()
            .position(|(p, l, _)| *p == cur.pos && *l == cur.layer)
            .map(|i| self.pending.swap_remove(i).2);
        if let Some(trace) = self.trace.as_mut() {
            trace.push(TraceRow {
                prompt: self.prompt,
                step: self.step,
                pos: cur.pos,
                phase: self.phase,
                layer: cur.layer,
                experts: route.experts.clone(),
                weights: route.weights.clone(),
                lookahead,
                hits: cur.hits,
                load_ns: cur.load_ns,
            });
        }
        Ok(())
    }
}
