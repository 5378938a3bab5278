//! Matrices the CPU kernels read in their checkpoint form: floats (f32, bf16, f16) and MLX
//! affine-packed words with their scales and biases, either in place in a shard's memory map
//! (dense weights: held once, as file-backed pages) or owned (experts read on a miss). Nothing is
//! widened to f32 ahead of time, so a matrix costs its checkpoint bytes in memory.
//!
//! The products are row dot products (`W x` per input row, weight rows outermost so that a row
//! stays in cache across the inputs of a prefill), split across cores for large matrices.

use std::marker::PhantomData;

use super::kernels::by_rows;
use super::safetensors::{DType, MappedBytes};

#[cfg(target_endian = "big")]
compile_error!("the in-place kernels read little-endian checkpoint bytes as numbers");

/// A plain numeric element the kernels read straight from checkpoint bytes.
pub trait Element: Copy + Send + Sync + 'static {}
impl Element for u32 {}
impl Element for u16 {}
impl Element for f32 {}

/// A slice of `T`: owned, or borrowed in place from a memory map (aligned for `T`).
#[derive(Debug, Clone)]
pub enum Slab<T: Element> {
    /// In this process's heap (shared, so a tied matrix is held once).
    Owned(std::sync::Arc<[T]>),
    /// In a shard's memory map (file-backed pages).
    Mapped(MappedBytes, PhantomData<T>),
}

impl<T: Element> Slab<T> {
    /// The mapped bytes as a slice of `T` in place, or `Err` (with the bytes) when their address
    /// is not aligned for `T` (a hand-made file with odd offsets): a misaligned read is never made.
    pub fn mapped(m: MappedBytes) -> Result<Self, MappedBytes> {
        let b = m.as_slice();
        if b.len().is_multiple_of(size_of::<T>())
            && (b.as_ptr() as usize).is_multiple_of(align_of::<T>())
        {
            Ok(Slab::Mapped(m, PhantomData))
        } else {
            Err(m)
        }
    }

    /// The elements.
    #[inline]
    pub fn as_slice(&self) -> &[T] {
        match self {
            Slab::Owned(v) => v,
            Slab::Mapped(m, _) => {
                let b = m.as_slice();
                // SAFETY: alignment and length were checked in `mapped`; `T` is a plain number
                // type for which every bit pattern is valid, read as little-endian (checked at
                // compile time); the map is read-only and lives as long as `m`.
                unsafe {
                    std::slice::from_raw_parts(b.as_ptr() as *const T, b.len() / size_of::<T>())
                }
            }
        }
    }

    /// Bytes held in this process's heap (0 for a mapped slab).
    pub fn owned_bytes(&self) -> usize {
        match self {
            Slab::Owned(v) => v.len() * size_of::<T>(),
            Slab::Mapped(..) => 0,
        }
    }

    /// Whether the elements are read in place from a memory map.
    pub fn is_mapped(&self) -> bool {
        matches!(self, Slab::Mapped(..))
    }
}

fn u16s(b: &[u8]) -> std::sync::Arc<[u16]> {
    b.chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}
fn u32s(b: &[u8]) -> std::sync::Arc<[u32]> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
fn f32s(b: &[u8]) -> std::sync::Arc<[f32]> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Where a matrix's bytes come from.
#[derive(Debug, Clone)]
pub enum Source<'a> {
    /// A copy is made (a buffer the miss path read, or a fallback).
    Bytes(&'a [u8]),
    /// In place in a memory map, when aligned.
    Mapped(MappedBytes),
}

impl Source<'_> {
    /// A typed slab: in place when mapped and aligned, else owned. `fell_back` is set when
    /// mapped bytes had to be copied because of their alignment.
    fn slab<T: Element>(
        self,
        copy: fn(&[u8]) -> std::sync::Arc<[T]>,
        fell_back: &mut bool,
    ) -> Slab<T> {
        match self {
            Source::Bytes(b) => Slab::Owned(copy(b)),
            Source::Mapped(m) => Slab::mapped(m).unwrap_or_else(|m| {
                *fell_back = true;
                Slab::Owned(copy(m.as_slice()))
            }),
        }
    }
}

/// 16-bit floats: bf16 or IEEE half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// bfloat16.
    Bf16,
    /// IEEE binary16.
    F16,
}

/// Float values (weights, or MLX scales and biases) in their checkpoint type.
#[derive(Debug, Clone)]
pub enum Floats {
    /// f32.
    F32(Slab<f32>),
    /// bf16 or f16.
    Half(Slab<u16>, Half),
}

impl Floats {
    /// Values of `dtype` (F32, F16 or BF16) from `src`; `None` for any other type.
    pub fn new(src: Source<'_>, dtype: DType, fell_back: &mut bool) -> Option<Floats> {
        Some(match dtype {
            DType::F32 => Floats::F32(src.slab(f32s, fell_back)),
            DType::BF16 => Floats::Half(src.slab(u16s, fell_back), Half::Bf16),
            DType::F16 => Floats::Half(src.slab(u16s, fell_back), Half::F16),
            _ => return None,
        })
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Floats::F32(s) => s.as_slice().len(),
            Floats::Half(s, _) => s.as_slice().len(),
        }
    }

    /// True when there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A view for hot loops (the slice found once, not per value).
    #[inline]
    pub fn view(&self) -> FloatsView<'_> {
        match self {
            Floats::F32(s) => FloatsView::F32(s.as_slice()),
            Floats::Half(s, Half::Bf16) => FloatsView::Bf16(s.as_slice()),
            Floats::Half(s, Half::F16) => FloatsView::F16(s.as_slice()),
        }
    }

    /// Value `i` as f32.
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Floats::F32(s) => s.as_slice()[i],
            Floats::Half(s, Half::Bf16) => bf16(s.as_slice()[i]),
            Floats::Half(s, Half::F16) => half::f16::from_bits(s.as_slice()[i]).to_f32(),
        }
    }

    /// Appends values `range` as f32.
    pub fn extend_into(&self, range: std::ops::Range<usize>, out: &mut Vec<f32>) {
        match self {
            Floats::F32(s) => out.extend_from_slice(&s.as_slice()[range]),
            Floats::Half(s, Half::Bf16) => out.extend(s.as_slice()[range].iter().map(|&h| bf16(h))),
            Floats::Half(s, Half::F16) => out.extend(
                s.as_slice()[range]
                    .iter()
                    .map(|&h| half::f16::from_bits(h).to_f32()),
            ),
        }
    }

    /// Bytes held in this process's heap.
    pub fn owned_bytes(&self) -> usize {
        match self {
            Floats::F32(s) => s.owned_bytes(),
            Floats::Half(s, _) => s.owned_bytes(),
        }
    }

    /// Whether the values are read in place from a memory map.
    pub fn is_mapped(&self) -> bool {
        match self {
            Floats::F32(s) => s.is_mapped(),
            Floats::Half(s, _) => s.is_mapped(),
        }
    }
}

/// [`Floats`] resolved to a slice.
#[derive(Debug, Clone, Copy)]
pub enum FloatsView<'a> {
    /// f32.
    F32(&'a [f32]),
    /// bf16 bits.
    Bf16(&'a [u16]),
    /// IEEE half bits.
    F16(&'a [u16]),
}

impl FloatsView<'_> {
    /// Value `i` as f32.
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            FloatsView::F32(s) => s[i],
            FloatsView::Bf16(s) => bf16(s[i]),
            FloatsView::F16(s) => half::f16::from_bits(s[i]).to_f32(),
        }
    }
}

/// bf16 bits to f32 (exact).
#[inline(always)]
pub fn bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Words of an MLX-packed matrix.
pub type Words = Slab<u32>;

/// Owned u32 words from little-endian bytes.
pub fn words_from(src: Source<'_>, fell_back: &mut bool) -> Words {
    src.slab(u32s, fell_back)
}

/// A float matrix `[rows, cols]` in its checkpoint type, row-major.
#[derive(Debug, Clone)]
pub struct FloatMatrix {
    data: Floats,
    rows: usize,
    cols: usize,
}

impl FloatMatrix {
    /// Wraps `rows × cols` values.
    pub fn new(data: Floats, rows: usize, cols: usize) -> Result<Self, String> {
        if data.len() != rows * cols {
            return Err(format!(
                "{} values for a [{rows}, {cols}] matrix",
                data.len()
            ));
        }
        Ok(FloatMatrix { data, rows, cols })
    }

    /// Output size.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input size.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held in this process's heap.
    pub fn owned_bytes(&self) -> usize {
        self.data.owned_bytes()
    }

    /// Appends row `r` as f32 (an embedding lookup).
    pub fn row_into(&self, r: usize, out: &mut Vec<f32>) {
        self.data
            .extend_into(r * self.cols..(r + 1) * self.cols, out);
    }

    /// `W x` for every input row of `xs` (each `cols` long): `T × rows` outputs, row-major.
    pub fn matmul_rows(&self, xs: &[f32]) -> Vec<f32> {
        self.matmul_range(0..self.rows, xs)
    }

    /// `W[rows] x` for every input row of `xs`: `T × rows.len()` outputs, row-major.
    pub fn matmul_range(&self, rows: std::ops::Range<usize>, xs: &[f32]) -> Vec<f32> {
        let c = self.cols;
        let t = xs.len() / c;
        let r0 = rows.start;
        let row = |r: usize, out: &mut [f32]| match &self.data {
            Floats::F32(s) => {
                let w = &s.as_slice()[(r0 + r) * c..(r0 + r + 1) * c];
                for (k, o) in out.iter_mut().enumerate() {
                    *o = dot_f32(w, &xs[k * c..(k + 1) * c]);
                }
            }
            Floats::Half(s, kind) => {
                let w = &s.as_slice()[(r0 + r) * c..(r0 + r + 1) * c];
                for (k, o) in out.iter_mut().enumerate() {
                    *o = dot_half(w, &xs[k * c..(k + 1) * c], *kind);
                }
            }
        };
        by_rows(rows.len(), t, rows.len() * c, row)
    }
}

impl FloatMatrix {
    /// `out += Σ_r w[r − rows.start] · W[r, :]` over `rows` (a product with the transpose).
    pub fn weighted_rows(&self, rows: std::ops::Range<usize>, w: &[f32], out: &mut [f32]) {
        let c = self.cols;
        for (k, r) in rows.enumerate() {
            let a = w[k];
            match self.data.view() {
                FloatsView::F32(s) => {
                    for (o, v) in out.iter_mut().zip(&s[r * c..(r + 1) * c]) {
                        *o += a * v;
                    }
                }
                FloatsView::Bf16(s) => {
                    for (o, v) in out.iter_mut().zip(&s[r * c..(r + 1) * c]) {
                        *o += a * bf16(*v);
                    }
                }
                FloatsView::F16(s) => {
                    for (o, v) in out.iter_mut().zip(&s[r * c..(r + 1) * c]) {
                        *o += a * half::f16::from_bits(*v).to_f32();
                    }
                }
            }
        }
    }
}

/// Dot product with 8 independent accumulators (vectorizes).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
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

/// Dot product of 16-bit float weights with f32 inputs.
#[inline]
fn dot_half(w: &[u16], x: &[f32], kind: Half) -> f32 {
    match kind {
        Half::Bf16 => {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2 (checked above).
                return unsafe { dot_bf16_avx2(w, x) };
            }
            dot_bf16(w, x)
        }
        Half::F16 => {
            let mut acc = [0f32; 8];
            let (cw, cx) = (w.chunks_exact(8), x.chunks_exact(8));
            let (rw, rx) = (cw.remainder(), cx.remainder());
            for (a, b) in cw.zip(cx) {
                for j in 0..8 {
                    acc[j] += half::f16::from_bits(a[j]).to_f32() * b[j];
                }
            }
            let mut s: f32 = acc.iter().sum();
            for (a, b) in rw.iter().zip(rx) {
                s += half::f16::from_bits(*a).to_f32() * b;
            }
            s
        }
    }
}

#[inline(always)]
fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (cw, cx) = (w.chunks_exact(8), x.chunks_exact(8));
    let (rw, rx) = (cw.remainder(), cx.remainder());
    for (a, b) in cw.zip(cx) {
        for j in 0..8 {
            acc[j] += bf16(a[j]) * b[j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in rw.iter().zip(rx) {
        s += bf16(*a) * b;
    }
    s
}

/// [`dot_bf16`] compiled for AVX2 (widening, shifts and multiplies on 8 lanes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_bf16_avx2(w: &[u16], x: &[f32]) -> f32 {
    dot_bf16(w, x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_matrices_multiply_every_row_in_every_type() {
        let (rows, cols) = (5usize, 19usize);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| (i % 7) as f32 * 0.25 - 0.5)
            .collect();
        let x: Vec<f32> = (0..2 * cols).map(|i| (i % 5) as f32 - 2.0).collect();
        let want: Vec<f32> = (0..2)
            .flat_map(|t| {
                let x = &x;
                let w = &w;
                (0..rows).map(move |r| {
                    (0..cols)
                        .map(|c| w[r * cols + c] * x[t * cols + c])
                        .sum::<f32>()
                })
            })
            .collect();
        let mut fb = false;
        let f32b: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf: Vec<u8> = w
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let hf: Vec<u8> = w
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        for (bytes, dt) in [(&f32b, DType::F32), (&bf, DType::BF16), (&hf, DType::F16)] {
            let m = FloatMatrix::new(
                Floats::new(Source::Bytes(bytes), dt, &mut fb).unwrap(),
                rows,
                cols,
            )
            .unwrap();
            // These weights are exact in every 16-bit type, so every product is exact.
            assert_eq!(m.matmul_rows(&x), want, "{dt:?}");
            let mut row = Vec::new();
            m.row_into(3, &mut row);
            assert_eq!(row, w[3 * cols..4 * cols], "{dt:?}");
        }
        assert!(!fb);
    }
}
