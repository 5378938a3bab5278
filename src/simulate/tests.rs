//! Unit tests of the replay: next-use numbering, prefetch placement, row errors, warm-up rows.

use super::*;
use crate::experts::Phase;

fn row(step: u32, phase: Phase, layer: u32, experts: &[u32], la: Option<&[u32]>) -> TraceRow {
    TraceRow {
        prompt: 0,
        step,
        pos: step,
        phase,
        layer,
        experts: experts.to_vec(),
        weights: Vec::new(),
        lookahead: la.map(|v| v.to_vec()),
        hits: Vec::new(),
        load_ns: 0,
    }
}

/// One replay with unit-size experts.
fn run(
    rows: &[TraceRow],
    policy: &str,
    budget: Budget,
    layers: &[u32],
    classic: bool,
) -> Result<SimResult, SimError> {
    let mut sim = Simulation::new(spec(policy), budget, layers);
    sim.classic = classic;
    simulate(rows, &sim, |_| 1)
}

fn spec(s: &str) -> PolicySpec {
    PolicySpec::parse(s).unwrap()
}

#[test]
fn next_uses_number_demands_globally() {
    let rows = vec![
        row(0, Phase::Decode, 0, &[1, 2], None),
        row(0, Phase::Decode, 1, &[1], None),
        row(1, Phase::Decode, 0, &[2, 1], None),
    ];
    // accesses: 0:(0,1) 1:(0,2) 2:(1,1) 3:(0,2) 4:(0,1)
    assert_eq!(
        demand_next_uses(&rows),
        vec![4, 3, u64::MAX, u64::MAX, u64::MAX]
    );
}

#[test]
fn prefetch_only_into_the_next_layer_of_the_same_token() {
    // Layers 0, 1; 2 slots each. Token 1: layer 1's lookahead [5] is prefetched during
    // layer 0 and hits. Token 2's layer-1 row has a lookahead too, but the row before it is
    // token 1's layer 1, not token 2's layer 0: no prefetch.
    let rows = vec![
        row(1, Phase::Decode, 0, &[0], None),
        row(1, Phase::Decode, 1, &[5], Some(&[5])),
        row(2, Phase::Decode, 1, &[6], Some(&[6])),
    ];
    let r = run(&rows, "lookahead", Budget::SlotsPerLayer(2), &[0, 1], false).unwrap();
    assert_eq!(r.prefetch.issued, 1);
    assert_eq!(r.prefetch.used, 1);
    assert_eq!(r.hits, 1);
    assert_eq!(r.per_layer[1].hits, 1);
    // Without lookahead the same trace has no hit and no prefetch.
    let r = run(&rows, "lru", Budget::SlotsPerLayer(2), &[0, 1], false).unwrap();
    assert_eq!((r.hits, r.prefetch.issued), (0, 0));
    // Prefill rows never trigger prefetch even when the next row is the next layer.
    let mut rows = rows;
    rows[1].phase = Phase::Prefill;
    rows[0].phase = Phase::Prefill;
    let r = run(&rows, "lookahead", Budget::SlotsPerLayer(2), &[0, 1], false).unwrap();
    assert_eq!(r.prefetch.issued, 0);
}

#[test]
fn row_errors_name_the_row() {
    let rows = vec![row(3, Phase::Decode, 0, &[0, 1, 2], None)];
    let e = run(&rows, "lru", Budget::SlotsPerLayer(2), &[0], false).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("trace row 0 (prompt 0, step 3"), "{msg}");
    assert!(
        msg.contains("budget below one token's working set"),
        "{msg}"
    );
    // Classic mode has no pins: the same row fits by evicting.
    let r = run(&rows, "lru", Budget::SlotsPerLayer(2), &[0], true).unwrap();
    assert_eq!(r.evictions, 1);
}

#[test]
fn result_serializes_with_the_documented_fields() {
    let rows = crate::synth::synthetic_trace(1, 20, &[0, 1], 8, 2, 1.0, 0.3);
    let r = run(&rows, "lfu", Budget::SlotsPerLayer(4), &[0, 1], false).unwrap();
    let v: serde_json::Value = serde_json::to_value(&r).unwrap();
    for f in [
        "policy",
        "capacity",
        "budget_bytes",
        "accesses",
        "hits",
        "hit_rate",
        "per_layer",
    ] {
        assert!(v.get(f).is_some(), "missing {f}");
    }
    assert_eq!(v["policy"], "lfu");
    assert_eq!(v["capacity"], 4);
    assert_eq!(v["per_layer"][1]["layer"], 1);
    let sum: u64 = r.per_layer.iter().map(|l| l.accesses).sum();
    assert_eq!(sum, r.accesses);
    assert_eq!(r.accesses, 20 * 2 * 2);
    assert_eq!(r.prefill.accesses + r.decode.accesses, r.accesses);
}

#[test]
fn unmeasured_rows_warm_the_cache_but_are_not_counted() {
    // Prompt 0 (warm-up) loads 0 and 1; prompt 1 demands them again: both hit, and only
    // prompt 1's two accesses are counted.
    let mut rows = vec![
        row(0, Phase::Decode, 0, &[0, 1], None),
        row(0, Phase::Decode, 0, &[0, 1], None),
    ];
    rows[1].prompt = 1;
    let mut sim = Simulation::new(spec("lru"), Budget::SlotsPerLayer(2), &[0]);
    sim.warmup_prompts = 1;
    let r = simulate(&rows, &sim, |_| 1).unwrap();
    assert_eq!((r.accesses, r.hits, r.misses, r.bytes_loaded), (2, 2, 0, 0));
    assert_eq!(r.per_layer[0].accesses, 2);
    assert_eq!(r.peak_resident_bytes, 2);
    let all = run(&rows, "lru", Budget::SlotsPerLayer(2), &[0], false).unwrap();
    assert_eq!((all.accesses, all.hits), (4, 2));
}

#[test]
fn static_uses_the_trace_profile_by_default() {
    // Expert 0 is used at every step; 1, 2, 3 rotate. 2 slots, static-1 keeps 0 forever:
    // 0 misses once, the rotating ones always miss (each evicts the other slot).
    let rows: Vec<TraceRow> = (0..9u32)
        .map(|t| row(t, Phase::Decode, 0, &[0, 1 + t % 3], None))
        .collect();
    let r = run(&rows, "static-1", Budget::SlotsPerLayer(2), &[0], false).unwrap();
    assert_eq!(r.hits, 8);
    // An explicit profile that pins expert 1 instead: 0 and the rotation share one slot.
    let mut p = FrequencyProfile::new();
    p.add(
        ExpertKey {
            layer: 0,
            expert: 1,
        },
        5,
    );
    let mut sim = Simulation::new(spec("static-1"), Budget::SlotsPerLayer(2), &[0]);
    sim.profile = Some(p);
    let r = simulate(&rows, &sim, |_| 1);
    // Profile pins expert 1 instead. t0 [0, 1]: both load, 1 for good. t1 [0, 2]: 0 hits, 2
    // needs a slot, but 1 is pinned by the profile and 0 by the step -> row 1 fails.
    assert!(
        matches!(
            r,
            Err(SimError::Row {
                row: 1,
                source: CacheError::BudgetTooSmall { .. },
                ..
            })
        ),
        "{r:?}"
    );
}
