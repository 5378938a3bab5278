//! `harness synth` writes checkpoints the engine loads and runs, with the real shapes: the
//! expert bytes `inspect` measures equal its estimate from the bare config.

use moe_harness::config::QuantParams;
use moe_harness::engine::{Engine, EngineConfig, Sampler};
use moe_harness::experts::budget::Budget;
use moe_harness::synth::{synth, SynthLayout};

#[test]
fn synthesized_checkpoints_load_run_and_match_inspect() {
    for (fixture, layout) in [
        ("glm4_moe-f32-sharded", SynthLayout::Mlx(4)),
        ("deepseek_v3-f32", SynthLayout::Mlx(4)),
        ("qwen3_moe-f32", SynthLayout::Bf16),
        ("mixtral-f32", SynthLayout::Mlx(8)),
        ("kimi_k25-bf16", SynthLayout::Bf16),
        // Two layers: KDA + dense MLP, then MLA + MoE; mlx-lm's and HF's key spellings.
        ("kimi_linear-f32", SynthLayout::Mlx(4)),
        ("kimi_linear-f32", SynthLayout::Bf16),
    ] {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("m");
        let cfg = crate::common::fixture(fixture).join("config.json");
        let r = synth(&cfg, &out, layout, Some(2), 7, 200_000).unwrap();
        assert!(r.shards >= 1 && r.bytes > 0);
        assert!(
            out.join("tokenizer.json").exists(),
            "a tokenizer for `harness run`"
        );
        let mut e = Engine::open(
            &out,
            candle_core::Device::Cpu,
            EngineConfig {
                budget: Budget::SlotsPerLayer(2),
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{fixture}: {e}"));
        let g = e
            .generate(&[1, 2, 3], 4, &mut Sampler::Greedy, &[])
            .unwrap();
        assert_eq!(g.tokens.len(), 4);
        // Measured expert size equals the estimate from the config at the same quantization.
        if let SynthLayout::Mlx(bits) = layout {
            let q = QuantParams {
                bits,
                group_size: 64,
            };
            let measured = moe_harness::inspect::inspect(&out, q).unwrap();
            let estimated = moe_harness::inspect::inspect(&out.join("config.json"), q).unwrap();
            assert_eq!(
                measured.bytes_per_expert, estimated.bytes_per_expert,
                "{fixture}"
            );
        }
        assert!(synth(&cfg, &out, layout, None, 7, 200_000)
            .unwrap_err()
            .to_string()
            .contains("already holds"));
    }
}

/// The weights' bytes for a seed do not change: FNV-1a of the shards `harness synth` wrote
/// before its pieces were written by several threads (one generator stepped in turn).
#[test]
fn synthesized_bytes_are_those_of_the_sequential_generator() {
    for (fixture, layout, want) in [
        (
            "deepseek_v3-f32",
            SynthLayout::Mlx(4),
            0x5993_47db_ca75_5110u64,
        ),
        ("qwen3_moe-f32", SynthLayout::Bf16, 0x3f16_dd62_37eb_9b9c),
        ("mixtral-f32", SynthLayout::Mlx(8), 0x70f2_a475_1199_53ef),
    ] {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("m");
        let cfg = crate::common::fixture(fixture).join("config.json");
        synth(&cfg, &out, layout, Some(2), 7, 1 << 20).unwrap();
        let mut shards: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        shards.sort();
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for p in shards {
            for b in std::fs::read(p).unwrap() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        assert_eq!(h, want, "{fixture}");
    }
}
