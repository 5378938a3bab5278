//! Hybrid-attention families (Qwen3-Next, Kimi-Linear): the recurrent DeltaNet / KDA state (and
//! every family's KV cache) carries exactly from a prefill into decode steps, and configs or
//! tensors that disagree with each other are refused with the key and file named. (Logits, routing and greedy continuations against HF transformers
//! for the f32, bf16 and MLX 4-bit fixtures are in `engine_reference`.)

use candle_core::Device;
use moe_harness::engine::{Engine, EngineConfig};
use moe_harness::experts::budget::Budget;
use moe_harness::models::KvCache;

use crate::common::{copy_fixture, edited_fixture, fixture, rel_l2, Reference};

fn open(dir: &std::path::Path) -> moe_harness::error::Result<Engine> {
    Engine::open(
        dir,
        Device::Cpu,
        EngineConfig {
            budget: Budget::SlotsPerLayer(2),
            ..Default::default()
        },
    )
}

#[test]
fn prefill_then_decode_equals_one_full_pass() {
    // The hybrids' recurrent state, and every attention kind's KV cache — GQA with several query
    // heads per KV head (GLM), MLA, and a sliding window shorter than the sequence (Mixtral with
    // `sliding_window` 4) — which one-token CPU steps attend over in place.
    let windowed = edited_fixture("mixtral-f32", |v| v["sliding_window"] = 4.into());
    let mut dirs: Vec<(String, std::path::PathBuf)> = [
        "qwen3_next-f32",
        "qwen3_next-mlx4",
        "kimi_linear-f32",
        "kimi_linear-mlx4",
        "glm4_moe-mlx4",
        "qwen3_moe-f32",
        "deepseek_v3-f32",
    ]
    .iter()
    .map(|n| (n.to_string(), fixture(n)))
    .collect();
    dirs.push((
        "mixtral-f32, window 4".into(),
        windowed.path().to_path_buf(),
    ));
    for (name, dir) in dirs {
        let tokens = Reference::load(&dir).tokens();
        let mut e = open(&dir).unwrap();
        let (full, _) = e.logits(&tokens).unwrap();
        for split in [1, 5] {
            let mut kv = KvCache::with_capacity(tokens.len());
            let (mut got, _) = e.forward(&tokens[..split], &mut kv, 0, false).unwrap();
            for (i, &t) in tokens[split..].iter().enumerate() {
                let (row, _) = e.forward(&[t], &mut kv, 1 + i as u32, false).unwrap();
                got.extend(row);
            }
            let a: Vec<f32> = got.iter().flatten().copied().collect();
            let b: Vec<f32> = full.iter().flatten().copied().collect();
            let err = rel_l2(&a, &b);
            assert!(
                err < 1e-5,
                "{name}, prefill of {split}: relative L2 {err:.2e}"
            );
            assert!(kv.bytes() > 0, "{name}: the state is not counted");
        }
    }
}

#[test]
fn inconsistent_hybrid_configs_and_tensors_are_refused() {
    let err = |d: &std::path::Path| open(d).map(|_| ()).unwrap_err().to_string();
    // layer_types disagreeing with num_hidden_layers.
    let d = edited_fixture("qwen3_next-f32", |v| {
        v["layer_types"] =
            serde_json::json!(["linear_attention", "full_attention", "linear_attention"]);
    });
    let e = err(d.path());
    assert!(
        e.contains("layer_types") && e.contains("config.json") && e.contains('4'),
        "{e}"
    );
    // An unknown layer type, named with its index.
    let d = edited_fixture("qwen3_next-f32", |v| {
        v["layer_types"] = serde_json::json!([
            "linear_attention",
            "mamba",
            "linear_attention",
            "full_attention"
        ]);
    });
    let e = err(d.path());
    assert!(e.contains("layer_types[1]") && e.contains("mamba"), "{e}");
    // Value heads that are not a multiple of the key heads.
    let d = edited_fixture("qwen3_next-f32", |v| v["linear_num_value_heads"] = 3.into());
    let e = err(d.path());
    assert!(e.contains("linear_num_value_heads"), "{e}");
    // DeltaNet tensors whose shapes disagree with the config: the key and file are named.
    let d = edited_fixture("qwen3_next-f32", |v| v["linear_key_head_dim"] = 8.into());
    let e = err(d.path());
    assert!(
        e.contains("linear_attn") && e.contains("model.safetensors") && e.contains("shape"),
        "{e}"
    );
    let d = edited_fixture("qwen3_next-f32", |v| v["linear_conv_kernel_dim"] = 3.into());
    let e = err(d.path());
    assert!(e.contains("linear_attn.conv1d.weight"), "{e}");
    // A missing gating tensor (its header key renamed in place, same length).
    let d = renamed_tensor(
        "qwen3_next-f32",
        "layers.0.linear_attn.A_log",
        "layers.0.linear_attn.A_xyz",
    );
    let e = err(d.path());
    assert!(e.contains("model.layers.0.linear_attn.A_log"), "{e}");
}

/// Renames `from` to `to` (same length) in the safetensors header of a copy of `name`.
fn renamed_tensor(name: &str, from: &str, to: &str) -> tempfile::TempDir {
    assert_eq!(from.len(), to.len());
    let d = copy_fixture(name);
    let p = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let renamed = header.replace(from, to);
    assert_ne!(header, renamed);
    bytes[8..8 + n].copy_from_slice(renamed.as_bytes());
    std::fs::write(&p, bytes).unwrap();
    d
}

#[test]
fn inconsistent_kimi_linear_configs_and_tensors_are_refused() {
    let err = |d: &std::path::Path| open(d).map(|_| ()).unwrap_err().to_string();
    let f = "kimi_linear-f32";
    // layer_types disagreeing with linear_attn_config's 1-indexed lists.
    let d = edited_fixture(f, |v| {
        v["layer_types"] =
            serde_json::json!(["full_attention", "linear_attention", "linear_attention"]);
    });
    let e = err(d.path());
    assert!(e.contains("layer_types") && e.contains("kda_layers"), "{e}");
    // A 0-indexed list, and a layer in neither list.
    let d = edited_fixture(f, |v| {
        v["linear_attn_config"]["kda_layers"] = serde_json::json!([0, 2])
    });
    let e = err(d.path());
    assert!(
        e.contains("linear_attn_config.kda_layers") && e.contains("1-indexed"),
        "{e}"
    );
    let d = edited_fixture(f, |v| {
        v["linear_attn_config"]["kda_layers"] = serde_json::json!([1])
    });
    let e = err(d.path());
    assert!(e.contains("layer 3 is in neither"), "{e}");
    // What HF's reference does not compute: MLA with RoPE, another router, moe_layer_freq ≠ 1.
    for (field, value) in [
        ("mla_use_nope", serde_json::json!(false)),
        ("moe_router_activation_func", serde_json::json!("softmax")),
        ("moe_layer_freq", serde_json::json!(2)),
    ] {
        let d = edited_fixture(f, |v| v[field] = value.clone());
        let e = err(d.path());
        assert!(e.contains(field) && e.contains("config.json"), "{e}");
    }
    // KDA tensors whose shapes disagree with the config: the key, file and shapes are named.
    let d = edited_fixture(f, |v| v["linear_attn_config"]["head_dim"] = 32.into());
    let e = err(d.path());
    assert!(
        e.contains("model.layers.0.self_attn.q_conv1d.weight")
            && e.contains("model.safetensors")
            && e.contains("shape"),
        "{e}"
    );
    let d = edited_fixture(f, |v| {
        v["linear_attn_config"]["short_conv_kernel_size"] = 3.into()
    });
    let e = err(d.path());
    assert!(
        e.contains("q_conv1d.weight") && e.contains("[128, 1, 3]"),
        "{e}"
    );
    // Missing gating tensors.
    for (from, to) in [
        ("layers.0.self_attn.A_log", "layers.0.self_attn.A_xyz"),
        ("layers.2.self_attn.v_conv1d", "layers.2.self_attn.v_conv9z"),
        ("layers.0.self_attn.g_a_proj", "layers.0.self_attn.g_x_proj"),
    ] {
        let d = renamed_tensor(f, from, to);
        let e = err(d.path());
        assert!(e.contains(&format!("model.{from}")), "{e}");
    }
}

#[test]
fn mistral3_wrappers_are_told_apart_by_their_text_model() {
    // Mistral Large 3's layout (a DeepSeek-V3 text model in a mistral3 wrapper) runs and matches
    // HF (engine_reference covers the fixture); a Devstral-style wrapper of a dense text model is
    // refused as dense, naming both model types.
    let spec = moe_harness::models::load_spec(&fixture("mistral3_deepseek_v3-f32")).unwrap();
    assert_eq!(spec.model_type, "mistral3");
    assert!(spec.mla.is_some() && spec.moe.num_experts == 8);
    let d = edited_fixture("mistral3_deepseek_v3-f32", |v| {
        v["text_config"] = serde_json::json!({
            "model_type": "ministral3", "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
            "vocab_size": 256
        });
    });
    let e = moe_harness::models::load_spec(d.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("mistral3") && e.contains("ministral3") && e.contains("dense"),
        "{e}"
    );
}
