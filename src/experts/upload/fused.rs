//! The routed experts of one decode token in two launches (CUDA, packed MLX experts).
//!
//! `moe_gate_up` computes `silu(gate·x) · (up·x)` for every row of every routed expert (one
//! warp per row), `moe_down` every output row of `Σ_e w_e · down_e·act_e` (one warp per row,
//! experts added in router order), with the shared packed row product of
//! [`crate::weights::cuda`] (`s·Σq·x + b·Σx` per chunk, 16-byte loads). The experts'
//! buffers travel to the kernels by value in a table of device addresses (no upload, no
//! allocation beyond the two activation vectors), so the launch count of a token's experts
//! no longer grows with top-k: 2 launches instead of about nine per expert.

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::{CudaDevice, Storage, Tensor};

use super::cuda::{driver, DevicePacked};
use crate::error::{Error, Result};
use crate::weights::cuda::{ROW_DOT_SRC, SCALE_SRC};

/// Most experts one fused launch takes (top-k above this runs one expert at a time).
pub const MAX_K: usize = 16;

const FUSED_SRC: &str = r#"
#define MAX_K 16
struct Experts { unsigned long long buf[MAX_K]; float w[MAX_K]; };

// act[e * rows + r] = silu(gate_e[r]·x) * (up_e[r]·x) for e < k, r < rows: one warp per
// (expert, row) in a grid-stride loop, x in shared memory.
extern "C" __global__ void moe_gate_up(
const Experts t, unsigned int k,
unsigned long long g_q, unsigned long long g_s, unsigned long long g_b, unsigned int g_kind,
unsigned long long u_q, unsigned long long u_s, unsigned long long u_b, unsigned int u_kind,
const float* x, float* act, unsigned int rows, unsigned int cols, unsigned int bits,
unsigned int group) {
extern __shared__ float xs[];
unsigned int warp = threadIdx.x / 32u, lane = threadIdx.x % 32u, nw = blockDim.x / 32u;
load_x(xs, x, cols);
__syncthreads();
for (unsigned int i = blockIdx.x * nw + warp; i < k * rows; i += gridDim.x * nw) {
    unsigned int e = i / rows, r = i % rows;
    const unsigned char* buf = (const unsigned char*)t.buf[e];
    float g = dot(bits, buf, g_q, g_s, g_b, g_kind, xs, r, cols, group, lane);
    float u = dot(bits, buf, u_q, u_s, u_b, u_kind, xs, r, cols, group, lane);
    if (lane == 0) act[i] = g / (1.0f + expf(-g)) * u;
}
}

// y[r] = sum over e < k, in order, of w_e * (down_e[r]·act_e): one warp per row in a
// grid-stride loop (the same rows for every expert), act_e in shared memory in turn.
extern "C" __global__ void moe_down(
const Experts t, unsigned int k,
unsigned long long d_q, unsigned long long d_s, unsigned long long d_b, unsigned int d_kind,
const float* act, float* y, unsigned int rows, unsigned int cols, unsigned int bits,
unsigned int group) {
extern __shared__ float xs[];
unsigned int warp = threadIdx.x / 32u, lane = threadIdx.x % 32u, nw = blockDim.x / 32u;
for (unsigned int e = 0; e < k; ++e) {
    load_x(xs, act + (unsigned long long)e * cols, cols);
    __syncthreads();
    const unsigned char* buf = (const unsigned char*)t.buf[e];
    for (unsigned int r = blockIdx.x * nw + warp; r < rows; r += gridDim.x * nw) {
        float d = dot(bits, buf, d_q, d_s, d_b, d_kind, xs, r, cols, group, lane);
        if (lane == 0) y[r] = e == 0 ? __fmul_rn(d, t.w[0]) : __fadd_rn(y[r], __fmul_rn(d, t.w[e]));
    }
    __syncthreads();
}
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

static KERNELS: crate::weights::cuda::KernelSet = crate::weights::cuda::KernelSet::new();

/// `moe_gate_up` and `moe_down` for `dev`; `None` where they failed to compile (said once; the
/// experts then run one at a time) or on a second device.
fn kernels(dev: &CudaDevice) -> Option<(&'static CudaFunction, &'static CudaFunction)> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let f = KERNELS.get_or_warn(
        dev,
        || format!("{SCALE_SRC}{ROW_DOT_SRC}{FUSED_SRC}"),
        &["moe_gate_up", "moe_down"],
        &WARNED,
        "fused expert kernels",
        "experts run one at a time",
    )?;
    Some((&f[0], &f[1]))
}

/// Threads per block of both kernels (8 warps).
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
            crate::weights::cuda::fits(p.params.bits, p.params.group_size, p.cols)
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
        let Some((gate_up_kernel, down_kernel)) = kernels(&first.dev) else {
            return Ok(None);
        };
        let cfg = |rows: usize, cols: usize| LaunchConfig {
            grid_dim: (crate::weights::cuda::row_blocks(rows), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: crate::weights::cuda::x_bytes(cols) as u32,
        };
        let mut b = stream.launch_builder(gate_up_kernel);
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
        // SAFETY: each block copies the `hidden` inputs of `x` into the shared memory sized for
        // them; each warp reads packed rows of gate and up inside an expert's buffer (offsets
        // and shapes checked equal for every expert above) and writes elements of `act`
        // (`k · inter`).
        unsafe { b.launch(cfg(experts.len() * inter, hidden)) }
            .map_err(|e| driver("fused gate·up kernel", e))?;
        let (dbits, dgroup) = (down.params.bits as u32, down.params.group_size as u32);
        let mut b = stream.launch_builder(down_kernel);
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
        // SAFETY: each block copies one expert's `inter` activations at a time into the shared
        // memory sized for them; each warp reads packed rows of every expert's down projection
        // and writes elements of `y` (`hidden`), each row by the same warp for every expert.
        unsafe { b.launch(cfg(hidden, inter)) }.map_err(|e| driver("fused down kernel", e))?;
        drop(guards);
        Ok(Some(first.wrap(y, (1, hidden))))
    }
}
