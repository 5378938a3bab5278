//! Kimi Delta Attention (Kimi-Linear's linear-attention `self_attn` layers), mirroring HF
//! transformers' `KimiLinearDeltaAttention`: separate `q_proj`/`k_proj`/`v_proj`, a causal
//! depthwise convolution with SiLU over each (`q_conv1d`/`k_conv1d`/`v_conv1d`; its last `K − 1`
//! inputs are the convolution state), the delta rule on L2-normalised queries and keys with a
//! **per-channel** decay `g = −exp(A_log[h])·softplus(f_b_proj(f_a_proj(x)) + dt_bias)` (one value
//! per head and key channel, where Qwen3-Next's gated DeltaNet has one per head) and write
//! strength `β = sigmoid(b_proj(x))`, an output RMSNorm gated by
//! `sigmoid(g_b_proj(g_a_proj(x)))`, and `o_proj`.
//!
//! As for [`super::deltanet`], the recurrence runs token by token in f32 for prefill and decode
//! alike (HF computes prefill in chunks: the same sums in another order), so a prefill followed by
//! decode steps carries exactly the state a full-sequence pass would.

use candle_core::Tensor;

use crate::config::DeltaNetSpec;
use crate::error::Result;
use crate::weights::Vb;

use super::deltanet::{inv_l2, silu, softplus};
use super::layers::{rows, DeltaState, Linear};

/// One KDA layer.
#[derive(Debug)]
pub struct Kda {
    heads: usize,
    dim: usize,
    kernel: usize,
    q: Linear,
    k: Linear,
    v: Linear,
    /// `[3·H·d, K]`: the q, k and v kernels one after another.
    conv: Vec<f32>,
    f_a: Linear,
    f_b: Linear,
    /// `[H·d]`.
    dt_bias: Vec<f32>,
    /// `−exp(A_log)` per head.
    neg_a: Vec<f32>,
    beta: Linear,
    g_a: Linear,
    g_b: Linear,
    norm: Vec<f32>,
    eps: f32,
    out: Linear,
}

impl Kda {
    /// Loads the module `vb` (`…layers.{i}.self_attn`) of a model with residual width `hidden`;
    /// HF's `{q,k,v}_conv1d.weight` `[C, 1, K]` or mlx-lm's `{q,k,v}_conv.conv.weight` `[C, K, 1]`
    /// (the same element order).
    pub fn load(vb: &Vb, hidden: usize, spec: &DeltaNetSpec, eps: f64) -> Result<Self> {
        let (h, d, kern) = (spec.num_k_heads, spec.k_head_dim, spec.conv_kernel);
        let c = h * d;
        let mut conv = Vec::with_capacity(3 * c * kern);
        for p in ["q", "k", "v"] {
            let hf = vb.pp(format!("{p}_conv1d"));
            let (key, shape) = if hf.has("weight") || !vb.pp(format!("{p}_conv.conv")).has("weight")
            {
                (hf.key("weight"), [c, 1, kern])
            } else {
                (vb.pp(format!("{p}_conv.conv")).key("weight"), [c, kern, 1])
            };
            conv.extend(vb.ck.f32_vec(&key, &shape)?);
        }
        let a_key = vb.key("A_log");
        let a_log = vb
            .ck
            .f32_vec(&a_key, &[1, 1, h, 1])
            .or_else(|e| vb.ck.f32_vec(&a_key, &[h]).map_err(|_| e))?;
        let l = |n: &str, o, i| Linear::load(&vb.pp(n), o, i, false);
        Ok(Kda {
            heads: h,
            dim: d,
            kernel: kern,
            q: l("q_proj", c, hidden)?,
            k: l("k_proj", c, hidden)?,
            v: l("v_proj", c, hidden)?,
            conv,
            f_a: l("f_a_proj", d, hidden)?,
            f_b: l("f_b_proj", c, d)?,
            dt_bias: vb.ck.f32_vec(&vb.key("dt_bias"), &[c])?,
            neg_a: a_log.iter().map(|a| -a.exp()).collect(),
            beta: l("b_proj", h, hidden)?,
            g_a: l("g_a_proj", d, hidden)?,
            g_b: l("g_b_proj", c, d)?,
            norm: vb.ck.f32_vec(&vb.pp("o_norm").key("weight"), &[d])?,
            eps: eps as f32,
            out: l("o_proj", hidden, c)?,
        })
    }

    /// Runs `x` `[T, H]` after the tokens `state` has seen; returns `[T, H]`.
    pub fn forward(&self, x: &Tensor, state: &mut DeltaState) -> Result<Tensor> {
        let (nh, d, kern) = (self.heads, self.dim, self.kernel);
        let c = nh * d;
        let (q, k, v) = (
            rows(&self.q.forward(x)?)?,
            rows(&self.k.forward(x)?)?,
            rows(&self.v.forward(x)?)?,
        );
        let f = rows(&self.f_b.forward(&self.f_a.forward(x)?)?)?;
        let b = rows(&self.beta.forward(x)?)?;
        let gate = rows(&self.g_b.forward(&self.g_a.forward(x)?)?)?;
        if state.conv.is_empty() {
            state.conv = vec![0.0; 3 * c * (kern - 1)];
            state.recurrent = vec![0.0; nh * d * d];
        }
        let mut out = vec![0.0f32; q.len() * c];
        let mut conv_out = vec![0.0f32; 3 * c];
        let mut delta = vec![0.0f32; d];
        let mut decay = vec![0.0f32; d];
        for t in 0..q.len() {
            // Causal depthwise convolution + SiLU over [q, k, v]; the state keeps the last K − 1
            // inputs of each channel.
            for (ch, o) in conv_out.iter_mut().enumerate() {
                let input = [&q[t], &k[t], &v[t]][ch / c][ch % c];
                let w = &self.conv[ch * kern..(ch + 1) * kern];
                let hist = &mut state.conv[ch * (kern - 1)..(ch + 1) * (kern - 1)];
                let mut acc = w[kern - 1] * input;
                for j in 0..kern - 1 {
                    acc += w[j] * hist[j];
                }
                *o = silu(acc);
                if kern > 1 {
                    hist.rotate_left(1);
                    hist[kern - 2] = input;
                }
            }
            let (q_all, rest) = conv_out.split_at(c);
            let (k_all, v_all) = rest.split_at(c);
            let o = &mut out[t * c..(t + 1) * c];
            for h in 0..nh {
                let r = h * d..(h + 1) * d;
                let (qh, kh, vh) = (&q_all[r.clone()], &k_all[r.clone()], &v_all[r.clone()]);
                let qn = inv_l2(qh) / (d as f32).sqrt();
                let kn = inv_l2(kh);
                let beta = 1.0 / (1.0 + (-b[t][h]).exp());
                for (i, g) in decay.iter_mut().enumerate() {
                    let j = h * d + i;
                    *g = (self.neg_a[h] * softplus(f[t][j] + self.dt_bias[j])).exp();
                }
                let st = &mut state.recurrent[h * d * d..(h + 1) * d * d];
                // Decay row i (key channel i), then kv_mem = Sᵀk, delta = (v − kv_mem)·β,
                // S += k ⊗ delta, o = Sᵀq.
                delta.iter_mut().for_each(|x| *x = 0.0);
                for i in 0..d {
                    let ki = kh[i] * kn;
                    let row = &mut st[i * d..(i + 1) * d];
                    for (dl, s) in delta.iter_mut().zip(row.iter_mut()) {
                        *s *= decay[i];
                        *dl += *s * ki;
                    }
                }
                for (dl, &vv) in delta.iter_mut().zip(vh) {
                    *dl = (vv - *dl) * beta;
                }
                let oh = &mut o[r.clone()];
                for i in 0..d {
                    let (ki, qi) = (kh[i] * kn, qh[i] * qn);
                    let row = &mut st[i * d..(i + 1) * d];
                    for ((s, &dl), oo) in row.iter_mut().zip(&delta).zip(oh.iter_mut()) {
                        *s += ki * dl;
                        *oo += *s * qi;
                    }
                }
                // Gated RMSNorm over the head: norm(o)·w·sigmoid(gate).
                let ms: f32 = oh.iter().map(|x| x * x).sum::<f32>() / d as f32;
                let inv = 1.0 / (ms + self.eps).sqrt();
                for (i, oo) in oh.iter_mut().enumerate() {
                    let g = gate[t][h * d + i];
                    *oo = *oo * inv * self.norm[i] / (1.0 + (-g).exp());
                }
            }
        }
        let y = Tensor::from_vec(out, (q.len(), c), x.device())?;
        self.out.forward(&y)
    }
}
