//! `static-<N>`: the `N` hottest experts of each layer stay once loaded; LRU for the rest.
//!
//! Definition: the hot set of a layer is [`FrequencyProfile::top`]`(layer, N)` (most used first,
//! ties to the lower id, unused experts never pinned). A hot expert is loaded on its first demand
//! like any other (every policy starts cold, so hit rates compare fairly) and is then never a
//! victim; it occupies budget for the rest of the run. All other experts are managed LRU in the
//! remaining capacity (flash-moe's "pin hot experts from a profile").

use super::{ensure, Access, FrequencyProfile, Guard, InsertKind, Lru, Policy};

/// Hot-set pinning over LRU for one pool.
#[derive(Debug, Clone)]
pub struct StaticHot {
    /// `hot[layer_pos][expert]`.
    hot: Vec<Vec<bool>>,
    permanent: Vec<bool>,
    lru: Lru,
}

impl StaticHot {
    /// Pins the top `n` experts in `profile` of each of `pool_layers` (a subset of
    /// `moe_layers`, which [`Access::layer_pos`] indexes).
    pub fn new(
        n: usize,
        moe_layers: &[u32],
        pool_layers: &[u32],
        profile: &FrequencyProfile,
    ) -> Self {
        let hot = moe_layers
            .iter()
            .map(|&layer| {
                if !pool_layers.contains(&layer) {
                    return Vec::new();
                }
                let top = profile.top(layer, n);
                let mut v = vec![false; top.iter().max().map_or(0, |m| *m as usize + 1)];
                for e in top {
                    v[e as usize] = true;
                }
                v
            })
            .collect();
        StaticHot {
            hot,
            permanent: Vec::new(),
            lru: Lru::new(),
        }
    }

    fn is_hot(&self, access: &Access) -> bool {
        self.hot
            .get(access.layer_pos as usize)
            .and_then(|v| v.get(access.key.expert as usize))
            .copied()
            .unwrap_or(false)
    }
}

impl Policy for StaticHot {
    #[inline]
    fn on_hit(&mut self, id: u32, access: &Access) {
        if !self.permanent[id as usize] {
            self.lru.on_hit(id, access);
        }
    }

    fn on_insert(&mut self, id: u32, access: &Access, kind: InsertKind) {
        ensure(&mut self.permanent, id, false);
        let hot = self.is_hot(access);
        self.permanent[id as usize] = hot;
        if !hot {
            self.lru.on_insert(id, access, kind);
        }
    }

    fn to_evict(&self, guard: &Guard<'_>) -> Option<u32> {
        self.lru.to_evict(guard)
    }

    fn remove(&mut self, id: u32) {
        self.lru.remove(id);
        if let Some(p) = self.permanent.get_mut(id as usize) {
            *p = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::Harness;
    use super::super::{ExpertKey, FrequencyProfile};
    use super::StaticHot;

    #[test]
    fn hot_experts_are_never_victims() {
        // Profile makes expert 1 the single hot one. cap 2:
        // 1 m, 2 m, 3 m (evicts 2: 1 is pinned although least recent), 1 H, 4 m (evicts 3),
        // 2 m (evicts 4), 1 H. Plain LRU would give "mmmmmmm"-like thrash for 1.
        let mut p = FrequencyProfile::new();
        p.add(
            ExpertKey {
                layer: 0,
                expert: 1,
            },
            10,
        );
        p.add(
            ExpertKey {
                layer: 0,
                expert: 2,
            },
            3,
        );
        let mut h = Harness::new(Box::new(StaticHot::new(1, &[0], &[0], &p)), 2);
        assert_eq!(h.run(&[1, 2, 3, 1, 4, 2, 1]), "mmmHmmH");
        // Same trace under LRU, for contrast: 3 evicts 1, so 1 misses at t4.
        let mut h = Harness::new(Box::new(super::Lru::new()), 2);
        assert_eq!(h.run(&[1, 2, 3, 1, 4, 2, 1]), "mmmmmmm");
    }
}
