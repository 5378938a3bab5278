//! One decode token of MLA on CUDA in absorbed form with three kernels (a child module of
//! [`super`], so it reads the layer's fields).
//!
//! `q_a_proj` and `kv_a_proj_with_mqa` are one stacked packed matrix (one product), and
//! `q_a_layernorm` runs inside `q_b_proj`'s product. `mla_absorb` (a block per head and 128
//! latent columns) maps each head's query into the latent space (`q_nope · k_upᵀ`), rotates the
//! query's rope part, and normalises the new latent and rotates the shared key straight into
//! the cache (cos/sin computed on the host exactly as the generic path does, passed by value:
//! no upload). `mla_attend` (a block per head) scores the query against every cached latent and
//! rope key and takes the softmax and the probability-weighted sum of the cached latents;
//! `mla_expand` (a block per head and 128 value columns) maps that out again (`· v_up`). Per
//! layer: six launches (stacked projection, `q_b`, absorb, attend, expand, `o_proj`) where the
//! tensor ops took about twenty. The latent expansion's products read most of the step's bytes
//! (`k_up` and `v_up` in f32), so each spreads over 32 warps per 128 columns of every head with
//! one 16-byte load per lane and row: one block of 8 warps per head ran them at 130 µs per layer
//! on the H200, 8 warps per 32 columns at 46 µs (Nsight Compute). Where the checkpoint has
//! mlx-lm's packed `embed_q` / `unembed_out`, they stay packed on the GPU (a seventh of the f32
//! bytes, in memory and read per token) and both products are `mla_head_rows` launches (a warp
//! per packed row, each head's input in shared memory), `mla_absorb` keeping the rest of its work.

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::{CudaDevice, Device, Storage, Tensor};

use super::{Latent, LayerKv, Linear, MlaAttention, QProj, Weight};
use crate::error::{Error, Result};
use crate::weights::cuda::{driver, wrap, DeviceMatrix, ROW_DOT_SRC, SCALE_SRC};

/// Most rotary frequency pairs the absorb kernel takes (`qk_rope_head_dim / 2`).
const MAX_ROT: usize = 64;
/// Dynamic shared memory of `mla_attend` for `s` cached tokens: their scores. Sequences past
/// [`crate::weights::cuda::SHARED_MAX`] (24 K tokens) take the generic path.
fn attend_shared(s: usize) -> usize {
    4 * s
}
const THREADS: u32 = 256;
/// Threads of the per-head product kernels (`mla_absorb`, `mla_expand`): 32 warps.
const WIDE: u32 = 1024;

const SRC: &str = r#"
#define MAX_ROT 64
struct Rot { float cos[MAX_ROT]; float sin[MAX_ROT]; };

// Sum (op 0) or max (op 1) over the block; every thread gets the result.
__device__ float block_reduce(float v, float* red, int op) {
for (int o = 16; o > 0; o >>= 1) {
    float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = op ? fmaxf(v, w) : v + w;
}
unsigned int warp = threadIdx.x / 32u, lane = threadIdx.x % 32u, nw = blockDim.x / 32u;
__syncthreads();
if (lane == 0) red[warp] = v;
__syncthreads();
float r = red[0];
for (unsigned int i = 1; i < nw; ++i) r = op ? fmaxf(r, red[i]) : r + red[i];
return r;
}

// Element i of the rotated rope vector x (dr values): mode 0 none, 1 halves, 2 interleaved;
// rc / rs: the position's dr / 2 cosines and sines.
__device__ float rot_at(const float* x, unsigned int i, unsigned int dr, unsigned int mode,
                        const float* rc, const float* rs) {
if (mode == 0) return x[i];
if (mode == 2) {
    unsigned int j = i / 2u;
    float c = rc[j], s = rs[j];
    return (i % 2u == 0u) ? x[i] * c - x[i + 1] * s : x[i - 1] * s + x[i] * c;
}
unsigned int half = dr / 2u, j = i % half;
float c = rc[j], s = rs[j];
return i < half ? x[i] * c - x[i + half] * s : x[i - half] * s + x[i] * c;
}

// Block (h, t) of a product per head, out[h, j] = sum_i in[h, i] · M[h, i, j] for M [H, R, N]
// (N a multiple of 4), for the 128 columns j of tile t: lane l takes columns 4l..4l+3 (one
// 16-byte load per row) and warp w the rows i = w, w + warps, ...; the warps' partial sums are
// then added in warp order. `in_stride` is the distance between heads' inputs.
__device__ void head_tile(const float* in, unsigned int in_stride, const float* M,
                          unsigned int R, unsigned int N, float* out) {
__shared__ float part[32][128];
unsigned int h = blockIdx.x, tid = threadIdx.x;
unsigned int warp = tid / 32u, lane = tid % 32u, nw = blockDim.x / 32u;
unsigned int j = blockIdx.y * 128u + lane * 4u;
float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
if (j < N) {
    const float* x = in + (unsigned long long)h * in_stride;
    const float* m = M + (unsigned long long)h * R * N + j;
#pragma unroll 4
    for (unsigned int i = warp; i < R; i += nw) {
        float a = x[i];
        float4 v = *(const float4*)(m + (unsigned long long)i * N);
        acc.x = fmaf(a, v.x, acc.x);
        acc.y = fmaf(a, v.y, acc.y);
        acc.z = fmaf(a, v.z, acc.z);
        acc.w = fmaf(a, v.w, acc.w);
    }
}
part[warp][lane * 4u] = acc.x;
part[warp][lane * 4u + 1u] = acc.y;
part[warp][lane * 4u + 2u] = acc.z;
part[warp][lane * 4u + 3u] = acc.w;
__syncthreads();
unsigned int col = blockIdx.y * 128u + tid;
if (tid < 128u && col < N) {
    float t = part[0][tid];
    for (unsigned int w = 1; w < nw; ++w) t += part[w][tid];
    out[(unsigned long long)h * N + col] = t;
}
}

// Grid (H, ceil(C / 128)), 32 warps: qlat[h] = q_nope[h] · k_up_t[h] ([dn] · [dn, C]). Blocks
// (h, 0) also rotate head h's rope part of the query into qr [H*dr]; block (0, 0) also
// normalises the new latent into lat [C] and rotates the shared key into krot [dr] (both rows
// of the cache). q is [H*(dn+dr)], ckv [C+dr], w [C]. Where `dpos` is not null (a decode step
// captured in a CUDA graph), the position is read from it: its cos/sin are row p of `rope`
// ([positions, dr]: dr / 2 cosines then dr / 2 sines) and `lat` / `krot` are the cache buffers'
// starts (row p is written); otherwise `rot` has them and `lat` / `krot` point at the row.
extern "C" __global__ void mla_absorb(const float* q, const float* ckv, const float* w,
                                      float eps, const Rot rot, unsigned int mode,
                                      unsigned int dn, unsigned int dr, unsigned int C,
                                      const float* k_up_t, float* qlat, float* qr, float* lat,
                                      float* krot, const unsigned int* dpos,
                                      const float* rope) {
__shared__ float red[32];
__shared__ float rc[MAX_ROT], rs[MAX_ROT];
unsigned int h = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
unsigned int dq = dn + dr, half = dr / 2u;
if (dpos) {
    unsigned long long p = *dpos;
    for (unsigned int i = tid; mode != 0u && i < half; i += nt) {
        rc[i] = rope[p * dr + i];
        rs[i] = rope[p * dr + half + i];
    }
    lat += p * C;
    krot += p * dr;
} else {
    for (unsigned int i = tid; i < half; i += nt) {
        rc[i] = rot.cos[i];
        rs[i] = rot.sin[i];
    }
}
__syncthreads();
if (k_up_t) head_tile(q, dq, k_up_t, dn, C, qlat);
if (blockIdx.y == 0) {
    const float* qh = q + (unsigned long long)h * dq;
    for (unsigned int i = tid; i < dr; i += nt) qr[h * dr + i] = rot_at(qh + dn, i, dr, mode, rc, rs);
}
if (blockIdx.x == 0 && blockIdx.y == 0) {
    float ss = 0.0f;
    for (unsigned int i = tid; i < C; i += nt) ss += ckv[i] * ckv[i];
    ss = block_reduce(ss, red, 0);
    float scale = rsqrtf(ss / (float)C + eps);
    for (unsigned int i = tid; i < C; i += nt) lat[i] = scale * ckv[i] * w[i];
    for (unsigned int i = tid; i < dr; i += nt) krot[i] = rot_at(ckv + C, i, dr, mode, rc, rs);
}
}

// Per head (block): scores of qlat [H,C] / qr [H,dr] against lat [S,C] / krot [S,dr], times
// scale, softmax, ctx [H,C] = sum_s p_s lat[s]. Dynamic shared memory: S scores. Where `dpos`
// is not null (a captured decode step), S is the position read from it plus one.
extern "C" __global__ void mla_attend(const float* qlat, const float* qr, const float* lat,
                                      const float* krot, unsigned int S_arg, unsigned int C,
                                      unsigned int dr, float scale, float* ctx,
                                      const unsigned int* dpos) {
extern __shared__ float sc[];
unsigned int S = dpos ? *dpos + 1u : S_arg;
__shared__ float red[32];
unsigned int h = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
unsigned int warp = tid / 32u, lane = tid % 32u, nw = nt / 32u;
const float* ql = qlat + (unsigned long long)h * C;
const float* qk = qr + (unsigned long long)h * dr;
for (unsigned int s = warp; s < S; s += nw) {
    const float* l = lat + (unsigned long long)s * C;
    const float* k = krot + (unsigned long long)s * dr;
    float a = 0.0f, b = 0.0f;
    for (unsigned int c = lane; c < C; c += 32u) a = fmaf(ql[c], l[c], a);
    for (unsigned int c = lane; c < dr; c += 32u) b = fmaf(qk[c], k[c], b);
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, o);
        b += __shfl_xor_sync(0xffffffffu, b, o);
    }
    if (lane == 0) sc[s] = (a + b) * scale;
}
__syncthreads();
float m = __int_as_float(0xff800000);
for (unsigned int s = tid; s < S; s += nt) m = fmaxf(m, sc[s]);
m = block_reduce(m, red, 1);
float z = 0.0f;
for (unsigned int s = tid; s < S; s += nt) { float e = expf(sc[s] - m); sc[s] = e; z += e; }
z = block_reduce(z, red, 0);
for (unsigned int c = tid; c < C; c += nt) {
    float acc = 0.0f;
#pragma unroll 8
    for (unsigned int s = 0; s < S; ++s) acc = fmaf(sc[s] / z, lat[(unsigned long long)s * C + c], acc);
    ctx[(unsigned long long)h * C + c] = acc;
}
}

// Rows of W lanes each (4-bit runs): the block's rows r0 + threadIdx.x / W.
template <int W>
__device__ __forceinline__ void head_rows4(const Packed& m, unsigned int kind, unsigned int group,
                                           const float* xs, unsigned int h, unsigned int R,
                                           unsigned int K, unsigned int r0, float* out) {
unsigned int r = r0 + threadIdx.x / W, lane = threadIdx.x % W;
float v;
// Every lane calls (the sums are shuffled); a row past R repeats the last row, unstored.
rows_dot4<1, 2, W>(&m, &kind, xs, h * R + min(r, R - 1u), K, group, lane, &v);
if (lane == 0 && r < R) out[(unsigned long long)h * R + r] = v;
}

// Grid (H, ceil(R / (blockDim.x / lanes))): out[h·R + r] = row h·R + r of the packed [H·R, K]
// matrix m times in[h·in_stride ..][0..K) (mlx-lm's `embed_q` and `unembed_out`, packed), block
// y taking rows y·(blockDim.x / lanes) onwards. The host picks `lanes` (8, 16 or 32) for speed
// only: 4-bit rows of runs take `lanes` lanes a row (short rows share a warp instead of leaving
// most of its lanes idle); any other form, or another `lanes`, runs the block's rows a warp each.
extern "C" __global__ void mla_head_rows(const Packed m, unsigned int kind, unsigned int bits,
                                         unsigned int group, const float* in,
                                         unsigned int in_stride, unsigned int R, unsigned int K,
                                         unsigned int lanes, float* out) {
extern __shared__ float xs[];
unsigned int h = blockIdx.x, warp = threadIdx.x / 32u, lane = threadIdx.x % 32u;
unsigned int per = blockDim.x / lanes, r0 = blockIdx.y * per;
load_x(xs, in + (unsigned long long)h * in_stride, K);
__syncthreads();
if (fast4(bits, K, group) && lanes == 8u) head_rows4<8>(m, kind, group, xs, h, R, K, r0, out);
else if (fast4(bits, K, group) && lanes == 16u) head_rows4<16>(m, kind, group, xs, h, R, K, r0, out);
else if (fast4(bits, K, group) && lanes == 32u) head_rows4<32>(m, kind, group, xs, h, R, K, r0, out);
else
    for (unsigned int r = r0 + warp; r < r0 + per && r < R; r += blockDim.x / 32u) {
        float v = dot(bits, m, kind, xs, h * R + r, K, group, lane);
        if (lane == 0) out[(unsigned long long)h * R + r] = v;
    }
}

// Grid (H, ceil(dv / 128)), 32 warps: y[h] = ctx[h] · v_up[h] ([C] · [C, dv]).
extern "C" __global__ void mla_expand(const float* ctx, const float* v_up, unsigned int C,
                                      unsigned int dv, float* y) {
head_tile(ctx, C, v_up, C, dv, y);
}
"#;

/// A decode step's position in device memory, for a step captured into a CUDA graph and
/// replayed at later positions (`super::super::graph`): `mla_absorb` and `mla_attend` read the
/// position, its RoPE row and the cache length there instead of taking them by value.
pub struct DeviceStep {
    /// The step's position (one `u32`), written before each replay.
    pub pos: CudaSlice<u32>,
    /// cos/sin of every position below `positions`, `[positions, dr]`: `dr / 2` cosines then
    /// `dr / 2` sines, the values [`super::Rope::values`] gives.
    rope: CudaSlice<f32>,
    /// Positions the table covers.
    pub positions: usize,
}

impl MlaAttention {
    /// A device position and RoPE table for positions below `positions` of this layer (and of
    /// every layer whose RoPE [`MlaAttention::same_rope`] says equal).
    pub fn device_step(&self, dev: &CudaDevice, positions: usize) -> Result<DeviceStep> {
        let dr = self.spec.qk_rope_head_dim;
        let mut table = Vec::with_capacity(positions * dr);
        for p in 0..positions {
            let (cos, sin) = self.rope.values(p);
            if cos.len() * 2 != dr {
                return Err(Error::Input(format!(
                    "internal: {} RoPE frequencies for a rope head of {dr}",
                    cos.len()
                )));
            }
            table.extend(cos);
            table.extend(sin);
        }
        let stream = dev.cuda_stream();
        let rope = stream
            .clone_htod(&table)
            .map_err(|e| driver("RoPE table upload", e))?;
        let pos = stream
            .alloc_zeros::<u32>(1)
            .map_err(|e| driver("allocation", e))?;
        Ok(DeviceStep {
            pos,
            rope,
            positions,
        })
    }

    /// Whether `other` rotates by the same table (one [`DeviceStep`] serves both).
    pub fn same_rope(&self, other: &MlaAttention) -> bool {
        self.spec.qk_rope_head_dim == other.spec.qk_rope_head_dim
            && self.spec.rope == other.spec.rope
            && self.rope == other.rope
    }

    /// Whether decode tokens take the fused kernels (`--gpu-attention fused`).
    pub fn fused_on(&self) -> bool {
        self.fused.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// cos/sin of one position, passed by value (the kernels' `Rot`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Rot {
    cos: [f32; MAX_ROT],
    sin: [f32; MAX_ROT],
}

// SAFETY: plain-old-data with the C layout of the kernels' `Rot`.
unsafe impl DeviceRepr for Rot {}

static KERNELS: crate::weights::cuda::KernelSet = crate::weights::cuda::KernelSet::new();

/// `mla_absorb`, `mla_attend` and `mla_expand` for `dev`; `None` (the generic path) where they
/// failed to compile, with the reason printed once, or on a second device.
fn kernels(dev: &CudaDevice) -> Option<&'static [CudaFunction]> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    KERNELS.get_or_warn(
        dev,
        || format!("{SCALE_SRC}{ROW_DOT_SRC}{SRC}"),
        &["mla_absorb", "mla_attend", "mla_expand", "mla_head_rows"],
        &WARNED,
        "fused MLA decode kernels",
        "using tensor ops",
    )
}

/// Uninitialised device memory for `n` f32 values.
///
/// # Safety
/// Every element must be written before it is read.
unsafe fn alloc(dev: &CudaDevice, n: usize) -> Result<CudaSlice<f32>> {
    dev.cuda_stream()
        .alloc(n)
        .map_err(|e| driver("allocation", e))
}

/// Runs `f` with the f32 device slice of contiguous tensor `t` (offset applied, `len` values).
macro_rules! with_view {
    ($t:expr, $len:expr, |$v:ident| $body:expr) => {{
        let (st, layout) = $t.storage_and_layout();
        let Storage::Cuda(cs) = &*st else {
            return Err(Error::Input("internal: MLA input is not on the GPU".into()));
        };
        let s = cs.as_cuda_slice::<f32>()?;
        let $v = s.slice(layout.start_offset()..layout.start_offset() + $len);
        $body
    }};
}

/// `q_a_proj` and `kv_a_proj_with_mqa` stacked into one packed matrix where both are packed on
/// the GPU alike without biases; the two layers become views of its rows (no second copy).
pub(super) fn stack_a(q: &mut QProj, kv_a: &mut Linear) -> Result<Option<Linear>> {
    let QProj::Lora { a, .. } = q else {
        return Ok(None);
    };
    let (Some(qa), Some(kva)) = (a.device_matrix(), kv_a.device_matrix()) else {
        return Ok(None);
    };
    let Some((stacked, mut views)) = DeviceMatrix::stack(&[qa, kva])? else {
        return Ok(None);
    };
    let view = |m| Linear::from_weight(Weight::Device(std::sync::Arc::new(m)));
    let (kv_view, q_view) = (views.pop(), views.pop());
    if let (Some(qv), Some(kv)) = (q_view, kv_view) {
        *a = view(qv);
        *kv_a = view(kv);
    }
    Ok(Some(view(stacked)))
}

impl MlaAttention {
    /// The fused decode of one token (`x` `[1, D]`) where it applies (CUDA device, compiled
    /// kernels, latent expansion as tensors, `--gpu-attention fused`); `None` otherwise (with
    /// `step`, the caller makes that an error: a fallback would bake the position into the
    /// graph). With `step` (a decode step being captured into a CUDA graph) the kernels read the
    /// position from device memory.
    pub(super) fn decode_cuda(
        &self,
        x: &Tensor,
        pos0: usize,
        kv: &mut LayerKv,
        step: Option<&DeviceStep>,
    ) -> Result<Option<Tensor>> {
        let Device::Cuda(dev) = x.device() else {
            return Ok(None);
        };
        // The latent expansion: f32 tensors, or mlx-lm's packed `embed_q` / `unembed_out`.
        let (tensors, packed) = match &self.latent {
            Latent::Tensors { k_up_t, v_up } => (Some((k_up_t, v_up)), None),
            Latent::Packed {
                embed_q,
                unembed_out,
            } => (None, Some((embed_q, unembed_out))),
            _ => return Ok(None),
        };
        let (h, dn, dr, dv, c) = (
            self.heads,
            self.spec.qk_nope_head_dim,
            self.spec.qk_rope_head_dim,
            self.spec.v_head_dim,
            self.spec.kv_lora_rank,
        );
        let fits = self.fused.load(std::sync::atomic::Ordering::Relaxed)
            && dr / 2 <= MAX_ROT
            && dr % 2 == 0
            && c % 4 == 0
            && dv % 4 == 0
            && attend_shared(pos0 + 1) <= crate::weights::cuda::SHARED_MAX
            && x.dtype() == candle_core::DType::F32;
        let Some([absorb, attend, expand, head_rows]) = kernels(dev).filter(|_| fits) else {
            return Ok(None);
        };
        // With the stacked `q_a`/`kv_a` matrix, one product gives both (rows `..r` and `r..`).
        let (q, ckv) = match (&self.q, &self.stacked_a) {
            (QProj::Lora { norm, b, .. }, Some(st)) => {
                let r = norm.weight().elem_count();
                let both = st.forward(x)?;
                let q_a = both.narrow(1, 0, r)?;
                (b.forward_normed(&q_a, norm)?, both.narrow(1, r, c + dr)?)
            }
            (QProj::Lora { a, norm, b }, None) => (
                b.forward_normed(&a.forward(x)?, norm)?,
                self.kv_a.forward(x)?,
            ),
            (QProj::Plain(p), _) => (p.forward(x)?, self.kv_a.forward(x)?),
        };
        let (q, ckv) = (q.contiguous()?, ckv.contiguous()?);
        let w = self.kv_a_norm.weight().contiguous()?;
        let mut rot = Rot {
            cos: [0.0; MAX_ROT],
            sin: [0.0; MAX_ROT],
        };
        let mode: u32 = if !self.spec.rope {
            0
        } else {
            let (cos, sin) = self.rope.values(pos0);
            rot.cos[..cos.len()].copy_from_slice(&cos);
            rot.sin[..sin.len()].copy_from_slice(&sin);
            if self.spec.rope_interleave {
                2
            } else {
                1
            }
        };
        // The new latent and rope key go straight into the cache, at position `pos`.
        let (lat_buf, krot_buf, pos) = kv.reserve(
            [&[1, c], &[1, dr]],
            candle_core::DType::F32,
            x.device(),
            0,
            1,
        )?;
        // SAFETY (all four): the kernels below write every element before any is read.
        let (mut qlat, mut qr, mut ctx, mut y) = unsafe {
            (
                alloc(dev, h * c)?,
                alloc(dev, h * dr)?,
                alloc(dev, h * c)?,
                alloc(dev, h * dv)?,
            )
        };
        let eps = self.kv_a_norm.eps();
        let (hu, dnu, dru, cu, dvu) = (h as u32, dn as u32, dr as u32, c as u32, dv as u32);
        let stream = dev.cuda_stream();
        // k_up's address for `mla_absorb`'s product, or 0 where the packed `embed_q` takes it.
        let k_up_t = tensors.map(|(k, _)| k.contiguous()).transpose()?;
        let k_up_st = k_up_t.as_ref().map(|t| t.storage_and_layout());
        let (k_up_ptr, k_up_guard) = match &k_up_st {
            Some((st, layout)) => {
                let Storage::Cuda(cs) = &**st else {
                    return Err(Error::Input("internal: MLA k_up is not on the GPU".into()));
                };
                let (p, g) = cs.as_cuda_slice::<f32>()?.device_ptr(&stream);
                (p + 4 * layout.start_offset() as u64, Some(g))
            }
            None => (0u64, None),
        };
        let cap = lat_buf.dim(0)?;
        // A captured step serves every later position of this cache: its scores' shared
        // memory is sized for all of them, and its RoPE table must cover them.
        if let Some(st) = step {
            if st.positions < cap || attend_shared(cap) > crate::weights::cuda::SHARED_MAX {
                return Err(Error::Input(format!(
                    "graph capture: a cache of {cap} positions against a RoPE table of {} and \
                     {} bytes of shared memory",
                    st.positions,
                    crate::weights::cuda::SHARED_MAX
                )));
            }
        }
        let (dpos, _dpos_guard) = match step {
            Some(st) => {
                let (p, g) = st.pos.device_ptr(&stream);
                (p, Some(g))
            }
            None => (0u64, None),
        };
        let (rope_ptr, rope_guard) = match step {
            Some(st) => {
                let (p, g) = st.rope.device_ptr(&stream);
                (p, Some(g))
            }
            None => (0u64, None),
        };
        let tiles = |n: usize| (n.div_ceil(128) as u32).max(1);
        with_view!(q, h * (dn + dr), |qv| with_view!(
            ckv,
            c + dr,
            |cv| with_view!(w, c, |wv| with_view!(lat_buf, cap * c, |latv| with_view!(
                krot_buf,
                cap * dr,
                |krv| {
                    // The cache buffers are shared tensors, so only read-only views of them
                    // exist: the kernel writes row `pos` through them.
                    // With a device position, the buffers' starts: the kernel adds the row.
                    let row = if step.is_some() { 0 } else { pos };
                    let lat = latv.slice(row * c..(row + 1) * c);
                    let krot = krv.slice(row * dr..(row + 1) * dr);
                    let mut b = stream.launch_builder(absorb);
                    b.arg(&qv)
                        .arg(&cv)
                        .arg(&wv)
                        .arg(&eps)
                        .arg(&rot)
                        .arg(&mode)
                        .arg(&dnu)
                        .arg(&dru)
                        .arg(&cu)
                        .arg(&k_up_ptr)
                        .arg(&mut qlat)
                        .arg(&mut qr)
                        .arg(&lat)
                        .arg(&krot)
                        .arg(&dpos)
                        .arg(&rope_ptr);
                    let cfg = LaunchConfig {
                        // With packed `embed_q` its product is a launch of its own.
                        grid_dim: (hu, if packed.is_some() { 1 } else { tiles(c) }, 1),
                        block_dim: (WIDE, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: reads H·(dn+dr) query values, C+dr latent values, C weights and,
                    // where its address is not 0, k_up (H·dn·C, contiguous, held above); writes
                    // `qlat` (unless k_up is 0) and `qr` (allocated above for exactly their
                    // sizes) and row `pos` of the cache's latent and rope-key buffers (reserved
                    // above, below `cap`; with `dpos`, the row it holds, below `cap` as checked
                    // above, and that row of the RoPE table, which covers `cap`), which nothing
                    // else touches until this step reads them.
                    unsafe { b.launch(cfg) }.map_err(|e| driver("MLA absorb kernel", e))?;
                    if let Some((embed_q, _)) = packed {
                        // qlat[h] = embed_q[h] · q_nope[h]: rows h·C.. of the packed [H·C, dn].
                        head_product(&stream, head_rows, embed_q, &qv, dn + dr, h, &mut qlat)?;
                    }
                }
            )))
        ));
        drop(k_up_guard);
        drop(rope_guard);
        let (lat, krot) = kv.commit(1)?;
        let s = lat.dim(0)?;
        // With a device position the scores' memory is sized for the whole cache (checked).
        let smem = attend_shared(if step.is_some() { cap } else { s });
        if attend_shared(s) > crate::weights::cuda::SHARED_MAX {
            return Err(Error::Input(format!(
                "internal: MLA cache of {s} tokens past the fused kernel's shared memory"
            )));
        }
        let (lat, krot) = (lat.contiguous()?, krot.contiguous()?);
        let (su, scale) = (s as u32, self.spec.softmax_scale as f32);
        with_view!(lat, s * c, |lv| with_view!(krot, s * dr, |kv| {
            let mut b = stream.launch_builder(attend);
            b.arg(&qlat)
                .arg(&qr)
                .arg(&lv)
                .arg(&kv)
                .arg(&su)
                .arg(&cu)
                .arg(&dru)
                .arg(&scale)
                .arg(&mut ctx)
                .arg(&dpos);
            let cfg = LaunchConfig {
                grid_dim: (hu, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            // SAFETY: block h reads its query rows and the S cached latents and keys (S: `su`,
            // or the device position plus one, at most `cap`: the views span `s` rows here,
            // the buffers `cap`), keeps S scores in the dynamic shared memory sized for them,
            // and writes row h of `ctx`.
            unsafe { b.launch(cfg) }.map_err(|e| driver("MLA attend kernel", e))?;
        }));
        if let Some((_, unembed_out)) = packed {
            // y[h] = unembed_out[h] · ctx[h]: rows h·dv.. of the packed [H·dv, C].
            head_product(&stream, head_rows, unembed_out, &ctx, c, h, &mut y)?;
            let y = wrap(dev, y, (1, h * dv));
            return Ok(Some(self.o.forward(&y)?));
        }
        let Some((_, v_up)) = tensors else {
            return Err(Error::Input(
                "internal: MLA without its value expansion".into(),
            ));
        };
        let v_up = v_up.contiguous()?;
        with_view!(v_up, h * c * dv, |vuv| {
            let mut b = stream.launch_builder(expand);
            b.arg(&ctx).arg(&vuv).arg(&cu).arg(&dvu).arg(&mut y);
            let cfg = LaunchConfig {
                grid_dim: (hu, tiles(dv), 1),
                block_dim: (WIDE, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: reads `ctx` (H·C) and v_up (H·C·dv); writes `y` (H·dv values).
            unsafe { b.launch(cfg) }.map_err(|e| driver("MLA expand kernel", e))?;
        });
        let y = wrap(dev, y, (1, h * dv));
        Ok(Some(self.o.forward(&y)?))
    }
}

/// Lanes a row of `k` columns takes in `mla_head_rows` (a speed choice only: the kernel is right
/// for any of 8, 16, 32): short rows share a warp.
fn head_lanes(k: usize) -> u32 {
    match k {
        0..=256 => 8,
        257..=512 => 16,
        _ => 32,
    }
}

/// `out[h·R + r]` = row `h·R + r` of the packed `[H·R, K]` matrix `m` times
/// `input[h·stride ..][..K]` for every head `h < heads` (`mla_head_rows`).
fn head_product(
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    f: &CudaFunction,
    m: &DeviceMatrix,
    input: &impl DevicePtr<f32>,
    stride: usize,
    heads: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    let (r, k) = (m.rows() / heads, m.cols());
    let p = m.params();
    let (kind, bits, group) = (m.kind(), p.bits as u32, p.group_size as u32);
    let (stride_u, r_u, k_u, lanes) = (stride as u32, r as u32, k as u32, head_lanes(k));
    let (packed, guard) = m.packed(stream);
    let (input, input_guard) = input.device_ptr(stream);
    let mut b = stream.launch_builder(f);
    b.arg(&packed)
        .arg(&kind)
        .arg(&bits)
        .arg(&group)
        .arg(&input)
        .arg(&stride_u)
        .arg(&r_u)
        .arg(&k_u)
        .arg(&lanes)
        .arg(out);
    let cfg = LaunchConfig {
        grid_dim: (heads as u32, r_u.div_ceil(THREADS / lanes), 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: crate::weights::cuda::x_bytes(k) as u32,
    };
    // SAFETY: block (h, t) copies K inputs of head h (the caller's buffer holds heads · stride
    // ≥ (heads - 1) · stride + K of them) into the shared memory sized for them; each of its
    // THREADS / lanes rows (a warp or `lanes` lanes; past R, row R - 1 again, unstored) reads
    // one packed row of m (H·R rows of K columns, a form the kernels take: checked by the
    // caller) and writes out[h·R + r] (`out` holds H·R values).
    unsafe { b.launch(cfg) }.map_err(|e| driver("MLA packed head product", e))?;
    drop((guard, input_guard));
    Ok(())
}
