//! Eviction policies: which resident expert leaves the cache when room is needed.
//!
//! This module exists so that every policy sits behind one small interface ([`Policy`]) and is
//! named by one string ([`PolicySpec`]) that the CLI, the TOML experiment files, the Parquet traces
//! and the plot labels all share. A policy only keeps its own metadata and names victims
//! ([`Policy::to_evict`], libCacheSim's peek); it never holds payloads and never decides whether
//! something fits: that is the job of the one access driver, [`crate::experts::cache::CacheCore`].
//!
//! Policies are instantiated once per *pool* (one per MoE layer, or one for a global byte budget)
//! and see entries by a dense per-pool id (`u32`) chosen by the driver, so their metadata lives
//! in plain vectors instead of hash maps.
//!
//! # Policy names
//! | name | meaning |
//! |---|---|
//! | `lru` | least recently used (demand hits and inserts refresh recency) |
//! | `lfu` | in-cache frequency, counter 1 on insert, forgotten on eviction; ties: least recently used first (libCacheSim `LFU`) |
//! | `lfu-decay<f>` | like `lfu`, but every count is multiplied by `f` (0 < f < 1) at every step of the entry's layer; `lfu-decay` = `lfu-decay0.9` |
//! | `lcp-<base>-<horizon>` | flash-moe "least critical priority" `count · base^(steps_since_use / horizon)`, lowest evicted; `lcp` = `lcp-0.25-128` |
//! | `lookahead`, `lookahead-<policy>` | eviction by `<policy>` (default `lru`); the cache also prefetches the router's next-layer prediction |
//! | `belady` | evicts the resident expert whose next demand is farthest (from next-use positions carried by each access; offline only) |
//! | `static-<N>` | the `N` most frequent experts of each layer in a frequency profile are never evicted once loaded; the rest is LRU |
//! | `lfru`, `lfru-<p>` | LRU/LFU hybrid: the `p` most recently used part of the resident set is kept, the rest is evicted by in-cache frequency; `lfru` = `lfru-0.5` |
//! | `mrs`, `mrs-<a>` | HybriMoE's minus-recent-score: a per-expert score `s ← a·s + (1−a)·w` of the routing weights `w`, decayed at every step of the layer; lowest evicted; `mrs` = `mrs-0.9` |
//! | `layer-aware`, `layer-aware-<s>` | Fate-style shallow-layer preference: LRU on ages scaled by `1 + s·depth` (depth 0 at the first MoE layer, 1 at the last); `layer-aware` = `layer-aware-1` |
//! | `eam-<k>` | MoE-Infinity: the request's expert-activation matrix matched against the `k` most similar past requests; lowest predicted activation evicted, the next layer's highest prefetched |
//! | `adaptive-split` | AdapMoE-style per-layer split of a slots-per-layer budget by the profile's per-layer frequency curves (greedy marginal hits); LRU within each layer |
//!
//! "Step" is the logical clock of a layer: one step per (token, MoE layer) forward visit, i.e. per
//! `begin_step` of that layer. In the driver's classic (unpinned) mode every access is its own step.

mod adaptive_split;
mod belady;
mod eam;
mod layer_aware;
mod lcp;
mod lfru;
mod lfu;
mod lfu_decay;
mod lru;
mod mrs;
mod static_hot;

pub use adaptive_split::split_slots;
pub use belady::Belady;
pub use eam::Eam;
pub use layer_aware::LayerAware;
pub use lcp::Lcp;
pub use lfru::Lfru;
pub use lfu::Lfu;
pub use lfu_decay::LfuDecay;
pub use lru::Lru;
pub use mrs::Mrs;
pub use static_hot::StaticHot;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ExpertKey;

/// The names [`PolicySpec::parse`] accepts, as listed in its error messages.
pub const KNOWN_POLICIES: &str = "lru, lfu, lfu-decay<f> (e.g. lfu-decay0.9), lcp or \
     lcp-<base>-<horizon> (e.g. lcp-0.25-128), lookahead or lookahead-<policy> (e.g. lookahead-lfu), \
     belady, static-<N> (e.g. static-8), lfru or lfru-<p> (e.g. lfru-0.5), mrs or mrs-<a> \
     (e.g. mrs-0.9), layer-aware or layer-aware-<s> (e.g. layer-aware-1), eam-<k> (e.g. eam-4), \
     adaptive-split";

/// Errors of policy names and policy construction.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// The name matches no known policy.
    #[error("unknown eviction policy `{name}`; known policies: {known}")]
    Unknown {
        /// The name as given.
        name: String,
        /// The accepted names ([`KNOWN_POLICIES`]).
        known: &'static str,
    },
    /// The policy is known but a parameter is malformed or out of range.
    #[error("bad parameter in eviction policy `{name}`: {reason}")]
    BadParameter {
        /// The name as given.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// `static-<N>` or `adaptive-split` was built without a frequency profile.
    #[error("eviction policy `{name}` needs a frequency profile (expert use counts per layer)")]
    NeedsProfile {
        /// The canonical policy name.
        name: String,
    },
}

/// A parsed, validated policy name with its parameters. [`fmt::Display`] gives the canonical
/// string back (`lcp` displays as `lcp-0.25-128`), which is the value stored in traces and plots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum PolicySpec {
    /// `lru`.
    Lru,
    /// `lfu`: in-cache frequency with libCacheSim's tie-break.
    Lfu,
    /// `lfu-decay<factor>`: frequencies multiplied by `factor` at every step of the entry's layer.
    LfuDecay {
        /// Per-step multiplier, 0 < factor < 1.
        factor: f64,
    },
    /// `lcp-<base>-<horizon>`: priority `count · base^(steps_since_use / horizon)`.
    Lcp {
        /// Decay base, 0 < base <= 1.
        base: f64,
        /// Steps over which the priority is multiplied by `base`, > 0.
        horizon: f64,
    },
    /// `lookahead-<policy>`: eviction by the inner policy, plus router-lookahead prefetching.
    Lookahead(Box<PolicySpec>),
    /// `belady`: farthest next use; needs next-use positions (simulator only).
    Belady,
    /// `static-<n>`: the `n` hottest experts per layer (from a profile) are never evicted; LRU
    /// for the rest.
    Static {
        /// Experts pinned per layer.
        n: usize,
    },
    /// `lfru-<p>`: the most recently used fraction `p` of the resident set is privileged; the
    /// victim is the least frequently used of the rest.
    Lfru {
        /// Privileged (recency-protected) fraction, 0 < p < 1.
        privileged: f64,
    },
    /// `mrs-<a>`: HybriMoE minus-recent-score with decay `a`.
    Mrs {
        /// Score decay per step, 0 < a < 1.
        alpha: f64,
    },
    /// `layer-aware-<s>`: LRU on ages scaled by `1 + s·depth`.
    LayerAware {
        /// Extra weight of the deepest layer's ages, >= 0.
        slope: f64,
    },
    /// `eam-<k>`: MoE-Infinity expert-activation-matrix matching against `k` past requests.
    Eam {
        /// Past requests matched, >= 1.
        k: usize,
    },
    /// `adaptive-split`: per-layer slot split from a profile, LRU within each layer.
    AdaptiveSplit,
}

impl PolicySpec {
    /// Parses a policy name (case-insensitive, surrounding spaces ignored).
    pub fn parse(name: &str) -> Result<PolicySpec, PolicyError> {
        let lower = name.trim().to_ascii_lowercase();
        let s = lower.as_str();
        let bad = |reason: String| PolicyError::BadParameter {
            name: name.to_string(),
            reason,
        };
        let num = |text: &str, what: &str| -> Result<f64, PolicyError> {
            text.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| bad(format!("{what} `{text}` is not a number")))
        };
        match s {
            "lru" => return Ok(PolicySpec::Lru),
            "lfu" => return Ok(PolicySpec::Lfu),
            "belady" => return Ok(PolicySpec::Belady),
            "lcp" => {
                return Ok(PolicySpec::Lcp {
                    base: 0.25,
                    horizon: 128.0,
                })
            }
            "lfu-decay" => return Ok(PolicySpec::LfuDecay { factor: 0.9 }),
            "lookahead" => return Ok(PolicySpec::Lookahead(Box::new(PolicySpec::Lru))),
            "lfru" => return Ok(PolicySpec::Lfru { privileged: 0.5 }),
            "mrs" => return Ok(PolicySpec::Mrs { alpha: 0.9 }),
            "layer-aware" => return Ok(PolicySpec::LayerAware { slope: 1.0 }),
            "adaptive-split" => return Ok(PolicySpec::AdaptiveSplit),
            "eam" => {
                return Err(bad(
                    "eam needs the number of past requests to match, e.g. eam-4".into(),
                ))
            }
            _ => {}
        }
        if let Some(rest) = s.strip_prefix("lookahead-") {
            let inner = PolicySpec::parse(rest)?;
            if matches!(inner, PolicySpec::Lookahead(_)) {
                return Err(bad("lookahead cannot wrap another lookahead".into()));
            }
            return Ok(PolicySpec::Lookahead(Box::new(inner)));
        }
        if let Some(rest) = s.strip_prefix("lfu-decay") {
            let rest = rest.strip_prefix('-').unwrap_or(rest);
            let factor = num(rest, "decay factor")?;
            if !(factor > 0.0 && factor < 1.0) {
                return Err(bad(format!("decay factor {factor} must be in (0, 1)")));
            }
            return Ok(PolicySpec::LfuDecay { factor });
        }
        if let Some(rest) = s.strip_prefix("lcp-") {
            let (b, h) = rest
                .split_once('-')
                .ok_or_else(|| bad("expected lcp-<base>-<horizon>, e.g. lcp-0.25-128".into()))?;
            let base = num(b, "base")?;
            let horizon = num(h, "horizon")?;
            if !(base > 0.0 && base <= 1.0) {
                return Err(bad(format!("base {base} must be in (0, 1]")));
            }
            if horizon <= 0.0 {
                return Err(bad(format!("horizon {horizon} must be > 0")));
            }
            return Ok(PolicySpec::Lcp { base, horizon });
        }
        if let Some(rest) = s.strip_prefix("lfru-") {
            let p = num(rest, "privileged fraction")?;
            if !(p > 0.0 && p < 1.0) {
                return Err(bad(format!("privileged fraction {p} must be in (0, 1)")));
            }
            return Ok(PolicySpec::Lfru { privileged: p });
        }
        if let Some(rest) = s.strip_prefix("mrs-") {
            let alpha = num(rest, "score decay")?;
            if !(alpha > 0.0 && alpha < 1.0) {
                return Err(bad(format!("score decay {alpha} must be in (0, 1)")));
            }
            return Ok(PolicySpec::Mrs { alpha });
        }
        if let Some(rest) = s.strip_prefix("layer-aware-") {
            let slope = num(rest, "depth weight")?;
            if slope < 0.0 {
                return Err(bad(format!("depth weight {slope} must be >= 0")));
            }
            return Ok(PolicySpec::LayerAware { slope });
        }
        if let Some(rest) = s.strip_prefix("eam-") {
            let k: i64 = rest
                .parse()
                .map_err(|_| bad(format!("`{rest}` is not a whole number of past requests")))?;
            if k < 1 {
                return Err(bad(format!(
                    "eam-{k} matches no past request: k must be at least 1"
                )));
            }
            return Ok(PolicySpec::Eam { k: k as usize });
        }
        if let Some(rest) = s.strip_prefix("static-") {
            let n: usize = rest
                .parse()
                .map_err(|_| bad(format!("`{rest}` is not a whole number of experts")))?;
            if n == 0 {
                return Err(bad("static-0 pins nothing: use lru".into()));
            }
            return Ok(PolicySpec::Static { n });
        }
        Err(PolicyError::Unknown {
            name: name.to_string(),
            known: KNOWN_POLICIES,
        })
    }

    /// True when the driver (simulator or engine) should issue router-lookahead prefetches.
    pub fn prefetch(&self) -> bool {
        matches!(self, PolicySpec::Lookahead(_))
    }

    /// True when accesses must carry real next-use positions (Belady): only the simulator can
    /// run such a policy; the live engine must refuse it.
    pub fn needs_future(&self) -> bool {
        matches!(self.eviction(), PolicySpec::Belady)
    }

    /// True when construction needs a [`FrequencyProfile`] (`static-<N>`, `adaptive-split`).
    pub fn needs_profile(&self) -> bool {
        matches!(
            self.eviction(),
            PolicySpec::Static { .. } | PolicySpec::AdaptiveSplit
        )
    }

    /// True when the policy ranks experts by their routing weights (`mrs`), so a replay must
    /// read the trace's `weights` column.
    pub fn needs_weights(&self) -> bool {
        matches!(self.eviction(), PolicySpec::Mrs { .. })
    }

    /// True when the policy itself proposes prefetches ([`Policy::predict`]: `eam-<k>`) and
    /// the router lookahead does not (a `lookahead-` wrapper's predictions take precedence).
    pub fn self_prefetch(&self) -> bool {
        matches!(self, PolicySpec::Eam { .. })
    }

    /// True when the policy moves capacity between a budget's per-layer pools
    /// (`adaptive-split`).
    pub fn splits_budget(&self) -> bool {
        matches!(self.eviction(), PolicySpec::AdaptiveSplit)
    }

    /// The policy that chooses victims (the inner policy of `lookahead-<policy>`).
    pub fn eviction(&self) -> &PolicySpec {
        match self {
            PolicySpec::Lookahead(inner) => inner,
            other => other,
        }
    }

    /// Builds one policy instance for one pool of the cache.
    pub fn build(&self, ctx: &PoolContext<'_>) -> Result<Box<dyn Policy>, PolicyError> {
        Ok(match self.eviction() {
            PolicySpec::Lru => Box::new(Lru::new()),
            PolicySpec::Lfu => Box::new(Lfu::new()),
            PolicySpec::LfuDecay { factor } => Box::new(LfuDecay::new(*factor)),
            PolicySpec::Lcp { base, horizon } => Box::new(Lcp::new(*base, *horizon)),
            PolicySpec::Belady => Box::new(Belady::new()),
            PolicySpec::Static { n } => {
                let profile = ctx.profile.ok_or_else(|| PolicyError::NeedsProfile {
                    name: self.to_string(),
                })?;
                Box::new(StaticHot::new(*n, ctx.moe_layers, ctx.pool_layers, profile))
            }
            PolicySpec::Lfru { privileged } => Box::new(Lfru::new(*privileged)),
            PolicySpec::Mrs { alpha } => Box::new(Mrs::new(*alpha)),
            PolicySpec::LayerAware { slope } => {
                Box::new(LayerAware::new(*slope, ctx.moe_layers.len()))
            }
            PolicySpec::Eam { k } => Box::new(Eam::new(*k, ctx.moe_layers, ctx.pool_layers)),
            // The split is the driver's (pool capacities); within a layer it is LRU.
            PolicySpec::AdaptiveSplit => {
                if ctx.profile.is_none() {
                    return Err(PolicyError::NeedsProfile {
                        name: self.to_string(),
                    });
                }
                Box::new(Lru::new())
            }
            PolicySpec::Lookahead(_) => unreachable!("eviction() unwraps lookahead"),
        })
    }
}

impl fmt::Display for PolicySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicySpec::Lru => write!(f, "lru"),
            PolicySpec::Lfu => write!(f, "lfu"),
            PolicySpec::LfuDecay { factor } => write!(f, "lfu-decay{factor}"),
            PolicySpec::Lcp { base, horizon } => write!(f, "lcp-{base}-{horizon}"),
            PolicySpec::Lookahead(inner) if **inner == PolicySpec::Lru => write!(f, "lookahead"),
            PolicySpec::Lookahead(inner) => write!(f, "lookahead-{inner}"),
            PolicySpec::Belady => write!(f, "belady"),
            PolicySpec::Static { n } => write!(f, "static-{n}"),
            PolicySpec::Lfru { privileged } => write!(f, "lfru-{privileged}"),
            PolicySpec::Mrs { alpha } => write!(f, "mrs-{alpha}"),
            PolicySpec::LayerAware { slope } => write!(f, "layer-aware-{slope}"),
            PolicySpec::Eam { k } => write!(f, "eam-{k}"),
            PolicySpec::AdaptiveSplit => write!(f, "adaptive-split"),
        }
    }
}

impl FromStr for PolicySpec {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicySpec::parse(s)
    }
}

impl TryFrom<String> for PolicySpec {
    type Error = PolicyError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        PolicySpec::parse(&s)
    }
}

impl From<PolicySpec> for String {
    fn from(p: PolicySpec) -> String {
        p.to_string()
    }
}

/// What a policy instance is built for: the model's MoE layers (a [`Access::layer_pos`] indexes
/// this slice), the layers of this pool and, for `static-<N>`, the frequency profile.
#[derive(Debug, Clone, Copy)]
pub struct PoolContext<'a> {
    /// All MoE layer indices of the model, in execution order.
    pub moe_layers: &'a [u32],
    /// The layers whose experts this pool holds (one layer, or all for a global budget).
    pub pool_layers: &'a [u32],
    /// Expert use counts, needed by `static-<N>`.
    pub profile: Option<&'a FrequencyProfile>,
}

/// How an entry entered the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertKind {
    /// Loaded because it was demanded (a miss): counts as one use.
    Demand,
    /// Loaded by a prefetch: not a use yet (frequency-based policies start it at 0).
    Prefetch,
}

/// One event as a policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    /// The expert.
    pub key: ExpertKey,
    /// Index of `key.layer` in the model's MoE layers ([`PoolContext::moe_layers`]).
    pub layer_pos: u32,
    /// The layer's step clock now (see the module doc).
    pub clock: u64,
    /// Position of this expert's next demand access (Belady); `u64::MAX` if none or unknown.
    pub next_use: u64,
    /// The router's weight of this expert in the step (demand accesses; 1.0 where the step
    /// gave no weights, 0.0 for prefetches).
    pub weight: f32,
    /// A counter of the pool's hit/insert events, strictly increasing: recency for tie-breaks.
    pub seq: u64,
}

/// Guard bit: demanded in the open step.
pub(crate) const PINNED: u8 = 1;
/// Guard bit: a prefetch still protected until the end of the next step of its layer.
pub(crate) const PROTECTED: u8 = 2;
/// Guard bit: already chosen as a victim for the eviction in progress.
pub(crate) const CHOSEN: u8 = 4;

/// The driver's read-only view given to [`Policy::to_evict`]: which ids may be victims, and each
/// layer's step clock.
#[derive(Debug, Clone, Copy)]
pub struct Guard<'a> {
    flags: &'a [u8],
    clocks: &'a [u64],
    mask: u8,
}

impl<'a> Guard<'a> {
    /// A guard over per-id flag bytes (any bit set = not evictable) and per-layer-position step
    /// clocks.
    pub fn new(flags: &'a [u8], clocks: &'a [u64]) -> Self {
        Self::with_mask(flags, clocks, u8::MAX)
    }

    /// A guard where only the flag bits in `mask` block eviction.
    pub(crate) fn with_mask(flags: &'a [u8], clocks: &'a [u64], mask: u8) -> Self {
        Guard {
            flags,
            clocks,
            mask,
        }
    }

    /// True if entry `id` may be evicted now (not pinned, not protected, not already chosen).
    /// `id` must be an id the driver assigned (every such id has a flag byte).
    #[inline]
    pub fn evictable(&self, id: u32) -> bool {
        self.flags[id as usize] & self.mask == 0
    }

    /// The step clock of the layer at `layer_pos` now.
    #[inline]
    pub fn clock(&self, layer_pos: u32) -> u64 {
        self.clocks[layer_pos as usize]
    }
}

/// One eviction policy instance (one per pool). The driver calls exactly one of
/// [`on_hit`](Policy::on_hit) / [`on_insert`](Policy::on_insert) per demand access (and
/// `on_insert` per issued prefetch), asks [`to_evict`](Policy::to_evict) for a victim until the
/// new entry fits, then [`remove`](Policy::remove)s each victim before inserting.
pub trait Policy: fmt::Debug + Send {
    /// A resident entry was demanded.
    fn on_hit(&mut self, id: u32, access: &Access);
    /// An entry became resident (it was not resident before).
    fn on_insert(&mut self, id: u32, access: &Access, kind: InsertKind);
    /// Names the resident entry to evict next among those the guard allows, without changing any
    /// state; `None` when no resident entry is evictable.
    fn to_evict(&self, guard: &Guard<'_>) -> Option<u32>;
    /// Forgets a resident entry (evicted or dropped).
    fn remove(&mut self, id: u32);
    /// A new request (prompt) starts; its steps follow. Only request-aware policies care.
    fn on_request(&mut self, _request: u32) {}
    /// Experts of the MoE layer at `layer_pos` the policy expects next, most likely first, at
    /// most `n` (`eam-<k>` prefetching); empty for policies that do not predict.
    fn predict(&self, _layer_pos: u32, _n: usize, _out: &mut Vec<u32>) {}
}

/// Expert use counts per layer, e.g. counted from a trace; `static-<N>` pins the top `N` of each
/// layer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FrequencyProfile {
    counts: BTreeMap<u32, Vec<u64>>,
}

impl FrequencyProfile {
    /// An empty profile.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `n` uses of `key`.
    pub fn add(&mut self, key: ExpertKey, n: u64) {
        let v = self.counts.entry(key.layer).or_default();
        let e = key.expert as usize;
        if v.len() <= e {
            v.resize(e + 1, 0);
        }
        v[e] += n;
    }

    /// Replaces the counts of `layer` (`counts[e]` = uses of expert `e`).
    pub fn set_layer(&mut self, layer: u32, counts: Vec<u64>) {
        self.counts.insert(layer, counts);
    }

    /// Uses of `key` counted so far.
    pub fn count(&self, key: ExpertKey) -> u64 {
        self.counts
            .get(&key.layer)
            .and_then(|v| v.get(key.expert as usize))
            .copied()
            .unwrap_or(0)
    }

    /// The `n` most used experts of `layer`, most used first; ties go to the lower expert id;
    /// experts never used are never listed (so fewer than `n` may come back).
    pub fn top(&self, layer: u32, n: usize) -> Vec<u32> {
        let Some(v) = self.counts.get(&layer) else {
            return Vec::new();
        };
        let mut ids: Vec<u32> = (0..v.len() as u32).filter(|&e| v[e as usize] > 0).collect();
        ids.sort_by(|&a, &b| v[b as usize].cmp(&v[a as usize]).then(a.cmp(&b)));
        ids.truncate(n);
        ids
    }
}

/// The resident entries of a scanning policy with their metadata `M`, stored contiguously so a
/// victim scan reads one array (O(1) insert/remove/lookup by id, O(resident) scan).
#[derive(Debug, Clone)]
pub(crate) struct ScanSet<M> {
    slots: Vec<(u32, M)>,
    pos: Vec<u32>,
}

impl<M> Default for ScanSet<M> {
    fn default() -> Self {
        ScanSet {
            slots: Vec::new(),
            pos: Vec::new(),
        }
    }
}

impl<M> ScanSet<M> {
    const ABSENT: u32 = u32::MAX;

    /// Inserts `id` with metadata `m` (replacing the metadata if present).
    pub(crate) fn insert(&mut self, id: u32, m: M) {
        ensure(&mut self.pos, id, Self::ABSENT);
        let p = self.pos[id as usize];
        if p == Self::ABSENT {
            self.pos[id as usize] = self.slots.len() as u32;
            self.slots.push((id, m));
        } else {
            self.slots[p as usize].1 = m;
        }
    }

    /// Removes `id` if present.
    pub(crate) fn remove(&mut self, id: u32) {
        let Some(&p) = self.pos.get(id as usize) else {
            return;
        };
        if p == Self::ABSENT {
            return;
        }
        self.slots.swap_remove(p as usize);
        if let Some(&(moved, _)) = self.slots.get(p as usize) {
            self.pos[moved as usize] = p;
        }
        self.pos[id as usize] = Self::ABSENT;
    }

    /// The metadata of resident `id`.
    #[inline]
    pub(crate) fn get_mut(&mut self, id: u32) -> &mut M {
        let p = self.pos[id as usize];
        &mut self.slots[p as usize].1
    }

    /// The resident (id, metadata) pairs, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &(u32, M)> {
        self.slots.iter()
    }

    /// All resident (id, metadata) pairs, in no particular order.
    #[cfg(test)]
    pub(crate) fn slots(&self) -> &[(u32, M)] {
        &self.slots
    }

    /// The evictable entry with the lowest `score(m)` = `(value, tie)`: the lowest value, ties
    /// to the lowest `tie` (strictly first in scan order on a full tie).
    #[inline]
    pub(crate) fn lowest(
        &self,
        guard: &Guard<'_>,
        score: impl Fn(&M) -> (f64, u64),
    ) -> Option<u32> {
        let (mut bv, mut bt, mut best) = (f64::INFINITY, u64::MAX, None);
        for (id, m) in &self.slots {
            if !guard.evictable(*id) {
                continue;
            }
            let (v, t) = score(m);
            if v < bv || (v == bv && t < bt) {
                (bv, bt, best) = (v, t, Some(*id));
            }
        }
        best
    }
}

/// `base^(age / horizon)` with the first ages precomputed (same bits as computing it directly).
#[derive(Debug, Clone)]
pub(crate) struct DecayTable {
    base: f64,
    horizon: f64,
    table: Vec<f64>,
}

impl DecayTable {
    const LEN: u64 = 1024;

    pub(crate) fn new(base: f64, horizon: f64) -> Self {
        let table = (0..Self::LEN)
            .map(|a| base.powf(a as f64 / horizon))
            .collect();
        DecayTable {
            base,
            horizon,
            table,
        }
    }

    #[inline]
    pub(crate) fn at(&self, age: u64) -> f64 {
        if age < Self::LEN {
            self.table[age as usize]
        } else {
            self.base.powf(age as f64 / self.horizon)
        }
    }
}

/// Grows `v` so that index `id` exists.
#[inline]
pub(crate) fn ensure<T: Clone>(v: &mut Vec<T>, id: u32, fill: T) {
    let i = id as usize;
    if v.len() <= i {
        v.resize(i + 1, fill);
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! A tiny single-pool harness to drive a policy directly in unit tests.
    use super::*;

    /// An access of `expert` at layer position `layer_pos` (layer id = position), with `clock`,
    /// pool event `seq` and router `weight`.
    pub(crate) fn access(layer_pos: u32, expert: u32, clock: u64, seq: u64, weight: f32) -> Access {
        Access {
            key: ExpertKey {
                layer: layer_pos,
                expert,
            },
            layer_pos,
            clock,
            next_use: u64::MAX,
            seq,
            weight,
        }
    }

    /// Drives one policy as a unit-size cache of `cap` entries (classic: every access a step).
    pub(crate) struct Harness {
        pub(crate) policy: Box<dyn Policy>,
        pub(crate) cap: usize,
        pub(crate) resident: Vec<bool>,
        pub(crate) flags: Vec<u8>,
        pub(crate) clock: [u64; 1],
        pub(crate) seq: u64,
    }

    impl Harness {
        pub(crate) fn new(policy: Box<dyn Policy>, cap: usize) -> Self {
            Harness {
                policy,
                cap,
                resident: vec![false; 64],
                flags: vec![0; 64],
                clock: [0],
                seq: 0,
            }
        }

        /// One access of expert `e`; returns (hit, evicted victim).
        pub(crate) fn access(&mut self, e: u32, next_use: u64) -> (bool, Option<u32>) {
            self.clock[0] += 1;
            self.seq += 1;
            let a = Access {
                key: ExpertKey {
                    layer: 0,
                    expert: e,
                },
                layer_pos: 0,
                clock: self.clock[0],
                next_use,
                seq: self.seq,
                weight: 1.0,
            };
            if self.resident[e as usize] {
                self.policy.on_hit(e, &a);
                return (true, None);
            }
            let mut victim = None;
            if self.resident.iter().filter(|r| **r).count() >= self.cap {
                let v = self
                    .policy
                    .to_evict(&Guard::new(&self.flags, &self.clock))
                    .expect("victim");
                self.policy.remove(v);
                self.resident[v as usize] = false;
                victim = Some(v);
            }
            self.policy.on_insert(e, &a, InsertKind::Demand);
            self.resident[e as usize] = true;
            (false, victim)
        }

        /// Runs a sequence; returns the hit/miss string (`H`/`m`).
        pub(crate) fn run(&mut self, seq: &[u32]) -> String {
            seq.iter()
                .map(|&e| if self.access(e, u64::MAX).0 { 'H' } else { 'm' })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests;
