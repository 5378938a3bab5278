//! `harness inspect` on the bundled real-model configs reproduces the expert sizes of
//! ../shared/FORMATS.md ("Per-expert and whole-model sizes"), and MLA bad input fails clearly.

use std::path::Path;

use moe_harness::config::QuantParams;
use moe_harness::inspect::{inspect, Verdict};

fn config(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("experiments/configs")
        .join(name)
}

#[test]
fn real_model_sizes_match_the_design_notes() {
    let q4 = QuantParams {
        bits: 4,
        group_size: 64,
    };
    // (config, experts, MoE layers, top-k, elements/expert (M), 4-bit bytes/expert (MB), total (GB), per token (GB))
    let table = [
        ("glm47.json", 160, 89, 8, 23.59, 13.27, 189.0, 9.45),
        ("glm47-flash.json", 64, 46, 4, 9.44, 5.31, 15.6, 0.98),
        ("kimi-k25.json", 384, 60, 8, 44.04, 24.77, 571.0, 11.9),
        ("qwen3-coder-next.json", 512, 48, 10, 3.15, 1.77, 43.5, 0.85),
        // Not in FORMATS.md; by hand from the published config: 3·2304·1024 elements, 4-bit with
        // a bf16 scale and bias per 64 = 0.5625 B/element, 256 experts × 26 MoE layers, top-8.
        ("kimi-linear.json", 256, 26, 8, 7.08, 3.98, 26.5, 0.828),
    ];
    for (file, experts, layers, k, el, per, total, tok) in table {
        let r = inspect(&config(file), q4).unwrap();
        assert_eq!(
            (r.routed_experts, r.moe_layers, r.top_k),
            (Some(experts), Some(layers), Some(k)),
            "{file}"
        );
        let close = |got: f64, want: f64, what: &str| {
            assert!(
                (got - want).abs() / want < 0.006,
                "{file}: {what} {got} vs {want}"
            )
        };
        close(
            r.elements_per_expert.unwrap() as f64 / 1e6,
            el,
            "elements/expert",
        );
        close(
            r.bytes_per_expert.unwrap() as f64 / 1e6,
            per,
            "bytes/expert",
        );
        close(
            r.total_expert_bytes.unwrap() as f64 / 1e9,
            total,
            "total expert bytes",
        );
        close(
            r.expert_bytes_per_token.unwrap() as f64 / 1e9,
            tok,
            "expert bytes per token",
        );
    }
    assert_eq!(
        inspect(&config("glm47.json"), q4).unwrap().verdict,
        Verdict::DropIn
    );
    // Qwen3-Coder-Next (gated DeltaNet) runs since the hybrid families landed.
    let r = inspect(&config("qwen3-coder-next.json"), q4).unwrap();
    assert_eq!(r.verdict, Verdict::DropIn, "{:?}", r.reason);
    // Families the engine cannot run still get sized, with the reason.
    let r = inspect(&config("deepseek-v3.json"), q4).unwrap();
    assert!(r.reason.unwrap().contains("fp8"));
}

#[test]
fn kimi_fixture_needs_key_prefix_and_ignores_vision_tensors() {
    let r = inspect(
        &crate::common::fixture("kimi_k25-bf16"),
        QuantParams {
            bits: 4,
            group_size: 64,
        },
    )
    .unwrap();
    assert_eq!(r.verdict, Verdict::NeedsKeyPrefix);
    assert_eq!(
        r.key_prefix.as_deref(),
        Some("language_model.model.layers.")
    );
    assert_eq!(r.attention.as_deref(), Some("mla"));
}

#[test]
fn hybrid_models_say_which_layers_are_linear_attention() {
    let q4 = QuantParams {
        bits: 4,
        group_size: 64,
    };
    for (file, want) in [
        ("kimi-linear.json", "hybrid: 20 kda + 7 mla-nope"),
        (
            "qwen3-coder-next.json",
            "hybrid: 36 gated-deltanet + 12 gated-gqa",
        ),
        ("glm47-flash.json", "mla"),
        ("glm47.json", "gqa"),
    ] {
        let r = inspect(&config(file), q4).unwrap();
        assert_eq!(r.attention.as_deref(), Some(want), "{file}");
    }
}

fn open_err(dir: &Path) -> String {
    moe_harness::engine::Engine::open(dir, candle_core::Device::Cpu, Default::default())
        .unwrap_err()
        .to_string()
}

#[test]
fn mla_bad_input() {
    // kimi_k25 without text_config.
    let d = crate::common::copy_fixture("kimi_k25-bf16");
    let p = d.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let text = v.as_object_mut().unwrap().remove("text_config").unwrap();
    std::fs::write(&p, v.to_string()).unwrap();
    let err = open_err(d.path());
    assert!(
        err.contains("text_config") && err.contains("config.json"),
        "{err}"
    );
    // MLA dims that disagree with the tensors.
    v["text_config"] = text;
    v["text_config"]["kv_lora_rank"] = serde_json::json!(32);
    std::fs::write(&p, v.to_string()).unwrap();
    let err = open_err(d.path());
    assert!(
        err.contains("self_attn.kv_") && err.contains("shape") && err.contains("[256, 32]"),
        "{err}"
    );
    // A missing kv_b_proj.
    let d = crate::common::copy_fixture("glm4_moe_lite-bf16");
    let st = d.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let t = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = t
        .tensors()
        .into_iter()
        .filter(|(k, _)| k != "model.layers.1.self_attn.kv_b_proj.weight")
        .collect();
    assert_eq!(kept.len() + 1, t.len());
    std::fs::write(&st, safetensors::serialize(kept, None).unwrap()).unwrap();
    let err = open_err(d.path());
    assert!(
        err.contains("model.layers.1.self_attn.kv_b_proj.weight") && err.contains("embed_q"),
        "{err}"
    );
}

#[test]
fn every_experiment_file_parses_and_missing_models_say_where_to_put_them() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        n += 1;
        let exp = moe_harness::experiment::load(&p, false)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(!exp.cells.is_empty());
        if exp.model_dir.join("config.json").exists() {
            continue;
        }
        let err = moe_harness::experiment::load(&p, true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no model at") && err.contains("harness inspect"),
            "{}: {err}",
            p.display()
        );
        let cfg = dir.join(
            exp.raw
                .model
                .config
                .as_ref()
                .expect("a bundled config for inspect"),
        );
        inspect(
            &cfg,
            QuantParams {
                bits: 4,
                group_size: 64,
            },
        )
        .unwrap_or_else(|e| panic!("{}: {e}", cfg.display()));
    }
    assert!(n >= 6);
}
