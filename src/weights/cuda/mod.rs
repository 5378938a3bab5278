//! CUDA kernels over MLX-quantized matrices kept packed in GPU memory (their checkpoint bytes:
//! 4-bit words, scales, biases), shared by the dense weights ([`DeviceMatrix`]) and the
//! routed experts (`experts::upload`).
//!
//! Products use MLX's affine groups as `s·Σq·x + b·Σx` per chunk of a group (as the CPU's exact
//! kernel does), one warp per output row, each lane reading four 32-bit words (one 16-byte load)
//! at a time where the row allows it.

mod matrix;

pub use matrix::DeviceMatrix;

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaStream};
use candle_core::cuda_backend::DeviceId;
use candle_core::CudaDevice;

/// Kernels compiled with NVRTC once per process, for the first CUDA device that asks (a
/// process drives one GPU; a second device gets an error, never another device's module).
pub struct KernelSet(OnceLock<std::result::Result<(DeviceId, Vec<CudaFunction>), String>>);

impl Default for KernelSet {
    fn default() -> Self {
        Self::new()
    }
}

impl KernelSet {
    /// An empty set (for a `static`).
    pub const fn new() -> Self {
        KernelSet(OnceLock::new())
    }

    /// The functions `names` of the module compiled from `src()` for `dev`, in order; the
    /// compile error (the same each call) where NVRTC or the module load failed.
    pub fn get(
        &self,
        dev: &CudaDevice,
        src: impl FnOnce() -> String,
        names: &[&str],
    ) -> std::result::Result<&[CudaFunction], String> {
        let compiled = self.0.get_or_init(|| {
            use candle_core::cuda_backend::cudarc::nvrtc;
            let ptx = nvrtc::compile_ptx(src()).map_err(|e| format!("NVRTC: {e}"))?;
            let module = dev
                .cuda_stream()
                .context()
                .load_module(ptx)
                .map_err(|e| format!("module load: {e}"))?;
            use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum as Attr;
            let funcs = names
                .iter()
                .map(|n| {
                    let f = module.load_function(n).map_err(|e| format!("{n}: {e}"))?;
                    f.set_attribute(
                        Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        SHARED_MAX as i32,
                    )
                    .map_err(|e| format!("{n}: {SHARED_MAX} bytes of shared memory: {e}"))?;
                    Ok(f)
                })
                .collect::<std::result::Result<Vec<_>, String>>()?;
            Ok((dev.id(), funcs))
        });
        match compiled {
            Ok((id, f)) if *id == dev.id() => Ok(f),
            Ok(_) => Err("compiled for another CUDA device of this process".into()),
            Err(e) => Err(e.clone()),
        }
    }

    /// As [`KernelSet::get`] for kernels with a slower fallback: `None` on failure, said once
    /// per process on stderr as "`what` unavailable (reason); `fallback`".
    pub fn get_or_warn(
        &self,
        dev: &CudaDevice,
        src: impl FnOnce() -> String,
        names: &[&str],
        warned: &'static std::sync::Once,
        what: &str,
        fallback: &str,
    ) -> Option<&[CudaFunction]> {
        self.get(dev, src, names)
            .inspect_err(|e| {
                warned.call_once(|| eprintln!("warning: {what} unavailable ({e}); {fallback}"))
            })
            .ok()
    }
}

/// The error of a failed CUDA driver call or launch, naming what failed.
pub fn driver(what: &str, e: impl std::fmt::Display) -> crate::error::Error {
    crate::error::Error::Input(format!("CUDA {what}: {e}"))
}

/// A new f32 tensor on `dev` of `shape` from a slice a kernel filled.
pub fn wrap(
    dev: &CudaDevice,
    s: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
    shape: impl Into<candle_core::Shape>,
) -> candle_core::Tensor {
    use candle_core::cuda_backend::CudaDType;
    candle_core::Tensor::from_storage(
        candle_core::Storage::Cuda(f32::wrap_cuda_slice(s, dev.clone())),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    )
}

/// A scale or bias of kind `kind` (f32 0, f16 1, bf16 2) as f32, exactly; `scale_bits` /
/// `scale_of` split it into the load and the conversion (so loads can be issued early).
pub const SCALE_SRC: &str = r#"
__device__ __forceinline__ unsigned int scale_bits(const unsigned char* p, unsigned int kind,
                                                   unsigned long long i) {
return kind == 0 ? ((const unsigned int*)p)[i] : (unsigned int)((const unsigned short*)p)[i];
}
__device__ __forceinline__ float scale_of(unsigned int h, unsigned int kind) {
if (kind == 0) return __uint_as_float(h);
if (kind == 2) return __uint_as_float(h << 16);
#ifdef __CUDA_ARCH__
// f16 → f32 is exact: one conversion instruction.
float f;
asm("{ .reg .b16 t; cvt.u16.u32 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "r"(h));
return f;
#endif
unsigned int sign = h >> 15, e = (h >> 10) & 31u, m = h & 1023u;
float v;
if (e == 0) v = ldexpf((float)m, -24);
else if (e == 31) v = m ? __int_as_float(0x7fc00000) : __int_as_float(0x7f800000);
else v = ldexpf((float)(m | 1024u), (int)e - 25);
return sign ? -v : v;
}
__device__ float scale_at(const unsigned char* p, unsigned int kind, unsigned long long i) {
return scale_of(scale_bits(p, kind, i), kind);
}
"#;

/// `row_dot`: row `row` of a packed `[rows, cols]` matrix `m` (its words', scales' and biases'
/// device addresses, [`Packed`]) times `x`, summed over a warp (valid
/// on lane 0); `dot` dispatches on the bit width (2, 4 or 8; a word never straddles a group,
/// which the host checks: `group % (32 / bits) == 0`, `cols % group == 0`). `x` sits in shared
/// memory, element `i` at `pad(i)` (four spare slots per 32: runs of four stay aligned for one
/// vector load), so the lanes of a warp, each
/// reading its own run of columns, hit distinct banks; `load_x` fills it.
pub const ROW_DOT_SRC: &str = r#"
// A packed matrix in device memory: the addresses of its words, scales and biases.
struct Packed { unsigned long long q, s, b; };

// Four spare slots per 32 keep every run of 4 aligned to 16 bytes (one vector load) and put
// the runs of neighbouring lanes (32 values apart) in distinct banks.
__device__ __forceinline__ unsigned int pad(unsigned int i) { return i + (i >> 5) * 4u; }

// Stores x[4i..4i + 4) (`v`, real where `ok`) and, from the eight lanes holding one run of 32
// values, the run's sum in the run's first spare slot (`run_sum`). Every lane of the warp calls
// it (the sums are shuffled); runs are whole where n % 32 == 0, which the callers check. The
// callers' loops give every thread of the block the same trip count.
__device__ __forceinline__ void put4(float* xs, unsigned int i, float4 v, bool ok) {
if (ok) *(float4*)(xs + pad(4u * i)) = v;
float s = (v.x + v.y) + (v.z + v.w);
s += __shfl_xor_sync(0xffffffffu, s, 1);
s += __shfl_xor_sync(0xffffffffu, s, 2);
s += __shfl_xor_sync(0xffffffffu, s, 4);
if (ok && (i & 7u) == 0u) xs[pad(4u * i) + 32u] = s;
}

// The sum of run `c / 32` of the padded x (c a multiple of 32), stored by `put4`.
__device__ __forceinline__ float run_sum(const float* xs, unsigned int c) {
return xs[pad(c) + 32u];
}

// The block copies x[0..n) into shared memory (padded), with the sum of every run of 32 when
// n % 32 == 0; the caller synchronizes. Inputs go four values per load where aligned, several
// loads in flight per thread (the copy is a chain of global-memory latencies otherwise, longer
// than the row products after it).
__device__ void load_x(float* xs, const float* x, unsigned int n) {
if (n % 32u == 0u) {
    bool al = ((unsigned long long)x & 15ull) == 0ull;
    unsigned int n4 = n / 4u;
    // Four loads issued before the first store (the sums' shuffles would wait on each); the
    // same trip count for every thread of the block.
    for (unsigned int base = 0; base < n4; base += 4u * blockDim.x) {
        float4 v[4];
#pragma unroll
        for (unsigned int u = 0; u < 4u; ++u) {
            unsigned int i = base + u * blockDim.x + threadIdx.x;
            v[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (i < n4) v[u] = al ? ((const float4*)x)[i]
                                  : make_float4(x[4u * i], x[4u * i + 1u], x[4u * i + 2u],
                                                x[4u * i + 3u]);
        }
#pragma unroll
        for (unsigned int u = 0; u < 4u; ++u) {
            unsigned int i = base + u * blockDim.x + threadIdx.x;
            put4(xs, i, v[u], i < n4);
        }
    }
} else {
    for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) xs[pad(i)] = x[i];
}
}

// 0x4B000000 (the bits of 2^23), read from constant memory so that the compiler keeps it in a
// register (as an immediate it takes a second logic op per value: one immediate per LOP3).
__constant__ unsigned int MAGIC = 0x4B000000u;
__device__ __forceinline__ unsigned int magic_reg() { return MAGIC; }

// The integer in the low 23 bits of `m` (masked in place, so a multiple of a power of two) as a
// float without a conversion instruction (a quarter-rate I2F on recent GPUs): 2^23 + m has m as
// its mantissa, and subtracting 2^23 is exact. `magic` is 0x4B000000 in a register, so that the
// mask and the OR are one LOP3.
__device__ __forceinline__ float mant(unsigned int w, unsigned int mask, unsigned int magic) {
return __uint_as_float((w & mask) | magic) - 8388608.0f;
}

// Σ q·x over the 32 4-bit values of each of `v[0..N)` against x[c..c + 32) (one padded run,
// read once for the N words): each nibble is masked where it lies, so its float is q·16^j
// (nibbles 0..4 of a word at j = 0..4, nibbles 5..7 at j = 0..2 after one shift), summed per j
// and the five sums scaled back by 16^-j (exact): three instructions a value instead of a
// shift, two logic ops and two adds.
template <int N>
__device__ __forceinline__ void qx4(const uint4* v, const float* xs, unsigned int c,
                                    unsigned int magic, float* out) {
const float4* x4 = (const float4*)(xs + pad(c));
float a[N][5];
#pragma unroll
for (int n = 0; n < N; ++n)
#pragma unroll
    for (int j = 0; j < 5; ++j) a[n][j] = 0.0f;
#pragma unroll
for (unsigned int j = 0; j < 4u; ++j) {
    float4 p = x4[2u * j], q = x4[2u * j + 1u];
#pragma unroll
    for (int n = 0; n < N; ++n) {
        unsigned int lo = j == 0 ? v[n].x : j == 1 ? v[n].y : j == 2 ? v[n].z : v[n].w;
        unsigned int hi = lo >> 20;
        a[n][0] = fmaf(mant(lo, 0xFu, magic), p.x, a[n][0]);
        a[n][1] = fmaf(mant(lo, 0xF0u, magic), p.y, a[n][1]);
        a[n][2] = fmaf(mant(lo, 0xF00u, magic), p.z, a[n][2]);
        a[n][3] = fmaf(mant(lo, 0xF000u, magic), p.w, a[n][3]);
        a[n][4] = fmaf(mant(lo, 0xF0000u, magic), q.x, a[n][4]);
        a[n][0] = fmaf(mant(hi, 0xFu, magic), q.y, a[n][0]);
        a[n][1] = fmaf(mant(hi, 0xF0u, magic), q.z, a[n][1]);
        a[n][2] = fmaf(mant(hi, 0xF00u, magic), q.w, a[n][2]);
    }
}
#pragma unroll
for (int n = 0; n < N; ++n)
    out[n] = fmaf(a[n][4], 1.0f / 65536.0f, fmaf(a[n][3], 1.0f / 4096.0f,
             fmaf(a[n][2], 1.0f / 256.0f, fmaf(a[n][1], 1.0f / 16.0f, a[n][0]))));
}

// Whether the 4-bit run kernels (`qx4`, `rows_dot4`) take a matrix of `bits`, `cols` and
// `group` (whole runs of 32 in whole groups of a power of two, MLX's 32, 64 and 128, so that a
// run's group is a shift away; the input was loaded by `load_x`).
__device__ __forceinline__ bool fast4(unsigned int bits, unsigned int cols, unsigned int group) {
return bits == 4u && cols % 32u == 0u && group % 32u == 0u && (group & (group - 1u)) == 0u;
}

// Row `row` of each of the N 4-bit matrices m[0..N) (one shape, scale kinds kind[n]) times x,
// in one pass, so the N rows' loads are in flight together and x is read once; summed over the
// warp into out[n] (valid on lane 0). Per row, the same arithmetic for any N and U. Each lane
// issues the loads of U runs (16 bytes of words, a scale and a bias each) before the
// arithmetic on them: the compiler hoists neither by itself, and every load left in the chain
// adds a memory latency per row.
// W < 32 lanes a row (a power of two; `lane` < W, the row's lanes aligned in the warp) serve
// short rows: the warp then holds 32 / W rows, and every lane of it must call.
template <int N, int U, int W = 32>
__device__ __forceinline__ void rows_dot4(const Packed* m, const unsigned int* kind,
                                          const float* xs, unsigned int row, unsigned int cols,
                                          unsigned int group, unsigned int lane, float* out) {
// Runs (16 bytes of words, 32 values) of the row; a run's group is run >> rsh.
unsigned int runs = cols / 32u, rsh = __ffs(group) - 1u - 5u, magic = magic_reg();
unsigned long long g0 = (unsigned long long)row * (cols >> (rsh + 5u));
const uint4* q[N];
#pragma unroll
for (int n = 0; n < N; ++n) q[n] = (const uint4*)m[n].q + (unsigned long long)row * runs;
float acc[N];
#pragma unroll
for (int n = 0; n < N; ++n) acc[n] = 0.0f;
for (unsigned int r0 = lane; r0 < runs; r0 += W * U) {
    uint4 v[U][N];
    unsigned int sb[U][N], bb[U][N];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        // Past the row's end the last run is read again (no branch around the loads) and not
        // summed below.
        unsigned int r = min(r0 + W * u, runs - 1u);
        unsigned long long g = g0 + (r >> rsh);
#pragma unroll
        for (int n = 0; n < N; ++n) {
            v[u][n] = q[n][r];
            sb[u][n] = scale_bits((const unsigned char*)m[n].s, kind[n], g);
            bb[u][n] = scale_bits((const unsigned char*)m[n].b, kind[n], g);
        }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
        unsigned int r = r0 + W * u;
        if (r >= runs) break;
        unsigned int c0 = r * 32u;
        float qx[N], xsum = run_sum(xs, c0);
        qx4<N>(v[u], xs, c0, magic, qx);
#pragma unroll
        for (int n = 0; n < N; ++n) {
            acc[n] = fmaf(scale_of(sb[u][n], kind[n]), qx[n], acc[n]);
            acc[n] = fmaf(scale_of(bb[u][n], kind[n]), xsum, acc[n]);
        }
    }
}
for (int o = W / 2; o > 0; o >>= 1)
#pragma unroll
    for (int n = 0; n < N; ++n) acc[n] += __shfl_down_sync(0xffffffffu, acc[n], o, W);
#pragma unroll
for (int n = 0; n < N; ++n) out[n] = acc[n];
}

// The PW = 32 / BITS values of one word against x[c..c + PW) (c a multiple of PW, so the run
// sits inside one padded block of 32 and is read as PW / 4 vector loads).
template <int BITS>
__device__ __forceinline__ void chunk(unsigned int word, const float* xs, unsigned int c,
                                      float& qx, float& xsum) {
const unsigned int PW = 32u / BITS, mask = (1u << BITS) - 1u;
const float4* x4 = (const float4*)(xs + pad(c));
#pragma unroll
for (unsigned int j = 0; j < PW / 4u; ++j) {
    float4 v = x4[j];
    float xv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (unsigned int i = 0; i < 4u; ++i) {
        // The integer q as a float without a conversion instruction (a quarter-rate I2F on
        // recent GPUs): 2^23 + q has q as its mantissa, and subtracting 2^23 is exact.
        float q = __uint_as_float(0x4B000000u | ((word >> ((4u * j + i) * BITS)) & mask))
                  - 8388608.0f;
        qx = fmaf(q, xv[i], qx);
        xsum += xv[i];
    }
}
}

template <int BITS>
__device__ float row_dot(const Packed m, unsigned int kind, const float* xs, unsigned int row,
                         unsigned int cols, unsigned int group, unsigned int lane) {
const unsigned int PW = 32u / BITS;
unsigned int words = cols / PW;
const unsigned int* q = (const unsigned int*)m.q + (unsigned long long)row * words;
const unsigned char* sp = (const unsigned char*)m.s;
const unsigned char* bp = (const unsigned char*)m.b;
unsigned long long g0 = (unsigned long long)row * (cols / group);
float acc = 0.0f;
if (BITS == 4 && fast4(4u, cols, group)) {
    float out;
    rows_dot4<1, 4>(&m, &kind, xs, row, cols, group, lane, &out);
    return out;
} else if (words % 4u == 0u && group % (4u * PW) == 0u) {
    // Unrolled so that several 16-byte loads of the row are in flight per lane.
#pragma unroll 4
    for (unsigned int w = lane * 4u; w < words; w += 128u) {
        uint4 v = *(const uint4*)(q + w);
        unsigned int c0 = w * PW;
        unsigned long long g = g0 + c0 / group;
        float qx = 0.0f, xsum = 0.0f;
        chunk<BITS>(v.x, xs, c0, qx, xsum);
        chunk<BITS>(v.y, xs, c0 + PW, qx, xsum);
        chunk<BITS>(v.z, xs, c0 + 2u * PW, qx, xsum);
        chunk<BITS>(v.w, xs, c0 + 3u * PW, qx, xsum);
        acc = fmaf(scale_at(sp, kind, g), qx, acc);
        acc = fmaf(scale_at(bp, kind, g), xsum, acc);
    }
} else {
    for (unsigned int w = lane; w < words; w += 32u) {
        unsigned int c0 = w * PW;
        unsigned long long g = g0 + c0 / group;
        float qx = 0.0f, xsum = 0.0f;
        chunk<BITS>(q[w], xs, c0, qx, xsum);
        acc = fmaf(scale_at(sp, kind, g), qx, acc);
        acc = fmaf(scale_at(bp, kind, g), xsum, acc);
    }
}
for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
return acc;
}

__device__ float dot(unsigned int bits, const Packed m, unsigned int kind, const float* xs,
                     unsigned int row, unsigned int cols, unsigned int group, unsigned int lane) {
if (bits == 4) return row_dot<4>(m, kind, xs, row, cols, group, lane);
if (bits == 8) return row_dot<8>(m, kind, xs, row, cols, group, lane);
return row_dot<2>(m, kind, xs, row, cols, group, lane);
}
"#;

/// A packed matrix's words, scales and biases as device addresses (the kernels' `Packed`,
/// passed by value).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Packed {
    /// Address of the 32-bit words.
    pub q: u64,
    /// Address of the scales.
    pub s: u64,
    /// Address of the biases.
    pub b: u64,
}

// SAFETY: plain-old-data with the C layout of the kernels' `Packed`.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for Packed {}

impl Packed {
    /// The addresses at byte offsets `[q, s, b]` of a buffer at `base`.
    pub fn at(base: u64, [q, s, b]: [u64; 3]) -> Self {
        Packed {
            q: base + q,
            s: base + s,
            b: base + b,
        }
    }
}

/// Shared memory the padded input of `cols` values takes (bytes).
pub fn x_bytes(cols: usize) -> usize {
    4 * (cols + cols.div_ceil(32) * 4)
}

/// Most dynamic shared memory a block of these kernels takes (96 KiB, what every GPU since
/// Volta grants a kernel that opts in; [`KernelSet`] opts every kernel in).
pub const SHARED_MAX: usize = 96 * 1024;

/// Blocks of 256 threads for a row kernel `f` (a warp a row in a grid-stride loop, `smem` bytes
/// of shared memory a block) over `rows` rows: at most one row per warp, and at most
/// `HARNESS_ROW_WAVES` (default 1; `row_waves`) times the blocks the GPU holds at once, so that
/// each block copies its input to shared memory once for several rows and no partial last wave
/// of blocks is left waiting.
pub fn row_blocks(f: &CudaFunction, stream: &CudaStream, rows: usize, smem: usize) -> u32 {
    let one_per_warp = rows.div_ceil(8).clamp(1, 1024) as u32;
    let waves = row_waves();
    if waves <= 0.0 {
        return one_per_warp;
    }
    let resident = resident_blocks(f, stream, smem);
    one_per_warp.min(((resident as f64 * waves).ceil() as u32).max(1))
}

/// Waves of resident blocks the row kernels launch ([`row_blocks`]): `HARNESS_ROW_WAVES` (0: one
/// row per warp, the earlier grid), else 1.
fn row_waves() -> f64 {
    static W: OnceLock<f64> = OnceLock::new();
    *W.get_or_init(|| {
        std::env::var("HARNESS_ROW_WAVES")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|w| w.is_finite() && *w >= 0.0)
            .unwrap_or(1.0)
    })
}

/// Blocks of 256 threads of `f` with `smem` bytes of shared memory the whole GPU holds at once
/// (multiprocessors × the occupancy calculator's blocks per multiprocessor), cached per kernel
/// and size (the driver's calculator takes about a microsecond, a launch's budget).
fn resident_blocks(f: &CudaFunction, stream: &CudaStream, smem: usize) -> u32 {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
    type Key = (usize, usize);
    static CACHE: std::sync::Mutex<Vec<(Key, u32)>> = std::sync::Mutex::new(Vec::new());
    let key = (f as *const CudaFunction as usize, smem);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, n)) = cache.iter().find(|(k, _)| *k == key) {
        return *n;
    }
    let sms = stream
        .context()
        .attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .unwrap_or(1)
        .max(1) as u32;
    let per_sm = f
        .occupancy_max_active_blocks_per_multiprocessor(256, smem, None)
        .unwrap_or(1)
        .max(1);
    let n = sms * per_sm;
    cache.push((key, n));
    n
}

/// Whether the packed kernels take a matrix of `cols` columns with `bits` and `group` (its
/// input fitting in a block's shared memory).
pub fn fits(bits: usize, group: usize, cols: usize) -> bool {
    matches!(bits, 2 | 4 | 8)
        && group > 0
        && group.is_multiple_of(32 / bits)
        && cols.is_multiple_of(group)
        && x_bytes(cols) <= SHARED_MAX
}

/// The scale kind of the kernels for a scale dtype.
pub fn scale_kind(d: crate::weights::DType) -> Option<u32> {
    match d {
        crate::weights::DType::F32 => Some(0),
        crate::weights::DType::F16 => Some(1),
        crate::weights::DType::BF16 => Some(2),
        _ => None,
    }
}
