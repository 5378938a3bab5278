//! Loader threads change when expert bytes arrive, never what the engine computes or what the
//! cache decides: parallel misses and asynchronous lookahead prefetch must give the inline
//! loader's logits, trace and counters exactly.

mod common;

use candle_core::Device;
use common::{fixture, Reference};
use moe_harness::engine::{Engine, EngineConfig, MissMode, Sampler};
use moe_harness::experts::cache::Budget;
use moe_harness::experts::policies::PolicySpec;

type Outcome = (Vec<u32>, Vec<Vec<f32>>, Vec<(Vec<u32>, Vec<bool>)>, String);

fn run(name: &str, policy: &str, miss: MissMode, threads: usize) -> (Outcome, Engine) {
    let dir = fixture(name);
    let top_k = moe_harness::config::load(&dir).unwrap().moe.top_k;
    let cfg = EngineConfig {
        budget: Budget::SlotsPerLayer(top_k + 1),
        policy: PolicySpec::parse(policy).unwrap(),
        miss,
        record_trace: true,
        load_threads: Some(threads),
        gpu_packed: true,
    };
    let mut e = Engine::open(&dir, Device::Cpu, cfg).unwrap();
    let r = Reference::load(&dir);
    let prompt = Reference::ids(&r.json["greedy"]["prompt"]);
    let g = e
        .generate_with(&prompt, 10, &mut Sampler::Greedy, &[], true)
        .unwrap();
    let trace = e
        .take_trace()
        .into_iter()
        .map(|s| (s.experts, s.hits))
        .collect();
    let counters = format!("{:?}", e.stats().cache);
    ((g.tokens, g.step_logits, trace, counters), e)
}

#[test]
fn loader_threads_change_timing_not_results() {
    for name in ["glm4_moe-mlx4", "qwen3_moe-bf16", "deepseek_v3-mlx4"] {
        for policy in ["lru", "lookahead"] {
            for miss in [MissMode::Load, MissMode::Skip] {
                let (inline, _) = run(name, policy, miss, 0);
                let (threaded, e) = run(name, policy, miss, 3);
                assert!(
                    inline == threaded,
                    "{name} {policy} {miss:?}: threaded loads changed the outcome"
                );
                let s = e.stats();
                assert!(s.cache.misses > 0, "{name}: the budget never missed");
                if policy == "lookahead" {
                    assert!(
                        s.loads.prefetch_load_ns > 0,
                        "{name}: lookahead issued no prefetch load"
                    );
                }
            }
        }
    }
}
