//! `belady`: Bélády's MIN, the offline optimum for unit-size entries.
//!
//! Evicts the resident entry whose next demand is farthest. Like libCacheSim's `Belady`, it does
//! no lookahead of its own: every access carries the position of the same expert's next demand
//! ([`Access::next_use`], `u64::MAX` for never), so only a trace replay can run it. Ties (several
//! entries never used again) go to the least recently used.

use std::cell::RefCell;
use std::collections::BinaryHeap;

use super::{Access, Guard, InsertKind, Policy};

/// Per resident entry: (next use, pool event number of the last use).
type Meta = (u64, u64);

/// Next-use positions of the resident entries of one pool, plus a max-heap of
/// `(next use, !last use, id)` in which every access pushes a fresh entry and outdated ones are
/// dropped when they reach the top (lazy deletion), so a victim costs O(log n) amortised with
/// no ordered-set rebalancing on the hit path.
#[derive(Debug, Clone, Default)]
pub struct Belady {
    meta: Vec<Option<Meta>>,
    resident: usize,
    heap: RefCell<BinaryHeap<(u64, u64, u32)>>,
}

impl Belady {
    /// An empty policy.
    pub fn new() -> Self {
        Self::default()
    }

    fn set(&mut self, id: u32, m: Meta) {
        let i = id as usize;
        if self.meta.len() <= i {
            self.meta.resize(i + 1, None);
        }
        if self.meta[i].is_none() {
            self.resident += 1;
        }
        self.meta[i] = Some(m);
        let heap = self.heap.get_mut();
        heap.push((m.0, !m.1, id));
        if heap.len() > 8 * self.resident + 256 {
            // Too many outdated entries: rebuild from the resident ones.
            let live: Vec<(u64, u64, u32)> = self
                .meta
                .iter()
                .enumerate()
                .filter_map(|(id, m)| m.map(|m| (m.0, !m.1, id as u32)))
                .collect();
            *heap = BinaryHeap::from(live);
        }
    }

    #[inline]
    fn current(&self, e: &(u64, u64, u32)) -> bool {
        self.meta.get(e.2 as usize).copied().flatten() == Some((e.0, !e.1))
    }
}

impl Policy for Belady {
    #[inline]
    fn on_hit(&mut self, id: u32, access: &Access) {
        self.set(id, (access.next_use, access.seq));
    }

    fn on_insert(&mut self, id: u32, access: &Access, _kind: InsertKind) {
        self.set(id, (access.next_use, access.seq));
    }

    fn to_evict(&self, guard: &Guard<'_>) -> Option<u32> {
        // Farthest next use first, among equals the least recent (largest !last); entries the
        // guard blocks (the step's pins, protected prefetches) are set aside and put back.
        // Only outdated heap entries are discarded: the resident set is unchanged.
        let mut heap = self.heap.borrow_mut();
        let mut held = Vec::new();
        let mut victim = None;
        while let Some(&top) = heap.peek() {
            if !self.current(&top) {
                heap.pop();
            } else if guard.evictable(top.2) {
                victim = Some(top.2);
                break;
            } else {
                held.push(top);
                heap.pop();
            }
        }
        heap.extend(held);
        victim
    }

    fn remove(&mut self, id: u32) {
        if let Some(m) = self.meta.get_mut(id as usize) {
            if m.take().is_some() {
                self.resident -= 1;
            }
        }
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
