//! The greedy token on CUDA (a child module of [`super`]): the index of the largest logit, chosen
//! on the device so that a decode step returns 4 bytes instead of the vocabulary's logits (620 KB
//! for GLM-4.7-Flash) and the host does not scan them. Same answer as [`super::argmax`]: the first
//! index of the maximum, NaNs never chosen, index 0 when the first logit is NaN.

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use candle_core::{CudaDevice, DType, Device, Storage, Tensor};

use crate::error::{Error, Result};
use crate::weights::cuda::driver;

const SRC: &str = r#"
// Whether candidate (v, i) replaces the best (bv, bi) so far: no best yet (0xffffffff), a larger
// value, or an equal value at a lower index (the host's first maximum).
__device__ __forceinline__ bool better(float v, unsigned int i, float bv, unsigned int bi) {
return i != 0xffffffffu && (bi == 0xffffffffu || v > bv || (v == bv && i < bi));
}

// The block's best (value, index) of its candidates, valid on thread 0.
__device__ void block_best(float& bv, unsigned int& bi) {
__shared__ float sv[32];
__shared__ unsigned int si[32];
for (int o = 16; o > 0; o >>= 1) {
    float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    unsigned int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
}
unsigned int warp = threadIdx.x / 32u, nw = (blockDim.x + 31u) / 32u;
if (threadIdx.x % 32u == 0u) { sv[warp] = bv; si[warp] = bi; }
__syncthreads();
if (threadIdx.x == 0)
    for (unsigned int w = 1; w < nw; ++w)
        if (better(sv[w], si[w], bv, bi)) { bv = sv[w]; bi = si[w]; }
}

// Block b's best non-NaN value of v[0..n) among indices i ≡ b·blockDim + t (mod the grid's
// threads), into pv[b], pi[b] (index 0xffffffff: none).
extern "C" __global__ void argmax_part(const float* v, unsigned int n, float* pv,
                                       unsigned int* pi) {
float bv = 0.0f;
unsigned int bi = 0xffffffffu;
for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    float x = v[i];
    if (x == x && (bi == 0xffffffffu || x > bv)) { bv = x; bi = i; }
}
block_best(bv, bi);
if (threadIdx.x == 0) { pv[blockIdx.x] = bv; pi[blockIdx.x] = bi; }
}

// out[0] = the first index of the maximum of the parts (0 when v[0] is NaN, as the host's scan
// never moves off a NaN first element); one block of at least `parts` threads, warps whole.
// Where `pos` is not null it also advances the step's position by one (the end of a decode
// step captured into a CUDA graph: the next launch embeds out[0] at the next position).
extern "C" __global__ void argmax_final(const float* v, const float* pv, const unsigned int* pi,
                                        unsigned int parts, unsigned int* out, unsigned int* pos) {
float bv = 0.0f;
unsigned int bi = 0xffffffffu;
if (threadIdx.x < parts) { bv = pv[threadIdx.x]; bi = pi[threadIdx.x]; }
block_best(bv, bi);
if (threadIdx.x == 0) {
    float first = v[0];
    out[0] = (first != first || bi == 0xffffffffu) ? 0u : bi;
    if (pos) pos[0] += 1u;
}
}
"#;

/// Threads of a block of `argmax_part`.
const THREADS: u32 = 256;

/// Most blocks of `argmax_part` (each scans a strided share of the logits; `argmax_final`
/// takes their bests in one block of this many threads).
const PARTS: usize = 128;

static KERNELS: crate::weights::cuda::KernelSet = crate::weights::cuda::KernelSet::new();

/// `argmax_part` and `argmax_final` for `dev`; `None` (the host's scan) where they failed to
/// compile, said once, or on a second device.
fn kernels(dev: &CudaDevice) -> Option<&'static [CudaFunction]> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    KERNELS.get_or_warn(
        dev,
        || SRC.to_string(),
        &["argmax_part", "argmax_final"],
        &WARNED,
        "greedy token kernel",
        "logits copied to the host",
    )
}

/// The greedy token of f32 logits `[1, vocab]` on a CUDA device; `None` otherwise.
pub(super) fn greedy_token_cuda(logits: &Tensor) -> Result<Option<u32>> {
    let Device::Cuda(dev) = logits.device() else {
        return Ok(None);
    };
    // SAFETY: written by `argmax_final` before it is read.
    let mut out =
        unsafe { dev.cuda_stream().alloc::<u32>(1) }.map_err(|e| driver("allocation", e))?;
    if !launch(logits, &mut out, None)? {
        return Ok(None);
    }
    let id = dev
        .cuda_stream()
        .clone_dtoh(&out)
        .map_err(|e| driver("greedy token copy", e))?;
    Ok(Some(id[0]))
}

/// Writes the greedy token of f32 logits `[1, vocab]` on a CUDA device into `out[0]` and adds
/// one to `pos[0]`, where the launches run (nothing comes back: the end of a decode step
/// captured into a CUDA graph); `false` where the kernels cannot (not CUDA, not one f32 row,
/// kernels that failed to compile).
pub(crate) fn greedy_token_to(
    logits: &Tensor,
    out: &mut CudaSlice<u32>,
    pos: &mut CudaSlice<u32>,
) -> Result<bool> {
    launch(logits, out, Some(pos))
}

/// Launches the two greedy-token kernels on `logits` into `out[0]` (and `pos[0] += 1` with
/// `pos`); `false` where they cannot run.
fn launch(
    logits: &Tensor,
    out: &mut CudaSlice<u32>,
    pos: Option<&mut CudaSlice<u32>>,
) -> Result<bool> {
    let Device::Cuda(dev) = logits.device() else {
        return Ok(false);
    };
    let (t, n) = logits.dims2()?;
    if t != 1 || logits.dtype() != DType::F32 || n == 0 || n > u32::MAX as usize || out.is_empty() {
        return Ok(false);
    }
    let Some([part, fin]) = kernels(dev) else {
        return Ok(false);
    };
    let logits = logits.contiguous()?;
    let stream = dev.cuda_stream();
    let parts = n.div_ceil(THREADS as usize).min(PARTS);
    // SAFETY (both): every element is written by a kernel before it is read.
    let mut pv = unsafe { stream.alloc::<f32>(parts) }.map_err(|e| driver("allocation", e))?;
    let mut pi = unsafe { stream.alloc::<u32>(parts) }.map_err(|e| driver("allocation", e))?;
    let (s, l) = logits.storage_and_layout();
    let Storage::Cuda(c) = &*s else {
        return Err(Error::Input("internal: logits are not on the GPU".into()));
    };
    let v = c.as_cuda_slice::<f32>()?;
    let v = v.slice(l.start_offset()..l.start_offset() + n);
    let (nu, parts_u) = (n as u32, parts as u32);
    let mut b = stream.launch_builder(part);
    b.arg(&v).arg(&nu).arg(&mut pv).arg(&mut pi);
    let cfg = LaunchConfig {
        grid_dim: (parts_u, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `parts` blocks read v[0..n) (the logits row) and write pv, pi[0..parts).
    unsafe { b.launch(cfg) }.map_err(|e| driver("greedy token kernel", e))?;
    // A null pointer: no position to advance.
    let (pos, _write) = match pos {
        Some(p) => {
            let (ptr, g) = p.device_ptr_mut(&stream);
            (ptr, Some(g))
        }
        None => (0, None),
    };
    let mut b = stream.launch_builder(fin);
    b.arg(&v).arg(&pv).arg(&pi).arg(&parts_u).arg(out).arg(&pos);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (PARTS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: one block reads v[0] and pv, pi[0..parts) (parts <= PARTS threads) and writes
    // out[0] (`out` is not empty) and, with `pos`, pos[0] (a device position of one `u32`).
    unsafe { b.launch(cfg) }.map_err(|e| driver("greedy token kernel", e))?;
    drop(s);
    Ok(true)
}

/// Under `HARNESS_CHECK_GREEDY=1`, a token `t` chosen on the device against the host's argmax
/// of its logits `row`: a difference is an error, an equal one is counted in
/// [`super::GREEDY_CHECKED`].
pub(crate) fn check_device_pick(t: u32, row: &[f32]) -> Result<()> {
    let h = super::argmax(row) as u32;
    if h != t {
        return Err(Error::Input(format!(
            "HARNESS_CHECK_GREEDY: the device chose token {t}, the host's argmax {h}"
        )));
    }
    super::GREEDY_CHECKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}
