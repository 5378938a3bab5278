//! The engine against HF transformers: logits, routing and greedy continuations of every fixture
//! made by scripts/make_fixtures.py, at unlimited budget and at the smallest legal capacity.

use crate::common::{fixture, fixtures, rel_l2, Reference};
use candle_core::Device;
use moe_harness::engine::{Engine, EngineConfig, Sampler};
use moe_harness::experts::budget::Budget;
use moe_harness::experts::policies::PolicySpec;

fn engine(dir: &std::path::Path, budget: Budget, policy: &str) -> Engine {
    let cfg = EngineConfig {
        budget,
        policy: PolicySpec::parse(policy).unwrap(),
        ..Default::default()
    };
    Engine::open(dir, Device::Cpu, cfg).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn moe_fixtures() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("reference.json").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.contains("dense"))
        .collect();
    names.sort();
    assert!(
        names.len() >= 6,
        "expected the generated fixtures, found {names:?}"
    );
    names
}

/// The engine computes in f32 over exactly the reference's weights (bf16 upcast, MLX dequantized
/// in f32), so every layout is held to 1e-5, tighter than the 1e-4 / 2e-3 the issue allows; the
/// observed errors are ~5e-7.
fn tolerance(_reference: &Reference) -> f64 {
    1e-5
}

#[test]
fn logits_and_routing_match_transformers() {
    for name in moe_fixtures() {
        let dir = fixture(&name);
        let r = Reference::load(&dir);
        let mut e = engine(&dir, Budget::Unlimited, "lru");
        assert_eq!(
            e.stats().bytes_read,
            0,
            "{name}: expert bytes read at load time"
        );
        let (logits, routing) = e.logits(&r.tokens()).unwrap();
        let flat: Vec<f32> = logits.iter().flatten().copied().collect();
        let err = rel_l2(&flat, &r.logits);
        eprintln!("{name}: relative L2 {err:.2e}");
        assert!(
            err <= tolerance(&r),
            "{name}: logits relative L2 {err:.3e} above {:.0e}",
            tolerance(&r)
        );
        let want = r.json["routing"].as_object().unwrap();
        assert_eq!(routing.len(), want.len(), "{name}: number of MoE layers");
        for (layer, routes) in &routing {
            let w = want
                .get(&layer.to_string())
                .unwrap_or_else(|| panic!("{name}: layer {layer} not in reference"));
            for (t, route) in routes.iter().enumerate() {
                let mut got = route.experts.clone();
                got.sort_unstable();
                assert_eq!(
                    got,
                    Reference::ids(&w[t]),
                    "{name}: layer {layer} token {t} routing"
                );
            }
        }
        assert!(e.stats().bytes_read > 0, "{name}: experts were never read");
    }
}

/// The GPU miss path (checkpoint bytes moved as they are and decoded with tensor ops on the
/// device) run on the CPU: every layout must still match the reference.
#[test]
fn device_miss_path_matches_transformers() {
    for name in moe_fixtures() {
        let dir = fixture(&name);
        let r = Reference::load(&dir);
        let mut e = engine(&dir, Budget::Unlimited, "lru");
        e.store.set_device_path(true);
        let (logits, _) = e.logits(&r.tokens()).unwrap();
        let flat: Vec<f32> = logits.iter().flatten().copied().collect();
        let err = rel_l2(&flat, &r.logits);
        assert!(
            err <= tolerance(&r),
            "{name}: device-path logits relative L2 {err:.3e}"
        );
        let t = e.store.transfer_stats();
        assert!(t.uploads > 0, "{name}: the device path was not taken");
        assert_eq!(t.read_bytes, e.stats().bytes_read, "{name}: bytes read");
    }
}

#[test]
fn greedy_continuation_matches_transformers() {
    for name in moe_fixtures() {
        let dir = fixture(&name);
        let r = Reference::load(&dir);
        let prompt = Reference::ids(&r.json["greedy"]["prompt"]);
        let want = Reference::ids(&r.json["greedy"]["generated"]);
        let top_k = moe_harness::models::load_spec(&dir).unwrap().moe.top_k;
        for budget in [Budget::Unlimited, Budget::SlotsPerLayer(top_k)] {
            let mut e = engine(&dir, budget, "lru");
            let g = e
                .generate(&prompt, want.len(), &mut Sampler::Greedy, &[])
                .unwrap();
            assert_eq!(g.tokens, want, "{name}: greedy tokens at {budget:?}");
        }
    }
}

#[test]
fn eviction_does_not_change_the_math() {
    for name in moe_fixtures() {
        let dir = fixture(&name);
        let r = Reference::load(&dir);
        let top_k = moe_harness::models::load_spec(&dir).unwrap().moe.top_k;
        let (full, _) = engine(&dir, Budget::Unlimited, "lru")
            .logits(&r.tokens())
            .unwrap();
        for policy in ["lru", "lfu", "lcp-0.25-128"] {
            let mut e = engine(&dir, Budget::SlotsPerLayer(top_k), policy);
            let (small, _) = e.logits(&r.tokens()).unwrap();
            assert_eq!(
                full, small,
                "{name}: logits differ at capacity {top_k} under {policy}"
            );
            let s = e.stats();
            assert!(
                s.cache.accesses > s.cache.hits,
                "{name}: the smallest capacity should miss"
            );
        }
    }
}

#[test]
fn resident_bytes_never_exceed_the_budget() {
    let dir = fixture("glm4_moe-mlx4");
    let r = Reference::load(&dir);
    let mut probe = engine(&dir, Budget::Unlimited, "lru");
    let first = moe_harness::experts::ExpertKey {
        layer: probe.spec().moe.moe_layers[0] as u32,
        expert: 0,
    };
    let per = probe.store.expert_bytes(first);
    let top_k = probe.spec().moe.top_k as u64;
    let _ = probe.logits(&r.tokens()).unwrap();
    for budget in [
        Budget::BytesGlobal(per * top_k),
        Budget::BytesGlobal(per * (top_k + 3)),
        Budget::BytesPerLayer(per * top_k),
    ] {
        let mut e = engine(&dir, budget, "lru");
        let limit = match budget {
            Budget::BytesGlobal(b) => b,
            Budget::BytesPerLayer(b) => b * e.spec().num_moe_layers() as u64,
            _ => unreachable!(),
        };
        let g = e
            .generate(&r.tokens(), 6, &mut Sampler::Greedy, &[])
            .unwrap();
        assert_eq!(g.tokens.len(), 6);
        let s = e.stats();
        assert!(
            s.cache.peak_resident_bytes <= limit,
            "peak {} above budget {limit}",
            s.cache.peak_resident_bytes
        );
        assert!(s.cache.peak_resident_bytes >= per * top_k);
    }
}

/// The shipped trained model (HF bf16 and MLX 4-bit copies) against HF transformers.
#[test]
fn shipped_model_matches_transformers() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in ["glm4-moe-tiny-bf16", "glm4-moe-tiny-mlx4"] {
        let refdir = root.join("tests/fixtures/shipped").join(name);
        let r = Reference::load(&refdir);
        let dir = root.join(r.json["model_dir"].as_str().unwrap());
        let mut e = engine(&dir, Budget::Unlimited, "lru");
        let (logits, routing) = e.logits(&r.tokens()).unwrap();
        let flat: Vec<f32> = logits.iter().flatten().copied().collect();
        let err = rel_l2(&flat, &r.logits);
        eprintln!("{name}: relative L2 {err:.2e}");
        assert!(err <= 1e-5, "{name}: logits relative L2 {err:.3e}");
        let want = r.json["routing"].as_object().unwrap();
        for (layer, routes) in &routing {
            for (t, route) in routes.iter().enumerate() {
                let mut got = route.experts.clone();
                got.sort_unstable();
                assert_eq!(
                    got,
                    Reference::ids(&want[&layer.to_string()][t]),
                    "{name}: layer {layer} token {t}"
                );
            }
        }
        let prompt = Reference::ids(&r.json["greedy"]["prompt"]);
        let want = Reference::ids(&r.json["greedy"]["generated"]);
        for budget in [Budget::Unlimited, Budget::SlotsPerLayer(4)] {
            let g = engine(&dir, budget, "lookahead")
                .generate(&prompt, want.len(), &mut Sampler::Greedy, &[])
                .unwrap();
            assert_eq!(g.tokens, want, "{name}: greedy at {budget:?}");
        }
    }
}
