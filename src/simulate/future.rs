//! What a replay needs to know about the future: next-use positions for Bélády's MIN (one
//! backward pass over the trace) and oracle frequency profiles for `static-<N>`.
//!
//! The backward pass visits blocks last to first and rows in reverse, so it never needs more
//! than one block in memory. It records each next use as a *distance* (in demand accesses) from
//! the access itself, which needs no knowledge of the trace's total length and is small for the
//! reused experts that matter, so the numbers are kept between passes as variable-length
//! integers (about 1–2 bytes each). With `reset_per_prompt`, nothing is carried across a prompt
//! boundary: an expert not demanded again within its prompt has no next use, exactly as when
//! each prompt is replayed on its own.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};

use crate::experts::policies::FrequencyProfile;
use crate::experts::ExpertKey;
use crate::trace::RowBlock;

/// A value per (layer, expert), stored densely.
#[derive(Debug, Clone)]
pub(crate) struct DenseKeyMap<T: Clone> {
    fill: T,
    pub(crate) layers: Vec<Vec<T>>,
}

impl<T: Clone> DenseKeyMap<T> {
    pub(crate) fn new(fill: T) -> Self {
        DenseKeyMap {
            fill,
            layers: Vec::new(),
        }
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, key: ExpertKey) -> &mut T {
        let (l, e) = (key.layer as usize, key.expert as usize);
        if self.layers.len() <= l {
            self.layers.resize(l + 1, Vec::new());
        }
        let v = &mut self.layers[l];
        if v.len() <= e {
            v.resize(e + 1, self.fill.clone());
        }
        &mut v[e]
    }

    fn reset(&mut self) {
        for l in &mut self.layers {
            l.iter_mut().for_each(|v| *v = self.fill.clone());
        }
    }
}

/// Next uses of one block, as distances (`0`: none).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockFuture {
    /// Per demand access of the block (aligned with its `experts` values): how many demand
    /// accesses later the same expert is demanded next (≥ 1; 0: never).
    pub demand: Vec<u64>,
    /// Per lookahead entry of the block (aligned with its `lookahead` values): 1 + how many
    /// demand accesses after the start of the entry's row that expert is first demanded (0:
    /// never), i.e. the next use of a prefetch made for that row.
    pub prefetch: Vec<u64>,
}

/// The forward position of a demand next use `d` of the access at position `at`.
#[inline]
pub fn demand_at(at: u64, d: u64) -> u64 {
    if d == 0 {
        u64::MAX
    } else {
        at + d
    }
}

/// The forward position of a prefetch next use `d` for a row starting at position `start`.
#[inline]
pub fn prefetch_at(start: u64, d: u64) -> u64 {
    if d == 0 {
        u64::MAX
    } else {
        start + d - 1
    }
}

/// The backward pass: feed blocks last to first.
#[derive(Debug, Clone)]
pub struct Backward {
    /// Per expert: the reverse number (from the end) of its next demand.
    last: DenseKeyMap<u64>,
    seen: u64,
    reset_per_prompt: bool,
    prompt: Option<u32>,
}

impl Backward {
    /// A pass over a trace; `reset_per_prompt` forgets the future at each prompt boundary.
    pub fn new(reset_per_prompt: bool) -> Self {
        Backward {
            last: DenseKeyMap::new(u64::MAX),
            seen: 0,
            reset_per_prompt,
            prompt: None,
        }
    }

    /// The next uses of `b`, the block before (in trace order) the last one fed.
    pub fn block(&mut self, b: &RowBlock) -> BlockFuture {
        let mut f = BlockFuture {
            demand: vec![0; b.accesses()],
            prefetch: vec![0; b.lookahead.values.len()],
        };
        for i in (0..b.len()).rev() {
            let layer = b.layer[i];
            if self.reset_per_prompt && self.prompt != Some(b.prompt[i]) {
                if self.prompt.is_some() {
                    self.last.reset();
                }
                self.prompt = Some(b.prompt[i]);
            }
            for j in (b.experts.offsets[i]..b.experts.offsets[i + 1]).rev() {
                let slot = self.last.get_mut(ExpertKey {
                    layer,
                    expert: b.experts.values[j],
                });
                if *slot != u64::MAX {
                    f.demand[j] = self.seen - *slot;
                }
                *slot = self.seen;
                self.seen += 1;
            }
            if b.lookahead.valid[i] {
                // The row's first access has reverse number `seen - 1`.
                let start = self.seen - 1;
                for j in b.lookahead.offsets[i]..b.lookahead.offsets[i + 1] {
                    let slot = *self.last.get_mut(ExpertKey {
                        layer,
                        expert: b.lookahead.values[j],
                    });
                    if slot != u64::MAX {
                        f.prefetch[j] = start - slot + 1;
                    }
                }
            }
        }
        f
    }
}

/// Counts expert uses (the oracle profile `static-<N>` pins from), one profile for the trace or
/// one per prompt.
#[derive(Debug, Clone)]
pub struct ProfileCounter {
    per_prompt: bool,
    counts: HashMap<u32, DenseKeyMap<u64>>,
    widest: usize,
}

impl ProfileCounter {
    /// A counter; `per_prompt` keeps one profile per prompt.
    pub fn new(per_prompt: bool) -> Self {
        ProfileCounter {
            per_prompt,
            counts: HashMap::new(),
            widest: 0,
        }
    }

    /// Counts the rows of `b`.
    pub fn add(&mut self, b: &RowBlock) {
        for i in 0..b.len() {
            let p = if self.per_prompt { b.prompt[i] } else { 0 };
            let c = self.counts.entry(p).or_insert_with(|| DenseKeyMap::new(0));
            let experts = b.row(i).experts;
            self.widest = self.widest.max(experts.len());
            for &expert in experts {
                *c.get_mut(ExpertKey {
                    layer: b.layer[i],
                    expert,
                }) += 1;
            }
        }
    }

    /// The most experts a counted row selected (the router's top-k).
    pub fn widest_row(&self) -> usize {
        self.widest
    }

    /// The profile of `prompt` (of the whole trace when not per prompt).
    pub fn profile(&self, prompt: u32) -> FrequencyProfile {
        let key = if self.per_prompt { prompt } else { 0 };
        let mut p = FrequencyProfile::new();
        if let Some(c) = self.counts.get(&key) {
            for (layer, c) in c.layers.iter().enumerate() {
                if !c.is_empty() {
                    p.set_layer(layer as u32, c.clone());
                }
            }
        }
        p
    }
}

/// Appends `v` as a LEB128 variable-length integer.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads `n` LEB128 integers from `b`; `None` if `b` ends early.
fn get_varints(b: &[u8], n: usize, out: &mut Vec<u64>) -> Option<usize> {
    let mut at = 0;
    for _ in 0..n {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let x = *b.get(at)?;
            at += 1;
            v |= ((x & 0x7f) as u64) << shift;
            if x & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        out.push(v);
    }
    Some(at)
}

/// Where one row group's next uses were stored: (offset, bytes, demand entries, prefetch
/// entries).
type Spilled = (u64, usize, usize, usize);

/// The next uses of every row group, in an unnamed temporary file (gone when dropped), as
/// variable-length distances: written by the backward pass, read by the replay.
pub(crate) struct SpillFile {
    file: File,
    pub(crate) bytes: u64,
    index: Vec<Option<Spilled>>,
}

impl SpillFile {
    pub(crate) fn new() -> Result<Self> {
        let file = tempfile::tempfile().map_err(|e| Error::io(std::env::temp_dir(), e))?;
        Ok(SpillFile {
            file,
            bytes: 0,
            index: Vec::new(),
        })
    }

    /// Stores row group `group`'s next uses.
    pub(crate) fn put(&mut self, group: usize, f: &BlockFuture) -> Result<()> {
        let mut buf = Vec::with_capacity(2 * (f.demand.len() + f.prefetch.len()));
        for &v in f.demand.iter().chain(&f.prefetch) {
            put_varint(&mut buf, v);
        }
        let mut w = &self.file;
        w.write_all(&buf)
            .map_err(|e| Error::io(std::env::temp_dir(), e))?;
        if self.index.len() <= group {
            self.index.resize(group + 1, None);
        }
        self.index[group] = Some((self.bytes, buf.len(), f.demand.len(), f.prefetch.len()));
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// Row group `group`'s next uses (empty if none were stored).
    pub(crate) fn get(&self, group: usize) -> Result<BlockFuture> {
        let Some(&Some((at, nb, nd, np))) = self.index.get(group) else {
            return Ok(BlockFuture::default());
        };
        let mut buf = vec![0u8; nb];
        self.file
            .read_exact_at(&mut buf, at)
            .map_err(|e| Error::io(std::env::temp_dir(), e))?;
        let corrupt = || {
            Error::format(
                std::env::temp_dir(),
                "the replay's temporary file is corrupt",
            )
        };
        let mut demand = Vec::with_capacity(nd);
        let used = get_varints(&buf, nd, &mut demand).ok_or_else(corrupt)?;
        let mut prefetch = Vec::with_capacity(np);
        get_varints(&buf[used..], np, &mut prefetch).ok_or_else(corrupt)?;
        Ok(BlockFuture { demand, prefetch })
    }
}
