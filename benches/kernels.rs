//! One MLX 4-bit product in its two layouts, the row kernels against the 8-row tiles
//! (`weights::kernels::q4::tile`), for each int8 kind and 1 / 4 / 16 inputs (a decode token, a
//! block of a prompt, a 16-token prompt), on one thread: the tiles' gain is the ratio of two rows
//! of one run. A 512 × 1024 matrix (an expert's gate of the CPU-bench shape, 256 KB of words,
//! bf16 scales, in cache: the kernels' own cost) and 400 of them (100 MB, streamed from memory
//! as a decode step's experts are).
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use moe_harness::config::QuantParams;
use moe_harness::weights::kernels::{with, Context, Kernels};
use moe_harness::weights::packed::PackedMatrix;
use moe_harness::weights::DType;

const ROWS: usize = 512;
const COLS: usize = 1024;

/// `n` seeded 512 × 1024 matrices, tiled or in rows.
fn matrices(n: usize, tile: bool) -> Vec<PackedMatrix> {
    let mut s = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let p = QuantParams {
        group_size: 64,
        bits: 4,
    };
    let groups = ROWS * COLS / 64;
    (0..n)
        .map(|_| {
            let w: Vec<u8> = (0..ROWS * COLS / 2).map(|_| next() as u8).collect();
            let sc: Vec<u8> = (0..groups)
                .flat_map(|_| (0x3c00u16 + (next() % 256) as u16).to_le_bytes())
                .collect();
            let bi: Vec<u8> = (0..groups)
                .flat_map(|_| (0xbc00u16 + (next() % 256) as u16).to_le_bytes())
                .collect();
            PackedMatrix::from_bytes(&w, &sc, &bi, DType::BF16, p, ROWS, COLS, tile).unwrap()
        })
        .collect()
}

fn layouts(c: &mut Criterion) {
    let mut g = c.benchmark_group("kernel_layouts");
    g.sample_size(20);
    for (count, what) in [(1, "in cache"), (400, "streamed")] {
        let (rows, tiles) = (matrices(count, false), matrices(count, true));
        if !tiles[0].is_tiled() {
            eprintln!("kernel_layouts: no tile kernels on this CPU; rows only");
        }
        for kind in [Kernels::Int8x2, Kernels::Int8] {
            let ctx = Context::new(kind, Some(1)).unwrap();
            for t in [1, 4, 16] {
                if count > 1 && t > 1 {
                    continue;
                }
                let xs: Vec<f32> = (0..t * COLS)
                    .map(|i| ((i * 7919 % 2003) as f32 / 1001.0 - 1.0) * 2.0)
                    .collect();
                g.throughput(Throughput::Elements((count * ROWS * COLS * t) as u64));
                for (layout, mats) in [("rows", &rows), ("tiles", &tiles)] {
                    let id = format!("{kind}, {t} inputs, {what}");
                    // Timed inside the context (entering it hands the work to its thread).
                    g.bench_function(BenchmarkId::new(id, layout), |b| {
                        b.iter_custom(|iters| {
                            with(&ctx, || {
                                let t0 = std::time::Instant::now();
                                for _ in 0..iters {
                                    for m in mats.iter() {
                                        std::hint::black_box(m.matmul_rows(&xs));
                                    }
                                }
                                t0.elapsed()
                            })
                        })
                    });
                }
            }
        }
    }
    g.finish();
}

criterion_group!(benches, layouts);
