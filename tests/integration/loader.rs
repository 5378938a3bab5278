//! Loader threads change when expert bytes arrive, never what the engine computes or what the
//! cache decides: parallel misses and asynchronous lookahead prefetch must give the inline
//! loader's logits, trace and counters exactly.

use crate::common::{fixture, Reference};
use candle_core::Device;
use moe_harness::engine::{Engine, EngineConfig, MissMode, Sampler};
use moe_harness::experts::budget::Budget;
use moe_harness::experts::policies::PolicySpec;

type Outcome = (Vec<u32>, Vec<Vec<f32>>, Vec<(Vec<u32>, Vec<bool>)>, String);

fn run(name: &str, policy: &str, miss: MissMode, threads: usize) -> (Outcome, Engine) {
    let dir = fixture(name);
    let top_k = moe_harness::models::load_spec(&dir).unwrap().moe.top_k;
    let cfg = EngineConfig {
        budget: Budget::SlotsPerLayer(top_k + 1),
        policy: PolicySpec::parse(policy).unwrap(),
        miss,
        record_trace: true,
        load_threads: Some(threads),
        gpu_experts: Default::default(),
        gpu_attention: Default::default(),
        gpu_routing: Default::default(),
        gpu_graph: Default::default(),
        gpu_dense: Default::default(),
        dense: Default::default(),
        io: Default::default(),
        storage: None,
        staging: Default::default(),
        threads: None,
        kernels: Default::default(),
        low_bit: None,
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

/// A cancelled load cannot be claimed; a later load of the same expert (submitted while the
/// cancelled one may still be running) is claimed with the right weights, and prefetch accounting
/// follows the ticket that is claimed.
#[test]
fn cancelled_loads_are_dropped_and_claims_follow_the_latest_ticket() {
    use moe_harness::experts::loader::Loader;
    use moe_harness::experts::ExpertKey;
    let dir = fixture("qwen3_moe-bf16");
    let e = Engine::open(&dir, Device::Cpu, EngineConfig::default()).unwrap();
    let spec = moe_harness::models::load_spec(&dir).unwrap();
    let layer = spec.moe.moe_layers[0] as u32;
    for threads in [0, 2] {
        let mut l = Loader::new(e.store.clone(), threads).unwrap();
        let k = ExpertKey { layer, expert: 1 };
        let other = ExpertKey { layer, expert: 2 };
        assert!(l.claim(k).is_none(), "nothing submitted yet");
        l.submit(k, true).unwrap();
        l.cancel(k);
        assert!(!l.has(k));
        assert!(l.claim(k).is_none(), "a cancelled load cannot be claimed");
        l.submit(other, true).unwrap();
        l.submit(k, false).unwrap();
        let (w, _) = l.claim(k).unwrap().unwrap();
        let want = e.store.load(k).unwrap();
        let x =
            candle_core::Tensor::ones((1, spec.hidden_size), candle_core::DType::F32, &Device::Cpu)
                .unwrap();
        let y = |w| {
            moe_harness::models::layers::expert_forward(&x, w)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(
            y(&w),
            y(&want),
            "threads {threads}: claimed the wrong expert"
        );
        let s = l.stats();
        assert_eq!(
            s.prefetch_used_load_ns, 0,
            "the claimed ticket was a demand load"
        );
        assert!(l.has(other));
        let (wo, _) = l.claim(other).unwrap().unwrap();
        assert_eq!(y(&wo), y(&e.store.load(other).unwrap()));
        assert!(l.stats().prefetch_used_load_ns > 0, "threads {threads}");
        assert!(!l.has(other));
    }
}
