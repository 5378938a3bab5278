//! Activations quantized for the int8 kernels of [`super`]: one int8 part per block of 32
//! values, or two (the value and its residual), laid out as the kernels read them. Like its
//! parent, this file uses only `std` (the aarch64 test compiles them alone).

use super::Simd;

/// One input row quantized: the int8 part, the residual part (empty with one part) and the
/// scale of each lane's integer sum.
#[derive(Debug, Clone, Copy)]
pub struct QRow<'a> {
    /// Int8 values (see [`QuantizedInput::q`]).
    pub q: &'a [i8],
    /// The residual's int8 values (empty: one part).
    pub q2: &'a [i8],
    /// Lane scales (see [`QuantizedInput::d`]).
    pub d: &'a [f32],
}

/// Steps of the residual part in one step of the int8 part. A value rounded to the int8 step
/// `d` is off by at most `d/2`, so its residual in steps of `d/254` lies within ±127: the two
/// parts are the integer `254·q + q2` in steps of `d/254` (about 15 bits), summed in integers.
pub const RESIDUAL_STEPS: i32 = 254;

/// Activations of one or more input rows quantized for the int8 kernels: `x ≈ d·q` per
/// 32-column block with `d = max|x| / 127`, and with two parts also the residual
/// `x − d·q ≈ (d/254)·q2`.
#[derive(Debug, Clone, Default)]
pub struct QuantizedInput {
    /// Per input row, `cols` int8 values; within each 64-column chunk, the 32 even columns
    /// first, then the 32 odd ones (the order of a chunk's low and high nibbles).
    pub q: Vec<i8>,
    /// The residual part, laid out as `q` (empty with one part).
    pub q2: Vec<i8>,
    /// Per input row, the scale of the integer each kernel lane sums, one per 32-column block
    /// repeated 4 times (the four lanes of its words: 8 values per 64-column chunk): the block's
    /// step `d` with one part, `d/254` with two (the lanes then sum `254·q + q2`); NaN for a
    /// block holding a NaN or infinity (its `q` zero), so the products it enters are NaN.
    pub d: Vec<f32>,
    /// Per input row, per 32-column block, the block's sum as quantized (`Σ` of the values the
    /// kernels multiply).
    pub block_sums: Vec<f32>,
    /// Columns per input row.
    pub cols: usize,
}

/// Whether the inputs of one kernel call have a residual part (all of them, or none: asserted).
pub fn residual(x: &[QRow<'_>]) -> bool {
    let two = x.iter().any(|x| !x.q2.is_empty());
    assert!(
        x.iter().all(|x| x.q2.is_empty() != two),
        "inputs of one kind"
    );
    two
}

/// Whether the int8 kernels take a matrix with `cols` columns and groups of `gs`.
pub fn int8_fits(cols: usize, gs: usize) -> bool {
    cols.is_multiple_of(64) && gs >= 32 && gs.is_power_of_two()
}

/// Quantizes one block of 32 values: `q = round(x / d)` (ties to even) with `d = max|x| /
/// 127`, and with `two` the residual `q2 = round((x − d·q) · 254 / d)` within ±127; returns
/// `d`. The portable form of [`quantize_block_avx2`] (the same operations).
fn quantize_block(x: &[f32], two: bool, q: &mut [i32; 32], q2: &mut [i32; 32]) -> f32 {
    if x[..32].iter().any(|v| !v.is_finite()) {
        // A NaN or infinity: the block's scale NaN, so every product it enters is NaN (as
        // the exact kernels' would be non-finite) rather than a finite value from a zeroed
        // block.
        q.fill(0);
        q2.fill(0);
        return f32::NAN;
    }
    let amax = x[..32].iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let id2 = id * RESIDUAL_STEPS as f32;
    for i in 0..32 {
        let v = (x[i] * id).round_ties_even();
        q[i] = v as i32;
        if two {
            let r = x[i] - d * v;
            q2[i] = (r * id2).round_ties_even().clamp(-127.0, 127.0) as i32;
        }
    }
    d
}

/// [`quantize_block`] with AVX2 (bit-equal: the same operations, rounding to nearest even),
/// writing the block's values straight into their places: its even columns to `q[..16]` and
/// odd ones to `q[32..48]` (likewise `q2`, with `two`). Returns `d` and the block's sums of
/// `q` and `q2`.
///
/// # Safety
/// The CPU must support AVX2; `x` holds at least 32 values, `q` (and `q2` with `two`) 48.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block_avx2(
    x: &[f32],
    two: bool,
    q: &mut [i8],
    q2: &mut [i8],
) -> (f32, i32, i32) {
    use std::arch::x86_64::*;
    assert!(x.len() >= 32 && q.len() >= 48 && (!two || q2.len() >= 48));
    let p = x.as_ptr();
    let v = [0, 8, 16, 24].map(|i| _mm256_loadu_ps(p.add(i)));
    let sign = _mm256_set1_ps(-0.0);
    let a = v.map(|v| _mm256_andnot_ps(sign, v));
    // NaN or infinite (|v| not ≤ the largest float, unordered included): as `quantize_block`.
    let big = _mm256_set1_ps(f32::MAX);
    let bad = a.map(|a| _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NLE_UQ>(a, big)));
    if bad.iter().any(|&b| b != 0) {
        q[..16].fill(0);
        q[32..48].fill(0);
        if two {
            q2[..16].fill(0);
            q2[32..48].fill(0);
        }
        return (f32::NAN, 0, 0);
    }
    let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let id2 = id * RESIDUAL_STEPS as f32;
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let (vid, vid2, vd) = (_mm256_set1_ps(id), _mm256_set1_ps(id2), _mm256_set1_ps(d));
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    // 32 integers (within ±127) to bytes: evens to `out[..16]`, odds to `out[32..48]`; their sum.
    let store = |i: [__m256i; 4], out: &mut [i8]| -> i32 {
        let b = _mm256_packs_epi16(
            _mm256_packs_epi32(i[0], i[1]),
            _mm256_packs_epi32(i[2], i[3]),
        );
        // Packing interleaves groups of four across the 128-bit halves: back in column order.
        let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // Each half's even columns, then its odd ones; then evens of both halves, odds of both.
        let split = _mm256_setr_epi8(
            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3,
            5, 7, 9, 11, 13, 15,
        );
        let b = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(b, split));
        _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, _mm256_castsi256_si128(b));
        _mm_storeu_si128(
            out.as_mut_ptr().add(32) as *mut __m128i,
            _mm256_extracti128_si256::<1>(b),
        );
        let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2)))
    };
    let t = v.map(|v| _mm256_round_ps::<NEAREST>(_mm256_mul_ps(v, vid)));
    let s1 = store(t.map(|t| _mm256_cvttps_epi32(t)), q);
    let mut s2 = 0;
    if two {
        let r = [0, 1, 2, 3].map(|k| {
            let r = _mm256_sub_ps(v[k], _mm256_mul_ps(vd, t[k]));
            let t2 = _mm256_round_ps::<NEAREST>(_mm256_mul_ps(r, vid2));
            _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(t2, lo), hi))
        });
        s2 = store(r, q2);
    }
    (d, s1, s2)
}

/// The parts of whole input rows of a [`QuantizedInput`] ([`quantize_into`]'s output): for `n`
/// values, `n` of `q` (and of `q2` with the residual part, else empty), `n / 8` of `d` and
/// `n / 32` of `block_sums`.
pub struct Parts<'a> {
    /// See [`QuantizedInput::q`].
    pub q: &'a mut [i8],
    /// See [`QuantizedInput::q2`].
    pub q2: &'a mut [i8],
    /// See [`QuantizedInput::d`].
    pub d: &'a mut [f32],
    /// See [`QuantizedInput::block_sums`].
    pub block_sums: &'a mut [f32],
}

/// Quantizes the rows `xs` (whole rows, each a multiple of 64 values) into `out`, with the
/// quantizer of `simd` (every form bit-equal): a row's values depend on that row alone, so
/// rows quantized apart are the same bits as rows quantized together.
pub fn quantize_into(simd: Simd, xs: &[f32], residual: bool, out: Parts<'_>) {
    debug_assert!(xs.len().is_multiple_of(64) && out.q.len() == xs.len());
    let Parts {
        q: oq,
        q2: oq2,
        d: od,
        block_sums,
    } = out;
    let (mut q, mut q2) = ([0i32; 32], [0i32; 32]);
    for (blk, x) in xs.chunks_exact(32).enumerate() {
        // Block `blk` is half `h` of chunk `blk / 2`: its even columns go to positions
        // 16h.. of the chunk's even half, its odd ones to 32 + 16h.. of the odd half.
        let base = (blk / 2) * 64 + 16 * (blk % 2);
        let (d, s1, s2) = match simd {
            // SAFETY: `Avx2` is only detected on CPUs with AVX2; the block holds 32 values
            // and the row's parts 48 from `base` (the odd half ends 32 + 16 after it).
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe {
                let q2 = if residual {
                    &mut oq2[base..]
                } else {
                    &mut [][..]
                };
                quantize_block_avx2(x, residual, &mut oq[base..], q2)
            },
            _ => {
                let d = quantize_block(x, residual, &mut q, &mut q2);
                let (mut s1, mut s2) = (0i32, 0i32);
                for i in 0..16 {
                    let (e, o) = (base + i, base + 32 + i);
                    oq[e] = q[2 * i] as i8;
                    oq[o] = q[2 * i + 1] as i8;
                    s1 += q[2 * i] + q[2 * i + 1];
                    if residual {
                        oq2[e] = q2[2 * i] as i8;
                        oq2[o] = q2[2 * i + 1] as i8;
                        s2 += q2[2 * i] + q2[2 * i + 1];
                    }
                }
                (d, s1, s2)
            }
        };
        let (lane, units) = if residual {
            (d / RESIDUAL_STEPS as f32, RESIDUAL_STEPS * s1 + s2)
        } else {
            (d, s1)
        };
        od[4 * blk..4 * blk + 4].fill(lane);
        block_sums[blk] = lane * units as f32;
    }
}

impl QuantizedInput {
    /// Whether this is an input of `len` values, `cols` a row, quantized with (`residual`) or
    /// without the residual part.
    pub fn fits(&self, len: usize, cols: usize, residual: bool) -> bool {
        self.cols == cols && self.q.len() == len && self.q2.is_empty() != residual
    }

    /// Quantizes every `cols`-long row of `xs` (`cols` a multiple of 64) into one part, or two
    /// (`residual`).
    pub fn new(xs: &[f32], cols: usize, residual: bool) -> Self {
        Self::new_in(Simd::current(), xs, cols, residual)
    }

    /// [`QuantizedInput::new`] with the quantizer of `simd` (every form bit-equal).
    pub fn new_in(simd: Simd, xs: &[f32], cols: usize, residual: bool) -> Self {
        let mut qi = Self::unfilled(xs.len(), cols, residual);
        let q2: &mut [i8] = &mut qi.q2;
        let parts = Parts {
            q: &mut qi.q,
            q2,
            d: &mut qi.d,
            block_sums: &mut qi.block_sums,
        };
        quantize_into(simd, xs, residual, parts);
        qi
    }

    /// Room for `n` values, `cols` a row, all zero: [`quantize_into`] fills it, whole rows at a
    /// time, in any order or on several threads (`weights::QuantizedRows`).
    pub fn unfilled(n: usize, cols: usize, residual: bool) -> Self {
        debug_assert!(cols.is_multiple_of(64) && n.is_multiple_of(cols));
        QuantizedInput {
            q: vec![0i8; n],
            q2: if residual { vec![0i8; n] } else { Vec::new() },
            d: vec![0f32; n / 8],
            block_sums: vec![0f32; n / 32],
            cols,
        }
    }

    /// Input row `i`.
    #[inline]
    pub fn row(&self, i: usize) -> QRow<'_> {
        let c = self.cols;
        let q2 = if self.q2.is_empty() {
            &[][..]
        } else {
            &self.q2[i * c..(i + 1) * c]
        };
        QRow {
            q: &self.q[i * c..(i + 1) * c],
            q2,
            d: &self.d[i * c / 8..(i + 1) * c / 8],
        }
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
