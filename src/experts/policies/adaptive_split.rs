//! `adaptive-split`: a slots-per-layer budget divided unevenly between layers, after AdapMoE's
//! per-layer cache allocation (Zhong et al., ICCAD 2024), from a frequency profile.
//!
//! Definition: of a budget of `S` expert slots over `L` MoE layers (`n` per layer, or a byte
//! budget counted in experts), every layer first gets `floor` slots (one token's working set,
//! the router's top-k, so no step can fail); the other `S − floor·L` slots go one at a time to the layer where one more slot would add the most
//! profile hits if the cache held each layer's most used experts: the count of its next most
//! used expert (ties to the shallower layer). Once no layer gains, the rest is dealt round
//! robin. Layers whose routing concentrates on few experts give slots to layers whose routing
//! is spread. AdapMoE allocates by a sensitivity-weighted objective solved by dynamic
//! programming; the greedy split here optimises profile hits of a static cache, which the greedy
//! solves exactly (each layer's gains do not increase). Within a layer, eviction is LRU.

use super::FrequencyProfile;

/// Slots per layer (in `moe_layers` order) for `total` slots in all, each layer keeping at least
/// `floor` (at most an even share).
pub fn split_slots(
    profile: &FrequencyProfile,
    moe_layers: &[u32],
    total: usize,
    floor: usize,
) -> Vec<usize> {
    let slots = total / moe_layers.len().max(1);
    let floor = floor.clamp(1, slots.max(1));
    let counts: Vec<Vec<u64>> = moe_layers
        .iter()
        .map(|&l| {
            let mut c: Vec<u64> = profile
                .top(l, usize::MAX)
                .iter()
                .map(|&e| {
                    profile.count(crate::experts::ExpertKey {
                        layer: l,
                        expert: e,
                    })
                })
                .collect();
            c.sort_unstable_by(|a, b| b.cmp(a));
            c
        })
        .collect();
    let mut alloc = vec![floor.min(slots); moe_layers.len()];
    let mut left = total.saturating_sub(alloc.iter().sum());
    while left > 0 {
        let gain = |l: usize, a: &[usize]| counts[l].get(a[l]).copied().unwrap_or(0);
        let best = (0..alloc.len()).fold(None, |best: Option<usize>, l| match best {
            Some(b) if gain(b, &alloc) >= gain(l, &alloc) => Some(b),
            _ => Some(l),
        });
        match best {
            Some(l) if gain(l, &alloc) > 0 => {
                alloc[l] += 1;
                left -= 1;
            }
            _ => break,
        }
    }
    let n = alloc.len();
    for i in 0..left {
        alloc[i % n] += 1;
    }
    alloc
}

#[cfg(test)]
mod tests {
    use super::split_slots;
    use crate::experts::policies::FrequencyProfile;

    #[test]
    fn concentrated_layers_give_slots_to_spread_ones() {
        // Layer 0: one hot expert (counts 9, 1); layer 1: four equal experts (3 each).
        // n = 3 per layer, floor 1: 6 slots. Layer 0 floor takes 9 (its first), layer 1 takes
        // a 3. Greedy on the next counts: layer 0 offers 1, layer 1 offers 3, 3, 3 -> layer 1
        // gets 3 more (4 total = all its experts), then layer 0 gets its 1 -> [2, 4].
        let mut p = FrequencyProfile::new();
        p.set_layer(0, vec![9, 1, 0, 0]);
        p.set_layer(1, vec![3, 3, 3, 3]);
        assert_eq!(split_slots(&p, &[0, 1], 6, 1), vec![2, 4]);
        // Floor 2: each starts with 2, the 2 left go to layer 1 (3, 3) -> [2, 4].
        assert_eq!(split_slots(&p, &[0, 1], 6, 2), vec![2, 4]);
        // Floor 3 = n: the even split.
        assert_eq!(split_slots(&p, &[0, 1], 6, 3), vec![3, 3]);
        // An odd total (a byte budget in experts): the extra slot is placed too.
        assert_eq!(split_slots(&p, &[0, 1], 7, 3), vec![3, 4]);
        // More slots than any layer can use: the rest dealt round robin, none lost.
        let s = split_slots(&p, &[0, 1], 16, 1);
        assert_eq!(s.iter().sum::<usize>(), 16);
        assert!(s[1] >= 4 && s[0] >= 2);
        // An empty profile: the even split.
        assert_eq!(
            split_slots(&FrequencyProfile::new(), &[0, 1], 8, 2),
            vec![4, 4]
        );
    }
}
