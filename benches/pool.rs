//! The compute pool's cost per parallel region (`weights::kernels::spin::SpinPool`): a decode
//! step runs 40–60 regions, so at many threads what a region costs beyond its blocks' work is
//! a share of every token. Each thread count is timed on an empty region (64 blocks at 16
//! threads: four a thread, as the products cut theirs) and on one whose blocks each spin
//! 2 µs (four a thread: 8 µs of work a thread, the ideal region time in the same run).
use criterion::{criterion_group, BenchmarkId, Criterion};
use moe_harness::weights::kernels::spin::SpinPool;
use std::time::{Duration, Instant};

fn spin_for(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

fn regions(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool_regions");
    g.sample_size(20);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let counts: std::collections::BTreeSet<usize> =
        [2, 4, 8, 16].into_iter().map(|t| t.min(cores)).collect();
    for threads in counts.into_iter().filter(|&t| t > 1) {
        let pool = SpinPool::new(threads).unwrap();
        let n = 4 * threads;
        g.bench_function(BenchmarkId::new("empty region", threads), |b| {
            b.iter(|| pool.run(n, &|_| {}))
        });
        g.bench_function(
            BenchmarkId::new("4 blocks of 2 us a thread (ideal 8 us)", threads),
            |b| b.iter(|| pool.run(n, &|_| spin_for(Duration::from_micros(2)))),
        );
    }
    g.finish();
}

criterion_group!(benches, regions);
