//! Building blocks shared by the decoder families: RMSNorm, linear layers, RoPE (full and
//! partial, rotate-half convention), GQA attention with a KV cache, and the SwiGLU MLP.

use candle_core::{DType, Device, Tensor, D};

use crate::config::AttentionSpec;
use crate::error::Result;
use crate::weights::host::HostMatrix;
use crate::weights::Vb;

use super::host_attention::attention;

pub use super::kv::{DeltaState, LayerKv};
pub use super::weight::{gemv, Weight};

/// Loads the plain f32 vector `leaf` of a scope (norm weights, biases).
pub fn load_vec(vb: &Vb, leaf: &str, n: usize) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        vb.ck.f32_vec(&vb.key(leaf), &[n])?,
        n,
        vb.dev,
    )?)
}

/// RMSNorm over the last dimension.
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// Loads `weight` of size `n` in `vb`.
    pub fn load(vb: &Vb, n: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: load_vec(vb, "weight", n)?,
            eps: eps as f32,
        })
    }
    /// Loads `weight`; when `centred` the norm is zero-centred (HF Qwen3-Next: the scale is
    /// `1 + weight`).
    pub fn load_maybe_centred(vb: &Vb, n: usize, eps: f64, centred: bool) -> Result<Self> {
        let norm = Self::load(vb, n, eps)?;
        Ok(if centred {
            RmsNorm {
                weight: (norm.weight + 1.0)?,
                eps: norm.eps,
            }
        } else {
            norm
        })
    }

    /// The scale per channel.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The epsilon added to the mean square.
    pub fn eps(&self) -> f32 {
        self.eps
    }

    /// Normalises `x` over its last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }

    /// The residual add and this norm after it: `(h + a, norm(h + a))` for `[T, n]` inputs (one
    /// launch on CUDA).
    pub fn add_forward(&self, h: &Tensor, a: &Tensor) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if let Some(r) = self.add_forward_cuda(h, a)? {
            return Ok(r);
        }
        if let Some(r) = self.add_forward_host(h, a)? {
            return Ok(r);
        }
        let h = (h + a)?;
        let x = self.forward(&h)?;
        Ok((h, x))
    }
}

#[cfg(feature = "cuda")]
#[path = "norm_cuda.rs"]
mod norm_cuda;

/// `y = x Wᵀ (+ b)` with `W` `[out, in]`.
#[derive(Debug)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

/// Token embeddings `[vocab, hidden]`, looked up by row (packed rows are decoded one by one).
#[derive(Debug)]
pub struct Embedding {
    weight: Weight,
    hidden: usize,
}

impl Embedding {
    /// Loads the table of the module `vb` (float or MLX-quantized).
    pub fn load(vb: &Vb, vocab: usize, hidden: usize) -> Result<Self> {
        Ok(Embedding {
            weight: Weight::load(vb, vocab, hidden)?,
            hidden,
        })
    }
    /// The table, to tie an output head to it.
    pub fn weight(&self) -> &Weight {
        &self.weight
    }
    /// Rows for `ids` (already checked against the vocabulary): `[T, hidden]`.
    pub fn forward(&self, ids: &[u32], dev: &Device) -> Result<Tensor> {
        self.weight.rows(ids, self.hidden, dev)
    }
    /// The table where it is MLX-packed on the GPU (a row can then be looked up by an id in
    /// device memory: [`crate::weights::cuda::DeviceMatrix::decode_row_at`]).
    #[cfg(feature = "cuda")]
    pub fn device_matrix(&self) -> Option<&crate::weights::cuda::DeviceMatrix> {
        match &self.weight {
            Weight::Device(m) => Some(m),
            _ => None,
        }
    }
}

impl Linear {
    /// Loads the module `vb` (`weight`, float or MLX-quantized, and `bias` if asked for).
    pub fn load(vb: &Vb, out: usize, inp: usize, bias: bool) -> Result<Self> {
        let weight = Weight::load(vb, out, inp)?;
        let bias = if bias {
            Some(load_vec(vb, "bias", out)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }
    /// Wraps an existing weight (tied embeddings).
    pub fn from_weight(weight: Weight) -> Self {
        Linear { weight, bias: None }
    }
    /// The weight where it is MLX-packed on the GPU and the layer has no bias.
    #[cfg(feature = "cuda")]
    pub fn device_matrix(&self) -> Option<&crate::weights::cuda::DeviceMatrix> {
        match (&self.weight, &self.bias) {
            (Weight::Device(m), None) => Some(m),
            _ => None,
        }
    }

    /// The weight where it is f32 in a CUDA device's memory and the layer has no bias.
    #[cfg(feature = "cuda")]
    pub fn device_f32(&self) -> Option<&Tensor> {
        match (&self.weight, &self.bias) {
            (Weight::Dense(t), None) if t.dtype() == DType::F32 && t.device().is_cuda() => Some(t),
            _ => None,
        }
    }

    /// Applies the layer to `norm(x)` (one launch where the weight is packed on the GPU and the
    /// layer has no bias).
    pub fn forward_normed(&self, x: &Tensor, norm: &RmsNorm) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(m) = self.device_matrix() {
            return m.matmul_normed(x, Some((norm.weight(), norm.eps())));
        }
        self.forward(&norm.forward(x)?)
    }

    /// Applies the layer to `x` `[T, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// SwiGLU MLP: `down(silu(gate x) · up x)` (dense layers and shared experts).
#[derive(Debug)]
pub struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    /// Loads `gate_proj`, `up_proj` and `down_proj` of the module `vb`.
    pub fn load(vb: &Vb, hidden: usize, inter: usize) -> Result<Self> {
        Ok(Mlp {
            gate: Linear::load(&vb.pp("gate_proj"), inter, hidden, false)?,
            up: Linear::load(&vb.pp("up_proj"), inter, hidden, false)?,
            down: Linear::load(&vb.pp("down_proj"), hidden, inter, false)?,
        })
    }
    /// The gate, up and down matrices where all three are MLX-packed on the GPU without biases
    /// (a shared expert then runs in the routed experts' fused launches).
    #[cfg(feature = "cuda")]
    pub fn device_matrices(&self) -> Option<[&crate::weights::cuda::DeviceMatrix; 3]> {
        Some([
            self.gate.device_matrix()?,
            self.up.device_matrix()?,
            self.down.device_matrix()?,
        ])
    }

    /// Applies the MLP to `x` `[T, H]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_host(x)? {
            return Ok(y);
        }
        let g = candle_nn::ops::silu(&self.gate.forward(x)?)?;
        self.down.forward(&(g * self.up.forward(x)?)?)
    }

    /// The gate, up and down matrices where all three are host matrices without biases (what a
    /// host expert path takes: [`host_expert_rows`] of them is [`Mlp::forward`]'s bits).
    pub(crate) fn host_mats(&self) -> Option<(&HostMatrix, &HostMatrix, &HostMatrix)> {
        Some((
            self.gate.host_matrix()?,
            self.up.host_matrix()?,
            self.down.host_matrix()?,
        ))
    }
}

/// Runs one routed expert on `x` `[1, H]` (`[T, H]` for a host-held one; SwiGLU:
/// `down(silu(gate x) · up x)`).
pub fn expert_forward(x: &Tensor, e: &crate::experts::store::ExpertWeights) -> Result<Tensor> {
    use crate::experts::store::ExpertMats;
    match &e.mats {
        ExpertMats::Dense { gate_up, down } => dense_expert(x, gate_up, down),
        #[cfg(feature = "cuda")]
        ExpertMats::DevicePacked(p) => p.forward(x),
        ExpertMats::Host { gate, up, down } => {
            let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let y = host_expert_rows(gate, up, down, &xv);
            let t = y.len() / down.rows().max(1);
            Ok(Tensor::from_vec(y, (t, down.rows()), x.device())?)
        }
    }
}

/// A host-held expert on every row of `xs` (each `H` long): `[rows, H]` outputs, row-major, each
/// row's bit-identical to running that row alone (the packed kernels' contract).
pub fn host_expert_rows(
    gate: &crate::weights::host::HostMatrix,
    up: &crate::weights::host::HostMatrix,
    down: &crate::weights::host::HostMatrix,
    xs: &[f32],
) -> Vec<f32> {
    let (g, u) = (gate.matmul_rows(xs), up.matmul_rows(xs));
    down.matmul_rows(&silu_mul(&g, &u))
}

/// `silu(g) · u` element by element, silu(z) = z / (1 + e^-z) as candle computes it (every
/// host expert path uses this one, so their outputs are the same bits).
pub(crate) fn silu_mul(g: &[f32], u: &[f32]) -> Vec<f32> {
    g.iter()
        .zip(u)
        .map(|(z, u)| z / (1.0 + (-z).exp()) * u)
        .collect()
}

fn dense_expert(x: &Tensor, gate_up: &Tensor, down: &Tensor) -> Result<Tensor> {
    let i = down.dim(1)?;
    let gu = match gemv(x, gate_up)? {
        Some(y) => y,
        None => x.matmul(&gate_up.t()?)?,
    };
    let g = candle_nn::ops::silu(&gu.narrow(1, 0, i)?)?;
    let act = (g * gu.narrow(1, i, i)?)?;
    Ok(match gemv(&act, down)? {
        Some(y) => y,
        None => act.matmul(&down.t()?)?,
    })
}

/// Rotary position tables (`cos`, `sin` per position and frequency).
#[derive(Debug, PartialEq)]
pub struct Rope {
    inv_freq: Vec<f32>,
    factor: f32,
}

impl Rope {
    /// Tables from explicit inverse frequencies, with cos/sin multiplied by `factor` (YaRN).
    pub fn from_inv_freq(inv_freq: Vec<f32>, factor: f32) -> Self {
        Rope { inv_freq, factor }
    }

    /// `inv_freq[i] = 1 / theta^(2i / rotary_dim)`, computed in f32 as HF does.
    pub fn new(theta: f64, rotary_dim: usize) -> Self {
        let inv_freq = (0..rotary_dim / 2)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / rotary_dim as f32))
            .collect();
        Rope {
            inv_freq,
            factor: 1.0,
        }
    }
    /// `(cos, sin)` of position `p`, `rotary_dim / 2` values each, as [`Rope::tables`] has them.
    pub fn values(&self, p: usize) -> (Vec<f32>, Vec<f32>) {
        self.inv_freq
            .iter()
            .map(|&f| {
                let a = p as f32 * f;
                (a.cos() * self.factor, a.sin() * self.factor)
            })
            .unzip()
    }

    /// `(cos, sin)`, each `[T, rotary_dim / 2]`, for positions `pos0 .. pos0 + t`.
    pub fn tables(&self, pos0: usize, t: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
        let n = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * n);
        let mut sin = Vec::with_capacity(t * n);
        for p in pos0..pos0 + t {
            let (c, s) = self.values(p);
            cos.extend(c);
            sin.extend(s);
        }
        Ok((
            Tensor::from_vec(cos, (t, n), dev)?,
            Tensor::from_vec(sin, (t, n), dev)?,
        ))
    }
}

/// Applies RoPE to the first `2 · cos.dim(1)` dims of `x` `[1, heads, T, head_dim]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let rd = 2 * cos.dim(1)?;
    let hd = x.dim(D::Minus1)?;
    let rot = candle_nn::rotary_emb::rope(&x.narrow(3, 0, rd)?.contiguous()?, cos, sin)?;
    if rd == hd {
        return Ok(rot);
    }
    // `cat` of a narrowed view along the last axis yields a transposed layout, which CUDA matmul
    // rejects: make it contiguous.
    Ok(Tensor::cat(&[rot, x.narrow(3, rd, hd - rd)?], 3)?.contiguous()?)
}

/// Grouped-query attention with optional per-head q/k RMSNorm and q/k/v bias.
#[derive(Debug)]
pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    spec: AttentionSpec,
    rope: Rope,
    /// Qwen3-Next: `q_proj` yields per head a query then an output gate; the output is
    /// multiplied by `sigmoid(gate)` before `o_proj`.
    gated: bool,
}

impl Attention {
    /// Loads `{q,k,v,o}_proj` (+ `q_norm`, `k_norm`) of the module `vb` (`…self_attn`).
    pub fn load(vb: &Vb, hidden: usize, spec: &AttentionSpec, eps: f64) -> Result<Self> {
        Self::load_with(vb, hidden, spec, eps, false, false)
    }

    /// Qwen3-Next's gated attention: `q_proj` of doubled width (query and output gate per
    /// head); q/k norms zero-centred when `centred` (the HF layout; MLX stores them shifted).
    pub fn load_gated(
        vb: &Vb,
        hidden: usize,
        spec: &AttentionSpec,
        eps: f64,
        centred: bool,
    ) -> Result<Self> {
        Self::load_with(vb, hidden, spec, eps, true, centred)
    }

    fn load_with(
        vb: &Vb,
        hidden: usize,
        spec: &AttentionSpec,
        eps: f64,
        gated: bool,
        centred: bool,
    ) -> Result<Self> {
        let (nh, nkv, hd) = (spec.num_heads, spec.num_kv_heads, spec.head_dim);
        let l = |n: &str, o, i, b| Linear::load(&vb.pp(n), o, i, b);
        let norm = |n: &str| RmsNorm::load_maybe_centred(&vb.pp(n), hd, eps, centred);
        let q_rows = if gated { 2 * nh * hd } else { nh * hd };
        Ok(Attention {
            gated,
            q: l("q_proj", q_rows, hidden, spec.qkv_bias)?,
            k: l("k_proj", nkv * hd, hidden, spec.qkv_bias)?,
            v: l("v_proj", nkv * hd, hidden, spec.qkv_bias)?,
            o: l("o_proj", hidden, nh * hd, spec.o_bias)?,
            q_norm: if spec.qk_norm {
                Some(norm("q_norm")?)
            } else {
                None
            },
            k_norm: if spec.qk_norm {
                Some(norm("k_norm")?)
            } else {
                None
            },
            rope: Rope::new(spec.rope_theta, spec.rotary_dim),
            spec: spec.clone(),
        })
    }

    /// Attends `x` `[T, H]` at positions `pos0..pos0+T` over the cached keys plus its own.
    pub fn forward(&self, x: &Tensor, pos0: usize, kv: &mut LayerKv) -> Result<Tensor> {
        if let Some(y) = self.forward_host(x, pos0, kv)? {
            return Ok(y);
        }
        let (t, _) = x.dims2()?;
        let (nh, nkv, hd) = (
            self.spec.num_heads,
            self.spec.num_kv_heads,
            self.spec.head_dim,
        );
        let dev = x.device();
        let heads = |y: Tensor, n: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let mut y = y.reshape((t, n, hd))?;
            if let Some(norm) = norm {
                y = norm.forward(&y)?;
            }
            Ok(y.transpose(0, 1)?.unsqueeze(0)?.contiguous()?)
        };
        let (q, gate) = if self.gated {
            // Per head: the query's hd values, then the gate's.
            let qg = self.q.forward(x)?.reshape((t, nh, 2 * hd))?;
            let gate = qg.narrow(2, hd, hd)?.reshape((t, nh * hd))?;
            (qg.narrow(2, 0, hd)?.reshape((t, nh * hd))?, Some(gate))
        } else {
            (self.q.forward(x)?, None)
        };
        let q = heads(q, nh, &self.q_norm)?;
        let k = heads(self.k.forward(x)?, nkv, &self.k_norm)?;
        let v = heads(self.v.forward(x)?, nkv, &None)?;
        let (q, k) = if self.spec.rotary_dim > 0 {
            let (cos, sin) = self.rope.tables(pos0, t, dev)?;
            (apply_rope(&q, &cos, &sin)?, apply_rope(&k, &cos, &sin)?)
        } else {
            (q, k)
        };
        let (k, v) = kv.append(k, v, 2)?;
        let s = k.dim(2)?;
        let rep = nh / nkv;
        let scale = (hd as f64).powf(-0.5);
        // On the CPU: attend straight over the cache's buffers (no per-head copies of the keys
        // and values, no small-matrix products), a decode step's heads or a prompt's (query,
        // head) pairs side by side on the threads.
        let window = self.spec.sliding_window;
        let host = match dev.is_cpu() && (t == 1 || host_prompt_attention()) {
            true => {
                // `[1, nh, T, hd]` → `[T, nh · hd]`.
                let qv: Vec<f32> = q.squeeze(0)?.transpose(0, 1)?.flatten_all()?.to_vec1()?;
                kv.with_host_buffers(|kb, vb, cap| {
                    let (dims, scale) = ((nh, rep, hd), scale as f32);
                    attention(&qv, kb, vb, cap, (s - t, t), window, dims, scale)
                })
            }
            false => None,
        };
        if let Some(y) = host {
            let y = Tensor::from_vec(y, (t, nh * hd), dev)?;
            let y = match gate {
                Some(g) => (y * candle_nn::ops::sigmoid(&g)?)?,
                None => y,
            };
            return self.o.forward(&y);
        }
        let expand = |y: Tensor| -> Result<Tensor> {
            if rep == 1 {
                return Ok(y);
            }
            Ok(y.unsqueeze(2)?
                .expand((1, nkv, rep, s, hd))?
                .reshape((1, nh, s, hd))?)
        };
        let (k, v) = (expand(k)?, expand(v)?);
        let mut att = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        if let Some(mask) = causal_mask(t, s, self.spec.sliding_window, dev)? {
            att = att.broadcast_add(&mask)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v.contiguous()?)?; // [1, nh, T, hd]
        let y = y.squeeze(0)?.transpose(0, 1)?.reshape((t, nh * hd))?;
        let y = match gate {
            Some(g) => (y * candle_nn::ops::sigmoid(&g)?)?,
            None => y,
        };
        self.o.forward(&y)
    }
}

#[path = "layers_host.rs"]
mod host;
pub(crate) use host::{host_norm_mlp_on, host_qkv_on, via_tensor};

/// Whether a prompt's attention on the CPU runs on the host over the cache's buffers
/// ([`attention`]); `HARNESS_PROMPT_ATTENTION=ops` keeps the tensor ops (for A/B runs, which
/// the engine's kernel label then says).
pub(crate) fn host_prompt_attention() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("HARNESS_PROMPT_ATTENTION").map_or(true, |v| v != "ops"))
}

/// Additive causal (and sliding-window) mask `[T, S]` for `t` queries at the end of `s` cached
/// positions, or `None` when every key is visible.
pub fn causal_mask(
    t: usize,
    s: usize,
    window: Option<usize>,
    dev: &Device,
) -> Result<Option<Tensor>> {
    let past = s - t;
    if t == 1 && window.is_none_or(|w| s <= w) {
        return Ok(None);
    }
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            let qp = past + i;
            (0..s).map(move |j| {
                let visible = j <= qp && window.is_none_or(|w| qp - j < w);
                if visible {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Some(Tensor::from_vec(mask, (t, s), dev)?))
}

/// Index of the maximum of a slice (first on ties).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Device greedy picks checked against the host's argmax in this process
/// (`HARNESS_CHECK_GREEDY=1`, [`greedy_token`]): what `harness generate` reports, so a check
/// proves the device path ran.
pub static GREEDY_CHECKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether `HARNESS_CHECK_GREEDY=1`.
pub(crate) fn check_greedy() -> bool {
    std::env::var_os("HARNESS_CHECK_GREEDY").is_some_and(|v| v == "1")
}

/// With `HARNESS_CHECK_GREEDY=1`, the line saying how many of a generation's `tokens` were chosen
/// on the device and checked against the host ([`GREEDY_CHECKED`]); `None` otherwise.
pub fn greedy_check_report(tokens: usize) -> Option<String> {
    check_greedy().then(|| {
        let n = GREEDY_CHECKED.load(std::sync::atomic::Ordering::Relaxed);
        format!(
            "greedy check: {n} of {tokens} tokens chosen on the device, each equal to the \
                 host's argmax"
        )
    })
}

/// The greedy token of logits `[1, vocab]`: [`argmax`] of the row, chosen on the device on CUDA
/// (only the index comes back) and on the host otherwise. With `HARNESS_CHECK_GREEDY=1` a device
/// choice is also made on the host, a difference is an error, and an equal one is counted in
/// [`GREEDY_CHECKED`] (`scripts/gpu_check.py`).
pub fn greedy_token(logits: &Tensor) -> Result<u32> {
    let row = || -> Result<Vec<f32>> {
        rows(logits)?
            .into_iter()
            .next()
            .ok_or_else(|| crate::error::Error::Input("internal: no logits row".into()))
    };
    #[cfg(feature = "cuda")]
    if let Some(t) = argmax_cuda::greedy_token_cuda(logits)? {
        if check_greedy() {
            argmax_cuda::check_device_pick(t, &row()?)?;
        }
        return Ok(t);
    }
    Ok(argmax(&row()?) as u32)
}

#[cfg(feature = "cuda")]
#[path = "argmax_cuda.rs"]
pub(crate) mod argmax_cuda;

/// Converts a `[T, N]` tensor into rows of f32.
pub fn rows(x: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(x.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "x86_64")]
    use crate::models::host_attention::attend_head_avx2;
    use crate::models::host_attention::{attend_head, exp_nonpositive};

    /// The rule the CUDA greedy kernel mirrors (`argmax_cuda`): the first index of the maximum,
    /// NaNs never chosen, 0 when the first value is NaN.
    #[test]
    fn greedy_token_takes_the_first_maximum_and_skips_nans() {
        let nan = f32::NAN;
        for (v, want) in [
            (vec![1.0, 3.0, 2.0, 3.0], 1),
            (vec![1.0, nan, 2.0, nan], 2),
            (vec![nan, 5.0, 7.0], 0),
            (vec![f32::NEG_INFINITY, f32::NEG_INFINITY], 0),
            (vec![-0.0, 0.0, -1.0], 0),
            (vec![0.5, f32::INFINITY, f32::INFINITY], 1),
        ] {
            let n = v.len();
            let t = Tensor::from_vec(v.clone(), (1, n), &Device::Cpu).unwrap();
            assert_eq!(greedy_token(&t).unwrap(), want, "{v:?}");
        }
    }

    #[test]
    fn exp_nonpositive_is_within_a_few_ulps_of_libm() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -90.0 * i as f32 / 200_000.0;
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            if x >= -87.0 {
                worst = worst.max((got - want).abs() / want);
            } else {
                assert_eq!(got, 0.0, "{x}");
            }
        }
        assert!(worst < 3e-7, "relative error {worst:.2e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    /// The AVX2 build of a head's attention gives the portable build's bits (same operations,
    /// wider vectors), and both match a plain f64 softmax.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn attention_head_forms_are_bit_equal() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        for (hd, s, first) in [(64, 45, 3), (72, 20, 0)] {
            check_head(hd, s, first);
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn check_head(hd: usize, s: usize, first: usize) {
        let mut r = 7u64;
        let mut f = || {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            (r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let q: Vec<f32> = (0..hd).map(|_| f()).collect();
        let k: Vec<f32> = (0..s * hd).map(|_| 2.0 * f()).collect();
        let v: Vec<f32> = (0..s * hd).map(|_| f()).collect();
        let (mut a, mut b) = (vec![0f32; hd], vec![0f32; hd]);
        attend_head(&q, &k, &v, (first, s), 0.125, &mut a);
        // SAFETY: AVX2 checked above.
        unsafe { attend_head_avx2(&q, &k, &v, (first, s), 0.125, &mut b) };
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        let dots: Vec<f64> = (first..s)
            .map(|j| {
                (0..hd)
                    .map(|i| q[i] as f64 * k[j * hd + i] as f64)
                    .sum::<f64>()
                    * 0.125
            })
            .collect();
        let m = dots.iter().cloned().fold(f64::MIN, f64::max);
        let w: Vec<f64> = dots.iter().map(|d| (d - m).exp()).collect();
        let z: f64 = w.iter().sum();
        for i in 0..hd {
            let want: f64 = (first..s)
                .map(|j| w[j - first] / z * v[j * hd + i] as f64)
                .sum();
            assert!((a[i] as f64 - want).abs() < 1e-5, "{i}: {} vs {want}", a[i]);
        }
    }
}
