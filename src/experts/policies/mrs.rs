//! `mrs-<a>`: minus-recent-score replacement, after HybriMoE (Zhong et al., DAC 2025).
//!
//! Definition: every expert of the pool (resident or not) has a score, an exponential moving
//! average of its routing weights over the steps of its layer: at each step `s ← a·s + (1−a)·w`,
//! with `w` the router's weight of the expert in that step (0 when not selected). The victim is
//! the resident expert with the lowest score; ties go to the least recently used. Scores
//! survive eviction (they describe the router, not the cache). Prefetched experts keep their
//! score. HybriMoE scores with the router's probabilities of all experts; a routing trace keeps
//! only the selected experts' weights, so here unselected experts decay with `w = 0`. Stored
//! lazily as (score, clock of the last update), so a step costs nothing.

use super::{ensure, Access, DecayTable, Guard, InsertKind, Policy, ScanSet};

#[derive(Debug, Clone, Copy, Default)]
struct Score {
    value: f64,
    at: u64,
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    layer_pos: u32,
    /// Pool event number of the last use.
    last: u64,
}

/// Minus-recent-score of one pool.
#[derive(Debug, Clone)]
pub struct Mrs {
    alpha: f64,
    decay: DecayTable,
    scores: Vec<Score>,
    resident: ScanSet<Meta>,
}

impl Mrs {
    /// A policy with per-step decay `alpha`.
    pub fn new(alpha: f64) -> Self {
        Mrs {
            alpha,
            decay: DecayTable::new(alpha, 1.0),
            scores: Vec::new(),
            resident: ScanSet::default(),
        }
    }

    fn update(&mut self, id: u32, access: &Access) {
        ensure(&mut self.scores, id, Score::default());
        let s = &mut self.scores[id as usize];
        let w = f64::from(access.weight);
        s.value =
            s.value * self.decay.at(access.clock.saturating_sub(s.at)) + (1.0 - self.alpha) * w;
        s.at = access.clock;
    }

    /// The score of `id` at clock `t`.
    fn score(&self, id: u32, t: u64) -> f64 {
        self.scores
            .get(id as usize)
            .map_or(0.0, |s| s.value * self.decay.at(t.saturating_sub(s.at)))
    }
}

impl Policy for Mrs {
    fn on_hit(&mut self, id: u32, access: &Access) {
        self.update(id, access);
        self.resident.get_mut(id).last = access.seq;
    }

    fn on_insert(&mut self, id: u32, access: &Access, kind: InsertKind) {
        if kind == InsertKind::Demand {
            self.update(id, access);
        }
        self.resident.insert(
            id,
            Meta {
                layer_pos: access.layer_pos,
                last: access.seq,
            },
        );
    }

    fn to_evict(&self, guard: &Guard<'_>) -> Option<u32> {
        let mut best: Option<(f64, u64, u32)> = None;
        for &(id, m) in self.resident.iter() {
            if !guard.evictable(id) {
                continue;
            }
            let v = self.score(id, guard.clock(m.layer_pos));
            if best.is_none_or(|(bv, bl, _)| v < bv || (v == bv && m.last < bl)) {
                best = Some((v, m.last, id));
            }
        }
        best.map(|b| b.2)
    }

    fn remove(&mut self, id: u32) {
        self.resident.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{access, Harness};
    use super::super::{Guard, InsertKind, Policy};
    use super::Mrs;

    #[test]
    fn scores_decay_and_survive_eviction() {
        // cap 2, a = 0.5, weight 1 per access (one step each). Hand-checked:
        // t1: 1 -> s1 = 0.5; t2: 1 -> 0.75 (t2); t3: 2 -> s2 = 0.5 (t3).
        // t4: 3 misses: s1 = 0.75·0.25 = 0.1875 < s2 = 0.25 -> 1 goes; s3 = 0.5 (t4).
        // t5: 1 misses: its score is kept: 0.75·0.125 + 0.5 = 0.59375; victims: s2 = 0.125,
        // s3 = 0.25 -> 2 goes. t6: 3 hits.
        let mut h = Harness::new(Box::new(Mrs::new(0.5)), 2);
        assert_eq!(h.run(&[1, 1, 2, 3, 1, 3]), "mHmmmH");
        assert!(h.resident[1] && h.resident[3] && !h.resident[2]);
    }

    #[test]
    fn router_weight_outranks_recency() {
        let mut p = Mrs::new(0.9);
        let a = |e: u32, seq: u64, weight: f32| access(0, e, 1, seq, weight);
        // Same step: expert 1 with weight 0.8, then expert 2 with 0.2 (more recent).
        p.on_insert(1, &a(1, 1, 0.8), InsertKind::Demand);
        p.on_insert(2, &a(2, 2, 0.2), InsertKind::Demand);
        let flags = [0u8; 3];
        assert_eq!(p.to_evict(&Guard::new(&flags, &[2])), Some(2));
        // A prefetch starts at score 0: it goes first.
        p.on_insert(0, &a(0, 3, 0.0), InsertKind::Prefetch);
        assert_eq!(p.to_evict(&Guard::new(&flags, &[2])), Some(0));
    }
}
