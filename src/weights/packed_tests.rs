//! A tiled matrix against the same matrix in rows: every product and lookup of the exact kind
//! bit-equal (the exact kernels read copies of its rows), the int8 kinds equal up to float
//! rounding, built from bytes in one step or tiled after.

use super::*;
use crate::weights::kernels::{with, Context};

/// A `rows × cols` MLX 4-bit matrix with bf16 scales (seeded), in rows.
fn matrix(rows: usize, cols: usize, gs: usize) -> (PackedMatrix, [Vec<u8>; 3]) {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let packed: Vec<u8> = (0..rows * cols / 2).map(|_| next() as u8).collect();
    let half = |v: f32| ((v.to_bits() >> 16) as u16).to_le_bytes();
    let mut group = |base: f32| -> Vec<u8> {
        (0..rows * cols / gs)
            .flat_map(|_| half(base + (next() % 1000) as f32 * 1e-4))
            .collect()
    };
    let (sc, bi) = (group(0.01), group(-0.05));
    let p = QuantParams {
        group_size: gs,
        bits: 4,
    };
    let m = PackedMatrix::new(&packed, &sc, &bi, DType::BF16, p, rows, cols).unwrap();
    (m, [packed, sc, bi])
}

fn inputs(t: usize, cols: usize) -> Vec<f32> {
    (0..t * cols)
        .map(|i| ((i * 7919 % 2003) as f32 / 1001.0 - 1.0) * 2.0)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn a_tiled_matrix_gives_the_row_layouts_results() {
    let (rows, cols, gs) = (48, 256, 64);
    let (m, [packed, sc, bi]) = matrix(rows, cols, gs);
    let mut t = m.clone();
    if !t.tileable() {
        eprintln!(
            "NOT RUN: no tile kernels on this CPU ({:?})",
            q4::Simd::current()
        );
        assert!(!t.tile());
        return;
    }
    assert!(t.tile() && t.is_tiled() && !t.tile(), "tiles once");
    let direct =
        PackedMatrix::from_bytes(&packed, &sc, &bi, DType::BF16, m.p, rows, cols, true).unwrap();
    assert!(direct.is_tiled());
    assert_eq!(
        direct.words.as_slice(),
        t.words.as_slice(),
        "built tiled = tiled after"
    );
    // Lookups read the same values.
    for r in [0, 7, 8, 29, 47] {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        m.row_into(r, &mut a);
        t.row_into(r, &mut b);
        assert_eq!(bits(&a), bits(&b), "row {r}");
    }
    let w: Vec<f32> = (0..13).map(|i| i as f32 * 0.25 - 1.0).collect();
    let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
    m.weighted_rows(5..18, &w, &mut a);
    t.weighted_rows(5..18, &w, &mut b);
    assert_eq!(bits(&a), bits(&b), "weighted rows");
    for (kind, threads) in [
        (Kernels::Exact, 1),
        (Kernels::Exact, 3),
        (Kernels::Int8x2, 1),
        (Kernels::Int8x2, 3),
        (Kernels::Int8, 2),
    ] {
        let ctx = Context::new(kind, Some(threads)).unwrap();
        for n in [1, 2, 5] {
            let xs = inputs(n, cols);
            let (want, got, got_direct, part, part_want) = with(&ctx, || {
                (
                    m.matmul_rows(&xs),
                    t.matmul_rows(&xs),
                    direct.matmul_rows(&xs),
                    // A range that starts and ends inside tiles.
                    t.matmul_range(3..21, &xs),
                    t.matmul_rows(&xs),
                )
            });
            assert_eq!(bits(&got), bits(&got_direct), "{kind} {n}");
            // The range's rows are the whole product's, bit for bit.
            for i in 0..n {
                assert_eq!(
                    bits(&part[i * 18..(i + 1) * 18]),
                    bits(&part_want[i * rows + 3..i * rows + 21]),
                    "{kind} {n} range"
                );
            }
            match kind {
                Kernels::Exact => assert_eq!(bits(&got), bits(&want), "exact {n} inputs"),
                _ => {
                    let err: f32 = got.iter().zip(&want).map(|(a, b)| (a - b).powi(2)).sum();
                    let norm: f32 = want.iter().map(|a| a * a).sum();
                    let rel = (err / norm).sqrt();
                    assert!(
                        rel < 1e-5 && got != want,
                        "{kind} {n} inputs: rel {rel:.2e}"
                    );
                }
            }
        }
    }
}

#[test]
fn untileable_shapes_stay_in_rows() {
    // Rows not a multiple of 8; columns the int8 kernels do not take.
    for (rows, cols) in [(12, 256), (16, 96)] {
        let (mut m, [packed, sc, bi]) = matrix(rows, cols, 32);
        assert!(!m.tile() && !m.is_tiled());
        let d = PackedMatrix::from_bytes(&packed, &sc, &bi, DType::BF16, m.p, rows, cols, true)
            .unwrap();
        assert!(!d.is_tiled());
    }
    // Sizes that disagree are refused as by `new`.
    let (m, [packed, sc, bi]) = matrix(16, 256, 64);
    let err = PackedMatrix::from_bytes(&packed[1..], &sc, &bi, DType::BF16, m.p, 16, 256, true);
    assert!(err.unwrap_err().contains("sizes disagree"));
}
