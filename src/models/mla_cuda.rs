//! One decode token of MLA on CUDA in absorbed form with two fused kernels (a child module of
//! [`super`], so it reads the layer's fields).
//!
//! `mla_prep` (one block) normalises the new latent, applies RoPE to the shared key and to
//! every head's rope part of the query (cos/sin computed on the host exactly as the generic
//! path does, passed by value: no upload), and splits the query into its nope and rope parts.
//! `mla_attend` (one block per head) scores the query against every cached latent and rope key,
//! takes the softmax and the probability-weighted sum of the cached latents. The projections
//! stay the layer's own products (packed matrix-vector kernel or cuBLAS). Per layer this replaces about twenty launches (RoPE table uploads,
//! narrows made contiguous, the cache transposed every step, scores, scale, softmax) by two.

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, Device, Storage, Tensor};

use super::{Latent, LayerKv, MlaAttention, QProj};
use crate::error::{Error, Result};

/// Most rotary frequency pairs the prep kernel takes (`qk_rope_head_dim / 2`).
const MAX_ROT: usize = 64;
/// Most cached tokens the attend kernel keeps scores for in shared memory (longer sequences
/// take the generic path).
const MAX_SEQ: usize = 12 * 1024;
const THREADS: u32 = 256;

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

// Element i of the rotated rope vector x (dr values): mode 0 none, 1 halves, 2 interleaved.
__device__ float rot_at(const float* x, unsigned int i, unsigned int dr, unsigned int mode,
                        const Rot& r) {
if (mode == 0) return x[i];
if (mode == 2) {
    unsigned int j = i / 2u;
    float c = r.cos[j], s = r.sin[j];
    return (i % 2u == 0u) ? x[i] * c - x[i + 1] * s : x[i - 1] * s + x[i] * c;
}
unsigned int half = dr / 2u, j = i % half;
float c = r.cos[j], s = r.sin[j];
return i < half ? x[i] * c - x[i + half] * s : x[i - half] * s + x[i] * c;
}

// q [H*(dn+dr)], ckv [C+dr], w [C] -> lat [C] (RMS-normalised), krot [dr], qn [H*dn], qr [H*dr].
extern "C" __global__ void mla_prep(const float* q, const float* ckv, const float* w, float eps,
                                    const Rot rot, unsigned int mode, unsigned int H,
                                    unsigned int dn, unsigned int dr, unsigned int C,
                                    float* lat, float* krot, float* qn, float* qr) {
__shared__ float red[32];
unsigned int tid = threadIdx.x, nt = blockDim.x;
float ss = 0.0f;
for (unsigned int c = tid; c < C; c += nt) ss += ckv[c] * ckv[c];
ss = block_reduce(ss, red, 0);
float scale = rsqrtf(ss / (float)C + eps);
for (unsigned int c = tid; c < C; c += nt) lat[c] = scale * ckv[c] * w[c];
for (unsigned int i = tid; i < dr; i += nt) krot[i] = rot_at(ckv + C, i, dr, mode, rot);
unsigned int dq = dn + dr;
for (unsigned int i = tid; i < H * dn; i += nt) qn[i] = q[(i / dn) * dq + i % dn];
for (unsigned int i = tid; i < H * dr; i += nt)
    qr[i] = rot_at(q + (i / dr) * dq + dn, i % dr, dr, mode, rot);
}

// Per head (block): scores of qlat [H,C] / qr [H,dr] against lat [S,C] / krot [S,dr], times
// scale, softmax, ctx [H,C] = sum_s p_s lat[s].
extern "C" __global__ void mla_attend(const float* qlat, const float* qr, const float* lat,
                                      const float* krot, unsigned int S, unsigned int C,
                                      unsigned int dr, float scale, float* ctx) {
extern __shared__ float sc[];
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
    for (unsigned int s = 0; s < S; ++s) acc = fmaf(sc[s] / z, lat[(unsigned long long)s * C + c], acc);
    ctx[(unsigned long long)h * C + c] = acc;
}
}
"#;

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

/// `mla_prep` and `mla_attend` for `dev`; `None` (the generic path) where they failed to
/// compile, with the reason printed once, or on a second device.
fn kernels(dev: &CudaDevice) -> Option<(&'static CudaFunction, &'static CudaFunction)> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let f = KERNELS.get_or_warn(
        dev,
        || SRC.to_string(),
        &["mla_prep", "mla_attend"],
        &WARNED,
        "fused MLA decode kernels",
        "using tensor ops",
    )?;
    Some((&f[0], &f[1]))
}

fn driver(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Input(format!("CUDA {what}: {e}"))
}

/// A new f32 tensor on `dev` of `shape` from a slice a kernel filled.
fn wrap(dev: &CudaDevice, s: CudaSlice<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(f32::wrap_cuda_slice(s, dev.clone())),
        shape,
        BackpropOp::none(),
        false,
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

impl MlaAttention {
    /// The fused decode of one token (`x` `[1, D]`) where it applies (CUDA device, compiled
    /// kernels, latent expansion as tensors, `--gpu-attention fused`); `None` otherwise.
    pub(super) fn decode_cuda(
        &self,
        x: &Tensor,
        pos0: usize,
        kv: &mut LayerKv,
    ) -> Result<Option<Tensor>> {
        let Device::Cuda(dev) = x.device() else {
            return Ok(None);
        };
        let Latent::Tensors { k_up_t, v_up } = &self.latent else {
            return Ok(None);
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
            && pos0 < MAX_SEQ
            && x.dtype() == candle_core::DType::F32;
        let Some((prep, attend)) = kernels(dev).filter(|_| fits) else {
            return Ok(None);
        };
        let q = match &self.q {
            QProj::Lora { a, norm, b } => b.forward(&norm.forward(&a.forward(x)?)?)?,
            QProj::Plain(p) => p.forward(x)?,
        }
        .contiguous()?;
        let ckv = self.kv_a.forward(x)?.contiguous()?;
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
        // SAFETY (all four): mla_prep writes every element.
        let (mut lat, mut krot, mut qn, mut qr) = unsafe {
            (
                alloc(dev, c)?,
                alloc(dev, dr)?,
                alloc(dev, h * dn)?,
                alloc(dev, h * dr)?,
            )
        };
        let eps = self.kv_a_norm.eps();
        let (hu, dnu, dru, cu) = (h as u32, dn as u32, dr as u32, c as u32);
        let stream = dev.cuda_stream();
        with_view!(q, h * (dn + dr), |qv| with_view!(
            ckv,
            c + dr,
            |cv| with_view!(w, c, |wv| {
                let mut b = stream.launch_builder(prep);
                b.arg(&qv)
                    .arg(&cv)
                    .arg(&wv)
                    .arg(&eps)
                    .arg(&rot)
                    .arg(&mode)
                    .arg(&hu)
                    .arg(&dnu)
                    .arg(&dru)
                    .arg(&cu)
                    .arg(&mut lat)
                    .arg(&mut krot)
                    .arg(&mut qn)
                    .arg(&mut qr);
                let cfg = LaunchConfig {
                    grid_dim: (1, 1, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: reads H·(dn+dr) query values, C+dr latent values and C weights;
                // writes the four outputs allocated above for exactly their sizes.
                unsafe { b.launch(cfg) }.map_err(|e| driver("MLA prep kernel", e))?;
            })
        ));
        let lat = wrap(dev, lat, &[1, c]);
        let krot = wrap(dev, krot, &[1, dr]);
        let (lat, krot) = kv.append(lat, krot, 0)?;
        let s = lat.dim(0)?;
        if s > MAX_SEQ {
            return Err(Error::Input(format!(
                "internal: MLA cache of {s} tokens past the fused kernel's {MAX_SEQ}"
            )));
        }
        let qn = wrap(dev, qn, &[h, 1, dn]);
        let q_lat = qn.matmul(k_up_t)?.contiguous()?; // [H, 1, C]
        let (lat, krot) = (lat.contiguous()?, krot.contiguous()?);
        // SAFETY: mla_attend writes every element.
        let mut ctx = unsafe { alloc(dev, h * c)? };
        let (su, scale) = (s as u32, self.spec.softmax_scale as f32);
        with_view!(q_lat, h * c, |qlv| with_view!(lat, s * c, |lv| with_view!(
            krot,
            s * dr,
            |kv| {
                let qrv = qr.slice(..);
                let mut b = stream.launch_builder(attend);
                b.arg(&qlv)
                    .arg(&qrv)
                    .arg(&lv)
                    .arg(&kv)
                    .arg(&su)
                    .arg(&cu)
                    .arg(&dru)
                    .arg(&scale)
                    .arg(&mut ctx);
                let cfg = LaunchConfig {
                    grid_dim: (hu, 1, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: (s * 4) as u32,
                };
                // SAFETY: block h reads its query rows and the S cached latents and keys,
                // keeps S scores in the dynamic shared memory sized for them, and writes row
                // h of `ctx` (H·C values).
                unsafe { b.launch(cfg) }.map_err(|e| driver("MLA attend kernel", e))?;
            }
        )));
        let ctx = wrap(dev, ctx, &[h, 1, c]);
        let y = ctx.matmul(v_up)?.reshape((1, h * dv))?; // [H, 1, dv] is [1, H·dv] in memory
        Ok(Some(self.o.forward(&y)?))
    }
}
