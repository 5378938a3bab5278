//! Attention on the host over the KV cache's buffers (CPU), for a decode token or a prompt's
//! queries ([`attention`]): each (query, head) pair's softmax and weighted sum computed alone
//! with the same operations, side by side on the context's threads, so the result does not
//! depend on the thread count.

/// RMSNorm of each `w.len()`-long row of `x` in place with weight `w`: candle's CPU `rms_norm`
/// arithmetic (a sequential f32 sum of squares, `v / sqrt(Σ/n + eps) · w`), so the same bits.
pub(crate) fn rms_rows(x: &mut [f32], w: &[f32], eps: f32) {
    let n = w.len();
    for row in x.chunks_exact_mut(n) {
        let sum2 = row.iter().map(|&v| v * v).sum::<f32>();
        let m = (sum2 / n as f32 + eps).sqrt();
        row.iter_mut().zip(w).for_each(|(v, w)| *v = *v / m * w);
    }
}

/// RoPE of each `hd`-long head of `x` in place over its first `2 · cos.len()` dims (one
/// position's `cos`, `sin`): candle's CPU `rope` arithmetic (halves `a`, `b`: `a·c − b·s`,
/// `a·s + b·c`), so the same bits.
pub(crate) fn rope_heads(x: &mut [f32], hd: usize, cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    for head in x.chunks_exact_mut(hd) {
        for i in 0..half {
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * cos[i] - b * sin[i];
            head[i + half] = a * sin[i] + b * cos[i];
        }
    }
}

/// [`attend_head`] compiled for AVX2: the same operations (no fused multiply-adds), eight lanes
/// a vector instead of four, so the same bits.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn attend_head_avx2(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    keys: (usize, usize),
    scale: f32,
    out: &mut [f32],
) {
    attend_head(q, k, v, keys, scale, out)
}

/// `e^x` for `x ≤ 0` (NaN stays NaN) in plain arithmetic, so that a loop of it vectorizes (a
/// libm call per value does not): `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, `e^r` by its Taylor
/// polynomial to degree 7 (relative error below 1e-7), scaled by `2^n` in the exponent bits;
/// below −87 (where `e^x` < 2^-125) it is 0.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let xc = x.max(-87.0);
    let n = (xc * std::f32::consts::LOG2_E + SHIFT) - SHIFT;
    // ln 2 in two parts, the first with 15 significant bits: n·hi is exact for |n| ≤ 127.
    let r = (xc - n * 0.693_145_75) - n * 1.428_606_8e-6;
    let mut e = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        e = e * r + c;
    }
    let scale = f32::from_bits((((n as i32) + 127) as u32) << 23);
    let y = e * scale;
    if x >= -87.0 {
        y
    } else if x < -87.0 {
        0.0
    } else {
        x // NaN
    }
}

/// One query head `q` over the keys `k` and values `v` of its KV head (`[positions, hd]`) at
/// positions `keys.0..keys.1`: the softmax-weighted sum of the values into `out` (zeros).
#[inline(always)]
pub(crate) fn attend_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (first, s): (usize, usize),
    scale: f32,
    out: &mut [f32],
) {
    let hd = q.len();
    let mut p = vec![0f32; s];
    let mut max = f32::NEG_INFINITY;
    for (j, pj) in p.iter_mut().enumerate().take(s).skip(first) {
        let kj = &k[j * hd..(j + 1) * hd];
        // Eight lanes, so that the products vectorize (a last part shorter than eight adds
        // into the first lanes).
        let mut acc = [0f32; 8];
        let (qs, ks) = (q.chunks_exact(8), kj.chunks_exact(8));
        let (qr, kr) = (qs.remainder(), ks.remainder());
        for (qc, kc) in qs.zip(ks) {
            for l in 0..8 {
                acc[l] += qc[l] * kc[l];
            }
        }
        for (l, (a, b)) in qr.iter().zip(kr).enumerate() {
            acc[l] += a * b;
        }
        *pj = acc.iter().sum::<f32>() * scale;
        max = max.max(*pj);
    }
    for pj in &mut p[first..s] {
        *pj = exp_nonpositive(*pj - max);
    }
    let sum: f32 = p[first..s].iter().sum();
    for (j, pj) in p.iter().enumerate().take(s).skip(first) {
        let w = pj / sum;
        let vj = &v[j * hd..(j + 1) * hd];
        for (o, v) in out.iter_mut().zip(vj) {
            *o += w * v;
        }
    }
}

/// `t` queries on the host (a decode token, `t = 1`, or a prompt's), each over the cached keys it
/// may see (causal, within `window` positions when set), their own keys and values already
/// appended at cache positions `base..base + t`: for query `i` and query head `h` (`rep` per KV
/// head), the softmax of `scale · q · k_j` over the keys `j < base + i + 1` (the window's last
/// ones) and the weighted sum of their values. `q`: `[t, nh · hd]`; `kb`/`vb`: `[kv heads, cap,
/// hd]`. Returns `[t, nh · hd]`. The (query, head) pairs run side by side on the context's
/// threads (a prompt's tensor-op path — batched products, mask, softmax — ran on one).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    q: &[f32],
    kb: &[f32],
    vb: &[f32],
    cap: usize,
    (base, t): (usize, usize),
    window: Option<usize>,
    (nh, rep, hd): (usize, usize, usize),
    scale: f32,
) -> Vec<f32> {
    let mut out = vec![0f32; t * nh * hd];
    let keys = |i: usize| {
        let s = base + i + 1;
        (window.map_or(0, |w| s.saturating_sub(w)), s)
    };
    // A key weighs two weights' work a value: a decode token's heads stay on the engine
    // thread until its keys are many (weighed at eight, splitting a 16-head token over 17–48
    // keys ran decode at 0.93× on the 2-core VM, alternated, 8 rounds: the region cost more
    // than the ~12 µs of attention it split).
    let work = (0..t).map(|i| keys(i).1 - keys(i).0).sum::<usize>() * nh * hd * 2;
    crate::weights::kernels::by_blocks(&mut out, hd, work, |start, oh| {
        let (i, h) = (start / (nh * hd), start / hd % nh);
        let g = h / rep;
        let (k, v) = (&kb[g * cap * hd..], &vb[g * cap * hd..]);
        let qh = &q[i * nh * hd + h * hd..i * nh * hd + (h + 1) * hd];
        #[cfg(target_arch = "x86_64")]
        if crate::weights::kernels::q4::Simd::current() == crate::weights::kernels::q4::Simd::Avx2 {
            // SAFETY: `Avx2` is only detected on CPUs with AVX2.
            return unsafe { attend_head_avx2(qh, k, v, keys(i), scale, oh) };
        }
        attend_head(qh, k, v, keys(i), scale, oh)
    });
    out
}

#[cfg(test)]
mod tests {
    use super::{rms_rows, rope_heads};
    use candle_core::{Device, Tensor};

    /// Seeded values in ±2 with some large ones (the sums' rounding then matters).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0;
                if i % 17 == 0 {
                    v * 300.0
                } else {
                    v
                }
            })
            .collect()
    }

    /// A tensor's values in row-major order.
    fn values_of(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    /// The host attention's norm and RoPE give the bits of the candle ops the tensor-op form of
    /// `Attention::forward` runs (its host form relies on it: the same logits whichever ran).
    #[test]
    fn host_norm_and_rope_give_the_tensor_ops_bits() {
        let dev = Device::Cpu;
        let (t, heads, hd) = (3, 4, 64);
        let x = values(t * heads * hd, 7);
        let w = values(hd, 11);
        let eps = 1e-5f32;
        let mut host = x.clone();
        rms_rows(&mut host, &w, eps);
        let xt = Tensor::from_vec(x.clone(), (t, heads, hd), &dev).unwrap();
        let wt = Tensor::from_vec(w.clone(), hd, &dev).unwrap();
        let ops = candle_nn::ops::rms_norm(&xt, &wt, eps).unwrap();
        assert_eq!(bits(&host), bits(&values_of(&ops)), "rms_rows");
        // Partial rotary (half the head) and full.
        for rd in [hd / 2, hd] {
            let rope = crate::models::layers::Rope::new(1e6, rd);
            let mut host = x.clone();
            for i in 0..t {
                let (c, s) = rope.values(5 + i);
                rope_heads(&mut host[i * heads * hd..(i + 1) * heads * hd], hd, &c, &s);
            }
            // The tensor form: `[1, heads, T, hd]`.
            let xh = xt
                .transpose(0, 1)
                .unwrap()
                .unsqueeze(0)
                .unwrap()
                .contiguous()
                .unwrap();
            let (c, s) = rope.tables(5, t, &dev).unwrap();
            let ops = crate::models::layers::apply_rope(&xh, &c, &s).unwrap();
            // Back to `[T, heads, hd]`.
            let ops = ops.squeeze(0).unwrap().transpose(0, 1).unwrap();
            assert_eq!(
                bits(&host),
                bits(&values_of(&ops)),
                "rope_heads, rotary dim {rd}"
            );
        }
    }
}
