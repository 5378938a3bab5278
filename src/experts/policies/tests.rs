//! Policy names, flags and the shared helpers.

use super::*;

#[test]
fn names_round_trip_to_canonical() {
    for (given, canonical) in [
        ("lru", "lru"),
        ("LFU", "lfu"),
        ("lfu-decay", "lfu-decay0.9"),
        ("lfu-decay0.5", "lfu-decay0.5"),
        ("lfu-decay-0.75", "lfu-decay0.75"),
        ("lcp", "lcp-0.25-128"),
        ("lcp-0.5-64", "lcp-0.5-64"),
        ("lookahead", "lookahead"),
        ("lookahead-lru", "lookahead"),
        ("lookahead-lfu", "lookahead-lfu"),
        ("lookahead-lcp", "lookahead-lcp-0.25-128"),
        ("belady", "belady"),
        (" static-8 ", "static-8"),
        ("lfru", "lfru-0.5"),
        ("lfru-0.25", "lfru-0.25"),
        ("mrs", "mrs-0.9"),
        ("mrs-0.5", "mrs-0.5"),
        ("layer-aware", "layer-aware-1"),
        ("layer-aware-0", "layer-aware-0"),
        ("eam-4", "eam-4"),
        ("adaptive-split", "adaptive-split"),
        ("lookahead-mrs", "lookahead-mrs-0.9"),
    ] {
        let p = PolicySpec::parse(given).unwrap();
        assert_eq!(p.to_string(), canonical, "{given}");
        assert_eq!(PolicySpec::parse(canonical).unwrap(), p, "{canonical}");
    }
}

#[test]
fn flags_follow_the_spec() {
    let p = PolicySpec::parse("lookahead-belady").unwrap();
    assert!(p.prefetch() && p.needs_future() && !p.needs_profile());
    let p = PolicySpec::parse("static-4").unwrap();
    assert!(!p.prefetch() && !p.needs_future() && p.needs_profile());
    assert!(!PolicySpec::Lru.prefetch() && !PolicySpec::Lru.needs_future());
}

#[test]
fn bad_names_are_explained() {
    let e = PolicySpec::parse("arc").unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("unknown eviction policy `arc`"), "{msg}");
    for k in ["lru", "lfu", "lcp", "lookahead", "belady", "static"] {
        assert!(msg.contains(k), "{msg} lacks {k}");
    }
    for bad in [
        "lcp-2-128",
        "lcp-0.25",
        "lcp-0.25--1",
        "lfu-decay1.5",
        "lfu-decayx",
        "static-0",
        "static-x",
        "lookahead-lookahead",
        "lookahead-nope",
        "lfru-1",
        "lfru-0",
        "mrs-1.5",
        "layer-aware--1",
        "eam",
        "eam-0",
        "eam--2",
        "eam-x",
    ] {
        assert!(PolicySpec::parse(bad).is_err(), "{bad} accepted");
    }
}

#[test]
fn serde_uses_the_canonical_string() {
    let p = PolicySpec::parse("lcp").unwrap();
    assert_eq!(serde_json::to_string(&p).unwrap(), "\"lcp-0.25-128\"");
    let back: PolicySpec = serde_json::from_str("\"lookahead-lfu\"").unwrap();
    assert_eq!(back.to_string(), "lookahead-lfu");
    assert!(serde_json::from_str::<PolicySpec>("\"fifo\"").is_err());
}

#[test]
fn static_needs_a_profile() {
    let ctx = PoolContext {
        moe_layers: &[0],
        pool_layers: &[0],
        profile: None,
    };
    let e = PolicySpec::parse("static-2")
        .unwrap()
        .build(&ctx)
        .unwrap_err();
    assert!(matches!(e, PolicyError::NeedsProfile { .. }));
}

#[test]
fn profile_top_orders_by_count_then_id() {
    let mut p = FrequencyProfile::new();
    let k = |e| ExpertKey {
        layer: 3,
        expert: e,
    };
    p.add(k(5), 2);
    p.add(k(1), 7);
    p.add(k(2), 2);
    p.add(k(9), 0);
    assert_eq!(p.top(3, 3), vec![1, 2, 5]);
    assert_eq!(p.top(3, 10), vec![1, 2, 5]);
    assert_eq!(p.top(4, 3), Vec::<u32>::new());
    assert_eq!(p.count(k(1)), 7);
}

#[test]
fn scan_set_swap_removes() {
    let mut r = ScanSet::default();
    for i in [3u32, 1, 4, 5] {
        r.insert(i, i * 10);
    }
    r.insert(4, 41);
    r.remove(1);
    r.remove(1);
    r.remove(77);
    let mut v = r.slots().to_vec();
    v.sort();
    assert_eq!(v, vec![(3, 30), (4, 41), (5, 50)]);
    r.remove(5);
    r.insert(1, 11);
    *r.get_mut(3) += 1;
    let mut v = r.slots().to_vec();
    v.sort();
    assert_eq!(v, vec![(1, 11), (3, 31), (4, 41)]);
    assert_eq!(*r.get_mut(4), 41);
}

#[test]
fn decay_table_matches_powf() {
    let t = DecayTable::new(0.25, 128.0);
    for age in [0u64, 1, 64, 1023, 1024, 5000] {
        assert_eq!(t.at(age), 0.25f64.powf(age as f64 / 128.0));
    }
    assert_eq!(t.at(64), 0.5);
}
