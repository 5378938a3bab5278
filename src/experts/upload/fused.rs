//! The routed experts of one decode token in two launches (CUDA, packed MLX experts).
//!
//! `moe_gate_up` computes `silu(gate·x) · (up·x)` for every row of every routed expert (one
//! warp per row), `moe_down` every output row of `Σ_e w_e · down_e·act_e` (a block per tile of
//! rows and entry, the tile's last block adding the entries in router order, then the layer's
//! shared expert with weight 1 when it has the routed experts' form: HF's `routed + shared`),
//! with the shared packed row product of [`crate::weights::cuda`] (`s·Σq·x + b·Σx` per chunk,
//! 16-byte loads). The experts' buffers travel to the kernels in a table of device addresses,
//! by value or (routes chosen on the device, [`super::routed`]) in device memory: no upload, no
//! allocation beyond the activation vectors, so the launch count of a token's experts does not
//! grow with top-k: 2 launches instead of about nine per expert.

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::{CudaDevice, Storage, Tensor};

use super::cuda::{driver, DevicePacked};
use super::route_src::ROUTE_SRC;
use crate::error::{Error, Result};
use crate::weights::cuda::{DeviceMatrix, Packed, ROW_DOT_SRC, SCALE_SRC};

/// Most experts one fused launch takes (top-k above this runs one expert at a time).
pub const MAX_K: usize = 16;

/// Most experts a layer may have for its routes to be chosen on the device (`moe_route` keeps a
/// layer's router outputs in shared memory).
pub const MAX_EXPERTS: usize = 1024;

const FUSED_SRC: &str = r#"
#define ENTRIES 17
// The entries of one launch: routed experts in router order, then the shared expert if any.
struct Experts { Packed gate[ENTRIES]; Packed up[ENTRIES]; Packed down[ENTRIES]; float w[ENTRIES]; };

// The 4-bit matrix m moved by d rows (of `cols` columns in groups of `group`, scales of kind
// `kind`): its row r is row r + d of m. So that `rows_dot4` takes rows far apart in one pass.
__device__ __forceinline__ Packed shift_rows(Packed m, unsigned int d, unsigned int cols,
                                             unsigned int group, unsigned int kind) {
unsigned long long q = (unsigned long long)d * (cols / 2u);
unsigned long long s = (unsigned long long)d * (cols / group) * (kind == 0u ? 4u : 2u);
m.q += q; m.s += s; m.b += s;
return m;
}

// act[e * rows + r] = silu(gate_e[r]·x) * (up_e[r]·x) for e < k, r < rows: one warp per
// (entry, row) in a grid-stride loop, x in shared memory.
__device__ __forceinline__ void gate_up(
const Experts& t, unsigned int k, unsigned int g_kind, unsigned int u_kind, const float* x,
float* act, unsigned int rows, unsigned int cols, unsigned int bits, unsigned int group) {
extern __shared__ float xs[];
unsigned int warp = threadIdx.x / 32u, lane = threadIdx.x % 32u, nw = blockDim.x / 32u;
load_x(xs, x, cols);
__syncthreads();
for (unsigned int i = blockIdx.x * nw + warp; i < k * rows; i += gridDim.x * nw) {
    unsigned int e = i / rows, r = i % rows;
    float gu[2];
    if (fast4(bits, cols, group)) {
        // Gate and up rows in one pass: both rows' loads in flight, x read once.
        const Packed m[2] = {t.gate[e], t.up[e]};
        const unsigned int kinds[2] = {g_kind, u_kind};
        rows_dot4<2, 2>(m, kinds, xs, r, cols, group, lane, gu);
    } else {
        gu[0] = dot(bits, t.gate[e], g_kind, xs, r, cols, group, lane);
        gu[1] = dot(bits, t.up[e], u_kind, xs, r, cols, group, lane);
    }
    if (lane == 0) act[i] = gu[0] / (1.0f + expf(-gu[0])) * gu[1];
}
}

// y[r] = sum over e < k, in order, of w_e * (down_e[r]·act_e). Block (tile, e) holds entry
// e's activations in shared memory and runs rows tile·tr .. tile·tr + tr of its down projection
// (tr = tile_rows <= blockDim.x), one warp a row in turn, into part[e · rows + r]; the block
// that completes a tile last (a counter per tile, returned to 0 for the next launch) adds the
// entries' products in router order with the weights. So every entry of a row is in flight at
// once (k times the warps of one block per row tile) while each block copies only its own
// entry's activations, once for its tr rows.
__device__ __forceinline__ void down(
const Experts& t, unsigned int k, unsigned int d_kind, const float* act, float* part,
unsigned int* done, float* y, unsigned int rows, unsigned int cols, unsigned int bits,
unsigned int group, unsigned int tile_rows) {
extern __shared__ float xs[];
__shared__ unsigned int last;
unsigned int warp = threadIdx.x / 32u, lane = threadIdx.x % 32u, nw = blockDim.x / 32u;
unsigned int tile = blockIdx.x, e = blockIdx.y, r0 = tile * tile_rows;
load_x(xs, act + (unsigned long long)e * cols, cols);
__syncthreads();
unsigned int end = min(r0 + tile_rows, rows), r = r0 + warp;
if (fast4(bits, cols, group)) {
    // A warp's rows of the tile (nw apart) two at a time: both rows' loads in flight (four
    // rows take 160 registers, and the blocks of a launch then no longer fit at once).
    for (; r + nw < end; r += 2u * nw) {
        const Packed m[2] = {t.down[e], shift_rows(t.down[e], nw, cols, group, d_kind)};
        const unsigned int kinds[2] = {d_kind, d_kind};
        float d[2];
        rows_dot4<2, 2>(m, kinds, xs, r, cols, group, lane, d);
        if (lane == 0) {
            part[(unsigned long long)e * rows + r] = d[0];
            part[(unsigned long long)e * rows + r + nw] = d[1];
        }
    }
}
for (; r < end; r += nw) {
    float d = dot(bits, t.down[e], d_kind, xs, r, cols, group, lane);
    if (lane == 0) part[(unsigned long long)e * rows + r] = d;
}
__threadfence();
__syncthreads();
if (threadIdx.x == 0) last = atomicAdd(done + tile, 1u) == k - 1u;
__syncthreads();
if (!last) return;
if (threadIdx.x < tile_rows) {
    unsigned int row = r0 + threadIdx.x;
    if (row < rows) {
        float acc = 0.0f;
        for (unsigned int j = 0; j < k; ++j) {
            float d = __ldcg(part + (unsigned long long)j * rows + row);
            acc = j == 0 ? __fmul_rn(d, t.w[0]) : __fadd_rn(acc, __fmul_rn(d, t.w[j]));
        }
        y[row] = acc;
    }
}
if (threadIdx.x == 0) done[tile] = 0u;
}

// The entries by value (routes chosen on the host) ...
extern "C" __global__ void moe_gate_up(
const Experts t, unsigned int k, unsigned int g_kind, unsigned int u_kind, const float* x,
float* act, unsigned int rows, unsigned int cols, unsigned int bits, unsigned int group) {
gate_up(t, k, g_kind, u_kind, x, act, rows, cols, bits, group);
}
extern "C" __global__ void moe_down(
const Experts t, unsigned int k, unsigned int d_kind, const float* act, float* part,
unsigned int* done, float* y, unsigned int rows, unsigned int cols, unsigned int bits,
unsigned int group, unsigned int tile_rows) {
down(t, k, d_kind, act, part, done, y, rows, cols, bits, group, tile_rows);
}
// ... or in device memory, where `moe_route` wrote them (routes chosen on the device).
extern "C" __global__ void moe_gate_up_at(
const Experts* t, unsigned int k, unsigned int g_kind, unsigned int u_kind, const float* x,
float* act, unsigned int rows, unsigned int cols, unsigned int bits, unsigned int group) {
gate_up(*t, k, g_kind, u_kind, x, act, rows, cols, bits, group);
}
extern "C" __global__ void moe_down_at(
const Experts* t, unsigned int k, unsigned int d_kind, const float* act, float* part,
unsigned int* done, float* y, unsigned int rows, unsigned int cols, unsigned int bits,
unsigned int group, unsigned int tile_rows) {
down(*t, k, d_kind, act, part, done, y, rows, cols, bits, group, tile_rows);
}
"#;

/// `gate_fill`: the copies a gate makes (see [`super::gates`]); its own source so that
/// `scripts/kernel_emu` can run it on the CPU.
const FILL_SRC: &str = r#"
// Copies `len` bytes from `src` to `dst` with every thread of the grid (thread `tid` of
// `stride`, a multiple of the block size), in 16-, 8- or 4-byte words where both addresses
// allow; where only `dst` is 8-byte aligned (MLX writes its safetensors header unpadded, so a
// tensor may start at any byte), each 8-byte word of `dst` from the two aligned source words
// it straddles, the second shuffled over from the next lane (only aligned words holding bytes
// of the range are read: none crosses a page past it); the rest byte by byte.
template <typename W>
__device__ __forceinline__ unsigned long long gate_words(const unsigned char* src,
unsigned char* dst, unsigned long long len, unsigned long long tid, unsigned long long stride) {
const W* s = (const W*)src;
W* d = (W*)dst;
unsigned long long w = len / sizeof(W), i = tid;
for (; i + 3ull * stride < w; i += 4ull * stride) {
    W p = s[i], q = s[i + stride], r = s[i + 2ull * stride], u = s[i + 3ull * stride];
    d[i] = p; d[i + stride] = q; d[i + 2ull * stride] = r; d[i + 3ull * stride] = u;
}
for (; i < w; i += stride) d[i] = s[i];
return w * sizeof(W);
}

__device__ __forceinline__ void gate_fill(const unsigned char* src, unsigned char* dst,
unsigned long long len, unsigned long long tid, unsigned long long stride) {
unsigned long long a = (unsigned long long)src | (unsigned long long)dst, done = 0ull;
if ((a & 15ull) == 0ull) {
    done = gate_words<uint4>(src, dst, len, tid, stride);
} else if ((a & 7ull) == 0ull) {
    done = gate_words<uint2>(src, dst, len, tid, stride);
} else if ((a & 3ull) == 0ull) {
    done = gate_words<unsigned int>(src, dst, len, tid, stride);
} else if ((((unsigned long long)dst) & 7ull) == 0ull) {
    unsigned long long r = (unsigned long long)src & 7ull;
    unsigned int sh = 8u * (unsigned int)r, lane = threadIdx.x & 31u;
    const unsigned long long* s = (const unsigned long long*)(src - r);
    unsigned long long* d = (unsigned long long*)dst;
    unsigned long long w = len / 8ull;
    // Block-uniform trip count (every lane of a warp takes part in each shuffle).
    for (unsigned long long b = tid - threadIdx.x; b < w; b += stride) {
        unsigned long long i = b + threadIdx.x;
        unsigned long long lo = i <= w ? s[i] : 0ull;
        unsigned long long hi = __shfl_down_sync(0xffffffffu, lo, 1);
        if (lane == 31u) hi = i + 1ull <= w ? s[i + 1ull] : 0ull;
        if (i < w) d[i] = (lo >> sh) | (hi << (64u - sh));
    }
    done = w * 8ull;
}
for (unsigned long long i = done + tid; i < len; i += stride) dst[i] = src[i];
}
"#;

/// `moe_gate`: the host's turn inside a captured decode step whose experts may miss (see
/// [`super::gates`]).
const GATE_SRC: &str = r#"
__device__ __forceinline__ unsigned long long gate_now() {
unsigned long long t;
asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
return t;
}

// One MoE layer's gate. The token's number is the device counter `seq` (advanced by the step's
// first gate, `bump`). The first warp of block 0 copies the layer's `words` route words (ids,
// weight bits, then any lookahead prediction's) from `out` to the layer's slot in mapped host
// memory `slot`, then posts the number (slot[0]) and waits until the host answers it
// (slot[16]) with the chosen experts' addresses written at byte 384 of the slot (gate, up,
// down per chosen expert, router order); copies those and the weights into entries 0..k of
// the fused launch's table. An answer with the top bit set (the host failed) or no answer
// within `timeout_ns` stops the step: the kernel traps, and no later launch of the context
// runs. The answer's 8-byte word also gives (slot[17]) copies (source, destination, bytes:
// three words each at byte 1536) for the chosen experts the host did not copy itself: block
// 0 moves them to `scratch` (the layer's device words: the copies, then three control words)
// and publishes their count; every block then copies them from host memory, and the last
// block to finish writes the copies' GPU time (ns) at byte 72 of the slot and resets the
// control words. Timestamps at byte 80: start, post, answer seen, end (the last block).
// Reads of host memory cross the link, so each is one round trip: the answer is one load,
// the addresses one batch.
extern "C" __global__ void moe_gate(
const unsigned int* out, unsigned int words, unsigned int k, unsigned int* seq,
unsigned int bump, volatile unsigned int* slot, Experts* launch,
unsigned long long timeout_ns, unsigned long long* scratch) {
__shared__ unsigned int token;
__shared__ unsigned int n;
volatile unsigned long long* ctl = scratch + 432u;
unsigned int t = threadIdx.x;
unsigned long long t_start = gate_now();
if (blockIdx.x == 0u) {
    if (t < 32u) {
        unsigned int lane = t;
        if (lane == 0u) {
            unsigned int v = *seq;
            if (bump) { v = (v + 1u) & 0x7fffffffu; *seq = v; }
            token = v;
        }
        __syncwarp();
        unsigned int v = token;
        for (unsigned int i = lane; i < words; i += 32u) slot[32u + i] = out[i];
        volatile unsigned long long* stamps = (volatile unsigned long long*)(slot + 20u);
        if (lane == 0u) { stamps[0] = t_start; stamps[1] = gate_now(); }
        __threadfence_system();
        __syncwarp();
        if (lane == 0u) {
            slot[0] = v;
            __threadfence_system();
            unsigned long long t0 = gate_now();
            const volatile unsigned long long* ready = (const volatile unsigned long long*)(slot + 16u);
            unsigned long long r = *ready;
            while ((unsigned int)r != v) {
                if ((unsigned int)r == (v | 0x80000000u) || gate_now() - t0 > timeout_ns) __trap();
                r = *ready;
            }
            n = min((unsigned int)(r >> 32), 144u);
            stamps[2] = gate_now();
        }
        __syncwarp();
        __threadfence_system();
        const unsigned long long* e = (const unsigned long long*)(slot + 96u);
        unsigned long long a[5];  // 9·k ≤ 144 addresses: all loads issued, then stored
#pragma unroll
        for (unsigned int j = 0u; j < 5u; j++) a[j] = lane + 32u * j < 9u * k ? __ldcv(e + lane + 32u * j) : 0ull;
#pragma unroll
        for (unsigned int j = 0u; j < 5u; j++) {
            unsigned int i = lane + 32u * j, x = i / 9u, m = (i / 3u) % 3u;
            Packed* p = m == 0u ? &launch->gate[x] : m == 1u ? &launch->up[x] : &launch->down[x];
            if (i < 9u * k) ((unsigned long long*)p)[i % 3u] = a[j];
        }
        for (unsigned int i = lane; i < k; i += 32u) launch->w[i] = __uint_as_float(out[k + i]);
    }
    __syncthreads();
    const volatile unsigned long long* h = (const volatile unsigned long long*)(slot + 384u);
    for (unsigned int i = t; i < 3u * n; i += blockDim.x) scratch[i] = h[i];
    __threadfence();
    __syncthreads();
    if (t == 0u) {
        ctl[2] = gate_now();
        __threadfence();
        ctl[0] = (unsigned long long)n + 1ull;
    }
}
if (t == 0u) {
    unsigned long long p = ctl[0];
    while (p == 0ull) p = ctl[0];
    n = (unsigned int)(p - 1ull);
}
__syncthreads();
__threadfence();
unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + t;
unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
for (unsigned int c = 0u; c < n; c++) {
    const unsigned char* src = (const unsigned char*)__ldcg(scratch + 3u * c);
    unsigned char* dst = (unsigned char*)__ldcg(scratch + 3u * c + 1u);
    gate_fill(src, dst, __ldcg(scratch + 3u * c + 2u), tid, stride);
}
__syncthreads();
if (t == 0u) {
    __threadfence();
    unsigned long long a = atomicAdd((unsigned long long*)(scratch + 433u), 1ull);
    if (a + 1ull == (unsigned long long)gridDim.x) {
        unsigned long long end = gate_now();
        if (n > 0u) *(volatile unsigned long long*)(slot + 18u) = end - ctl[2];
        *(volatile unsigned long long*)(slot + 26u) = end;
        __threadfence_system();
        ctl[1] = 0ull;
        ctl[0] = 0ull;
    }
}
}
"#;

/// Entries of one launch: [`MAX_K`] routed experts and a shared expert.
pub(super) const ENTRIES: usize = MAX_K + 1;

/// The entries of one launch: device addresses of each projection and the weights (the
/// kernels' `Experts` struct, passed by value or read from device memory).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct Table {
    pub(super) gate: [Packed; ENTRIES],
    pub(super) up: [Packed; ENTRIES],
    pub(super) down: [Packed; ENTRIES],
    pub(super) w: [f32; ENTRIES],
}

// SAFETY: plain-old-data with the C layout of the kernels' `Experts`.
unsafe impl DeviceRepr for Table {}

/// Where a launch's entries are.
pub(super) enum Entries<'a> {
    /// Passed by value (routes chosen on the host).
    Value(&'a Table),
    /// In device memory, where `moe_route` wrote them (routes chosen on the device).
    Device(&'a CudaSlice<Table>),
}

impl Entries<'_> {
    /// `by_value` or `at`, as the entries travel.
    fn pick<'a>(&self, by_value: &'a CudaFunction, at: &'a CudaFunction) -> &'a CudaFunction {
        match self {
            Entries::Value(_) => by_value,
            Entries::Device(_) => at,
        }
    }

    /// A launch of `f` ([`Entries::pick`]) with the entries as its first argument.
    fn launch<'a>(
        &'a self,
        stream: &'a std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
        f: &'a CudaFunction,
    ) -> candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a> {
        let mut b = stream.launch_builder(f);
        match self {
            Entries::Value(t) => b.arg(*t),
            Entries::Device(t) => b.arg(*t),
        };
        b
    }
}

static KERNELS: crate::weights::cuda::KernelSet = crate::weights::cuda::KernelSet::new();

/// The fused expert kernels and the router kernel of one module.
pub(super) struct Kernels {
    gate_up: &'static CudaFunction,
    down: &'static CudaFunction,
    gate_up_at: &'static CudaFunction,
    down_at: &'static CudaFunction,
    /// `moe_route` (see [`super::routed`]).
    pub(super) route: &'static CudaFunction,
    /// `moe_gate` (see [`super::gates`]).
    pub(super) gate: &'static CudaFunction,
    /// `moe_router`: a layer's router and route(s) in one launch (see [`super::routed`]).
    pub(super) router: &'static CudaFunction,
}

/// The kernels for `dev`; `None` where they failed to compile (said once; the experts then run
/// one at a time, routed on the host) or on a second device.
pub(super) fn kernels(dev: &CudaDevice) -> Option<Kernels> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let f = KERNELS.get_or_warn(
        dev,
        || format!("{SCALE_SRC}{ROW_DOT_SRC}{FUSED_SRC}{ROUTE_SRC}{FILL_SRC}{GATE_SRC}"),
        &[
            "moe_gate_up",
            "moe_down",
            "moe_gate_up_at",
            "moe_down_at",
            "moe_route",
            "moe_gate",
            "moe_router",
        ],
        &WARNED,
        "fused expert kernels",
        "experts run one at a time",
    )?;
    Some(Kernels {
        gate_up: &f[0],
        down: &f[1],
        gate_up_at: &f[2],
        down_at: &f[3],
        route: &f[4],
        gate: &f[5],
        router: &f[6],
    })
}

/// Threads per block of both kernels (8 warps).
const BLOCK: u32 = 256;

/// Rows of `moe_down`'s tiles (each of a tile's blocks copies its entry's activations once for
/// them): `HARNESS_DOWN_TILE` (a multiple of 8 up to 256), else 32.
fn down_tile_rows() -> u32 {
    static T: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("HARNESS_DOWN_TILE")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|t| *t >= 8 && *t <= BLOCK && t % 8 == 0)
            .unwrap_or(32)
    })
}

/// The per-tile counters of `moe_down` (zero between launches: the last block of each tile
/// returns its counter to 0), at least `tiles` of them, kept for the process (one device; its
/// launches are ordered on the one compute stream).
fn tile_counters(
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    tiles: usize,
) -> Result<std::sync::MutexGuard<'static, Option<CudaSlice<u32>>>> {
    static COUNTERS: std::sync::Mutex<Option<CudaSlice<u32>>> = std::sync::Mutex::new(None);
    let mut c = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    if c.as_ref().is_none_or(|c| c.len() < tiles) {
        *c = Some(
            stream
                .alloc_zeros::<u32>(tiles.max(1024))
                .map_err(|e| driver("allocation", e))?,
        );
    }
    Ok(c)
}

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

    /// Whether the fused kernels take `first` with every expert of `others` in one launch
    /// (all in the fused form, of one form, a bit width and group the kernels handle, gate and
    /// up of one shape, down their transpose).
    pub(super) fn fusable<'a>(
        first: &DevicePacked,
        mut others: impl Iterator<Item = &'a DevicePacked>,
    ) -> bool {
        let fits = |p: &super::QuantProj| {
            crate::weights::cuda::fits(p.params.bits, p.params.group_size, p.cols)
        };
        let [gate, up, down] = first.projs;
        first.fused
            && others.all(|p| p.fused && first.same_form(p))
            && first.projs.iter().all(fits)
            && gate.params == up.params
            && gate.rows == up.rows
            && down.cols == gate.rows
            && down.rows == gate.cols
    }

    /// `shared` (an expert's gate, up and down matrices) where each has this expert's
    /// projection's shape, quantization and scale type, so it joins the fused launch.
    pub(super) fn shared_fits<'a>(
        &self,
        shared: Option<[&'a DeviceMatrix; 3]>,
    ) -> Option<[&'a DeviceMatrix; 3]> {
        shared.filter(|mats| {
            mats.iter()
                .zip(self.projs.iter().zip(self.kinds))
                .all(|(m, (p, kind))| {
                    m.rows() == p.rows
                        && m.cols() == p.cols
                        && m.params() == p.params
                        && m.kind() == kind
                })
        })
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
        if experts.len() > MAX_K || !Self::fusable(first, experts.iter().map(|(p, _)| *p)) {
            return Ok(None);
        }
        let shared = first.shared_fits(shared);
        let entries = experts.len() + usize::from(shared.is_some());
        let stream = first.dev.cuda_stream();
        // The compute stream waits for each expert's upload; the guards record the reads.
        let mut table = Table::default();
        let mut guards = Vec::with_capacity(entries);
        for (i, (p, w)) in experts.iter().enumerate() {
            let (ptr, guard) = p.buf.device_ptr(&stream);
            [table.gate[i], table.up[i], table.down[i]] = p.packed_at(ptr);
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
        let y = first
            .form()
            .launch_fused(x, entries, Entries::Value(&table))?;
        drop((guards, shared_guards));
        Ok(y.map(|y| (y, shared.is_some())))
    }

    /// The addresses of gate, up and down in this expert's buffer at device address `base`.
    pub(super) fn packed_at(&self, base: u64) -> [Packed; 3] {
        let o = self.offs;
        [
            Packed::at(base, [o[0], o[1], o[2]]),
            Packed::at(base, [o[3], o[4], o[5]]),
            Packed::at(base, [o[6], o[7], o[8]]),
        ]
    }

    /// What a fused launch needs to know of this expert: its [`Form`].
    pub(super) fn form(&self) -> Form {
        Form {
            dev: self.dev.clone(),
            offs: self.offs,
            kinds: self.kinds,
            projs: self.projs,
        }
    }
}

/// The form of a layer's fused experts (device, projection shapes and quantization, scale
/// types, buffer layout) without any expert's buffer: what the two fused launches need besides
/// the entries' addresses, kept by a layer whose experts come and go ([`super::routed`]).
#[derive(Clone)]
pub struct Form {
    pub(super) dev: CudaDevice,
    offs: [u64; 9],
    kinds: [u32; 3],
    projs: [super::QuantProj; 3],
}

impl Form {
    /// Whether `p` has this form (so one launch takes it with the others).
    pub(super) fn holds(&self, p: &DevicePacked) -> bool {
        p.fused && self.projs == p.projs && self.offs == p.offs && self.kinds == p.kinds
    }

    /// The two fused launches over `entries` entries of `table`, each of this form (checked by
    /// the caller), on `x` `[1, H]`; `None` where the kernels failed to compile.
    pub(super) fn launch_fused(
        &self,
        x: &Tensor,
        entries: usize,
        table: Entries<'_>,
    ) -> Result<Option<Tensor>> {
        let [gate, _, down] = self.projs;
        let (inter, hidden) = (gate.rows, gate.cols);
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
        let stream = self.dev.cuda_stream();
        let Some(f) = kernels(&self.dev) else {
            return Ok(None);
        };
        // SAFETY (both allocations): every element is written by a kernel before it is read.
        let mut act: CudaSlice<f32> =
            unsafe { stream.alloc(entries * inter) }.map_err(|e| driver("allocation", e))?;
        let mut y: CudaSlice<f32> =
            unsafe { stream.alloc(hidden) }.map_err(|e| driver("allocation", e))?;
        let [gk, uk, dk] = self.kinds;
        let (rows_i, cols_h) = (inter as u32, hidden as u32);
        let (bits, group) = (gate.params.bits as u32, gate.params.group_size as u32);
        let gu = table.pick(f.gate_up, f.gate_up_at);
        let gu_smem = crate::weights::cuda::x_bytes(hidden);
        let gu_cfg = LaunchConfig {
            grid_dim: (
                crate::weights::cuda::row_blocks(gu, &stream, entries * inter, gu_smem),
                1,
                1,
            ),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: gu_smem as u32,
        };
        let mut b = table.launch(&stream, gu);
        b.arg(&k)
            .arg(&gk)
            .arg(&uk)
            .arg(&xv)
            .arg(&mut act)
            .arg(&rows_i)
            .arg(&cols_h)
            .arg(&bits)
            .arg(&group);
        // SAFETY: each block copies the `hidden` inputs of `x` into the shared memory sized for
        // them; each warp reads packed rows of gate and up of an entry (every entry of this
        // expert's form, checked by the caller) and writes elements of `act` (`entries · inter`).
        unsafe { b.launch(gu_cfg) }.map_err(|e| driver("fused gate·up kernel", e))?;
        let (dbits, dgroup) = (down.params.bits as u32, down.params.group_size as u32);
        let tile_rows = down_tile_rows();
        let tiles = hidden.div_ceil(tile_rows as usize);
        // SAFETY: every element is written by a kernel before it is read.
        let mut part: CudaSlice<f32> =
            unsafe { stream.alloc(entries * hidden) }.map_err(|e| driver("allocation", e))?;
        let mut done_guard = tile_counters(&stream, tiles)?;
        let done = done_guard
            .as_mut()
            .ok_or_else(|| Error::Input("internal: no tile counters".into()))?;
        let mut b = table.launch(&stream, table.pick(f.down, f.down_at));
        b.arg(&k)
            .arg(&dk)
            .arg(&act)
            .arg(&mut part)
            .arg(done)
            .arg(&mut y)
            .arg(&cols_h)
            .arg(&rows_i)
            .arg(&dbits)
            .arg(&dgroup)
            .arg(&tile_rows);
        // SAFETY: block (tile, e) copies entry e's `inter` activations into the shared memory
        // sized for them, each warp reads one packed row of entry e's down projection and writes
        // `part[e · hidden + row]` (`entries · hidden`); the tile's last block reads the tile's
        // `entries` partial products (written before the counter, `__threadfence`), writes
        // `y` (`hidden`) and returns the tile's counter (`tiles` of them) to 0.
        let down_cfg = LaunchConfig {
            grid_dim: (tiles as u32, k, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: crate::weights::cuda::x_bytes(inter) as u32,
        };
        unsafe { b.launch(down_cfg) }.map_err(|e| driver("fused down kernel", e))?;
        drop(done_guard);
        Ok(Some(crate::weights::cuda::wrap(&self.dev, y, (1, hidden))))
    }
}
