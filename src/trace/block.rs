//! Trace rows in columns, and a trace file read one Parquet row group at a time.
//!
//! A [`RowBlock`] holds consecutive rows of one cell as flat columns (list columns as offsets
//! plus values), so decoding a row group costs a few copies of contiguous arrays rather than
//! one allocation per row. [`TraceFile`] opens a trace once (schema, row groups) and decodes any
//! row group on demand, forward or backward, so a replay's memory is one or two row groups
//! whatever the trace's length.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use polars::prelude::*;

use crate::error::{Error, Result};
use crate::experts::{Phase, MAX_EXPERT_ID, MAX_LAYER_ID};

/// One row of a [`RowBlock`], borrowed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowRef<'a> {
    /// Prompt index within the run.
    pub prompt: u32,
    /// Forward call within the prompt.
    pub step: u32,
    /// Absolute token position.
    pub pos: u32,
    /// Prefill or decode.
    pub phase: Phase,
    /// Decoder layer.
    pub layer: u32,
    /// Selected experts, in router order.
    pub experts: &'a [u32],
    /// The router lookahead's prediction for this row, if any.
    pub lookahead: Option<&'a [u32]>,
    /// The router's weights of `experts` (empty when not recorded or not read).
    pub weights: &'a [f32],
}

/// Lists of one column: row `i` is `values[offsets[i]..offsets[i + 1]]`, null where `!valid[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Lists<T> {
    /// `rows + 1` offsets into `values`.
    pub offsets: Vec<usize>,
    /// All rows' values, concatenated.
    pub values: Vec<T>,
    /// Per row: false where the list is null.
    pub valid: Vec<bool>,
}

impl<T: Copy> Lists<T> {
    fn new() -> Self {
        Lists {
            offsets: vec![0],
            values: Vec::new(),
            valid: Vec::new(),
        }
    }

    /// Row `i`'s list (`None` where null).
    pub fn get(&self, i: usize) -> Option<&[T]> {
        self.valid[i].then(|| &self.values[self.offsets[i]..self.offsets[i + 1]])
    }

    fn push(&mut self, v: Option<&[T]>) {
        if let Some(v) = v {
            self.values.extend_from_slice(v);
        }
        self.offsets.push(self.values.len());
        self.valid.push(v.is_some());
    }

    fn len(&self) -> usize {
        self.valid.len()
    }
}

/// Consecutive trace rows of one cell, in columns.
#[derive(Debug, Clone, PartialEq)]
pub struct RowBlock {
    /// Row number in the file (or in the row slice) of each row, for error messages.
    pub row_index: Vec<usize>,
    /// `prompt` column.
    pub prompt: Vec<u32>,
    /// `step` column.
    pub step: Vec<u32>,
    /// `pos` column.
    pub pos: Vec<u32>,
    /// `phase` column.
    pub phase: Vec<Phase>,
    /// `layer` column.
    pub layer: Vec<u32>,
    /// `experts` column.
    pub experts: Lists<u32>,
    /// `lookahead` column (all null when the file has none or it was not read).
    pub lookahead: Lists<u32>,
    /// `weights` column, when read.
    pub weights: Option<Lists<f32>>,
    /// `hits` column, when read.
    pub hits: Option<Lists<bool>>,
    /// `load_ns` column, when read.
    pub load_ns: Option<Vec<u64>>,
}

impl Default for RowBlock {
    fn default() -> Self {
        RowBlock {
            row_index: Vec::new(),
            prompt: Vec::new(),
            step: Vec::new(),
            pos: Vec::new(),
            phase: Vec::new(),
            layer: Vec::new(),
            experts: Lists::new(),
            lookahead: Lists::new(),
            weights: None,
            hits: None,
            load_ns: None,
        }
    }
}

impl RowBlock {
    /// Rows held.
    pub fn len(&self) -> usize {
        self.layer.len()
    }

    /// True when no rows are held.
    pub fn is_empty(&self) -> bool {
        self.layer.is_empty()
    }

    /// Demand accesses (selected experts) of all rows.
    pub fn accesses(&self) -> usize {
        self.experts.values.len()
    }

    /// Row `i`.
    #[inline]
    pub fn row(&self, i: usize) -> RowRef<'_> {
        RowRef {
            prompt: self.prompt[i],
            step: self.step[i],
            pos: self.pos[i],
            phase: self.phase[i],
            layer: self.layer[i],
            experts: &self.experts.values[self.experts.offsets[i]..self.experts.offsets[i + 1]],
            lookahead: self.lookahead.get(i),
            weights: self
                .weights
                .as_ref()
                .and_then(|w| w.get(i))
                .unwrap_or_default(),
        }
    }

    /// Appends a row (its number `index` names it in errors).
    pub fn push(&mut self, index: usize, r: RowRef<'_>) {
        self.row_index.push(index);
        self.prompt.push(r.prompt);
        self.step.push(r.step);
        self.pos.push(r.pos);
        self.phase.push(r.phase);
        self.layer.push(r.layer);
        self.experts.push(Some(r.experts));
        self.lookahead.push(r.lookahead);
        if let Some(w) = self.weights.as_mut() {
            w.push(Some(r.weights));
        }
    }

    /// The routing columns and weights of `rows` (hits and load times are not kept).
    pub fn from_rows(rows: &[super::TraceRow]) -> Self {
        let mut b = RowBlock {
            weights: Some(Lists::new()),
            ..RowBlock::default()
        };
        for (i, r) in rows.iter().enumerate() {
            b.push(
                i,
                RowRef {
                    prompt: r.prompt,
                    step: r.step,
                    pos: r.pos,
                    phase: r.phase,
                    layer: r.layer,
                    experts: &r.experts,
                    lookahead: r.lookahead.as_deref(),
                    weights: &r.weights,
                },
            );
        }
        b
    }
}

pub(crate) fn perr(path: &Path, e: PolarsError) -> Error {
    Error::format(path, format!("parquet: {e}"))
}

pub(crate) fn missing(path: &Path, name: &str) -> Error {
    Error::format(path, format!("trace has no column `{name}` (required: prompt, step, pos, phase, layer, experts; see the README's trace schema)"))
}

/// Runs a Parquet decode, turning a decoder panic on a corrupt file into an error naming it.
fn guarded<T>(path: &Path, f: impl FnOnce() -> PolarsResult<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| perr(path, e)),
        Err(_) => Err(Error::format(
            path,
            "corrupt Parquet file (the decoder failed on its contents)",
        )),
    }
}

fn to_u32(path: &Path, name: &str, row: usize, v: i64) -> Result<u32> {
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

/// Integer values as u32, each checked; `row_of(i)` names value `i`'s row in errors.
fn u32_values(
    path: &Path,
    name: &str,
    s: &Series,
    row_of: impl Fn(usize) -> usize,
) -> Result<Vec<u32>> {
    let dt = s.dtype();
    if !dt.is_integer() {
        return Err(Error::format(
            path,
            format!("column `{name}` must hold integers, not {dt}"),
        ));
    }
    let null = |i: usize| {
        let what = if name == "experts" || name == "lookahead" {
            "has a null element"
        } else {
            "is null"
        };
        Error::format(path, format!("row {}: `{name}` {what}", row_of(i)))
    };
    if matches!(dt, DataType::UInt8 | DataType::UInt16 | DataType::UInt32) {
        let c = s.cast(&DataType::UInt32).map_err(|e| perr(path, e))?;
        let ca = c.u32().map_err(|e| perr(path, e))?;
        if let Ok(v) = ca.cont_slice() {
            return Ok(v.to_vec());
        }
        return ca
            .iter()
            .enumerate()
            .map(|(i, v)| v.ok_or_else(|| null(i)))
            .collect();
    }
    if *dt == DataType::UInt64 {
        let ca = s.u64().map_err(|e| perr(path, e))?;
        return ca
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let v = v.ok_or_else(|| null(i))?;
                u32::try_from(v).map_err(|_| {
                    Error::format(
                        path,
                        format!("row {}: `{name}` = {v} does not fit in 32 bits", row_of(i)),
                    )
                })
            })
            .collect();
    }
    let c = s.cast(&DataType::Int64).map_err(|e| perr(path, e))?;
    let ca = c.i64().map_err(|e| perr(path, e))?;
    ca.iter()
        .enumerate()
        .map(|(i, v)| to_u32(path, name, row_of(i), v.ok_or_else(|| null(i))?))
        .collect()
}

/// A non-negative integer column that fits u32.
fn u32_col(path: &Path, df: &DataFrame, name: &str, rows: &[usize]) -> Result<Vec<u32>> {
    let c = df.column(name).map_err(|_| missing(path, name))?;
    u32_values(path, name, c.as_materialized_series(), |i| rows[i])
}

/// A list column's offsets, values (as a series) and validity.
fn list_parts(path: &Path, c: &Column, what: &str) -> Result<(Vec<usize>, Series, Vec<bool>)> {
    let name = c.name().to_string();
    let ca = c.list().map_err(|_| {
        Error::format(
            path,
            format!(
                "column `{name}` must be a list of {what}, not {}",
                c.dtype()
            ),
        )
    })?;
    let ca = ca.rechunk();
    let valid: Vec<bool> = ca.is_not_null().iter().map(|v| v == Some(true)).collect();
    let inner = ca.get_inner();
    let mut offsets: Vec<usize> = match ca.downcast_iter().next() {
        Some(arr) => arr
            .offsets()
            .as_slice()
            .iter()
            .map(|&o| o as usize)
            .collect(),
        None => vec![0],
    };
    // A sliced list array's offsets need not start at 0: rebase them onto its own values.
    let (base, end) = (offsets[0], offsets[offsets.len() - 1]);
    let inner = if base != 0 || end != inner.len() {
        offsets.iter_mut().for_each(|o| *o -= base);
        inner.slice(base as i64, end - base)
    } else {
        inner
    };
    Ok((offsets, inner, valid))
}

/// A column of id lists (`list<int>` of any width), checked as ids.
fn id_lists(path: &Path, df: &DataFrame, name: &str, rows: &[usize]) -> Result<Option<Lists<u32>>> {
    let Ok(c) = df.column(name) else {
        return Ok(None);
    };
    let (offsets, inner, valid) = list_parts(path, c, "integers (expert ids)")?;
    let row_of = |i: usize| rows[offsets.partition_point(|&o| o <= i).saturating_sub(1)];
    if !inner.dtype().is_integer() {
        return Err(Error::format(
            path,
            format!(
                "column `{name}` must be a list of integers (expert ids), not {}",
                c.dtype()
            ),
        ));
    }
    let values = u32_values(path, name, &inner, row_of)?;
    Ok(Some(Lists {
        offsets,
        values,
        valid,
    }))
}

fn f32_lists(path: &Path, df: &DataFrame, name: &str) -> Result<Option<Lists<f32>>> {
    let Ok(c) = df.column(name) else {
        return Ok(None);
    };
    let (offsets, inner, valid) = list_parts(path, c, "f32")?;
    let f = inner
        .cast(&DataType::Float32)
        .map_err(|e| Error::format(path, format!("column `{name}` must be a list of f32: {e}")))?;
    let ca = f.f32().map_err(|e| perr(path, e))?;
    if ca.null_count() > 0 {
        return Err(Error::format(
            path,
            format!("column `{name}` has null list elements"),
        ));
    }
    Ok(Some(Lists {
        offsets,
        values: ca.into_no_null_iter().collect(),
        valid,
    }))
}

fn bool_lists(path: &Path, df: &DataFrame, name: &str) -> Result<Option<Lists<bool>>> {
    let Ok(c) = df.column(name) else {
        return Ok(None);
    };
    let (offsets, inner, valid) = list_parts(path, c, "bool")?;
    if valid.iter().any(|v| !v) {
        return Err(Error::format(path, format!("column `{name}` has nulls")));
    }
    let b = inner
        .bool()
        .map_err(|e| Error::format(path, format!("column `{name}` must be a list of bool: {e}")))?;
    Ok(Some(Lists {
        offsets,
        values: b.iter().map(|x| x.unwrap_or(false)).collect(),
        valid,
    }))
}

/// Checks one row: layer and ids in range, a non-empty expert list without repeats.
pub(crate) fn check_row(
    path: &Path,
    i: usize,
    r: &RowRef<'_>,
    weights: Option<usize>,
    hits: Option<usize>,
) -> Result<()> {
    let bad = |m: String| {
        Error::format(
            path,
            format!(
                "row {i} (prompt {}, pos {}, layer {}): {m}",
                r.prompt, r.pos, r.layer
            ),
        )
    };
    if r.layer >= MAX_LAYER_ID {
        return Err(bad(format!(
            "layer {} is out of range (layer ids must be < {MAX_LAYER_ID})",
            r.layer
        )));
    }
    if r.experts.is_empty() {
        return Err(bad(
            "`experts` is empty: a routed token selects at least one expert".into(),
        ));
    }
    for (what, ids) in [("experts", Some(r.experts)), ("lookahead", r.lookahead)] {
        let Some(ids) = ids else { continue };
        for (j, &e) in ids.iter().enumerate() {
            if e >= MAX_EXPERT_ID {
                return Err(bad(format!(
                    "`{what}` holds expert {e}, out of range (expert ids must be < {MAX_EXPERT_ID})"
                )));
            }
            if ids[..j].contains(&e) {
                return Err(bad(format!(
                    "`{what}` lists expert {e} twice (a router selects distinct experts)"
                )));
            }
        }
    }
    let n = r.experts.len();
    if let Some(h) = hits.filter(|&h| h != 0 && h != n) {
        return Err(bad(format!("{h} hit flags for {n} experts")));
    }
    if let Some(w) = weights.filter(|&w| w != 0 && w != n) {
        return Err(bad(format!("{w} weights for {n} experts")));
    }
    Ok(())
}

/// A read-only map of `f` (the file at `path`).
fn map_file(path: &Path, f: &File) -> Result<memmap2::Mmap> {
    // SAFETY: a read-only map of a file this process does not write; a file truncated by
    // another process while mapped is the user's error, as with any reader (the decoder's
    // panics are caught by `guarded`).
    unsafe { memmap2::Mmap::map(f) }.map_err(|e| Error::io(path, e))
}

/// What to decode from a trace file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Columns {
    /// Decode `lookahead` (prefetching policies).
    pub lookahead: bool,
    /// Decode `weights` (weight-aware policies).
    pub weights: bool,
    /// Decode `weights`, `hits` and `load_ns` too (a full read).
    pub all: bool,
}

/// A trace Parquet file opened for reading by row groups.
pub struct TraceFile {
    path: PathBuf,
    metadata: polars::io::parquet::metadata::FileMetadataRef,
    /// (first row, rows) of each row group.
    groups: Vec<(usize, usize)>,
    names: Vec<String>,
}

impl TraceFile {
    /// Opens `path`: reads its footer and checks the required columns.
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 12 {
            return Err(Error::format(
                path,
                format!("{len} bytes: too short for a Parquet file"),
            ));
        }
        let map = map_file(path, &f)?;
        let mut reader = ParquetReader::new(std::io::Cursor::new(&map[..]));
        let (metadata, schema) = guarded(path, || {
            let md = reader.get_metadata()?.clone();
            let schema = reader.schema()?;
            Ok((md, schema))
        })?;
        let names: Vec<String> = schema.iter_names().map(|n| n.to_string()).collect();
        for req in ["prompt", "step", "pos", "phase", "layer", "experts"] {
            if !names.iter().any(|n| n == req) {
                return Err(missing(path, req));
            }
        }
        let mut groups = Vec::with_capacity(metadata.row_groups.len());
        let mut start = 0;
        for rg in &metadata.row_groups {
            groups.push((start, rg.num_rows()));
            start += rg.num_rows();
        }
        drop(reader);
        Ok(TraceFile {
            path: path.to_path_buf(),
            metadata,
            groups,
            names,
        })
    }

    /// Row groups.
    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// Rows in the file.
    pub fn rows(&self) -> usize {
        self.groups.iter().map(|g| g.1).sum()
    }

    /// The file's key-value metadata (provenance of imported traces), in file order.
    pub fn key_values(&self) -> Vec<(String, String)> {
        self.metadata
            .key_value_metadata
            .iter()
            .flatten()
            .map(|kv| (kv.key.clone(), kv.value.clone().unwrap_or_default()))
            .collect()
    }

    /// True if the file has column `name`.
    pub fn has(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    fn frame(&self, group: usize, columns: &[&str]) -> Result<DataFrame> {
        let (start, len) = self.groups[group];
        let cols: Vec<String> = columns
            .iter()
            .filter(|c| self.has(c))
            .map(|c| c.to_string())
            .collect();
        let md = Arc::clone(&self.metadata);
        // A map of our own for this one read, unmapped when it returns: the process's resident
        // set then holds one row group's pages per decoding thread, never the whole file.
        let f = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let map = map_file(&self.path, &f)?;
        guarded(&self.path, move || {
            let mut r = ParquetReader::new(std::io::Cursor::new(&map[..]));
            r.set_metadata(md);
            r.with_columns(Some(cols))
                .with_slice(Some((start, len)))
                // Row-group strategy: it skips the row groups outside the slice; the column
                // strategies walk (and page in) every row group before it.
                .read_parallel(ParallelStrategy::RowGroups)
                .finish()
        })
    }

    /// The `cell` column of row group `group` (empty names when the file has none).
    pub fn cells(&self, group: usize) -> Result<Vec<String>> {
        let len = self.groups[group].1;
        if !self.has("cell") {
            return Ok(vec![String::new(); len]);
        }
        let df = self.frame(group, &["cell"])?;
        let c = df.column("cell").map_err(|e| perr(&self.path, e))?;
        Ok(c.str()
            .map_err(|e| Error::format(&self.path, format!("column `cell` must be strings: {e}")))?
            .iter()
            .map(|x| x.unwrap_or("").to_string())
            .collect())
    }

    /// The layers (as a set: `seen[layer]`) and cell names of row group `group`, reading only
    /// those two columns: a cheap first look at a trace. Rows of other cells than `cell` (when
    /// given) are not counted; every cell name met is returned in order of appearance.
    pub fn scan(
        &self,
        group: usize,
        cell: Option<&str>,
        seen: &mut Vec<bool>,
    ) -> Result<Vec<String>> {
        let path = &self.path;
        let df = self.frame(group, &["layer", "cell"])?;
        let first = self.groups[group].0;
        let rows: Vec<usize> = (first..first + df.height()).collect();
        let layer = u32_col(path, &df, "layer", &rows)?;
        let names = match df.column("cell") {
            Err(_) => None,
            Ok(c) => Some(
                c.str()
                    .map_err(|e| {
                        Error::format(path, format!("column `cell` must be strings: {e}"))
                    })?
                    .clone(),
            ),
        };
        let mut cells: Vec<String> = Vec::new();
        for (i, &l) in layer.iter().enumerate() {
            let name = names.as_ref().map_or("", |n| n.get(i).unwrap_or(""));
            if cells.last().is_none_or(|c| c != name) && !cells.iter().any(|c| c == name) {
                cells.push(name.to_string());
            }
            if cell.is_some_and(|c| c != name) {
                continue;
            }
            if l >= MAX_LAYER_ID {
                return Err(Error::format(
                    path,
                    format!(
                        "row {}: layer {l} is out of range (layer ids must be < {MAX_LAYER_ID})",
                        rows[i]
                    ),
                ));
            }
            if seen.len() <= l as usize {
                seen.resize(l as usize + 1, false);
            }
            seen[l as usize] = true;
        }
        Ok(cells)
    }

    /// Decodes row group `group`, keeping the rows whose cell is `cell` (every row when `None`),
    /// each row checked. Also returns the other cell names met in the group.
    pub fn block(
        &self,
        group: usize,
        cell: Option<&str>,
        columns: Columns,
    ) -> Result<(RowBlock, Vec<String>)> {
        let path = &self.path;
        let mut names = vec!["prompt", "step", "pos", "phase", "layer", "experts"];
        if columns.lookahead || columns.all {
            names.push("lookahead");
        }
        if columns.all {
            names.extend(["weights", "hits", "load_ns"]);
        } else if columns.weights {
            names.push("weights");
        }
        if cell.is_some() {
            names.push("cell");
        }
        let mut df = self.frame(group, &names)?;
        let first = self.groups[group].0;
        let mut rows: Vec<usize> = (first..first + df.height()).collect();
        let mut others = Vec::new();
        if let (Some(name), Ok(c)) = (cell, df.column("cell")) {
            let s = c
                .str()
                .map_err(|e| Error::format(path, format!("column `cell` must be strings: {e}")))?;
            let keep: Vec<bool> = s.iter().map(|x| x.unwrap_or("") == name).collect();
            for x in s.iter() {
                let x = x.unwrap_or("");
                if x != name && !others.iter().any(|o: &String| o == x) {
                    others.push(x.to_string());
                }
            }
            if keep.iter().any(|k| !k) {
                let mask = BooleanChunked::from_slice("keep".into(), &keep);
                df = df.filter(&mask).map_err(|e| perr(path, e))?;
                rows = rows
                    .into_iter()
                    .zip(&keep)
                    .filter(|(_, &k)| k)
                    .map(|(r, _)| r)
                    .collect();
            }
        }
        let n = df.height();
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
                        format!(
                            "row {}: phase {other:?} (expected `prefill` or `decode`)",
                            rows[i]
                        ),
                    ))
                }
            });
        }
        let experts =
            id_lists(path, &df, "experts", &rows)?.ok_or_else(|| missing(path, "experts"))?;
        if let Some(i) = experts.valid.iter().position(|v| !v) {
            return Err(Error::format(
                path,
                format!("row {}: `experts` is null", rows[i]),
            ));
        }
        let lookahead = match id_lists(path, &df, "lookahead", &rows)? {
            Some(l) => l,
            None => {
                let mut l = Lists::new();
                for _ in 0..n {
                    l.push(None);
                }
                l
            }
        };
        let (weights, hits, load_ns) = if columns.all {
            let load_ns = match df.column("load_ns") {
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
            (
                f32_lists(path, &df, "weights")?,
                bool_lists(path, &df, "hits")?,
                load_ns,
            )
        } else if columns.weights {
            (f32_lists(path, &df, "weights")?, None, None)
        } else {
            (None, None, None)
        };
        let block = RowBlock {
            prompt: u32_col(path, &df, "prompt", &rows)?,
            step: u32_col(path, &df, "step", &rows)?,
            pos: u32_col(path, &df, "pos", &rows)?,
            layer: u32_col(path, &df, "layer", &rows)?,
            row_index: rows,
            phase,
            experts,
            lookahead,
            weights,
            hits,
            load_ns,
        };
        debug_assert_eq!(block.experts.len(), n);
        let width = |l: &Option<Lists<_>>, i: usize| {
            l.as_ref()
                .map(|l: &Lists<_>| l.offsets[i + 1] - l.offsets[i])
        };
        for i in 0..n {
            check_row(
                path,
                block.row_index[i],
                &block.row(i),
                width(&block.weights, i),
                block.hits.as_ref().map(|h| h.offsets[i + 1] - h.offsets[i]),
            )?;
        }
        Ok((block, others))
    }
}
