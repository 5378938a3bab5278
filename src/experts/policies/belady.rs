//! `belady`: Bélády's MIN, the offline optimum for unit-size entries.
//!
//! Evicts the resident entry whose next demand is farthest. Like libCacheSim's `Belady`, it does
//! no lookahead of its own: every access carries the position of the same expert's next demand
//! ([`Access::next_use`], `u64::MAX` for never), so only a trace replay can run it. Ties (several
//! entries never used again) go to the least recently used.

use std::collections::BTreeSet;

use super::{Access, Guard, InsertKind, Policy, ScanSet};

/// Per resident entry: (next use, pool event number of the last use).
type Meta = (u64, u64);

/// Next-use positions of the resident entries of one pool, also kept in eviction order
/// (farthest next use, then least recent last use, at the end) so that a victim is found in
/// O(log n) rather than by a scan of every resident entry.
#[derive(Debug, Clone, Default)]
pub struct Belady {
    resident: ScanSet<Meta>,
    order: BTreeSet<(u64, u64, u32)>,
}

impl Belady {
    /// An empty policy.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Policy for Belady {
    #[inline]
    fn on_hit(&mut self, id: u32, access: &Access) {
        let m = self.resident.get_mut(id);
        self.order.remove(&(m.0, !m.1, id));
        *m = (access.next_use, access.seq);
        self.order.insert((access.next_use, !access.seq, id));
    }

    fn on_insert(&mut self, id: u32, access: &Access, _kind: InsertKind) {
        self.resident.insert(id, (access.next_use, access.seq));
        self.order.insert((access.next_use, !access.seq, id));
    }

    fn to_evict(&self, guard: &Guard<'_>) -> Option<u32> {
        // Farthest next use first, among equals the least recent (largest !last); entries the
        // guard blocks (the step's pins, protected prefetches) are passed over.
        self.order
            .iter()
            .rev()
            .find(|&&(_, _, id)| guard.evictable(id))
            .map(|&(_, _, id)| id)
    }

    fn remove(&mut self, id: u32) {
        let m = *self.resident.get_mut(id);
        self.order.remove(&(m.0, !m.1, id));
        self.resident.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::Harness;
    use super::Belady;

    #[test]
    fn evicts_farthest_next_use() {
        // Same as libcachesim 0.3.5 Belady, size 2, on 1 2 3 1 2 3 1 2 3 -> "mmmHmHmHm":
        // t3 (3): next(1)=t4, next(2)=t5 -> evict 2; t5 (2): next(1)=t7, next(3)=t6 -> evict 1;
        // t7 (1): next(3)=t9, next(2)=t8 -> evict 3; t9 (3) misses.
        let seq = [1u32, 2, 3, 1, 2, 3, 1, 2, 3];
        let mut h = Harness::new(Box::new(Belady::new()), 2);
        let mut out = String::new();
        for (t, &e) in seq.iter().enumerate() {
            let next = seq[t + 1..]
                .iter()
                .position(|&x| x == e)
                .map_or(u64::MAX, |p| (t + 1 + p) as u64);
            out.push(if h.access(e, next).0 { 'H' } else { 'm' });
        }
        assert_eq!(out, "mmmHmHmHm");
        // Ties (never used again) go to the least recently used: 4 then 5, both never again;
        // 6 evicts 4.
        let mut h = Harness::new(Box::new(Belady::new()), 2);
        h.access(4, u64::MAX);
        h.access(5, u64::MAX);
        assert_eq!(h.access(6, u64::MAX), (false, Some(4)));
    }
}
