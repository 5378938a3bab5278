//! Tests of the 4-bit row kernels (every form bit-equal to the portable one; several inputs at
//! once bit-equal to one at a time; int8 quantization bounds). Compiled with `q4.rs`, also alone
//! for aarch64 by `scripts/cross_test.sh`.

use super::*;

/// A seeded xorshift stream (this file stays free of dependencies for the aarch64 test; the tile
/// kernels' tests take it too).
pub(super) struct Rng(pub(super) u64);
impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(super) fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

struct Case {
    words: Vec<u32>,
    /// Per group scale and bias.
    s: Vec<f32>,
    b: Vec<f32>,
    x: Vec<f32>,
    xsum: Vec<f32>,
    groups: usize,
    gs: usize,
}

fn case(seed: u64, cols: usize, gs: usize) -> Case {
    let mut r = Rng(seed);
    let groups = cols / gs;
    let words = (0..cols / 8).map(|_| r.next() as u32).collect();
    let (s, b) = (0..groups).map(|_| (r.f() * 0.05, r.f() * 0.1)).unzip();
    let x: Vec<f32> = (0..cols).map(|_| r.f() * 3.0).collect();
    let xsum = x.chunks_exact(gs).map(|g| g.iter().sum()).collect();
    Case {
        words,
        s,
        b,
        x,
        xsum,
        groups,
        gs,
    }
}

impl Case {
    /// The case's matrix row as the kernels take it.
    fn row(&self) -> Row<'_, &[f32]> {
        Row {
            words: &self.words,
            s: &self.s[..],
            b: &self.b[..],
            k0: 0,
            groups: self.groups,
            gs: self.gs,
        }
    }
}

/// The dequantized dot product in f64: what both kinds approximate.
fn reference(c: &Case) -> f64 {
    let mut acc = 0f64;
    for i in 0..c.groups * c.gs {
        let q = (c.words[i / 8] >> (4 * (i % 8))) & 15;
        let (s, b) = (c.s[i / c.gs], c.b[i / c.gs]);
        acc += (s as f64 * q as f64 + b as f64) * c.x[i] as f64;
    }
    acc
}

#[test]
fn every_form_is_bit_equal_to_the_portable_one_and_near_the_dequantized_product() {
    let simd = Simd::current();
    // The SIMD form under test is the one this architecture has (so this test provably
    // checks it: AVX2 here, NEON under qemu in scripts/cross_test.sh).
    if cfg!(target_arch = "aarch64") {
        assert_eq!(simd, Simd::Neon);
    }
    eprintln!(
        "kernel form under test: {} (int8 kinds: {})",
        simd.name(),
        simd.int8_name()
    );
    for (seed, cols, gs) in [(1, 64, 32), (2, 1024, 64), (3, 512, 128), (4, 2816, 64)] {
        for s in 0..4 {
            let c = case(seed * 101 + s, cols, gs);
            let r = c.row();
            let exact = row_exact(r, &c.x, &c.xsum);
            let fast = simd.row_exact(r, &c.x, &c.xsum);
            assert_eq!(
                exact.to_bits(),
                fast.to_bits(),
                "exact, {simd:?}, {cols}/{gs}"
            );
            let want = reference(&c);
            let scale: f64 = c.x.iter().map(|v| v.abs() as f64).sum::<f64>() * 0.05 * 15.0;
            assert!(
                (exact as f64 - want).abs() <= 1e-5 * scale,
                "{exact} vs {want}"
            );
            for residual in [false, true] {
                let qi = QuantizedInput::new(&c.x, cols, residual);
                let x = qi.row(0);
                let qsum = qi.group_sums(gs);
                let i8p = row_int8(r, x, &qsum);
                let i8f = simd.row_int8(r, x, &qsum);
                assert_eq!(i8p.to_bits(), i8f.to_bits(), "int8 {residual}, {simd:?}");
                // The result is W·x̃ for the rounded activations, so it is off by at most
                // Σ|w_i|·(half a step of x_i's block) (plus float rounding).
                // The finest step: the block's with one part, the residual's with two.
                let step = |i: usize| x.d[i / 8];
                let bound: f64 = (0..cols)
                    .map(|i| {
                        let q = (c.words[i / 8] >> (4 * (i % 8))) & 15;
                        let (sc, bi) = (c.s[i / gs], c.b[i / gs]);
                        (sc as f64 * q as f64 + bi as f64).abs() * step(i) as f64 / 2.0
                    })
                    .sum();
                let err = (i8p as f64 - want).abs();
                assert!(
                    err <= bound + 1e-5 * scale,
                    "{cols}/{gs} residual {residual}: {i8p} vs {want} (bound {bound})"
                );
            }
        }
    }
}

#[test]
fn several_inputs_at_once_are_bit_equal_to_one_at_a_time() {
    let simd = Simd::current();
    for (seed, cols, gs) in [(5, 64, 32), (6, 1024, 64), (7, 512, 128)] {
        let c = case(seed, cols, gs);
        let r = c.row();
        // 1 to 9 inputs: blocks of four, then the last three or two together, or one.
        for n in 1..=9 {
            let inputs: Vec<Case> = (0..n)
                .map(|k| case(seed * 31 + k as u64, cols, gs))
                .collect();
            let xs: Vec<f32> = inputs.iter().flat_map(|i| i.x.iter().copied()).collect();
            let xsums: Vec<f32> = inputs.iter().flat_map(|i| i.xsum.iter().copied()).collect();
            let mut out = vec![0f32; n];
            simd.row_exact_inputs(r, &xs, cols, &xsums, &mut out);
            for (k, i) in inputs.iter().enumerate() {
                let one = row_exact(r, &i.x, &i.xsum);
                assert_eq!(
                    one.to_bits(),
                    out[k].to_bits(),
                    "{simd:?} {cols}/{gs}, input {k} of {n}"
                );
            }
        }
    }
}

#[test]
fn quantized_input_round_trips_within_half_a_step() {
    let mut r = Rng(9);
    let x: Vec<f32> = (0..128).map(|_| r.f() * 4.0).collect();
    let one = QuantizedInput::new(&x, 128, false);
    let qi = QuantizedInput::new(&x, 128, true);
    let steps = RESIDUAL_STEPS as f32;
    for (i, v) in x.iter().enumerate() {
        let (chunk, col) = (i / 64, i % 64);
        let pos = chunk * 64 + if col % 2 == 0 { col / 2 } else { 32 + col / 2 };
        // One part: steps of d; two: the same int8 part, and the residual in steps of d/254.
        let d = one.d[i / 8];
        assert_eq!(qi.d[i / 8], d / steps);
        assert_eq!(one.q[pos], qi.q[pos]);
        let back = one.q[pos] as f32 * d;
        assert!((back - v).abs() <= 0.5 * d + 1e-6, "{i}: {back} vs {v}");
        let two = (steps * qi.q[pos] as f32 + qi.q2[pos] as f32) * qi.d[i / 8];
        assert!(
            (two - v).abs() <= 0.5 * qi.d[i / 8] + 1e-6,
            "{i}: {two} vs {v}"
        );
    }
    // The block sums are the sums of the values the kernels multiply.
    for (blk, want) in qi.block_sums.iter().enumerate() {
        let units: i32 = (0..32)
            .map(|k| {
                let col = 32 * (blk % 2) + k;
                let pos = (blk / 2) * 64 + if col % 2 == 0 { col / 2 } else { 32 + col / 2 };
                RESIDUAL_STEPS * qi.q[pos] as i32 + qi.q2[pos] as i32
            })
            .sum();
        assert_eq!(*want, qi.d[blk * 4] * units as f32);
    }
    // An all-zero block quantizes to zeros, not NaN.
    let z = QuantizedInput::new(&[0.0; 64], 64, true);
    assert!(z.q.iter().all(|&v| v == 0) && z.d.iter().all(|&v| v == 0.0));
}

#[test]
fn every_quantizer_form_is_bit_equal_to_the_portable_one() {
    let simd = Simd::current();
    let mut r = Rng(11);
    // Values on exact half steps too (ties round to even in every form).
    let mut x: Vec<f32> = (0..1024).map(|_| r.f() * 5.0).collect();
    for (i, v) in x.iter_mut().enumerate().take(64) {
        *v = (i as f32 - 31.5) * 0.5;
    }
    // A NaN and an infinity in two blocks of the second row.
    x[512 + 40] = f32::NAN;
    x[512 + 100] = f32::NEG_INFINITY;
    for residual in [false, true] {
        let a = QuantizedInput::new_in(Simd::Portable, &x, 512, residual);
        let b = QuantizedInput::new_in(simd, &x, 512, residual);
        // Their blocks' scales are NaN (so every product they enter is), the rest finite.
        let nan_blocks: Vec<usize> = (0..32).filter(|&k| b.block_sums[k].is_nan()).collect();
        assert_eq!(nan_blocks, [17, 19], "{simd:?} {residual}");
        assert_eq!(a.q, b.q, "{simd:?} {residual}");
        assert_eq!(a.q2, b.q2, "{simd:?} {residual}");
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.d), bits(&b.d));
        assert_eq!(bits(&a.block_sums), bits(&b.block_sums));
    }
}

#[test]
fn a_block_of_rows_is_bit_equal_to_one_row_at_a_time() {
    let simd = Simd::current();
    for (seed, cols, gs) in [(12, 64, 32), (13, 1024, 64), (14, 512, 128)] {
        // Five rows of one matrix: their words one after another, scales and biases by group.
        let rows: Vec<Case> = (0..5).map(|k| case(seed * 7 + k, cols, gs)).collect();
        let words: Vec<u32> = rows.iter().flat_map(|c| c.words.iter().copied()).collect();
        let s: Vec<f32> = rows.iter().flat_map(|c| c.s.iter().copied()).collect();
        let b: Vec<f32> = rows.iter().flat_map(|c| c.b.iter().copied()).collect();
        let groups = cols / gs;
        let x = &rows[0];
        // Rows 1..5 as one block, outputs at a stride of 3 (as for three inputs).
        let first = Row {
            words: &words[cols / 8..],
            s: &s[..],
            b: &b[..],
            k0: groups,
            groups,
            gs,
        };
        for residual in [false, true] {
            let qi = QuantizedInput::new(&x.x, cols, residual);
            let qsum = qi.group_sums(gs);
            let mut out = vec![f32::NAN; 3 * 4];
            simd.rows_int8(first, 4, [qi.row(0)], [&qsum[..]], &mut out, 3);
            for k in 0..4 {
                let one = Row {
                    words: &rows[k + 1].words,
                    s: &s[..],
                    b: &b[..],
                    k0: (k + 1) * groups,
                    groups,
                    gs,
                };
                let want = row_int8(one, qi.row(0), &qsum);
                assert_eq!(
                    want.to_bits(),
                    out[3 * k].to_bits(),
                    "{simd:?} {cols}/{gs} row {k}"
                );
                assert!(out[3 * k + 1].is_nan() && out[3 * k + 2].is_nan());
            }
        }
        // The exact kind over the same block.
        let mut out = vec![f32::NAN; 3 * 4];
        simd.rows_exact(first, 4, &x.x, &x.xsum, &mut out, 3);
        for k in 0..4 {
            let want = row_exact(first.nth(k), &x.x, &x.xsum);
            assert_eq!(
                want.to_bits(),
                out[3 * k].to_bits(),
                "exact {simd:?} row {k}"
            );
            assert!(out[3 * k + 1].is_nan() && out[3 * k + 2].is_nan());
        }
    }
}

/// Three consecutive rows of one matrix (seeded cases `seed..seed + 3`).
struct Rows3 {
    words: Vec<u32>,
    s: Vec<f32>,
    b: Vec<f32>,
    gs: usize,
}

impl Rows3 {
    fn new(seed: u64, cols: usize, gs: usize) -> Self {
        let rows: Vec<Case> = (0..3).map(|k| case(seed + k, cols, gs)).collect();
        Rows3 {
            words: rows.iter().flat_map(|c| c.words.iter().copied()).collect(),
            s: rows.iter().flat_map(|c| c.s.iter().copied()).collect(),
            b: rows.iter().flat_map(|c| c.b.iter().copied()).collect(),
            gs,
        }
    }

    /// The first row, its `words` spanning all three, as the kernels take a block.
    fn first(&self) -> Row<'_, &[f32]> {
        Row {
            words: &self.words,
            s: &self.s[..],
            b: &self.b[..],
            k0: 0,
            groups: self.s.len() / 3,
            gs: self.gs,
        }
    }
}

#[test]
fn several_int8_inputs_at_once_are_bit_equal_to_one_at_a_time() {
    let simd = Simd::current();
    for (seed, cols, gs) in [(15, 64, 32), (16, 1024, 64)] {
        let m = Rows3::new(seed * 5, cols, gs);
        let (first, groups) = (m.first(), cols / gs);
        for residual in [false, true] {
            // Four inputs quantized together, as a prompt's rows are.
            let xs: Vec<f32> = (0..4)
                .flat_map(|k| case(seed * 9 + k, cols, gs).x)
                .collect();
            let qi = QuantizedInput::new(&xs, cols, residual);
            let qsum = qi.group_sums(gs);
            let sums = [0, 1, 2, 3].map(|i| &qsum[i * groups..(i + 1) * groups]);
            let mut out = vec![0f32; 3 * 4];
            simd.rows_int8(first, 3, [0, 1, 2, 3].map(|i| qi.row(i)), sums, &mut out, 4);
            for j in 0..3 {
                for i in 0..4 {
                    let mut one = [0f32];
                    simd.rows_int8(first.nth(j), 1, [qi.row(i)], [sums[i]], &mut one, 1);
                    let want = row_int8(first.nth(j), qi.row(i), sums[i]);
                    assert_eq!(want.to_bits(), one[0].to_bits(), "{simd:?} one");
                    assert_eq!(
                        want.to_bits(),
                        out[4 * j + i].to_bits(),
                        "{simd:?} {cols}/{gs}"
                    );
                }
            }
            // Three and two together (a prompt's last inputs), inputs 1.. of the four.
            let mut out3 = vec![0f32; 3 * 3];
            let k3 = [1, 2, 3];
            simd.rows_int8(
                first,
                3,
                k3.map(|i| qi.row(i)),
                k3.map(|i| sums[i]),
                &mut out3,
                3,
            );
            let mut out2 = vec![0f32; 3 * 2];
            let k2 = [2, 3];
            simd.rows_int8(
                first,
                3,
                k2.map(|i| qi.row(i)),
                k2.map(|i| sums[i]),
                &mut out2,
                2,
            );
            for j in 0..3 {
                for (m, &i) in k3.iter().enumerate() {
                    let want = row_int8(first.nth(j), qi.row(i), sums[i]).to_bits();
                    assert_eq!(want, out3[3 * j + m].to_bits(), "{simd:?} three");
                }
                for (m, &i) in k2.iter().enumerate() {
                    let want = row_int8(first.nth(j), qi.row(i), sums[i]).to_bits();
                    assert_eq!(want, out2[2 * j + m].to_bits(), "{simd:?} two");
                }
            }
        }
    }
}

#[test]
fn a_non_finite_activation_makes_the_int8_product_nan_as_the_exact_one_is() {
    let simd = Simd::current();
    for bad in [f32::NAN, f32::INFINITY] {
        let mut c = case(21, 256, 64);
        c.x[70] = bad;
        c.xsum = c.x.chunks_exact(64).map(|g| g.iter().sum()).collect();
        let exact = simd.row_exact(c.row(), &c.x, &c.xsum);
        assert!(!exact.is_finite(), "exact {exact}");
        for residual in [false, true] {
            let qi = QuantizedInput::new(&c.x, 256, residual);
            let qsum = qi.group_sums(64);
            for y in [
                row_int8(c.row(), qi.row(0), &qsum),
                simd.row_int8(c.row(), qi.row(0), &qsum),
            ] {
                assert!(y.is_nan(), "{bad} residual {residual}, {simd:?}: {y}");
            }
        }
    }
}

/// Both x86-64 int8 forms run here where the CPU has them, whatever `Simd::current` picks: the
/// AVX2 form (`maddubs`) and, on CPUs with AVX512-VNNI, the VNNI form (`dpbusd`), each bit-equal
/// to the portable form over blocks of rows, one and four inputs, one and two parts.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_and_vnni_int8_forms_are_bit_equal_to_the_portable_one() {
    if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
    {
        eprintln!("no AVX2: nothing to compare");
        return;
    }
    let vnni = vnni::available();
    eprintln!(
        "VNNI form {}",
        if vnni {
            "checked"
        } else {
            "NOT RUN (no AVX512-VNNI here)"
        }
    );
    for (seed, cols, gs) in [(31, 64, 32), (32, 1024, 64), (33, 512, 128), (34, 2816, 64)] {
        let m = Rows3::new(seed * 11, cols, gs);
        let (first, groups) = (m.first(), cols / gs);
        let xs: Vec<f32> = (0..4)
            .flat_map(|k| case(seed * 13 + k, cols, gs).x)
            .collect();
        for residual in [false, true] {
            let qi = QuantizedInput::new(&xs, cols, residual);
            let qsum = qi.group_sums(gs);
            let sums = [0, 1, 2, 3].map(|i| &qsum[i * groups..(i + 1) * groups]);
            let want: Vec<u32> = (0..3)
                .flat_map(|j| (0..4).map(move |i| (j, i)))
                .map(|(j, i)| row_int8(first.nth(j), qi.row(i), sums[i]).to_bits())
                .collect();
            let x4 = [0, 1, 2, 3].map(|i| qi.row(i));
            let mut forms: Vec<(&str, Vec<f32>)> = Vec::new();
            // SAFETY: AVX2 and FMA checked above; AVX512-VL and VNNI by `vnni::available`.
            unsafe {
                let mut four = vec![0f32; 12];
                let mut ones = vec![0f32; 12];
                match residual {
                    true => int8_avx2::<_, true, 4>(first, 3, x4, sums, &mut four, 4),
                    false => int8_avx2::<_, false, 4>(first, 3, x4, sums, &mut four, 4),
                }
                for i in 0..4 {
                    let (x1, s1) = ([qi.row(i)], [sums[i]]);
                    match residual {
                        true => int8_avx2::<_, true, 1>(first, 3, x1, s1, &mut ones[i..], 4),
                        false => int8_avx2::<_, false, 1>(first, 3, x1, s1, &mut ones[i..], 4),
                    }
                }
                forms.push(("avx2, 4 inputs", four));
                forms.push(("avx2, 1 input", ones));
                if vnni {
                    let mut four = vec![0f32; 12];
                    let mut ones = vec![0f32; 12];
                    match residual {
                        true => vnni::rows::<_, true, 4>(first, 3, x4, sums, &mut four, 4),
                        false => vnni::rows::<_, false, 4>(first, 3, x4, sums, &mut four, 4),
                    }
                    for i in 0..4 {
                        let (x1, s1) = ([qi.row(i)], [sums[i]]);
                        match residual {
                            true => vnni::rows::<_, true, 1>(first, 3, x1, s1, &mut ones[i..], 4),
                            false => vnni::rows::<_, false, 1>(first, 3, x1, s1, &mut ones[i..], 4),
                        }
                    }
                    forms.push(("vnni, 4 inputs", four));
                    forms.push(("vnni, 1 input", ones));
                }
            }
            for (name, got) in forms {
                let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "{name}, {cols}/{gs}, residual {residual}");
            }
        }
    }
}
