//! Shared helpers for integration tests: fixture discovery and reference loading.

use std::path::{Path, PathBuf};

use moe_harness::weights::Checkpoint;

/// Root of the generated model fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

/// A fixture directory by name.
pub fn fixture(name: &str) -> PathBuf {
    let p = fixtures().join(name);
    assert!(
        p.join("config.json").exists(),
        "missing fixture {} (run scripts/make_fixtures.py)",
        p.display()
    );
    p
}

/// The reference outputs saved by scripts/make_fixtures.py.
pub struct Reference {
    pub json: serde_json::Value,
    pub logits: Vec<f32>,
}

impl Reference {
    pub fn load(dir: &Path) -> Reference {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(
            dir.join("reference.safetensors"),
            tmp.path().join("model.safetensors"),
        )
        .unwrap();
        let ck = Checkpoint::open(tmp.path()).unwrap();
        let e = ck.get("logits").expect("reference logits").clone();
        let logits = ck.f32_vec("logits", &e.shape).unwrap();
        Reference { json, logits }
    }
    pub fn tokens(&self) -> Vec<u32> {
        self.json["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect()
    }
    pub fn ids(v: &serde_json::Value) -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect()
    }
}

/// Relative L2 error ‖a − b‖ / ‖b‖.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Rewrites `dir/config.json` through `f`.
pub fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// A copy of a fixture whose config `f` edits (for tests that need a different geometry).
pub fn edited_fixture(name: &str, f: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let d = copy_fixture(name);
    edit_config(d.path(), f);
    d
}

/// Copies a fixture into a temp dir (for tests that corrupt it).
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let src = fixture(name);
    let dst = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), dst.path().join(e.file_name())).unwrap();
        }
    }
    dst
}

/// Runs the `harness` binary with `args` in `dir` (the current directory if `None`): exit code,
/// stdout, stderr. Fails the test if it panicked.
pub fn harness_in(dir: Option<&Path>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_harness"));
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd.args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        err,
    )
}
