//! CI regression check: the default experiment in `--quick` mode against the committed baseline
//! `benches/baseline/default-quick.json`: hit counts must match exactly (routing and policies are
//! deterministic); decode speed is compared loosely, as each cell's ratio to the reference cell
//! measured in the same run (within 4× either way), never as absolute tokens/s.
//! Re-bless after an intended change: `MOE_HARNESS_BLESS=1 cargo test --test integration quick_baseline::`.

use std::path::Path;

use moe_harness::report::CellSummary;
use moe_harness::run::{run, RunOptions};

const REFERENCE_CELL: &str = "lru_cap32_load";

#[test]
fn default_quick_run_matches_the_committed_baseline() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exp = moe_harness::experiment::load(&root.join("experiments/default.toml"), true).unwrap();
    let out = tempfile::tempdir().unwrap();
    let opts = RunOptions {
        out_root: Some(out.path().to_path_buf()),
        quick: true,
        ..RunOptions::default()
    };
    let dir = run(&exp, &opts).unwrap();
    let cells: Vec<CellSummary> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    let reference = cells
        .iter()
        .find(|c| c.cell == REFERENCE_CELL)
        .expect("reference cell")
        .decode_tps;
    let path = root.join("benches/baseline/default-quick.json");
    if std::env::var_os("MOE_HARNESS_BLESS").is_some() {
        let v: serde_json::Map<String, serde_json::Value> = cells
            .iter()
            .map(|c| (c.cell.clone(), serde_json::json!({"accesses": c.accesses, "hits": c.hits, "decode_tps_ratio": c.decode_tps / reference})))
            .collect();
        let doc = serde_json::json!({"experiment": "experiments/default.toml --quick", "reference_cell": REFERENCE_CELL, "cells": v});
        std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap() + "\n").unwrap();
        return;
    }
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("committed baseline")).unwrap();
    let base = base["cells"].as_object().unwrap();
    assert_eq!(base.len(), cells.len(), "cells differ from the baseline");
    for c in &cells {
        let b = base
            .get(&c.cell)
            .unwrap_or_else(|| panic!("cell {} not in the baseline", c.cell));
        assert_eq!(
            c.accesses,
            b["accesses"].as_u64().unwrap(),
            "{}: accesses",
            c.cell
        );
        assert_eq!(
            c.hits,
            b["hits"].as_u64().unwrap(),
            "{}: hits changed (re-bless if intended)",
            c.cell
        );
        let ratio = c.decode_tps / reference;
        let want = b["decode_tps_ratio"].as_f64().unwrap();
        assert!(
            ratio > want / 4.0 && ratio < want * 4.0,
            "{}: decode speed ratio {ratio:.2} vs baseline {want:.2}",
            c.cell
        );
    }
}
