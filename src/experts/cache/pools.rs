//! The pool-level parts of the access driver: each pool's capacity (the budget's, or
//! `adaptive-split`'s per-layer share), victim selection and eviction, insertion, and the miss
//! actions of a step.

use super::{
    Budget, CacheCore, CacheError, CacheOptions, CacheStats, ExpertKey, Guard, MissAction,
    MissMode, PolicyError, PolicySpec, Pool, Step, StepOutcome, CHOSEN, NO_ID, PINNED, PROTECTED,
    RESIDENT, UNUSED_PREFETCH,
};

impl CacheCore {
    /// Decides what the token runs for each miss of the step (the misses are resident by now,
    /// loading): the miss mode's [`MissAction`], counted in [`CacheStats::miss`].
    pub(super) fn resolve_misses(&mut self, step: &Step<'_>, out: &mut StepOutcome) {
        let mode = self.options.miss;
        let mut candidates = Vec::new();
        if mode == MissMode::Substitute && !out.misses.is_empty() {
            // Resident experts of the layer the token did not select (all of them resident
            // before this step: the step's own misses are among the selected).
            if let Ok(lp) = self.layer_index(step.layer) {
                let ls = &self.layers[lp];
                let pool = &self.pools[ls.pool as usize];
                candidates = (0..ls.ids.len() as u32)
                    .filter(|&e| {
                        let id = ls.ids[e as usize];
                        id != NO_ID
                            && pool.flags[id as usize] & RESIDENT != 0
                            && !step.experts.contains(&e)
                    })
                    .collect();
            }
        }
        let rec = u64::from(self.recording);
        let m = &mut self.stats.miss;
        for k in &out.misses {
            let action = match mode {
                MissMode::Load => MissAction::Load,
                MissMode::Skip => MissAction::Drop,
                MissMode::LowBit => MissAction::LowBit,
                MissMode::CpuCompute => MissAction::Host,
                MissMode::Substitute => match self.coact.best(step.layer, k.expert, &candidates) {
                    Some(s) => MissAction::Substitute(s),
                    None => MissAction::Drop,
                },
            };
            match action {
                MissAction::Load => {}
                MissAction::Drop => m.dropped += rec,
                MissAction::Substitute(_) => m.substituted += rec,
                MissAction::LowBit => m.low_bit += rec,
                MissAction::Host => m.host += rec,
            }
            out.actions.push(action);
        }
        if mode == MissMode::Substitute {
            self.coact.record(step.layer, step.experts);
        }
    }
}

/// Each pool's capacity: the budget's, or for `adaptive-split` the profile's per-layer split of
/// the budget's expert slots (a byte budget counted in experts of `unit_bytes`; one pool per
/// layer even for a global byte budget, each holding its share).
pub(super) fn pool_caps(
    spec: &PolicySpec,
    budget: Budget,
    moe_layers: &[u32],
    options: &CacheOptions,
) -> Result<Vec<u64>, CacheError> {
    let layers = moe_layers.len();
    if !spec.splits_budget() {
        let n_pools = if budget.per_layer() { layers } else { 1 };
        return Ok(vec![budget.pool_capacity(); n_pools]);
    }
    let profile = options
        .profile
        .as_ref()
        .ok_or_else(|| PolicyError::NeedsProfile {
            name: spec.to_string(),
        })?;
    let unit = options.unit_bytes;
    let (total, unit) = match budget {
        Budget::Unlimited => return Ok(vec![budget.pool_capacity(); layers]),
        Budget::SlotsPerLayer(n) => (n * layers, 1),
        _ if unit == 0 => {
            return Err(CacheError::SplitNeedsSlots {
                policy: spec.to_string(),
                budget,
            })
        }
        Budget::BytesPerLayer(b) => ((b / unit) as usize * layers, unit),
        Budget::BytesGlobal(b) => ((b / unit) as usize, unit),
    };
    let slots = crate::experts::policies::split_slots(
        profile,
        moe_layers,
        total,
        options.working_set.max(1),
    );
    Ok(slots.into_iter().map(|s| s as u64 * unit).collect())
}

/// Flag bits that block a prefetch's (and a demand's first-choice) victims.
pub(super) const PREFETCH_MASK: u8 = PINNED | PROTECTED | CHOSEN;
/// Flag bits that block a demand's fallback victims.
pub(super) const DEMAND_MASK: u8 = PINNED | CHOSEN;

/// Picks victims until `cost` more units fit, among entries with no flag bit of `mask`, without
/// evicting; false (and nothing picked) if those entries are not enough.
pub(super) fn select_victims(
    pool: &mut Pool,
    clocks: &[u64],
    victims: &mut Vec<u32>,
    cost: u64,
    mask: u8,
) -> bool {
    victims.clear();
    let mut freed = 0u64;
    let mut ok = true;
    while (pool.used - freed).saturating_add(cost) > pool.cap {
        let v = pool
            .policy
            .to_evict(&Guard::with_mask(&pool.flags, clocks, mask));
        match v {
            Some(v) => {
                debug_assert!(
                    pool.flags[v as usize] & RESIDENT != 0,
                    "victim not resident"
                );
                pool.flags[v as usize] |= CHOSEN;
                freed += pool.entries[v as usize].cost;
                victims.push(v);
            }
            None => {
                ok = false;
                break;
            }
        }
    }
    for &v in victims.iter() {
        pool.flags[v as usize] &= !CHOSEN;
    }
    if !ok {
        victims.clear();
    }
    ok
}

pub(super) fn evict_victims(
    pool: &mut Pool,
    victims: &[u32],
    stats: &mut CacheStats,
    recording: bool,
    evicted: &mut Vec<ExpertKey>,
) {
    for &v in victims {
        pool.policy.remove(v);
        let e = &pool.entries[v as usize];
        let f = &mut pool.flags[v as usize];
        let unused_prefetch = *f & UNUSED_PREFETCH != 0;
        *f &= !(RESIDENT | UNUSED_PREFETCH);
        pool.used -= e.cost;
        stats.resident_bytes -= e.size;
        stats.evictions += u64::from(recording);
        if unused_prefetch {
            stats.prefetch.wasted += 1;
            stats.prefetch.wasted_bytes += e.size;
        }
        evicted.push(e.key);
    }
}

pub(super) fn insert(pool: &mut Pool, id: u32, size: u64, cost: u64, stats: &mut CacheStats) {
    let e = &mut pool.entries[id as usize];
    e.size = size;
    e.cost = cost;
    let f = &mut pool.flags[id as usize];
    *f = (*f | RESIDENT) & !UNUSED_PREFETCH;
    pool.used += cost;
    assert!(pool.used <= pool.cap, "cache over budget");
    stats.resident_bytes += size;
    stats.peak_resident_bytes = stats.peak_resident_bytes.max(stats.resident_bytes);
}
