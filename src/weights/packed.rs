//! MLX affine-packed matrices (`w = scale · q + bias` per group, `q` packed little-endian into
//! u32 words) multiplied in their checkpoint form, and their CPU kernels: the AVX2 + FMA 4-bit
//! row kernel chosen at run time, and the portable form of every width.

use crate::config::QuantParams;

use super::matrix::{by_rows, words_from, Floats, FloatsView, Source, Words};
use super::safetensors::DType;

/// An MLX-affine matrix `[rows, cols]` kept packed: its checkpoint bytes (packed words, and
/// scales and biases in their own float type), in place in the memory map for dense modules or
/// owned for cached experts. [`PackedMatrix::matmul_rows`] decodes inside the product.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    words: Words,
    scales: Floats,
    biases: Floats,
    rows: usize,
    cols: usize,
    p: QuantParams,
}

impl PackedMatrix {
    /// Wraps the bytes of one matrix (packed words, scales, biases of exactly its rows), in
    /// place where they are mapped and aligned. `fell_back` is set when mapped bytes had to be
    /// copied because of their alignment.
    #[allow(clippy::too_many_arguments)]
    pub fn from_sources(
        packed: Source<'_>,
        scales: Source<'_>,
        biases: Source<'_>,
        scale_dtype: DType,
        p: QuantParams,
        rows: usize,
        cols: usize,
        fell_back: &mut bool,
    ) -> Result<Self, String> {
        let words = words_from(packed, fell_back);
        let bad = || format!("scales of type {scale_dtype:?} (expected F32, F16 or BF16)");
        let scales = Floats::new(scales, scale_dtype, fell_back).ok_or_else(bad)?;
        let biases = Floats::new(biases, scale_dtype, fell_back).ok_or_else(bad)?;
        if !(p.group_size * p.bits).is_multiple_of(32)
            || words.as_slice().len() * 32 != rows * cols * p.bits
            || scales.len() != rows * cols / p.group_size
            || biases.len() != scales.len()
        {
            return Err(format!(
                "quantized sizes disagree: {} packed words, {} scales for [{rows}, {cols}] at {} bits, group {}",
                words.as_slice().len(),
                scales.len(),
                p.bits,
                p.group_size
            ));
        }
        Ok(PackedMatrix {
            words,
            scales,
            biases,
            rows,
            cols,
            p,
        })
    }

    /// Copies the raw bytes of one matrix (the expert miss path's buffers).
    pub fn new(
        packed: &[u8],
        scales: &[u8],
        biases: &[u8],
        scale_dtype: DType,
        p: QuantParams,
        rows: usize,
        cols: usize,
    ) -> Result<Self, String> {
        let mut fell_back = false;
        Self::from_sources(
            Source::Bytes(packed),
            Source::Bytes(scales),
            Source::Bytes(biases),
            scale_dtype,
            p,
            rows,
            cols,
            &mut fell_back,
        )
    }

    /// Output size.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes held in this process's heap (0 when every part is read in place).
    pub fn owned_bytes(&self) -> usize {
        self.words.owned_bytes() + self.scales.owned_bytes() + self.biases.owned_bytes()
    }

    /// Appends row `r`, dequantized (an embedding lookup).
    pub fn row_into(&self, r: usize, out: &mut Vec<f32>) {
        let (gs, bits) = (self.p.group_size, self.p.bits);
        let groups = self.cols / gs;
        let wpg = gs * bits / 32;
        let mask = (1u32 << bits) - 1;
        let words = self.words.as_slice();
        let (scales, biases) = (self.scales.view(), self.biases.view());
        for g in 0..groups {
            let k = r * groups + g;
            let (sc, bi) = (scales.get(k), biases.get(k));
            for w in &words[k * wpg..(k + 1) * wpg] {
                for j in 0..32 / bits {
                    out.push(sc * ((w >> (j * bits)) & mask) as f32 + bi);
                }
            }
        }
    }

    /// `W x` for one input vector (see [`PackedMatrix::matmul_rows`]).
    pub fn gemv(&self, x: &[f32]) -> Vec<f32> {
        self.matmul_rows(x)
    }

    /// `W x` for every input row of `xs` (each `cols` long): `T × rows` outputs, row-major. Per
    /// group, `scale · Σ q·x + bias · Σ x`: the same sum as dequantizing first (up to float
    /// summation order). Large matrices are split across cores.
    pub fn matmul_rows(&self, xs: &[f32]) -> Vec<f32> {
        self.matmul_range(0..self.rows, xs)
    }

    /// `W[rows] x` for every input row of `xs` (see [`PackedMatrix::matmul_rows`]).
    pub fn matmul_range(&self, rows: std::ops::Range<usize>, xs: &[f32]) -> Vec<f32> {
        let (gs, bits) = (self.p.group_size, self.p.bits);
        let c = self.cols;
        let t = xs.len() / c;
        let r0 = rows.start;
        let groups = c / gs;
        let xsum: Vec<f32> = xs.chunks_exact(gs).map(|g| g.iter().sum()).collect();
        let wpg = gs * bits / 32;
        let per_word = 32 / bits;
        let mask = (1u32 << bits) - 1;
        #[cfg(target_arch = "x86_64")]
        let avx2 = bits == 4
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        let words = self.words.as_slice();
        let (scales, biases) = (self.scales.view(), self.biases.view());
        let row = |r: usize, out: &mut [f32]| {
            let r = r0 + r;
            let ws_row = &words[r * groups * wpg..(r + 1) * groups * wpg];
            // Inputs outermost: the row's words (cols·bits/8 bytes) stay in L1 across them.
            for (i, o) in out.iter_mut().enumerate() {
                let x = &xs[i * c..(i + 1) * c];
                let xs_sum = &xsum[i * groups..(i + 1) * groups];
                if avx2 {
                    // SAFETY: the CPU supports AVX2 and FMA (checked above); the slices have
                    // the lengths the kernel reads (`groups` groups of `gs` inputs).
                    #[cfg(target_arch = "x86_64")]
                    {
                        *o = unsafe {
                            row4_avx2(ws_row, x, xs_sum, scales, biases, r * groups, groups, gs)
                        };
                        continue;
                    }
                }
                let mut acc = 0f32;
                for g in 0..groups {
                    let k = r * groups + g;
                    let ws = &ws_row[g * wpg..(g + 1) * wpg];
                    let xg = &x[g * gs..(g + 1) * gs];
                    let dot = if bits == 4 {
                        dot4(ws, xg)
                    } else {
                        let mut part = [0f32; 8];
                        for (w, xw) in ws.iter().zip(xg.chunks_exact(per_word)) {
                            for (j, xv) in xw.iter().enumerate() {
                                part[j % 8] += ((w >> (j * bits)) & mask) as f32 * xv;
                            }
                        }
                        part.iter().sum::<f32>()
                    };
                    acc += scales.get(k) * dot + biases.get(k) * xs_sum[g];
                }
                *o = acc;
            }
        };
        // Threaded from 2^21 weights (the cost of a spawn against 1 MB of packed words).
        by_rows(rows.len(), t, rows.len() * self.cols / 2, row)
    }

    /// `out += Σ_r w[r − rows.start] · W[r, :]` over `rows`, dequantizing on the way (a product
    /// with the transpose: MLA's query absorbed into the latent space).
    pub fn weighted_rows(&self, rows: std::ops::Range<usize>, w: &[f32], out: &mut [f32]) {
        let (gs, bits) = (self.p.group_size, self.p.bits);
        let groups = self.cols / gs;
        let wpg = gs * bits / 32;
        let per_word = 32 / bits;
        let mask = (1u32 << bits) - 1;
        let words = self.words.as_slice();
        let (scales, biases) = (self.scales.view(), self.biases.view());
        for (k, r) in rows.enumerate() {
            let a = w[k];
            for g in 0..groups {
                let kk = r * groups + g;
                let (sa, ba) = (a * scales.get(kk), a * biases.get(kk));
                let o = &mut out[g * gs..(g + 1) * gs];
                for (wi, word) in words[kk * wpg..(kk + 1) * wpg].iter().enumerate() {
                    let o = &mut o[wi * per_word..(wi + 1) * per_word];
                    for (j, v) in o.iter_mut().enumerate() {
                        *v += sa * ((word >> (j * bits)) & mask) as f32 + ba;
                    }
                }
            }
        }
    }
}

/// Σ q·x over 4-bit words (8 nibbles each, least significant first) and 8 inputs per word.
#[inline(always)]
fn dot4(words: &[u32], xs: &[f32]) -> f32 {
    let mut part = [0f32; 8];
    for (w, xw) in words.iter().zip(xs.chunks_exact(8)) {
        for j in 0..8 {
            part[j] += ((w >> (4 * j)) & 15) as f32 * xw[j];
        }
    }
    part.iter().sum()
}

/// One output of a 4-bit row with AVX2 + FMA: per group, the 8 nibbles of each word are
/// widened to f32 lanes (per-lane shifts) and multiplied into a vector accumulator; the group's
/// lanes are scaled by its scale, its bias times `Σx` is added as a scalar, and the lanes are
/// summed once per row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn row4_avx2(
    words: &[u32],
    x: &[f32],
    xsum: &[f32],
    scales: FloatsView<'_>,
    biases: FloatsView<'_>,
    k0: usize,
    groups: usize,
    gs: usize,
) -> f32 {
    use std::arch::x86_64::*;
    let wpg = gs / 8;
    debug_assert!(words.len() >= groups * wpg && x.len() >= groups * gs && xsum.len() >= groups);
    let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    let fifteen = _mm256_set1_epi32(15);
    let mut total = _mm256_setzero_ps();
    let mut bias_sum = 0f32;
    let wp = words.as_ptr();
    let xp = x.as_ptr();
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
        total = _mm256_fmadd_ps(_mm256_set1_ps(scales.get(k0 + g)), acc, total);
        bias_sum += biases.get(k0 + g) * *xsum.get_unchecked(g);
    }
    let hi = _mm256_extractf128_ps(total, 1);
    let lo = _mm256_castps256_ps128(total);
    let s4 = _mm_add_ps(lo, hi);
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    _mm_cvtss_f32(s1) + bias_sum
}
