//! Results: `summary.parquet` / `summary.json` writing and reading, the final summary table, and
//! the paper figures (plotters, PNG and SVG, drawn from the Parquet files alone so that
//! `harness plot RESULTS_DIR` can redraw them).

mod plots;

use std::path::Path;

use polars::prelude::*;

use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::run::CellSummary;
use crate::trace;

pub use plots::plot_dir;

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

/// The table printed at the end of a run.
pub fn summary_table(rows: &[CellSummary]) -> String {
    let mut s = format!(
        "{:<32} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10} {:>9}\n",
        "cell", "hit", "prefill", "decode", "effect.", "belady", "MB read", "decode t/s", "top-1"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<32} {:>7.1}% {:>7.1}% {:>7.1}% {:>7.1}% {:>7.1}% {:>10.1} {:>10.1} {:>9}\n",
            r.cell,
            100.0 * r.hit_rate,
            100.0 * r.hit_rate_prefill,
            100.0 * r.hit_rate_decode,
            100.0 * r.effective_hit_rate,
            100.0 * r.belady_hit_rate,
            r.bytes_read as f64 / 1e6,
            r.decode_tps,
            r.top1_agreement
                .map_or("-".to_string(), |a| format!("{:.1}%", 100.0 * a)),
        ));
    }
    s
}
