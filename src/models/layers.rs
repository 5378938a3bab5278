//! Building blocks shared by the decoder families: RMSNorm, linear layers, RoPE (full and
//! partial, rotate-half convention), GQA attention with a KV cache, and the SwiGLU MLP.

use candle_core::{DType, Device, Tensor, D};

use crate::config::AttentionSpec;
use crate::error::Result;
use crate::weights::quant::PackedMatrix;
use crate::weights::{load_matrix, quantized_parts, Vb};

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
    /// Normalises `x` over its last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }
}

/// A weight matrix `[out, in]`: f32 on the device, or (on the CPU) MLX-quantized and kept packed.
#[derive(Debug, Clone)]
pub enum Weight {
    /// f32 tensor.
    Dense(Tensor),
    /// Packed MLX affine, decoded inside each matrix-vector product.
    Packed(PackedMatrix),
}

impl Weight {
    /// Loads the matrix `[rows, cols]` of the module `vb`: packed when [`packed`] keeps it so,
    /// else f32.
    pub fn load(vb: &Vb, rows: usize, cols: usize) -> Result<Self> {
        Ok(match packed(vb, rows, cols)? {
            Some(m) => Weight::Packed(m),
            None => Weight::Dense(Tensor::from_vec(
                load_matrix(vb.ck, vb.quant, vb.path(), rows, cols)?,
                (rows, cols),
                vb.dev,
            )?),
        })
    }
}

/// On the CPU, an MLX-quantized module stays packed; `None` means "load it as f32".
pub fn packed(vb: &Vb, rows: usize, cols: usize) -> Result<Option<PackedMatrix>> {
    let ck = vb.ck;
    if !vb.dev.is_cpu() || !vb.has("scales") {
        return Ok(None);
    }
    let (w, s, b, p) = quantized_parts(ck, vb.quant, vb.path(), &[], rows, cols)?;
    Ok(PackedMatrix::new(
        ck.mapped(w),
        ck.mapped(s),
        ck.mapped(b),
        s.dtype,
        p,
        rows,
        cols,
    )
    .ok())
}

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
        match &self.weight {
            Weight::Dense(w) => {
                Ok(w.index_select(&Tensor::from_vec(ids.to_vec(), ids.len(), dev)?, 0)?)
            }
            Weight::Packed(m) => {
                let mut out = Vec::with_capacity(ids.len() * self.hidden);
                for &id in ids {
                    m.row_into(id as usize, &mut out);
                }
                Ok(Tensor::from_vec(out, (ids.len(), self.hidden), dev)?)
            }
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
    /// Applies the layer to `x` `[T, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Packed(m) => {
                let mut out = Vec::with_capacity(x.dim(0)? * m.rows());
                for row in rows(x)? {
                    out.extend(m.gemv(&row));
                }
                Tensor::from_vec(out, (x.dim(0)?, m.rows()), x.device())?
            }
            Weight::Dense(w) => match gemv(x, w)? {
                Some(y) => y,
                None => x.matmul(&w.t()?)?,
            },
        };
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
    /// Applies the MLP to `x` `[T, H]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = candle_nn::ops::silu(&self.gate.forward(x)?)?;
        self.down.forward(&(g * self.up.forward(x)?)?)
    }
}

/// Runs one routed expert on `x` `[1, H]` (SwiGLU: `down(silu(gate x) · up x)`).
pub fn expert_forward(x: &Tensor, e: &crate::experts::store::ExpertWeights) -> Result<Tensor> {
    use crate::experts::store::ExpertMats;
    match &e.mats {
        ExpertMats::Dense { gate_up, down } => dense_expert(x, gate_up, down),
        #[cfg(feature = "cuda")]
        ExpertMats::DevicePacked(p) => p.forward(x),
        ExpertMats::Packed { gate, up, down } => {
            let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let (g, u) = (gate.gemv(&xv), up.gemv(&xv));
            // silu(z) = z / (1 + e^-z), as candle computes it.
            let act: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(z, u)| z / (1.0 + (-z).exp()) * u)
                .collect();
            Ok(Tensor::from_vec(
                down.gemv(&act),
                (1, down.rows()),
                x.device(),
            )?)
        }
    }
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

/// `x Wᵀ` for a single row `x` `[1, in]` and a contiguous f32 `W` `[out, in]` on the CPU, as
/// row dot products split across cores; `None` for anything else (the caller uses matmul).
/// gemm packs its right-hand side into a freshly allocated buffer on every call: at real model
/// sizes (a 154880 × 2048 `lm_head`, 2048 × 3072 experts) that page-fault churn dominated
/// one-row decode steps, which are all this engine's expert calls.
pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if !x.device().is_cpu()
        || x.dims().len() != 2
        || x.dim(0)? != 1
        || !w.is_contiguous()
        || w.dtype() != DType::F32
    {
        return Ok(None);
    }
    let (o, i) = w.dims2()?;
    let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
    if xv.len() != i {
        return Ok(None);
    }
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let wv = &cpu.as_slice::<f32>()?[layout.start_offset()..layout.start_offset() + o * i];
    let mut y = vec![0f32; o];
    let rows = |y: &mut [f32], r0: usize| {
        for (k, yk) in y.iter_mut().enumerate() {
            *yk = dot(&wv[(r0 + k) * i..(r0 + k + 1) * i], &xv);
        }
    };
    let threads = if o * i >= 1 << 20 {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(16)
    } else {
        1
    };
    if threads <= 1 {
        rows(&mut y, 0);
    } else {
        let per = o.div_ceil(threads);
        std::thread::scope(|sc| {
            for (t, part) in y.chunks_mut(per).enumerate() {
                let rows = &rows;
                sc.spawn(move || rows(part, t * per));
            }
        });
    }
    Ok(Some(Tensor::from_vec(y, (1, o), x.device())?))
}

/// Dot product with 8 independent accumulators (vectorizes).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Rotary position tables (`cos`, `sin` per position and frequency).
#[derive(Debug)]
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
    /// `(cos, sin)`, each `[T, rotary_dim / 2]`, for positions `pos0 .. pos0 + t`.
    pub fn tables(&self, pos0: usize, t: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
        let n = self.inv_freq.len();
        let mut cos = Vec::with_capacity(t * n);
        let mut sin = Vec::with_capacity(t * n);
        for p in pos0..pos0 + t {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos() * self.factor);
                sin.push(a.sin() * self.factor);
            }
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

/// Keys and values of one layer, `[1, kv_heads, S, head_dim]`.
#[derive(Debug, Default, Clone)]
pub struct LayerKv {
    kv: Option<(Tensor, Tensor)>,
}

impl LayerKv {
    /// Appends new entries along `dim` (the sequence axis) and returns the whole cache.
    pub fn append(&mut self, k: Tensor, v: Tensor, dim: usize) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[pk, k], dim)?, Tensor::cat(&[pv, v], dim)?),
            None => (k, v),
        };
        self.kv = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
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
}

impl Attention {
    /// Loads `{q,k,v,o}_proj` (+ `q_norm`, `k_norm`) of the module `vb` (`…self_attn`).
    pub fn load(vb: &Vb, hidden: usize, spec: &AttentionSpec, eps: f64) -> Result<Self> {
        let (nh, nkv, hd) = (spec.num_heads, spec.num_kv_heads, spec.head_dim);
        let l = |n: &str, o, i, b| Linear::load(&vb.pp(n), o, i, b);
        let norm = |n: &str| RmsNorm::load(&vb.pp(n), hd, eps);
        Ok(Attention {
            q: l("q_proj", nh * hd, hidden, spec.qkv_bias)?,
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
        let q = heads(self.q.forward(x)?, nh, &self.q_norm)?;
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
        let expand = |y: Tensor| -> Result<Tensor> {
            if rep == 1 {
                return Ok(y);
            }
            Ok(y.unsqueeze(2)?
                .expand((1, nkv, rep, s, hd))?
                .reshape((1, nh, s, hd))?)
        };
        let (k, v) = (expand(k)?, expand(v)?);
        let scale = (hd as f64).powf(-0.5);
        let mut att = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        if let Some(mask) = causal_mask(t, s, self.spec.sliding_window, dev)? {
            att = att.broadcast_add(&mask)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v.contiguous()?)?; // [1, nh, T, hd]
        let y = y.squeeze(0)?.transpose(0, 1)?.reshape((t, nh * hd))?;
        self.o.forward(&y)
    }
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

/// Converts a `[T, N]` tensor into rows of f32.
pub fn rows(x: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(x.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}
