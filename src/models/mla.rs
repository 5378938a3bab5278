//! Multi-head latent attention (DeepSeek-V3, Kimi-K2, GLM-4.7-Flash; Kimi-Linear without RoPE),
//! as HF transformers' `DeepseekV3Attention` (`KimiLinearAttention`) computes it. The KV cache holds the compressed latent (`kv_lora_rank`
//! values, normalised) and the one shared RoPE key (`qk_rope_head_dim`) per token; per-head keys
//! and values are expanded from the latent at each step.
//!
//! Weights: HF `kv_b_proj` `[H·(nope+v), C]`, or mlx-lm's split `embed_q` `[H, C, nope]` and
//! `unembed_out` `[H, v, C]`; `q_a_proj`/`q_a_layernorm`/`q_b_proj` or a plain `q_proj`.

use candle_core::Tensor;

use crate::config::MlaSpec;
use crate::error::{Error, Result};
use crate::weights::{load_stacked, Vb};

use super::layers::{causal_mask, LayerKv, Linear, RmsNorm, Rope, Weight};
use crate::weights::host::HostMatrix;

/// HF uses eps 1e-6 for both latent norms, whatever `rms_norm_eps` says.
const LATENT_NORM_EPS: f64 = 1e-6;

/// The latent expansion (`kv_b_proj`, or mlx-lm's `embed_q`/`unembed_out`), used in absorbed form:
/// a query is mapped into the latent space (`q_nope · k_upᵀ`) and the attention output out of
/// it (`ctx · v_up`), so no cached latent is ever expanded per head.
#[derive(Debug)]
enum Latent {
    /// On a device: `k_up` transposed `[H, nope, C]` and `v_up` `[H, C, v]`, f32 tensors.
    Tensors { k_up_t: Tensor, v_up: Tensor },
    /// On CUDA with packed dense weights, mlx-lm's `embed_q` `[H·C, nope]` and `unembed_out`
    /// `[H·v, C]` packed as in the checkpoint (a seventh of the f32 tensors' bytes): the decode
    /// kernels multiply by them per head (`DeviceMatrix::upload` only packs a form they take);
    /// tensor ops (prefill) decode them per call.
    #[cfg(feature = "cuda")]
    Packed {
        embed_q: crate::weights::cuda::DeviceMatrix,
        unembed_out: crate::weights::cuda::DeviceMatrix,
    },
    /// On the CPU, HF `kv_b_proj` `[H·(nope + v), C]` in its checkpoint form: per head, `nope`
    /// key rows then `v` value rows.
    Rows(HostMatrix),
    /// On the CPU, mlx-lm's `embed_q` `[H·C, nope]` and `unembed_out` `[H·v, C]`.
    Mlx {
        embed_q: HostMatrix,
        unembed_out: HostMatrix,
    },
}

#[derive(Debug)]
enum QProj {
    Lora { a: Linear, norm: RmsNorm, b: Linear },
    Plain(Linear),
}

/// Fills one head's row of output from one head's row of input.
type HeadFn<'a> = dyn Fn(usize, &[f32], &mut [f32]) + 'a;

/// One MLA attention layer.
#[derive(Debug)]
pub struct MlaAttention {
    q: QProj,
    kv_a: Linear,
    kv_a_norm: RmsNorm,
    /// The latent key/value expansion.
    latent: Latent,
    o: Linear,
    rope: Rope,
    heads: usize,
    spec: MlaSpec,
    /// Decode tokens on CUDA take the fused kernels ([`cuda`]); off: tensor ops throughout.
    fused: std::sync::atomic::AtomicBool,
    /// On CUDA with packed weights: `q_a_proj` and `kv_a_proj_with_mqa` stacked by rows (one
    /// product per decode token; the two projections are views of its rows).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    stacked_a: Option<Linear>,
}

#[cfg(feature = "cuda")]
#[path = "mla_cuda.rs"]
mod cuda;
#[cfg(feature = "cuda")]
pub use cuda::DeviceStep;

/// A decode step's position in device memory (CUDA graphs): none without CUDA.
#[cfg(not(feature = "cuda"))]
#[derive(Debug)]
pub enum DeviceStep {}

impl MlaAttention {
    /// Loads the module `vb` (`…layers.{i}.self_attn`).
    pub fn load(vb: &Vb, hidden: usize, heads: usize, m: &MlaSpec) -> Result<Self> {
        let (dn, dr, dv, c) = (
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim,
            m.kv_lora_rank,
        );
        let dq = dn + dr;
        let (ck, quant, dev) = (vb.ck, vb.quant, vb.dev);
        let l = |n: &str, o, i, b| Linear::load(&vb.pp(n), o, i, b);
        let q = match m.q_lora_rank {
            Some(r) => QProj::Lora {
                a: l("q_a_proj", r, hidden, m.attention_bias)?,
                norm: RmsNorm::load(&vb.pp("q_a_layernorm"), r, LATENT_NORM_EPS)?,
                b: l("q_b_proj", heads * dq, r, false)?,
            },
            None => QProj::Plain(l("q_proj", heads * dq, hidden, false)?),
        };
        let kv_b = vb.pp("kv_b_proj");
        let latent = if kv_b.has("weight") {
            let tensors = |w: Tensor| -> Result<Latent> {
                let w = w.reshape((heads, dn + dv, c))?;
                Ok(Latent::Tensors {
                    k_up_t: w.narrow(1, 0, dn)?.contiguous()?,
                    v_up: w.narrow(1, dn, dv)?.transpose(1, 2)?.contiguous()?,
                })
            };
            match Weight::load(&kv_b, heads * (dn + dv), c)? {
                Weight::Host(m) => Latent::Rows(m),
                Weight::Dense(w) => tensors(w)?,
                // Absorbed MLA multiplies by the expansion per head: kept as f32 tensors.
                #[cfg(feature = "cuda")]
                Weight::Device(m) => tensors(m.decode_all()?)?,
            }
        } else if vb.pp("embed_q").has("weight") {
            // mlx-lm: embed_q = key rows transposed [H, C, nope]; unembed_out = value rows [H, v, C].
            #[cfg(feature = "cuda")]
            let packed = match (
                Weight::device_stacked(&vb.pp("embed_q"), heads, c, dn)?,
                Weight::device_stacked(&vb.pp("unembed_out"), heads, dv, c)?,
            ) {
                (Some(embed_q), Some(unembed_out)) => Some(Latent::Packed {
                    embed_q,
                    unembed_out,
                }),
                _ => None,
            };
            #[cfg(not(feature = "cuda"))]
            let packed = None;
            if let Some(packed) = packed {
                packed
            } else if dev.is_cpu() {
                Latent::Mlx {
                    embed_q: Weight::load_stacked(&vb.pp("embed_q"), heads, c, dn)?,
                    unembed_out: Weight::load_stacked(&vb.pp("unembed_out"), heads, dv, c)?,
                }
            } else {
                let k = Tensor::from_vec(
                    load_stacked(ck, quant, &vb.key("embed_q"), &[heads], c, dn)?,
                    (heads, c, dn),
                    dev,
                )?;
                let v = Tensor::from_vec(
                    load_stacked(ck, quant, &vb.key("unembed_out"), &[heads], dv, c)?,
                    (heads, dv, c),
                    dev,
                )?;
                Latent::Tensors {
                    k_up_t: k.transpose(1, 2)?.contiguous()?,
                    v_up: v.transpose(1, 2)?.contiguous()?,
                }
            }
        } else {
            return Err(Error::MissingTensor {
                key: kv_b.key("weight"),
                dir: ck.dir().to_path_buf(),
                hint: format!(" (nor mlx-lm's `{}` / `unembed_out`): MLA needs the latent key/value expansion", vb.key("embed_q")),
            });
        };
        #[allow(unused_mut)]
        let (mut q, mut kv_a) = (
            q,
            l("kv_a_proj_with_mqa", c + dr, hidden, m.attention_bias)?,
        );
        #[cfg(feature = "cuda")]
        let stacked_a = cuda::stack_a(&mut q, &mut kv_a)?;
        #[cfg(not(feature = "cuda"))]
        let stacked_a = None;
        Ok(MlaAttention {
            q,
            stacked_a,
            kv_a,
            kv_a_norm: RmsNorm::load(&vb.pp("kv_a_layernorm"), c, LATENT_NORM_EPS)?,
            latent,
            o: l("o_proj", hidden, heads * dv, m.attention_bias)?,
            rope: Rope::from_inv_freq(m.inv_freq.clone(), m.attention_factor),
            heads,
            fused: true.into(),
            spec: m.clone(),
        })
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        // Interleaved: rotate adjacent pairs in place. HF rotates them and then de-interleaves
        // q and k alike, which leaves every score unchanged.
        Ok(if self.spec.rope_interleave {
            candle_nn::rotary_emb::rope_i(&x, cos, sin)?
        } else {
            candle_nn::rotary_emb::rope(&x, cos, sin)?
        })
    }

    /// `q_nope · k_upᵀ` per head: `[H, T, nope]` → `[H, T, C]`.
    fn absorb_query(&self, q_nope: &Tensor) -> Result<Tensor> {
        let (h, t, dn) = q_nope.dims3()?;
        let (c, dv) = (self.spec.kv_lora_rank, self.spec.v_head_dim);
        let host = |f: &HeadFn| -> Result<Tensor> {
            let q: Vec<f32> = q_nope.flatten_all()?.to_vec1()?;
            let mut out = vec![0f32; h * t * c];
            for (i, (qi, oi)) in q.chunks(dn).zip(out.chunks_mut(c)).enumerate() {
                f(i / t, qi, oi);
            }
            Ok(Tensor::from_vec(out, (h, t, c), q_nope.device())?)
        };
        match &self.latent {
            Latent::Tensors { k_up_t, .. } => Ok(q_nope.matmul(k_up_t)?),
            #[cfg(feature = "cuda")]
            Latent::Packed { embed_q, .. } => {
                let k_up_t = embed_q.decode_all()?.reshape((h, c, dn))?.transpose(1, 2)?;
                Ok(q_nope.matmul(&k_up_t.contiguous()?)?)
            }
            Latent::Rows(m) => host(&|hd, q, o| {
                let r0 = hd * (dn + dv);
                m.weighted_rows(r0..r0 + dn, q, o)
            }),
            Latent::Mlx { embed_q, .. } => {
                host(&|hd, q, o| o.copy_from_slice(&embed_q.matmul_range(hd * c..(hd + 1) * c, q)))
            }
        }
    }

    /// `ctx · v_up` per head: `[H, T, C]` → `[H, T, v]`.
    fn expand_values(&self, ctx: &Tensor) -> Result<Tensor> {
        let (h, t, c) = ctx.dims3()?;
        let (dn, dv) = (self.spec.qk_nope_head_dim, self.spec.v_head_dim);
        let host = |rows: &dyn Fn(usize) -> std::ops::Range<usize>, m: &HostMatrix| {
            let x: Vec<f32> = ctx.flatten_all()?.to_vec1()?;
            let mut out = Vec::with_capacity(h * t * dv);
            for hd in 0..h {
                out.extend(m.matmul_range(rows(hd), &x[hd * t * c..(hd + 1) * t * c]));
            }
            Ok::<_, Error>(Tensor::from_vec(out, (h, t, dv), ctx.device())?)
        };
        match &self.latent {
            Latent::Tensors { v_up, .. } => Ok(ctx.matmul(v_up)?),
            #[cfg(feature = "cuda")]
            Latent::Packed { unembed_out, .. } => {
                let v_up = unembed_out
                    .decode_all()?
                    .reshape((h, dv, c))?
                    .transpose(1, 2)?;
                Ok(ctx.matmul(&v_up.contiguous()?)?)
            }
            Latent::Rows(m) => host(&|hd| hd * (dn + dv) + dn..(hd + 1) * (dn + dv), m),
            Latent::Mlx { unembed_out, .. } => host(&|hd| hd * dv..(hd + 1) * dv, unembed_out),
        }
    }

    /// Whether decode tokens on CUDA take the fused kernels (default) or tensor ops.
    pub fn set_fused(&self, on: bool) {
        self.fused.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Attends `x` `[T, D]` at positions `pos0..pos0+T`; `kv` holds (latent `[S, C]`, rope key `[S, dr]`).
    /// With `step` (one token of a decode step captured into a CUDA graph) only the fused
    /// kernels run, reading the position from device memory; anything else is an error.
    pub fn forward(
        &self,
        x: &Tensor,
        pos0: usize,
        kv: &mut LayerKv,
        step: Option<&DeviceStep>,
    ) -> Result<Tensor> {
        let (t, _) = x.dims2()?;
        #[cfg(feature = "cuda")]
        if t == 1 {
            if let Some(y) = self.decode_cuda(x, pos0, kv, step)? {
                return Ok(y);
            }
            if step.is_some() {
                return Err(Error::Input(
                    "graph capture: MLA decode left the fused kernels".into(),
                ));
            }
            if !x.device().is_cpu() && self.fused.load(std::sync::atomic::Ordering::Relaxed) {
                super::fallback::attention();
            }
        }
        if step.is_some() {
            return Err(Error::Input(format!(
                "graph capture: {t} tokens in one MLA step (a captured step is one token)"
            )));
        }
        let h = self.heads;
        let (dn, dr, dv, c) = (
            self.spec.qk_nope_head_dim,
            self.spec.qk_rope_head_dim,
            self.spec.v_head_dim,
            self.spec.kv_lora_rank,
        );
        let dev = x.device();
        let q = match &self.q {
            QProj::Lora { a, norm, b } => b.forward(&norm.forward(&a.forward(x)?)?)?,
            QProj::Plain(p) => p.forward(x)?,
        };
        let q = q.reshape((t, h, dn + dr))?.transpose(0, 1)?.contiguous()?; // [H, T, dq]
        let ckv = self.kv_a.forward(x)?; // [T, C + dr]
        let lat = self.kv_a_norm.forward(&ckv.narrow(1, 0, c)?)?;
        let (q_rot, k_rot) = if self.spec.rope {
            let (cos, sin) = self.rope.tables(pos0, t, dev)?;
            (
                self.rope(&q.narrow(2, dn, dr)?.unsqueeze(0)?, &cos, &sin)?
                    .squeeze(0)?,
                self.rope(&ckv.narrow(1, c, dr)?.reshape((1, 1, t, dr))?, &cos, &sin)?
                    .reshape((t, dr))?,
            )
        } else {
            // Kimi-Linear: the shared key part is kept, unrotated.
            (q.narrow(2, dn, dr)?, ckv.narrow(1, c, dr)?.contiguous()?)
        };
        let (lat, k_rot) = kv.append(lat, k_rot, 0)?;
        let s = lat.dim(0)?;
        // Absorbed form: scores against the latent cache directly,
        // q_nope·k_nopeᵀ = (q_nope · k_upᵀ) · latᵀ, and values as (p · lat) · v_up, so the cost
        // per token is H·(S·C + C·(nope + v)) instead of expanding S cached latents per head.
        let q_lat = self.absorb_query(&q.narrow(2, 0, dn)?.contiguous()?)?; // [H, T, C]
        let lat_t = lat.t()?.contiguous()?; // [C, S]
        let scores_nope = q_lat.broadcast_matmul(&lat_t)?; // [H, T, S]
        let scores_rope = q_rot
            .contiguous()?
            .broadcast_matmul(&k_rot.t()?.contiguous()?)?; // [H, T, S]
        let mut att = ((scores_nope + scores_rope)? * self.spec.softmax_scale)?;
        if let Some(mask) = causal_mask(t, s, None, dev)? {
            att = att.broadcast_add(&mask)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let ctx = att.broadcast_matmul(&lat.contiguous()?)?; // [H, T, C]
        let y = self.expand_values(&ctx)?; // [H, T, dv]
        let y = y.transpose(0, 1)?.reshape((t, h * dv))?; // [T, H·dv]
        self.o.forward(&y)
    }
}
