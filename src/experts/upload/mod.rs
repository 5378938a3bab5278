//! Host→device transfer of an expert's checkpoint bytes.
//!
//! On CUDA a miss is copied to the GPU on a copy stream of its own, so the copy never queues
//! behind compute kernels. Where the store registered the experts' ranges of the shard mappings
//! with the driver ([`Staging::Auto`] / [`Staging::Registered`]), each byte range is copied
//! straight from the page cache's pages (no read, no staging buffer); otherwise the ranges are
//! read into a page-locked (pinned) staging buffer and copied from there in one transfer. The
//! bytes cross the link in their checkpoint form (4-bit words, bf16 scales); an MLX-quantized
//! expert then either stays packed in GPU memory (`DevicePacked` in CUDA builds, run by a
//! matrix-vector kernel that decodes as it multiplies) or is decoded to f32 by a kernel on the
//! same stream. Each loader thread takes its own lane
//! (stream + staging buffer) from a pool, so concurrent misses read and copy in parallel. On other
//! devices the bytes are read into ordinary memory, handed to candle and decoded with tensor ops.
//!
//! Counters record the time spent reading and copying, so benchmarks can report the achieved
//! host→device rate next to a pinned copy of the same size.

use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(feature = "cuda")]
use std::sync::Mutex;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

use crate::weights::ByteRange;

named_enum! {
    /// The resident form of MLX-quantized experts on a CUDA GPU.
    pub enum GpuExperts {
        /// Checkpoint bytes in GPU memory; the routed experts of a token run in two fused
        /// launches (gate·up with SiLU for every expert, then down with the routing-weighted
        /// sum), decoding each weight as they multiply.
        #[default]
        Fused = "fused",
        /// Checkpoint bytes in GPU memory, one matrix-vector launch per projection of each
        /// expert (the form before the fused kernels, kept for comparison).
        Packed = "packed",
        /// Decoded once to f32 at upload (cuBLAS products).
        F32 = "f32",
    }
}

named_enum! {
    /// How a CUDA miss brings an expert's bytes to the copy engine.
    pub enum Staging {
        /// `registered` where it applies (misses through the page cache, no emulated storage
        /// device, the experts' bytes at most half of the host's memory, the driver agrees),
        /// else `write-combined`; the report says which ran and why.
        #[default]
        Auto = "auto",
        /// No staging: the experts' ranges of the shard mappings are page-locked and registered
        /// with the driver, and a miss is copied straight from the page cache to the GPU (the
        /// host-memory tier of offloading systems). Those pages stay locked while the engine is
        /// open. An error where it cannot apply.
        Registered = "registered",
        /// Read into write-combined pinned buffers (the CPU only writes them, the copy engine
        /// reads them fast), then copied.
        WriteCombined = "write-combined",
        /// Ordinary cacheable pinned memory.
        Cacheable = "cacheable",
    }
}

/// One tensor to bring over: its bytes, element type and shape.
#[derive(Debug, Clone, Copy)]
pub struct Part {
    /// Where its bytes are.
    pub range: ByteRange,
    /// Element type of those bytes (`U8` for packed quantized words).
    pub dtype: DType,
    /// Shape `[rows, cols]` in elements of `dtype`.
    pub shape: (usize, usize),
}

/// How one MLX-quantized projection is decoded on the device: its three parts (packed words,
/// scales, biases) are consecutive in the part list.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantProj {
    /// Output rows.
    pub rows: usize,
    /// Output columns (inputs).
    pub cols: usize,
    /// Bits and group size.
    pub params: crate::config::QuantParams,
}

/// Transfer counters since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct TransferStats {
    /// Experts brought over.
    pub uploads: u64,
    /// Bytes taken from the shard files: read into host buffers, or copied straight from the
    /// registered mappings (no read time).
    pub read_bytes: u64,
    /// Seconds spent in those reads (summed over loader threads).
    pub read_seconds: f64,
    /// Bytes copied host→device (0 on the CPU).
    pub h2d_bytes: u64,
    /// Seconds from the first copy's submission to the copy stream's completion, summed over
    /// uploads (0 on the CPU).
    pub h2d_seconds: f64,
    /// Seconds the copies themselves took on the GPU's copy engine (CUDA events around each
    /// copy), summed over uploads: `h2d_bytes / dma_seconds` is the rate each upload got from
    /// the link.
    pub dma_seconds: f64,
    /// Wall-clock seconds during which at least one read was running (loader threads overlap).
    pub read_wall_seconds: f64,
    /// Wall-clock seconds during which at least one host→device copy was running.
    pub h2d_wall_seconds: f64,
    /// Wall-clock seconds during which at least one upload (read + copy) was running.
    pub path_wall_seconds: f64,
    /// Bytes a gated decode step copied itself (the gates' loads from the registered
    /// mappings, inside the step; not in `h2d_bytes`).
    pub step_bytes: u64,
    /// GPU seconds those copies took (the device's global timer, from a gate's answer to its
    /// last block's end), summed over gates.
    pub step_seconds: f64,
}

impl TransferStats {
    /// Achieved host→device rate in bytes per second of copy wall time (the link's throughput
    /// while it was in use; loader threads overlap, so summed durations would understate it),
    /// if anything was copied.
    pub fn h2d_rate(&self) -> Option<f64> {
        (self.h2d_wall_seconds > 0.0).then(|| self.h2d_bytes as f64 / self.h2d_wall_seconds)
    }

    /// Rate each copy got on the GPU copy engine (bytes over CUDA-event copy time).
    pub fn dma_rate(&self) -> Option<f64> {
        (self.dma_seconds > 0.0).then(|| self.h2d_bytes as f64 / self.dma_seconds)
    }

    /// Rate of the whole miss path: bytes read over the wall time uploads were running (the
    /// bytes a step copied itself left out: their uploads only allocate).
    pub fn path_rate(&self) -> Option<f64> {
        let bytes = self.read_bytes.saturating_sub(self.step_bytes);
        (self.path_wall_seconds > 0.0 && bytes > 0).then(|| bytes as f64 / self.path_wall_seconds)
    }

    /// Rate of the copies gated steps made themselves (bytes over their GPU time).
    pub fn step_rate(&self) -> Option<f64> {
        (self.step_seconds > 0.0).then(|| self.step_bytes as f64 / self.step_seconds)
    }

    /// The counters accumulated since `before` was taken.
    pub fn since(&self, before: &TransferStats) -> TransferStats {
        TransferStats {
            uploads: self.uploads.saturating_sub(before.uploads),
            read_bytes: self.read_bytes.saturating_sub(before.read_bytes),
            read_seconds: self.read_seconds - before.read_seconds,
            h2d_bytes: self.h2d_bytes.saturating_sub(before.h2d_bytes),
            h2d_seconds: self.h2d_seconds - before.h2d_seconds,
            dma_seconds: self.dma_seconds - before.dma_seconds,
            read_wall_seconds: self.read_wall_seconds - before.read_wall_seconds,
            h2d_wall_seconds: self.h2d_wall_seconds - before.h2d_wall_seconds,
            path_wall_seconds: self.path_wall_seconds - before.path_wall_seconds,
            step_bytes: self.step_bytes.saturating_sub(before.step_bytes),
            step_seconds: self.step_seconds - before.step_seconds,
        }
    }
}

/// The spans to page-lock for `ranges` of shards whose mappings are `lens` bytes long: per
/// shard, each range widened to whole `page`s (the last page of a mapping is mapped whole),
/// sorted and merged where they touch or overlap (the driver refuses to register a page
/// twice).
#[cfg(any(feature = "cuda", test))]
pub(crate) fn page_spans(
    ranges: &[ByteRange],
    lens: &[usize],
    page: usize,
) -> Vec<Vec<(usize, usize)>> {
    let mut per: Vec<Vec<(usize, usize)>> = vec![Vec::new(); lens.len()];
    for r in ranges {
        let mapped = lens[r.shard].div_ceil(page) * page;
        let start = r.offset as usize / page * page;
        let end = ((r.offset + r.len) as usize).div_ceil(page) * page;
        per[r.shard].push((start, end.min(mapped)));
    }
    for v in &mut per {
        v.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(v.len());
        for &(a, b) in v.iter() {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        *v = merged;
    }
    per
}

/// Whether `[a, b)` lies inside one of the sorted, disjoint `spans`.
#[cfg(any(feature = "cuda", test))]
pub(crate) fn covered(spans: &[(usize, usize)], a: usize, b: usize) -> bool {
    spans
        .partition_point(|&(s, _)| s <= a)
        .checked_sub(1)
        .is_some_and(|i| spans[i].1 >= b)
}

/// Wall-clock time during which at least one of several threads was inside a section.
#[derive(Debug, Default)]
struct BusyClock {
    state: std::sync::Mutex<(usize, Option<Instant>)>,
    ns: AtomicU64,
}

impl BusyClock {
    fn enter(&self) {
        let mut s = self.state.lock().expect("busy clock");
        if s.0 == 0 {
            s.1 = Some(Instant::now());
        }
        s.0 += 1;
    }

    fn leave(&self) {
        let mut s = self.state.lock().expect("busy clock");
        s.0 -= 1;
        if s.0 == 0 {
            if let Some(t) = s.1.take() {
                self.ns
                    .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
        }
    }

    fn seconds(&self) -> f64 {
        self.ns.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// Runs `f` inside the section.
    fn time<R>(&self, f: impl FnOnce() -> R) -> R {
        self.enter();
        let r = f();
        self.leave();
        r
    }
}

#[derive(Debug, Default)]
struct Counters {
    uploads: AtomicU64,
    read_bytes: AtomicU64,
    /// Of `read_bytes`, those copied straight from registered mappings.
    mapped_bytes: AtomicU64,
    read_ns: AtomicU64,
    h2d_bytes: AtomicU64,
    h2d_ns: AtomicU64,
    dma_ns: AtomicU64,
    read_wall: BusyClock,
    h2d_wall: BusyClock,
    path_wall: BusyClock,
    step_bytes: AtomicU64,
    /// GPU nanoseconds of the copies gated steps made (added once each step has run).
    step_ns: std::sync::Arc<AtomicU64>,
}

/// Moves expert bytes to the compute device.
pub struct Uploader {
    device: Device,
    counters: Counters,
    /// Allocate staging buffers write-combined (the CPU only writes them).
    write_combined: std::sync::atomic::AtomicBool,
    /// Reader threads per upload on CUDA.
    read_threads: std::sync::atomic::AtomicUsize,
    #[cfg(feature = "cuda")]
    kernels: std::sync::OnceLock<std::result::Result<std::sync::Arc<cuda::Kernels>, String>>,
    /// Keep MLX-quantized experts packed in GPU memory (CUDA).
    gpu_packed: std::sync::atomic::AtomicBool,
    /// Run a token's packed experts in the fused kernels.
    gpu_fused: std::sync::atomic::AtomicBool,
    #[cfg(feature = "cuda")]
    lanes: Mutex<Vec<cuda::Lane>>,
    /// The experts' ranges of the shard mappings, page-locked for copies straight from them.
    #[cfg(feature = "cuda")]
    registered: std::sync::RwLock<Option<std::sync::Arc<cuda::Registration>>>,
}

impl std::fmt::Debug for Uploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploader")
            .field("device", &self.device)
            .field("counters", &self.counters)
            .finish()
    }
}

impl Uploader {
    /// An uploader for `device`; staging lanes are created on first use.
    pub fn new(device: Device) -> Self {
        Uploader {
            device,
            counters: Counters::default(),
            write_combined: true.into(),
            read_threads: 4.into(),
            gpu_packed: true.into(),
            gpu_fused: true.into(),
            #[cfg(feature = "cuda")]
            kernels: std::sync::OnceLock::new(),
            #[cfg(feature = "cuda")]
            lanes: Mutex::new(Vec::new()),
            #[cfg(feature = "cuda")]
            registered: std::sync::RwLock::new(None),
        }
    }

    /// Page-locks `ranges` of the shard mappings `maps` (indexed by shard) and registers them
    /// with the CUDA driver, replacing any earlier registration: from now on a miss whose
    /// bytes all lie there is copied straight from the page cache to the GPU (no read into
    /// staging). Returns the bytes registered and the seconds it took; an error (nothing
    /// registered) where the driver refuses or the device is not CUDA.
    pub fn register(
        &self,
        maps: Vec<std::sync::Arc<memmap2::Mmap>>,
        ranges: &[ByteRange],
    ) -> std::result::Result<(u64, f64), String> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = &self.device {
            self.unregister();
            let reg = cuda::Registration::new(dev, maps, ranges)?;
            let out = (reg.bytes, reg.seconds);
            *self.registered.write().expect("registration") = Some(std::sync::Arc::new(reg));
            return Ok(out);
        }
        let _ = (maps, ranges);
        Err("registered copies need a CUDA device".into())
    }

    /// Drops the registration (the pages are unlocked once the uploads using it finish).
    pub fn unregister(&self) {
        #[cfg(feature = "cuda")]
        self.registered.write().expect("registration").take();
    }

    /// Expert bytes copied straight from registered mappings so far (the miss path's bytes
    /// that [`crate::weights::Checkpoint::read_at`] did not read).
    pub fn mapped_bytes(&self) -> u64 {
        self.counters.mapped_bytes.load(Ordering::Relaxed)
    }

    /// Whether misses copy straight from registered mappings now.
    pub fn registered(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.registered.read().expect("registration").is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Chooses write-combined (every mode but `cacheable`) or cacheable pinned staging buffers
    /// for lanes created from now on (registration is the store's: `ExpertStore::apply_staging`).
    pub fn set_staging(&self, staging: Staging) {
        self.write_combined
            .store(staging != Staging::Cacheable, Ordering::Relaxed);
        #[cfg(feature = "cuda")]
        self.lanes.lock().expect("lane pool").clear();
    }

    /// Reader threads per upload on CUDA (default 4): an expert is read from the shard files
    /// into the staging buffer in pieces of at most 1 MiB, spread over this many threads.
    pub fn set_read_threads(&self, n: usize) {
        self.read_threads.store(n.max(1), Ordering::Relaxed);
    }

    /// Keep MLX-quantized experts packed in GPU memory and decode them inside the kernels that
    /// multiply (fused per token by default, or one launch per projection), or decode them once
    /// to f32 at upload.
    pub fn set_gpu_experts(&self, form: GpuExperts) {
        self.gpu_packed
            .store(form != GpuExperts::F32, Ordering::Relaxed);
        self.gpu_fused
            .store(form == GpuExperts::Fused, Ordering::Relaxed);
    }

    /// Whether quantized experts stay packed on this uploader's device.
    pub fn gpu_packed(&self) -> bool {
        self.device.is_cuda() && self.gpu_packed.load(Ordering::Relaxed)
    }

    /// The counters so far.
    pub fn stats(&self) -> TransferStats {
        let c = &self.counters;
        TransferStats {
            uploads: c.uploads.load(Ordering::Relaxed),
            read_bytes: c.read_bytes.load(Ordering::Relaxed),
            read_seconds: c.read_ns.load(Ordering::Relaxed) as f64 * 1e-9,
            h2d_bytes: c.h2d_bytes.load(Ordering::Relaxed),
            h2d_seconds: c.h2d_ns.load(Ordering::Relaxed) as f64 * 1e-9,
            dma_seconds: c.dma_ns.load(Ordering::Relaxed) as f64 * 1e-9,
            read_wall_seconds: c.read_wall.seconds(),
            h2d_wall_seconds: c.h2d_wall.seconds(),
            path_wall_seconds: c.path_wall.seconds(),
            step_bytes: c.step_bytes.load(Ordering::Relaxed),
            step_seconds: c.step_ns.load(Ordering::Relaxed) as f64 * 1e-9,
        }
    }

    /// Reads every part with `read` and returns them as tensors on the device, in order.
    pub fn upload(
        &self,
        parts: &[Part],
        read: &(dyn Fn(&ByteRange, &mut [u8]) -> Result<()> + Sync),
    ) -> Result<Vec<Tensor>> {
        self.counters.uploads.fetch_add(1, Ordering::Relaxed);
        self.counters
            .path_wall
            .time(|| self.upload_inner(parts, read))
    }

    fn upload_inner(
        &self,
        parts: &[Part],
        read: &(dyn Fn(&ByteRange, &mut [u8]) -> Result<()> + Sync),
    ) -> Result<Vec<Tensor>> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = &self.device {
            return self.upload_cuda(dev, parts, read);
        }
        let t = Instant::now();
        let mut bufs = Vec::with_capacity(parts.len());
        self.counters.read_wall.time(|| -> Result<()> {
            for p in parts {
                let mut b = vec![0u8; p.range.len as usize];
                read(&p.range, &mut b)?;
                bufs.push(b);
            }
            Ok(())
        })?;
        self.note_read(parts, t);
        parts
            .iter()
            .zip(&bufs)
            .map(|(p, b)| {
                Ok(Tensor::from_raw_buffer(
                    b,
                    p.dtype,
                    &[p.shape.0, p.shape.1],
                    &self.device,
                )?)
            })
            .collect()
    }

    /// Brings an expert whose three projections are all MLX-quantized to a CUDA device as one
    /// copy of its checkpoint bytes, and decodes it there with one kernel per projection into
    /// f32 `[2I, H]` (gate rows then up rows) and `[H, I]`, on the lane's stream (overlapping
    /// the engine's compute). `None` off CUDA: the caller decodes with tensor ops.
    pub fn upload_quant(
        &self,
        parts: &[Part],
        projs: &[QuantProj; 3],
        read: &(dyn Fn(&ByteRange, &mut [u8]) -> Result<()> + Sync),
    ) -> Result<Option<(Tensor, Tensor)>> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = &self.device {
            let kernels = self.kernels(dev)?;
            let kernels = &*kernels;
            self.counters.uploads.fetch_add(1, Ordering::Relaxed);
            return self
                .counters
                .path_wall
                .time(|| self.upload_quant_cuda(dev, kernels, parts, projs, read))
                .map(Some);
        }
        let _ = (parts, projs, read);
        Ok(None)
    }

    #[cfg(feature = "cuda")]
    fn kernels(&self, dev: &candle_core::CudaDevice) -> Result<std::sync::Arc<cuda::Kernels>> {
        self.kernels
            .get_or_init(|| cuda::Kernels::new(dev).map(std::sync::Arc::new))
            .clone()
            .map_err(|e| crate::error::Error::Input(format!("CUDA decode kernels: {e}")))
    }

    /// Brings a quantized expert to the GPU as one copy of its checkpoint bytes and keeps it
    /// that way (see `DevicePacked`).
    #[cfg(feature = "cuda")]
    pub fn upload_packed(
        &self,
        parts: &[Part],
        projs: &[QuantProj; 3],
        read: &(dyn Fn(&ByteRange, &mut [u8]) -> Result<()> + Sync),
    ) -> Result<DevicePacked> {
        let Device::Cuda(dev) = &self.device else {
            return Err(crate::error::Error::Input(
                "internal: packed GPU experts need a CUDA device".into(),
            ));
        };
        let kernels = self.kernels(dev)?;
        self.counters.uploads.fetch_add(1, Ordering::Relaxed);
        self.counters.path_wall.time(|| {
            let (mut lane, srcs, held) = self.stage(dev, parts, read, true)?;
            // A gated step collecting copies makes this one itself (see `fills`).
            if let Some(reg) =
                held.filter(|_| srcs.iter().all(|s| s.dev != 0) && fills::wants(srcs.len()))
            {
                let out = lane.alloc_for(&srcs).and_then(|(buf, dsts)| {
                    let fused = self.gpu_fused.load(Ordering::Relaxed);
                    let packed =
                        DevicePacked::new(dev.clone(), kernels, buf, parts, *projs, fused)?;
                    // Handed on only once the expert owns its buffer (the copies write into it).
                    let list = srcs
                        .iter()
                        .zip(dsts)
                        .map(|(s, dst)| Fill {
                            src: s.dev,
                            dst,
                            len: s.len as u64,
                        })
                        .collect();
                    fills::defer(list, reg, &self.counters.step_ns);
                    let bytes: u64 = parts.iter().map(|p| p.range.len).sum();
                    self.counters.step_bytes.fetch_add(bytes, Ordering::Relaxed);
                    Ok(packed)
                });
                self.return_lane(lane);
                return out;
            }
            let out = self
                .timed_copy(parts, || lane.copy_in(&srcs, true))
                .and_then(|buf| {
                    let buf = buf.expect("own buffer requested");
                    let fused = self.gpu_fused.load(Ordering::Relaxed);
                    DevicePacked::new(dev.clone(), kernels, buf, parts, *projs, fused)
                });
            self.return_lane(lane);
            out
        })
    }

    /// Takes a lane with room for `parts` and puts their host bytes where its copies take
    /// them: straight in the registered mappings when every part lies there (for a typed copy,
    /// `!whole`, aligned for its element type), else read into the lane's staging buffer.
    /// Returns the lane, the sources (one per part; a staged expert as one source when
    /// `whole`) and the registration they point into, to be held until the copies are done.
    #[cfg(feature = "cuda")]
    #[allow(clippy::type_complexity)]
    fn stage(
        &self,
        dev: &candle_core::CudaDevice,
        parts: &[Part],
        read: &(dyn Fn(&ByteRange, &mut [u8]) -> Result<()> + Sync),
        whole: bool,
    ) -> Result<(
        cuda::Lane,
        Vec<cuda::Src>,
        Option<std::sync::Arc<cuda::Registration>>,
    )> {
        let total: usize = parts.iter().map(|p| cuda::aligned(p.range.len)).sum();
        let reg = self.registered.read().expect("registration").clone();
        if let Some(reg) = reg {
            let srcs: Option<Vec<cuda::Src>> = parts
                .iter()
                .map(|p| {
                    let b = reg.host(&p.range)?;
                    // Bytes copied as bytes (`whole`) may start anywhere (an MLX safetensors
                    // header is unpadded); a typed copy needs its element type's alignment.
                    (whole || (b.as_ptr() as usize).is_multiple_of(p.dtype.size_in_bytes()))
                        .then_some(cuda::Src {
                            ptr: b.as_ptr(),
                            len: b.len(),
                            dev: reg.device(&p.range).unwrap_or(0),
                        })
                })
                .collect();
            if let Some(srcs) = srcs {
                // Any lane will do: nothing is staged.
                let lane = self.take_lane(dev, 0)?;
                // Taken from host memory without a read: bytes counted, no read time.
                let bytes: u64 = parts.iter().map(|p| p.range.len).sum();
                self.counters.read_bytes.fetch_add(bytes, Ordering::Relaxed);
                self.counters
                    .mapped_bytes
                    .fetch_add(bytes, Ordering::Relaxed);
                return Ok((lane, srcs, Some(reg)));
            }
        }
        let mut lane = self.take_lane(dev, total)?;
        let t = Instant::now();
        let threads = self.read_threads.load(Ordering::Relaxed);
        let filled = self
            .counters
            .read_wall
            .time(|| lane.fill(parts, read, threads));
        if let Err(e) = filled {
            self.return_lane(lane);
            return Err(e);
        }
        self.note_read(parts, t);
        let srcs = lane.staged(parts, whole)?;
        Ok((lane, srcs, None))
    }

    /// Runs the host→device copy of `parts` in `copy`, counting its bytes, wall time and (when
    /// `copy` reports it) GPU time in milliseconds.
    #[cfg(feature = "cuda")]
    fn timed_copy<T>(
        &self,
        parts: &[Part],
        copy: impl FnOnce() -> Result<(T, Option<f32>)>,
    ) -> Result<T> {
        let c = &self.counters;
        let t = Instant::now();
        let out = c.h2d_wall.time(copy);
        c.h2d_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let bytes: u64 = parts.iter().map(|p| p.range.len).sum();
        c.h2d_bytes.fetch_add(bytes, Ordering::Relaxed);
        let (v, dma_ms) = out?;
        if let Some(ms) = dma_ms {
            c.dma_ns
                .fetch_add((ms as f64 * 1e6) as u64, Ordering::Relaxed);
        }
        Ok(v)
    }

    #[cfg(feature = "cuda")]
    fn return_lane(&self, lane: cuda::Lane) {
        self.lanes.lock().expect("lane pool").push(lane);
    }

    #[cfg(feature = "cuda")]
    fn take_lane(&self, dev: &candle_core::CudaDevice, total: usize) -> Result<cuda::Lane> {
        let pooled = self.lanes.lock().expect("lane pool").pop();
        match pooled {
            Some(l) if l.capacity() >= total => Ok(l),
            _ => cuda::Lane::new(dev, total, self.write_combined.load(Ordering::Relaxed)),
        }
    }

    #[cfg(feature = "cuda")]
    fn upload_quant_cuda(
        &self,
        dev: &candle_core::CudaDevice,
        kernels: &cuda::Kernels,
        parts: &[Part],
        projs: &[QuantProj; 3],
        read: &(dyn Fn(&ByteRange, &mut [u8]) -> Result<()> + Sync),
    ) -> Result<(Tensor, Tensor)> {
        let (mut lane, srcs, _held) = self.stage(dev, parts, read, true)?;
        let out = self
            .timed_copy(parts, || lane.copy_in(&srcs, false))
            .and_then(|_| lane.decode(dev, kernels, parts, projs));
        self.return_lane(lane);
        out
    }

    fn note_read(&self, parts: &[Part], t: Instant) {
        let c = &self.counters;
        let bytes: u64 = parts.iter().map(|p| p.range.len).sum();
        c.read_bytes.fetch_add(bytes, Ordering::Relaxed);
        c.read_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    #[cfg(feature = "cuda")]
    fn upload_cuda(
        &self,
        dev: &candle_core::CudaDevice,
        parts: &[Part],
        read: &(dyn Fn(&ByteRange, &mut [u8]) -> Result<()> + Sync),
    ) -> Result<Vec<Tensor>> {
        let (lane, srcs, _held) = self.stage(dev, parts, read, false)?;
        let out = self.timed_copy(parts, || Ok((lane.copy(dev, parts, &srcs)?, None)));
        self.return_lane(lane);
        out
    }
}

/// Keeps freed device memory in the CUDA stream-ordered pool instead of returning it to the
/// driver at every synchronization (the default release threshold is 0). Every tensor candle
/// allocates, and every expert brought in or evicted, then reuses pooled memory instead of
/// mapping fresh pages. No-op off CUDA.
pub fn keep_pool_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        cuda::keep_pool_memory(dev);
    }
    let _ = device;
}

#[cfg(feature = "cuda")]
pub use cuda::DevicePacked;
#[cfg(feature = "cuda")]
pub use fills::{collect as collect_step_fills, Collector, Fill, FillHold};
#[cfg(feature = "cuda")]
pub use gates::{Gates, MAX_FILLS};
#[cfg(feature = "cuda")]
pub use routed::{Ahead, ResidentLayer, RouteRule, RouterScratch};

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(any(feature = "cuda", test))]
mod fills;
#[cfg(feature = "cuda")]
mod fused;
#[cfg(feature = "cuda")]
mod gates;
#[cfg(feature = "cuda")]
mod route_src;
#[cfg(feature = "cuda")]
mod routed;

#[cfg(test)]
mod tests {
    use super::*;

    fn r(shard: usize, offset: u64, len: u64) -> ByteRange {
        ByteRange { shard, offset, len }
    }

    #[test]
    fn page_spans_widen_to_pages_and_merge_what_touches() {
        // Shard 0 is 10000 bytes (3 pages of 4096, the last mapped whole); shard 1 has nothing.
        let spans = page_spans(
            &[
                r(0, 5000, 100),
                r(0, 100, 50),
                r(0, 4000, 200),
                r(0, 9000, 1000),
            ],
            &[10000, 300],
            4096,
        );
        // [0, 4096) and [0, 8192) overlap -> [0, 8192); [4096, 8192) inside; [8192, 12288)
        // touches it -> one span [0, 12288), clamped to the mapping's whole pages.
        assert_eq!(spans, vec![vec![(0, 12288)], vec![]]);
        let apart = page_spans(&[r(0, 20000, 10), r(0, 100, 10)], &[30000], 4096);
        assert_eq!(apart, vec![vec![(0, 4096), (16384, 20480)]]);
    }

    #[test]
    fn covered_needs_one_span_to_hold_the_whole_range() {
        let spans = [(0, 4096), (8192, 12288)];
        assert!(covered(&spans, 0, 4096));
        assert!(covered(&spans, 8200, 12288));
        assert!(!covered(&spans, 4000, 4100), "straddles a hole");
        assert!(!covered(&spans, 4096, 4097), "in the hole");
        assert!(!covered(&spans, 12000, 12289), "past the last span");
        assert!(!covered(&[], 0, 1));
    }
}
