//! Safetensors shards with every header claim checked against the file: offsets inside the file,
//! byte length equal to `dtype × shape`, and every key of the index present in the shard it names.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, Result};

use super::storage::{
    self, open_direct, read_direct, DeviceModel, Emulator, EmulatorStats, IoMode,
};
use serde::Serialize;

/// Element types the engine reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// Packed quantized words (MLX).
    U32,
    /// Any other type (kept so that unused tensors of other types do not fail the load).
    Other(safetensors::Dtype),
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> Option<usize> {
        match self {
            DType::F32 | DType::U32 => Some(4),
            DType::F16 | DType::BF16 => Some(2),
            DType::Other(_) => None,
        }
    }
}

/// Where one tensor's bytes are.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Index of the shard in [`Checkpoint::shard_path`].
    pub shard: usize,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the shard file.
    pub offset: u64,
    /// Byte length of the data.
    pub len: u64,
}

impl TensorEntry {
    /// Where its bytes are.
    pub fn range(&self) -> ByteRange {
        ByteRange {
            shard: self.shard,
            offset: self.offset,
            len: self.len,
        }
    }
}

/// A byte range in one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// Shard index.
    pub shard: usize,
    /// Absolute offset in the shard file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A tensor's bytes in a shard's memory map: read in place, never copied.
#[derive(Clone)]
pub struct MappedBytes {
    map: Arc<Mmap>,
    start: usize,
    len: usize,
}

impl std::fmt::Debug for MappedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedBytes({}..+{})", self.start, self.len)
    }
}

impl MappedBytes {
    /// The bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }

    /// Drops these pages from this process's memory (`madvise(DONTNEED)`; the next read faults
    /// them back in from the page cache or the file).
    pub fn release(&self) {
        release_range(&self.map, self.start, self.len);
    }
}

/// `madvise(DONTNEED)` over the whole pages covering `start..start + len` of a read-only map.
fn release_range(map: &Mmap, start: usize, len: usize) {
    const PAGE: usize = 4096;
    let lo = start / PAGE * PAGE;
    let hi = (start + len).div_ceil(PAGE) * PAGE;
    let hi = hi.min(map.len());
    if hi > lo {
        // SAFETY: the map is a read-only private file mapping: dropping its pages discards no
        // data; a later read faults the same file bytes back in.
        let _ =
            unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo) };
    }
}

struct Shard {
    path: PathBuf,
    file: File,
    mmap: Arc<Mmap>,
}

/// An opened checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: HashMap<String, TensorEntry>,
    bytes_read: AtomicU64,
    io: std::sync::RwLock<IoState>,
}

/// How the miss path reads: the mode asked for, the one in effect, direct descriptors, and the
/// emulated device.
#[derive(Debug, Default)]
struct IoState {
    asked: IoMode,
    effective: IoMode,
    note: Option<String>,
    direct: Vec<File>,
    emulator: Option<Arc<Emulator>>,
}

/// The read path in effect (see [`Checkpoint::set_io`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IoSetup {
    /// The mode asked for.
    pub asked: IoMode,
    /// The mode in effect (`page-cache` when the filesystem refused direct reads).
    pub effective: IoMode,
    /// Why they differ, when they do.
    pub note: Option<String>,
    /// The emulated device, if any.
    pub device: Option<DeviceModel>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens `dir/model.safetensors.index.json`, else `dir/model.safetensors`, else every
    /// `*.safetensors` in `dir`, validating each header.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut ck = Checkpoint {
            dir: dir.to_path_buf(),
            shards: Vec::new(),
            tensors: HashMap::new(),
            bytes_read: AtomicU64::new(0),
            io: Default::default(),
        };
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::format(&index, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index, "missing object `weight_map`"))?;
            let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (key, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::format(&index, format!("weight_map[`{key}`] is not a string"))
                })?;
                if file.contains('/') || file.contains("..") {
                    return Err(Error::format(&index, format!("weight_map[`{key}`] = `{file}` is not a file name in the checkpoint directory")));
                }
                by_file
                    .entry(file.to_string())
                    .or_default()
                    .push(key.clone());
            }
            for (file, keys) in by_file {
                let path = dir.join(&file);
                if !path.exists() {
                    return Err(Error::format(
                        &index,
                        format!(
                            "names shard `{file}` (for `{}` and {} more) but {} does not exist",
                            keys[0],
                            keys.len() - 1,
                            path.display()
                        ),
                    ));
                }
                let shard = ck.add_shard(&path)?;
                for key in keys {
                    if ck.tensors.get(&key).is_none_or(|t| t.shard != shard) {
                        return Err(Error::format(
                            &index,
                            format!(
                                "says `{key}` is in `{file}`, but that shard has no such tensor"
                            ),
                        ));
                    }
                }
            }
        } else if single.exists() {
            ck.add_shard(&single)?;
        } else {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(Error::format(
                    dir,
                    "no model.safetensors.index.json, model.safetensors or *.safetensors file in this directory",
                ));
            }
            for f in files {
                ck.add_shard(&f)?;
            }
        }
        Ok(ck)
    }

    fn add_shard(&mut self, path: &Path) -> Result<usize> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a checkpoint modified underneath us is outside our contract.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let entries = parse_header(path, &mmap)?;
        let idx = self.shards.len();
        for (key, mut e) in entries {
            e.shard = idx;
            if let Some(prev) = self.tensors.get(&key) {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{key}` also appears in {}",
                        self.shards[prev.shard].path.display()
                    ),
                ));
            }
            self.tensors.insert(key, e);
        }
        self.shards.push(Shard {
            path: path.to_path_buf(),
            file,
            mmap: Arc::new(mmap),
        });
        Ok(idx)
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of shard `i`.
    pub fn shard_path(&self, i: usize) -> &Path {
        &self.shards[i].path
    }

    /// All tensor names.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Looks a tensor up.
    pub fn get(&self, key: &str) -> Option<&TensorEntry> {
        self.tensors.get(key)
    }

    /// Looks a tensor up, failing with the key and checkpoint named.
    pub fn require(&self, key: &str) -> Result<&TensorEntry> {
        self.tensors.get(key).ok_or_else(|| Error::MissingTensor {
            key: key.to_string(),
            dir: self.dir.clone(),
            hint: String::new(),
        })
    }

    /// The bytes of a tensor through the memory map (dense weights at load time).
    pub fn mapped(&self, e: &TensorEntry) -> &[u8] {
        &self.shards[e.shard].mmap[e.offset as usize..(e.offset + e.len) as usize]
    }

    /// A tensor's bytes held in place through the shard's memory map (no copy; the view keeps
    /// the map alive): dense weights used where they lie.
    pub fn mapped_bytes(&self, e: &TensorEntry) -> MappedBytes {
        MappedBytes {
            map: self.shards[e.shard].mmap.clone(),
            start: e.offset as usize,
            len: e.len as usize,
        }
    }

    /// Drops the pages of a tensor from this process's memory (they stay in the page cache):
    /// for dense bytes copied into another form, so they are not held twice.
    pub fn release(&self, e: &TensorEntry) {
        self.mapped_bytes(e).release();
    }

    /// Drops every mapped page of every shard from this process's memory (after the dense
    /// weights were uploaded to a GPU, the host never reads them again).
    pub fn release_all(&self) {
        for s in &self.shards {
            release_range(&s.mmap, 0, s.mmap.len());
        }
    }

    /// Number of shard files.
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// The memory map of shard `shard`: the CUDA miss path registers its expert ranges with the
    /// driver and copies straight from them (see `experts::upload`).
    pub fn shard_map(&self, shard: usize) -> Arc<Mmap> {
        self.shards[shard].mmap.clone()
    }

    /// How the miss path reads now (the last [`Checkpoint::set_io`]).
    pub fn io_setup(&self) -> IoSetup {
        let st = self.io.read().expect("io state");
        IoSetup {
            asked: st.asked,
            effective: st.effective,
            note: st.note.clone(),
            device: st.emulator.as_ref().map(|e| e.model()),
        }
    }

    /// Sets how the miss path reads (see [`IoMode`]) and the storage device it emulates, if any.
    /// Where a filesystem refuses direct reads (tmpfs, some network filesystems), reads fall back
    /// to the page cache and the returned [`IoSetup`] says so.
    pub fn set_io(&self, mode: IoMode, device: Option<DeviceModel>) -> IoSetup {
        let mut st = self.io.write().expect("io state");
        if st.asked != mode || st.direct.len() != self.shards.len() {
            st.direct.clear();
            st.note = None;
            st.effective = mode;
            if mode.direct() {
                for s in &self.shards {
                    match open_direct(&s.path) {
                        Ok(f) => st.direct.push(f),
                        Err(e) => {
                            st.direct.clear();
                            st.effective = IoMode::PageCache;
                            st.note = Some(format!(
                                "{} refuses direct reads ({e}): expert reads go through the page cache",
                                s.path.display()
                            ));
                            break;
                        }
                    }
                }
            }
            st.asked = mode;
        }
        if st.emulator.as_ref().map(|e| e.model()) != device {
            st.emulator = device.map(|d| Arc::new(Emulator::new(d)));
        }
        IoSetup {
            asked: st.asked,
            effective: st.effective,
            note: st.note.clone(),
            device,
        }
    }

    /// The emulator's counters, when a device is emulated.
    pub fn emulator_stats(&self) -> Option<EmulatorStats> {
        let st = self.io.read().expect("io state");
        st.emulator.as_ref().map(|e| e.stats())
    }

    /// Drops every shard from the page cache (the mapped dense pages in use stay): the next read
    /// of each expert is a storage read. False where the OS cannot.
    pub fn drop_page_cache(&self) -> bool {
        self.shards
            .iter()
            .all(|s| storage::drop_from_page_cache(&s.file))
    }

    /// Bytes of the shard files in the page cache now.
    pub fn page_cache_bytes(&self) -> Option<u64> {
        self.shards
            .iter()
            .map(|s| storage::resident_bytes(&s.mmap))
            .sum()
    }

    /// Reads `len` bytes at `offset` of shard `shard` with a positioned read, counting them.
    /// This is the expert miss path: it touches exactly the requested range, through the page
    /// cache or around it as [`Checkpoint::set_io`] says, no faster than an emulated device.
    pub fn read_at(&self, shard: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let s = &self.shards[shard];
        let st = self.io.read().expect("io state");
        let done = st.emulator.as_ref().map(|e| e.schedule(buf.len() as u64));
        match st.direct.get(shard) {
            Some(f) => read_direct(f, offset, buf),
            None => s.file.read_exact_at(buf, offset),
        }
        .map_err(|e| Error::io(&s.path, e))?;
        if let (Some(e), Some(d)) = (&st.emulator, done) {
            e.complete(d);
        }
        self.bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Bytes read through [`Checkpoint::read_at`] so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// A tensor's bytes converted to f32, after checking its shape.
    pub fn f32_vec(&self, key: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let e = self.require(key)?;
        self.check_shape(key, e, shape)?;
        to_f32(self.mapped(e), e.dtype).map_err(|msg| self.tensor_err(key, e, msg))
    }

    /// Fails unless the tensor has exactly `shape`.
    pub fn check_shape(&self, key: &str, e: &TensorEntry, shape: &[usize]) -> Result<()> {
        if e.shape != shape {
            return Err(self.tensor_err(
                key,
                e,
                format!(
                    "shape {:?} disagrees with the config, which implies {:?}",
                    e.shape, shape
                ),
            ));
        }
        Ok(())
    }

    /// A [`Error::Tensor`] about `key`.
    pub fn tensor_err(&self, key: &str, e: &TensorEntry, msg: impl Into<String>) -> Error {
        Error::Tensor {
            key: key.to_string(),
            path: self.shards[e.shard].path.clone(),
            msg: msg.into(),
        }
    }
}

/// Converts little-endian float bytes to f32.
pub fn to_f32(bytes: &[u8], dtype: DType) -> std::result::Result<Vec<f32>, String> {
    Ok(match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        other => {
            return Err(format!(
                "dtype {other:?} where a float tensor (F32, F16, BF16) is needed"
            ))
        }
    })
}

fn dtype_of(d: safetensors::Dtype) -> DType {
    match d {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::U32 => DType::U32,
        other => DType::Other(other),
    }
}

/// Parses and validates a safetensors header against the file's bytes with the official
/// `safetensors` crate: header length inside the file, valid JSON, known dtypes, byte length equal
/// to `dtype × shape`, tensors laid end to end with no gap or overlap, and the last one ending at
/// the end of the file. When it refuses the file, [`diagnose`] names the offending tensor.
fn parse_header(path: &Path, data: &[u8]) -> Result<Vec<(String, TensorEntry)>> {
    let fail = |msg: String| Error::format(path, format!("invalid safetensors file: {msg}"));
    let (n, meta) = match safetensors::SafeTensors::read_metadata(data) {
        Ok(m) => m,
        Err(e) => {
            return Err(fail(match diagnose(data) {
                Some(why) => format!("{why} ({e})"),
                None => format!("{e}"),
            }))
        }
    };
    let base = 8 + n as u64;
    let mut out: Vec<(String, TensorEntry)> = meta
        .tensors()
        .into_iter()
        .map(|(key, info)| {
            let (b, e) = info.data_offsets;
            (
                key,
                TensorEntry {
                    shard: 0,
                    dtype: dtype_of(info.dtype),
                    shape: info.shape.clone(),
                    offset: base + b as u64,
                    len: (e - b) as u64,
                },
            )
        })
        .collect();
    out.sort_by_key(|(_, e)| e.offset);
    Ok(out)
}

/// What is wrong with a header the official parser refused, naming the tensor where one is at
/// fault (the official errors often do not): `None` when nothing more specific can be said.
fn diagnose(data: &[u8]) -> Option<String> {
    if data.len() < 8 {
        return Some(format!(
            "file is {} bytes, shorter than the 8-byte header length (truncated?)",
            data.len()
        ));
    }
    let n = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    if n > (data.len() - 8) as u64 {
        return Some(format!(
            "header length {n} runs past the end of the {}-byte file (truncated?)",
            data.len()
        ));
    }
    let header: serde_json::Value = serde_json::from_slice(&data[8..8 + n as usize]).ok()?;
    let data_len = data.len() as u64 - 8 - n;
    let mut spans: Vec<(u64, u64, String)> = Vec::new();
    for (key, v) in header.as_object()? {
        if key == "__metadata__" {
            continue;
        }
        let dt = v.get("dtype").and_then(|d| d.as_str());
        let Some(dt) = dt else {
            return Some(format!("`{key}`: missing dtype"));
        };
        let dtype: Option<safetensors::Dtype> =
            serde_json::from_value(serde_json::Value::String(dt.into())).ok();
        let Some(dtype) = dtype else {
            return Some(format!("`{key}`: unknown dtype `{dt}`"));
        };
        let shape: Option<Vec<u64>> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect());
        let Some(shape) = shape else {
            return Some(format!(
                "`{key}`: shape is not a list of non-negative integers"
            ));
        };
        let offs: Option<Vec<u64>> = v
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64()).collect());
        let Some([b, e]) = offs.as_deref().and_then(|o| <[u64; 2]>::try_from(o).ok()) else {
            return Some(format!("`{key}`: data_offsets must be [begin, end]"));
        };
        if b > e || e > data_len {
            return Some(format!(
                "`{key}`: data_offsets [{b}, {e}] run past the {data_len} bytes of data after the header (truncated or lying header?)"
            ));
        }
        let need = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.bitsize() as u64))
            .map(|bits| bits.div_ceil(8));
        if need != Some(e - b) {
            return Some(format!(
                "`{key}`: {dt} {shape:?} needs {} bytes but data_offsets span {}",
                need.map_or("too many".to_string(), |n| n.to_string()),
                e - b
            ));
        }
        spans.push((b, e, key.clone()));
    }
    spans.sort();
    let mut at = (0u64, String::new());
    for (b, e, key) in &spans {
        if *b < at.0 {
            return Some(format!(
                "`{key}` (bytes {b}..{e}) overlaps `{}` (ending at {})",
                at.1, at.0
            ));
        }
        if *b > at.0 {
            return Some(format!(
                "a gap of {} bytes before `{key}` (bytes {b}..{e}): tensors must be laid end to end",
                b - at.0
            ));
        }
        at = (*e, key.clone());
    }
    if at.0 != data_len {
        return Some(format!(
            "the tensors end at byte {} of the {data_len} bytes of data after the header (wrong header length, or trailing bytes)",
            at.0
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, header: &str, data: &[u8]) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn reads_valid_and_rejects_lies() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        write(
            &p,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            &[0, 0, 128, 63, 0, 0, 0, 64],
        );
        let ck = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ck.f32_vec("a", &[2]).unwrap(), vec![1.0, 2.0]);
        assert!(ck
            .f32_vec("a", &[3])
            .unwrap_err()
            .to_string()
            .contains("shape"));
        // Offsets past the end of the file.
        write(
            &p,
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            &[0; 8],
        );
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("run past") && err.contains("model.safetensors"),
            "{err}"
        );
        // Byte length disagreeing with dtype × shape.
        write(
            &p,
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            &[0; 8],
        );
        assert!(Checkpoint::open(dir.path())
            .unwrap_err()
            .to_string()
            .contains("needs 12 bytes"));
        // Truncated inside the header.
        std::fs::write(&p, [200u8, 0, 0, 0, 0, 0, 0, 0, b'{']).unwrap();
        assert!(Checkpoint::open(dir.path())
            .unwrap_err()
            .to_string()
            .contains("truncated"));
    }

    #[test]
    fn index_naming_missing_shard_fails() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"weight_map":{"a":"model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("model-00001-of-00002.safetensors") && err.contains("does not exist"),
            "{err}"
        );
    }
}
