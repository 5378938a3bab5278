//! Routing traces on disk: one Parquet row per (token, MoE layer), written by the experiment
//! runner and read back by `harness simulate`, `harness plot` and the notebooks.
//!
//! Schema (column: type; `?` = optional when reading):
//! `cell`?: str · `prompt`: u32 · `step`: u32 (0 = prefill, k = k-th decoded token) ·
//! `pos`: u32 · `phase`: str (`prefill`/`decode`) · `layer`: u32 · `experts`: `list<u32>`
//! (u16/i32/i64 accepted) · `weights`?: `list<f32>` · `lookahead`?: `list<u32>` (null when no
//! prediction) · `hits`?: `list<bool>` · `load_ns`?: u64.

use std::fs::File;
use std::path::Path;

use polars::prelude::*;

use crate::error::{Error, Result};
use crate::experts::Phase;

/// One row of a routing trace: one token at one MoE layer. The engine writes it, the runner
/// stores it, the simulator replays it; its fields are the Parquet schema's columns.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TraceRow {
    /// Prompt index within the run.
    pub prompt: u32,
    /// Forward call within the prompt: 0 = prefill, k = k-th decoded token.
    pub step: u32,
    /// Absolute token position.
    pub pos: u32,
    /// Prefill or decode.
    pub phase: Phase,
    /// Decoder layer.
    pub layer: u32,
    /// Selected experts, in router order (the order the cache saw them).
    pub experts: Vec<u32>,
    /// Their router weights (empty when not recorded).
    pub weights: Vec<f32>,
    /// Experts the router lookahead predicted for this layer while the previous MoE layer of the
    /// same token ran (decode with `lookahead` only).
    pub lookahead: Option<Vec<u32>>,
    /// Per selected expert: was it resident when demanded (empty when not recorded).
    pub hits: Vec<bool>,
    /// Nanoseconds the engine thread spent loading experts or waiting for them during this step
    /// (demand misses and prefetches; a load that finished on a loader thread before it was
    /// needed costs nothing here).
    pub load_ns: u64,
}

/// The rows of one sweep cell, in execution order.
#[derive(Debug, Clone, PartialEq)]
pub struct CellTrace {
    /// Sweep cell id (empty when the file has no `cell` column).
    pub cell: String,
    /// Its rows.
    pub rows: Vec<TraceRow>,
}

/// The cell named `name` of a trace read from `path`, or the first one when no name is given
/// (saying so on stderr when there are several).
pub fn select_cell<'a>(
    path: &Path,
    cells: &'a [CellTrace],
    name: Option<&str>,
) -> Result<&'a CellTrace> {
    let names = || {
        cells
            .iter()
            .map(|c| c.cell.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match name {
        Some(n) => cells.iter().find(|c| c.cell == n).ok_or_else(|| {
            Error::Input(format!(
                "{}: no cell `{n}` in the trace (cells: {})",
                path.display(),
                names()
            ))
        }),
        None => {
            let first = cells
                .first()
                .ok_or_else(|| Error::format(path, "the trace has no rows"))?;
            if cells.len() > 1 {
                eprintln!(
                    "{}: the trace holds {} cells; using `{}` (choose with --cell)",
                    path.display(),
                    cells.len(),
                    first.cell
                );
            }
            Ok(first)
        }
    }
}

fn perr(path: &Path, e: PolarsError) -> Error {
    Error::format(path, format!("parquet: {e}"))
}

/// Builds the trace data frame (one row per trace row, with its cell id).
pub fn to_frame(cells: &[CellTrace]) -> Result<DataFrame> {
    let rows: Vec<(&str, &TraceRow)> = cells
        .iter()
        .flat_map(|c| c.rows.iter().map(move |r| (c.cell.as_str(), r)))
        .collect();
    let n = rows.len();
    let mut experts = ListPrimitiveChunkedBuilder::<UInt32Type>::new(
        "experts".into(),
        n,
        n * 8,
        DataType::UInt32,
    );
    let mut weights = ListPrimitiveChunkedBuilder::<Float32Type>::new(
        "weights".into(),
        n,
        n * 8,
        DataType::Float32,
    );
    let mut lookahead = ListPrimitiveChunkedBuilder::<UInt32Type>::new(
        "lookahead".into(),
        n,
        n * 8,
        DataType::UInt32,
    );
    let mut hits = ListBooleanChunkedBuilder::new("hits".into(), n, n * 8);
    for (_, r) in &rows {
        experts.append_slice(&r.experts);
        weights.append_slice(&r.weights);
        lookahead.append_opt_slice(r.lookahead.as_deref());
        let h = Series::new("".into(), r.hits.as_slice());
        hits.append_series(&h)
            .map_err(|e| Error::Input(e.to_string()))?;
    }
    let col = |name: &str, v: Vec<u32>| Column::new(name.into(), v);
    let df = DataFrame::new(
        n,
        vec![
            Column::new("cell".into(), rows.iter().map(|r| r.0).collect::<Vec<_>>()),
            col("prompt", rows.iter().map(|r| r.1.prompt).collect()),
            col("step", rows.iter().map(|r| r.1.step).collect()),
            col("pos", rows.iter().map(|r| r.1.pos).collect()),
            Column::new(
                "phase".into(),
                rows.iter()
                    .map(|r| r.1.phase.to_string())
                    .collect::<Vec<_>>(),
            ),
            col("layer", rows.iter().map(|r| r.1.layer).collect()),
            experts.finish().into_series().into(),
            weights.finish().into_series().into(),
            lookahead.finish().into_series().into(),
            hits.finish().into_series().into(),
            Column::new(
                "load_ns".into(),
                rows.iter().map(|r| r.1.load_ns).collect::<Vec<u64>>(),
            ),
        ],
    )
    .map_err(|e| Error::Input(format!("building the trace frame: {e}")))?;
    Ok(df)
}

/// Writes a data frame as Parquet (zstd), through a temp file and rename.
pub fn write_frame(path: &Path, df: &mut DataFrame) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
    let f = tmp.reopen().map_err(|e| Error::io(path, e))?;
    ParquetWriter::new(f)
        .finish(df)
        .map_err(|e| perr(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Writes a trace file.
pub fn write(path: &Path, cells: &[CellTrace]) -> Result<()> {
    write_frame(path, &mut to_frame(cells)?)
}

/// Reads a Parquet file into a data frame.
///
/// The Parquet decoder can panic on a corrupted file instead of returning an error; such a panic
/// is caught here and reported as a corrupt file (the binary keeps the decoder's panic message
/// off the terminal).
pub fn read_frame(path: &Path) -> Result<DataFrame> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ParquetReader::new(f).finish()
    })) {
        Ok(r) => r.map_err(|e| perr(path, e)),
        Err(_) => Err(Error::format(
            path,
            "corrupt Parquet file (the decoder failed on its contents)",
        )),
    }
}

/// A non-negative integer column that fits u32, checked value by value: floats, strings,
/// nulls and negative or too-large values are errors naming the column and row.
fn u32_col(path: &Path, df: &DataFrame, name: &str) -> Result<Vec<u32>> {
    let c = df.column(name).map_err(|_| missing(path, name))?;
    let vals = ints(path, name, c.as_materialized_series())?;
    vals.into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            None => Err(Error::format(path, format!("row {i}: `{name}` is null"))),
            Some(v) => to_u32(path, name, i, v),
        })
        .collect()
}

fn to_u32(path: &Path, name: &str, row: usize, v: i128) -> Result<u32> {
    if v < 0 {
        return Err(Error::format(
            path,
            format!("row {row}: `{name}` is negative ({v}); ids and positions are non-negative"),
        ));
    }
    u32::try_from(v).map_err(|_| {
        Error::format(
            path,
            format!("row {row}: `{name}` = {v} does not fit in 32 bits"),
        )
    })
}

/// The values of an integer series (any width, signed or not); anything else is an error.
fn ints(path: &Path, name: &str, s: &Series) -> Result<Vec<Option<i128>>> {
    let dt = s.dtype();
    if !dt.is_integer() {
        return Err(Error::format(
            path,
            format!("column `{name}` must hold integers, not {dt}"),
        ));
    }
    Ok(if dt.is_unsigned_integer() {
        let c = s.cast(&DataType::UInt64).map_err(|e| perr(path, e))?;
        let ca = c.u64().map_err(|e| perr(path, e))?;
        ca.iter().map(|v| v.map(i128::from)).collect()
    } else {
        let c = s.cast(&DataType::Int64).map_err(|e| perr(path, e))?;
        let ca = c.i64().map_err(|e| perr(path, e))?;
        ca.iter().map(|v| v.map(i128::from)).collect()
    })
}

/// A column of expert-id lists (`list<int>` of any integer width); `None` where the row's list is
/// null. Non-integer elements, null elements and ids out of range are errors naming the row.
fn id_lists(
    path: &Path,
    df: &DataFrame,
    name: &str,
    required: bool,
) -> Result<Option<ListCells<u32>>> {
    let Ok(c) = df.column(name) else {
        return if required {
            Err(missing(path, name))
        } else {
            Ok(None)
        };
    };
    let ca = c.list().map_err(|_| {
        Error::format(
            path,
            format!(
                "column `{name}` must be a list of integer expert ids, not {}",
                c.dtype()
            ),
        )
    })?;
    let mut out = Vec::with_capacity(ca.len());
    for (i, cell) in ca.series_iter().enumerate() {
        out.push(match cell {
            None => None,
            Some(s) => Some(
                ints(path, name, &s)?
                    .into_iter()
                    .map(|v| match v {
                        None => Err(Error::format(
                            path,
                            format!("row {i}: `{name}` has a null element"),
                        )),
                        Some(v) => to_u32(path, name, i, v),
                    })
                    .collect::<Result<Vec<u32>>>()?,
            ),
        });
    }
    Ok(Some(out))
}

/// Checks one row's ids: a non-empty expert list without repeats, ids in range.
fn check_row(path: &Path, i: usize, r: &TraceRow) -> Result<()> {
    let bad = |m: String| {
        Error::format(
            path,
            format!(
                "row {i} (prompt {}, pos {}, layer {}): {m}",
                r.prompt, r.pos, r.layer
            ),
        )
    };
    if r.layer >= crate::experts::MAX_LAYER_ID {
        return Err(bad(format!(
            "layer {} is out of range (layer ids must be < {})",
            r.layer,
            crate::experts::MAX_LAYER_ID
        )));
    }
    if r.experts.is_empty() {
        return Err(bad(
            "`experts` is empty: a routed token selects at least one expert".into(),
        ));
    }
    for (what, ids) in [
        ("experts", Some(&r.experts)),
        ("lookahead", r.lookahead.as_ref()),
    ] {
        let Some(ids) = ids else { continue };
        if let Some(e) = ids.iter().find(|&&e| e >= crate::experts::MAX_EXPERT_ID) {
            return Err(bad(format!(
                "`{what}` holds expert {e}, out of range (expert ids must be < {})",
                crate::experts::MAX_EXPERT_ID
            )));
        }
        let mut seen = ids.clone();
        seen.sort_unstable();
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad(format!(
                "`{what}` lists expert {} twice (a router selects distinct experts)",
                w[0]
            )));
        }
    }
    if !r.hits.is_empty() && r.hits.len() != r.experts.len() {
        return Err(bad(format!(
            "{} hit flags for {} experts",
            r.hits.len(),
            r.experts.len()
        )));
    }
    if !r.weights.is_empty() && r.weights.len() != r.experts.len() {
        return Err(bad(format!(
            "{} weights for {} experts",
            r.weights.len(),
            r.experts.len()
        )));
    }
    Ok(())
}

fn missing(path: &Path, name: &str) -> Error {
    Error::format(path, format!("trace has no column `{name}` (required: prompt, step, pos, phase, layer, experts; see the README's trace schema)"))
}

/// One optional list cell per row.
type ListCells<T> = Vec<Option<Vec<T>>>;

fn list_col<T: PolarsNumericType>(
    path: &Path,
    df: &DataFrame,
    name: &str,
    inner: DataType,
    required: bool,
) -> Result<Option<ListCells<T::Native>>> {
    let Ok(c) = df.column(name) else {
        return if required {
            Err(missing(path, name))
        } else {
            Ok(None)
        };
    };
    let c = c
        .cast(&DataType::List(Box::new(inner.clone())))
        .map_err(|e| {
            Error::format(
                path,
                format!("column `{name}` must be a list of {inner}: {e}"),
            )
        })?;
    let ca = c
        .list()
        .map_err(|e| Error::format(path, format!("column `{name}` must be a list: {e}")))?;
    let mut out = Vec::with_capacity(ca.len());
    for s in ca.series_iter() {
        out.push(match s {
            None => None,
            Some(s) => {
                let s = s.unpack::<T>().map_err(|e| perr(path, e))?;
                if s.null_count() > 0 {
                    return Err(Error::format(
                        path,
                        format!("column `{name}` has null list elements"),
                    ));
                }
                Some(s.into_no_null_iter().collect())
            }
        });
    }
    Ok(Some(out))
}

/// Reads a trace file written by the runner or any tool that follows the schema: its cells in
/// order of first appearance, each with its rows in file order.
pub fn read(path: &Path) -> Result<Vec<CellTrace>> {
    let df = read_frame(path)?;
    let n = df.height();
    let prompt = u32_col(path, &df, "prompt")?;
    let step = u32_col(path, &df, "step")?;
    let pos = u32_col(path, &df, "pos")?;
    let layer = u32_col(path, &df, "layer")?;
    let phase_c = df.column("phase").map_err(|_| missing(path, "phase"))?;
    let phase_s = phase_c
        .str()
        .map_err(|e| Error::format(path, format!("column `phase` must be strings: {e}")))?;
    let mut phase = Vec::with_capacity(n);
    for (i, p) in phase_s.iter().enumerate() {
        phase.push(match p {
            Some("prefill") => Phase::Prefill,
            Some("decode") => Phase::Decode,
            other => {
                return Err(Error::format(
                    path,
                    format!("row {i}: phase {other:?} (expected `prefill` or `decode`)"),
                ))
            }
        });
    }
    let experts = id_lists(path, &df, "experts", true)?.expect("required");
    let weights = list_col::<Float32Type>(path, &df, "weights", DataType::Float32, false)?;
    let lookahead = id_lists(path, &df, "lookahead", false)?;
    let hits: Option<Vec<Vec<bool>>> = match df.column("hits") {
        Err(_) => None,
        Ok(c) => {
            let ca = c.list().map_err(|e| {
                Error::format(path, format!("column `hits` must be a list of bool: {e}"))
            })?;
            let mut v = Vec::with_capacity(n);
            for s in ca.series_iter() {
                let s = s.ok_or_else(|| Error::format(path, "column `hits` has nulls"))?;
                let b = s.bool().map_err(|e| {
                    Error::format(path, format!("column `hits` must be a list of bool: {e}"))
                })?;
                v.push(b.iter().map(|x| x.unwrap_or(false)).collect());
            }
            Some(v)
        }
    };
    let load_ns: Option<Vec<u64>> = match df.column("load_ns") {
        Err(_) => None,
        Ok(c) => Some(
            c.cast(&DataType::UInt64)
                .map_err(|e| perr(path, e))?
                .u64()
                .map_err(|e| perr(path, e))?
                .iter()
                .map(|x| x.unwrap_or(0))
                .collect(),
        ),
    };
    let cell: Option<Vec<String>> = match df.column("cell") {
        Err(_) => None,
        Ok(c) => Some(
            c.str()
                .map_err(|e| Error::format(path, format!("column `cell` must be strings: {e}")))?
                .iter()
                .map(|x| x.unwrap_or("").to_string())
                .collect(),
        ),
    };
    let mut cells: Vec<CellTrace> = Vec::new();
    for i in 0..n {
        let ex = experts[i]
            .clone()
            .ok_or_else(|| Error::format(path, format!("row {i}: `experts` is null")))?;
        let row = TraceRow {
            prompt: prompt[i],
            step: step[i],
            pos: pos[i],
            phase: phase[i],
            layer: layer[i],
            weights: weights
                .as_ref()
                .and_then(|w| w[i].clone())
                .unwrap_or_default(),
            lookahead: lookahead.as_ref().and_then(|l| l[i].clone()),
            hits: hits.as_ref().map_or_else(Vec::new, |h| h[i].clone()),
            load_ns: load_ns.as_ref().map_or(0, |l| l[i]),
            experts: ex,
        };
        check_row(path, i, &row)?;
        let name = cell.as_ref().map_or("", |c| c[i].as_str());
        match cells.iter_mut().find(|c| c.cell == name) {
            Some(c) => c.rows.push(row),
            None => cells.push(CellTrace {
                cell: name.to_string(),
                rows: vec![row],
            }),
        }
    }
    Ok(cells)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(i: u32) -> TraceRow {
        TraceRow {
            prompt: i / 4,
            step: i % 3,
            pos: i,
            phase: if i.is_multiple_of(3) {
                Phase::Prefill
            } else {
                Phase::Decode
            },
            layer: 1 + i % 2,
            experts: vec![i % 8, (i + 3) % 8],
            weights: vec![0.75, 0.25],
            lookahead: (i % 2 == 1).then(|| vec![1, 2]),
            hits: vec![i.is_multiple_of(2), false],
            load_ns: 1000 + i as u64,
        }
    }

    fn cells(n: u32) -> Vec<CellTrace> {
        vec![
            CellTrace {
                cell: "c0".into(),
                rows: (0..n).map(row).collect(),
            },
            CellTrace {
                cell: "c1".into(),
                rows: (n..2 * n).map(row).collect(),
            },
        ]
    }

    #[test]
    fn round_trip() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.parquet");
        write(&p, &cells(5)).unwrap();
        assert_eq!(read(&p).unwrap(), cells(5));
    }

    #[test]
    fn corrupt_and_incomplete_traces_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.parquet");
        std::fs::write(&p, b"PAR1 not really").unwrap();
        assert!(read(&p).unwrap_err().to_string().contains("t.parquet"));
        let mut df = to_frame(&cells(2)).unwrap();
        df = df.drop("layer").unwrap();
        write_frame(&p, &mut df).unwrap();
        let err = read(&p).unwrap_err().to_string();
        assert!(err.contains("`layer`"), "{err}");
    }
}
