//! Row kernels of MLX affine 4-bit matrices (`w = s·q + b` per group of `gs` columns, `q`
//! packed 8 per little-endian u32 word, least significant nibble first).
//!
//! Two kinds, each with a portable form and SIMD forms chosen at run time (AVX2 + FMA on
//! x86-64, NEON on aarch64):
//! * **exact**: f32 activations; per group `s · Σ q·x`, plus `b · Σx` per group;
//! * **int8**: activations quantized once per product to int8 in blocks of 32 (`x ≈ d·xq`,
//!   `d = max|x| / 127`); per group `s · d · Σ q·xq` summed in integers, plus the exact
//!   `b · Σx` per group (llama.cpp's Q8 scheme applied to MLX's affine groups).
//!
//! Every form of a kind computes the same floating-point operations in the same order: eight
//! lane accumulators, fused multiply-adds, one reduction tree (`(l0+l4 + l2+l6) + (l1+l5 +
//! l3+l7)`), the bias sum added last. So the SIMD forms are bit-equal to the portable one (the
//! unit tests check it on x86-64 here and on aarch64 under qemu), and results do not depend on
//! which CPU ran them. This file uses only `core`/`std`, so the aarch64 test can compile it
//! alone (`scripts/cross_test.sh`).

/// Per-group scales or biases of a matrix in their checkpoint type, read by index.
pub trait Scales: Copy + Sync {
    /// Value `i` as f32 (exactly).
    fn at(self, i: usize) -> f32;
}

impl Scales for &[f32] {
    #[inline(always)]
    fn at(self, i: usize) -> f32 {
        self[i]
    }
}

/// bf16 scales (their bits).
#[derive(Debug, Clone, Copy)]
pub struct Bf16s<'a>(pub &'a [u16]);

impl Scales for Bf16s<'_> {
    #[inline(always)]
    fn at(self, i: usize) -> f32 {
        f32::from_bits((self.0[i] as u32) << 16)
    }
}

/// IEEE half scales (their bits).
#[derive(Debug, Clone, Copy)]
pub struct F16s<'a>(pub &'a [u16]);

impl Scales for F16s<'_> {
    #[inline(always)]
    fn at(self, i: usize) -> f32 {
        f16_to_f32(self.0[i])
    }
}

/// IEEE half bits to f32 (exact, subnormals, infinities and NaN included).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: value = man · 2^-24, exact in f32.
            let v = man as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (31, _) => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// One input row quantized: values and lane scales of the int8 part, and of the residual part
/// (empty with one part).
#[derive(Debug, Clone, Copy)]
pub struct QRow<'a> {
    /// Int8 values (see [`QuantizedInput::q`]).
    pub q: &'a [i8],
    /// Their lane scales.
    pub d: &'a [f32],
    /// The residual's int8 values (empty: one part).
    pub q2: &'a [i8],
    /// Their lane scales.
    pub d2: &'a [f32],
}

/// Activations of one or more input rows quantized for the int8 kernels: `x ≈ d·q` per
/// 32-column block, and with two parts also the residual `x − d·q ≈ d2·q2` (about 16-bit
/// precision from two int8 passes).
#[derive(Debug, Clone, Default)]
pub struct QuantizedInput {
    /// Per input row, `cols` int8 values; within each 64-column chunk, the 32 even columns
    /// first, then the 32 odd ones (the order of a chunk's low and high nibbles).
    pub q: Vec<i8>,
    /// Per input row, one scale per 32-column block, each repeated 4 times (the four lanes
    /// whose sums it scales: 8 values per 64-column chunk).
    pub d: Vec<f32>,
    /// The residual part, laid out as `q` (empty with one part).
    pub q2: Vec<i8>,
    /// Its scales, laid out as `d`.
    pub d2: Vec<f32>,
    /// Per input row, per 32-column block, the block's sum as quantized (`d·Σq + d2·Σq2`).
    pub block_sums: Vec<f32>,
    /// Columns per input row.
    pub cols: usize,
}

/// Whether the int8 kernels take a matrix with `cols` columns and groups of `gs`.
pub fn int8_fits(cols: usize, gs: usize) -> bool {
    cols.is_multiple_of(64) && gs >= 32 && gs.is_power_of_two()
}

/// Quantizes one 32-value block to int8 (`round(x / d)`, `d = max|x| / 127`), writing the
/// values at `even`/`odd` positions; returns `d` and the integer sum.
fn quantize_block(x: &[f32], out: &mut [i8], at: impl Fn(usize) -> usize) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (i, v) in x.iter().enumerate() {
        let q = (v * id).round() as i8;
        out[at(i)] = q;
        sum += q as i32;
    }
    (d, sum)
}

impl QuantizedInput {
    /// Quantizes every `cols`-long row of `xs` (`cols` a multiple of 64) into one part, or two
    /// (`residual`).
    pub fn new(xs: &[f32], cols: usize, residual: bool) -> Self {
        debug_assert!(cols.is_multiple_of(64) && xs.len().is_multiple_of(cols));
        let n = xs.len();
        let mut qi = QuantizedInput {
            q: vec![0i8; n],
            d: Vec::with_capacity(n / 8),
            q2: if residual { vec![0i8; n] } else { Vec::new() },
            d2: Vec::with_capacity(if residual { n / 8 } else { 0 }),
            block_sums: Vec::with_capacity(n / 32),
            cols,
        };
        let mut r = [0f32; 32];
        for (blk, x) in xs.chunks_exact(32).enumerate() {
            // Block `blk` is half `h` of chunk `blk / 2`: its column i (even or odd) goes to
            // the chunk's even or odd half.
            let (base, h) = ((blk / 2) * 64, blk % 2);
            let at = |i: usize| {
                let col = 32 * h + i;
                base + if col.is_multiple_of(2) {
                    col / 2
                } else {
                    32 + col / 2
                }
            };
            let (d, s) = quantize_block(x, &mut qi.q, at);
            qi.d.extend([d; 4]);
            let mut sum = d * s as f32;
            if residual {
                for (i, (ri, xi)) in r.iter_mut().zip(x).enumerate() {
                    *ri = xi - d * qi.q[at(i)] as f32;
                }
                let (d2, s2) = quantize_block(&r, &mut qi.q2, at);
                qi.d2.extend([d2; 4]);
                sum += d2 * s2 as f32;
            }
            qi.block_sums.push(sum);
        }
        qi
    }

    /// Input row `i`.
    #[inline]
    pub fn row(&self, i: usize) -> QRow<'_> {
        let c = self.cols;
        let (q, d) = (
            &self.q[i * c..(i + 1) * c],
            &self.d[i * c / 8..(i + 1) * c / 8],
        );
        let (q2, d2) = if self.q2.is_empty() {
            (&[][..], &[][..])
        } else {
            (
                &self.q2[i * c..(i + 1) * c],
                &self.d2[i * c / 8..(i + 1) * c / 8],
            )
        };
        QRow { q, d, q2, d2 }
    }

    /// Per input row, per group of `gs` columns (a multiple of 32), the group's sum as
    /// quantized: the `Σx` of the bias term, so that `s·Σq·x̃ + b·Σx̃` is exactly `W·x̃` and
    /// the bias does not amplify the activations' rounding (MLX biases are ≈ −8·s).
    pub fn group_sums(&self, gs: usize) -> Vec<f32> {
        self.block_sums
            .chunks_exact(gs / 32)
            .map(|b| b.iter().sum())
            .collect()
    }
}

/// The one reduction of the eight lane accumulators, shared by every form.
#[inline(always)]
fn reduce(l: [f32; 8]) -> f32 {
    let s4 = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// `Σ_g b_g · Σx_g` over the row's groups, in group order (every form adds it last).
#[inline(always)]
fn bias_sum(groups: usize, xsum: &[f32], b: impl Scales, k0: usize) -> f32 {
    let mut acc = 0f32;
    for (g, xs) in xsum[..groups].iter().enumerate() {
        acc += b.at(k0 + g) * xs;
    }
    acc
}

/// One row of a 4-bit matrix as every kernel form reads it: its packed words (`groups` groups
/// of `gs` columns) and the matrix's group scales and biases, the row's first group at `k0`.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a, S> {
    /// The row's packed words.
    pub words: &'a [u32],
    /// Group scales of the matrix.
    pub s: S,
    /// Group biases of the matrix.
    pub b: S,
    /// Index of the row's first group in `s` and `b`.
    pub k0: usize,
    /// Groups in the row.
    pub groups: usize,
    /// Columns per group.
    pub gs: usize,
}

impl<S> Row<'_, S> {
    /// The row's 64-column chunks, after checking that the row's words and the int8 input
    /// (with its residual part if `two`) cover them: the SIMD forms read unchecked.
    fn int8_chunks(&self, x: QRow<'_>, two: bool) -> usize {
        let chunks = self.groups * self.gs / 64;
        assert!(self.words.len() >= chunks * 8 && x.q.len() >= chunks * 64);
        assert!(x.d.len() >= chunks * 8);
        assert!(!two || (x.q2.len() >= chunks * 64 && x.d2.len() >= chunks * 8));
        chunks
    }
}

/// Exact kernel, portable form: one output of row `r` for the input row `x`, whose per-group
/// sums are `xsum`.
pub fn row_exact<S: Scales>(r: Row<'_, S>, x: &[f32], xsum: &[f32]) -> f32 {
    let Row {
        words,
        s,
        b,
        k0,
        groups,
        gs,
    } = r;
    let wpg = gs / 8;
    let mut total = [0f32; 8];
    for g in 0..groups {
        let mut acc = [0f32; 8];
        for i in 0..wpg {
            let w = words[g * wpg + i];
            let xv = &x[g * gs + 8 * i..g * gs + 8 * i + 8];
            for j in 0..8 {
                acc[j] = (((w >> (4 * j)) & 15) as f32).mul_add(xv[j], acc[j]);
            }
        }
        let sg = s.at(k0 + g);
        for j in 0..8 {
            total[j] = sg.mul_add(acc[j], total[j]);
        }
    }
    reduce(total) + bias_sum(groups, xsum, b, k0)
}

/// Int8 kernel, portable form (see [`row_exact`]; `x`: the input row as
/// [`QuantizedInput::row`] gives it). Lane `k` of chunk `c` (64 columns) sums word `8c + k`'s
/// eight products in integers and adds them, scaled by `d · s` of its 32-column block, to its
/// accumulator with one fused multiply-add (then the same for the residual part, if any).
pub fn row_int8<S: Scales>(r: Row<'_, S>, x: QRow<'_>, xsum: &[f32]) -> f32 {
    if x.q2.is_empty() {
        int8_portable::<S, false>(r, x, xsum)
    } else {
        int8_portable::<S, true>(r, x, xsum)
    }
}

fn int8_portable<S: Scales, const TWO: bool>(r: Row<'_, S>, x: QRow<'_>, xsum: &[f32]) -> f32 {
    let Row {
        words,
        s,
        b,
        k0,
        groups,
        gs,
    } = r;
    let chunks = groups * gs / 64;
    let sh = gs.trailing_zeros();
    let mut total = [0f32; 8];
    for c in 0..chunks {
        let part = |q: &[i8]| -> [i32; 8] {
            let (qe, qo) = (&q[c * 64..c * 64 + 32], &q[c * 64 + 32..c * 64 + 64]);
            let mut sums = [0i32; 8];
            for (k, sum) in sums.iter_mut().enumerate() {
                let w = words[c * 8 + k];
                for byte in 0..4 {
                    let v = (w >> (8 * byte)) & 0xff;
                    let i = 4 * k + byte;
                    *sum += (v & 15) as i32 * qe[i] as i32 + (v >> 4) as i32 * qo[i] as i32;
                }
            }
            sums
        };
        let i1 = part(x.q);
        let i2 = if TWO { part(x.q2) } else { [0; 8] };
        for k in 0..8 {
            let sg = s.at(k0 + ((c * 64 + 32 * (k / 4)) >> sh));
            total[k] = (i1[k] as f32).mul_add(x.d[c * 8 + k] * sg, total[k]);
            if TWO {
                total[k] = (i2[k] as f32).mul_add(x.d2[c * 8 + k] * sg, total[k]);
            }
        }
    }
    reduce(total) + bias_sum(groups, xsum, b, k0)
}

/// Exact kernel with AVX2 + FMA (bit-equal to [`row_exact`]).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exact_avx2<S: Scales>(r: Row<'_, S>, x: &[f32], xsum: &[f32]) -> f32 {
    let Row {
        words,
        s,
        b,
        k0,
        groups,
        gs,
    } = r;
    use std::arch::x86_64::*;
    let wpg = gs / 8;
    assert!(words.len() >= groups * wpg && x.len() >= groups * gs);
    let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    let fifteen = _mm256_set1_epi32(15);
    let mut total = _mm256_setzero_ps();
    let (wp, xp) = (words.as_ptr(), x.as_ptr());
    for g in 0..groups {
        let mut acc = _mm256_setzero_ps();
        for i in 0..wpg {
            let w = *wp.add(g * wpg + i);
            let q = _mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32(w as i32), shifts),
                fifteen,
            );
            let xv = _mm256_loadu_ps(xp.add(g * gs + 8 * i));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), xv, acc);
        }
        total = _mm256_fmadd_ps(_mm256_set1_ps(s.at(k0 + g)), acc, total);
    }
    let mut l = [0f32; 8];
    _mm256_storeu_ps(l.as_mut_ptr(), total);
    reduce(l) + bias_sum(groups, xsum, b, k0)
}

/// [`exact_avx2`] for `N` input rows at once (`xs`: `N` rows of `c` columns, `xsums`: `N` rows
/// of per-group sums): each word's nibbles are unpacked once and used by all of them, and each
/// output is bit-equal to [`row_exact`] of its input (the same operations, in the same order).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exact_multi_avx2<S: Scales, const N: usize>(
    r: Row<'_, S>,
    xs: &[f32],
    c: usize,
    xsums: &[f32],
    out: &mut [f32],
) {
    let Row {
        words,
        s,
        b,
        k0,
        groups,
        gs,
    } = r;
    use std::arch::x86_64::*;
    let wpg = gs / 8;
    assert!(words.len() >= groups * wpg && c >= groups * gs && xs.len() >= N * c);
    assert!(xsums.len() >= N * groups && out.len() >= N);
    let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    let fifteen = _mm256_set1_epi32(15);
    let mut total = [_mm256_setzero_ps(); N];
    let (wp, xp) = (words.as_ptr(), xs.as_ptr());
    for g in 0..groups {
        let mut acc = [_mm256_setzero_ps(); N];
        for i in 0..wpg {
            let w = *wp.add(g * wpg + i);
            let q = _mm256_cvtepi32_ps(_mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32(w as i32), shifts),
                fifteen,
            ));
            for (n, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add(n * c + g * gs + 8 * i));
                *a = _mm256_fmadd_ps(q, xv, *a);
            }
        }
        let sg = _mm256_set1_ps(s.at(k0 + g));
        for (t, a) in total.iter_mut().zip(&acc) {
            *t = _mm256_fmadd_ps(sg, *a, *t);
        }
    }
    for (n, t) in total.iter().enumerate() {
        let mut l = [0f32; 8];
        _mm256_storeu_ps(l.as_mut_ptr(), *t);
        out[n] = reduce(l) + bias_sum(groups, &xsums[n * groups..], b, k0);
    }
}

/// Int8 kernel with AVX2 (`maddubs`: unsigned nibbles × signed int8 activations; bit-equal to
/// [`row_int8`]); `TWO`: the input has a residual part.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn int8_avx2<S: Scales, const TWO: bool>(r: Row<'_, S>, x: QRow<'_>, xsum: &[f32]) -> f32 {
    let Row {
        words,
        s,
        b,
        k0,
        groups,
        gs,
    } = r;
    use std::arch::x86_64::*;
    let chunks = r.int8_chunks(x, TWO);
    let sh = gs.trailing_zeros();
    let low = _mm256_set1_epi8(15);
    let ones = _mm256_set1_epi16(1);
    let mut total = _mm256_setzero_ps();
    let wp = words.as_ptr() as *const u8;
    let (qp, dp, qp2, dp2) = (x.q.as_ptr(), x.d.as_ptr(), x.q2.as_ptr(), x.d2.as_ptr());
    for c in 0..chunks {
        let w = _mm256_loadu_si256(wp.add(c * 32) as *const __m256i);
        let lo = _mm256_and_si256(w, low);
        let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
        let sums = |qp: *const i8| {
            let qe = _mm256_loadu_si256(qp.add(c * 64) as *const __m256i);
            let qo = _mm256_loadu_si256(qp.add(c * 64 + 32) as *const __m256i);
            let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, qe), _mm256_maddubs_epi16(hi, qo));
            _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones))
        };
        let sv = if gs >= 64 {
            _mm256_set1_ps(s.at(k0 + ((c * 64) >> sh)))
        } else {
            _mm256_set_m128(
                _mm_set1_ps(s.at(k0 + 2 * c + 1)),
                _mm_set1_ps(s.at(k0 + 2 * c)),
            )
        };
        let m = _mm256_mul_ps(_mm256_loadu_ps(dp.add(c * 8)), sv);
        total = _mm256_fmadd_ps(sums(qp), m, total);
        if TWO {
            let m2 = _mm256_mul_ps(_mm256_loadu_ps(dp2.add(c * 8)), sv);
            total = _mm256_fmadd_ps(sums(qp2), m2, total);
        }
    }
    let mut l = [0f32; 8];
    _mm256_storeu_ps(l.as_mut_ptr(), total);
    reduce(l) + bias_sum(groups, xsum, b, k0)
}

/// Exact kernel with NEON (bit-equal to [`row_exact`]).
///
/// # Safety
/// None beyond the slice lengths it asserts (NEON is part of every aarch64 CPU).
#[cfg(target_arch = "aarch64")]
unsafe fn exact_neon<S: Scales>(r: Row<'_, S>, x: &[f32], xsum: &[f32]) -> f32 {
    let Row {
        words,
        s,
        b,
        k0,
        groups,
        gs,
    } = r;
    use std::arch::aarch64::*;
    let wpg = gs / 8;
    assert!(words.len() >= groups * wpg && x.len() >= groups * gs);
    let sh_lo = vld1q_s32([0i32, -4, -8, -12].as_ptr());
    let sh_hi = vld1q_s32([-16i32, -20, -24, -28].as_ptr());
    let fifteen = vdupq_n_u32(15);
    let (mut t0, mut t1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
    let xp = x.as_ptr();
    for g in 0..groups {
        let (mut a0, mut a1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        for i in 0..wpg {
            let w = vdupq_n_u32(words[g * wpg + i]);
            let q0 = vcvtq_f32_u32(vandq_u32(vshlq_u32(w, sh_lo), fifteen));
            let q1 = vcvtq_f32_u32(vandq_u32(vshlq_u32(w, sh_hi), fifteen));
            a0 = vfmaq_f32(a0, q0, vld1q_f32(xp.add(g * gs + 8 * i)));
            a1 = vfmaq_f32(a1, q1, vld1q_f32(xp.add(g * gs + 8 * i + 4)));
        }
        let sg = vdupq_n_f32(s.at(k0 + g));
        t0 = vfmaq_f32(t0, sg, a0);
        t1 = vfmaq_f32(t1, sg, a1);
    }
    let mut l = [0f32; 8];
    vst1q_f32(l.as_mut_ptr(), t0);
    vst1q_f32(l.as_mut_ptr().add(4), t1);
    reduce(l) + bias_sum(groups, xsum, b, k0)
}

/// Int8 kernel with NEON (widening multiplies; bit-equal to [`row_int8`]); `TWO`: the input
/// has a residual part.
///
/// # Safety
/// None beyond the slice lengths it asserts.
#[cfg(target_arch = "aarch64")]
unsafe fn int8_neon<S: Scales, const TWO: bool>(r: Row<'_, S>, x: QRow<'_>, xsum: &[f32]) -> f32 {
    let Row {
        words,
        s,
        b,
        k0,
        groups,
        gs,
    } = r;
    use std::arch::aarch64::*;
    let chunks = r.int8_chunks(x, TWO);
    let sh = gs.trailing_zeros();
    let low = vdupq_n_u8(15);
    let (mut t0, mut t1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
    let wp = words.as_ptr() as *const u8;
    // The integer sums of lanes 4h..4h+3 (bytes 16h..16h+15 of chunk c), as f32.
    let half = |c: usize, h: usize, qp: *const i8| -> float32x4_t {
        let w = vld1q_u8(wp.add(c * 32 + 16 * h));
        let lo = vreinterpretq_s8_u8(vandq_u8(w, low));
        let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(w));
        let qe = vld1q_s8(qp.add(c * 64 + 16 * h));
        let qo = vld1q_s8(qp.add(c * 64 + 32 + 16 * h));
        let p0 = vmlal_s8(
            vmull_s8(vget_low_s8(lo), vget_low_s8(qe)),
            vget_low_s8(hi),
            vget_low_s8(qo),
        );
        let p1 = vmlal_s8(
            vmull_s8(vget_high_s8(lo), vget_high_s8(qe)),
            vget_high_s8(hi),
            vget_high_s8(qo),
        );
        // Pairs of bytes, then pairs of pairs: lane j = bytes 4j..4j+3.
        vcvtq_f32_s32(vpaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1)))
    };
    for c in 0..chunks {
        let s0 = vdupq_n_f32(s.at(k0 + ((c * 64) >> sh)));
        let s1 = vdupq_n_f32(s.at(k0 + ((c * 64 + 32) >> sh)));
        let m0 = vmulq_f32(vld1q_f32(x.d.as_ptr().add(c * 8)), s0);
        let m1 = vmulq_f32(vld1q_f32(x.d.as_ptr().add(c * 8 + 4)), s1);
        t0 = vfmaq_f32(t0, half(c, 0, x.q.as_ptr()), m0);
        t1 = vfmaq_f32(t1, half(c, 1, x.q.as_ptr()), m1);
        if TWO {
            let m0 = vmulq_f32(vld1q_f32(x.d2.as_ptr().add(c * 8)), s0);
            let m1 = vmulq_f32(vld1q_f32(x.d2.as_ptr().add(c * 8 + 4)), s1);
            t0 = vfmaq_f32(t0, half(c, 0, x.q2.as_ptr()), m0);
            t1 = vfmaq_f32(t1, half(c, 1, x.q2.as_ptr()), m1);
        }
    }
    let mut l = [0f32; 8];
    vst1q_f32(l.as_mut_ptr(), t0);
    vst1q_f32(l.as_mut_ptr().add(4), t1);
    reduce(l) + bias_sum(groups, xsum, b, k0)
}

/// Which form of the kernels this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simd {
    /// x86-64 AVX2 + FMA.
    Avx2,
    /// aarch64 NEON.
    Neon,
    /// The portable forms.
    Portable,
}

impl Simd {
    /// Detected at run time.
    pub fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Simd::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            return Simd::Neon;
        }
        #[allow(unreachable_code)]
        Simd::Portable
    }

    /// The form this CPU runs (detected once per process).
    pub fn current() -> Simd {
        static SIMD: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *SIMD.get_or_init(Simd::detect)
    }

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Simd::Avx2 => "avx2",
            Simd::Neon => "neon",
            Simd::Portable => "portable",
        }
    }

    /// [`row_exact`] in this form.
    #[inline(always)]
    pub fn row_exact<S: Scales>(self, r: Row<'_, S>, x: &[f32], xsum: &[f32]) -> f32 {
        match self {
            // SAFETY: `Avx2` is only detected on CPUs with AVX2 and FMA; the kernels assert
            // their slice lengths.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { exact_avx2(r, x, xsum) },
            // SAFETY: NEON is baseline on aarch64; the kernels assert their slice lengths.
            #[cfg(target_arch = "aarch64")]
            Simd::Neon => unsafe { exact_neon(r, x, xsum) },
            _ => row_exact(r, x, xsum),
        }
    }

    /// [`Simd::row_exact`] of one row against every input row of `xs` (`c` columns each, their
    /// per-group sums in `xsums`), written to `out`; on AVX2 four inputs share each unpacked
    /// word. Bit-equal to calling [`row_exact`] per input.
    pub fn rows_exact<S: Scales>(
        self,
        r: Row<'_, S>,
        xs: &[f32],
        c: usize,
        xsums: &[f32],
        out: &mut [f32],
    ) {
        let g = r.groups;
        let i = self.exact_by_four(r, xs, c, xsums, out);
        for (k, o) in out.iter_mut().enumerate().skip(i) {
            *o = self.row_exact(r, &xs[k * c..(k + 1) * c], &xsums[k * g..(k + 1) * g]);
        }
    }

    /// The leading blocks of four inputs of [`Simd::rows_exact`] that this form runs together;
    /// returns how many inputs it did.
    #[allow(unused_variables)]
    fn exact_by_four<S: Scales>(
        self,
        r: Row<'_, S>,
        xs: &[f32],
        c: usize,
        xsums: &[f32],
        out: &mut [f32],
    ) -> usize {
        #[cfg(target_arch = "x86_64")]
        if self == Simd::Avx2 {
            let g = r.groups;
            let blocks = out.len() / 4;
            for k in 0..blocks {
                let i = 4 * k;
                // SAFETY: as in `row_exact`.
                unsafe {
                    exact_multi_avx2::<S, 4>(
                        r,
                        &xs[i * c..(i + 4) * c],
                        c,
                        &xsums[i * g..(i + 4) * g],
                        &mut out[i..i + 4],
                    )
                };
            }
            return 4 * blocks;
        }
        0
    }

    /// [`row_int8`] in this form.
    #[inline(always)]
    pub fn row_int8<S: Scales>(self, r: Row<'_, S>, x: QRow<'_>, xsum: &[f32]) -> f32 {
        if x.q2.is_empty() {
            self.int8::<S, false>(r, x, xsum)
        } else {
            self.int8::<S, true>(r, x, xsum)
        }
    }

    #[inline(always)]
    fn int8<S: Scales, const TWO: bool>(self, r: Row<'_, S>, x: QRow<'_>, xsum: &[f32]) -> f32 {
        match self {
            // SAFETY: as in `row_exact`.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { int8_avx2::<S, TWO>(r, x, xsum) },
            // SAFETY: as in `row_exact`.
            #[cfg(target_arch = "aarch64")]
            Simd::Neon => unsafe { int8_neon::<S, TWO>(r, x, xsum) },
            _ => int8_portable::<S, TWO>(r, x, xsum),
        }
    }
}

#[cfg(test)]
#[path = "q4_tests.rs"]
mod tests;
