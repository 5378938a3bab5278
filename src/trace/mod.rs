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

mod block;
pub mod import;
mod writer;

use block::perr;
pub use block::{Columns, Lists, RowBlock, RowRef, TraceFile};
pub use writer::{TraceWriter, ROW_GROUP_ROWS};

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
        hits.append_iter(r.hits.iter().map(|&b| Some(b)));
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
    let tmp = crate::io::temp_file_in(dir)?;
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

/// Reads a trace file written by the runner or any tool that follows the schema: its cells in
/// order of first appearance, each with its rows in file order.
pub fn read(path: &Path) -> Result<Vec<CellTrace>> {
    let file = TraceFile::open(path)?;
    let mut cells: Vec<CellTrace> = Vec::new();
    let columns = Columns {
        lookahead: true,
        weights: true,
        all: true,
    };
    for g in 0..file.groups() {
        let names = file.cells(g)?;
        let (b, _) = file.block(g, None, columns)?;
        for i in 0..b.len() {
            let r = b.row(i);
            let list =
                |l: &Option<Lists<f32>>| l.as_ref().and_then(|l| l.get(i)).map(<[f32]>::to_vec);
            let row = TraceRow {
                prompt: r.prompt,
                step: r.step,
                pos: r.pos,
                phase: r.phase,
                layer: r.layer,
                experts: r.experts.to_vec(),
                weights: list(&b.weights).unwrap_or_default(),
                lookahead: r.lookahead.map(<[u32]>::to_vec),
                hits: b
                    .hits
                    .as_ref()
                    .and_then(|h| h.get(i))
                    .map_or_else(Vec::new, <[bool]>::to_vec),
                load_ns: b.load_ns.as_ref().map_or(0, |l| l[i]),
            };
            let name = names[i].as_str();
            match cells.last_mut().filter(|c| c.cell == name) {
                Some(c) => c.rows.push(row),
                None => match cells.iter_mut().find(|c| c.cell == name) {
                    Some(c) => c.rows.push(row),
                    None => cells.push(CellTrace {
                        cell: name.to_string(),
                        rows: vec![row],
                    }),
                },
            }
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
