//! Results: `summary.parquet` / `summary.json` writing and reading, the final summary table, and
//! the paper figures (plotters, PNG and SVG, drawn from the Parquet files alone so that
//! `harness plot RESULTS_DIR` can redraw them).

mod literature;
mod plots;
mod tables;

use std::path::Path;

use polars::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::trace;

pub use tables::{simulation_table, summary_table};

/// One row of `summary.parquet` / `summary.json`.
#[derive(Default, Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct CellSummary {
    /// Cell id.
    pub cell: String,
    /// Policy name (with parameters).
    pub policy: String,
    /// Slots per layer, when the budget is a capacity.
    pub capacity: Option<u64>,
    /// Byte budget, when the budget is in bytes (fractions resolved).
    pub budget_bytes: Option<u64>,
    /// Budget as a fraction of total expert bytes.
    pub budget_fraction: f64,
    /// `global` or `per-layer` for byte budgets.
    pub pool: String,
    /// Miss mode: `load`, `skip`, `substitute`, `low-bit` or `cpu-compute`.
    pub miss: String,
    /// Measured prompts.
    pub prompts: u64,
    /// Tokens generated over the measured prompts.
    pub tokens_generated: u64,
    /// Expert demand accesses.
    pub accesses: u64,
    /// Of which hits.
    pub hits: u64,
    /// Demand hits / accesses (an expert a prefetch brought in counts as a hit).
    pub hit_rate: f64,
    /// Hit rate during prefill.
    pub hit_rate_prefill: f64,
    /// Hit rate during decode.
    pub hit_rate_decode: f64,
    /// 1 − (demand misses + prefetch loads) / accesses: the share of expert uses that cost no
    /// load. Equals `hit_rate` without prefetching; Belady bounds it for every policy.
    pub effective_hit_rate: f64,
    /// Belady (offline optimal) hit rate on this cell's own trace at this budget.
    pub belady_hit_rate: f64,
    /// Prefetches issued.
    pub prefetch_issued: u64,
    /// Prefetched experts used before eviction / issued.
    pub prefetch_precision: Option<f64>,
    /// Prefetches used / (prefetches used + demand misses): the share of loads prefetching covered.
    pub prefetch_recall: Option<f64>,
    /// What the speed figures below stand for: the model they were measured on (the
    /// experiment's, or a `replay_on` checkpoint of a real model's shapes).
    pub speed_model: String,
    /// Where the routing came from (the experiment model's router; replayed on `speed_model`).
    pub routing: String,
    /// Checkpoint bytes of one expert of `speed_model`.
    pub expert_bytes: u64,
    /// Bytes of `speed_model`'s experts the cell's budget holds (all of them when unlimited).
    pub cache_budget_bytes: u64,
    /// The device that computed (`cpu`, `cuda:0`).
    pub device: String,
    /// CPU compute threads of the products (1 on a GPU).
    pub threads: usize,
    /// Kernel kind and SIMD form of the products: `exact/avx2`, `int8/avx2`, `int8/neon`, or
    /// `gpu`.
    pub kernels: String,
    /// Host name of the machine that ran the cell (cells of one sweep may run on several).
    pub host: String,
    /// How misses read storage, in effect: `page-cache`, `direct` or `cold`.
    pub io: String,
    /// Why `io` differs from the experiment's, when it does (a filesystem refusing direct reads).
    pub io_note: Option<String>,
    /// How CUDA misses reached the copy engine: `registered (…)` (copied straight from the
    /// page-locked shard mappings), `write-combined` / `cacheable` staging (with why `auto`
    /// did not register), `no` off CUDA.
    pub staging: String,
    /// The emulated storage device (`pcie4-nvme: 7.45 GB/s, 60 µs, queue 32`), if any.
    pub storage_device: Option<String>,
    /// Expert bytes the miss path requested (speed model, measured prompts, first repeat).
    pub bytes_read: u64,
    /// Bytes the OS read from storage meanwhile (`/proc/self/io`; all threads).
    pub device_read_bytes: Option<u64>,
    /// Bytes of the speed model's shard files in the page cache at the end of the cell.
    pub page_cache_bytes: Option<u64>,
    /// Emulated reads this machine served later than the emulated device would have (the model
    /// is faster than the machine for them).
    pub storage_late_reads: Option<u64>,
    /// Seconds reading and materialising experts.
    pub load_seconds: f64,
    /// Prompt tokens per second (median over repeats).
    pub prefill_tps: f64,
    /// Decoded tokens per second (median over repeats).
    pub decode_tps: f64,
    /// Slowest repeat's decode tokens per second.
    pub decode_tps_min: f64,
    /// Fastest repeat's decode tokens per second.
    pub decode_tps_max: f64,
    /// Speed measurements made (`[generation] repeats`).
    pub repeats: u64,
    /// Mean time to first token.
    pub ttft_seconds: f64,
    /// Expert bytes moved per decoded token (demand misses and prefetches).
    pub bytes_per_token: f64,
    /// This machine's read rate for whole experts in this run's I/O mode, measured before the
    /// cells (GB/s): the storage bound's `B_read`.
    pub storage_read_gbps: f64,
    /// All-resident decode speed of `speed_model`, measured in the same run: `R`.
    pub resident_decode_tps: f64,
    /// `1 / (1/R + bytes_per_token / B_read)`: the speed with resident compute plus every
    /// moved byte read at `B_read`, without overlap.
    pub storage_bound_tps: f64,
    /// `decode_tps / storage_bound_tps`.
    pub storage_bound_fraction: f64,
    /// Memory: the cell's own peak resident set (VmHWM, reset at the cell's start), its
    /// file-backed and anonymous parts, and the dense, expert-cache and KV bytes it holds.
    #[serde(flatten)]
    pub memory: crate::memory::MemoryReport,
    /// Miss modes other than `load`: mean KL(exact ‖ cell) of the next-token distributions
    /// (≈ 0 for the exact `cpu-compute`).
    pub kl_mean: Option<f64>,
    /// Miss modes other than `load`: fraction of steps whose argmax equals the exact one.
    pub top1_agreement: Option<f64>,
    /// Misses served by a substitute expert (`substitute`), measured prompts.
    pub substituted: u64,
    /// Misses the token ran without (`skip`, or `substitute` with nothing resident).
    pub dropped: u64,
    /// Misses served by the low-precision copy (`low-bit`).
    pub low_bit_loads: u64,
    /// Bytes those misses read from the low-precision copy (each at its own size).
    pub low_bit_bytes: u64,
    /// Misses computed on the host (`cpu-compute`).
    pub host_computed: u64,
}

/// Draws every figure of a results directory from its `summary.parquet` and `trace.parquet`
/// (and the policy / miss-mode comparison with its table when the run has several).
pub fn plot_dir(dir: &Path) -> Result<()> {
    plots::plot_figures(dir)?;
    let summary = read_summary(&dir.join("summary.parquet"))?;
    literature::plot(dir, &summary)
}

/// Writes `summary.json` and `summary.parquet` into `dir`.
pub fn write_summary(dir: &Path, rows: &[CellSummary]) -> Result<()> {
    let json = serde_json::to_string_pretty(rows).map_err(|e| Error::Input(e.to_string()))?;
    write_atomic(&dir.join("summary.json"), json.as_bytes())?;
    let mut df = summary_frame(rows)?;
    trace::write_frame(&dir.join("summary.parquet"), &mut df)
}

fn summary_frame(rows: &[CellSummary]) -> Result<DataFrame> {
    // Serialise through JSON values so that every field becomes a column with its own name.
    let values: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| serde_json::to_value(r).expect("summary serialises"))
        .collect();
    let keys: Vec<String> = match values.first().and_then(|v| v.as_object()) {
        Some(o) => o.keys().cloned().collect(),
        None => Vec::new(),
    };
    let mut cols = Vec::new();
    for k in &keys {
        let vals: Vec<&serde_json::Value> = values.iter().map(|v| &v[k]).collect();
        let col = if vals.iter().any(|v| v.is_string()) {
            Column::new(
                k.as_str().into(),
                vals.iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Vec<_>>(),
            )
        } else if vals.iter().all(|v| v.is_i64() || v.is_null())
            && vals.iter().any(|v| v.as_i64().is_some_and(|x| x < 0))
        {
            // A signed integer column (a difference, e.g. `overhead_bytes`).
            Column::new(
                k.as_str().into(),
                vals.iter().map(|v| v.as_i64()).collect::<Vec<_>>(),
            )
        } else if vals.iter().all(|v| v.is_u64() || v.is_null()) {
            // serde_json keeps f64 fields as floats (1.0 stays 1.0), so integer columns are exactly
            // the u64 fields.
            Column::new(
                k.as_str().into(),
                vals.iter().map(|v| v.as_u64()).collect::<Vec<_>>(),
            )
        } else {
            Column::new(
                k.as_str().into(),
                vals.iter().map(|v| v.as_f64()).collect::<Vec<_>>(),
            )
        };
        cols.push(col);
    }
    DataFrame::new(rows.len(), cols)
        .map_err(|e| Error::Input(format!("building the summary frame: {e}")))
}

/// Reads `summary.parquet` back into summaries.
pub fn read_summary(path: &Path) -> Result<Vec<CellSummary>> {
    let df = trace::read_frame(path)?;
    let mut objs: Vec<serde_json::Map<String, serde_json::Value>> =
        vec![serde_json::Map::new(); df.height()];
    for col in df.columns() {
        let name = col.name().to_string();
        let s = col.as_materialized_series();
        for (i, obj) in objs.iter_mut().enumerate() {
            let v = s.get(i).map_err(|e| Error::format(path, e.to_string()))?;
            let j = match v {
                AnyValue::Null => serde_json::Value::Null,
                AnyValue::String(x) => serde_json::Value::String(x.to_string()),
                AnyValue::StringOwned(x) => serde_json::Value::String(x.to_string()),
                AnyValue::UInt64(x) => serde_json::json!(x),
                AnyValue::UInt32(x) => serde_json::json!(x),
                AnyValue::Int64(x) => serde_json::json!(x),
                AnyValue::Int32(x) => serde_json::json!(x),
                AnyValue::Float64(x) => serde_json::json!(x),
                AnyValue::Float32(x) => serde_json::json!(x),
                other => {
                    return Err(Error::format(
                        path,
                        format!("column `{name}`: unexpected value {other:?}"),
                    ))
                }
            };
            obj.insert(name.clone(), j);
        }
    }
    objs.into_iter()
        .map(|o| {
            serde_json::from_value(serde_json::Value::Object(o))
                .map_err(|e| Error::format(path, format!("not a summary file: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_round_trip_through_parquet_with_signed_and_missing_values() {
        let d = tempfile::tempdir().unwrap();
        let mut a = CellSummary {
            cell: "a".into(),
            decode_tps: 1.5,
            ..Default::default()
        };
        a.memory.overhead_bytes = -112_137_728;
        let b = CellSummary {
            cell: "b".into(),
            device_read_bytes: Some(7),
            io_note: Some("refused".into()),
            ..Default::default()
        };
        write_summary(d.path(), &[a.clone(), b.clone()]).unwrap();
        assert_eq!(
            read_summary(&d.path().join("summary.parquet")).unwrap(),
            vec![a, b]
        );
    }
}
