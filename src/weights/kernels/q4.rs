//! Row kernels of MLX affine 4-bit matrices (`w = s·q + b` per group of `gs` columns, `q`
//! packed 8 per little-endian u32 word, least significant nibble first).
//!
//! Two kinds, each with a portable form and SIMD forms chosen at run time (AVX2 + FMA on
//! x86-64, NEON on aarch64):
//! * **exact**: f32 activations; per group `s · Σ q·x`, plus `b · Σx` per group;
//! * **int8**: activations quantized once per product to int8 in blocks of 32 (`x ≈ d·xq`,
//!   `d = max|x| / 127`), optionally with a second int8 part for the residual in steps of
//!   `d/254`; per group `s · d · Σ q·xq` summed in integers (llama.cpp's Q8 scheme applied to
//!   MLX's affine groups), plus `b · Σx̃` of the quantized activations per group.
//!
//! Each kind runs over a block of consecutive rows in one call (no per-row call or checks).
//!
//! Every form of a kind computes the same floating-point operations in the same order: eight
//! lane accumulators, fused multiply-adds, one reduction tree (`(l0+l4 + l2+l6) + (l1+l5 +
//! l3+l7)`), the bias sum (eight lanes of products and adds, the same tree) added last. So the
//! SIMD forms are bit-equal to the portable one (the unit tests check it on x86-64 here and on
//! aarch64 under qemu), and results do not depend on which CPU ran them. This file and its
//! quantizer (`q4_quant.rs`) use only `core`/`std`, so the aarch64 test can compile them alone
//! (`scripts/cross_test.sh`).

/// Per-group scales or biases of a matrix in their checkpoint type, read by index.
pub trait Scales: Copy + Sync {
    /// Value `i` as f32 (exactly).
    fn at(self, i: usize) -> f32;

    /// Values `i..i + 8` as f32 (one bounds check, so the conversion vectorizes).
    #[inline(always)]
    fn at8(self, i: usize) -> [f32; 8] {
        std::array::from_fn(|k| self.at(i + k))
    }
}

impl Scales for &[f32] {
    #[inline(always)]
    fn at(self, i: usize) -> f32 {
        self[i]
    }

    #[inline(always)]
    fn at8(self, i: usize) -> [f32; 8] {
        let v: &[f32; 8] = self[i..i + 8].try_into().expect("8 values");
        *v
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

    #[inline(always)]
    fn at8(self, i: usize) -> [f32; 8] {
        let h: &[u16; 8] = self.0[i..i + 8].try_into().expect("8 values");
        h.map(|h| f32::from_bits((h as u32) << 16))
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

#[path = "q4_quant.rs"]
mod quant;

pub use quant::{int8_fits, quantize_into, Parts, QRow, QuantizedInput, RESIDUAL_STEPS};

/// The one reduction of the eight lane accumulators, shared by every form.
#[inline(always)]
fn reduce(l: [f32; 8]) -> f32 {
    let s4 = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// `Σ_g b_g · Σx_g` over the row's groups: group `g` into lane `g mod 8`, in group order, then
/// the lanes' reduction (every form adds it last).
#[inline(always)]
fn bias_sum(groups: usize, xsum: &[f32], b: impl Scales, k0: usize) -> f32 {
    let mut l = [0f32; 8];
    let xsum = &xsum[..groups];
    let full = groups / 8 * 8;
    for (j, ch) in xsum[..full].chunks_exact(8).enumerate() {
        let bv = b.at8(k0 + 8 * j);
        for k in 0..8 {
            l[k] += bv[k] * ch[k];
        }
    }
    for (k, xs) in xsum[full..].iter().enumerate() {
        l[k] += b.at(k0 + full + k) * xs;
    }
    reduce(l)
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

impl<S: Copy> Row<'_, S> {
    /// Row `j` of the rows starting at this one (its `words` spanning them).
    fn nth(self, j: usize) -> Self {
        let per_row = self.groups * self.gs / 8;
        Row {
            words: &self.words[j * per_row..(j + 1) * per_row],
            k0: self.k0 + j * self.groups,
            ..self
        }
    }

    /// The row's 64-column chunks, after checking that the row's words and the int8 input
    /// (with its residual part if `two`) cover them: the SIMD forms read unchecked.
    fn int8_chunks(&self, x: QRow<'_>, two: bool) -> usize {
        let chunks = self.groups * self.gs / 64;
        assert!(self.words.len() >= chunks * 8 && x.q.len() >= chunks * 64);
        assert!(x.d.len() >= chunks * 8);
        assert!(!two || x.q2.len() >= chunks * 64);
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
/// eight products in integers (with two parts, `254·` the int8 part's plus the residual's) and
/// adds that sum, scaled by the lane scale times `s` of its 32-column block, to its accumulator
/// with one fused multiply-add.
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
    let chunks = r.int8_chunks(x, TWO);
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
        let mut n = part(x.q);
        if TWO {
            let n2 = part(x.q2);
            for k in 0..8 {
                n[k] = RESIDUAL_STEPS * n[k] + n2[k];
            }
        }
        for k in 0..8 {
            let sg = s.at(k0 + ((c * 64 + 32 * (k / 4)) >> sh));
            total[k] = (n[k] as f32).mul_add(x.d[c * 8 + k] * sg, total[k]);
        }
    }
    reduce(total) + bias_sum(groups, xsum, b, k0)
}

/// Bytes ahead of the current word that the AVX2 kernels prefetch: 4 KB (2 KB before
/// 2026-12-04; `scripts/peers/q4_stream.sh` timed 4 KB at 0.93–1.01 of 2 KB's time, four runs,
/// on 256 KB matrices read in random order, as a decode step reads its experts, on the 2-core
/// Zen 4 VM; whole-engine runs there could not resolve it).
#[cfg(target_arch = "x86_64")]
const PREFETCH: usize = 4096;

/// Exact kernel with AVX2 + FMA (bit-equal to [`row_exact`]) over `n` consecutive rows of one
/// matrix against one input, as [`int8_avx2`] takes them (`first` and the rows after it, row
/// `j`'s output to `out[j · stride]`).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exact_avx2<S: Scales>(
    first: Row<'_, S>,
    n: usize,
    x: &[f32],
    xsum: &[f32],
    out: &mut [f32],
    stride: usize,
) {
    let Row {
        words,
        s,
        b,
        k0,
        groups,
        gs,
    } = first;
    use std::arch::x86_64::*;
    let wpg = gs / 8;
    assert!(x.len() >= groups * gs);
    assert!(n == 0 || (words.len() >= n * groups * wpg && out.len() > (n - 1) * stride));
    let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    let fifteen = _mm256_set1_epi32(15);
    let xp = x.as_ptr();
    for j in 0..n {
        let wp = words.as_ptr().add(j * groups * wpg);
        let k0 = k0 + j * groups;
        let mut total = _mm256_setzero_ps();
        for g in 0..groups {
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(g * wpg + PREFETCH / 4) as *const i8);
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
        *out.get_unchecked_mut(j * stride) = reduce(l) + bias_sum(groups, xsum, b, k0);
    }
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

/// Defines an int8 row kernel of x86-64 (`int8_avx2` and `vnni::rows`) from how it forms a
/// chunk's integer lane sums: `part(lo, hi, q, c)` is one int8 part's sum for input bytes `q`
/// (lane `k`: word `8c + k`'s low nibbles by `q[64c..]`'s even bytes and its high nibbles by the
/// odd ones, in whatever width `one` / `two` then take), `one(p)` its 32-bit lane sums, and
/// `two(p1, p2)` the two parts' `254·n1 + n2`. Everything else — the chunks, the scales, the
/// float accumulation, the bias sum — is this one body, so the forms differ only in their
/// integer instructions, whose sums are exact: each is bit-equal to [`row_int8`].
///
/// The kernel runs `n` consecutive rows of one matrix, `first` and the `n − 1` after it (its
/// `words` spanning them all), against `M` inputs `x` (their group sums `xsum`), each chunk's
/// nibbles unpacked once for all of them; row `j`'s output for input `m` goes to
/// `out[j · stride + m]`. `TWO`: the inputs have a residual part. One call a matrix's block of
/// rows: no per-row call or checks.
#[cfg(target_arch = "x86_64")]
macro_rules! int8_rows_kernel {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident, features = $features:literal,
        setup = { $($setup:tt)* },
        part = $part:expr, one = $one:expr, two = $two:expr $(,)?
    ) => {
        $(#[$attr])*
        #[target_feature(enable = $features)]
        $vis unsafe fn $name<S: Scales, const TWO: bool, const M: usize>(
            first: Row<'_, S>,
            n: usize,
            x: [QRow<'_>; M],
            xsum: [&[f32]; M],
            out: &mut [f32],
            stride: usize,
        ) {
            use std::arch::x86_64::*;
            let Row {
                words,
                s,
                b,
                k0,
                groups,
                gs,
            } = first;
            let chunks = first.int8_chunks(x[0], TWO);
            for x in &x {
                assert_eq!(first.int8_chunks(*x, TWO), chunks);
            }
            assert!(n == 0 || (words.len() >= n * chunks * 8 && out.len() >= (n - 1) * stride + M));
            let sh = gs.trailing_zeros();
            let low = _mm256_set1_epi8(15);
            $($setup)*
            let qp = x.map(|x| x.q.as_ptr());
            let qp2 = x.map(|x| x.q2.as_ptr());
            let dp = x.map(|x| x.d.as_ptr());
            for j in 0..n {
                let wp = words.as_ptr().add(j * chunks * 8) as *const u8;
                let k0 = k0 + j * groups;
                let mut total = [_mm256_setzero_ps(); M];
                for c in 0..chunks {
                    // The words `PREFETCH` bytes ahead (the next rows' once this one ends): the
                    // matrix streams from memory, and the hardware prefetcher alone left the
                    // loads waiting (+10–20 % tok/s on the 2-core VM, alternated runs). A
                    // prefetch never faults.
                    _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(c * 32 + PREFETCH) as *const i8);
                    let w = _mm256_loadu_si256(wp.add(c * 32) as *const __m256i);
                    let lo = _mm256_and_si256(w, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
                    let sv = if gs >= 64 {
                        _mm256_set1_ps(s.at(k0 + ((c * 64) >> sh)))
                    } else {
                        _mm256_set_m128(
                            _mm_set1_ps(s.at(k0 + 2 * c + 1)),
                            _mm_set1_ps(s.at(k0 + 2 * c)),
                        )
                    };
                    for m in 0..M {
                        let p1 = ($part)(lo, hi, qp[m], c);
                        let sum = if TWO {
                            ($two)(p1, ($part)(lo, hi, qp2[m], c))
                        } else {
                            ($one)(p1)
                        };
                        let d = _mm256_mul_ps(_mm256_loadu_ps(dp[m].add(c * 8)), sv);
                        total[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), d, total[m]);
                    }
                }
                for m in 0..M {
                    let mut l = [0f32; 8];
                    _mm256_storeu_ps(l.as_mut_ptr(), total[m]);
                    *out.get_unchecked_mut(j * stride + m) =
                        reduce(l) + bias_sum(groups, xsum[m], b, k0);
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
int8_rows_kernel! {
    /// Int8 kernel with AVX2 (`maddubs`: unsigned nibbles × signed int8 activations, pairs of
    /// products in 16 bits — at most 2·15·127 each, two added — then `madd` into 32-bit lanes).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    fn int8_avx2, features = "avx2,fma",
    setup = {
        let ones = _mm256_set1_epi16(1);
        let steps = _mm256_set1_epi16(RESIDUAL_STEPS as i16);
    },
    part = |lo, hi, q: *const i8, c: usize| {
        let qe = _mm256_loadu_si256(q.add(c * 64) as *const __m256i);
        let qo = _mm256_loadu_si256(q.add(c * 64 + 32) as *const __m256i);
        _mm256_add_epi16(_mm256_maddubs_epi16(lo, qe), _mm256_maddubs_epi16(hi, qo))
    },
    one = |p| _mm256_madd_epi16(p, ones),
    two = |p1, p2| _mm256_add_epi32(_mm256_madd_epi16(p1, steps), _mm256_madd_epi16(p2, ones)),
}

#[cfg(target_arch = "x86_64")]
#[path = "q4_vnni.rs"]
pub mod vnni;

#[path = "q4_tile.rs"]
pub mod tile;

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
    // The integer sums of lanes 4h..4h+3 (bytes 16h..16h+15 of chunk c).
    let half = |c: usize, h: usize, qp: *const i8| -> int32x4_t {
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
        vpaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1))
    };
    let lanes = |c: usize, h: usize| -> float32x4_t {
        let n = half(c, h, x.q.as_ptr());
        if TWO {
            vcvtq_f32_s32(vmlaq_n_s32(half(c, h, x.q2.as_ptr()), n, RESIDUAL_STEPS))
        } else {
            vcvtq_f32_s32(n)
        }
    };
    for c in 0..chunks {
        let s0 = vdupq_n_f32(s.at(k0 + ((c * 64) >> sh)));
        let s1 = vdupq_n_f32(s.at(k0 + ((c * 64 + 32) >> sh)));
        let m0 = vmulq_f32(vld1q_f32(x.d.as_ptr().add(c * 8)), s0);
        let m1 = vmulq_f32(vld1q_f32(x.d.as_ptr().add(c * 8 + 4)), s1);
        t0 = vfmaq_f32(t0, lanes(c, 0), m0);
        t1 = vfmaq_f32(t1, lanes(c, 1), m1);
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

    /// The name of the form the int8 kinds run in reports: this form's, or `avx512-vnni` where
    /// the AVX2 form's integer sums run on VNNI ([`vnni`]).
    pub fn int8_name(self) -> &'static str {
        #[cfg(target_arch = "x86_64")]
        if self == Simd::Avx2 && vnni::available() {
            return "avx512-vnni";
        }
        self.name()
    }

    /// [`row_exact`] in this form.
    #[inline(always)]
    pub fn row_exact<S: Scales>(self, r: Row<'_, S>, x: &[f32], xsum: &[f32]) -> f32 {
        let mut out = [0f32];
        self.rows_exact(r, 1, x, xsum, &mut out, 1);
        out[0]
    }

    /// [`row_exact`] of `n` consecutive rows of one matrix against one input in this form
    /// (rows as [`Simd::rows_int8`] takes them).
    pub fn rows_exact<S: Scales>(
        self,
        first: Row<'_, S>,
        n: usize,
        x: &[f32],
        xsum: &[f32],
        out: &mut [f32],
        stride: usize,
    ) {
        // SAFETY: `Avx2` is only detected on CPUs with AVX2 and FMA; the kernel asserts its
        // slice lengths.
        #[cfg(target_arch = "x86_64")]
        if self == Simd::Avx2 {
            return unsafe { exact_avx2(first, n, x, xsum, out, stride) };
        }
        for j in 0..n {
            let r = first.nth(j);
            out[j * stride] = match self {
                // SAFETY: NEON is baseline on aarch64; the kernel asserts its slice lengths.
                #[cfg(target_arch = "aarch64")]
                Simd::Neon => unsafe { exact_neon(r, x, xsum) },
                _ => row_exact(r, x, xsum),
            };
        }
    }

    /// [`Simd::row_exact`] of one row against every input row of `xs` (`c` columns each, their
    /// per-group sums in `xsums`), written to `out`; on AVX2 up to four inputs share each
    /// unpacked word. Bit-equal to calling [`row_exact`] per input.
    pub fn row_exact_inputs<S: Scales>(
        self,
        r: Row<'_, S>,
        xs: &[f32],
        c: usize,
        xsums: &[f32],
        out: &mut [f32],
    ) {
        let g = r.groups;
        let i = self.exact_together(r, xs, c, xsums, out);
        for (k, o) in out.iter_mut().enumerate().skip(i) {
            *o = self.row_exact(r, &xs[k * c..(k + 1) * c], &xsums[k * g..(k + 1) * g]);
        }
    }

    /// The leading inputs of [`Simd::row_exact_inputs`] that this form runs together (blocks
    /// of four, then the last three or two); returns how many it did.
    #[allow(unused_variables)]
    fn exact_together<S: Scales>(
        self,
        r: Row<'_, S>,
        xs: &[f32],
        c: usize,
        xsums: &[f32],
        out: &mut [f32],
    ) -> usize {
        #[cfg(target_arch = "x86_64")]
        if self == Simd::Avx2 {
            let (g, n, mut i) = (r.groups, out.len(), 0);
            while n - i >= 2 {
                let (x, xsum, o) = (&xs[i * c..], &xsums[i * g..], &mut out[i..]);
                // SAFETY: as in `row_exact`.
                unsafe {
                    match n - i {
                        2 => exact_multi_avx2::<S, 2>(r, x, c, xsum, o),
                        3 => exact_multi_avx2::<S, 3>(r, x, c, xsum, o),
                        _ => exact_multi_avx2::<S, 4>(r, x, c, xsum, o),
                    }
                }
                i += (n - i).min(4);
            }
            return i;
        }
        0
    }

    /// [`row_int8`] in this form.
    #[inline(always)]
    pub fn row_int8<S: Scales>(self, r: Row<'_, S>, x: QRow<'_>, xsum: &[f32]) -> f32 {
        let mut out = [0f32];
        self.rows_int8(r, 1, [x], [xsum], &mut out, 1);
        out[0]
    }

    /// [`row_int8`] of `n` consecutive rows of one matrix against `M` inputs in this form:
    /// `first` and the rows after it (its `words` spanning all `n`, row `j`'s groups from
    /// `first.k0 + j · groups`), row `j`'s output for input `m` written to `out[j · stride +
    /// m]`. On AVX2 the inputs share each unpacked chunk of weights.
    pub fn rows_int8<S: Scales, const M: usize>(
        self,
        first: Row<'_, S>,
        n: usize,
        x: [QRow<'_>; M],
        xsum: [&[f32]; M],
        out: &mut [f32],
        stride: usize,
    ) {
        let two = quant::residual(&x);
        // SAFETY: `Avx2` is only detected on CPUs with AVX2 and FMA; the kernel asserts its
        // slice lengths.
        #[cfg(target_arch = "x86_64")]
        if self == Simd::Avx2 && vnni::available() {
            // SAFETY: `available` checked AVX2, FMA, AVX512-VL and AVX512-VNNI; the kernel
            // asserts its slice lengths.
            return unsafe {
                match two {
                    true => vnni::rows::<S, true, M>(first, n, x, xsum, out, stride),
                    false => vnni::rows::<S, false, M>(first, n, x, xsum, out, stride),
                }
            };
        }
        #[cfg(target_arch = "x86_64")]
        if self == Simd::Avx2 {
            return unsafe {
                match two {
                    true => int8_avx2::<S, true, M>(first, n, x, xsum, out, stride),
                    false => int8_avx2::<S, false, M>(first, n, x, xsum, out, stride),
                }
            };
        }
        for j in 0..n {
            let r = first.nth(j);
            for m in 0..M {
                out[j * stride + m] = match (self, two) {
                    // SAFETY: NEON is baseline on aarch64; the kernel asserts its slice lengths.
                    #[cfg(target_arch = "aarch64")]
                    (Simd::Neon, true) => unsafe { int8_neon::<S, true>(r, x[m], xsum[m]) },
                    // SAFETY: as above.
                    #[cfg(target_arch = "aarch64")]
                    (Simd::Neon, false) => unsafe { int8_neon::<S, false>(r, x[m], xsum[m]) },
                    _ => row_int8(r, x[m], xsum[m]),
                };
            }
        }
    }
}

#[cfg(test)]
#[path = "q4_tests.rs"]
mod tests;
