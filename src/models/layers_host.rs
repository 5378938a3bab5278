//! The host forms of [`super::Attention`], [`super::Linear`], [`super::Mlp`] and
//! [`super::RmsNorm::add_forward`] on the CPU: products straight into vectors, several in one
//! parallel region, no tensor ops between them.

use candle_core::{DType, Tensor};

use super::{attention, host_prompt_attention, Attention, LayerKv, Linear, Mlp, RmsNorm, Weight};
use crate::error::Result;

impl Linear {
    /// Whether [`host_rows_together`] takes this layer: a host matrix, any bias f32 on the CPU.
    fn is_host(&self) -> bool {
        matches!(self.weight, Weight::Host(_))
            && self
                .bias
                .as_ref()
                .is_none_or(|b| b.device().is_cpu() && b.dtype() == DType::F32)
    }

    /// The layer's host matrix where it has no bias (its product is the matrix's alone, as
    /// [`Linear::forward_rows`] computes it), else `None`.
    pub(crate) fn host_matrix(&self) -> Option<&crate::weights::host::HostMatrix> {
        match (&self.weight, &self.bias) {
            (Weight::Host(m), None) => Some(m),
            _ => None,
        }
    }

    /// [`Linear::forward`] on the `t` rows `xs` (f32, row-major, on the host): a host matrix's
    /// product straight into a vector and the bias added with the same f32 add, so the same
    /// bits; any other weight through the tensor op.
    pub(crate) fn forward_rows(&self, xs: &[f32], t: usize) -> Result<Vec<f32>> {
        let (Weight::Host(m), true) = (&self.weight, self.is_host()) else {
            return via_tensor(xs, t, |x| self.forward(x));
        };
        if t > 1 && crate::weights::kernels::splits(m.rows() * xs.len()) {
            // A prompt's rows quantized by the region's blocks together, not on this thread
            // before it (the o projection's 16 × 1024 values: 11 µs on the VM).
            let [y] = host_rows_together([self], xs)?;
            return Ok(y);
        }
        let mut y = m.matmul_rows(xs);
        self.add_bias(&mut y)?;
        Ok(y)
    }

    /// The bias, if any, added to each output row of `y` (candle's f32 broadcast add: the same
    /// bits).
    fn add_bias(&self, y: &mut [f32]) -> Result<()> {
        if let Some(b) = &self.bias {
            add_to_rows(y, &host_f32(b)?);
        }
        Ok(())
    }
}

/// `b` added to each `b.len()`-long row of `y` (candle's f32 broadcast add: the same bits).
fn add_to_rows(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_exact_mut(b.len().max(1)) {
        row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
    }
}

/// The values of a tensor as f32 on the host ([`host_f32`]): its storage, read-locked (the
/// guard `G`), and the tensor's part of it; or a copy.
enum HostF32<G> {
    Borrowed(G, std::ops::Range<usize>),
    Owned(Vec<f32>),
}

impl<G: std::ops::Deref<Target = candle_core::Storage>> std::ops::Deref for HostF32<G> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            HostF32::Borrowed(storage, range) => match &**storage {
                // Checked f32 when borrowed.
                candle_core::Storage::Cpu(c) => {
                    c.as_slice::<f32>().map_or(&[][..], |s| &s[range.clone()])
                }
                _ => &[],
            },
            HostF32::Owned(v) => v,
        }
    }
}

/// `t`'s values as f32 on the host: borrowed where it is a contiguous f32 tensor on the CPU (a
/// norm's scale, a bias: no copy made a call), else copied.
pub(crate) fn host_f32(t: &Tensor) -> Result<impl std::ops::Deref<Target = [f32]> + Sync + '_> {
    if t.device().is_cpu() && t.dtype() == DType::F32 {
        let (storage, layout) = t.storage_and_layout();
        if let (Some((a, b)), candle_core::Storage::Cpu(_)) =
            (layout.contiguous_offsets(), &*storage)
        {
            return Ok(HostF32::Borrowed(storage, a..b));
        }
    }
    Ok(HostF32::Owned(
        t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
    ))
}

/// A norm's scale on the host ([`host_f32`]) and its epsilon, if there is a norm.
fn norm_weights(
    n: &Option<RmsNorm>,
) -> Result<Option<(impl std::ops::Deref<Target = [f32]> + Sync + '_, f32)>> {
    n.as_ref()
        .map(|n| Ok((host_f32(n.weight())?, n.eps())))
        .transpose()
}

/// `f` on the `t` rows `xs` as an f32 `[t, n]` tensor on the CPU, its output back as rows: the
/// row forms' way to a module without a host form (the tensor ops' bits).
pub(crate) fn via_tensor(
    xs: &[f32],
    t: usize,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Vec<f32>> {
    let x = Tensor::from_slice(xs, (t, xs.len() / t.max(1)), &candle_core::Device::Cpu)?;
    Ok(f(&x)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// [`Linear::forward`] of each of `layers` (all [`Linear::is_host`]) on the rows `xs`, without
/// tensors, their row blocks side by side in one parallel region instead of a region each
/// ([`by_product_blocks`]): a block's rows are computed as in the layer's own product, and each
/// layer's bias added to them in the block with the same f32 add, so the same bits (added after
/// the region, on the engine thread, it read every output row the other threads had just
/// written: 16 × 1536 values a prompt's q/k/v). A decode token's input is
/// quantized once per thread (each thread's last inputs are kept: `weights::packed`), a
/// prompt's once by the blocks together ([`crate::weights::QuantizedRows`]).
fn host_rows_together<const N: usize>(layers: [&Linear; N], xs: &[f32]) -> Result<[Vec<f32>; N]> {
    use crate::weights::kernels::{by_product_blocks, current_threads};
    let mats = layers.map(|l| match &l.weight {
        Weight::Host(m) => Some(m),
        _ => None,
    });
    let Some(mats) = mats.iter().copied().collect::<Option<Vec<_>>>() else {
        return Err(crate::error::Error::Input(
            "internal: a host product of a device weight".into(),
        ));
    };
    let rows: Vec<usize> = mats.iter().map(|m| m.rows()).collect();
    // About four blocks a thread, each a multiple of 16 rows (whole pairs of tiles of a tiled
    // matrix: the 512-bit tile kernels take two at once).
    let per = rows
        .iter()
        .sum::<usize>()
        .div_ceil(4 * current_threads())
        .next_multiple_of(16);
    let t = xs.len() / mats[0].cols().max(1);
    // A prompt's input quantized once for the int8 kernels by the blocks together, shared (as
    // `moe::host_experts_rows`); a decode token's by each thread (its own last ones).
    let q = crate::weights::QuantizedRows::default();
    let biases = layers
        .iter()
        .map(|l| l.bias.as_ref().map(host_f32).transpose())
        .collect::<Result<Vec<_>>>()?;
    let ys = by_product_blocks(&rows, &vec![per; N], &[t; N], |i, b| {
        let q = (t > 1).then(|| q.get(xs, mats[i].cols())).flatten();
        let mut y = mats[i].matmul_range_q(b.clone(), xs, q);
        if let Some(bias) = &biases[i] {
            add_to_rows(&mut y, &bias[b.clone()]);
        }
        y
    });
    let mut ys = ys.into_iter();
    Ok(std::array::from_fn(|_| ys.next().unwrap_or_default()))
}

impl Attention {
    /// [`Attention::forward`] on the host where the activations are f32 on the CPU and q, k, v
    /// are host matrices (not Qwen3-Next's gated query): the projections straight into vectors,
    /// the q/k norms and RoPE in place (candle's CPU arithmetic: `host_attention::rms_rows`,
    /// `rope_heads`), the keys and values appended to the cache, [`attention`] over its
    /// buffers. The tensor-op form ran two dozen small ops a layer on the engine thread (copies,
    /// transposes, narrow / cat around RoPE), serial work that did not shrink with threads. The
    /// same bits as the tensor-op form (each step the same f32 operations). `None`: not such a
    /// layer, or `HARNESS_HOST_QKV=0` (for A/B runs; the engine's kernel label then says so).
    pub(super) fn forward_host(
        &self,
        x: &Tensor,
        pos0: usize,
        kv: &mut LayerKv,
    ) -> Result<Option<Tensor>> {
        if !x.device().is_cpu() || x.dtype() != DType::F32 {
            return Ok(None);
        }
        let (t, _) = x.dims2()?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let Some(y) = self.forward_rows(&xs, t, pos0, kv)? else {
            return Ok(None);
        };
        let n = y.len() / t.max(1);
        Ok(Some(Tensor::from_vec(y, (t, n), x.device())?))
    }

    /// [`Attention::forward_host`] on the `t` rows `xs` (f32, row-major): the output rows, or
    /// `None` where the host form does not apply (the caller then runs the tensor ops).
    pub(crate) fn forward_rows(
        &self,
        xs: &[f32],
        t: usize,
        pos0: usize,
        kv: &mut LayerKv,
    ) -> Result<Option<Vec<f32>>> {
        use crate::models::host_attention::{rms_rows, rope_heads};
        let f32_cpu = |w: &Option<RmsNorm>| {
            w.as_ref()
                .is_none_or(|n| n.weight().dtype() == DType::F32 && n.weight().device().is_cpu())
        };
        if !host_qkv_on()
            || self.gated
            || (t > 1 && !host_prompt_attention())
            || ![&self.q, &self.k, &self.v].iter().all(|l| l.is_host())
            || !f32_cpu(&self.q_norm)
            || !f32_cpu(&self.k_norm)
        {
            return Ok(None);
        }
        let (nh, nkv, hd) = (
            self.spec.num_heads,
            self.spec.num_kv_heads,
            self.spec.head_dim,
        );
        // `[T, heads, hd]` each, in one parallel region.
        let [mut q, mut k, v]: [Vec<f32>; 3] = host_rows_together([&self.q, &self.k, &self.v], xs)?;
        // Each token's heads normalised, then rotated, a prompt's tokens in blocks over the
        // threads, its queries and keys in one block (a norm costs about 6 weights' work a
        // value, RoPE about 4).
        let (qw, kw) = (norm_weights(&self.q_norm)?, norm_weights(&self.k_norm)?);
        let rotary = self.spec.rotary_dim > 0;
        if rotary || qw.is_some() || kw.is_some() {
            let (qw, kw) = (
                qw.as_ref().map(|(w, e)| (&w[..], *e)),
                kw.as_ref().map(|(w, e)| (&w[..], *e)),
            );
            let work = 10 * (q.len() + k.len());
            crate::weights::kernels::by_block_pairs(
                (&mut q[..], nh * hd),
                (&mut k[..], nkv * hd),
                work,
                |start, qt, kt| {
                    let rope = rotary.then(|| self.rope.values(pos0 + start / (nh * hd)));
                    for (token, w) in [(qt, qw), (kt, kw)] {
                        if let Some((w, eps)) = w {
                            rms_rows(token, w, eps);
                        }
                        if let Some((cos, sin)) = &rope {
                            rope_heads(token, hd, cos, sin);
                        }
                    }
                },
            );
        }
        let s = kv.append_rows(&k, &v, (nkv, hd))?;
        let scale = (hd as f64).powf(-0.5) as f32;
        let window = self.spec.sliding_window;
        let y = kv
            .with_host_buffers(|kb, vb, cap| {
                attention(
                    &q,
                    kb,
                    vb,
                    cap,
                    (s - t, t),
                    window,
                    (nh, nh / nkv, hd),
                    scale,
                )
            })
            .ok_or_else(|| {
                crate::error::Error::Input("internal: a CPU KV cache without f32 buffers".into())
            })?;
        Ok(Some(self.o.forward_rows(&y, t)?))
    }
}

/// Whether [`Attention::forward`] runs its host form on the CPU (`HARNESS_HOST_QKV=0`: the
/// tensor ops, for A/B runs, which the engine's kernel label then says).
pub(crate) fn host_qkv_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("HARNESS_HOST_QKV").map_or(true, |v| v != "0"))
}

impl Mlp {
    /// [`Mlp::forward`] on the host where `x` is f32 `[T, H]` on the CPU and the three matrices
    /// are host matrices without biases: gate and up in one parallel region with silu(g)·u in
    /// it, then down ([`super::super::moe::host_experts_rows`], [`super::host_expert_rows`]'s
    /// bits, which are `forward`'s). The tensor-op form ran the silu and the product (2816
    /// values a token in the CPU-bench's dense layer) on the engine thread. `None`: not such an
    /// MLP, or `HARNESS_HOST_NORM_MLP=0` (for A/B runs; the engine's kernel label then says so).
    pub(super) fn forward_host(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if self.host_mats().is_none()
            || !host_norm_mlp_on()
            || !x.device().is_cpu()
            || x.dtype() != DType::F32
            || x.rank() != 2
        {
            return Ok(None);
        }
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let t = x.dim(0)?;
        let y = self.forward_rows(&xs, t)?;
        let h = y.len() / t.max(1);
        Ok(Some(Tensor::from_vec(y, (t, h), x.device())?))
    }

    /// [`Mlp::forward`] on the `t` rows `xs` (f32, row-major, on the host): the host form of
    /// [`Mlp::forward_host`] where it applies, else the tensor ops.
    pub(crate) fn forward_rows(&self, xs: &[f32], t: usize) -> Result<Vec<f32>> {
        match self.host_mats().filter(|_| host_norm_mlp_on()) {
            Some(mats) => Ok(super::super::moe::host_experts_rows(&[mats], &[xs])
                .into_iter()
                .next()
                .unwrap_or_default()),
            None => via_tensor(xs, t, |x| self.forward(x)),
        }
    }
}

impl RmsNorm {
    /// [`RmsNorm::add_forward`] on the host where `h` and `a` are f32 `[T, n]` on the CPU and
    /// their rows go to several threads: the residual add (candle's f32 `h + a`), then each
    /// row's norm with candle's CPU arithmetic ([`super::super::host_attention::rms_rows`]), a
    /// prompt's rows in blocks over the threads: the same bits. The tensor ops ran a prompt's
    /// norms (a chain of 1024 dependent adds a row) on the engine thread. `None`: not such
    /// inputs, too few rows to split (a decode token's: the copies in and out cost more than
    /// candle's one op, 0.5–2.7 µs a norm more on the 2-core VM), or `HARNESS_HOST_NORM_MLP=0`.
    pub(super) fn add_forward_host(
        &self,
        h: &Tensor,
        a: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if !host_norm_mlp_on()
            || !cpu_f32(h)
            || !cpu_f32(a)
            || !cpu_f32(self.weight())
            || h.rank() != 2
            || h.dims() != a.dims()
        {
            return Ok(None);
        }
        let (t, n) = h.dims2()?;
        // A row's norm costs about what 6n weights of a product do (its sum is a chain of n
        // dependent adds).
        let work = 6 * t * n;
        if !crate::weights::kernels::splits(work) {
            return Ok(None);
        }
        let mut hv: Vec<f32> = h.flatten_all()?.to_vec1()?;
        let av: Vec<f32> = a.flatten_all()?.to_vec1()?;
        let xv = self.add_rows(&mut hv, &av)?;
        let dev = h.device();
        Ok(Some((
            Tensor::from_vec(hv, (t, n), dev)?,
            Tensor::from_vec(xv, (t, n), dev)?,
        )))
    }

    /// Whether the row forms of this norm run on the host (an f32 scale on the CPU, and not
    /// `HARNESS_HOST_NORM_MLP=0`).
    fn host_rows(&self) -> bool {
        host_norm_mlp_on() && self.weight().dtype() == DType::F32 && self.weight().device().is_cpu()
    }

    /// [`RmsNorm::forward`] on the rows `xs` (f32, `n` each, on the host): candle's CPU
    /// arithmetic ([`super::super::host_attention::rms_rows`]), a prompt's rows in blocks over
    /// the threads: the same bits.
    pub(crate) fn forward_rows(&self, xs: &[f32]) -> Result<Vec<f32>> {
        let n = self.weight().elem_count();
        if !self.host_rows() {
            return via_tensor(xs, xs.len() / n.max(1), |x| self.forward(x));
        }
        let mut x = xs.to_vec();
        self.norm_in_place(&mut x)?;
        Ok(x)
    }

    /// [`RmsNorm::add_forward`] on rows: `h += a` (candle's f32 add) and the norm of the sum,
    /// returned; the same bits as the tensor ops.
    pub(crate) fn add_rows(&self, h: &mut [f32], a: &[f32]) -> Result<Vec<f32>> {
        if !self.host_rows() {
            h.iter_mut().zip(a).for_each(|(h, a)| *h += a);
            return self.forward_rows(h);
        }
        // Row by row, the add, the copy and the norm in one block (a prompt's rows over the
        // threads): the add and the copy of all rows ran on the engine thread before the
        // norms' region.
        let (w, eps) = (host_f32(self.weight())?, self.eps());
        let n = w.len();
        let mut x = vec![0f32; h.len()];
        // A row's norm costs about what 6n weights of a product do (its sum is a chain of n
        // dependent adds).
        let work = 7 * h.len();
        crate::weights::kernels::by_block_pairs((h, n), (&mut x, n), work, |start, h, x| {
            let a = &a[start..start + h.len()];
            h.iter_mut().zip(a).for_each(|(h, a)| *h += a);
            x.copy_from_slice(h);
            super::super::host_attention::rms_rows(x, &w, eps);
        });
        Ok(x)
    }

    /// Each row of `x` normalised in place ([`super::super::host_attention::rms_rows`]), in
    /// blocks of rows over the threads where they are enough to split.
    fn norm_in_place(&self, x: &mut [f32]) -> Result<()> {
        let (w, eps) = (host_f32(self.weight())?, self.eps());
        // A row's norm costs about what 6n weights of a product do (its sum is a chain of n
        // dependent adds).
        let work = 6 * x.len();
        crate::weights::kernels::by_blocks(x, w.len(), work, |_, row| {
            super::super::host_attention::rms_rows(row, &w, eps)
        });
        Ok(())
    }
}

/// Whether [`Mlp::forward`] and [`RmsNorm::add_forward`] run their host forms on the CPU
/// (`HARNESS_HOST_NORM_MLP=0`: the tensor ops, for A/B runs, which the engine's kernel label
/// then says).
pub(crate) fn host_norm_mlp_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("HARNESS_HOST_NORM_MLP").map_or(true, |v| v != "0"))
}
