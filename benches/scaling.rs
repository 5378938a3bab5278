//! The 1 → 2 core decode speed-up as one criterion measurement: each iteration decodes the same
//! tokens on a 1-thread engine and on a 2-thread engine back to back (the order alternating,
//! each timed decode after an untimed one on the same engine, so neither is timed while its
//! threads wake up or its weights come back into the caches after the other engine's run), and
//! its value is the 2-thread time as a fraction of the 1-thread time of that same pair.
//!
//! `cpu_threads` (in `decode.rs`) times each thread count in its own criterion run, seconds
//! apart, and the scaling is the ratio of two of its rows; on a shared VM whose speed drifts by
//! 15–25 % between those runs, that ratio moved 1.28–1.88× over four runs of an unchanged
//! binary. Here both sides of every ratio are measured within ~0.1 s of each other, so drift
//! that is slow against one pair cancels, and criterion's interval is the interval of the
//! ratio itself.
use criterion::measurement::{Measurement, ValueFormatter};
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use moe_harness::engine::{Engine, EngineConfig};
use moe_harness::weights::kernels::Kernels;

use crate::decode::{timed_decode, PROMPT};

/// A measurement in units of the paired 1-thread decode time: the routine returns the sum over
/// its iterations of each pair's 2-thread time ÷ 1-thread time, so criterion's per-iteration
/// value is that fraction (lower is faster, as with times) and its throughput with
/// `Throughput::Elements(1)` is the speed-up.
pub struct PairedFraction;

impl Measurement for PairedFraction {
    type Intermediate = ();
    type Value = f64;
    fn start(&self) {}
    /// Never used: the routine returns its value through `iter_custom`.
    fn end(&self, _: ()) -> f64 {
        0.0
    }
    fn add(&self, a: &f64, b: &f64) -> f64 {
        a + b
    }
    fn zero(&self) -> f64 {
        0.0
    }
    fn to_f64(&self, v: &f64) -> f64 {
        *v
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &FractionFormatter
    }
}

/// Formats [`PairedFraction`]'s values as a fraction of the 1-core time and their throughput
/// as the speed-up over 1 core.
struct FractionFormatter;

impl ValueFormatter for FractionFormatter {
    fn scale_values(&self, _typical: f64, _values: &mut [f64]) -> &'static str {
        "of the 1-core time"
    }
    fn scale_throughputs(&self, _typical: f64, t: &Throughput, values: &mut [f64]) -> &'static str {
        let n = match *t {
            Throughput::Elements(n) => n as f64,
            _ => 1.0,
        };
        for v in values {
            *v = n / *v;
        }
        "x the 1-core speed"
    }
    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "fraction of the 1-core time"
    }
}

/// Decode on the CPU benchmark shape (`experiments/configs/glm4-moe-cpu-bench.json`, MLX 4-bit,
/// written into a tempdir, all experts resident) at 2 threads against 1, per kernel kind, each
/// iteration one pair of 16-token decodes after an 8-token prompt (not timed).
fn cpu_scaling(c: &mut Criterion<PairedFraction>) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        eprintln!("cpu_scaling: skipped, this machine has one core");
        return;
    }
    let mut g = c.benchmark_group("cpu_scaling");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("m");
    let cfg = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("experiments/configs/glm4-moe-cpu-bench.json");
    moe_harness::synth::synth(
        &cfg,
        &dir,
        moe_harness::synth::SynthLayout::Mlx(4),
        None,
        0,
        1 << 30,
    )
    .unwrap();
    let open = |threads, kernels| {
        let cfg = EngineConfig {
            threads: Some(threads),
            kernels,
            ..Default::default()
        };
        Engine::open(&dir, candle_core::Device::Cpu, cfg).unwrap()
    };
    for kernels in [Kernels::Int8x2, Kernels::Exact, Kernels::Int8] {
        let (mut one, mut two) = (open(1, kernels), open(2, kernels));
        assert_eq!((one.compute_threads(), two.compute_threads()), (1, 2));
        let mut flip = false;
        g.bench_function(
            BenchmarkId::new("glm4-moe-cpu-bench 16 tokens, 2 vs 1 threads", kernels),
            |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| {
                            flip = !flip;
                            // An untimed decode, then the timed one.
                            let mut warm = |e: &mut Engine| {
                                timed_decode(e, &PROMPT, 1);
                                timed_decode(e, &PROMPT, 1)
                            };
                            let (t1, t2) = if flip {
                                let t1 = warm(&mut one);
                                (t1, warm(&mut two))
                            } else {
                                let t2 = warm(&mut two);
                                (warm(&mut one), t2)
                            };
                            t2.as_secs_f64() / t1.as_secs_f64()
                        })
                        .sum::<f64>()
                })
            },
        );
    }
    g.finish();
}

criterion_group!(
    name = benches;
    config = Criterion::default().with_measurement(PairedFraction);
    targets = cpu_scaling
);
