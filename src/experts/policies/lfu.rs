//! `lfu`: in-cache least frequently used, with libCacheSim's tie-break.
//!
//! The count starts at 1 on a demand insert (0 on a prefetch insert: a prefetch is not a use),
//! grows by 1 per demand hit, and is forgotten on eviction. The victim has the lowest count; among
//! equal counts, the one least recently used.
//!
//! Tie-break, as libCacheSim does it (`libCacheSim/cache/eviction/LFU.c`, checked against the
//! PyPI package `libcachesim` 0.3.5): objects sit in one FIFO list per frequency; a hit moves the
//! object to the *tail* of the next frequency's list, an insert appends to the frequency-1 list,
//! and eviction takes the *head* of the lowest non-empty frequency. Since every use changes the
//! frequency, the head of a list is the object that entered that frequency first, i.e. the one
//! whose last use is oldest: the minimum of `(count, last use)`. We keep the same structure
//! (O(1) per hit, insert and eviction): a list of frequency nodes in increasing count, each with
//! its entries in the order they reached that count; a victim search walks from the lowest
//! count's oldest entry, skipping entries the guard blocks.

use super::{ensure, Access, Guard, InsertKind, Policy};

const NIL: u32 = u32::MAX;

/// One frequency: its entries, oldest first, and its neighbours in increasing count.
#[derive(Debug, Clone, Copy)]
struct FreqNode {
    count: u64,
    head: u32,
    tail: u32,
    prev: u32,
    next: u32,
}

/// In-cache frequencies of the resident entries of one pool, libCacheSim-style.
#[derive(Debug, Clone)]
pub struct Lfu {
    /// Per entry id: its frequency node (NIL when not resident), and list neighbours.
    node: Vec<u32>,
    prev: Vec<u32>,
    next: Vec<u32>,
    nodes: Vec<FreqNode>,
    free_nodes: Vec<u32>,
    /// The node with the lowest count.
    first: u32,
}

impl Default for Lfu {
    fn default() -> Self {
        Self::new()
    }
}

impl Lfu {
    /// An empty policy.
    pub fn new() -> Self {
        Lfu {
            node: Vec::new(),
            prev: Vec::new(),
            next: Vec::new(),
            nodes: Vec::new(),
            free_nodes: Vec::new(),
            first: NIL,
        }
    }

    /// A new empty node for `count`, linked between `prev` and `next`.
    fn new_node(&mut self, count: u64, prev: u32, next: u32) -> u32 {
        let n = FreqNode {
            count,
            head: NIL,
            tail: NIL,
            prev,
            next,
        };
        let i = match self.free_nodes.pop() {
            Some(i) => {
                self.nodes[i as usize] = n;
                i
            }
            None => {
                self.nodes.push(n);
                (self.nodes.len() - 1) as u32
            }
        };
        if prev == NIL {
            self.first = i;
        } else {
            self.nodes[prev as usize].next = i;
        }
        if next != NIL {
            self.nodes[next as usize].prev = i;
        }
        i
    }

    /// Appends entry `id` to node `n` (it becomes the newest of that count).
    fn append(&mut self, n: u32, id: u32) {
        let i = id as usize;
        let tail = self.nodes[n as usize].tail;
        self.prev[i] = tail;
        self.next[i] = NIL;
        if tail == NIL {
            self.nodes[n as usize].head = id;
        } else {
            self.next[tail as usize] = id;
        }
        self.nodes[n as usize].tail = id;
        self.node[i] = n;
    }

    /// Unlinks entry `id` from its node, freeing the node if it empties.
    fn detach(&mut self, id: u32) {
        let i = id as usize;
        let n = self.node[i];
        let (p, x) = (self.prev[i], self.next[i]);
        if p == NIL {
            self.nodes[n as usize].head = x;
        } else {
            self.next[p as usize] = x;
        }
        if x == NIL {
            self.nodes[n as usize].tail = p;
        } else {
            self.prev[x as usize] = p;
        }
        self.node[i] = NIL;
        let node = self.nodes[n as usize];
        if node.head == NIL {
            if node.prev == NIL {
                self.first = node.next;
            } else {
                self.nodes[node.prev as usize].next = node.next;
            }
            if node.next != NIL {
                self.nodes[node.next as usize].prev = node.prev;
            }
            self.free_nodes.push(n);
        }
    }

    /// The count of resident `id`.
    #[cfg(test)]
    fn count(&self, id: u32) -> u64 {
        self.nodes[self.node[id as usize] as usize].count
    }
}

impl Policy for Lfu {
    #[inline]
    fn on_hit(&mut self, id: u32, _access: &Access) {
        let n = self.node[id as usize];
        let FreqNode { count, next, .. } = self.nodes[n as usize];
        let target = if next != NIL && self.nodes[next as usize].count == count + 1 {
            next
        } else {
            self.new_node(count + 1, n, next)
        };
        self.detach(id);
        self.append(target, id);
    }

    fn on_insert(&mut self, id: u32, _access: &Access, kind: InsertKind) {
        ensure(&mut self.node, id, NIL);
        ensure(&mut self.prev, id, NIL);
        ensure(&mut self.next, id, NIL);
        let count = u64::from(kind == InsertKind::Demand);
        // Find the first node with a count >= `count` (at most two steps: count is 0 or 1).
        let (mut before, mut at) = (NIL, self.first);
        while at != NIL && self.nodes[at as usize].count < count {
            before = at;
            at = self.nodes[at as usize].next;
        }
        let n = if at != NIL && self.nodes[at as usize].count == count {
            at
        } else {
            self.new_node(count, before, at)
        };
        self.append(n, id);
    }

    fn to_evict(&self, guard: &Guard<'_>) -> Option<u32> {
        let mut n = self.first;
        while n != NIL {
            let mut e = self.nodes[n as usize].head;
            while e != NIL {
                if guard.evictable(e) {
                    return Some(e);
                }
                e = self.next[e as usize];
            }
            n = self.nodes[n as usize].next;
        }
        None
    }

    fn remove(&mut self, id: u32) {
        if self.node.get(id as usize).is_some_and(|&n| n != NIL) {
            self.detach(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::Harness;
    use super::Lfu;

    #[test]
    fn ties_go_to_least_recent_like_libcachesim() {
        // Both sequences checked with libcachesim 0.3.5 (LFU, cache size 2).
        // 1 2 2 1 3: counts 1:2 (reached at t3), 2:2 (reached at t2) -> 3 evicts 2;
        // 1 H; 2 m (evicts 3, count 1 < 2).
        let mut h = Harness::new(Box::new(Lfu::new()), 2);
        assert_eq!(h.run(&[1, 2, 2, 1, 3, 1, 2]), "mmHHmHm");
        // 1 2 1 2 3: 1 reached count 2 first -> 3 evicts 1; 1 m evicts 3 (count 1); 2 H.
        let mut h = Harness::new(Box::new(Lfu::new()), 2);
        assert_eq!(h.run(&[1, 2, 1, 2, 3, 1, 2]), "mmHHmmH");
    }

    #[test]
    fn a_prefetch_is_not_a_use() {
        // 1 is demand-inserted (count 1), then 2 is prefetched (count 0): although more recent,
        // 2 is the victim.
        use super::super::{Guard, InsertKind, Policy};
        let mut p = Lfu::new();
        let a = |e, seq| super::super::testutil::access(0, e, seq, seq, 1.0);
        p.on_insert(1, &a(1, 1), InsertKind::Demand);
        p.on_insert(2, &a(2, 2), InsertKind::Prefetch);
        let flags = [0u8; 4];
        assert_eq!(p.to_evict(&Guard::new(&flags, &[2])), Some(2));
        assert_eq!((p.count(1), p.count(2)), (1, 0));
        // Its first demand makes it count 1, and the tie goes to the less recent 1.
        p.on_hit(2, &a(2, 3));
        assert_eq!(p.to_evict(&Guard::new(&flags, &[3])), Some(1));
        // A later prefetch (count 0) slots in before both; a demand insert after them.
        p.on_insert(3, &a(3, 4), InsertKind::Prefetch);
        assert_eq!(p.to_evict(&Guard::new(&flags, &[4])), Some(3));
        p.remove(3);
        p.on_hit(1, &a(1, 5));
        p.on_hit(1, &a(1, 6));
        assert_eq!((p.count(1), p.count(2)), (3, 1));
        assert_eq!(p.to_evict(&Guard::new(&flags, &[6])), Some(2));
        // Blocked entries are skipped in order, across frequencies.
        let blocked = [0u8, 0, 1, 0];
        assert_eq!(p.to_evict(&Guard::new(&blocked, &[6])), Some(1));
        let all = [1u8; 4];
        assert_eq!(p.to_evict(&Guard::new(&all, &[6])), None);
    }

    #[test]
    fn matches_a_plain_min_scan_on_random_operations() {
        // Reference: victim = evictable resident with the least (count, last use).
        use super::super::{Access, Guard, InsertKind, Policy};
        use crate::experts::ExpertKey;
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut p = Lfu::new();
        let mut model: Vec<Option<(u64, u64)>> = vec![None; 16];
        let mut flags = [0u8; 16];
        for seq in 1..5000u64 {
            let id = rnd(16) as u32;
            let a = Access {
                key: ExpertKey {
                    layer: 0,
                    expert: id,
                },
                layer_pos: 0,
                clock: seq,
                next_use: u64::MAX,
                seq,
                weight: 1.0,
            };
            match (model[id as usize], rnd(4)) {
                (Some(_), 0) => {
                    p.remove(id);
                    model[id as usize] = None;
                }
                (Some((c, _)), _) => {
                    p.on_hit(id, &a);
                    model[id as usize] = Some((c + 1, seq));
                }
                (None, r) => {
                    let kind = if r == 1 {
                        InsertKind::Prefetch
                    } else {
                        InsertKind::Demand
                    };
                    p.on_insert(id, &a, kind);
                    model[id as usize] = Some((u64::from(kind == InsertKind::Demand), seq));
                }
            }
            for f in flags.iter_mut() {
                *f = u8::from(rnd(5) == 0);
            }
            let want = (0..16u32)
                .filter(|&i| flags[i as usize] == 0)
                .filter_map(|i| model[i as usize].map(|m| (m, i)))
                .min()
                .map(|(_, i)| i);
            assert_eq!(p.to_evict(&Guard::new(&flags, &[seq])), want, "op {seq}");
        }
    }

    #[test]
    fn frequency_beats_recency() {
        // 1 1 1 2 3: 2 (count 1) is evicted by 3, not the older but hotter 1; 1 H; 2 m.
        let mut h = Harness::new(Box::new(Lfu::new()), 2);
        assert_eq!(h.run(&[1, 1, 1, 2, 3, 1, 2]), "mHHmmHm");
    }
}
