//! Replaying a recorded trace's routing reproduces its expert traffic exactly, whatever the
//! tokens: the same accesses, hits and lookahead predictions, row for row.

use std::path::Path;

use candle_core::Device;
use moe_harness::engine::{Engine, EngineConfig, Replay, Sampler};
use moe_harness::experts::budget::Budget;
use moe_harness::experts::policies::PolicySpec;
use moe_harness::trace::TraceRow;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn model() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/glm4-moe-tiny/mlx-4bit")
}

fn config() -> EngineConfig {
    EngineConfig {
        budget: Budget::SlotsPerLayer(6),
        policy: PolicySpec::parse("lookahead").unwrap(),
        record_trace: true,
        ..Default::default()
    }
}

fn key(r: &TraceRow) -> impl PartialEq + std::fmt::Debug {
    (
        r.prompt,
        r.step,
        r.pos,
        r.phase,
        r.layer,
        r.experts.clone(),
        r.lookahead.clone(),
        r.hits.clone(),
    )
}

#[test]
fn replay_reproduces_recorded_expert_traffic() {
    let mut rng = StdRng::seed_from_u64(7);
    let mut e = Engine::open(&model(), Device::Cpu, config()).unwrap();
    let vocab = e.spec().vocab_size as u32;
    for p in 0..3 {
        e.set_prompt(p);
        let ids: Vec<u32> = (0..9 + p).map(|_| rng.random_range(0..vocab)).collect();
        e.generate(&ids, 8, &mut Sampler::Greedy, &[]).unwrap();
    }
    let recorded = e.take_trace();
    let replays = Replay::from_rows(&recorded, e.spec()).unwrap();
    assert_eq!(replays.len(), 3);
    assert_eq!((replays[2].prompt_len, replays[2].new_tokens), (11, 8));

    let mut f = Engine::open(&model(), Device::Cpu, config()).unwrap();
    for (p, r) in replays.iter().enumerate() {
        f.set_prompt(p as u32);
        f.set_replay(Some(r.clone()));
        // Other tokens: the router would route them elsewhere.
        let ids: Vec<u32> = (0..r.prompt_len)
            .map(|_| rng.random_range(0..vocab))
            .collect();
        f.generate(&ids, r.new_tokens, &mut Sampler::Greedy, &[])
            .unwrap();
    }
    let replayed = f.take_trace();
    assert_eq!(replayed.len(), recorded.len());
    for (a, b) in recorded.iter().zip(&replayed) {
        assert_eq!(key(a), key(b));
    }
    assert!(
        recorded.iter().any(|r| r.hits.iter().any(|h| !h)),
        "the budget never missed: the test would prove little"
    );
}

#[test]
fn replay_rejects_traces_of_another_shape() {
    let mut e = Engine::open(&model(), Device::Cpu, config()).unwrap();
    e.generate(&[1, 2, 3], 3, &mut Sampler::Greedy, &[])
        .unwrap();
    let rows = e.take_trace();
    let spec = e.spec().clone();

    let mut bad = rows.clone();
    bad[2].experts.pop();
    let m = Replay::from_rows(&bad, &spec).unwrap_err().to_string();
    assert!(m.contains("row 2") && m.contains("top-4"), "{m}");

    let mut bad = rows.clone();
    bad[0].experts[0] = 999;
    let m = Replay::from_rows(&bad, &spec).unwrap_err().to_string();
    assert!(m.contains("expert 999"), "{m}");

    let mut bad = rows.clone();
    bad[0].layer = 0; // the dense first layer
    let m = Replay::from_rows(&bad, &spec).unwrap_err().to_string();
    assert!(m.contains("not a MoE layer"), "{m}");

    let mut bad = rows;
    bad.remove(1);
    let m = Replay::from_rows(&bad, &spec).unwrap_err().to_string();
    assert!(m.contains("expected"), "{m}");
}
