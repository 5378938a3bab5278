//! Memory a lazy-loading user can spend on experts (issue 19): the process's own high-water mark
//! after a run stays within 10 % of what the run must hold — the dense weights (once), the
//! expert cache and the KV cache — on a 2-layer GLM-4.7-Flash-shaped MLX 4-bit checkpoint
//! (422 MB of dense weights, 5.31 MB experts). A memory check, not a timing. Before dense
//! weights were read in place this peaked at 957 MB (the dense bytes held twice).

use std::path::Path;
use std::process::Command;

use moe_harness::memory::MemoryReport;

fn generate(model: &Path, extra: &[&str]) -> MemoryReport {
    let d = tempfile::tempdir().unwrap();
    let json = d.path().join("m.json");
    let out = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args([
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            "11,12,13,14,15,16,17,18",
            "--max-tokens",
            "6",
            "--memory-json",
            json.to_str().unwrap(),
        ])
        .args(extra)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

#[test]
fn peak_rss_is_dense_plus_cache_plus_kv_within_ten_percent() {
    if !Path::new("/proc/self/status").exists() {
        eprintln!("no /proc: the resident set cannot be read here");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("flash2");
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/configs/glm47-flash.json");
    moe_harness::synth::synth(
        &cfg,
        &model,
        moe_harness::synth::SynthLayout::Mlx(4),
        Some(2),
        0,
        2_000_000_000,
    )
    .unwrap();
    let m = generate(&model, &["--capacity", "4"]);
    assert!(m.dense_bytes > 400_000_000, "{m:?}");
    assert_eq!(m.expert_cache_bytes, 4 * 5_308_416, "{m:?}");
    let budget = (m.dense_bytes + m.expert_cache_bytes + m.kv_bytes) as f64;
    assert!(
        (m.peak_rss_bytes as f64) <= 1.1 * budget,
        "peak RSS {} > 1.1 × (dense {} + cache {} + KV {}): {}",
        m.peak_rss_bytes,
        m.dense_bytes,
        m.expert_cache_bytes,
        m.kv_bytes,
        m.line()
    );
    // The dense weights are file-backed pages (the map), not a heap copy.
    assert!(
        m.rss_anon_bytes < m.dense_bytes / 4,
        "anonymous memory {} suggests a copy of the dense weights: {}",
        m.rss_anon_bytes,
        m.line()
    );
    // Copying them (the comparison form) does cost a heap copy: the check can fail.
    let c = generate(&model, &["--capacity", "4", "--dense", "copied"]);
    assert!(
        c.rss_anon_bytes > c.dense_bytes / 2,
        "copied dense weights should be anonymous memory: {}",
        c.line()
    );
}
