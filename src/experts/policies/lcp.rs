//! `lcp-<base>-<horizon>`: flash-moe's "least critical priority".
//!
//! Priority `count · base^(steps_since_use / horizon)`, lowest evicted (mlx-moe / flash-moe
//! `ExpertCache._priority`, with `count` the entry's demand uses since it was loaded, forgotten on
//! eviction, and `steps_since_use` the number of steps of the entry's layer since its last
//! demand or load). A prefetched entry starts at count 0 (priority 0). Ties go to the entry loaded
//! first (flash-moe scans its dict in insertion order and keeps the first strict minimum).

use super::{Access, DecayTable, Guard, InsertKind, Policy, ScanSet};

/// Per resident entry.
#[derive(Debug, Clone, Copy)]
struct Meta {
    /// Demand uses since loaded (an integer, kept as f64 for the priority product).
    count: f64,
    last_use: u64,
    layer_pos: u32,
    loaded: u64,
}

/// Least-critical-priority metadata of the resident entries of one pool.
#[derive(Debug, Clone)]
pub struct Lcp {
    decay: DecayTable,
    resident: ScanSet<Meta>,
}

impl Lcp {
    /// A policy with priority `count · base^(age / horizon)`.
    pub fn new(base: f64, horizon: f64) -> Self {
        Lcp {
            decay: DecayTable::new(base, horizon),
            resident: ScanSet::default(),
        }
    }
}

impl Policy for Lcp {
    #[inline]
    fn on_hit(&mut self, id: u32, access: &Access) {
        let m = self.resident.get_mut(id);
        m.count += 1.0;
        m.last_use = access.clock;
    }

    fn on_insert(&mut self, id: u32, access: &Access, kind: InsertKind) {
        let m = Meta {
            count: if kind == InsertKind::Demand { 1.0 } else { 0.0 },
            last_use: access.clock,
            layer_pos: access.layer_pos,
            loaded: access.seq,
        };
        self.resident.insert(id, m);
    }

    fn to_evict(&self, guard: &Guard<'_>) -> Option<u32> {
        // Lowest priority; ties to the entry loaded first.
        self.resident.lowest(guard, |m| {
            let age = guard.clock(m.layer_pos).saturating_sub(m.last_use);
            (m.count * self.decay.at(age), m.loaded)
        })
    }

    fn remove(&mut self, id: u32) {
        self.resident.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::Harness;
    use super::Lcp;

    #[test]
    fn priority_trades_count_against_age() {
        // lcp-0.25-2 (fast decay), cap 2, one step per access.
        // 1 at t1,t2 -> count 2, last use t2. 2 at t3 -> count 1. 3 at t4 misses:
        // p(1) = 2·0.25^(2/2) = 0.5, p(2) = 1·0.25^(1/2) = 0.5: tie -> evict the one loaded
        // first, 1. t5: 2 hits (count 2, t5). t6: 1 misses: p(2)=2·0.25^(1/2)=1, p(3)=1·0.25^1
        // = 0.25 -> 3 evicted. t7: 3 misses.
        let mut h = Harness::new(Box::new(Lcp::new(0.25, 2.0)), 2);
        assert_eq!(h.run(&[1, 1, 2, 3, 2, 1, 3]), "mHmmHmm");
        // Slow decay (horizon 128): at t4 p(1) = 2·0.25^(2/128) ≈ 1.96 > p(2) ≈ 0.99 -> 2 is
        // evicted; t5: 2 misses, p(1) ≈ 1.94 > p(3) ≈ 0.99 -> 3 evicted; t6: 1 hits; t7: 3 misses.
        let mut h = Harness::new(Box::new(Lcp::new(0.25, 128.0)), 2);
        assert_eq!(h.run(&[1, 1, 2, 3, 2, 1, 3]), "mHmmmHm");
    }
}
