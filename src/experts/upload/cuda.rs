//! Pinned staging buffers and copy streams.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PinnedHostSlice, PushKernelArg,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Storage, Tensor};

use super::{Part, QuantProj};
use crate::error::{Error, Result};
use crate::weights::cuda::SCALE_SRC;
use crate::weights::ByteRange;

/// Where one part's host bytes lie for its copy: the lane's staging buffer, or a registered
/// shard mapping.
#[derive(Debug, Clone, Copy)]
pub(super) struct Src {
    pub(super) ptr: *const u8,
    pub(super) len: usize,
    /// The bytes' device address where they lie in a registered mapping (0: none).
    pub(super) dev: u64,
}

/// Offsets inside a staging buffer are aligned for any element type and copy engine.
const ALIGN: usize = 256;
/// Largest piece one reader thread reads at a time.
const PIECE: usize = 1 << 20;

pub(super) fn aligned(n: u64) -> usize {
    (n as usize).div_ceil(ALIGN) * ALIGN
}

pub(super) use crate::weights::cuda::driver;

pub(super) fn keep_pool_memory(dev: &CudaDevice) {
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    if ctx.bind_to_thread().is_err() {
        return;
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on the device of a live context; failure leaves the
    // default (release at synchronization), which is only slower.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS
        {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut std::ffi::c_void,
            );
        }
    }
}

/// A shard's mapping and its registered `[start, end)` byte ranges, sorted.
type Spans = (Arc<memmap2::Mmap>, Vec<(usize, usize)>);

/// The routed experts' byte ranges of the shard mappings, page-locked and registered with the
/// driver (read-only): a miss then copies straight from the page cache's own pages to the GPU,
/// with no read into a staging buffer. The pages stay locked (not reclaimable) until this is
/// dropped; it keeps the mappings alive until then.
pub(crate) struct Registration {
    ctx: Arc<CudaContext>,
    /// Per shard: its mapping and the registered `[start, end)` byte ranges, sorted.
    shards: Vec<Option<Spans>>,
    /// Per shard, the device address of each registered range's start (0 where the driver
    /// gave none: the range is then only copied by the copy engine).
    dev: Vec<Vec<u64>>,
    /// Bytes registered (whole pages).
    pub(super) bytes: u64,
    /// Seconds the registration took (the pages are faulted in and locked).
    pub(super) seconds: f64,
}

impl Registration {
    /// Registers `ranges` (shard, offset, length) of the mappings `maps` (indexed by shard),
    /// widened to whole pages and merged. Fails, leaving nothing registered, if the driver
    /// refuses any of them.
    pub(super) fn new(
        dev: &CudaDevice,
        maps: Vec<Arc<memmap2::Mmap>>,
        ranges: &[ByteRange],
    ) -> std::result::Result<Self, String> {
        let t = std::time::Instant::now();
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .unwrap_or(4096)
            .max(1);
        let lens: Vec<usize> = maps.iter().map(|m| m.len()).collect();
        let per = super::page_spans(ranges, &lens, page);
        let ctx = dev.cuda_stream().context().clone();
        ctx.bind_to_thread()
            .map_err(|e| format!("CUDA context: {e}"))?;
        let mut reg = Registration {
            ctx,
            shards: Vec::with_capacity(maps.len()),
            dev: Vec::with_capacity(maps.len()),
            bytes: 0,
            seconds: 0.0,
        };
        for (map, v) in maps.into_iter().zip(per) {
            reg.dev.push(Vec::with_capacity(v.len()));
            if v.is_empty() {
                reg.shards.push(None);
                continue;
            }
            let mut done = Vec::with_capacity(v.len());
            for &(a, b) in &v {
                // SAFETY: [a, b) lies inside the mapping (whole pages of it), which `reg` keeps
                // alive until it unregisters the range in `drop`. Read-only: the mapping is
                // PROT_READ and the device only reads it (copies, and the gates' loads).
                let rc = unsafe {
                    sys::cuMemHostRegister_v2(
                        map.as_ptr().add(a) as *mut std::ffi::c_void,
                        b - a,
                        sys::CU_MEMHOSTREGISTER_READ_ONLY | sys::CU_MEMHOSTREGISTER_DEVICEMAP,
                    )
                };
                if rc != sys::CUresult::CUDA_SUCCESS {
                    reg.shards.push(Some((map, done)));
                    return Err(format!(
                        "the driver refused to page-lock {} bytes of a shard mapping ({rc:?})",
                        b - a
                    ));
                }
                done.push((a, b));
                reg.bytes += (b - a) as u64;
                let mut at: sys::CUdeviceptr = 0;
                // SAFETY: the range was just registered, mapped, in the current context.
                let rc = unsafe {
                    sys::cuMemHostGetDevicePointer_v2(
                        &mut at,
                        map.as_ptr().add(a) as *mut std::ffi::c_void,
                        0,
                    )
                };
                let at = if rc == sys::CUresult::CUDA_SUCCESS {
                    at
                } else {
                    0
                };
                reg.dev.last_mut().expect("pushed above").push(at);
            }
            reg.shards.push(Some((map, done)));
        }
        reg.seconds = t.elapsed().as_secs_f64();
        Ok(reg)
    }

    /// The registered bytes of `r`, if all of it is registered.
    pub(super) fn host(&self, r: &ByteRange) -> Option<&[u8]> {
        let (map, v) = self.shards.get(r.shard)?.as_ref()?;
        let (a, b) = (r.offset as usize, (r.offset + r.len) as usize);
        (super::covered(v, a, b) && b <= map.len()).then(|| &map[a..b])
    }

    /// The device address of `r`'s registered bytes, if all of it is registered and the
    /// driver mapped its range.
    pub(super) fn device(&self, r: &ByteRange) -> Option<u64> {
        let (_, v) = self.shards.get(r.shard)?.as_ref()?;
        let a = r.offset as usize;
        if !super::covered(v, a, a + r.len as usize) {
            return None;
        }
        let i = v.partition_point(|&(s, _)| s <= a).checked_sub(1)?;
        let base = *self.dev.get(r.shard)?.get(i)?;
        (base != 0).then(|| base + (a - v[i].0) as u64)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        for (map, v) in self.shards.iter().flatten() {
            for &(a, _) in v {
                // SAFETY: registered in `new` at this address; nothing copies from it any more
                // (every upload holds the registration while its copies run).
                unsafe { sys::cuMemHostUnregister(map.as_ptr().add(a) as *mut std::ffi::c_void) };
            }
        }
    }
}

/// MLX affine decode, one thread per output element (grid-stride): `scale · q + bias` with
/// separate f32 multiply and add (no fused multiply-add), exactly as the host decoder does.
/// Scales/biases are f32 (0), f16 (1) or bf16 (2), read from the same staged buffer.
const DEQUANT_SRC: &str = r#"
extern "C" __global__ void mlx_dequant(
const unsigned char* buf, unsigned long long q_off, unsigned long long s_off,
unsigned long long b_off, unsigned int scale_kind, float* out,
unsigned long long out_off, unsigned long long n, unsigned int bits, unsigned int group) {
unsigned int per_byte = 8u / bits;
unsigned int mask = (1u << bits) - 1u;
for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
     i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
    unsigned int byte = buf[q_off + i / per_byte];
    float q = (float)((byte >> ((i % per_byte) * bits)) & mask);
    unsigned long long g = i / group;
    float s = scale_at(buf + s_off, scale_kind, g);
    float b = scale_at(buf + b_off, scale_kind, g);
    out[out_off + i] = __fadd_rn(__fmul_rn(s, q), b);
}
}

// y[y_off + r] = sum_c w[r, c] * x[c] for a packed [rows, cols] matrix: one warp per row, each
// weight decoded as in mlx_dequant.
extern "C" __global__ void mlx_gemv(
const unsigned char* buf, unsigned long long q_off, unsigned long long s_off,
unsigned long long b_off, unsigned int scale_kind, const float* x, float* y,
unsigned long long y_off, unsigned int rows, unsigned int cols, unsigned int bits,
unsigned int group) {
unsigned int row = (blockIdx.x * blockDim.x + threadIdx.x) / 32u;
unsigned int lane = threadIdx.x % 32u;
if (row >= rows) return;
unsigned int per_byte = 8u / bits;
unsigned int mask = (1u << bits) - 1u;
unsigned long long groups = cols / group;
const unsigned char* q = buf + q_off + (unsigned long long)row * cols / per_byte;
float acc = 0.0f;
for (unsigned int c = lane; c < cols; c += 32u) {
    unsigned int byte = q[c / per_byte];
    float v = (float)((byte >> ((c % per_byte) * bits)) & mask);
    unsigned long long g = (unsigned long long)row * groups + c / group;
    float w = __fadd_rn(__fmul_rn(scale_at(buf + s_off, scale_kind, g), v),
                        scale_at(buf + b_off, scale_kind, g));
    acc = fmaf(w, x[c], acc);
}
for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
if (lane == 0) y[y_off + row] = acc;
}
"#;

/// The compiled decode and product kernels (NVRTC, once per process).
pub(super) struct Kernels {
    dequant: CudaFunction,
    gemv: CudaFunction,
}

static KERNELS: crate::weights::cuda::KernelSet = crate::weights::cuda::KernelSet::new();

impl Kernels {
    pub(super) fn new(dev: &CudaDevice) -> std::result::Result<Self, String> {
        let f = KERNELS.get(
            dev,
            || format!("{SCALE_SRC}{DEQUANT_SRC}"),
            &["mlx_dequant", "mlx_gemv"],
        )?;
        Ok(Kernels {
            dequant: f[0].clone(),
            gemv: f[1].clone(),
        })
    }
}

fn scale_kind(d: DType) -> Result<u32> {
    match d {
        DType::F32 => Ok(0),
        DType::F16 => Ok(1),
        DType::BF16 => Ok(2),
        other => Err(Error::Input(format!(
            "internal: quantization scales of type {other:?}"
        ))),
    }
}

/// An MLX-quantized expert resident on a CUDA GPU as its checkpoint bytes (packed words,
/// scales, biases: the size the cache budget counts), run by a matrix-vector kernel that
/// decodes each weight as it multiplies.
pub struct DevicePacked {
    pub(super) dev: CudaDevice,
    kernels: Arc<Kernels>,
    pub(super) buf: CudaSlice<u8>,
    /// Offsets in `buf` of gate, up, down (words, scales, biases each).
    pub(super) offs: [u64; 9],
    /// Scale type of gate, up, down (see [`SCALE_SRC`]).
    pub(super) kinds: [u32; 3],
    pub(super) projs: [QuantProj; 3],
    /// Run with the other experts of its token in the fused kernels.
    pub(super) fused: bool,
}

impl std::fmt::Debug for DevicePacked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevicePacked")
            .field("bytes", &self.buf.len())
            .field("projs", &self.projs)
            .finish()
    }
}

impl DevicePacked {
    /// The GPU holding it.
    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    pub(super) fn new(
        dev: CudaDevice,
        kernels: Arc<Kernels>,
        buf: CudaSlice<u8>,
        parts: &[Part],
        projs: [QuantProj; 3],
        fused: bool,
    ) -> Result<Self> {
        let mut offs = [0u64; 9];
        let mut off = 0u64;
        for (o, p) in offs.iter_mut().zip(parts) {
            *o = off;
            off += aligned(p.range.len) as u64;
        }
        let kinds = [
            scale_kind(parts[1].dtype)?,
            scale_kind(parts[4].dtype)?,
            scale_kind(parts[7].dtype)?,
        ];
        Ok(DevicePacked {
            dev,
            kernels,
            buf,
            offs,
            kinds,
            projs,
            fused,
        })
    }

    /// SwiGLU on `x` `[1, H]` (f32, this device): `down(silu(gate x) · up x)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let i = self.projs[0].rows;
        let h = self.projs[2].rows;
        let x = x.contiguous()?;
        // SAFETY (both allocations): every element is written by the kernel before use.
        let mut gu: CudaSlice<f32> =
            unsafe { self.dev.cuda_stream().alloc(2 * i) }.map_err(|e| driver("allocation", e))?;
        self.gemv(&x, 0, &mut gu, 0)?;
        self.gemv(&x, 1, &mut gu, i as u64)?;
        let gu = self.wrap(gu, (1, 2 * i));
        let act =
            (candle_nn::ops::silu(&gu.narrow(1, 0, i)?)? * gu.narrow(1, i, i)?)?.contiguous()?;
        let mut y: CudaSlice<f32> =
            unsafe { self.dev.cuda_stream().alloc(h) }.map_err(|e| driver("allocation", e))?;
        self.gemv(&act, 2, &mut y, 0)?;
        Ok(self.wrap(y, (1, h)))
    }

    pub(super) fn wrap(&self, s: CudaSlice<f32>, shape: (usize, usize)) -> Tensor {
        crate::weights::cuda::wrap(&self.dev, s, shape)
    }

    fn gemv(&self, x: &Tensor, p: usize, y: &mut CudaSlice<f32>, y_off: u64) -> Result<()> {
        let q = &self.projs[p];
        let (st, layout) = x.storage_and_layout();
        let Storage::Cuda(cs) = &*st else {
            return Err(Error::Input(
                "internal: expert input is not on the GPU".into(),
            ));
        };
        let xs = cs.as_cuda_slice::<f32>()?;
        let xv = xs.slice(layout.start_offset()..layout.start_offset() + q.cols);
        let (qo, so, bo) = (self.offs[3 * p], self.offs[3 * p + 1], self.offs[3 * p + 2]);
        let (rows, cols) = (q.rows as u32, q.cols as u32);
        let (bits, group) = (q.params.bits as u32, q.params.group_size as u32);
        let stream = self.dev.cuda_stream();
        let mut b = stream.launch_builder(&self.kernels.gemv);
        b.arg(&self.buf)
            .arg(&qo)
            .arg(&so)
            .arg(&bo)
            .arg(&self.kinds[p])
            .arg(&xv)
            .arg(y)
            .arg(&y_off)
            .arg(&rows)
            .arg(&cols)
            .arg(&bits)
            .arg(&group);
        let cfg = LaunchConfig {
            grid_dim: ((rows * 32).div_ceil(128), 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: reads one packed row per warp, its scales and biases inside `buf`, `cols`
        // inputs of `x`, and writes `rows` outputs at `y_off` inside `y` (allocated for them).
        unsafe { b.launch(cfg) }.map_err(|e| driver("matrix-vector kernel", e))?;
        Ok(())
    }
}

/// A copy stream and the pinned buffer it copies from.
pub(super) struct Lane {
    stream: Arc<CudaStream>,
    buf: PinnedHostSlice<u8>,
    /// Device copy of the bytes an f32-decoded upload brings over, reused by every such upload
    /// of this lane (each waits for its decode before the lane is reused); made at first use
    /// (packed experts are copied into buffers of their own).
    dev_buf: Option<CudaSlice<u8>>,
}

impl Lane {
    pub(super) fn new(dev: &CudaDevice, bytes: usize, write_combined: bool) -> Result<Self> {
        let ctx = dev.cuda_stream().context().clone();
        let stream = ctx.new_stream().map_err(|e| driver("stream", e))?;
        let flags = if write_combined {
            sys::CU_MEMHOSTALLOC_WRITECOMBINED
        } else {
            0
        };
        // SAFETY: the buffer is only read after `fill` has written the bytes it copies.
        let buf = unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes.max(1), flags) }
            .map_err(|e| driver(&format!("pinned allocation of {bytes} bytes"), e))?;
        Ok(Lane {
            stream,
            buf,
            dev_buf: None,
        })
    }

    pub(super) fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Reads every part into the staging buffer (waiting first for this lane's last copy).
    pub(super) fn fill(
        &mut self,
        parts: &[Part],
        read: &(dyn Fn(&ByteRange, &mut [u8]) -> Result<()> + Sync),
        threads: usize,
    ) -> Result<()> {
        let host = self
            .buf
            .as_mut_slice()
            .map_err(|e| driver("staging buffer", e))?;
        // Cut the expert into pieces of at most PIECE bytes and read them on a few scoped
        // threads: one thread copying from the page cache reaches a fraction of what the
        // link takes.
        let mut pieces: Vec<(ByteRange, &mut [u8])> = Vec::new();
        let mut rest: &mut [u8] = host;
        for p in parts {
            let (mine, tail) = rest.split_at_mut(aligned(p.range.len));
            rest = tail;
            let mut buf = &mut mine[..p.range.len as usize];
            let mut r = p.range;
            while r.len > 0 {
                let n = r.len.min(PIECE as u64);
                let (head, tail) = buf.split_at_mut(n as usize);
                pieces.push((ByteRange { len: n, ..r }, head));
                buf = tail;
                r = ByteRange {
                    offset: r.offset + n,
                    len: r.len - n,
                    ..r
                };
            }
        }
        let threads = threads.min(pieces.len()).max(1);
        let per = pieces.len().div_ceil(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = pieces
                .chunks_mut(per)
                .map(|chunk| {
                    s.spawn(move || -> Result<()> {
                        for (r, b) in chunk.iter_mut() {
                            read(r, b)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("reader thread panicked"))
        })
    }

    /// The host bytes of each part as `fill` staged them in this lane's buffer, or (`whole`) all
    /// of them as one source, their aligned layout included.
    pub(super) fn staged(&self, parts: &[Part], whole: bool) -> Result<Vec<Src>> {
        let base = self.buf.as_ptr().map_err(|e| driver("staging buffer", e))?;
        if whole {
            let len = parts.iter().map(|p| aligned(p.range.len)).sum();
            return Ok(vec![Src {
                ptr: base,
                len,
                dev: 0,
            }]);
        }
        let mut off = 0;
        Ok(parts
            .iter()
            .map(|p| {
                // SAFETY: inside the staging buffer (`fill` laid the parts out this way).
                let ptr = unsafe { base.add(off) };
                off += aligned(p.range.len);
                Src {
                    ptr,
                    len: p.range.len as usize,
                    dev: 0,
                }
            })
            .collect())
    }

    /// Copies every part from `srcs` (one per part) to a fresh device buffer on this lane's
    /// stream, waits for the copies, and wraps the buffers as tensors of `dev`.
    pub(super) fn copy(
        &self,
        dev: &CudaDevice,
        parts: &[Part],
        srcs: &[Src],
    ) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(parts.len());
        for (p, src) in parts.iter().zip(srcs) {
            // SAFETY: `src` is staged or registered host memory holding the part's bytes,
            // aligned for any element type, alive until the copies are waited for below.
            let host = src.ptr;
            let t = match p.dtype {
                DType::U8 => self.one::<u8>(dev, host, p)?,
                DType::BF16 => self.one::<half::bf16>(dev, host, p)?,
                DType::F16 => self.one::<half::f16>(dev, host, p)?,
                DType::F32 => self.one::<f32>(dev, host, p)?,
                other => {
                    return Err(Error::Input(format!(
                        "internal: no upload path for {other:?}"
                    )))
                }
            };
            out.push(t);
        }
        self.stream
            .synchronize()
            .map_err(|e| driver("copy stream", e))?;
        Ok(out)
    }

    /// A device buffer of its own for `srcs` laid out as [`Lane::copy_in`] lays them, nothing
    /// copied in: the copies' destinations, one per source. The allocation is complete when
    /// this returns, so any stream may write it.
    pub(super) fn alloc_for(&mut self, srcs: &[Src]) -> Result<(CudaSlice<u8>, Vec<u64>)> {
        let total: usize = srcs.iter().map(|s| aligned(s.len as u64)).sum();
        // SAFETY: every byte a kernel reads is written by the copies the caller hands on.
        let buf = unsafe { self.stream.alloc::<u8>(total) }.map_err(|e| driver("allocation", e))?;
        self.stream
            .synchronize()
            .map_err(|e| driver("copy stream", e))?;
        let (base, guard) = buf.device_ptr(&self.stream);
        let mut off = 0u64;
        let dsts = srcs
            .iter()
            .map(|s| {
                let d = base + off;
                off += aligned(s.len as u64) as u64;
                d
            })
            .collect();
        drop(guard);
        Ok((buf, dsts))
    }

    /// Copies `srcs` to consecutive 256-byte-aligned offsets (the staging layout: the whole
    /// staged expert as one source, or each part from a registered mapping) of a device buffer
    /// of their own (`own`, returned: a resident packed expert) or of the lane's reusable
    /// device buffer, waits, and returns the copies' GPU time (ms, CUDA events).
    pub(super) fn copy_in(
        &mut self,
        srcs: &[Src],
        own: bool,
    ) -> Result<(Option<CudaSlice<u8>>, Option<f32>)> {
        let total: usize = srcs.iter().map(|s| aligned(s.len as u64)).sum();
        let timed = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut fresh = if own {
            // SAFETY: fully written by the copy.
            Some(unsafe { self.stream.alloc::<u8>(total) }.map_err(|e| driver("allocation", e))?)
        } else {
            None
        };
        if !own && self.dev_buf.as_ref().is_none_or(|b| b.len() < total) {
            // SAFETY: only the bytes each upload copies in are ever read.
            self.dev_buf = Some(
                unsafe { self.stream.alloc::<u8>(total) }.map_err(|e| driver("allocation", e))?,
            );
        }
        let start = self
            .stream
            .record_event(timed)
            .map_err(|e| driver("event", e))?;
        let mut off = 0;
        for s in srcs {
            // SAFETY: staged or registered host bytes, alive until the copies are waited for
            // below.
            let src = unsafe { std::slice::from_raw_parts(s.ptr, s.len) };
            let mut dst = match fresh.as_mut() {
                Some(f) => f.slice_mut(off..off + s.len),
                None => self
                    .dev_buf
                    .as_mut()
                    .expect("made above")
                    .slice_mut(off..off + s.len),
            };
            self.stream
                .memcpy_htod(src, &mut dst)
                .map_err(|e| driver("host→device copy", e))?;
            off += aligned(s.len as u64);
        }
        let end = self
            .stream
            .record_event(timed)
            .map_err(|e| driver("event", e))?;
        self.stream
            .synchronize()
            .map_err(|e| driver("copy stream", e))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| driver("event timing", e))?;
        Ok((fresh, Some(ms)))
    }

    /// Decodes the three quantized projections held in `buf` (laid out as `fill` staged
    /// them) into f32 gate/up `[2I, H]` and down `[H, I]` tensors of `dev`.
    pub(super) fn decode(
        &self,
        dev: &CudaDevice,
        k: &Kernels,
        parts: &[Part],
        projs: &[QuantProj; 3],
    ) -> Result<(Tensor, Tensor)> {
        let dev_buf = self
            .dev_buf
            .as_ref()
            .ok_or_else(|| Error::Input("internal: decode before the copy".into()))?;
        let mut offs = Vec::with_capacity(parts.len());
        let mut off = 0u64;
        for p in parts {
            offs.push(off);
            off += aligned(p.range.len) as u64;
        }
        let [g, u, d] = projs;
        // SAFETY: every element is written by the decode kernels below.
        let mut gate_up: CudaSlice<f32> = unsafe { self.stream.alloc(2 * g.rows * g.cols) }
            .map_err(|e| driver("allocation", e))?;
        let mut down: CudaSlice<f32> =
            unsafe { self.stream.alloc(d.rows * d.cols) }.map_err(|e| driver("allocation", e))?;
        debug_assert_eq!((g.rows, g.cols), (u.rows, u.cols));
        for (i, q) in projs.iter().enumerate() {
            let sd = match parts[3 * i + 1].dtype {
                DType::F32 => 0u32,
                DType::F16 => 1,
                DType::BF16 => 2,
                other => {
                    return Err(Error::Input(format!(
                        "internal: quantization scales of type {other:?}"
                    )))
                }
            };
            let n = (q.rows * q.cols) as u64;
            let (out, out_off) = match i {
                0 => (&mut gate_up, 0u64),
                1 => (&mut gate_up, n),
                _ => (&mut down, 0u64),
            };
            let (qo, so, bo) = (offs[3 * i], offs[3 * i + 1], offs[3 * i + 2]);
            let (bits, group) = (q.params.bits as u32, q.params.group_size as u32);
            let mut b = self.stream.launch_builder(&k.dequant);
            b.arg(dev_buf)
                .arg(&qo)
                .arg(&so)
                .arg(&bo)
                .arg(&sd)
                .arg(out)
                .arg(&out_off)
                .arg(&n)
                .arg(&bits)
                .arg(&group);
            let cfg = LaunchConfig::for_num_elems(n.min(1 << 20) as u32);
            // SAFETY: the kernel reads `n·bits/8` bytes at `qo` and `n/group` scales and
            // biases at `so`/`bo` inside `buf` (sizes validated when the store was built),
            // and writes `n` floats at `out_off` inside `out`.
            unsafe { b.launch(cfg) }.map_err(|e| driver("decode kernel", e))?;
        }
        self.stream
            .synchronize()
            .map_err(|e| driver("decode stream", e))?;
        let wrap = |s: CudaSlice<f32>, shape: (usize, usize)| {
            Tensor::from_storage(
                Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())),
                shape,
                BackpropOp::none(),
                false,
            )
        };
        Ok((
            wrap(gate_up, (2 * g.rows, g.cols)),
            wrap(down, (d.rows, d.cols)),
        ))
    }

    fn one<T: DeviceRepr + CudaDType>(
        &self,
        dev: &CudaDevice,
        host: *const u8,
        p: &Part,
    ) -> Result<Tensor> {
        let n = p.range.len as usize / std::mem::size_of::<T>();
        // SAFETY: see `copy`; the bytes are plain data of type T.
        let src = unsafe { std::slice::from_raw_parts(host as *const T, n) };
        // SAFETY: every element is written by the copy before any kernel reads it (the lane
        // stream is synchronized before the tensor is handed out).
        let mut dst: CudaSlice<T> =
            unsafe { self.stream.alloc::<T>(n) }.map_err(|e| driver("allocation", e))?;
        self.stream
            .memcpy_htod(src, &mut dst)
            .map_err(|e| driver("host→device copy", e))?;
        let storage = CudaStorage::wrap_cuda_slice(dst, dev.clone());
        debug_assert_eq!(storage.dtype(), p.dtype);
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            p.shape,
            BackpropOp::none(),
            false,
        ))
    }
}
