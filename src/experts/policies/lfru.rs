//! `lfru-<p>`: an LRU/LFU hybrid in the two-partition form of Bilal & Kang's LFRU (2014), the
//! scheme vLLM's expert-cache discussion and several llama.cpp expert caches adopt.
//!
//! Definition: the resident set is split by recency. The `⌈p·n⌉` most recently used of the `n`
//! resident entries form the *privileged* partition and are never victims while any other entry
//! is evictable; the others form the *unprivileged* partition, evicted by in-cache frequency
//! (count 1 on a demand insert, 0 on a prefetch, +1 per demand hit, forgotten on eviction) with
//! ties to the least recently used. When every unprivileged entry is guarded, the least
//! recently used evictable privileged entry goes. New experts are not evicted by frequency
//! before they had a chance to be used again (LFU's weakness), and a popular expert survives a
//! burst of one-off ones (LRU's).

use std::cell::RefCell;

use super::{Access, Guard, InsertKind, Policy, ScanSet};

#[derive(Debug, Clone, Copy)]
struct Meta {
    count: u64,
    /// Pool event number of the last use (unique within the pool).
    last: u64,
}

/// LFRU over the resident entries of one pool.
#[derive(Debug)]
pub struct Lfru {
    privileged: f64,
    resident: ScanSet<Meta>,
    /// Scratch for the recency threshold.
    lasts: RefCell<Vec<u64>>,
}

impl Lfru {
    /// A policy keeping the most recent fraction `privileged` of the resident set.
    pub fn new(privileged: f64) -> Self {
        Lfru {
            privileged,
            resident: ScanSet::default(),
            lasts: RefCell::new(Vec::new()),
        }
    }

    /// The smallest `last` of the privileged partition (entries at or above it are privileged).
    fn threshold(&self) -> u64 {
        let mut lasts = self.lasts.borrow_mut();
        lasts.clear();
        lasts.extend(self.resident.iter().map(|(_, m)| m.last));
        let n = lasts.len();
        let keep = ((self.privileged * n as f64).ceil() as usize).min(n);
        if keep == 0 {
            return u64::MAX;
        }
        let (_, nth, _) = lasts.select_nth_unstable(n - keep);
        *nth
    }
}

impl Policy for Lfru {
    fn on_hit(&mut self, id: u32, access: &Access) {
        let m = self.resident.get_mut(id);
        m.count += 1;
        m.last = access.seq;
    }

    fn on_insert(&mut self, id: u32, access: &Access, kind: InsertKind) {
        let count = u64::from(kind == InsertKind::Demand);
        self.resident.insert(
            id,
            Meta {
                count,
                last: access.seq,
            },
        );
    }

    fn to_evict(&self, guard: &Guard<'_>) -> Option<u32> {
        let t = self.threshold();
        // Unprivileged first: the lowest count, ties to the least recent; privileged entries
        // score above every unprivileged one and among themselves by recency alone.
        self.resident.lowest(guard, |m| {
            if m.last < t {
                (m.count as f64, m.last)
            } else {
                (f64::INFINITY, m.last)
            }
        })
    }

    fn remove(&mut self, id: u32) {
        self.resident.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::Harness;
    use super::Lfru;

    #[test]
    fn frequency_decides_outside_the_recent_half() {
        // cap 4, p = 0.5: the 2 most recent residents are privileged. Hand-checked:
        // t1-t3: 1 (count 3, last t3); t4-t6: 2, 3, 4 (count 1 each) fill the cache.
        // t7: 5 misses; 3 and 4 are the recent half; of 1 (count 3) and 2 (count 1), 2 goes
        // (LRU would evict 1).
        let mut h = Harness::new(Box::new(Lfru::new(0.5)), 4);
        assert_eq!(h.run(&[1, 1, 1, 2, 3, 4, 5]), "mHHmmmm");
        assert!(!h.resident[2] && h.resident[1]);
        // t8: 1 hits (count 4, last t8). t9: 2 misses; recency 1 (t8) and 5 (t7) are
        // privileged; 3 (t5) and 4 (t6) tie at count 1 -> the less recent 3 goes.
        assert_eq!(h.run(&[1, 2]), "Hm");
        assert!(!h.resident[3] && h.resident[4] && h.resident[5]);
        // t10: 3 misses; privileged 2 (t9) and 1 (t8); 4 (t6) is older than 5 (t7) at equal
        // count -> 4 goes.
        assert_eq!(h.run(&[3]), "m");
        assert!(!h.resident[4] && h.resident[5]);
    }

    #[test]
    fn a_one_off_burst_does_not_flush_a_hot_expert() {
        // cap 4: LRU loses the hot expert 1 to the burst 2, 3, 4, 5; LFRU keeps it (at t6
        // the unprivileged half is 1 (count 2) and 2 (count 1): 2 goes).
        let mut h = Harness::new(Box::new(Lfru::new(0.5)), 4);
        assert_eq!(h.run(&[1, 1, 2, 3, 4, 5, 1]), "mHmmmmH");
        let mut h = Harness::new(Box::new(super::super::Lru::new()), 4);
        assert_eq!(h.run(&[1, 1, 2, 3, 4, 5, 1]), "mHmmmmm");
    }
}
