//! The int8 kernel with AVX-512 VNNI (`vpdpbusd` on 256-bit vectors: four unsigned nibble ×
//! signed int8 products summed into each 32-bit lane in one instruction), where the CPU has it
//! (AVX512-VNNI and AVX512-VL: Intel from Ice Lake / Cascade Lake, AMD from Zen 4).
//!
//! It computes the same integer lane sums as the AVX2 form (`maddubs` pairs in 16 bits, then
//! `madd` into 32 bits: no sum there comes near 16-bit saturation, at most 2·2·15·127) with
//! two to three fewer instructions a chunk and input, and then the same floating-point
//! operations, so it is bit-equal to the portable form (unit test on CPUs that have it).
//! `HARNESS_VNNI=0` keeps the AVX2 form on such CPUs (for A/B runs).

use super::{bias_sum, reduce, QRow, Row, Scales, PREFETCH, RESIDUAL_STEPS};

/// Whether this CPU runs [`rows`] (detected once; `HARNESS_VNNI=0` says no).
pub fn available() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| {
        std::env::var("HARNESS_VNNI").map_or(true, |v| v != "0")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    })
}

/// [`super::Simd::rows_int8`]'s AVX2 kernel with the integer sums by VNNI (same arguments,
/// same outputs bit for bit).
///
/// # Safety
/// The CPU must support AVX2, FMA, AVX512-VL and AVX512-VNNI ([`available`]).
#[target_feature(enable = "avx2,fma,avx512vl,avx512vnni")]
pub unsafe fn rows<S: Scales, const TWO: bool, const M: usize>(
    first: Row<'_, S>,
    n: usize,
    x: [QRow<'_>; M],
    xsum: [&[f32]; M],
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
    let chunks = first.int8_chunks(x[0], TWO);
    for x in &x {
        assert_eq!(first.int8_chunks(*x, TWO), chunks);
    }
    assert!(n == 0 || (words.len() >= n * chunks * 8 && out.len() >= (n - 1) * stride + M));
    let sh = gs.trailing_zeros();
    let low = _mm256_set1_epi8(15);
    let qp = x.map(|x| x.q.as_ptr());
    let qp2 = x.map(|x| x.q2.as_ptr());
    let dp = x.map(|x| x.d.as_ptr());
    for j in 0..n {
        let wp = words.as_ptr().add(j * chunks * 8) as *const u8;
        let k0 = k0 + j * groups;
        let mut total = [_mm256_setzero_ps(); M];
        for c in 0..chunks {
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(c * 32 + PREFETCH) as *const i8);
            let w = _mm256_loadu_si256(wp.add(c * 32) as *const __m256i);
            let lo = _mm256_and_si256(w, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
            // Lane k: Σ of its four bytes' products, even columns by the low nibbles and odd by
            // the high ones: the AVX2 form's `madd(maddubs(lo, qe) + maddubs(hi, qo), 1)`.
            let part = |qp: *const i8| {
                let qe = _mm256_loadu_si256(qp.add(c * 64) as *const __m256i);
                let qo = _mm256_loadu_si256(qp.add(c * 64 + 32) as *const __m256i);
                _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, qe), hi, qo)
            };
            let sv = if gs >= 64 {
                _mm256_set1_ps(s.at(k0 + ((c * 64) >> sh)))
            } else {
                _mm256_set_m128(
                    _mm_set1_ps(s.at(k0 + 2 * c + 1)),
                    _mm_set1_ps(s.at(k0 + 2 * c)),
                )
            };
            for m in 0..M {
                let sum = if TWO {
                    // 254·n1 + n2 as 256·n1 − 2·n1 + n2 (shifts and adds, exact in 32 bits).
                    let n1 = part(qp[m]);
                    let scaled =
                        _mm256_sub_epi32(_mm256_slli_epi32(n1, 8), _mm256_slli_epi32(n1, 1));
                    _mm256_add_epi32(scaled, part(qp2[m]))
                } else {
                    part(qp[m])
                };
                let d = _mm256_mul_ps(_mm256_loadu_ps(dp[m].add(c * 8)), sv);
                total[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), d, total[m]);
            }
        }
        for m in 0..M {
            let mut l = [0f32; 8];
            _mm256_storeu_ps(l.as_mut_ptr(), total[m]);
            *out.get_unchecked_mut(j * stride + m) = reduce(l) + bias_sum(groups, xsum[m], b, k0);
        }
    }
}

const _: () = assert!(RESIDUAL_STEPS == 254, "the shifts above multiply by 254");
