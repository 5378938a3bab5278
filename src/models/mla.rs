//! Multi-head latent attention (DeepSeek-V3, Kimi-K2, GLM-4.7-Flash), as HF transformers'
//! `DeepseekV3Attention` computes it. The KV cache holds the compressed latent (`kv_lora_rank`
//! values, normalised) and the one shared RoPE key (`qk_rope_head_dim`) per token; per-head keys
//! and values are expanded from the latent at each step.
//!
//! Weights: HF `kv_b_proj` `[H·(nope+v), C]`, or mlx-lm's split `embed_q` `[H, C, nope]` and
//! `unembed_out` `[H, v, C]`; `q_a_proj`/`q_a_layernorm`/`q_b_proj` or a plain `q_proj`.

use candle_core::Tensor;

use crate::config::MlaSpec;
use crate::error::{Error, Result};
use crate::weights::{load_stacked, Vb};

use super::layers::{causal_mask, LayerKv, Linear, RmsNorm, Rope};

/// HF uses eps 1e-6 for both latent norms, whatever `rms_norm_eps` says.
const LATENT_NORM_EPS: f64 = 1e-6;

#[derive(Debug)]
enum QProj {
    Lora { a: Linear, norm: RmsNorm, b: Linear },
    Plain(Linear),
}

/// One MLA attention layer.
#[derive(Debug)]
pub struct MlaAttention {
    q: QProj,
    kv_a: Linear,
    kv_a_norm: RmsNorm,
    /// Key expansion per head, `[H, C, nope]` (latent → key-nope).
    k_up: Tensor,
    /// Value expansion per head, `[H, C, v]`.
    v_up: Tensor,
    o: Linear,
    rope: Rope,
    heads: usize,
    spec: MlaSpec,
}

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
        let (k_up, v_up) = if kv_b.has("weight") {
            let w = Tensor::from_vec(
                crate::weights::load_matrix(ck, quant, kv_b.path(), heads * (dn + dv), c)?,
                (heads, dn + dv, c),
                dev,
            )?;
            (
                w.narrow(1, 0, dn)?.transpose(1, 2)?.contiguous()?,
                w.narrow(1, dn, dv)?.transpose(1, 2)?.contiguous()?,
            )
        } else if vb.pp("embed_q").has("weight") {
            // mlx-lm: embed_q = key rows transposed [H, C, nope]; unembed_out = value rows [H, v, C].
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
            (k, v.transpose(1, 2)?.contiguous()?)
        } else {
            return Err(Error::MissingTensor {
                key: kv_b.key("weight"),
                dir: ck.dir().to_path_buf(),
                hint: format!(" (nor mlx-lm's `{}` / `unembed_out`): MLA needs the latent key/value expansion", vb.key("embed_q")),
            });
        };
        Ok(MlaAttention {
            q,
            kv_a: l("kv_a_proj_with_mqa", c + dr, hidden, m.attention_bias)?,
            kv_a_norm: RmsNorm::load(&vb.pp("kv_a_layernorm"), c, LATENT_NORM_EPS)?,
            k_up,
            v_up,
            o: l("o_proj", hidden, heads * dv, m.attention_bias)?,
            rope: Rope::from_inv_freq(m.inv_freq.clone(), m.attention_factor),
            heads,
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

    /// Attends `x` `[T, D]` at positions `pos0..pos0+T`; `kv` holds (latent `[S, C]`, rope key `[S, dr]`).
    pub fn forward(&self, x: &Tensor, pos0: usize, kv: &mut LayerKv) -> Result<Tensor> {
        let (t, _) = x.dims2()?;
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
        let (cos, sin) = self.rope.tables(pos0, t, dev)?;
        let q_rot = self
            .rope(&q.narrow(2, dn, dr)?.unsqueeze(0)?, &cos, &sin)?
            .squeeze(0)?;
        let k_rot = self
            .rope(&ckv.narrow(1, c, dr)?.reshape((1, 1, t, dr))?, &cos, &sin)?
            .reshape((t, dr))?;
        let (lat, k_rot) = kv.append(lat, k_rot, 0)?;
        let s = lat.dim(0)?;
        let lat_h = lat.unsqueeze(0)?.broadcast_as((h, s, c))?.contiguous()?;
        let k_nope = lat_h.matmul(&self.k_up)?; // [H, S, dn]
        let v = lat_h.matmul(&self.v_up)?; // [H, S, dv]
        let key = Tensor::cat(
            &[
                k_nope,
                k_rot.unsqueeze(0)?.broadcast_as((h, s, dr))?.contiguous()?,
            ],
            2,
        )?;
        let query = Tensor::cat(&[q.narrow(2, 0, dn)?, q_rot], 2)?.contiguous()?;
        let key = key.contiguous()?;
        let mut att = (query.matmul(&key.t()?.contiguous()?)? * self.spec.softmax_scale)?;
        if let Some(mask) = causal_mask(t, s, None, dev)? {
            att = att.broadcast_add(&mask)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v)?.transpose(0, 1)?.reshape((t, h * dv))?; // [T, H·dv]
        self.o.forward(&y)
    }
}
