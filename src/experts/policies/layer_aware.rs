//! `layer-aware-<s>`: recency with a preference for shallow layers, after Fate (Fang et al.,
//! 2025), which keeps the experts of shallow layers preferentially because cross-layer gate
//! prefetching predicts deep layers better than shallow ones.
//!
//! Definition: an entry's age is the number of steps of its layer since its last use (a demand
//! hit or an insert); the victim is the evictable entry with the largest weighted age
//! `age · (1 + s·depth)`, where `depth` is 0 at the first MoE layer and 1 at the last (layer
//! position / (MoE layers − 1)); ties go to the least recently used. Every token runs every
//! layer once, so ages of different layers are comparable. Within one layer all weights are
//! equal and the policy is exactly LRU: it only differs from LRU in a global (bytes) pool.

use super::{Access, Guard, InsertKind, Policy, ScanSet};

#[derive(Debug, Clone, Copy)]
struct Meta {
    layer_pos: u32,
    /// Layer clock at the last use.
    at: u64,
    /// Pool event number of the last use.
    last: u64,
}

/// Depth-weighted recency of one pool.
#[derive(Debug, Clone)]
pub struct LayerAware {
    slope: f64,
    layers: usize,
    resident: ScanSet<Meta>,
}

impl LayerAware {
    /// A policy weighting the deepest of `layers` MoE layers' ages by `1 + slope`.
    pub fn new(slope: f64, layers: usize) -> Self {
        LayerAware {
            slope,
            layers,
            resident: ScanSet::default(),
        }
    }

    fn weight(&self, layer_pos: u32) -> f64 {
        let depth = if self.layers > 1 {
            f64::from(layer_pos) / (self.layers - 1) as f64
        } else {
            0.0
        };
        1.0 + self.slope * depth
    }
}

impl Policy for LayerAware {
    fn on_hit(&mut self, id: u32, access: &Access) {
        let m = self.resident.get_mut(id);
        m.at = access.clock;
        m.last = access.seq;
    }

    fn on_insert(&mut self, id: u32, access: &Access, _kind: InsertKind) {
        self.resident.insert(
            id,
            Meta {
                layer_pos: access.layer_pos,
                at: access.clock,
                last: access.seq,
            },
        );
    }

    fn to_evict(&self, guard: &Guard<'_>) -> Option<u32> {
        self.resident.lowest(guard, |m| {
            let age = guard.clock(m.layer_pos).saturating_sub(m.at) as f64;
            (-(age * self.weight(m.layer_pos)), m.last)
        })
    }

    fn remove(&mut self, id: u32) {
        self.resident.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{access, Harness};
    use super::super::{Guard, InsertKind, Policy};
    use super::LayerAware;

    #[test]
    fn one_layer_is_lru() {
        let seq = [1, 2, 3, 1, 4, 2, 5, 1, 3, 3, 6, 2];
        let mut h = Harness::new(Box::new(LayerAware::new(1.0, 4)), 3);
        let mut l = Harness::new(Box::new(super::super::Lru::new()), 3);
        assert_eq!(h.run(&seq), l.run(&seq));
    }

    #[test]
    fn deep_layers_age_faster() {
        // Three MoE layers (depth 0, 0.5, 1), s = 1: weights 1, 1.5, 2.
        let mut p = LayerAware::new(1.0, 3);
        let a = |lp: u32, e: u32, clock: u64, seq: u64| access(lp, e, clock, seq, 1.0);
        // id 0: layer 0 used at its clock 1; id 1: layer 2 used at its clock 3.
        p.on_insert(0, &a(0, 0, 1, 1), InsertKind::Demand);
        p.on_insert(1, &a(2, 0, 3, 2), InsertKind::Demand);
        let flags = [0u8; 2];
        // Clocks now 5 (layer 0) and 6 (layer 2): ages 4 and 3, weighted 4 and 6 -> the deep one.
        assert_eq!(p.to_evict(&Guard::new(&flags, &[5, 0, 6])), Some(1));
        // LRU would pick id 0; with s = 0 it does.
        let mut q = LayerAware::new(0.0, 3);
        q.on_insert(0, &a(0, 0, 1, 1), InsertKind::Demand);
        q.on_insert(1, &a(2, 0, 3, 2), InsertKind::Demand);
        assert_eq!(q.to_evict(&Guard::new(&flags, &[5, 0, 6])), Some(0));
        // Ages 8 and 3: weighted 8 > 6 -> the shallow one is old enough to go.
        assert_eq!(p.to_evict(&Guard::new(&flags, &[9, 0, 6])), Some(0));
    }
}
