//! The int8 kernels over **8-row tiles**: a 4-bit matrix whose rows are interleaved eight at a
//! time, word by word (llama.cpp repacks its Q4_0 weights at load for the same reason), so that
//! each 32-bit lane of a vector holds one row.
//!
//! In a row's own layout (the checkpoint's, [`super::Row`]) the eight lanes of a vector hold
//! eight slices of one row: every 64-column chunk then costs a conversion, a scale multiply and
//! a fused add per input, for 64 weights, and the lanes are reduced at the row's end. In a tile
//! the lanes are eight rows: the same float work covers 8 rows × 32 columns (four times the
//! weights), the inputs' int8 values enter as broadcast 4-byte groups, the bias term is one
//! vector multiply-add per group, and no lane reduction is left. On the 2-core Zen 4 VM a scratch
//! C kernel of this form ran a 512 × 1024 product at 1.25 ns per 64 weights and input with two
//! int8 parts (the row kernels: 1.92) and 0.79 with one (1.52); 1.0 and 0.52 with four inputs
//! (1.58 and 1.39).
//!
//! **Layout.** Tile `T` holds rows `8T..8T + 8`. Word column `w` (the row's columns `8w..8w +
//! 8`, one packed u32 in MLX's order) of the tile is 8 consecutive u32, row `8T + i`'s word at
//! position `i`: `tiled[(T · wpr + w) · 8 + i] = words[(8T + i) · wpr + w]`. Scales and biases
//! follow the same rule with groups in place of word columns, so the 8 rows' scales of a group
//! are one 8-value load. A word's low nibbles are the even columns of its 8 and the high ones
//! the odd columns: in the inputs' chunk layout ([`super::QuantizedInput::q`]: a 64-column
//! chunk's even columns, then its odd ones) each is 4 consecutive int8 values.
//!
//! **Arithmetic** (every form, in this order, so the SIMD forms are bit-equal to
//! [`tile_int8`]): for each row, per 32-column block `k`, the integer sum `n` of its products
//! (`254·n₁ + n₂` with two parts, summed exactly in 32 bits), then `acc = fma(n, s·d_k, acc)`
//! with the row's group scale `s` and the input's block step `d_k`; after a group's blocks,
//! `acc = fma(b, Σx̃_g, acc)` with the group's bias and the quantized inputs' group sum. These
//! are not the row kernels' sums (those accumulate per lane and reduce at the end): a tiled
//! matrix's int8 outputs differ from the row layout's in the last bits, within the same
//! tolerance of the exact product (unit tests).

use std::sync::Arc;

use super::{QRow, Scales, RESIDUAL_STEPS};

/// Rows per tile.
pub const TILE: usize = 8;

/// Whether this CPU runs the tile kernels in a SIMD form (x86-64 AVX2, with VNNI where
/// present); elsewhere only the portable form exists, slower than the row kernels, so matrices
/// stay in rows.
pub fn simd_here() -> bool {
    super::Simd::current() == super::Simd::Avx2
}

/// A `rows × n` matrix (element `k` of its row-major order given by `src(k)`, `rows` a
/// multiple of [`TILE`]) with its rows interleaved in tiles: element `(r, j)` at index
/// `((r / 8) · n + j) · 8 + r % 8`. Words (`n` = words a row) and group scales (`n` = groups a
/// row) take the same rule. One allocation, written in order.
pub fn interleave<T: Copy>(rows: usize, n: usize, src: impl Fn(usize) -> T) -> Arc<[T]> {
    assert!(rows.is_multiple_of(TILE));
    let mut out = Arc::<[T]>::new_uninit_slice(rows * n);
    let dst = Arc::get_mut(&mut out).expect("a new Arc is unique");
    for (t, tile) in dst.chunks_exact_mut(TILE * n).enumerate() {
        for (j, o) in tile.chunks_exact_mut(TILE).enumerate() {
            for (i, o) in o.iter_mut().enumerate() {
                o.write(src((t * TILE + i) * n + j));
            }
        }
    }
    // SAFETY: the chunks above cover every element, each written once.
    unsafe { out.assume_init() }
}

/// Index of element `(r, j)` of a `rows × n` matrix interleaved by [`interleave`].
#[inline(always)]
pub fn tiled_index(r: usize, j: usize, n: usize) -> usize {
    ((r / TILE) * n + j) * TILE + r % TILE
}

/// Row `r` of an interleaved `rows × n` matrix, copied out in its own order into `out`.
pub fn row_out<T: Copy>(tiled: &[T], r: usize, n: usize, out: &mut [T]) {
    let base = (r / TILE) * n * TILE + r % TILE;
    for (j, o) in out[..n].iter_mut().enumerate() {
        *o = tiled[base + j * TILE];
    }
}

/// One or more consecutive tiles of a matrix as the kernels read them: the tiles' words and
/// the matrix's interleaved scales and biases, the first tile's first group-row at `k0`.
#[derive(Debug, Clone, Copy)]
pub struct Tiles<'a, S> {
    /// The tiles' interleaved words (`wpr · 8` a tile).
    pub words: &'a [u32],
    /// Interleaved group scales of the matrix.
    pub s: S,
    /// Interleaved group biases of the matrix.
    pub b: S,
    /// Index in `s` and `b` of the first tile's first group (`8 ·` tile `·` groups).
    pub k0: usize,
    /// Groups in a row.
    pub groups: usize,
    /// Columns per group (a multiple of 32).
    pub gs: usize,
}

impl<S: Copy> Tiles<'_, S> {
    /// 32-column blocks in a row, after checking that `n` tiles' words and the int8 input
    /// (with its residual part if `two`) cover them: the SIMD forms read unchecked.
    fn blocks(&self, n: usize, x: QRow<'_>, two: bool) -> usize {
        let cols = self.groups * self.gs;
        assert!(self.gs.is_multiple_of(32) && cols.is_multiple_of(64));
        assert!(self.words.len() >= n * cols / 8 * TILE);
        assert!(x.q.len() >= cols && x.d.len() >= cols / 8);
        assert!(!two || x.q2.len() >= cols);
        cols / 32
    }
}

/// The int8 kernel of one tile, portable form: row `i`'s output for input `x` (group sums
/// `xsum`) in lane `i`. `two`: `x` has a residual part. Every other form is bit-equal to it.
pub fn tile_int8<S: Scales>(t: Tiles<'_, S>, x: QRow<'_>, xsum: &[f32]) -> [f32; 8] {
    let two = !x.q2.is_empty();
    let blocks = t.blocks(1, x, two);
    let per_group = t.gs / 32;
    let mut acc = [0f32; 8];
    for (g, &xs) in xsum[..t.groups].iter().enumerate() {
        let (sv, bv) = (t.s.at8(t.k0 + g * TILE), t.b.at8(t.k0 + g * TILE));
        for k in g * per_group..(g + 1) * per_group {
            debug_assert!(k < blocks);
            // Block k: chunk k / 2, its half k % 2 (16 even and 16 odd columns).
            let off = (k / 2) * 64 + (k % 2) * 16;
            let dk = x.d[k * 4];
            for (i, a) in acc.iter_mut().enumerate() {
                let (mut n1, mut n2) = (0i32, 0i32);
                for v in 0..4 {
                    let w = t.words[(4 * k + v) * TILE + i];
                    for j in 0..4 {
                        let lo = ((w >> (8 * j)) & 15) as i32;
                        let hi = ((w >> (8 * j + 4)) & 15) as i32;
                        let (e, o) = (off + 4 * v + j, off + 32 + 4 * v + j);
                        n1 += lo * x.q[e] as i32 + hi * x.q[o] as i32;
                        if two {
                            n2 += lo * x.q2[e] as i32 + hi * x.q2[o] as i32;
                        }
                    }
                }
                let n = if two { RESIDUAL_STEPS * n1 + n2 } else { n1 };
                *a = (n as f32).mul_add(sv[i] * dk, *a);
            }
        }
        for (i, a) in acc.iter_mut().enumerate() {
            *a = bv[i].mul_add(xs, *a);
        }
    }
    acc
}

/// The x86-64 tile kernel's body over `n` consecutive tiles against `M` inputs, in a form
/// given by `part(lo, hi, q)`: the integer lane sums (32-bit) of one 32-column block's 4 low-
/// and 4 high-nibble vectors against the input's int8 values at `q` (the block's 16 even
/// columns, its 16 odd ones 32 bytes on). Row `8·t + i`'s output for input `m` goes to
/// `out[(8·t + i) · stride + m]`. `TWO`: the inputs have a residual part.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_kernel {
    (
        $(#[$attr:meta])*
        $vis:vis fn $name:ident, features = $features:literal,
        setup = { $($setup:tt)* },
        part = $part:expr $(,)?
    ) => {
        $(#[$attr])*
        #[target_feature(enable = $features)]
        $vis unsafe fn $name<S: Scales, const TWO: bool, const M: usize>(
            first: Tiles<'_, S>,
            n: usize,
            x: [QRow<'_>; M],
            xsum: [&[f32]; M],
            out: &mut [f32],
            stride: usize,
        ) {
            use std::arch::x86_64::*;
            let blocks = first.blocks(n, x[0], TWO);
            for x in &x {
                assert_eq!(first.blocks(n, *x, TWO), blocks);
            }
            for s in &xsum {
                assert!(s.len() >= first.groups);
            }
            assert!(n == 0 || out.len() >= ((n - 1) * TILE + TILE - 1) * stride + M);
            let Tiles { words, s, b, k0, groups, gs } = first;
            let per_group = gs / 32;
            let low = _mm256_set1_epi8(15);
            $($setup)*
            let qp = x.map(|x| x.q.as_ptr());
            let qp2 = x.map(|x| x.q2.as_ptr());
            let dp = x.map(|x| x.d.as_ptr());
            let xs = xsum.map(|s| s.as_ptr());
            for t in 0..n {
                let wt = words.as_ptr().add(t * blocks * 4 * TILE) as *const u8;
                let kt = k0 + t * groups * TILE;
                let mut acc = [_mm256_setzero_ps(); M];
                for g in 0..groups {
                    let sv = _mm256_loadu_ps(s.at8(kt + g * TILE).as_ptr());
                    let bv = _mm256_loadu_ps(b.at8(kt + g * TILE).as_ptr());
                    for k in g * per_group..(g + 1) * per_group {
                        let wp = wt.add(k * 128);
                        // The tiles stream from memory: their words `PREFETCH` bytes ahead (a
                        // prefetch never faults).
                        _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(super::PREFETCH) as *const i8);
                        _mm_prefetch::<_MM_HINT_T0>(
                            wp.wrapping_add(super::PREFETCH + 64) as *const i8,
                        );
                        let w = [0, 1, 2, 3].map(|v| _mm256_loadu_si256(wp.add(32 * v) as *const __m256i));
                        let lo = w.map(|w| _mm256_and_si256(w, low));
                        let hi = w.map(|w| _mm256_and_si256(_mm256_srli_epi16(w, 4), low));
                        let off = (k / 2) * 64 + (k % 2) * 16;
                        for m in 0..M {
                            let n1 = ($part)(&lo, &hi, qp[m].add(off));
                            let sum = if TWO {
                                let n2 = ($part)(&lo, &hi, qp2[m].add(off));
                                // 254·n1 + n2 as 256·n1 − 2·n1 + n2 (exact in 32 bits).
                                _mm256_add_epi32(
                                    _mm256_sub_epi32(_mm256_slli_epi32(n1, 8), _mm256_slli_epi32(n1, 1)),
                                    n2,
                                )
                            } else {
                                n1
                            };
                            let ds = _mm256_mul_ps(sv, _mm256_set1_ps(*dp[m].add(k * 4)));
                            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), ds, acc[m]);
                        }
                    }
                    for m in 0..M {
                        acc[m] = _mm256_fmadd_ps(bv, _mm256_set1_ps(*xs[m].add(g)), acc[m]);
                    }
                }
                for m in 0..M {
                    let mut l = [0f32; 8];
                    _mm256_storeu_ps(l.as_mut_ptr(), acc[m]);
                    for (i, v) in l.into_iter().enumerate() {
                        *out.get_unchecked_mut((t * TILE + i) * stride + m) = v;
                    }
                }
            }
        }
    };
}

/// A 4-byte group of int8 values at `p`, in every lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn bcast(p: *const i8) -> std::arch::x86_64::__m256i {
    std::arch::x86_64::_mm256_set1_epi32((p as *const i32).read_unaligned())
}

#[cfg(target_arch = "x86_64")]
tile_kernel! {
    /// The tile kernel with AVX2 (`maddubs`: nibble × int8 pairs in 16 bits, at most
    /// 2·15·127, then `madd` into 32-bit lanes).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    pub fn tiles_avx2, features = "avx2,fma",
    setup = {
        let ones = _mm256_set1_epi16(1);
    },
    part = |lo: &[__m256i; 4], hi: &[__m256i; 4], q: *const i8| {
        let mut p = [_mm256_setzero_si256(); 2];
        for v in 0..4 {
            let e = _mm256_maddubs_epi16(lo[v], bcast(q.add(4 * v)));
            let o = _mm256_maddubs_epi16(hi[v], bcast(q.add(32 + 4 * v)));
            p[v % 2] = _mm256_add_epi32(p[v % 2], _mm256_madd_epi16(_mm256_add_epi16(e, o), ones));
        }
        _mm256_add_epi32(p[0], p[1])
    },
}

/// One int8 part's sum in the VNNI tile kernels, at either vector width (the intrinsics given):
/// its eight `vpdpbusd`s in two chains of four, added once (see [`tiles_vnni`]).
#[cfg(target_arch = "x86_64")]
macro_rules! vnni_part {
    ($dp:ident, $add:ident, $zero:expr, $lo:ident, $hi:ident, $q:ident, $bcast:ident) => {{
        let z = $zero;
        let chain = |v: usize| {
            let a = $dp(z, $lo[v], $bcast($q.add(4 * v)));
            let a = $dp(a, $lo[v + 2], $bcast($q.add(8 + 4 * v)));
            let a = $dp(a, $hi[v], $bcast($q.add(32 + 4 * v)));
            $dp(a, $hi[v + 2], $bcast($q.add(40 + 4 * v)))
        };
        $add(chain(0), chain(1))
    }};
}

#[cfg(target_arch = "x86_64")]
tile_kernel! {
    /// The tile kernel with AVX-512 VNNI (`vpdpbusd` on 256-bit vectors): each part's eight
    /// products in two chains of four, added once. Four chains of two, summed by a tree of three
    /// adds (the form before), spent more vector operations than the `vpdpbusd`s left room for:
    /// with two int8 parts and four inputs the VM's Zen 4 core ran a block-input in 13.9 cycles
    /// against 10.6 (a stand-alone copy of the loop, in cache; the `kernel_layouts` bench: 4
    /// and 16 inputs 1.12–1.14×, one input unchanged). Integer sums, so the same bits; one chain
    /// of eight was bound by its latency on one input.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA, AVX512-VL and AVX512-VNNI.
    pub fn tiles_vnni, features = "avx2,fma,avx512vl,avx512vnni",
    setup = {},
    part = |lo: &[__m256i; 4], hi: &[__m256i; 4], q: *const i8| {
        vnni_part!(_mm256_dpbusd_epi32, _mm256_add_epi32, _mm256_setzero_si256(), lo, hi, q, bcast)
    },
}

/// Whether this CPU can run [`tiles_vnni512`] (AVX-512 F and VNNI, with the 256-bit VNNI
/// form's features).
fn vnni512_capable() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::vnni::available() && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the tile kernels run [`tiles_vnni512`] here (detected once): by default on Intel
/// CPUs that can, whose server cores run two 512-bit operations a cycle (the 16-core host:
/// 1.06–1.31× prefill); not on AMD ones, where Zen 4 splits each into two 256-bit halves and the
/// pairing's extra loads made it slower (this VM: decode 0.68×, prefill 0.82× at 1 thread).
/// `HARNESS_VNNI512=1` runs it on any CPU that can, `HARNESS_VNNI512=0` on none (for A/B runs;
/// the engine's kernel label says which form ran).
pub fn vnni512_available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        vnni512_capable()
            && match std::env::var("HARNESS_VNNI512") {
                Ok(v) => v != "0",
                Err(_) => intel(),
            }
    })
}

/// Whether `HARNESS_VNNI512=0` turned [`tiles_vnni512`] off on a CPU that has it.
pub fn vnni512_turned_off() -> bool {
    vnni512_capable() && std::env::var("HARNESS_VNNI512").is_ok_and(|v| v == "0")
}

/// Whether this is an Intel CPU (CPUID's vendor string).
fn intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
        #[allow(unused_unsafe)]
        let r = unsafe { std::arch::x86_64::__cpuid(0) };
        let mut v = [0u8; 12];
        v[..4].copy_from_slice(&r.ebx.to_le_bytes());
        v[4..8].copy_from_slice(&r.edx.to_le_bytes());
        v[8..].copy_from_slice(&r.ecx.to_le_bytes());
        &v == b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The VNNI tile kernel on 512-bit vectors over `pairs` pairs of consecutive tiles from
/// `first`: a vector's 16 lanes hold the two tiles' 16 rows (each 256-bit half one tile, its
/// words loaded where the tile keeps them), so each `vpdpbusd` and each float operation covers
/// twice the rows of [`tiles_vnni`]'s (server cores with two 512-bit units run twice the
/// products a cycle; Zen 4 splits them in two), each part in two chains of four as there. Each
/// lane's operations are the 256-bit form's, so the outputs are bit-equal. Arguments as
/// [`tiles_vnni`]'s, with `2 · pairs` tiles.
///
/// # Safety
/// The CPU must support AVX512-F and AVX512-VNNI ([`vnni512_available`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
// `m` indexes the inputs' pointers and the accumulators alike.
#[allow(clippy::needless_range_loop)]
unsafe fn tiles_vnni512<S: Scales, const TWO: bool, const M: usize>(
    first: Tiles<'_, S>,
    pairs: usize,
    x: [QRow<'_>; M],
    xsum: [&[f32]; M],
    out: &mut [f32],
    stride: usize,
) {
    use std::arch::x86_64::*;
    let n = 2 * pairs;
    let blocks = first.blocks(n, x[0], TWO);
    for x in &x {
        assert_eq!(first.blocks(n, *x, TWO), blocks);
    }
    for s in &xsum {
        assert!(s.len() >= first.groups);
    }
    assert!(n == 0 || out.len() >= ((n - 1) * TILE + TILE - 1) * stride + M);
    let Tiles {
        words,
        s,
        b,
        k0,
        groups,
        gs,
    } = first;
    let per_group = gs / 32;
    let per_tile = blocks * 4 * TILE;
    let low = _mm512_set1_epi8(15);
    let bcast = |p: *const i8| _mm512_set1_epi32((p as *const i32).read_unaligned());
    let part = |lo: &[__m512i; 4], hi: &[__m512i; 4], q: *const i8| {
        vnni_part!(
            _mm512_dpbusd_epi32,
            _mm512_add_epi32,
            _mm512_setzero_si512(),
            lo,
            hi,
            q,
            bcast
        )
    };
    // The two tiles' 8 values of a group side by side.
    let lanes16 = |v: S, k: usize| -> __m512 {
        let (a, c) = (v.at8(k), v.at8(k + groups * TILE));
        let mut l = [0f32; 16];
        l[..8].copy_from_slice(&a);
        l[8..].copy_from_slice(&c);
        _mm512_loadu_ps(l.as_ptr())
    };
    let qp = x.map(|x| x.q.as_ptr());
    let qp2 = x.map(|x| x.q2.as_ptr());
    let dp = x.map(|x| x.d.as_ptr());
    let xs = xsum.map(|s| s.as_ptr());
    for p in 0..pairs {
        let t = 2 * p;
        let wt = words.as_ptr().add(t * per_tile) as *const u8;
        let wt2 = wt.add(per_tile * 4);
        let kt = k0 + t * groups * TILE;
        let mut acc = [_mm512_setzero_ps(); M];
        for g in 0..groups {
            let sv = lanes16(s, kt + g * TILE);
            let bv = lanes16(b, kt + g * TILE);
            for k in g * per_group..(g + 1) * per_group {
                let (wp, wp2) = (wt.add(k * 128), wt2.add(k * 128));
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(super::PREFETCH) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(super::PREFETCH + 64) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(wp2.wrapping_add(super::PREFETCH) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(wp2.wrapping_add(super::PREFETCH + 64) as *const i8);
                let w = [0, 1, 2, 3].map(|v| {
                    let a = _mm256_loadu_si256(wp.add(32 * v) as *const __m256i);
                    let c = _mm256_loadu_si256(wp2.add(32 * v) as *const __m256i);
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), c)
                });
                let lo = w.map(|w| _mm512_and_si512(w, low));
                // A 32-bit shift then the nibble mask: the 16-bit shift's bytes.
                let hi = w.map(|w| _mm512_and_si512(_mm512_srli_epi32::<4>(w), low));
                let off = (k / 2) * 64 + (k % 2) * 16;
                for m in 0..M {
                    let n1 = part(&lo, &hi, qp[m].add(off));
                    let sum = if TWO {
                        let n2 = part(&lo, &hi, qp2[m].add(off));
                        // 254·n1 + n2 as 256·n1 − 2·n1 + n2 (exact in 32 bits).
                        _mm512_add_epi32(
                            _mm512_sub_epi32(
                                _mm512_slli_epi32::<8>(n1),
                                _mm512_slli_epi32::<1>(n1),
                            ),
                            n2,
                        )
                    } else {
                        n1
                    };
                    let ds = _mm512_mul_ps(sv, _mm512_set1_ps(*dp[m].add(k * 4)));
                    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), ds, acc[m]);
                }
            }
            for m in 0..M {
                acc[m] = _mm512_fmadd_ps(bv, _mm512_set1_ps(*xs[m].add(g)), acc[m]);
            }
        }
        for m in 0..M {
            let mut l = [0f32; 16];
            _mm512_storeu_ps(l.as_mut_ptr(), acc[m]);
            for (i, v) in l.into_iter().enumerate() {
                *out.get_unchecked_mut((t * TILE + i) * stride + m) = v;
            }
        }
    }
}

impl super::Simd {
    /// [`tile_int8`] of `n` consecutive tiles against `M` inputs in this form, row `8·t + i`'s
    /// output for input `m` written to `out[(8·t + i) · stride + m]`; the inputs share each
    /// unpacked block of weights. All inputs have a residual part or none.
    pub fn tiles_int8<S: Scales, const M: usize>(
        self,
        first: Tiles<'_, S>,
        n: usize,
        x: [QRow<'_>; M],
        xsum: [&[f32]; M],
        out: &mut [f32],
        stride: usize,
    ) {
        // All inputs of one kind (asserted); the portable form reads it from each input.
        let two = super::quant::residual(&x);
        #[cfg(not(target_arch = "x86_64"))]
        let _ = two;
        #[cfg(target_arch = "x86_64")]
        if self == super::Simd::Avx2 {
            let vnni = super::vnni::available();
            // SAFETY: `Avx2` is only detected with AVX2 and FMA, `available` checked the VNNI
            // features; the kernels assert their slice lengths.
            unsafe {
                // Pairs of tiles on 512-bit vectors where the CPU has them, any last tile on
                // 256-bit ones.
                let pairs = if vnni && vnni512_available() {
                    n / 2
                } else {
                    0
                };
                if pairs > 0 {
                    match two {
                        true => tiles_vnni512::<S, true, M>(first, pairs, x, xsum, out, stride),
                        false => tiles_vnni512::<S, false, M>(first, pairs, x, xsum, out, stride),
                    }
                }
                let done = 2 * pairs;
                if done == n {
                    return;
                }
                let per_tile = first.groups * first.gs / 8 * TILE;
                let first = Tiles {
                    words: &first.words[done * per_tile..],
                    k0: first.k0 + done * first.groups * TILE,
                    ..first
                };
                let (n, out) = (n - done, &mut out[done * TILE * stride..]);
                match (vnni, two) {
                    (true, true) => tiles_vnni::<S, true, M>(first, n, x, xsum, out, stride),
                    (true, false) => tiles_vnni::<S, false, M>(first, n, x, xsum, out, stride),
                    (false, true) => tiles_avx2::<S, true, M>(first, n, x, xsum, out, stride),
                    (false, false) => tiles_avx2::<S, false, M>(first, n, x, xsum, out, stride),
                }
            }
            return;
        }
        let per_tile = first.groups * first.gs / 8 * TILE;
        for t in 0..n {
            let tile = Tiles {
                words: &first.words[t * per_tile..(t + 1) * per_tile],
                k0: first.k0 + t * first.groups * TILE,
                ..first
            };
            for m in 0..M {
                for (i, v) in tile_int8(tile, x[m], xsum[m]).into_iter().enumerate() {
                    out[(t * TILE + i) * stride + m] = v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::Rng;
    use super::super::{row_int8, Bf16s, QuantizedInput, Row, Simd};
    use super::*;

    /// A matrix's interleaved words, scales and biases.
    type Tiled = (Arc<[u32]>, Arc<[u16]>, Arc<[u16]>);

    /// `rows` rows of random words with bf16 scales and biases (as bits), row-major.
    struct Matrix {
        words: Vec<u32>,
        s: Vec<u16>,
        b: Vec<u16>,
        rows: usize,
        cols: usize,
        gs: usize,
    }

    impl Matrix {
        fn new(seed: u64, rows: usize, cols: usize, gs: usize) -> Self {
            let mut r = Rng(seed);
            let groups = rows * cols / gs;
            let bf = |v: f32| (v.to_bits() >> 16) as u16;
            Matrix {
                words: (0..rows * cols / 8).map(|_| r.next() as u32).collect(),
                s: (0..groups).map(|_| bf(r.f() * 0.05)).collect(),
                b: (0..groups).map(|_| bf(r.f() * 0.1)).collect(),
                rows,
                cols,
                gs,
            }
        }

        /// Its rows interleaved, as the tile kernels take them: words, scales, biases.
        fn tiled(&self) -> Tiled {
            let (wpr, groups) = (self.cols / 8, self.cols / self.gs);
            (
                interleave(self.rows, wpr, |k| self.words[k]),
                interleave(self.rows, groups, |k| self.s[k]),
                interleave(self.rows, groups, |k| self.b[k]),
            )
        }
    }

    #[test]
    fn interleaving_puts_each_row_in_its_lane_and_back() {
        let (rows, n) = (24, 5);
        let src: Vec<u32> = (0..(rows * n) as u32).collect();
        let t = interleave(rows, n, |k| src[k]);
        for r in 0..rows {
            for j in 0..n {
                assert_eq!(t[tiled_index(r, j, n)], src[r * n + j]);
            }
            let mut row = vec![0u32; n];
            row_out(&t, r, n, &mut row);
            assert_eq!(row, src[r * n..(r + 1) * n]);
        }
        // Lane i of word column j of tile T is row 8T + i.
        assert_eq!(t[(n + 2) * TILE + 3], src[(TILE + 3) * n + 2]);
    }

    /// Every form of the tile kernel this CPU has (and, on x86-64, both the AVX2 and VNNI forms
    /// where the CPU has them), over two tiles, one to four inputs at once and one and two
    /// int8 parts, is bit-equal to the portable form; and the portable form computes the row
    /// kernels' product of the same rounded inputs up to float rounding.
    #[test]
    fn every_tile_form_is_bit_equal_to_the_portable_one_and_to_the_row_kernel_up_to_rounding() {
        let simd = Simd::current();
        for (seed, cols, gs) in [(1, 64, 32), (2, 1024, 64), (3, 512, 128), (4, 2816, 64)] {
            let m = Matrix::new(seed * 7, 2 * TILE, cols, gs);
            let groups = cols / gs;
            let (w, s, b) = m.tiled();
            let first = Tiles {
                words: &w,
                s: Bf16s(&s),
                b: Bf16s(&b),
                k0: 0,
                groups,
                gs,
            };
            let mut r = Rng(seed * 13);
            let xs: Vec<f32> = (0..4 * cols).map(|_| r.f() * 3.0).collect();
            for residual in [false, true] {
                let qi = QuantizedInput::new(&xs, cols, residual);
                let qsum = qi.group_sums(gs);
                let sums = [0, 1, 2, 3].map(|i| &qsum[i * groups..(i + 1) * groups]);
                // The portable form, tile by tile and input by input: row j, input i at 4j + i.
                let mut want = vec![0f32; 2 * TILE * 4];
                for t in 0..2 {
                    let per = cols / 8 * TILE;
                    let tile = Tiles {
                        words: &w[t * per..(t + 1) * per],
                        k0: t * groups * TILE,
                        ..first
                    };
                    for i in 0..4 {
                        for (l, v) in tile_int8(tile, qi.row(i), sums[i]).into_iter().enumerate() {
                            want[(t * TILE + l) * 4 + i] = v;
                        }
                    }
                }
                // The row kernel on the same rounded inputs (its own summation order).
                for j in 0..2 * TILE {
                    let row = Row {
                        words: &m.words[j * cols / 8..(j + 1) * cols / 8],
                        s: Bf16s(&m.s),
                        b: Bf16s(&m.b),
                        k0: j * groups,
                        groups,
                        gs,
                    };
                    for i in 0..4 {
                        let y = row_int8(row, qi.row(i), sums[i]);
                        let scale: f32 = xs[i * cols..(i + 1) * cols].iter().map(|v| v.abs()).sum();
                        let got = want[j * 4 + i];
                        assert!(
                            (got - y).abs() <= 1e-5 * scale * 0.05 * 15.0,
                            "{cols}/{gs} row {j} input {i}: tile {got} vs row {y}"
                        );
                    }
                }
                let x = [0, 1, 2, 3].map(|i| qi.row(i));
                let mut forms: Vec<(String, Vec<f32>)> = Vec::new();
                let mut four = vec![0f32; want.len()];
                simd.tiles_int8(first, 2, x, sums, &mut four, 4);
                forms.push((format!("{simd:?} four"), four));
                let mut split = vec![0f32; want.len()];
                simd.tiles_int8(first, 2, [x[0]], [sums[0]], &mut split, 4);
                simd.tiles_int8(
                    first,
                    2,
                    [x[1], x[2], x[3]],
                    [1, 2, 3].map(|i| sums[i]),
                    &mut split[1..],
                    4,
                );
                forms.push((format!("{simd:?} one + three"), split));
                let mut two = vec![0f32; want.len()];
                simd.tiles_int8(first, 2, [x[0], x[1]], [sums[0], sums[1]], &mut two, 4);
                simd.tiles_int8(first, 2, [x[2], x[3]], [sums[2], sums[3]], &mut two[2..], 4);
                forms.push((format!("{simd:?} two + two"), two));
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    let mut avx2 = vec![0f32; want.len()];
                    // SAFETY: AVX2 and FMA checked above.
                    unsafe {
                        match residual {
                            true => tiles_avx2::<_, true, 4>(first, 2, x, sums, &mut avx2, 4),
                            false => tiles_avx2::<_, false, 4>(first, 2, x, sums, &mut avx2, 4),
                        }
                    }
                    forms.push(("avx2 four".into(), avx2));
                    if super::super::vnni::available() {
                        let mut v = vec![0f32; want.len()];
                        // SAFETY: `available` checked AVX2, FMA, AVX512-VL and AVX512-VNNI.
                        unsafe {
                            match residual {
                                true => tiles_vnni::<_, true, 4>(first, 2, x, sums, &mut v, 4),
                                false => tiles_vnni::<_, false, 4>(first, 2, x, sums, &mut v, 4),
                            }
                        }
                        forms.push(("vnni four".into(), v));
                        if vnni512_capable() {
                            let mut v = vec![0f32; want.len()];
                            // SAFETY: `vnni512_capable` checked AVX512-F and AVX512-VNNI.
                            unsafe {
                                match residual {
                                    true => {
                                        tiles_vnni512::<_, true, 4>(first, 1, x, sums, &mut v, 4)
                                    }
                                    false => {
                                        tiles_vnni512::<_, false, 4>(first, 1, x, sums, &mut v, 4)
                                    }
                                }
                            }
                            forms.push(("vnni512 four".into(), v));
                        } else {
                            eprintln!("512-bit VNNI tile form NOT RUN (no AVX512-F here)");
                        }
                    } else {
                        eprintln!("VNNI tile form NOT RUN (no AVX512-VNNI here)");
                    }
                }
                let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
                for (name, got) in forms {
                    let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{name}, {cols}/{gs}, residual {residual}");
                }
            }
        }
    }

    #[test]
    fn a_non_finite_activation_makes_the_tile_product_nan() {
        let m = Matrix::new(5, TILE, 256, 64);
        let (w, s, b) = m.tiled();
        let t = Tiles {
            words: &w,
            s: Bf16s(&s),
            b: Bf16s(&b),
            k0: 0,
            groups: 4,
            gs: 64,
        };
        let mut r = Rng(6);
        let mut x: Vec<f32> = (0..256).map(|_| r.f()).collect();
        x[70] = f32::INFINITY;
        for residual in [false, true] {
            let qi = QuantizedInput::new(&x, 256, residual);
            let qsum = qi.group_sums(64);
            let mut out = [0f32; TILE];
            Simd::current().tiles_int8(t, 1, [qi.row(0)], [&qsum[..]], &mut out, 1);
            for y in tile_int8(t, qi.row(0), &qsum).into_iter().chain(out) {
                assert!(y.is_nan(), "residual {residual}: {y}");
            }
        }
    }
}
