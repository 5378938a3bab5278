//! MLX affine-packed matrices (`w = scale · q + bias` per group, `q` packed little-endian into
//! u32 words) multiplied in their checkpoint form: 4-bit rows through the kernels of
//! [`super::kernels::q4`], other widths through a portable loop.

use crate::config::QuantParams;

use super::kernels::q4::tile::{self, Tiles, TILE};
use super::kernels::{by_row_runs, by_rows, current_kernels, q4, Kernels};
use super::matrix::{words_from, Floats, FloatsView, Half, Slab, Source, Words};
use super::safetensors::DType;

/// `$call` for inputs `0..$t` in groups, `$k` bound to each group's indices as an array: blocks
/// of four, then the last three, two or one together (the kernels take a group's inputs as a
/// const-sized array, so each size is its own instance).
macro_rules! input_groups {
    ($t:expr, |$k:ident| $call:expr) => {{
        let t: usize = $t;
        let mut i = 0;
        while i + 4 <= t {
            let $k = [i, i + 1, i + 2, i + 3];
            $call;
            i += 4;
        }
        match t - i {
            3 => {
                let $k = [i, i + 1, i + 2];
                $call
            }
            2 => {
                let $k = [i, i + 1];
                $call
            }
            1 => {
                let $k = [i];
                $call
            }
            _ => {}
        }
    }};
}

/// An MLX-affine matrix `[rows, cols]` kept packed: its checkpoint bytes (packed words, and
/// scales and biases in their own float type), in place in the memory map for dense modules or
/// owned for cached experts. [`PackedMatrix::matmul_rows`] decodes inside the product.
///
/// A 4-bit matrix may instead hold its rows in 8-row tiles ([`PackedMatrix::tile`]), the
/// layout of the int8 tile kernels ([`q4::tile`]): an owned copy made at load in place of the
/// checkpoint's, never beside it.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    words: Words,
    scales: Floats,
    biases: Floats,
    rows: usize,
    cols: usize,
    p: QuantParams,
    /// Words, scales and biases interleaved in 8-row tiles ([`tile::interleave`]).
    tiled: bool,
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
        check_sizes(
            words.as_slice().len(),
            scales.len(),
            biases.len(),
            p,
            rows,
            cols,
        )?;
        Ok(PackedMatrix {
            words,
            scales,
            biases,
            rows,
            cols,
            p,
            tiled: false,
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

    /// As [`PackedMatrix::new`], and with `tile` in 8-row tiles where the matrix is tileable
    /// (see [`PackedMatrix::tile`]): the bytes go straight to their tiled places, one copy (the
    /// host miss path's; a copy then a tiling would fault in a second fresh buffer).
    #[allow(clippy::too_many_arguments)]
    pub fn from_bytes(
        packed: &[u8],
        scales: &[u8],
        biases: &[u8],
        scale_dtype: DType,
        p: QuantParams,
        rows: usize,
        cols: usize,
        tile: bool,
    ) -> Result<Self, String> {
        let width = match scale_dtype {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            _ => 0,
        };
        if !tile || width == 0 || !tileable(p, rows, cols) {
            return Self::new(packed, scales, biases, scale_dtype, p, rows, cols);
        }
        check_sizes(
            packed.len() / 4,
            scales.len() / width,
            biases.len() / width,
            p,
            rows,
            cols,
        )?;
        let (groups, wpr) = (cols / p.group_size, cols / 8);
        let u32_at =
            |b: &[u8], k: usize| u32::from_le_bytes(b[4 * k..4 * k + 4].try_into().expect("4"));
        let u16_at = |b: &[u8], k: usize| u16::from_le_bytes([b[2 * k], b[2 * k + 1]]);
        let floats = |b: &[u8]| match scale_dtype {
            DType::F32 => Floats::F32(Slab::Owned(tile::interleave(rows, groups, |k| {
                f32::from_bits(u32_at(b, k))
            }))),
            DType::BF16 => Floats::Half(
                Slab::Owned(tile::interleave(rows, groups, |k| u16_at(b, k))),
                Half::Bf16,
            ),
            _ => Floats::Half(
                Slab::Owned(tile::interleave(rows, groups, |k| u16_at(b, k))),
                Half::F16,
            ),
        };
        Ok(PackedMatrix {
            words: Slab::Owned(tile::interleave(rows, wpr, |k| u32_at(packed, k))),
            scales: floats(scales),
            biases: floats(biases),
            rows,
            cols,
            p,
            tiled: true,
        })
    }

    /// Output size.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input size.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Whether [`PackedMatrix::tile`] can tile this matrix here: 4-bit, rows a multiple of 8,
    /// columns the int8 kernels take, on a CPU with the tile kernels' SIMD form (x86-64 AVX2;
    /// elsewhere the portable form would be slower than the row kernels).
    pub fn tileable(&self) -> bool {
        tileable(self.p, self.rows, self.cols)
    }

    /// Moves the matrix into 8-row tiles, the int8 kernels' fast layout, where
    /// [`PackedMatrix::tileable`]: its words, scales and biases become owned copies in tile order
    /// (the checkpoint's bytes, mapped or owned, are let go: the caller may release mapped
    /// pages). Returns whether it did. Every product and lookup works in either layout; the
    /// exact kernels read a tiled matrix through a per-block copy back to rows (bit-equal, a
    /// little slower), the int8 kernels change their summation order (see [`q4::tile`]).
    pub fn tile(&mut self) -> bool {
        if self.tiled || !self.tileable() {
            return false;
        }
        let (rows, groups) = (self.rows, self.cols / self.p.group_size);
        let wpr = self.cols / 8;
        let floats = |f: &Floats| match f {
            Floats::F32(v) => {
                let v = v.as_slice();
                Floats::F32(Slab::Owned(tile::interleave(rows, groups, |k| v[k])))
            }
            Floats::Half(v, h) => {
                let v = v.as_slice();
                Floats::Half(Slab::Owned(tile::interleave(rows, groups, |k| v[k])), *h)
            }
        };
        let w = self.words.as_slice();
        self.words = Slab::Owned(tile::interleave(rows, wpr, |k| w[k]));
        self.scales = floats(&self.scales);
        self.biases = floats(&self.biases);
        self.tiled = true;
        true
    }

    /// Whether the matrix is in 8-row tiles.
    pub fn is_tiled(&self) -> bool {
        self.tiled
    }

    /// Index of element `j` of row `r` of a `rows × n` part (words: `n` words a row; scales
    /// and biases: `n` groups a row) in this matrix's layout.
    #[inline(always)]
    fn index(&self, r: usize, j: usize, n: usize) -> usize {
        match self.tiled {
            true => tile::tiled_index(r, j, n),
            false => r * n + j,
        }
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
        let wpr = groups * wpg;
        for g in 0..groups {
            let k = self.index(r, g, groups);
            let (sc, bi) = (scales.get(k), biases.get(k));
            for i in g * wpg..(g + 1) * wpg {
                let w = words[self.index(r, i, wpr)];
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

    /// `W[rows] x` for every input row of `xs` (see [`PackedMatrix::matmul_rows`]). 4-bit
    /// matrices run the kernels of [`super::kernels::q4`] of the kind the current
    /// [`super::kernels::Context`] names (exact f32 or int8 activations; a tiled matrix the
    /// tile kernels of [`q4::tile`]); other widths run the portable exact loop.
    pub fn matmul_range(&self, rows: std::ops::Range<usize>, xs: &[f32]) -> Vec<f32> {
        self.matmul_range_q(rows, xs, None)
    }

    /// [`PackedMatrix::matmul_range`] with `q`, the inputs `xs` already quantized for the
    /// int8 kernels ([`super::QuantizedRows`]: the blocks of one product in a parallel region share
    /// one quantization instead of each thread making its own); `None`, or a `q` of another
    /// kind or size, quantizes here. The same bits either way.
    pub fn matmul_range_q(
        &self,
        rows: std::ops::Range<usize>,
        xs: &[f32],
        q: Option<&q4::QuantizedInput>,
    ) -> Vec<f32> {
        if self.tiled {
            return self.tiled_range(rows, xs, q);
        }
        let (gs, bits) = (self.p.group_size, self.p.bits);
        let c = self.cols;
        let t = xs.len() / c;
        let r0 = rows.start;
        let groups = c / gs;
        // Per input row and group, `Σx` of the bias term (for int8 inputs, of the rounded values).
        let exact_sums = || -> Vec<f32> { xs.chunks_exact(gs).map(|g| g.iter().sum()).collect() };
        let wpg = gs * bits / 32;
        let per_word = 32 / bits;
        let mask = (1u32 << bits) - 1;
        let words = self.words.as_slice();
        let (scales, biases) = (self.scales.view(), self.biases.view());
        let work = rows.len() * c;
        if bits == 4 && gs.is_multiple_of(8) {
            let kind = current_kernels();
            let int8 = kind != Kernels::Exact && q4::int8_fits(c, gs);
            let qi = int8.then(|| given_or(q, xs, c, kind == Kernels::Int8x2));
            let qi = qi.as_deref();
            let xsum = match qi {
                Some(q) => q.group_sums(gs),
                None => exact_sums(),
            };
            let k = Rows4 {
                words,
                xs,
                xsum: &xsum,
                qi,
                r0,
                c,
                gs,
            };
            // One monomorphized kernel per scale type: the checkpoint's bf16/f16/f32 scales are
            // read in place, converted as the kernel reaches them.
            return match (scales, biases) {
                (FloatsView::Bf16(s), FloatsView::Bf16(b)) => {
                    k.run(q4::Bf16s(s), q4::Bf16s(b), rows.len(), t, work)
                }
                (FloatsView::F16(s), FloatsView::F16(b)) => {
                    k.run(q4::F16s(s), q4::F16s(b), rows.len(), t, work)
                }
                (FloatsView::F32(s), FloatsView::F32(b)) => k.run(s, b, rows.len(), t, work),
                _ => unreachable!("scales and biases share one type (checked at load)"),
            };
        }
        let xsum = exact_sums();
        let row = |r: usize, out: &mut [f32]| {
            let r = r0 + r;
            let ws_row = &words[r * groups * wpg..(r + 1) * groups * wpg];
            for (i, o) in out.iter_mut().enumerate() {
                let x = &xs[i * c..(i + 1) * c];
                let xs_sum = &xsum[i * groups..(i + 1) * groups];
                let mut acc = 0f32;
                for g in 0..groups {
                    let k = r * groups + g;
                    let ws = &ws_row[g * wpg..(g + 1) * wpg];
                    let xg = &x[g * gs..(g + 1) * gs];
                    let mut part = [0f32; 8];
                    for (w, xw) in ws.iter().zip(xg.chunks_exact(per_word)) {
                        for (j, xv) in xw.iter().enumerate() {
                            part[j % 8] += ((w >> (j * bits)) & mask) as f32 * xv;
                        }
                    }
                    let dot = part.iter().sum::<f32>();
                    acc += scales.get(k) * dot + biases.get(k) * xs_sum[g];
                }
                *o = acc;
            }
        };
        by_rows(rows.len(), t, work, row)
    }

    /// [`PackedMatrix::matmul_range`] of a tiled matrix. Rows that do not start or end on a
    /// tile run with their whole tiles (a row comes out the same in any block).
    fn tiled_range(
        &self,
        rows: std::ops::Range<usize>,
        xs: &[f32],
        q: Option<&q4::QuantizedInput>,
    ) -> Vec<f32> {
        if !rows.start.is_multiple_of(TILE) || !rows.end.is_multiple_of(TILE) {
            let (a, b) = (rows.start / TILE * TILE, rows.end.next_multiple_of(TILE));
            let full = self.tiled_range(a..b, xs, q);
            let t1 = (xs.len() / self.cols).max(1);
            let mut out = Vec::with_capacity(rows.len() * t1);
            for i in 0..t1 {
                let o = i * (b - a);
                out.extend_from_slice(&full[o + rows.start - a..o + rows.end - a]);
            }
            return out;
        }
        match (self.scales.view(), self.biases.view()) {
            (FloatsView::Bf16(s), FloatsView::Bf16(b)) => {
                self.tiled_run(q4::Bf16s(s), q4::Bf16s(b), rows, xs, q)
            }
            (FloatsView::F16(s), FloatsView::F16(b)) => {
                self.tiled_run(q4::F16s(s), q4::F16s(b), rows, xs, q)
            }
            (FloatsView::F32(s), FloatsView::F32(b)) => self.tiled_run(s, b, rows, xs, q),
            _ => unreachable!("scales and biases share one type (checked at load)"),
        }
    }

    /// [`PackedMatrix::tiled_range`] over whole tiles with the scales' type `S`.
    fn tiled_run<S: q4::Scales>(
        &self,
        s: S,
        b: S,
        rows: std::ops::Range<usize>,
        xs: &[f32],
        q: Option<&q4::QuantizedInput>,
    ) -> Vec<f32> {
        let (c, gs) = (self.cols, self.p.group_size);
        let (groups, wpr) = (c / gs, c / 8);
        let t = xs.len() / c;
        let t1 = t.max(1);
        let words = self.words.as_slice();
        let simd = q4::Simd::current();
        let work = rows.len() * c;
        // Rows a kernel call takes: up to 32 KB of words, whole tiles.
        let run = ((1 << 15) / (c / 2).max(1)).max(1).next_multiple_of(TILE);
        let kind = current_kernels();
        if kind == Kernels::Exact {
            let xsum: Vec<f32> = xs.chunks_exact(gs).map(|g| g.iter().sum()).collect();
            return by_row_runs(rows.len(), t, work, run, |a, n, out| {
                // The run's rows back in their own layout (scales as f32, converted exactly),
                // then the row kernels: the same bits as the untiled matrix.
                let r0 = rows.start + a;
                let mut w = vec![0u32; n * wpr];
                let (mut sc, mut bi) = (vec![0f32; n * groups], vec![0f32; n * groups]);
                for j in 0..n {
                    tile::row_out(words, r0 + j, wpr, &mut w[j * wpr..]);
                    for g in 0..groups {
                        let k = tile::tiled_index(r0 + j, g, groups);
                        (sc[j * groups + g], bi[j * groups + g]) = (s.at(k), b.at(k));
                    }
                }
                let row = |j: usize, n: usize| q4::Row {
                    words: &w[j * wpr..(j + n) * wpr],
                    s: &sc[..],
                    b: &bi[..],
                    k0: j * groups,
                    groups,
                    gs,
                };
                if t <= 1 {
                    simd.rows_exact(row(0, n), n, xs, &xsum, out, 1);
                } else {
                    for j in 0..n {
                        let o = &mut out[j * t1..(j + 1) * t1];
                        simd.row_exact_inputs(row(j, 1), xs, c, &xsum, o);
                    }
                }
            });
        }
        let qi = given_or(q, xs, c, kind == Kernels::Int8x2);
        let qi = &*qi;
        let xsum = qi.group_sums(gs);
        let sums = |i: usize| &xsum[i * groups..(i + 1) * groups];
        let per_tile = wpr * TILE;
        by_row_runs(rows.len(), t, work, run, |a, n, out| {
            assert!(n.is_multiple_of(TILE), "runs of whole tiles");
            let (t0, nt) = ((rows.start + a) / TILE, n / TILE);
            let first = Tiles {
                words: &words[t0 * per_tile..(t0 + nt) * per_tile],
                s,
                b,
                k0: t0 * groups * TILE,
                groups,
                gs,
            };
            // Four inputs at a time share each unpacked block, then the last three, two or one.
            input_groups!(t1, |k| simd.tiles_int8(
                first,
                nt,
                k.map(|k| qi.row(k)),
                k.map(sums),
                &mut out[k[0]..],
                t1
            ));
        })
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
        let wpr = groups * wpg;
        for (k, r) in rows.enumerate() {
            let a = w[k];
            for g in 0..groups {
                let kk = self.index(r, g, groups);
                let (sa, ba) = (a * scales.get(kk), a * biases.get(kk));
                let o = &mut out[g * gs..(g + 1) * gs];
                for wi in 0..wpg {
                    let word = words[self.index(r, g * wpg + wi, wpr)];
                    let o = &mut o[wi * per_word..(wi + 1) * per_word];
                    for (j, v) in o.iter_mut().enumerate() {
                        *v += sa * ((word >> (j * bits)) & mask) as f32 + ba;
                    }
                }
            }
        }
    }
}

/// Whether a matrix of this shape can be tiled here (see [`PackedMatrix::tileable`]).
fn tileable(p: QuantParams, rows: usize, cols: usize) -> bool {
    p.bits == 4
        && rows > 0
        && rows.is_multiple_of(TILE)
        && q4::int8_fits(cols, p.group_size)
        && tile::simd_here()
}

/// Checks that `words` packed words and `scales` / `biases` group values hold a `[rows, cols]`
/// matrix quantized with `p`.
fn check_sizes(
    words: usize,
    scales: usize,
    biases: usize,
    p: QuantParams,
    rows: usize,
    cols: usize,
) -> Result<(), String> {
    if !(p.group_size * p.bits).is_multiple_of(32)
        || words * 32 != rows * cols * p.bits
        || scales != rows * cols / p.group_size
        || biases != scales
    {
        return Err(format!(
            "quantized sizes disagree: {words} packed words, {scales} scales for [{rows}, {cols}] at {} bits, group {}",
            p.bits, p.group_size
        ));
    }
    Ok(())
}

/// Whether engines tile their 4-bit matrices for the int8 kernels (`HARNESS_TILES=0`: keep
/// the checkpoint's row layout, for A/B runs; read once).
pub fn tiles_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("HARNESS_TILES").map_or(true, |v| v != "0"))
}

/// Inputs of up to this many values stay quantized on their thread (the last two), so that
/// products of one input (q, k and v; an expert's gate and up, and the next expert's on the
/// same thread) quantize it once.
const KEEP_QUANTIZED: usize = 1 << 14;

type Quantized = (bool, usize, Vec<u32>, std::rc::Rc<q4::QuantizedInput>);

thread_local! {
    static LAST_QUANTIZED: std::cell::RefCell<Vec<Quantized>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// A product's quantized input: the caller's, or this thread's ([`quantized`]).
enum ProductInput<'a> {
    Given(&'a q4::QuantizedInput),
    Kept(std::rc::Rc<q4::QuantizedInput>),
}

impl std::ops::Deref for ProductInput<'_> {
    type Target = q4::QuantizedInput;
    fn deref(&self) -> &q4::QuantizedInput {
        match self {
            ProductInput::Given(q) => q,
            ProductInput::Kept(q) => q,
        }
    }
}

/// `q` where it is `xs` quantized as the int8 kernels of kind `two` take it (the caller's
/// word that it holds these values; its size and kind are checked), else [`quantized`].
fn given_or<'a>(
    q: Option<&'a q4::QuantizedInput>,
    xs: &[f32],
    cols: usize,
    two: bool,
) -> ProductInput<'a> {
    match q {
        Some(q) if q.fits(xs.len(), cols, two) => ProductInput::Given(q),
        _ => ProductInput::Kept(quantized(xs, cols, two)),
    }
}

/// `xs` quantized for the int8 kernels (`two`: with the residual part), taken from this
/// thread's last two inputs when it is bit for bit one of them: the same bits quantize to the
/// same values, so the products are unchanged.
fn quantized(xs: &[f32], cols: usize, two: bool) -> std::rc::Rc<q4::QuantizedInput> {
    let new = || std::rc::Rc::new(q4::QuantizedInput::new(xs, cols, two));
    if xs.len() > KEEP_QUANTIZED {
        return new();
    }
    // SAFETY: f32 and u32 have one size and alignment; every bit pattern is a u32.
    let bits = unsafe { std::slice::from_raw_parts(xs.as_ptr() as *const u32, xs.len()) };
    LAST_QUANTIZED.with(|last| {
        let mut last = last.borrow_mut();
        let hit = last
            .iter()
            .position(|(t, c, x, _)| *t == two && *c == cols && x.as_slice() == bits);
        let entry = match hit {
            Some(i) => last.remove(i),
            None => (two, cols, bits.to_vec(), new()),
        };
        let q = entry.3.clone();
        // Most recent first; two kept.
        last.insert(0, entry);
        last.truncate(2);
        q
    })
}

/// The operands of a 4-bit product, for [`Rows4::run`].
struct Rows4<'a> {
    words: &'a [u32],
    xs: &'a [f32],
    xsum: &'a [f32],
    qi: Option<&'a q4::QuantizedInput>,
    r0: usize,
    c: usize,
    gs: usize,
}

impl Rows4<'_> {
    fn run<S: q4::Scales>(&self, s: S, b: S, rows: usize, t: usize, work: usize) -> Vec<f32> {
        let (c, gs) = (self.c, self.gs);
        let groups = c / gs;
        let wpr = groups * gs / 8;
        let simd = q4::Simd::current();
        // Rows a kernel call takes: up to 32 KB of words, which stay in L1/L2 across inputs.
        let run = ((1 << 15) / (c / 2).max(1)).max(1);
        // Rows r..r + n of the matrix, as the kernels take them.
        let rows_at = |r: usize, n: usize| q4::Row {
            words: &self.words[r * wpr..(r + n) * wpr],
            s,
            b,
            k0: r * groups,
            groups,
            gs,
        };
        match self.qi {
            // A run of rows a kernel call, input by input.
            Some(qi) => {
                let t1 = t.max(1);
                let sums = |i: usize| &self.xsum[i * groups..(i + 1) * groups];
                by_row_runs(rows, t, work, run, |r0, n, out| {
                    let first = rows_at(self.r0 + r0, n);
                    // Four inputs at a time share each unpacked chunk (prefill), then the last
                    // three, two or one together (a prompt's expert is often chosen by only one
                    // to three of its tokens).
                    input_groups!(t1, |k| simd.rows_int8(
                        first,
                        n,
                        k.map(|k| qi.row(k)),
                        k.map(sums),
                        &mut out[k[0]..],
                        t1
                    ));
                })
            }
            // One input (decode): a run of rows a kernel call.
            None if t <= 1 => by_row_runs(rows, t, work, run, |r0, n, out| {
                simd.rows_exact(rows_at(self.r0 + r0, n), n, self.xs, self.xsum, out, 1)
            }),
            // Inputs innermost: the row's words (cols/2 bytes) stay in L1 across them.
            None => by_rows(rows, t, work, |r, out| {
                simd.row_exact_inputs(rows_at(self.r0 + r, 1), self.xs, c, self.xsum, out)
            }),
        }
    }
}

#[cfg(test)]
#[path = "packed_tests.rs"]
mod tests;
