//! The one access driver of the expert cache, shared verbatim by the live engine and the trace
//! simulator so that both give the same hit counts on the same trace.
//!
//! It follows libCacheSim's `cache_get_base`: *find* → on a miss *evict until it fits* → *insert*.
//! [`CacheCore`] owns the resident set (keys and sizes, never payloads: the engine keeps those,
//! keyed by [`ExpertKey`], and frees what [`AccessOutcome::evicted`] names), the budget
//! accounting, the pins, and one [`Policy`] instance per pool; the policy only names victims.
//!
//! # Pools and budgets
//! [`Budget::SlotsPerLayer`], [`Budget::BytesPerLayer`] and [`Budget::Unlimited`] give every MoE
//! layer its own pool (and its own policy instance); [`Budget::BytesGlobal`] puts all layers in one
//! pool, so victims may come from any layer. Resident bytes never exceed the budget.
//!
//! # Steps and pins
//! The engine runs one *step* per (token, MoE layer): [`CacheCore::begin_step`] names the experts
//! the router picked; they are pinned (never victims) until [`CacheCore::end_step`], so a
//! just-loaded expert is never evicted by the same step. A step's clock tick (one per
//! `begin_step` of that layer) is the time unit of `lcp` and `lfu-decay`. If a demand cannot fit
//! because everything else is pinned by the step, the access fails with
//! [`CacheError::BudgetTooSmall`].
//!
//! In *classic* mode ([`CacheOptions::classic`], [`CacheCore::new_classic`]) there are no pins and
//! every access is its own step of its layer, exactly like a libCacheSim cache per pool: this is
//! what the oracle tests compare against libCacheSim.
//!
//! # Prefetch
//! [`CacheCore::prefetch`] inserts an expert without a demand. It never evicts pinned entries or
//! other still-protected prefetches, and is dropped when nothing can make room. A prefetched
//! entry (or a predicted one that was already resident) is *protected* until the end of the next
//! step of its layer; after that it is an ordinary entry. Demand misses take unprotected victims
//! first and fall back to protected ones only when nothing else can make room (a wrong
//! prediction must not make a demand fail); only pinned entries are never demand victims.
//! Counters: issued, used (demanded while still resident: precision = used / issued), wasted
//! (evicted before any demand), recall = used / (used + demand misses).

use super::budget::Budget;
use super::miss::{CoActivation, MissAction, MissMode};
use super::policies::{
    Access, FrequencyProfile, Guard, InsertKind, Policy, PolicyError, PolicySpec, PoolContext,
    CHOSEN, PINNED, PROTECTED,
};
use super::{ExpertKey, Phase};

mod pools;
mod stats;

use pools::{evict_victims, insert, pool_caps, select_victims, DEMAND_MASK, PREFETCH_MASK};

pub(crate) use stats::ratio;
pub use stats::{CacheStats, LayerStats, PhaseStats, PrefetchStats};

/// Sentinel for "no id assigned".
const NO_ID: u32 = u32::MAX;
pub use super::{MAX_EXPERT_ID, MAX_LAYER_ID};

/// Errors of the access driver.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CacheError {
    /// The policy name or its construction failed.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// No MoE layers were given.
    #[error("the expert cache needs at least one MoE layer")]
    NoLayers,
    /// A MoE layer was listed twice.
    #[error("MoE layer {0} is listed twice")]
    DuplicateLayer(u32),
    /// A budget of zero holds nothing.
    #[error("cache budget `{0}` holds nothing")]
    ZeroBudget(Budget),
    /// `static-<N>` leaves no slot for the other experts.
    #[error(
        "`{policy}` pins {n} experts per layer but the budget has {slots} slots per layer; \
         it needs more than {n}"
    )]
    StaticTooLarge {
        /// Canonical policy name.
        policy: String,
        /// Experts pinned per layer.
        n: usize,
        /// Slots per layer.
        slots: usize,
    },
    /// `adaptive-split` on a byte budget without knowing an expert's size.
    #[error(
        "`{policy}` splits a budget between layers in whole experts; the byte budget `{budget}` \
         needs the expert size (give the model, or the capacity as slots per layer)"
    )]
    SplitNeedsSlots {
        /// Canonical policy name.
        policy: String,
        /// The budget given.
        budget: Budget,
    },
    /// A layer id is absurdly large.
    #[error("MoE layer {0} is out of range (layer ids must be < {MAX_LAYER_ID})")]
    LayerOutOfRange(u32),
    /// The layer is not one of the cache's MoE layers.
    #[error("layer {layer} is not a MoE layer of this cache (MoE layers: {known})")]
    UnknownLayer {
        /// The layer asked for.
        layer: u32,
        /// The MoE layers, comma-separated.
        known: String,
    },
    /// The expert id is absurdly large.
    #[error("expert id {expert} of layer {layer} is out of range (ids must be < {MAX_EXPERT_ID})")]
    ExpertOutOfRange {
        /// Layer.
        layer: u32,
        /// Expert id.
        expert: u32,
    },
    /// A demand access outside an open step of its layer (pinned mode only).
    #[error("access to layer {layer} outside a step of that layer (open step: {open})")]
    OutsideStep {
        /// The access's layer.
        layer: u32,
        /// The open step's layer, or `none`.
        open: String,
    },
    /// `begin_step` while another step is open.
    #[error("begin_step for layer {layer} while the step of layer {open} is still open")]
    StepOpen {
        /// The new step's layer.
        layer: u32,
        /// The open step's layer.
        open: u32,
    },
    /// One expert alone exceeds its pool's whole budget.
    #[error(
        "expert {expert} of layer {layer} needs {need} {unit}, more than the whole budget of its \
         pool ({cap} {unit})"
    )]
    TooLarge {
        /// Layer.
        layer: u32,
        /// Expert.
        expert: u32,
        /// Units needed.
        need: u64,
        /// Pool capacity.
        cap: u64,
        /// `slots` or `bytes`.
        unit: &'static str,
    },
    /// A demand cannot fit: everything resident is pinned by the current step.
    #[error(
        "budget below one token's working set: layer {layer} needs {need} {unit} for expert \
         {expert}, but {used} of the pool's {cap} {unit} are held by {locked} experts pinned by \
         the current step"
    )]
    BudgetTooSmall {
        /// Layer of the demanded expert.
        layer: u32,
        /// The demanded expert.
        expert: u32,
        /// Units it needs.
        need: u64,
        /// Units in use in its pool.
        used: u64,
        /// Pool capacity.
        cap: u64,
        /// Resident entries pinned by the step (not evictable).
        locked: usize,
        /// `slots` or `bytes`.
        unit: &'static str,
    },
}

impl From<CacheError> for crate::error::Error {
    fn from(e: CacheError) -> Self {
        crate::error::Error::Stage(Box::new(e))
    }
}

/// Result of a demand access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessOutcome {
    /// The expert was resident.
    pub hit: bool,
    /// Experts evicted to make room (the engine frees their payloads).
    pub evicted: Vec<ExpertKey>,
    /// The hit was the first demand of a prefetched expert.
    pub was_prefetched: bool,
}

/// Result of a demand access whose evictions went into a caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessInfo {
    /// The expert was resident.
    pub hit: bool,
    /// The hit was the first demand of a prefetched expert.
    pub was_prefetched: bool,
}

/// Result of a prefetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefetchOutcome {
    /// The expert was loaded (false: already resident, or dropped for lack of room).
    pub issued: bool,
    /// Experts evicted to make room.
    pub evicted: Vec<ExpertKey>,
}

/// One step: a token through one MoE layer, as [`CacheCore::step`] runs it.
#[derive(Debug, Clone, Copy)]
pub struct Step<'a> {
    /// The MoE layer.
    pub layer: u32,
    /// Prefill or decode.
    pub phase: Phase,
    /// The experts the router selected, in router order.
    pub experts: &'a [u32],
    /// The router-lookahead prediction for the next MoE layer of the same token: that layer and
    /// its predicted experts. Prefetched only in the decode phase by a prefetching policy.
    pub prediction: Option<(u32, &'a [u32])>,
    /// The router's weights of `experts` (same order), seen by weight-aware policies (`mrs`);
    /// empty when unknown (each access then weighs 1).
    pub weights: &'a [f32],
    /// The request (prompt) the step belongs to, seen by request-aware policies (`eam-<k>`).
    pub request: u32,
}

/// What one [`CacheCore::step`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepOutcome {
    /// Per demanded expert, in router order: was it resident.
    pub hits: Vec<bool>,
    /// The demanded experts that were not resident (each must be loaded), in router order.
    pub misses: Vec<ExpertKey>,
    /// What the token runs for each of `misses` (same order), by the cache's miss mode.
    pub actions: Vec<MissAction>,
    /// Predicted experts a prefetch made resident (each must be loaded, in the background).
    pub prefetched: Vec<ExpertKey>,
    /// Experts evicted to make room (their payloads are to be freed).
    pub evicted: Vec<ExpertKey>,
}

impl StepOutcome {
    fn clear(&mut self) {
        self.hits.clear();
        self.misses.clear();
        self.actions.clear();
        self.prefetched.clear();
        self.evicted.clear();
    }
}

/// Construction options beyond spec, budget and layers.
#[derive(Debug, Clone, Default)]
pub struct CacheOptions {
    /// Classic (libCacheSim) mode: no pins, every access its own step.
    pub classic: bool,
    /// Expert use counts, required by `static-<N>` and `adaptive-split`.
    pub profile: Option<FrequencyProfile>,
    /// Experts one step demands (the router's top-k): the least `adaptive-split` leaves a
    /// layer. 0 = unknown (1 is assumed).
    pub working_set: usize,
    /// What a miss runs ([`StepOutcome::actions`]).
    pub miss: MissMode,
    /// Bytes of one expert: the unit in which `adaptive-split` divides a byte budget (0 =
    /// unknown: byte budgets are then refused for it).
    pub unit_bytes: u64,
}

/// Flag bit: the entry is resident. (The flag byte array is small and hot; keeping residency
/// there, not in [`Entry`], keeps the hit path off the larger entry array.)
const RESIDENT: u8 = 8;
/// Flag bit: loaded by a (recorded) prefetch and not demanded since.
const UNUSED_PREFETCH: u8 = 16;

/// The cold part of an entry, touched on loads and evictions only.
#[derive(Debug, Clone)]
struct Entry {
    key: ExpertKey,
    size: u64,
    cost: u64,
    /// Protected while its layer's completed steps are below this.
    protect_until: u64,
}

#[derive(Debug)]
struct Pool {
    policy: Box<dyn Policy>,
    cap: u64,
    used: u64,
    seq: u64,
    entries: Vec<Entry>,
    /// Per entry id: guard bits ([`PINNED`], [`PROTECTED`], [`CHOSEN`]) and state bits
    /// ([`RESIDENT`], [`UNUSED_PREFETCH`]).
    flags: Vec<u8>,
}

#[derive(Debug, Clone)]
struct LayerState {
    pool: u32,
    /// Expert id → entry id in the pool.
    ids: Vec<u32>,
    /// Entry ids with the PROTECTED bit, to clear when their step ends.
    protected: Vec<u32>,
}

/// The expert cache's resident set and access driver (see the module doc).
#[derive(Debug)]
pub struct CacheCore {
    spec: PolicySpec,
    budget: Budget,
    options: CacheOptions,
    moe_layers: Vec<u32>,
    /// Layer number → position in `moe_layers` (or NO_ID).
    layer_pos: Vec<u32>,
    layers: Vec<LayerState>,
    pools: Vec<Pool>,
    /// Per layer position: steps begun (pinned mode) or accesses (classic mode).
    clocks: Vec<u64>,
    /// Per layer position: steps ended.
    completed: Vec<u64>,
    open: Option<u32>,
    phase: Phase,
    pinned: Vec<(u32, u32)>,
    victims: Vec<u32>,
    recording: bool,
    /// Routing weight of the access in progress (set by [`CacheCore::step`]).
    weight: f32,
    /// The request of the last step.
    request: Option<u32>,
    /// Scratch for self-prefetching policies' predictions.
    predicted: Vec<u32>,
    /// Co-selection counts (`substitute` misses).
    coact: CoActivation,
    stats: CacheStats,
}

impl CacheCore {
    /// A pinned-mode cache (the engine's): `moe_layers` are the decoder layers with routed
    /// experts, in execution order.
    pub fn new(spec: &PolicySpec, budget: Budget, moe_layers: &[u32]) -> Result<Self, CacheError> {
        Self::with_options(spec, budget, moe_layers, CacheOptions::default())
    }

    /// A classic-mode cache: no pins, every access stands alone (libCacheSim semantics).
    pub fn new_classic(
        spec: &PolicySpec,
        budget: Budget,
        moe_layers: &[u32],
    ) -> Result<Self, CacheError> {
        Self::with_options(
            spec,
            budget,
            moe_layers,
            CacheOptions {
                classic: true,
                ..CacheOptions::default()
            },
        )
    }

    /// A cache with explicit [`CacheOptions`] (classic mode, frequency profile).
    pub fn with_options(
        spec: &PolicySpec,
        budget: Budget,
        moe_layers: &[u32],
        options: CacheOptions,
    ) -> Result<Self, CacheError> {
        if moe_layers.is_empty() {
            return Err(CacheError::NoLayers);
        }
        if budget.pool_capacity() == 0 {
            return Err(CacheError::ZeroBudget(budget));
        }
        if let (PolicySpec::Static { n }, Budget::SlotsPerLayer(slots)) = (spec.eviction(), budget)
        {
            if *n >= slots {
                return Err(CacheError::StaticTooLarge {
                    policy: spec.to_string(),
                    n: *n,
                    slots,
                });
            }
        }
        let max_layer = *moe_layers.iter().max().expect("non-empty");
        if max_layer >= MAX_LAYER_ID {
            return Err(CacheError::LayerOutOfRange(max_layer));
        }
        let max_layer = max_layer as usize;
        let mut layer_pos = vec![NO_ID; max_layer + 1];
        for (p, &l) in moe_layers.iter().enumerate() {
            if layer_pos[l as usize] != NO_ID {
                return Err(CacheError::DuplicateLayer(l));
            }
            layer_pos[l as usize] = p as u32;
        }
        let caps = pool_caps(spec, budget, moe_layers, &options)?;
        let per_layer = budget.per_layer() || spec.splits_budget();
        let n_pools = if per_layer { moe_layers.len() } else { 1 };
        let mut pools = Vec::with_capacity(n_pools);
        for p in 0..n_pools {
            let ctx = PoolContext {
                moe_layers,
                pool_layers: if per_layer {
                    &moe_layers[p..p + 1]
                } else {
                    moe_layers
                },
                profile: options.profile.as_ref(),
            };
            pools.push(Pool {
                policy: spec.build(&ctx)?,
                cap: caps[p],
                used: 0,
                seq: 0,
                entries: Vec::new(),
                flags: Vec::new(),
            });
        }
        let layers = (0..moe_layers.len())
            .map(|p| LayerState {
                pool: if per_layer { p as u32 } else { 0 },
                ids: Vec::new(),
                protected: Vec::new(),
            })
            .collect();
        let stats = CacheStats {
            per_layer: moe_layers
                .iter()
                .map(|&layer| LayerStats {
                    layer,
                    ..LayerStats::default()
                })
                .collect(),
            ..CacheStats::default()
        };
        Ok(CacheCore {
            spec: spec.clone(),
            budget,
            options,
            moe_layers: moe_layers.to_vec(),
            layer_pos,
            layers,
            pools,
            clocks: vec![0; moe_layers.len()],
            completed: vec![0; moe_layers.len()],
            open: None,
            phase: Phase::Decode,
            pinned: Vec::new(),
            victims: Vec::new(),
            recording: true,
            weight: 1.0,
            request: None,
            predicted: Vec::new(),
            coact: CoActivation::default(),
            stats,
        })
    }

    /// The policy this cache runs.
    pub fn spec(&self) -> &PolicySpec {
        &self.spec
    }

    /// The budget this cache enforces.
    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// What a miss runs.
    pub fn miss_mode(&self) -> MissMode {
        self.options.miss
    }

    /// True in classic (unpinned) mode.
    pub fn is_classic(&self) -> bool {
        self.options.classic
    }

    /// The MoE layers, in the order given.
    pub fn moe_layers(&self) -> &[u32] {
        &self.moe_layers
    }

    /// Turns counting on or off (on after construction and [`reset`](Self::reset)). While off,
    /// accesses and prefetches change the cache exactly as usual but no counter moves except
    /// `resident_bytes` and `peak_resident_bytes`; prefetches issued while off never count as
    /// used or wasted. Used to replay warm-up prompts without measuring them.
    pub fn set_recording(&mut self, on: bool) {
        self.recording = on;
    }

    /// Counters since construction or the last [`reset`](Self::reset).
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Bytes resident now.
    pub fn resident_bytes(&self) -> u64 {
        self.stats.resident_bytes
    }

    /// True if `key` is resident.
    pub fn contains(&self, key: ExpertKey) -> bool {
        self.lookup(key)
            .is_some_and(|(p, id)| self.pools[p].flags[id as usize] & RESIDENT != 0)
    }

    /// All resident experts, by pool then load order of first appearance.
    pub fn resident(&self) -> Vec<ExpertKey> {
        self.pools
            .iter()
            .flat_map(|p| {
                p.entries
                    .iter()
                    .zip(&p.flags)
                    .filter(|(_, f)| **f & RESIDENT != 0)
                    .map(|(e, _)| e.key)
            })
            .collect()
    }

    /// Empties the cache and zeroes every counter (same spec, budget, layers and options).
    pub fn reset(&mut self) {
        let options = self.options.clone();
        *self = Self::with_options(&self.spec, self.budget, &self.moe_layers, options)
            .expect("arguments were validated at construction");
    }

    /// Runs one whole step (see [`Step`]) — the protocol the live engine and the simulator
    /// share, so that both give the same hit counts on the same routing by construction:
    /// 1. [`begin_step`](Self::begin_step) pins the router's experts;
    /// 2. one demand [`access`](Self::access) per expert, in router order;
    /// 3. in the decode phase, if the policy prefetches, one [`prefetch`](Self::prefetch) per
    ///    predicted expert of the next MoE layer, in predicted order (router lookahead: layer
    ///    l+1's experts are guessed while layer l runs);
    /// 4. [`end_step`](Self::end_step).
    ///
    /// `size` gives an expert's checkpoint bytes; `next_use(key, prefetch)` its next demand
    /// position for Belady (`u64::MAX` when unknown; it is called once per access, in order).
    /// `out` is cleared and filled. On error the step is closed and `out` holds what happened
    /// before the failing access.
    pub fn step(
        &mut self,
        step: &Step<'_>,
        size: impl Fn(ExpertKey) -> u64,
        mut next_use: impl FnMut(ExpertKey, bool) -> u64,
        out: &mut StepOutcome,
    ) -> Result<(), CacheError> {
        out.clear();
        if self.request != Some(step.request) {
            self.request = Some(step.request);
            for pool in &mut self.pools {
                pool.policy.on_request(step.request);
            }
        }
        self.begin_step(step.layer, step.phase, step.experts)?;
        for (i, &expert) in step.experts.iter().enumerate() {
            let key = ExpertKey {
                layer: step.layer,
                expert,
            };
            let n = next_use(key, false);
            self.weight = step.weights.get(i).copied().unwrap_or(1.0);
            let r = self.access_into(key, size(key), n, &mut out.evicted);
            self.weight = 1.0;
            match r {
                Ok(info) => {
                    out.hits.push(info.hit);
                    if !info.hit {
                        out.misses.push(key);
                    }
                }
                Err(e) => {
                    self.end_step();
                    return Err(e);
                }
            }
        }
        if let (Phase::Decode, true, Some((layer, predicted))) =
            (step.phase, self.spec.prefetch(), step.prediction)
        {
            for &expert in predicted {
                let key = ExpertKey { layer, expert };
                let n = next_use(key, true);
                if self.prefetch_into(key, size(key), n, &mut out.evicted) {
                    out.prefetched.push(key);
                }
            }
        }
        self.resolve_misses(step, out);
        if step.phase == Phase::Decode && self.spec.self_prefetch() {
            // The policy's own prediction for the next MoE layer (`eam-<k>`).
            let lp = self.layer_index(step.layer)?;
            if let Some(&layer) = self.moe_layers.get(lp + 1) {
                let pool = self.layers[lp + 1].pool as usize;
                let mut predicted = std::mem::take(&mut self.predicted);
                predicted.clear();
                self.pools[pool].policy.predict(
                    (lp + 1) as u32,
                    step.experts.len(),
                    &mut predicted,
                );
                for &expert in &predicted {
                    let key = ExpertKey { layer, expert };
                    let n = next_use(key, true);
                    if self.prefetch_into(key, size(key), n, &mut out.evicted) {
                        out.prefetched.push(key);
                    }
                }
                self.predicted = predicted;
            }
        }
        self.end_step();
        Ok(())
    }

    /// Opens the step of `layer` (one token through one MoE layer) and pins `experts`, the
    /// experts the router picked, until [`end_step`](Self::end_step). Pinning them up front means
    /// a resident expert demanded later in the step cannot be evicted by an earlier miss of the
    /// same step. (An empty slice is allowed: each expert is then pinned at its access.)
    /// In classic mode this only records the phase.
    pub fn begin_step(
        &mut self,
        layer: u32,
        phase: Phase,
        experts: &[u32],
    ) -> Result<(), CacheError> {
        let lp = self.layer_index(layer)?;
        if let Some(open) = self.open {
            return Err(CacheError::StepOpen {
                layer,
                open: self.moe_layers[open as usize],
            });
        }
        self.open = Some(lp as u32);
        self.phase = phase;
        if self.options.classic {
            return Ok(());
        }
        self.clocks[lp] += 1;
        for &e in experts {
            let (pi, id) = self.id_of(lp, e)?;
            self.pin(pi, id);
        }
        Ok(())
    }

    /// Closes the open step: unpins its experts and ends the protection of prefetches whose
    /// protected step this was. Does nothing if no step is open.
    pub fn end_step(&mut self) {
        let Some(lp) = self.open.take() else {
            return;
        };
        for (pi, id) in self.pinned.drain(..) {
            self.pools[pi as usize].flags[id as usize] &= !PINNED;
        }
        if !self.options.classic {
            let lp = lp as usize;
            self.completed[lp] = self.clocks[lp];
            self.expire_protection(lp);
        }
    }

    /// Demand access of `key` (`size` bytes; `next_use` = position of its next demand for
    /// Belady, `u64::MAX` if unknown): find → on a miss evict until it fits → insert.
    pub fn access(
        &mut self,
        key: ExpertKey,
        size: u64,
        next_use: u64,
    ) -> Result<AccessOutcome, CacheError> {
        let mut evicted = Vec::new();
        let info = self.access_into(key, size, next_use, &mut evicted)?;
        Ok(AccessOutcome {
            hit: info.hit,
            evicted,
            was_prefetched: info.was_prefetched,
        })
    }

    /// [`access`](Self::access) appending evicted keys to `evicted` instead of allocating (the
    /// simulator's hot path). On error nothing changed.
    pub fn access_into(
        &mut self,
        key: ExpertKey,
        size: u64,
        next_use: u64,
        evicted: &mut Vec<ExpertKey>,
    ) -> Result<AccessInfo, CacheError> {
        let lp = self.layer_index(key.layer)?;
        let classic = self.options.classic;
        if !classic && self.open != Some(lp as u32) {
            return Err(CacheError::OutsideStep {
                layer: key.layer,
                open: self
                    .open
                    .map_or("none".into(), |p| self.moe_layers[p as usize].to_string()),
            });
        }
        let (pi, id) = self.id_of(lp, key.expert)?;
        let clock = if classic {
            self.clocks[lp] + 1
        } else {
            self.clocks[lp]
        };
        let pool = &mut self.pools[pi];
        let info = if pool.flags[id as usize] & RESIDENT != 0 {
            pool.seq += 1;
            let access = Access {
                key,
                layer_pos: lp as u32,
                clock,
                next_use,
                seq: pool.seq,
                weight: self.weight,
            };
            pool.policy.on_hit(id, &access);
            let f = &mut pool.flags[id as usize];
            let was_prefetched = *f & UNUSED_PREFETCH != 0;
            *f &= !UNUSED_PREFETCH;
            if was_prefetched && self.recording {
                self.stats.prefetch.used += 1;
            }
            AccessInfo {
                hit: true,
                was_prefetched,
            }
        } else {
            let cost = self.budget.cost(size);
            if cost > pool.cap {
                return Err(CacheError::TooLarge {
                    layer: key.layer,
                    expert: key.expert,
                    need: cost,
                    cap: pool.cap,
                    unit: self.budget.unit(),
                });
            }
            if classic {
                // The previous access of this layer has ended: its clock tick is visible to
                // the policy when choosing victims.
                self.clocks[lp] = clock;
            }
            let fits = select_victims(pool, &self.clocks, &mut self.victims, cost, PREFETCH_MASK)
                || select_victims(pool, &self.clocks, &mut self.victims, cost, DEMAND_MASK);
            if !fits {
                let locked = pool
                    .flags
                    .iter()
                    .filter(|f| **f & RESIDENT != 0 && **f & PINNED != 0)
                    .count();
                let err = CacheError::BudgetTooSmall {
                    layer: key.layer,
                    expert: key.expert,
                    need: cost,
                    used: pool.used,
                    cap: pool.cap,
                    locked,
                    unit: self.budget.unit(),
                };
                if classic {
                    self.clocks[lp] -= 1;
                }
                return Err(err);
            }
            evict_victims(
                pool,
                &self.victims,
                &mut self.stats,
                self.recording,
                evicted,
            );
            pool.seq += 1;
            let access = Access {
                key,
                layer_pos: lp as u32,
                clock,
                next_use,
                seq: pool.seq,
                weight: self.weight,
            };
            insert(pool, id, size, cost, &mut self.stats);
            pool.policy.on_insert(id, &access, InsertKind::Demand);
            if self.recording {
                self.stats.misses += 1;
                self.stats.bytes_loaded += size;
            }
            AccessInfo {
                hit: false,
                was_prefetched: false,
            }
        };
        if self.recording {
            let hit = u64::from(info.hit);
            self.stats.accesses += 1;
            self.stats.hits += hit;
            let ls = &mut self.stats.per_layer[lp];
            ls.accesses += 1;
            ls.hits += hit;
            let ps = match self.phase {
                Phase::Prefill => &mut self.stats.prefill,
                Phase::Decode => &mut self.stats.decode,
            };
            ps.accesses += 1;
            ps.hits += hit;
        }
        if classic {
            self.clocks[lp] = clock;
            self.completed[lp] = clock;
            self.expire_protection(lp);
        } else {
            self.pin(pi, id);
        }
        Ok(info)
    }

    /// Loads `key` without a demand (router lookahead). Never evicts pinned entries or
    /// still-protected prefetches; dropped when nothing can make room. The loaded entry is
    /// protected until the end of the next step of its layer. A prefetch is only a hint: one for
    /// a layer the cache does not know (or an out-of-range expert id) is dropped, not an error.
    pub fn prefetch(&mut self, key: ExpertKey, size: u64, next_use: u64) -> PrefetchOutcome {
        let mut evicted = Vec::new();
        let issued = self.prefetch_into(key, size, next_use, &mut evicted);
        PrefetchOutcome { issued, evicted }
    }

    /// [`prefetch`](Self::prefetch) appending evicted keys to `evicted`; returns whether it was
    /// issued.
    pub fn prefetch_into(
        &mut self,
        key: ExpertKey,
        size: u64,
        next_use: u64,
        evicted: &mut Vec<ExpertKey>,
    ) -> bool {
        let Some((lp, pi, id)) = self
            .layer_index(key.layer)
            .and_then(|lp| self.id_of(lp, key.expert).map(|(pi, id)| (lp, pi, id)))
            .ok()
        else {
            self.stats.prefetch.dropped += u64::from(self.recording);
            return false;
        };
        let pool = &mut self.pools[pi];
        if pool.flags[id as usize] & RESIDENT != 0 {
            self.stats.prefetch.already_resident += u64::from(self.recording);
            // Predicted again: protect it like a fresh prefetch, without counting a use.
            if pool.flags[id as usize] & PROTECTED == 0 {
                pool.flags[id as usize] |= PROTECTED;
                pool.entries[id as usize].protect_until = self.clocks[lp] + 1;
                self.layers[lp].protected.push(id);
            }
            return false;
        }
        let cost = self.budget.cost(size);
        if cost > pool.cap
            || !select_victims(pool, &self.clocks, &mut self.victims, cost, PREFETCH_MASK)
        {
            self.stats.prefetch.dropped += u64::from(self.recording);
            return false;
        }
        evict_victims(
            pool,
            &self.victims,
            &mut self.stats,
            self.recording,
            evicted,
        );
        pool.seq += 1;
        let access = Access {
            key,
            layer_pos: lp as u32,
            clock: self.clocks[lp],
            next_use,
            seq: pool.seq,
            weight: 0.0,
        };
        insert(pool, id, size, cost, &mut self.stats);
        let e = &mut pool.entries[id as usize];
        if self.recording {
            pool.flags[id as usize] |= UNUSED_PREFETCH;
        }
        e.protect_until = self.clocks[lp] + 1;
        pool.flags[id as usize] |= PROTECTED;
        pool.policy.on_insert(id, &access, InsertKind::Prefetch);
        self.layers[lp].protected.push(id);
        if self.recording {
            self.stats.prefetch.issued += 1;
            self.stats.prefetch.bytes += size;
        }
        true
    }

    fn layer_index(&self, layer: u32) -> Result<usize, CacheError> {
        match self.layer_pos.get(layer as usize) {
            Some(&p) if p != NO_ID => Ok(p as usize),
            _ => Err(CacheError::UnknownLayer {
                layer,
                known: self
                    .moe_layers
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    fn lookup(&self, key: ExpertKey) -> Option<(usize, u32)> {
        let lp = self.layer_index(key.layer).ok()?;
        let ls = &self.layers[lp];
        let id = *ls.ids.get(key.expert as usize)?;
        (id != NO_ID).then_some((ls.pool as usize, id))
    }

    /// (pool index, entry id) of an expert, assigning an id on first sight.
    #[inline]
    fn id_of(&mut self, lp: usize, expert: u32) -> Result<(usize, u32), CacheError> {
        let ls = &mut self.layers[lp];
        let e = expert as usize;
        if let Some(&id) = ls.ids.get(e) {
            if id != NO_ID {
                return Ok((ls.pool as usize, id));
            }
        }
        let layer = self.moe_layers[lp];
        if expert >= MAX_EXPERT_ID {
            return Err(CacheError::ExpertOutOfRange { layer, expert });
        }
        if ls.ids.len() <= e {
            ls.ids.resize(e + 1, NO_ID);
        }
        let pool = &mut self.pools[ls.pool as usize];
        let id = pool.entries.len() as u32;
        pool.entries.push(Entry {
            key: ExpertKey { layer, expert },
            size: 0,
            cost: 0,
            protect_until: 0,
        });
        pool.flags.push(0);
        ls.ids[e] = id;
        Ok((ls.pool as usize, id))
    }

    #[inline]
    fn pin(&mut self, pi: usize, id: u32) {
        let f = &mut self.pools[pi].flags[id as usize];
        if *f & PINNED == 0 {
            *f |= PINNED;
            self.pinned.push((pi as u32, id));
        }
    }

    fn expire_protection(&mut self, lp: usize) {
        let ls = &mut self.layers[lp];
        if ls.protected.is_empty() {
            return;
        }
        let done = self.completed[lp];
        let pool = &mut self.pools[ls.pool as usize];
        ls.protected.retain(|&id| {
            let resident = pool.flags[id as usize] & RESIDENT != 0;
            if pool.entries[id as usize].protect_until <= done || !resident {
                pool.flags[id as usize] &= !PROTECTED;
                false
            } else {
                true
            }
        });
    }
}

#[cfg(test)]
mod tests;
