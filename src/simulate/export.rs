//! A trace as another simulator's input: libCacheSim's `oracleGeneral` binary, so the same
//! accesses can be replayed by libCacheSim's own C simulator and compared with ours.

use std::io::{BufWriter, Write};
use std::path::Path;

use super::future::{demand_at, Backward, SpillFile};
use crate::error::{Error, Result};
use crate::trace::{Columns, TraceFile};

/// Writes the demand accesses of one cell of `trace` (the first when `cell` is `None`) as
/// libCacheSim `oracleGeneral` records: `u32` time (the access index, wrapping), `u64` object id
/// `layer·2^20 + expert`, `u32` size 1, `i64` index of the next access of the same object or -1.
/// Streams the file twice (backward for next accesses, kept as distances in a temporary file, then forward); the output appears only
/// when complete. Returns the number of records.
pub fn libcachesim(trace: &Path, cell: Option<&str>, out: &Path) -> Result<u64> {
    let file = TraceFile::open(trace)?;
    let cell = match (cell, file.has("cell")) {
        (Some(c), true) => Some(c.to_string()),
        (Some(c), false) => {
            return Err(Error::Input(format!(
                "{}: no cell `{c}` in the trace (it has no `cell` column)",
                trace.display()
            )))
        }
        (None, true) => (0..file.groups()).find_map(|g| file.cells(g).ok()?.into_iter().next()),
        (None, false) => None,
    };
    let columns = Columns::default();
    let mut back = Backward::new(false);
    let mut store = SpillFile::new()?;
    for g in (0..file.groups()).rev() {
        let (b, _) = file.block(g, cell.as_deref(), columns)?;
        store.put(g, &back.block(&b))?;
    }
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = crate::io::temp_file_in(dir)?;
    let mut w = BufWriter::with_capacity(1 << 20, tmp.reopen().map_err(|e| Error::io(out, e))?);
    let mut t: u64 = 0;
    for g in 0..file.groups() {
        let (b, _) = file.block(g, cell.as_deref(), columns)?;
        let f = store.get(g)?;
        for i in 0..b.len() {
            let layer = b.layer[i] as u64;
            for j in b.experts.offsets[i]..b.experts.offsets[i + 1] {
                let id = (layer << 20) | b.experts.values[j] as u64;
                let next = match demand_at(t, f.demand[j]) {
                    u64::MAX => -1i64,
                    n => n as i64,
                };
                let mut rec = [0u8; 24];
                rec[..4].copy_from_slice(&(t as u32).to_le_bytes());
                rec[4..12].copy_from_slice(&id.to_le_bytes());
                rec[12..16].copy_from_slice(&1u32.to_le_bytes());
                rec[16..].copy_from_slice(&next.to_le_bytes());
                w.write_all(&rec).map_err(|e| Error::io(out, e))?;
                t += 1;
            }
        }
    }
    w.flush().map_err(|e| Error::io(out, e))?;
    drop(w);
    tmp.persist(out).map_err(|e| Error::io(out, e.error))?;
    Ok(t)
}
