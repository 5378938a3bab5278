//! Criterion benchmarks, one file per topic. `cargo bench` runs them all; each reports ratios
//! against a baseline measured in the same run (memcpy, unlimited budget, tracing off, LRU).
use criterion::criterion_main;

mod common;
mod decode;
mod expert_miss;
mod kernels;
mod pool;
mod scaling;
mod simulator;

criterion_main!(
    expert_miss::benches,
    decode::benches,
    kernels::benches,
    pool::benches,
    scaling::benches,
    simulator::benches
);
