//! Traces at scale: the streaming replay of a trace file equals the in-memory replay of its rows
//! for every policy, budget kind and replay option, across row-group boundaries.

use std::path::Path;

use moe_harness::experts::budget::{Budget, Pool};
use moe_harness::experts::miss::MissMode;
use moe_harness::experts::policies::PolicySpec;
use moe_harness::simulate::{simulate, study, SimResult, Simulation, TraceStudy};
use moe_harness::synth::synthetic_trace;
use moe_harness::trace::{CellTrace, TraceRow, TraceWriter};

const POLICIES: &[&str] = &[
    "lru",
    "lfu",
    "lcp",
    "lfu-decay",
    "lookahead",
    "lookahead-lfu",
    "belady",
    "lookahead-belady",
    "static-3",
    "lfru",
    "mrs",
    "lookahead-mrs-0.5",
    "layer-aware",
    "eam-2",
    "adaptive-split",
];

/// Three prompts of seeded synthetic routing (prefill + decode rows with lookahead), prompt 1
/// on different layers' popularity than prompt 0.
fn prompts() -> Vec<TraceRow> {
    let layers = [1u32, 2, 4];
    let mut rows = Vec::new();
    for p in 0..3u32 {
        for mut r in synthetic_trace(7 + p as u64, 40, &layers, 16, 3, 1.0, 0.4) {
            r.prompt = p;
            // Unequal router weights (weight-aware policies must see them through the file).
            let n = r.experts.len();
            let total = (n * (n + 1) / 2) as f32;
            r.weights = (0..n).map(|i| (n - i) as f32 / total).collect();
            rows.push(r);
        }
    }
    rows
}

fn write(path: &Path, rows: &[TraceRow], group: usize) {
    let mut w = TraceWriter::create(path, "", Vec::new())
        .unwrap()
        .with_row_group_rows(group);
    for r in rows {
        w.push(r.clone()).unwrap();
    }
    w.finish().unwrap();
}

fn base(trace: &Path) -> TraceStudy {
    TraceStudy {
        trace: trace.to_path_buf(),
        cell: None,
        policies: POLICIES
            .iter()
            .map(|p| PolicySpec::parse(p).unwrap())
            .collect(),
        capacities: vec![6, 9],
        budgets: vec![21 * 100, 33 * 100],
        pool: Pool::Global,
        model: None,
        expert_bytes: Some(100),
        warmup_prompts: 0,
        reset_per_prompt: false,
        classic: false,
        miss: MissMode::Load,
    }
}

/// The in-memory replays the study should equal, in its order (policies outermost).
fn in_memory(rows: &[TraceRow], s: &TraceStudy) -> Vec<SimResult> {
    let mut layers: Vec<u32> = rows.iter().map(|r| r.layer).collect();
    layers.sort_unstable();
    layers.dedup();
    let mut budgets: Vec<Budget> = s
        .capacities
        .iter()
        .map(|&n| Budget::SlotsPerLayer(n))
        .collect();
    budgets.extend(
        s.budgets
            .iter()
            .map(|&b| Budget::from_bytes(b, s.pool, layers.len())),
    );
    let mut out = Vec::new();
    for p in &s.policies {
        for &b in &budgets {
            let mut sim = Simulation::new(p.clone(), b, &layers);
            sim.classic = s.classic;
            sim.warmup_prompts = s.warmup_prompts;
            sim.reset_per_prompt = s.reset_per_prompt;
            sim.miss = s.miss;
            out.push(simulate(rows, &sim, |_| 100).unwrap());
        }
    }
    out
}

#[test]
fn streaming_replay_equals_in_memory_replay_across_row_groups() {
    let d = tempfile::tempdir().unwrap();
    let rows = prompts();
    // Row groups of 1, 5 and 64 rows: boundaries inside tokens, between a row and the next
    // layer's prediction, and between prompts.
    for group in [1usize, 5, 64] {
        let t = d.path().join(format!("t{group}.parquet"));
        write(&t, &rows, group);
        for (classic, reset, warmup, pool, miss) in [
            (false, false, 0, Pool::Global, MissMode::Substitute),
            (false, true, 1, Pool::PerLayer, MissMode::Substitute),
            (true, false, 1, Pool::Global, MissMode::Skip),
            (true, true, 0, Pool::PerLayer, MissMode::Load),
        ]
        .into_iter()
        .take(if group == 1 { 1 } else { 4 })
        {
            let mut s = base(&t);
            s.classic = classic;
            s.reset_per_prompt = reset;
            s.warmup_prompts = warmup;
            s.pool = pool;
            s.miss = miss;
            let (got, stats) = study(&s).unwrap();
            let want = in_memory(&rows, &s);
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(
                    g, w,
                    "group {group}, classic {classic}, reset {reset}: {} at {}",
                    w.policy, w.budget
                );
            }
            assert_eq!(stats.rows, rows.len() as u64);
            let accesses: u64 = rows.iter().map(|r| r.experts.len() as u64).sum();
            assert_eq!(stats.accesses, accesses);
            // Belady and static need the backward pass; its file holds a next use (a varint of
            // at least one byte) per access.
            assert_eq!(stats.passes, 3);
            assert!(stats.future_bytes >= accesses, "{}", stats.future_bytes);
        }
    }
}

#[test]
fn a_multi_cell_file_replays_the_chosen_cell_only() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("cells.parquet");
    let rows = prompts();
    let other: Vec<TraceRow> = synthetic_trace(99, 30, &[1, 2, 4], 16, 3, 1.2, 0.1);
    moe_harness::trace::write(
        &t,
        &[
            CellTrace {
                cell: "a".into(),
                rows: other.clone(),
            },
            CellTrace {
                cell: "b".into(),
                rows: rows.clone(),
            },
        ],
    )
    .unwrap();
    let mut s = base(&t);
    s.policies = vec![PolicySpec::Lru, PolicySpec::Belady];
    s.cell = Some("b".into());
    let (got, _) = study(&s).unwrap();
    assert_eq!(got, in_memory(&rows, &s));
    s.cell = None;
    let (got, _) = study(&s).unwrap();
    assert_eq!(got, in_memory(&other, &s), "the first cell by default");
    s.cell = Some("c".into());
    let e = study(&s).unwrap_err().to_string();
    assert!(e.contains("no cell `c`") && e.contains("a, b"), "{e}");
}

#[test]
fn only_lru_skips_the_backward_pass() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("t.parquet");
    let rows = prompts();
    write(&t, &rows, 7);
    let mut s = base(&t);
    s.policies = vec![PolicySpec::Lru, PolicySpec::parse("lookahead").unwrap()];
    let (got, stats) = study(&s).unwrap();
    assert_eq!(stats.passes, 2);
    assert_eq!(stats.future_bytes, 0);
    assert_eq!(got, in_memory(&rows, &s));
}
