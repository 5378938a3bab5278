//! The routed experts of one decode token in two launches (CUDA, packed MLX experts).
//!
//! `moe_gate_up` computes `silu(gate·x) · (up·x)` for every row of every routed expert (one
//! warp per row), `moe_down` every output row of `Σ_e w_e · down_e·act_e` (one warp per row,
//! experts added in router order). Each weight is decoded as it multiplies, `scale·q + bias`
//! with separate roundings as the host decoder and the one-expert kernel do; each lane reads
//! whole 32-bit words, so a warp reads 128 contiguous bytes of a row at a time. The experts'
//! buffers travel to the kernels by value in a table of device addresses (no upload, no
//! allocation beyond the two activation vectors), so the launch count of a token's experts
//! no longer grows with top-k: 2 launches instead of about nine per expert.

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::{CudaDevice, Storage, Tensor};

use super::cuda::{driver, DevicePacked, SCALE_SRC};
use crate::error::{Error, Result};

/// Most experts one fused launch takes (top-k above this runs one expert at a time).
pub const MAX_K: usize = 16;

const FUSED_SRC: &str = r#"
#define MAX_K 16
struct Experts { unsigned long long buf[MAX_K]; float w[MAX_K]; };

// Row `row` of the packed [rows, cols] matrix at buf+q_off, times x, summed over a warp (the
// sum is valid on lane 0). BITS divides 32; a word never straddles a group (host-checked).
template <int BITS>
__device__ float row_dot(const unsigned char* buf, unsigned long long q_off,
                         unsigned long long s_off, unsigned long long b_off, unsigned int kind,
                         const float* x, unsigned int row, unsigned int cols,
                         unsigned int group, unsigned int lane) {
const unsigned int per_word = 32u / BITS;
const unsigned int mask = (1u << BITS) - 1u;
unsigned int words = cols / per_word;
const unsigned int* q = (const unsigned int*)(buf + q_off) + (unsigned long long)row * words;
unsigned long long g0 = (unsigned long long)row * (cols / group);
float acc = 0.0f;
for (unsigned int w = lane; w < words; w += 32u) {
    unsigned int word = q[w];
    unsigned int c0 = w * per_word;
    unsigned long long g = g0 + c0 / group;
    float s = scale_at(buf + s_off, kind, g);
    float b = scale_at(buf + b_off, kind, g);
#pragma unroll
    for (unsigned int j = 0; j < per_word; ++j) {
        float v = (float)((word >> (j * BITS)) & mask);
        acc = fmaf(__fadd_rn(__fmul_rn(s, v), b), x[c0 + j], acc);
    }
}
for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
return acc;
}

__device__ float dot(unsigned int bits, const unsigned char* buf, unsigned long long q_off,
                     unsigned long long s_off, unsigned long long b_off, unsigned int kind,
                     const float* x, unsigned int row, unsigned int cols, unsigned int group,
                     unsigned int lane) {
if (bits == 4) return row_dot<4>(buf, q_off, s_off, b_off, kind, x, row, cols, group, lane);
if (bits == 8) return row_dot<8>(buf, q_off, s_off, b_off, kind, x, row, cols, group, lane);
return row_dot<2>(buf, q_off, s_off, b_off, kind, x, row, cols, group, lane);
}

// act[e * rows + r] = silu(gate_e[r]·x) * (up_e[r]·x) for e < k, r < rows.
extern "C" __global__ void moe_gate_up(
const Experts t, unsigned int k,
unsigned long long g_q, unsigned long long g_s, unsigned long long g_b, unsigned int g_kind,
unsigned long long u_q, unsigned long long u_s, unsigned long long u_b, unsigned int u_kind,
const float* x, float* act, unsigned int rows, unsigned int cols, unsigned int bits,
unsigned int group) {
unsigned int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32u;
unsigned int lane = threadIdx.x % 32u;
if (warp >= k * rows) return;
unsigned int e = warp / rows, r = warp % rows;
const unsigned char* buf = (const unsigned char*)t.buf[e];
float g = dot(bits, buf, g_q, g_s, g_b, g_kind, x, r, cols, group, lane);
float u = dot(bits, buf, u_q, u_s, u_b, u_kind, x, r, cols, group, lane);
if (lane == 0) act[warp] = g / (1.0f + expf(-g)) * u;
}

// y[r] = sum over e < k, in order, of w_e * (down_e[r]·act_e).
extern "C" __global__ void moe_down(
const Experts t, unsigned int k,
unsigned long long d_q, unsigned long long d_s, unsigned long long d_b, unsigned int d_kind,
const float* act, float* y, unsigned int rows, unsigned int cols, unsigned int bits,
unsigned int group) {
unsigned int r = (blockIdx.x * blockDim.x + threadIdx.x) / 32u;
unsigned int lane = threadIdx.x % 32u;
if (r >= rows) return;
float total = 0.0f;
for (unsigned int e = 0; e < k; ++e) {
    const unsigned char* buf = (const unsigned char*)t.buf[e];
    float d = dot(bits, buf, d_q, d_s, d_b, d_kind, act + (unsigned long long)e * cols, r, cols,
                  group, lane);
    total = __fadd_rn(total, __fmul_rn(d, t.w[e]));
}
if (lane == 0) y[r] = total;
}
"#;

/// The experts of one launch: device addresses of their buffers and routing weights (the
/// kernels' `Experts` struct, passed by value).
#[repr(C)]
#[derive(Clone, Copy)]
struct Table {
    buf: [u64; MAX_K],
    w: [f32; MAX_K],
}

// SAFETY: plain-old-data with the C layout of the kernels' `Experts`.
unsafe impl DeviceRepr for Table {}

/// The compiled fused kernels.
pub(super) struct FusedKernels {
    gate_up: CudaFunction,
    down: CudaFunction,
}

impl FusedKernels {
    pub(super) fn new(dev: &CudaDevice) -> std::result::Result<Self, String> {
        use candle_core::cuda_backend::cudarc::nvrtc;
        let ptx = nvrtc::compile_ptx(format!("{SCALE_SRC}{FUSED_SRC}"))
            .map_err(|e| format!("NVRTC (fused experts): {e}"))?;
        let module = dev
            .cuda_stream()
            .context()
            .load_module(ptx)
            .map_err(|e| format!("module load (fused experts): {e}"))?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| format!("{name}: {e}"))
        };
        Ok(FusedKernels {
            gate_up: f("moe_gate_up")?,
            down: f("moe_down")?,
        })
    }
}

/// Threads per block of both kernels (8 warps, one row each).
const BLOCK: u32 = 256;

impl DevicePacked {
    /// Whether this expert runs in the fused kernels (`--gpu-experts fused`).
    pub fn fused(&self) -> bool {
        self.fused
    }

    /// Whether `other` has this expert's shapes, quantization, scale types and buffer layout
    /// (so one launch can take both).
    fn same_form(&self, other: &DevicePacked) -> bool {
        self.projs == other.projs && self.offs == other.offs && self.kinds == other.kinds
    }

    /// `Σ_e w_e · expert_e(x)` for `x` `[1, H]` (f32, this device) in two launches, or `None`
    /// where the fused kernels do not take these experts (more than [`MAX_K`], differing
    /// forms, a bit width or group the kernels do not handle); the caller then runs them one
    /// at a time.
    pub fn forward_fused(x: &Tensor, experts: &[(&DevicePacked, f32)]) -> Result<Option<Tensor>> {
        let Some(&(first, _)) = experts.first() else {
            return Ok(None);
        };
        let fits = |p: &super::QuantProj| {
            let (bits, group) = (p.params.bits, p.params.group_size);
            matches!(bits, 2 | 4 | 8)
                && group % (32 / bits) == 0
                && p.cols % group == 0
                && p.cols % (32 / bits) == 0
        };
        let [gate, up, down] = first.projs;
        if experts.len() > MAX_K
            || !experts.iter().all(|(p, _)| p.fused && first.same_form(p))
            || !first.projs.iter().all(fits)
            || gate.params != up.params
            || gate.rows != up.rows
            || down.cols != gate.rows
            || down.rows != gate.cols
        {
            return Ok(None);
        }
        let (inter, hidden) = (gate.rows, gate.cols);
        let k = experts.len() as u32;
        let x = x.contiguous()?;
        let (st, layout) = x.storage_and_layout();
        let Storage::Cuda(cs) = &*st else {
            return Err(Error::Input(
                "internal: expert input is not on the GPU".into(),
            ));
        };
        let xs = cs.as_cuda_slice::<f32>()?;
        let xv = xs.slice(layout.start_offset()..layout.start_offset() + hidden);
        let stream = first.dev.cuda_stream();
        // The compute stream waits for each expert's upload; the guards record the reads.
        let mut table = Table {
            buf: [0; MAX_K],
            w: [0.0; MAX_K],
        };
        let mut guards = Vec::with_capacity(experts.len());
        for (i, (p, w)) in experts.iter().enumerate() {
            let (ptr, guard) = p.buf.device_ptr(&stream);
            table.buf[i] = ptr;
            table.w[i] = *w;
            guards.push(guard);
        }
        // SAFETY (both allocations): every element is written by a kernel before it is read.
        let mut act: CudaSlice<f32> =
            unsafe { stream.alloc(experts.len() * inter) }.map_err(|e| driver("allocation", e))?;
        let mut y: CudaSlice<f32> =
            unsafe { stream.alloc(hidden) }.map_err(|e| driver("allocation", e))?;
        let o = first.offs;
        let [gk, uk, dk] = first.kinds;
        let (rows_i, cols_h) = (inter as u32, hidden as u32);
        let (bits, group) = (gate.params.bits as u32, gate.params.group_size as u32);
        let kf = &first.kernels.fused;
        let cfg = |warps: u32| LaunchConfig {
            grid_dim: ((warps * 32).div_ceil(BLOCK), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&kf.gate_up);
        b.arg(&table)
            .arg(&k)
            .arg(&o[0])
            .arg(&o[1])
            .arg(&o[2])
            .arg(&gk)
            .arg(&o[3])
            .arg(&o[4])
            .arg(&o[5])
            .arg(&uk)
            .arg(&xv)
            .arg(&mut act)
            .arg(&rows_i)
            .arg(&cols_h)
            .arg(&bits)
            .arg(&group);
        // SAFETY: each warp reads one packed row of gate and up inside its expert's buffer
        // (offsets and shapes checked equal for every expert above), `hidden` inputs of `x`,
        // and writes one of the `k · inter` elements of `act`.
        unsafe { b.launch(cfg(k * rows_i)) }.map_err(|e| driver("fused gate·up kernel", e))?;
        let (dbits, dgroup) = (down.params.bits as u32, down.params.group_size as u32);
        let mut b = stream.launch_builder(&kf.down);
        b.arg(&table)
            .arg(&k)
            .arg(&o[6])
            .arg(&o[7])
            .arg(&o[8])
            .arg(&dk)
            .arg(&act)
            .arg(&mut y)
            .arg(&cols_h)
            .arg(&rows_i)
            .arg(&dbits)
            .arg(&dgroup);
        // SAFETY: each warp reads one packed row of every expert's down projection, `inter`
        // activations per expert from `act`, and writes one of the `hidden` elements of `y`.
        unsafe { b.launch(cfg(cols_h)) }.map_err(|e| driver("fused down kernel", e))?;
        drop(guards);
        Ok(Some(first.wrap(y, (1, hidden))))
    }
}
