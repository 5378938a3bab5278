//! The routed experts of one decode token in two launches (CUDA, packed MLX experts).
//!
//! `moe_gate_up` computes `silu(gate·x) · (up·x)` for every row of every routed expert (one
//! warp per row), `moe_down` every output row of `Σ_e w_e · down_e·act_e` (one warp per row,
//! experts added in router order, then the layer's shared expert with weight 1 when it has the
//! routed experts' form: HF's `routed + shared`), with the shared packed row product of
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
use crate::weights::cuda::{DeviceMatrix, Packed, ROW_DOT_SRC, SCALE_SRC};

/// Most experts one fused launch takes (top-k above this runs one expert at a time).
pub const MAX_K: usize = 16;

const FUSED_SRC: &str = r#"
#define ENTRIES 17
// The entries of one launch: routed experts in router order, then the shared expert if any.
struct Experts { Packed gate[ENTRIES]; Packed up[ENTRIES]; Packed down[ENTRIES]; float w[ENTRIES]; };

// act[e * rows + r] = silu(gate_e[r]·x) * (up_e[r]·x) for e < k, r < rows: one warp per
// (entry, row) in a grid-stride loop, x in shared memory.
extern "C" __global__ void moe_gate_up(
const Experts t, unsigned int k, unsigned int g_kind, unsigned int u_kind, const float* x,
float* act, unsigned int rows, unsigned int cols, unsigned int bits, unsigned int group) {
extern __shared__ float xs[];
unsigned int warp = threadIdx.x / 32u, lane = threadIdx.x % 32u, nw = blockDim.x / 32u;
load_x(xs, x, cols);
__syncthreads();
for (unsigned int i = blockIdx.x * nw + warp; i < k * rows; i += gridDim.x * nw) {
    unsigned int e = i / rows, r = i % rows;
    float g = dot(bits, t.gate[e], g_kind, xs, r, cols, group, lane);
    float u = dot(bits, t.up[e], u_kind, xs, r, cols, group, lane);
    if (lane == 0) act[i] = g / (1.0f + expf(-g)) * u;
}
}

// y[r] = sum over e < k, in order, of w_e * (down_e[r]·act_e): one warp per row in a
// grid-stride loop (the same rows for every entry); the activations of `per` entries at a time
// sit in shared memory (`stride` floats apart), so a warp runs its row through all of them
// without waiting for the block.
extern "C" __global__ void moe_down(
const Experts t, unsigned int k, unsigned int per, unsigned int stride, unsigned int d_kind,
const float* act, float* y, unsigned int rows, unsigned int cols, unsigned int bits,
unsigned int group) {
extern __shared__ float xs[];
unsigned int warp = threadIdx.x / 32u, lane = threadIdx.x % 32u, nw = blockDim.x / 32u;
for (unsigned int e0 = 0; e0 < k; e0 += per) {
    unsigned int n = min(per, k - e0);
    for (unsigned int j = 0; j < n; ++j)
        load_x(xs + j * stride, act + (unsigned long long)(e0 + j) * cols, cols);
    __syncthreads();
    for (unsigned int r = blockIdx.x * nw + warp; r < rows; r += gridDim.x * nw) {
        float acc = e0 == 0 ? 0.0f : y[r];
        for (unsigned int j = 0; j < n; ++j) {
            unsigned int e = e0 + j;
            float d = dot(bits, t.down[e], d_kind, xs + j * stride, r, cols, group, lane);
            acc = e == 0 ? __fmul_rn(d, t.w[0]) : __fadd_rn(acc, __fmul_rn(d, t.w[e]));
        }
        if (lane == 0) y[r] = acc;
    }
    __syncthreads();
}
}
"#;

/// Entries of one launch: [`MAX_K`] routed experts and a shared expert.
const ENTRIES: usize = MAX_K + 1;

/// The entries of one launch: device addresses of each projection and the weights (the
/// kernels' `Experts` struct, passed by value).
#[repr(C)]
#[derive(Clone, Copy)]
struct Table {
    gate: [Packed; ENTRIES],
    up: [Packed; ENTRIES],
    down: [Packed; ENTRIES],
    w: [f32; ENTRIES],
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

    /// `Σ_e w_e · expert_e(x)` for `x` `[1, H]` (f32, this device) in two launches, plus the
    /// `shared` expert's output (its gate, up and down matrices) when it has the routed
    /// experts' form: `(output, whether the shared expert is in it)`. `None` where the fused
    /// kernels do not take these experts (more than [`MAX_K`], differing forms, a bit width or
    /// group the kernels do not handle); the caller then runs them one at a time.
    pub fn forward_fused(
        x: &Tensor,
        experts: &[(&DevicePacked, f32)],
        shared: Option<[&DeviceMatrix; 3]>,
    ) -> Result<Option<(Tensor, bool)>> {
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
        // The shared expert joins the launch when each of its matrices has the routed
        // projection's shape, quantization and scale type.
        let shared = shared.filter(|mats| {
            mats.iter()
                .zip(first.projs.iter().zip(first.kinds))
                .all(|(m, (p, kind))| {
                    m.rows() == p.rows
                        && m.cols() == p.cols
                        && m.params() == p.params
                        && m.kind() == kind
                })
        });
        let (inter, hidden) = (gate.rows, gate.cols);
        let entries = experts.len() + usize::from(shared.is_some());
        let k = entries as u32;
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
            gate: [Packed::default(); ENTRIES],
            up: [Packed::default(); ENTRIES],
            down: [Packed::default(); ENTRIES],
            w: [0.0; ENTRIES],
        };
        let mut guards = Vec::with_capacity(entries);
        for (i, (p, w)) in experts.iter().enumerate() {
            let (ptr, guard) = p.buf.device_ptr(&stream);
            let o = p.offs;
            table.gate[i] = Packed::at(ptr, [o[0], o[1], o[2]]);
            table.up[i] = Packed::at(ptr, [o[3], o[4], o[5]]);
            table.down[i] = Packed::at(ptr, [o[6], o[7], o[8]]);
            table.w[i] = *w;
            guards.push(guard);
        }
        let mut shared_guards = Vec::with_capacity(3);
        if let Some([g, u, d]) = shared {
            let i = experts.len();
            for (slot, m) in [&mut table.gate[i], &mut table.up[i], &mut table.down[i]]
                .into_iter()
                .zip([g, u, d])
            {
                let (packed, guard) = m.packed(&stream);
                *slot = packed;
                shared_guards.push(guard);
            }
            table.w[i] = 1.0;
        }
        // SAFETY (both allocations): every element is written by a kernel before it is read.
        let mut act: CudaSlice<f32> =
            unsafe { stream.alloc(entries * inter) }.map_err(|e| driver("allocation", e))?;
        let mut y: CudaSlice<f32> =
            unsafe { stream.alloc(hidden) }.map_err(|e| driver("allocation", e))?;
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
            .arg(&gk)
            .arg(&uk)
            .arg(&xv)
            .arg(&mut act)
            .arg(&rows_i)
            .arg(&cols_h)
            .arg(&bits)
            .arg(&group);
        // SAFETY: each block copies the `hidden` inputs of `x` into the shared memory sized for
        // them; each warp reads packed rows of gate and up of an entry (shapes checked equal
        // for every entry above) and writes elements of `act` (`entries · inter`).
        unsafe { b.launch(cfg(entries * inter, hidden)) }
            .map_err(|e| driver("fused gate·up kernel", e))?;
        let (dbits, dgroup) = (down.params.bits as u32, down.params.group_size as u32);
        // As many entries' activations per pass as shared memory holds.
        let stride = crate::weights::cuda::x_bytes(inter).div_ceil(16) * 4;
        let per = (crate::weights::cuda::SHARED_MAX / (4 * stride)).clamp(1, entries);
        let (per_u, stride_u) = (per as u32, stride as u32);
        let mut b = stream.launch_builder(down_kernel);
        b.arg(&table)
            .arg(&k)
            .arg(&per_u)
            .arg(&stride_u)
            .arg(&dk)
            .arg(&act)
            .arg(&mut y)
            .arg(&cols_h)
            .arg(&rows_i)
            .arg(&dbits)
            .arg(&dgroup);
        // SAFETY: each block copies `per` entries' `inter` activations at a time into the
        // shared memory sized for them (`stride` floats each, at least `x_bytes(inter)`); each warp reads packed rows of every entry's down projection
        // and writes elements of `y` (`hidden`), each row by the same warp for every entry.
        let down_cfg = LaunchConfig {
            shared_mem_bytes: (4 * stride * per) as u32,
            ..cfg(hidden, inter)
        };
        unsafe { b.launch(down_cfg) }.map_err(|e| driver("fused down kernel", e))?;
        drop((guards, shared_guards));
        Ok(Some((first.wrap(y, (1, hidden)), shared.is_some())))
    }
}
