//! Unit tests of the access driver: budgets, pins, pools, prefetch protection, clocks.

use super::*;

fn k(layer: u32, expert: u32) -> ExpertKey {
    ExpertKey { layer, expert }
}

fn spec(s: &str) -> PolicySpec {
    PolicySpec::parse(s).unwrap()
}

/// Runs one step of `layer` demanding `experts` (unit size); returns the hit pattern.
fn step(c: &mut CacheCore, layer: u32, experts: &[u32]) -> String {
    c.begin_step(layer, Phase::Decode, experts).unwrap();
    let s = experts
        .iter()
        .map(|&e| {
            if c.access(k(layer, e), 1, u64::MAX).unwrap().hit {
                'H'
            } else {
                'm'
            }
        })
        .collect();
    c.end_step();
    s
}

#[test]
fn construction_is_validated() {
    let lru = spec("lru");
    assert_eq!(
        CacheCore::new(&lru, Budget::SlotsPerLayer(2), &[]).unwrap_err(),
        CacheError::NoLayers
    );
    assert_eq!(
        CacheCore::new(&lru, Budget::SlotsPerLayer(0), &[1]).unwrap_err(),
        CacheError::ZeroBudget(Budget::SlotsPerLayer(0))
    );
    assert_eq!(
        CacheCore::new(&lru, Budget::SlotsPerLayer(2), &[1, 3, 1]).unwrap_err(),
        CacheError::DuplicateLayer(1)
    );
    let e = CacheCore::new(&spec("static-2"), Budget::SlotsPerLayer(4), &[1]).unwrap_err();
    assert!(
        matches!(e, CacheError::Policy(PolicyError::NeedsProfile { .. })),
        "{e}"
    );
    let opts = CacheOptions {
        classic: false,
        profile: Some(FrequencyProfile::new()),
        ..Default::default()
    };
    let e = CacheCore::with_options(&spec("static-4"), Budget::SlotsPerLayer(4), &[1], opts)
        .unwrap_err();
    assert!(
        matches!(e, CacheError::StaticTooLarge { n: 4, slots: 4, .. }),
        "{e}"
    );
}

#[test]
fn unknown_layer_and_step_misuse_are_errors() {
    let mut c = CacheCore::new(&spec("lru"), Budget::SlotsPerLayer(2), &[1, 3]).unwrap();
    let e = c.begin_step(2, Phase::Decode, &[]).unwrap_err();
    assert!(e.to_string().contains("MoE layers: 1, 3"), "{e}");
    assert!(matches!(
        c.access(k(1, 0), 1, u64::MAX).unwrap_err(),
        CacheError::OutsideStep { layer: 1, .. }
    ));
    c.begin_step(1, Phase::Decode, &[0]).unwrap();
    assert!(matches!(
        c.begin_step(3, Phase::Decode, &[]).unwrap_err(),
        CacheError::StepOpen { layer: 3, open: 1 }
    ));
    assert!(matches!(
        c.access(k(3, 0), 1, u64::MAX).unwrap_err(),
        CacheError::OutsideStep { layer: 3, .. }
    ));
    assert!(matches!(
        c.access(k(1, MAX_EXPERT_ID), 1, u64::MAX).unwrap_err(),
        CacheError::ExpertOutOfRange { .. }
    ));
    c.end_step();
    c.end_step(); // no-op
    assert_eq!(c.stats().accesses, 0);
    // A prefetch is a hint: an unknown layer is dropped, not an error.
    assert!(!c.prefetch(k(2, 0), 1, u64::MAX).issued);
    assert_eq!(c.stats().prefetch.dropped, 1);
}

#[test]
fn per_layer_slots_are_independent_pools() {
    // Two layers with 2 slots each under LRU: layer 3's traffic never evicts layer 1.
    let mut c = CacheCore::new(&spec("lru"), Budget::SlotsPerLayer(2), &[1, 3]).unwrap();
    assert_eq!(step(&mut c, 1, &[0, 1]), "mm");
    assert_eq!(step(&mut c, 3, &[0, 1]), "mm");
    assert_eq!(step(&mut c, 3, &[2, 5]), "mm");
    assert_eq!(step(&mut c, 1, &[1, 0]), "HH");
    let s = c.stats();
    assert_eq!((s.accesses, s.hits, s.misses, s.evictions), (8, 2, 6, 2));
    assert_eq!(
        s.per_layer[0],
        LayerStats {
            layer: 1,
            accesses: 4,
            hits: 2
        }
    );
    assert_eq!(
        s.per_layer[1],
        LayerStats {
            layer: 3,
            accesses: 4,
            hits: 0
        }
    );
    assert_eq!(s.decode.accesses, 8);
    assert_eq!(c.resident_bytes(), 4);
    assert!(c.contains(k(3, 2)) && !c.contains(k(3, 0)));
}

#[test]
fn step_pins_all_demanded_experts_up_front() {
    // LRU, 2 slots. Resident 0 (older) and 1. Step demands [2, 0]: the miss on 2 must not
    // evict 0 (pinned by the step although accessed second), so it evicts 1, and 0 hits.
    let mut c = CacheCore::new(&spec("lru"), Budget::SlotsPerLayer(2), &[0]).unwrap();
    step(&mut c, 0, &[0]);
    step(&mut c, 0, &[1]);
    assert_eq!(step(&mut c, 0, &[2, 0]), "mH");
    assert!(c.contains(k(0, 2)) && c.contains(k(0, 0)) && !c.contains(k(0, 1)));
    // Classic mode on the same sequence: the miss on 2 evicts 0, which then misses.
    let mut c = CacheCore::new_classic(&spec("lru"), Budget::SlotsPerLayer(2), &[0]).unwrap();
    let hits: Vec<bool> = [0, 1, 2, 0]
        .iter()
        .map(|&e| c.access(k(0, e), 1, u64::MAX).unwrap().hit)
        .collect();
    assert_eq!(hits, [false, false, false, false]);
}

#[test]
fn without_an_up_front_list_experts_are_pinned_at_access() {
    // begin_step with no list: a just-loaded expert is still never evicted by its own step.
    let mut c = CacheCore::new(&spec("lru"), Budget::SlotsPerLayer(1), &[0]).unwrap();
    c.begin_step(0, Phase::Decode, &[]).unwrap();
    assert!(!c.access(k(0, 0), 1, u64::MAX).unwrap().hit);
    assert!(matches!(
        c.access(k(0, 1), 1, u64::MAX).unwrap_err(),
        CacheError::BudgetTooSmall { locked: 1, .. }
    ));
    c.end_step();
    assert_eq!(step(&mut c, 0, &[1]), "m");
}

#[test]
fn working_set_above_budget_is_a_clear_error() {
    let mut c = CacheCore::new(&spec("lru"), Budget::SlotsPerLayer(2), &[4]).unwrap();
    c.begin_step(4, Phase::Decode, &[0, 1, 2]).unwrap();
    c.access(k(4, 0), 1, u64::MAX).unwrap();
    c.access(k(4, 1), 1, u64::MAX).unwrap();
    let e = c.access(k(4, 2), 1, u64::MAX).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with("budget below one token's working set: layer 4"),
        "{msg}"
    );
    assert!(matches!(
        e,
        CacheError::BudgetTooSmall {
            locked: 2,
            cap: 2,
            ..
        }
    ));
    // Nothing changed: the failed access is not counted and nothing was evicted.
    assert_eq!((c.stats().accesses, c.stats().evictions), (2, 0));
    // Bytes: an expert larger than the whole pool.
    let mut c = CacheCore::new(&spec("lru"), Budget::BytesPerLayer(100), &[0]).unwrap();
    c.begin_step(0, Phase::Decode, &[0]).unwrap();
    assert!(matches!(
        c.access(k(0, 0), 101, u64::MAX).unwrap_err(),
        CacheError::TooLarge {
            need: 101,
            cap: 100,
            ..
        }
    ));
}

#[test]
fn byte_budget_evicts_until_it_fits() {
    // 100 bytes per layer. 40 + 40 resident; a 70-byte expert needs both evicted (LRU).
    let mut c = CacheCore::new(&spec("lru"), Budget::BytesPerLayer(100), &[0]).unwrap();
    for (e, size) in [(0, 40), (1, 40)] {
        c.begin_step(0, Phase::Prefill, &[e]).unwrap();
        c.access(k(0, e), size, u64::MAX).unwrap();
        c.end_step();
    }
    c.begin_step(0, Phase::Decode, &[2]).unwrap();
    let out = c.access(k(0, 2), 70, u64::MAX).unwrap();
    c.end_step();
    assert_eq!(out.evicted, vec![k(0, 0), k(0, 1)]);
    assert_eq!(c.resident_bytes(), 70);
    assert_eq!(c.stats().peak_resident_bytes, 80);
    assert_eq!(c.stats().prefill.accesses, 2);
    assert_eq!(c.stats().bytes_loaded, 150);
}

#[test]
fn global_budget_takes_victims_from_any_layer() {
    // One 3-byte pool over layers 0 and 1 (unit sizes), LRU.
    let mut c = CacheCore::new(&spec("lru"), Budget::BytesGlobal(3), &[0, 1]).unwrap();
    step(&mut c, 0, &[0, 1]);
    step(&mut c, 1, &[0]);
    step(&mut c, 1, &[1]); // evicts layer 0's expert 0, the least recent overall
    assert!(!c.contains(k(0, 0)) && c.contains(k(0, 1)));
    assert_eq!(c.resident().len(), 3);
    assert!(c.stats().peak_resident_bytes <= 3);
}

#[test]
fn prefetch_is_protected_for_one_step_then_ordinary() {
    // Layers 0 and 1, 2 slots each, LRU.
    let mut c = CacheCore::new(&spec("lookahead"), Budget::SlotsPerLayer(2), &[0, 1]).unwrap();
    step(&mut c, 1, &[0, 1]); // layer 1 holds 0, 1
                              // During layer 0's step, prefetch experts 2 and 3 of layer 1.
    c.begin_step(0, Phase::Decode, &[0]).unwrap();
    c.access(k(0, 0), 1, u64::MAX).unwrap();
    let p = c.prefetch(k(1, 2), 1, u64::MAX);
    assert!(p.issued);
    assert_eq!(p.evicted, vec![k(1, 0)]);
    let p = c.prefetch(k(1, 3), 1, u64::MAX);
    assert_eq!(p.evicted, vec![k(1, 1)]);
    // Both slots now hold protected prefetches: a third one is dropped, evicting nothing.
    let p = c.prefetch(k(1, 4), 1, u64::MAX);
    assert!(!p.issued && p.evicted.is_empty());
    // Already resident: not issued.
    assert!(!c.prefetch(k(1, 2), 1, u64::MAX).issued);
    c.end_step();
    // Layer 1's next step demands 2 (prefetched: hit) and 5. Only 3 is not pinned, and it
    // is protected: a demand falls back to protected victims rather than failing.
    c.begin_step(1, Phase::Decode, &[2, 5]).unwrap();
    let o = c.access(k(1, 2), 1, u64::MAX).unwrap();
    assert!(o.hit && o.was_prefetched);
    assert_eq!(
        c.access(k(1, 5), 1, u64::MAX).unwrap().evicted,
        vec![k(1, 3)]
    );
    c.end_step();
    // Layer 0 again; prefetch 6 into layer 1: 2's protection ended with layer 1's step, so
    // it is an ordinary LRU victim now.
    assert_eq!(step(&mut c, 0, &[0]), "H");
    c.begin_step(0, Phase::Decode, &[0]).unwrap();
    assert_eq!(c.prefetch(k(1, 6), 1, u64::MAX).evicted, vec![k(1, 2)]);
    c.end_step();
    // Layer 1 demands 7: 5 is the LRU victim (and 6 is protected during this step).
    c.begin_step(1, Phase::Decode, &[7]).unwrap();
    assert_eq!(
        c.access(k(1, 7), 1, u64::MAX).unwrap().evicted,
        vec![k(1, 5)]
    );
    c.end_step();
    // Protection over: 6 (never demanded) is the LRU victim: wasted.
    c.begin_step(1, Phase::Decode, &[8]).unwrap();
    assert_eq!(
        c.access(k(1, 8), 1, u64::MAX).unwrap().evicted,
        vec![k(1, 6)]
    );
    c.end_step();
    let s = c.stats();
    assert_eq!(s.prefetch.issued, 3);
    assert_eq!(s.prefetch.dropped, 1);
    assert_eq!(s.prefetch.already_resident, 1);
    assert_eq!(s.prefetch.used, 1);
    assert_eq!((s.prefetch.wasted, s.prefetch.wasted_bytes), (2, 2));
    assert_eq!(s.prefetch_precision(), Some(1.0 / 3.0));
    // Misses: layer 1's 0, 1, 5, 7, 8 and layer 0's 0 -> 6; recall = 1 / (1 + 6).
    assert_eq!(s.misses, 6);
    assert_eq!(s.prefetch_recall(), Some(1.0 / 7.0));
}

#[test]
fn demand_prefers_unprotected_victims() {
    // Layer 1 with 3 slots, LFU. Resident: 0 (count 3), 1 (count 1). A prefetch of 2 has
    // count 0, the lowest. The next layer-1 step demands 3: LFU's favourite victim is the
    // protected 2, so 1 is evicted instead; after that step 2 is fair game.
    let mut c = CacheCore::new(&spec("lookahead-lfu"), Budget::SlotsPerLayer(3), &[0, 1]).unwrap();
    step(&mut c, 1, &[0]);
    step(&mut c, 1, &[0]);
    step(&mut c, 1, &[0, 1]);
    c.begin_step(0, Phase::Decode, &[9]).unwrap();
    c.access(k(0, 9), 1, u64::MAX).unwrap();
    assert!(c.prefetch(k(1, 2), 1, u64::MAX).issued);
    c.end_step();
    c.begin_step(1, Phase::Decode, &[3]).unwrap();
    assert_eq!(
        c.access(k(1, 3), 1, u64::MAX).unwrap().evicted,
        vec![k(1, 1)]
    );
    c.end_step();
    c.begin_step(1, Phase::Decode, &[4]).unwrap();
    assert_eq!(
        c.access(k(1, 4), 1, u64::MAX).unwrap().evicted,
        vec![k(1, 2)]
    );
    c.end_step();
}

#[test]
fn prefetch_never_evicts_pinned_experts() {
    // Global pool of 2 bytes over layers 0, 1: layer 0's step pins both resident experts.
    let mut c = CacheCore::new(&spec("lookahead"), Budget::BytesGlobal(2), &[0, 1]).unwrap();
    c.begin_step(0, Phase::Decode, &[0, 1]).unwrap();
    c.access(k(0, 0), 1, u64::MAX).unwrap();
    c.access(k(0, 1), 1, u64::MAX).unwrap();
    let p = c.prefetch(k(1, 7), 1, u64::MAX);
    assert!(!p.issued && p.evicted.is_empty());
    c.end_step();
    // Unpinned now: the prefetch evicts the LRU one.
    let p = c.prefetch(k(1, 7), 1, u64::MAX);
    assert_eq!(p.evicted, vec![k(0, 0)]);
}

#[test]
fn reset_forgets_everything() {
    let mut c = CacheCore::new(&spec("lfu"), Budget::SlotsPerLayer(2), &[0]).unwrap();
    step(&mut c, 0, &[0, 1]);
    c.reset();
    assert_eq!(c.stats().accesses, 0);
    assert_eq!(c.resident_bytes(), 0);
    assert!(!c.contains(k(0, 0)));
    assert_eq!(step(&mut c, 0, &[0]), "m");
}

#[test]
fn classic_mode_ticks_the_clock_per_access() {
    // lcp-0.25-2 in classic mode must reproduce the policy's unit test sequence
    // (one step per access): "mHmmHmm".
    let mut c =
        CacheCore::new_classic(&spec("lcp-0.25-2"), Budget::SlotsPerLayer(2), &[0]).unwrap();
    let s: String = [1, 1, 2, 3, 2, 1, 3]
        .iter()
        .map(|&e| {
            if c.access(k(0, e), 1, u64::MAX).unwrap().hit {
                'H'
            } else {
                'm'
            }
        })
        .collect();
    assert_eq!(s, "mHmmHmm");
}

#[test]
fn stepped_lcp_counts_steps_not_accesses() {
    // lcp-0.25-1, 3 slots, one layer. Priority = count · 0.25^(steps since last use).
    // s1 [0]: 0 count 1. s2 [0, 1]: 0 hits (count 2), 1 loads (count 1); both last used in
    // step 2. s3 [2, 3]: 2 loads into the free slot; 3 needs a victim among 0 and 1 (2 is
    // pinned): 0 = 2·0.25 = 0.5, 1 = 1·0.25 = 0.25 -> 1 goes. With a per-access clock, 0
    // (access 2) would be one access older than 1 (access 3) and lose: 2·0.25^4 < 0.25^3.
    let mut c = CacheCore::new(&spec("lcp-0.25-1"), Budget::SlotsPerLayer(3), &[0]).unwrap();
    assert_eq!(step(&mut c, 0, &[0]), "m");
    assert_eq!(step(&mut c, 0, &[0, 1]), "Hm");
    assert_eq!(step(&mut c, 0, &[2, 3]), "mm");
    assert!(c.contains(k(0, 0)) && !c.contains(k(0, 1)));
}
