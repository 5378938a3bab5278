//! `lru`: least recently used, as an intrusive doubly linked list over the pool's dense ids.
//!
//! Demand hits and inserts (demand or prefetch) move an entry to the most-recent end; the victim
//! is the least recent entry the guard allows (pinned or protected ones are skipped, in order).
//! Same semantics as libCacheSim's `LRU`.

use super::{ensure, Access, Guard, InsertKind, Policy};

const NIL: u32 = u32::MAX;

/// Least-recently-used order of the resident entries of one pool.
#[derive(Debug, Clone)]
pub struct Lru {
    prev: Vec<u32>,
    next: Vec<u32>,
    linked: Vec<bool>,
    /// Most recently used.
    head: u32,
    /// Least recently used.
    tail: u32,
}

impl Default for Lru {
    fn default() -> Self {
        Self::new()
    }
}

impl Lru {
    /// An empty list.
    pub fn new() -> Self {
        Lru {
            prev: Vec::new(),
            next: Vec::new(),
            linked: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }

    fn push_front(&mut self, id: u32) {
        ensure(&mut self.prev, id, NIL);
        ensure(&mut self.next, id, NIL);
        ensure(&mut self.linked, id, false);
        let i = id as usize;
        self.prev[i] = NIL;
        self.next[i] = self.head;
        if self.head != NIL {
            self.prev[self.head as usize] = id;
        } else {
            self.tail = id;
        }
        self.head = id;
        self.linked[i] = true;
    }

    fn unlink(&mut self, id: u32) {
        let i = id as usize;
        let (p, n) = (self.prev[i], self.next[i]);
        if p != NIL {
            self.next[p as usize] = n;
        } else {
            self.head = n;
        }
        if n != NIL {
            self.prev[n as usize] = p;
        } else {
            self.tail = p;
        }
        self.linked[i] = false;
    }

    /// True if `id` is in the list.
    pub fn contains(&self, id: u32) -> bool {
        self.linked.get(id as usize).copied().unwrap_or(false)
    }

    /// Moves `id` to the most-recent end (inserting it if absent).
    pub fn touch(&mut self, id: u32) {
        if self.head == id {
            return;
        }
        if self.contains(id) {
            self.unlink(id);
        }
        self.push_front(id);
    }
}

impl Policy for Lru {
    #[inline]
    fn on_hit(&mut self, id: u32, _access: &Access) {
        self.touch(id);
    }

    fn on_insert(&mut self, id: u32, _access: &Access, _kind: InsertKind) {
        self.touch(id);
    }

    fn to_evict(&self, guard: &Guard<'_>) -> Option<u32> {
        let mut c = self.tail;
        while c != NIL {
            if guard.evictable(c) {
                return Some(c);
            }
            c = self.prev[c as usize];
        }
        None
    }

    fn remove(&mut self, id: u32) {
        if self.contains(id) {
            self.unlink(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::Harness;
    use super::super::Guard;
    use super::Lru;

    #[test]
    fn evicts_least_recent() {
        // cap 2: 1 m, 2 m, 1 H (order 1,2), 3 m evicts 2, 2 m evicts 1, 3 H, 1 m evicts 2.
        let mut h = Harness::new(Box::new(Lru::new()), 2);
        assert_eq!(h.run(&[1, 2, 1, 3, 2, 3, 1]), "mmHmmHm");
    }

    #[test]
    fn skips_guarded_entries_in_order() {
        let mut h = Harness::new(Box::new(Lru::new()), 3);
        h.run(&[1, 2, 3]); // LRU order (least first): 1, 2, 3
        h.flags[1] = 1;
        h.flags[2] = 2;
        let g = Guard::new(&h.flags, &h.clock);
        assert_eq!(h.policy.to_evict(&g), Some(3));
        h.flags[3] = 4;
        let g = Guard::new(&h.flags, &h.clock);
        assert_eq!(h.policy.to_evict(&g), None);
    }
}
