//! The paper-figures notebook runs headless against fresh results, so it cannot rot.
//! Needs jupyter (nbconvert), polars and matplotlib: `scripts/test.sh` installs them.

use std::process::Command;

#[test]
fn figures_notebook_executes() {
    let d = tempfile::tempdir().unwrap();
    let model = crate::common::fixture("glm4_moe-mlx4");
    let f = d.path().join("nb.toml");
    std::fs::write(
        &f,
        format!(
            "name = \"nb\"\n[model]\npath = \"{}\"\n[cache]\npolicy = [\"lru\", \"lfu\"]\ncapacity = [2, 4]\n[prompts]\ninline = [\"def f(x):\", \"import os\"]\n[generation]\nmax_new_tokens = 4\n[output]\ndir = \"out\"\nplots = false\n",
            model.display()
        ),
    )
    .unwrap();
    let exp = moe_harness::experiment::load(&f, true).unwrap();
    let results = moe_harness::run::run(&exp, &Default::default()).unwrap();
    let figs = d.path().join("figs");
    let nb = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("notebooks/figures.ipynb");
    let out = Command::new("python3")
        .args([
            "-m",
            "jupyter",
            "nbconvert",
            "--to",
            "notebook",
            "--execute",
            "--output-dir",
        ])
        .arg(d.path())
        .arg(&nb)
        .env("MOE_RESULTS", &results)
        .env("MOE_FIGURES", &figs)
        .output()
        .expect(
            "python3 must be installed (scripts/test.sh installs the notebook's Python packages)",
        );
    assert!(
        out.status.success(),
        "notebook failed (install its packages with `pip install -r scripts/requirements-test.txt`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "hit_rate_vs_budget.pdf",
        "hit_rate_vs_budget.png",
        "decode_tps_vs_budget.pdf",
        "hit_rate_per_layer.pdf",
        "expert_frequency.pdf",
    ] {
        assert!(figs.join(f).exists(), "notebook did not write {f}");
    }
}
