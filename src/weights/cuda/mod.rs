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

use candle_core::cuda_backend::cudarc::driver::CudaFunction;
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
            let funcs = names
                .iter()
                .map(|n| module.load_function(n).map_err(|e| format!("{n}: {e}")))
                .collect::<std::result::Result<Vec<_>, _>>()?;
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

/// A scale or bias of kind `kind` (f32 0, f16 1, bf16 2) as f32, exactly.
pub const SCALE_SRC: &str = r#"
__device__ float scale_at(const unsigned char* p, unsigned int kind, unsigned long long i) {
if (kind == 0) return ((const float*)p)[i];
unsigned int h = ((const unsigned short*)p)[i];
if (kind == 2) return __uint_as_float(h << 16);
unsigned int sign = h >> 15, e = (h >> 10) & 31u, m = h & 1023u;
float v;
if (e == 0) v = ldexpf((float)m, -24);
else if (e == 31) v = m ? __int_as_float(0x7fc00000) : __int_as_float(0x7f800000);
else v = ldexpf((float)(m | 1024u), (int)e - 25);
return sign ? -v : v;
}
"#;

/// `row_dot`: row `row` of a packed `[rows, cols]` matrix times `x`, summed over a warp (valid
/// on lane 0); `dot` dispatches on the bit width (2, 4 or 8; a word never straddles a group,
/// which the host checks: `group % (32 / bits) == 0`, `cols % group == 0`). `x` sits in shared
/// memory, element `i` at `pad(i)` (one spare slot per 32), so the lanes of a warp, each
/// reading its own run of columns, hit distinct banks; `load_x` fills it.
pub const ROW_DOT_SRC: &str = r#"
__device__ __forceinline__ unsigned int pad(unsigned int i) { return i + (i >> 5); }

// The block copies x[0..n) into shared memory (padded); the caller synchronizes.
__device__ void load_x(float* xs, const float* x, unsigned int n) {
for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) xs[pad(i)] = x[i];
}

template <int BITS>
__device__ __forceinline__ void chunk(unsigned int word, const float* xs, unsigned int c,
                                      float& qx, float& xsum) {
const unsigned int PW = 32u / BITS, mask = (1u << BITS) - 1u;
#pragma unroll
for (unsigned int j = 0; j < PW; ++j) {
    float xv = xs[pad(c + j)];
    qx = fmaf((float)((word >> (j * BITS)) & mask), xv, qx);
    xsum += xv;
}
}

template <int BITS>
__device__ float row_dot(const unsigned char* buf, unsigned long long q_off,
                         unsigned long long s_off, unsigned long long b_off, unsigned int kind,
                         const float* xs, unsigned int row, unsigned int cols,
                         unsigned int group, unsigned int lane) {
const unsigned int PW = 32u / BITS;
unsigned int words = cols / PW;
const unsigned int* q = (const unsigned int*)(buf + q_off) + (unsigned long long)row * words;
unsigned long long g0 = (unsigned long long)row * (cols / group);
float acc = 0.0f;
if (words % 4u == 0u && group % (4u * PW) == 0u) {
    for (unsigned int w = lane * 4u; w < words; w += 128u) {
        uint4 v = *(const uint4*)(q + w);
        unsigned int c0 = w * PW;
        unsigned long long g = g0 + c0 / group;
        float qx = 0.0f, xsum = 0.0f;
        chunk<BITS>(v.x, xs, c0, qx, xsum);
        chunk<BITS>(v.y, xs, c0 + PW, qx, xsum);
        chunk<BITS>(v.z, xs, c0 + 2u * PW, qx, xsum);
        chunk<BITS>(v.w, xs, c0 + 3u * PW, qx, xsum);
        acc = fmaf(scale_at(buf + s_off, kind, g), qx, acc);
        acc = fmaf(scale_at(buf + b_off, kind, g), xsum, acc);
    }
} else {
    for (unsigned int w = lane; w < words; w += 32u) {
        unsigned int c0 = w * PW;
        unsigned long long g = g0 + c0 / group;
        float qx = 0.0f, xsum = 0.0f;
        chunk<BITS>(q[w], xs, c0, qx, xsum);
        acc = fmaf(scale_at(buf + s_off, kind, g), qx, acc);
        acc = fmaf(scale_at(buf + b_off, kind, g), xsum, acc);
    }
}
for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
return acc;
}

__device__ float dot(unsigned int bits, const unsigned char* buf, unsigned long long q_off,
                     unsigned long long s_off, unsigned long long b_off, unsigned int kind,
                     const float* xs, unsigned int row, unsigned int cols, unsigned int group,
                     unsigned int lane) {
if (bits == 4) return row_dot<4>(buf, q_off, s_off, b_off, kind, xs, row, cols, group, lane);
if (bits == 8) return row_dot<8>(buf, q_off, s_off, b_off, kind, xs, row, cols, group, lane);
return row_dot<2>(buf, q_off, s_off, b_off, kind, xs, row, cols, group, lane);
}
"#;

/// Shared memory the padded input of `cols` values takes (bytes).
pub fn x_bytes(cols: usize) -> usize {
    4 * (cols + cols / 32 + 1)
}

/// Most shared memory a block gets without opting in (48 KiB).
pub const SHARED_MAX: usize = 48 * 1024;

/// Blocks of the row kernels: enough to fill the GPU, each a grid-stride loop over rows, so
/// the input is copied to shared memory once per block rather than once per 8 rows.
pub fn row_blocks(rows: usize) -> u32 {
    rows.div_ceil(8).clamp(1, 1024) as u32
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
