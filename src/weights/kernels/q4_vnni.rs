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

int8_rows_kernel! {
    /// [`super::Simd::rows_int8`]'s kernel with the integer lane sums by VNNI (same arguments,
    /// same outputs bit for bit as the AVX2 form).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA, AVX512-VL and AVX512-VNNI ([`available`]).
    pub fn rows, features = "avx2,fma,avx512vl,avx512vnni",
    setup = {},
    // Lane k: Σ of its four bytes' products, even columns by the low nibbles and odd by the
    // high ones: the AVX2 form's `madd(maddubs(lo, qe) + maddubs(hi, qo), 1)`.
    part = |lo, hi, q: *const i8, c: usize| {
        let qe = _mm256_loadu_si256(q.add(c * 64) as *const __m256i);
        let qo = _mm256_loadu_si256(q.add(c * 64 + 32) as *const __m256i);
        _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, qe), hi, qo)
    },
    one = |n| n,
    // 254·n1 + n2 as 256·n1 − 2·n1 + n2 (exact in 32 bits).
    two = |n1, n2| {
        _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(n1, 8), _mm256_slli_epi32(n1, 1)), n2)
    },
}

const _: () = assert!(RESIDUAL_STEPS == 254, "the shifts above multiply by 254");
