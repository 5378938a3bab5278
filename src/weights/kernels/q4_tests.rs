//! Tests of the 4-bit row kernels (every form bit-equal to the portable one; several inputs at
//! once bit-equal to one at a time; int8 quantization bounds). Compiled with `q4.rs`, also alone
//! for aarch64 by `scripts/cross_test.sh`.

use super::*;

/// A seeded xorshift stream (this file stays free of dependencies for the aarch64 test).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f(&mut self) -> f32 {
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
    eprintln!("kernel form under test: {}", simd.name());
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
                let step = |i: usize| if residual { x.d2[i / 8] } else { x.d[i / 8] };
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
        // 1 to 9 inputs: blocks of four and the rest one by one.
        for n in 1..=9 {
            let inputs: Vec<Case> = (0..n)
                .map(|k| case(seed * 31 + k as u64, cols, gs))
                .collect();
            let xs: Vec<f32> = inputs.iter().flat_map(|i| i.x.iter().copied()).collect();
            let xsums: Vec<f32> = inputs.iter().flat_map(|i| i.xsum.iter().copied()).collect();
            let mut out = vec![0f32; n];
            simd.rows_exact(r, &xs, cols, &xsums, &mut out);
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
    let qi = QuantizedInput::new(&x, 128, true);
    for (i, v) in x.iter().enumerate() {
        let (chunk, col) = (i / 64, i % 64);
        let pos = chunk * 64 + if col % 2 == 0 { col / 2 } else { 32 + col / 2 };
        let back = qi.q[pos] as f32 * qi.d[i / 8];
        assert!(
            (back - v).abs() <= 0.5 * qi.d[i / 8] + 1e-6,
            "{i}: {back} vs {v}"
        );
        let two = back + qi.q2[pos] as f32 * qi.d2[i / 8];
        assert!(
            (two - v).abs() <= 0.5 * qi.d2[i / 8] + 1e-6,
            "{i}: {two} vs {v}"
        );
    }
    // An all-zero block quantizes to zeros, not NaN.
    let z = QuantizedInput::new(&[0.0; 64], 64, true);
    assert!(z.q.iter().all(|&v| v == 0) && z.d.iter().all(|&v| v == 0.0));
}
