//! What a replay needs to know about the future: next-use positions for Bélády's MIN (one
//! backward pass over the trace) and oracle frequency profiles for `static-<N>`.
//!
//! The backward pass visits blocks last to first and rows in reverse, so it never needs more
//! than one block in memory; it numbers demand accesses from the end of the trace (the last
//! access is 0), since the total is known only when it ends. [`Future::resolve`] turns those
//! reverse numbers into forward positions. With `reset_per_prompt`, nothing is carried across a
//! prompt boundary: an expert not demanded again within its prompt has no next use, exactly as
//! when each prompt is replayed on its own.

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

/// Next-use numbers of one block, from the end of the trace (`u64::MAX`: none).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockFuture {
    /// Per demand access of the block (aligned with its `experts` values): the reverse number of
    /// the next demand of the same expert.
    pub demand: Vec<u64>,
    /// Per lookahead entry of the block (aligned with its `lookahead` values): the reverse number
    /// of the first demand of that expert at or after the start of the entry's row, i.e. the
    /// next use of a prefetch made for that row.
    pub prefetch: Vec<u64>,
}

/// The backward pass: feed blocks last to first.
#[derive(Debug, Clone)]
pub struct Backward {
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

    /// Accesses seen so far (after the last block: the trace's total).
    pub fn accesses(&self) -> u64 {
        self.seen
    }

    /// The next-use numbers of `b`, the block before (in trace order) the last one fed.
    pub fn block(&mut self, b: &RowBlock) -> BlockFuture {
        let mut f = BlockFuture {
            demand: vec![u64::MAX; b.accesses()],
            prefetch: vec![u64::MAX; b.lookahead.values.len()],
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
                f.demand[j] = *slot;
                *slot = self.seen;
                self.seen += 1;
            }
            if b.lookahead.valid[i] {
                for j in b.lookahead.offsets[i]..b.lookahead.offsets[i + 1] {
                    f.prefetch[j] = *self.last.get_mut(ExpertKey {
                        layer,
                        expert: b.lookahead.values[j],
                    });
                }
            }
        }
        f
    }
}

/// Turns reverse next-use numbers into forward positions for a trace of `total` accesses.
#[derive(Debug, Clone, Copy)]
pub struct Future {
    /// Demand accesses in the whole trace.
    pub total: u64,
}

impl Future {
    /// The forward position of reverse number `r`.
    #[inline]
    pub fn resolve(&self, r: u64) -> u64 {
        if r == u64::MAX {
            u64::MAX
        } else {
            self.total - 1 - r
        }
    }
}

/// Counts expert uses (the oracle profile `static-<N>` pins from), one profile for the trace or
/// one per prompt.
#[derive(Debug, Clone)]
pub struct ProfileCounter {
    per_prompt: bool,
    counts: HashMap<u32, DenseKeyMap<u64>>,
}

impl ProfileCounter {
    /// A counter; `per_prompt` keeps one profile per prompt.
    pub fn new(per_prompt: bool) -> Self {
        ProfileCounter {
            per_prompt,
            counts: HashMap::new(),
        }
    }

    /// Counts the rows of `b`.
    pub fn add(&mut self, b: &RowBlock) {
        for i in 0..b.len() {
            let p = if self.per_prompt { b.prompt[i] } else { 0 };
            let c = self.counts.entry(p).or_insert_with(|| DenseKeyMap::new(0));
            for &expert in b.row(i).experts {
                *c.get_mut(ExpertKey {
                    layer: b.layer[i],
                    expert,
                }) += 1;
            }
        }
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

/// Where one row group was stored: (offset, block bytes, demand entries, prefetch entries,
/// bytes per next-use entry).
type Spilled = (u64, usize, usize, usize, usize);

/// Decoded row groups with their next-use numbers, in an unnamed temporary file (gone when
/// dropped): the backward pass writes them so that the replay reads them back without
/// decoding the Parquet file a second time.
pub(crate) struct SpillFile {
    file: File,
    pub(crate) bytes: u64,
    /// Per row group, where it was stored.
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

    /// Stores row group `group`'s block and future.
    pub(crate) fn put(&mut self, group: usize, b: &RowBlock, f: &BlockFuture) -> Result<()> {
        let mut buf = b.to_bytes();
        let nb = buf.len();
        // Next uses are stored in 4 bytes where every one of the block's fits (u32::MAX
        // standing for none), else in 8.
        let all = || f.demand.iter().chain(&f.prefetch);
        let width = if all().all(|&v| v < u32::MAX as u64 || v == u64::MAX) {
            4
        } else {
            8
        };
        buf.reserve(width * (f.demand.len() + f.prefetch.len()));
        for &v in all() {
            if width == 4 {
                let v = if v == u64::MAX { u32::MAX } else { v as u32 };
                buf.extend_from_slice(&v.to_le_bytes());
            } else {
                buf.extend_from_slice(&v.to_le_bytes());
            }
        }
        let mut w = &self.file;
        w.write_all(&buf)
            .map_err(|e| Error::io(std::env::temp_dir(), e))?;
        if self.index.len() <= group {
            self.index.resize(group + 1, None);
        }
        self.index[group] = Some((self.bytes, nb, f.demand.len(), f.prefetch.len(), width));
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// Row group `group`'s block and future (`None` if it was not stored).
    pub(crate) fn get(&self, group: usize) -> Result<Option<(RowBlock, BlockFuture)>> {
        let Some(&Some((at, nb, nd, np, width))) = self.index.get(group) else {
            return Ok(None);
        };
        let mut buf = vec![0u8; nb + width * (nd + np)];
        self.file
            .read_exact_at(&mut buf, at)
            .map_err(|e| Error::io(std::env::temp_dir(), e))?;
        let block = RowBlock::from_bytes(&buf[..nb]).ok_or_else(|| {
            Error::format(
                std::env::temp_dir(),
                "the replay's temporary file is corrupt",
            )
        })?;
        let vals: Vec<u64> = buf[nb..]
            .chunks_exact(width)
            .map(|c| match *c {
                [a, b, c, d] => match u32::from_le_bytes([a, b, c, d]) {
                    u32::MAX => u64::MAX,
                    v => v as u64,
                },
                _ => u64::from_le_bytes(c.try_into().expect("8 bytes")),
            })
            .collect();
        Ok(Some((
            block,
            BlockFuture {
                demand: vals[..nd].to_vec(),
                prefetch: vals[nd..].to_vec(),
            },
        )))
    }
}
