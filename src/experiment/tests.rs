//! Unit tests of experiment files: sweeps, typos and bad values.

use super::*;

fn write(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("e.toml");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn sweep_is_the_cartesian_product() {
    let d = tempfile::tempdir().unwrap();
    let f = write(
        d.path(),
        "[model]\npath = \"m\"\n[cache]\npolicy = [\"lru\", \"lfu\"]\ncapacity = [4, 8]\nbudget = [\"25%\", \"1MiB\"]\n[prompts]\ninline = [\"a\", \"b\"]\nwarmup = 1\n",
    );
    let e = load(&f, false).unwrap();
    assert_eq!(e.cells.len(), 2 * 4);
    assert_eq!(e.cells[0].id, "lru_cap4_load");
    assert!(e
        .cells
        .iter()
        .any(|c| c.budget == BudgetSpec::Fraction(0.25)));
    assert!(e
        .cells
        .iter()
        .any(|c| c.budget == BudgetSpec::Bytes(1 << 20)));
    assert_eq!(e.warmup.len(), 1);
    assert_eq!(e.prompts.len(), 1);
    assert_eq!(e.model_dir, d.path().join("m"));
}

#[test]
fn typos_and_bad_values_name_the_key_and_file() {
    let d = tempfile::tempdir().unwrap();
    let f = write(
        d.path(),
        "[model]\npath = \"m\"\n[cache]\npolicyy = \"lru\"\n[prompts]\ninline = [\"a\"]\n",
    );
    let err = load(&f, false).unwrap_err().to_string();
    assert!(err.contains("policyy") && err.contains("e.toml"), "{err}");
    let f = write(
        d.path(),
        "[model]\npath = \"m\"\n[cache]\npolicy = \"mru\"\n[prompts]\ninline = [\"a\"]\n",
    );
    let err = load(&f, false).unwrap_err().to_string();
    assert!(
        err.contains("cache.policy") && err.contains("mru") && err.contains("lru"),
        "{err}"
    );
    let f = write(
        d.path(),
        "[model]\npath = \"m\"\n[cache]\nbudget = \"12 parsecs\"\n[prompts]\ninline = [\"a\"]\n",
    );
    assert!(load(&f, false)
        .unwrap_err()
        .to_string()
        .contains("cache.budget"));
    let f = write(d.path(), "[model]\npath = \"nowhere\"\nenv = \"MOE_HARNESS_TEST_UNSET_VAR\"\ndownload = \"hf.co/x\"\n[prompts]\ninline = [\"a\"]\n");
    let err = load(&f, true).unwrap_err().to_string();
    assert!(
        err.contains("nowhere")
            && err.contains("MOE_HARNESS_TEST_UNSET_VAR")
            && err.contains("hf.co/x"),
        "{err}"
    );
    let f = write(
        d.path(),
        "[model]\npath = \"m\"\n[prompts]\nfile = \"missing.txt\"\n",
    );
    assert!(load(&f, false)
        .unwrap_err()
        .to_string()
        .contains("missing.txt"));
}
