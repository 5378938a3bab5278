//! Gated DeltaNet linear attention (Qwen3-Next's `linear_attn` layers), mirroring HF
//! transformers' `Qwen3NextGatedDeltaNet`: the `in_proj_qkvz` / `in_proj_ba` projections (grouped
//! per key head), a causal depthwise convolution with SiLU over q, k and v (its last `K − 1`
//! inputs are the convolution state), the gated delta rule with per-head decay
//! `g = −exp(A_log)·softplus(a + dt_bias)` and write strength `β = sigmoid(b)` on L2-normalised
//! queries and keys, a gated RMSNorm (`norm(o)·silu(z)`), and `out_proj`.
//!
//! The recurrence runs token by token in f32 for prefill and decode alike, so a prefill followed
//! by decode steps carries exactly the state a full-sequence pass would (HF computes prefill in
//! chunks: the same sums in another order).

use candle_core::Tensor;

use crate::config::DeltaNetSpec;
use crate::error::{Error, Result};
use crate::weights::Vb;

use super::layers::{rows, DeltaState, Linear};

/// One gated DeltaNet layer.
#[derive(Debug)]
pub struct DeltaNet {
    spec: DeltaNetSpec,
    in_qkvz: Linear,
    in_ba: Linear,
    /// `[conv_dim, K]`.
    conv: Vec<f32>,
    dt_bias: Vec<f32>,
    /// `−exp(A_log)` per value head.
    neg_a: Vec<f32>,
    norm: Vec<f32>,
    eps: f32,
    out: Linear,
}

pub(super) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `1 / √(Σx² + 1e-6)`: the L2 normalisation HF applies to DeltaNet/KDA queries and keys.
pub(super) fn inv_l2(v: &[f32]) -> f32 {
    1.0 / (v.iter().map(|x| x * x).sum::<f32>() + 1e-6).sqrt()
}

pub(super) fn softplus(x: f32) -> f32 {
    // torch's softplus (beta 1, threshold 20).
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

impl DeltaNet {
    /// Loads the module `vb` (`…layers.{i}.linear_attn`) of a model with residual width `hidden`.
    pub fn load(vb: &Vb, hidden: usize, spec: &DeltaNetSpec, eps: f64) -> Result<Self> {
        let (kd, vd) = (spec.key_dim(), spec.value_dim());
        let conv_dim = spec.conv_dim();
        let k = spec.conv_kernel;
        let conv_key = vb.pp("conv1d").key("weight");
        // HF stores the depthwise kernel `[C, 1, K]`, MLX `[C, K, 1]`: the same element order.
        let conv = vb
            .ck
            .f32_vec(&conv_key, &[conv_dim, 1, k])
            .or_else(|e| vb.ck.f32_vec(&conv_key, &[conv_dim, k, 1]).map_err(|_| e))?;
        let nv = spec.num_v_heads;
        let a_log = vb.ck.f32_vec(&vb.key("A_log"), &[nv])?;
        Ok(DeltaNet {
            in_qkvz: Linear::load(&vb.pp("in_proj_qkvz"), 2 * kd + 2 * vd, hidden, false)?,
            in_ba: Linear::load(&vb.pp("in_proj_ba"), 2 * nv, hidden, false)?,
            conv,
            dt_bias: vb.ck.f32_vec(&vb.key("dt_bias"), &[nv])?,
            neg_a: a_log.iter().map(|a| -a.exp()).collect(),
            norm: vb
                .ck
                .f32_vec(&vb.pp("norm").key("weight"), &[spec.v_head_dim])?,
            eps: eps as f32,
            out: Linear::load(&vb.pp("out_proj"), hidden, vd, false)?,
            spec: spec.clone(),
        })
    }

    /// Runs `x` `[T, H]` after the tokens `state` has seen; returns `[T, H]`.
    pub fn forward(&self, x: &Tensor, state: &mut DeltaState) -> Result<Tensor> {
        let s = &self.spec;
        let (nk, nv, dk, dv) = (s.num_k_heads, s.num_v_heads, s.k_head_dim, s.v_head_dim);
        let r = nv / nk;
        let (kd, vd) = (s.key_dim(), s.value_dim());
        let conv_dim = s.conv_dim();
        let kern = s.conv_kernel;
        let qkvz = rows(&self.in_qkvz.forward(x)?)?;
        let ba = rows(&self.in_ba.forward(x)?)?;
        if state.conv.is_empty() {
            state.conv = vec![0.0; conv_dim * (kern - 1)];
            state.recurrent = vec![0.0; nv * dk * dv];
        }
        let group = 2 * dk + 2 * r * dv;
        let mut out = vec![0.0f32; qkvz.len() * vd];
        // Per-token scratch, reused: the un-grouped inputs, the convolution's output, the gate,
        // the per-key-head L2 scales of q (with 1/√dk) and k, and one head's delta.
        let mut mixed = vec![0.0f32; conv_dim];
        let mut conv_out = vec![0.0f32; conv_dim];
        let mut z = vec![0.0f32; vd];
        let mut scales = vec![(0.0f32, 0.0f32); nk];
        let mut delta = vec![0.0f32; dv];
        for (t, row) in qkvz.iter().enumerate() {
            // Un-group: per key head g, [q (dk), k (dk), v (r·dv), z (r·dv)].
            for g in 0..nk {
                let src = &row[g * group..(g + 1) * group];
                mixed[g * dk..(g + 1) * dk].copy_from_slice(&src[..dk]);
                mixed[kd + g * dk..kd + (g + 1) * dk].copy_from_slice(&src[dk..2 * dk]);
                let vs = 2 * kd + g * r * dv;
                mixed[vs..vs + r * dv].copy_from_slice(&src[2 * dk..2 * dk + r * dv]);
                z[g * r * dv..(g + 1) * r * dv].copy_from_slice(&src[2 * dk + r * dv..]);
            }
            // Causal depthwise convolution + SiLU; the state keeps the last K − 1 inputs.
            for c in 0..conv_dim {
                let w = &self.conv[c * kern..(c + 1) * kern];
                let hist = &mut state.conv[c * (kern - 1)..(c + 1) * (kern - 1)];
                let mut acc = w[kern - 1] * mixed[c];
                for j in 0..kern - 1 {
                    acc += w[j] * hist[j];
                }
                conv_out[c] = silu(acc);
                if kern > 1 {
                    hist.rotate_left(1);
                    hist[kern - 2] = mixed[c];
                }
            }
            let (q_all, rest) = conv_out.split_at(kd);
            let (k_all, v_all) = rest.split_at(kd);
            // b and a, grouped per key head: [b (r), a (r)].
            let bar = &ba[t];
            for (g, sc) in scales.iter_mut().enumerate() {
                let q = &q_all[g * dk..(g + 1) * dk];
                let k = &k_all[g * dk..(g + 1) * dk];
                *sc = (inv_l2(q) / (dk as f32).sqrt(), inv_l2(k));
            }
            let o = &mut out[t * vd..(t + 1) * vd];
            for h in 0..nv {
                let g = h / r;
                let j = h % r;
                let b = bar[g * 2 * r + j];
                let a = bar[g * 2 * r + r + j];
                let beta = 1.0 / (1.0 + (-b).exp());
                let decay = (self.neg_a[h] * softplus(a + self.dt_bias[h])).exp();
                let q = &q_all[g * dk..(g + 1) * dk];
                let k = &k_all[g * dk..(g + 1) * dk];
                let (qn, kn) = scales[g];
                let v = &v_all[h * dv..(h + 1) * dv];
                let st = &mut state.recurrent[h * dk * dv..(h + 1) * dk * dv];
                st.iter_mut().for_each(|x| *x *= decay);
                // kv_mem = Sᵀ k; delta = (v − kv_mem)·β; S += k ⊗ delta; o = Sᵀ q.
                delta.iter_mut().for_each(|d| *d = 0.0);
                for i in 0..dk {
                    let ki = k[i] * kn;
                    for (d, &s) in delta.iter_mut().zip(&st[i * dv..(i + 1) * dv]) {
                        *d += s * ki;
                    }
                }
                for (d, &vv) in delta.iter_mut().zip(v) {
                    *d = (vv - *d) * beta;
                }
                let oh = &mut o[h * dv..(h + 1) * dv];
                for i in 0..dk {
                    let ki = k[i] * kn;
                    let qi = q[i] * qn;
                    let srow = &mut st[i * dv..(i + 1) * dv];
                    for ((s, &d), oo) in srow.iter_mut().zip(&delta).zip(oh.iter_mut()) {
                        *s += ki * d;
                        *oo += *s * qi;
                    }
                }
                // Gated RMSNorm over the head: norm(o)·w·silu(z).
                let ms: f32 = oh.iter().map(|x| x * x).sum::<f32>() / dv as f32;
                let inv = 1.0 / (ms + self.eps).sqrt();
                for (i, oo) in oh.iter_mut().enumerate() {
                    *oo = *oo * inv * self.norm[i] * silu(z[h * dv + i]);
                }
            }
        }
        let y = Tensor::from_vec(out, (qkvz.len(), vd), x.device())?;
        self.out.forward(&y)
    }
}

impl DeltaNetSpec {
    /// `num_k_heads · k_head_dim`.
    pub fn key_dim(&self) -> usize {
        self.num_k_heads * self.k_head_dim
    }
    /// `num_v_heads · v_head_dim`.
    pub fn value_dim(&self) -> usize {
        self.num_v_heads * self.v_head_dim
    }
    /// Channels of the convolution: q, k and v.
    pub fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }
    /// Checks the head counts against each other.
    pub fn check(&self, file: &std::path::Path) -> Result<()> {
        if self.num_k_heads == 0 || !self.num_v_heads.is_multiple_of(self.num_k_heads) {
            return Err(Error::config(
                file,
                "linear_num_value_heads",
                format!(
                    "{} value heads are not a multiple of the {} key heads",
                    self.num_v_heads, self.num_k_heads
                ),
            ));
        }
        if self.conv_kernel == 0 {
            return Err(Error::config(
                file,
                "linear_conv_kernel_dim",
                "must be positive",
            ));
        }
        Ok(())
    }
}
