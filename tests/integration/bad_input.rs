//! Every bad input gives a clear error naming the file, key or value, a non-zero exit, no panic.

use std::path::Path;
use std::process::Command;

use crate::common::{copy_fixture, edit_config, fixture};
use candle_core::Device;
use moe_harness::engine::{Engine, EngineConfig};
use moe_harness::experts::budget::Budget;

fn open(dir: &Path) -> String {
    match Engine::open(dir, Device::Cpu, EngineConfig::default()) {
        Ok(_) => panic!("{} opened but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn harness(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

fn shards(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "safetensors")
                && !p.ends_with("reference.safetensors")
        })
        .collect();
    v.sort();
    v
}

#[test]
fn truncated_shard() {
    let d = copy_fixture("glm4_moe-f32-sharded");
    let shard = shards(d.path()).pop().unwrap();
    let len = std::fs::metadata(&shard).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap();
    f.set_len(len / 2).unwrap();
    let err = open(d.path());
    assert!(
        err.contains(shard.file_name().unwrap().to_str().unwrap()) && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn lying_header() {
    let d = copy_fixture("glm4_moe-bf16");
    let p = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    // Claim a larger end offset for the first tensor whose data ends at the end of the file.
    let mut v: serde_json::Value = serde_json::from_str(&header).unwrap();
    let data_len = (bytes.len() - 8 - n) as u64;
    for (k, t) in v.as_object_mut().unwrap() {
        if k != "__metadata__" && t["data_offsets"][1].as_u64() == Some(data_len) {
            t["data_offsets"][1] = serde_json::json!(data_len + 4096);
        }
    }
    let mut h = serde_json::to_string(&v).unwrap();
    while h.len() < n {
        h.push(' ');
    }
    assert_eq!(h.len(), n, "rewritten header must keep its length");
    bytes[8..8 + n].copy_from_slice(h.as_bytes());
    std::fs::write(&p, bytes).unwrap();
    let err = open(d.path());
    assert!(
        err.contains("model.safetensors") && err.contains("run past"),
        "{err}"
    );
}

#[test]
fn index_names_missing_file() {
    let d = copy_fixture("glm4_moe-f32-sharded");
    let shard = shards(d.path()).pop().unwrap();
    std::fs::remove_file(&shard).unwrap();
    let err = open(d.path());
    assert!(
        err.contains("model.safetensors.index.json") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn missing_tensor() {
    let d = copy_fixture("glm4_moe-bf16");
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let victim = "model.layers.1.mlp.experts.3.down_proj.weight";
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(k, _)| k != victim)
        .collect();
    assert_eq!(kept.len() + 1, st.len(), "fixture should contain {victim}");
    let out = safetensors::serialize(kept, None).unwrap();
    std::fs::write(&p, out).unwrap();
    let err = open(d.path());
    assert!(err.contains(victim), "{err}");
}

#[test]
fn shape_disagrees_with_config() {
    let d = copy_fixture("qwen3_moe-f32");
    edit_config(d.path(), |v| {
        v["moe_intermediate_size"] = serde_json::json!(48)
    });
    let err = open(d.path());
    assert!(err.contains("shape") && err.contains("experts"), "{err}");
}

#[test]
fn dense_and_unknown_models() {
    let err = open(&fixture("llama-dense"));
    assert!(err.contains("dense") && err.contains("llama"), "{err}");
    let d = copy_fixture("mixtral-f32");
    edit_config(d.path(), |v| {
        v["model_type"] = serde_json::json!("frobnicator")
    });
    let err = open(d.path());
    assert!(
        err.contains("frobnicator") && err.contains("glm4_moe"),
        "{err}"
    );
    edit_config(d.path(), |v| {
        v.as_object_mut().unwrap().remove("model_type");
    });
    assert!(open(d.path()).contains("model_type"));
}

#[test]
fn capacity_below_top_k() {
    let dir = fixture("mixtral-f32");
    let cfg = EngineConfig {
        budget: Budget::SlotsPerLayer(1),
        ..Default::default()
    };
    let err = Engine::open(&dir, Device::Cpu, cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("capacity 1") && err.contains("top-k"), "{err}");
    let cfg = EngineConfig {
        budget: Budget::BytesGlobal(1000),
        ..Default::default()
    };
    let err = Engine::open(&dir, Device::Cpu, cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("working set"), "{err}");
}

#[test]
fn cli_token_errors_exit_nonzero() {
    let dir = fixture("mixtral-f32");
    let d = dir.to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let npy = out.path().join("l.npy");
    let npy = npy.to_str().unwrap();
    let (code, err) = harness(&["logits", "--model", d, "--tokens", "1,x,3", "--out", npy]);
    assert_ne!(code, 0);
    assert!(err.contains("`x` is not a token id"), "{err}");
    let (code, err) = harness(&["logits", "--model", d, "--tokens", "1,99999", "--out", npy]);
    assert_ne!(code, 0);
    assert!(err.contains("99999") && err.contains("vocab"), "{err}");
    assert!(!Path::new(npy).exists(), "no output on failure");
    let logits_1_2 = |extra: &[&str]| {
        harness(
            &[
                &["logits", "--model", d, "--tokens", "1,2", "--out", npy],
                extra,
            ]
            .concat(),
        )
    };
    let (code, err) = logits_1_2(&["--capacity", "1"]);
    assert_ne!(code, 0);
    assert!(err.contains("top-k"), "{err}");
    let (code, err) = harness(&[
        "generate", "--model", d, "--tokens", "1", "--policy", "fifo-ish",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("fifo-ish") && err.contains("lru"), "{err}");
    // Registered shard mappings are the CUDA miss path's: asked for on the CPU, refused (never
    // a run that claims a staging it did not use).
    let (code, err) = logits_1_2(&["--staging", "registered"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("staging `registered`") && err.contains("cuda"),
        "{err}"
    );
    assert!(!Path::new(npy).exists(), "no output on failure");
    let (code, err) = harness(&[
        "logits",
        "--model",
        "/nonexistent/model",
        "--tokens",
        "1",
        "--out",
        npy,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/model"), "{err}");
}

#[test]
fn cli_inspect_verdicts() {
    let (code, _) = harness(&["inspect", fixture("llama-dense").to_str().unwrap()]);
    assert_eq!(code, 3, "dense model: non-zero exit");
    let out = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args([
            "inspect",
            "--json",
            fixture("glm4_moe-mlx4").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"], "drop-in");
    assert_eq!(v["layout"], "stacked");
    assert_eq!(v["model_type"], "glm4_moe");
}

/// The f32 values of a `.npy` file `harness logits` wrote (format 1.0, little-endian).
fn read_npy_f32(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..6], b"\x93NUMPY");
    let header = u16::from_le_bytes([b[8], b[9]]) as usize;
    b[10 + header..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn cli_logits_stepwise_matches_the_full_pass_reference_and_checks_prefill() {
    // MLA (its decode path is the one the CUDA build fuses), every token after the second a
    // decode step of its own: the HF full-pass reference still holds.
    let dir = fixture("deepseek_v3-f32");
    let r = crate::common::Reference::load(&dir);
    let toks: Vec<String> = r.tokens().iter().map(|t| t.to_string()).collect();
    let toks = toks.join(",");
    let out = tempfile::tempdir().unwrap();
    let npy = out.path().join("l.npy");
    let (d, n) = (dir.to_str().unwrap(), npy.to_str().unwrap());
    let stepwise = |prefill: &str| {
        let args = [
            "--model",
            d,
            "--tokens",
            &toks,
            "--out",
            n,
            "--prefill",
            prefill,
        ];
        harness(&[&["logits"][..], &args].concat())
    };
    let (code, err) = stepwise("2");
    assert_eq!(code, 0, "{err}");
    let got = read_npy_f32(&npy);
    let e = crate::common::rel_l2(&got, &r.logits);
    assert!(e < 1e-5, "stepwise logits vs HF: relative L2 {e:.2e}");
    for bad in ["0", "99"] {
        let (code, err) = stepwise(bad);
        assert_ne!(code, 0);
        assert!(err.contains(&format!("--prefill {bad}")), "{err}");
    }
    // Every expert loaded first (the all-resident path a GPU routes on the device): the same
    // logits, and every access of the decode steps a hit.
    let toks_n = r.tokens().len() as u64;
    let base = [
        "logits",
        "--model",
        d,
        "--tokens",
        &toks,
        "--out",
        n,
        "--prefill",
        "1",
    ];
    let (code, err) = harness(&[&base[..], &["--all-resident"]].concat());
    assert_eq!(code, 0, "{err}");
    let e = crate::common::rel_l2(&read_npy_f32(&npy), &r.logits);
    assert!(
        e < 1e-5,
        "all-resident stepwise logits vs HF: relative L2 {e:.2e}"
    );
    let line = err
        .lines()
        .find(|l| l.contains("accesses"))
        .unwrap_or_default();
    let count = |what: &str| -> u64 {
        let before = line.split(&format!(" {what}")).next().unwrap_or_default();
        before
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .parse()
            .unwrap_or(u64::MAX)
    };
    let (accesses, hits) = (count("accesses"), count("hits"));
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let experts = spec["n_routed_experts"].as_u64().unwrap();
    let moe_layers = spec["num_hidden_layers"].as_u64().unwrap()
        - spec["first_k_dense_replace"].as_u64().unwrap_or(0);
    let routed = spec["num_experts_per_tok"].as_u64().unwrap() * moe_layers * toks_n;
    // The loading steps miss every expert once; every routed access after them hits.
    assert_eq!(accesses - hits, experts * moe_layers, "{line}");
    assert_eq!(hits, routed, "{line}");
    let (code, err) = harness(&[&base[..], &["--all-resident", "--capacity", "2"]].concat());
    assert_ne!(code, 0);
    assert!(err.contains("unlimited cache budget"), "{err}");
}
