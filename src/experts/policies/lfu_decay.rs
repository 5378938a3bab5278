//! `lfu-decay<f>`: LFU whose counts fade by a factor `f` per step of the entry's layer.
//!
//! Definition: an entry's count is 1 when demand-inserted (0 when prefetched); at every later
//! step of its layer the count is multiplied by `f`; a demand hit adds 1 (after the decay of the
//! steps elapsed). The victim has the lowest decayed count; ties go to the least recently used.
//! Counts are forgotten on eviction. Stored lazily as (count, clock of last update), so a step
//! costs nothing: the decayed count at clock `T` is `count · f^(T − t)`.

use super::{Access, DecayTable, Guard, InsertKind, Policy, ScanSet};

/// Per resident entry.
#[derive(Debug, Clone, Copy)]
struct Meta {
    /// Count as of clock `at`.
    count: f64,
    at: u64,
    layer_pos: u32,
    /// Pool event number of the last use.
    last: u64,
}

/// Exponentially decayed in-cache frequency of the resident entries of one pool.
#[derive(Debug, Clone)]
pub struct LfuDecay {
    decay: DecayTable,
    resident: ScanSet<Meta>,
}

impl LfuDecay {
    /// A policy multiplying counts by `factor` per step.
    pub fn new(factor: f64) -> Self {
        LfuDecay {
            decay: DecayTable::new(factor, 1.0),
            resident: ScanSet::default(),
        }
    }
}

impl Policy for LfuDecay {
    fn on_hit(&mut self, id: u32, access: &Access) {
        let decay = &self.decay;
        let m = self.resident.get_mut(id);
        m.count = m.count * decay.at(access.clock.saturating_sub(m.at)) + 1.0;
        m.at = access.clock;
        m.last = access.seq;
    }

    fn on_insert(&mut self, id: u32, access: &Access, kind: InsertKind) {
        let m = Meta {
            count: if kind == InsertKind::Demand { 1.0 } else { 0.0 },
            at: access.clock,
            layer_pos: access.layer_pos,
            last: access.seq,
        };
        self.resident.insert(id, m);
    }

    fn to_evict(&self, guard: &Guard<'_>) -> Option<u32> {
        // Lowest decayed count; ties to the least recently used.
        self.resident.lowest(guard, |m| {
            let age = guard.clock(m.layer_pos).saturating_sub(m.at);
            (m.count * self.decay.at(age), m.last)
        })
    }

    fn remove(&mut self, id: u32) {
        self.resident.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::Harness;
    use super::LfuDecay;

    #[test]
    fn old_popularity_fades() {
        // cap 2, one step per access, f = 0.5.
        // 1 at t1,t2,t3 -> count 1, 1.5, 1.75 (last update t3). 2 at t4 (count 1).
        // t5: 3 misses; 1 is 1.75·0.5² = 0.4375 < 2's 1·0.5 = 0.5 -> 1 is evicted (plain LFU
        // would evict 2). t6: 2 hits. t7: 1 misses.
        let mut h = Harness::new(Box::new(LfuDecay::new(0.5)), 2);
        assert_eq!(h.run(&[1, 1, 1, 2, 3, 2, 1]), "mHHmmHm");
        // With f = 0.9 the history still wins: 1's count is 1, 1.9, 2.71 and at t5
        // 2.71·0.81 = 2.195 > 2's 0.9 -> 2 is evicted; t6: 2 misses and evicts 3 (0.9 <
        // 2.71·0.729); t7: 1 hits.
        let mut h = Harness::new(Box::new(LfuDecay::new(0.9)), 2);
        assert_eq!(h.run(&[1, 1, 1, 2, 3, 2, 1]), "mHHmmmH");
    }
}
