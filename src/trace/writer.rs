//! A trace file written row group by row group, for traces too long to hold in memory
//! (synthetic traces at serving scale, imported traces), with provenance in the Parquet
//! key-value metadata. The file appears at its path only when [`TraceWriter::finish`] succeeds.

use std::path::{Path, PathBuf};

use polars::prelude::*;

use super::{perr, to_frame, CellTrace, TraceRow};
use crate::error::{Error, Result};

/// Rows per Parquet row group (the unit a streaming replay decodes at once).
pub const ROW_GROUP_ROWS: usize = 1 << 18;

/// Writes trace rows to a Parquet file in row groups of [`ROW_GROUP_ROWS`].
pub struct TraceWriter {
    path: PathBuf,
    tmp: tempfile::NamedTempFile,
    writer: Option<BatchedWriter<std::fs::File>>,
    metadata: Vec<(String, String)>,
    cell: String,
    rows: Vec<TraceRow>,
    written: u64,
    group_rows: usize,
}

impl TraceWriter {
    /// A writer for `path` (created next to it under a temporary name); `metadata` is stored as
    /// Parquet key-value metadata; rows are written under cell name `cell`.
    pub fn create(path: &Path, cell: &str, metadata: Vec<(String, String)>) -> Result<Self> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = crate::io::temp_file_in(dir)?;
        Ok(TraceWriter {
            path: path.to_path_buf(),
            tmp,
            writer: None,
            metadata,
            cell: cell.to_string(),
            rows: Vec::new(),
            written: 0,
            group_rows: ROW_GROUP_ROWS,
        })
    }

    /// Rows per row group (default [`ROW_GROUP_ROWS`]; small groups exercise block boundaries
    /// in tests).
    pub fn with_row_group_rows(mut self, rows: usize) -> Self {
        self.group_rows = rows.max(1);
        self
    }

    /// Appends a row.
    pub fn push(&mut self, row: TraceRow) -> Result<()> {
        self.rows.push(row);
        if self.rows.len() >= self.group_rows {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let cells = [CellTrace {
            cell: std::mem::take(&mut self.cell),
            rows: std::mem::take(&mut self.rows),
        }];
        let df = to_frame(&cells)?;
        let [CellTrace { cell, .. }] = cells;
        self.cell = cell;
        if self.writer.is_none() {
            let f = self.tmp.reopen().map_err(|e| Error::io(&self.path, e))?;
            let kv = KeyValueMetadata::from_static(self.metadata.clone());
            let w = ParquetWriter::new(f)
                .with_key_value_metadata(Some(kv))
                .batched(df.schema())
                .map_err(|e| perr(&self.path, e))?;
            self.writer = Some(w);
        }
        let w = self.writer.as_mut().expect("set above");
        w.write_batch(&df).map_err(|e| perr(&self.path, e))?;
        self.written += df.height() as u64;
        Ok(())
    }

    /// Writes what is buffered, closes the file and moves it to its path. A writer dropped
    /// without `finish` leaves nothing behind.
    pub fn finish(mut self) -> Result<u64> {
        if self.written == 0 && self.rows.is_empty() {
            return Err(Error::Input(format!(
                "{}: no rows to write",
                self.path.display()
            )));
        }
        self.flush()?;
        if let Some(w) = self.writer.take() {
            w.finish().map_err(|e| perr(&self.path, e))?;
        }
        let path = self.path.clone();
        self.tmp
            .persist(&path)
            .map_err(|e| Error::io(&path, e.error))?;
        Ok(self.written)
    }
}
