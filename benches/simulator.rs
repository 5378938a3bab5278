//! Simulator throughput (accesses/s, single thread) of every policy on a large seeded synthetic
//! trace (Zipf-skewed with temporal locality). Set MOE_BENCH_ACCESSES to change its size
//! (default 50 M accesses under `cargo bench`: 48 layers × 512 experts × top-10, Qwen3-Coder-Next's shape).
use std::hint::black_box;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use moe_harness::experts::budget::Budget;
use moe_harness::experts::policies::PolicySpec;
use moe_harness::simulate::{simulate, Simulation};
use moe_harness::synth::synthetic_trace;
use moe_harness::trace::TraceRow;

fn throughput(c: &mut Criterion) {
    // `cargo bench` passes --bench; under `cargo test` the bench only smoke-runs, on a small trace.
    let default = if std::env::args().any(|a| a == "--bench") {
        50_000_000
    } else {
        200_000
    };
    let accesses: usize = std::env::var("MOE_BENCH_ACCESSES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    let (layers, experts, top_k) = (48u32, 512u32, 10usize);
    let tokens = accesses / (layers as usize * top_k);
    let moe_layers: Vec<u32> = (0..layers).collect();
    let rows = synthetic_trace(42, tokens, &moe_layers, experts, top_k, 1.1, 0.5);
    let n: u64 = rows.iter().map(|r| r.experts.len() as u64).sum();
    let mut g = c.benchmark_group("simulator");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n));
    for p in [
        "lru",
        "lfu",
        "lcp-0.25-128",
        "lfu-decay0.9",
        "lookahead",
        "static-16",
        "belady",
    ] {
        let spec = PolicySpec::parse(p).unwrap();
        g.bench_with_input(
            BenchmarkId::new(format!("{} accesses", n), p),
            &spec,
            |b, spec| {
                b.iter(|| {
                    black_box(
                        simulate(
                            &rows,
                            &Simulation::new(spec.clone(), Budget::SlotsPerLayer(64), &moe_layers),
                            |_| 1,
                        )
                        .unwrap()
                        .hits,
                    )
                })
            },
        );
    }
    g.finish();
    compare_with_libcachesim(&rows, &moe_layers, experts);
}

/// Side by side with libCacheSim's own C simulator on the same trace, one global pool of
/// unit-size experts (48 × 64 slots): writes the trace in libCacheSim's oracleGeneral binary
/// format, times our replay and `cache.process_trace` (PyPI `libcachesim`), prints the ratio.
fn compare_with_libcachesim(rows: &[TraceRow], layers: &[u32], experts: u32) {
    use std::io::Write;
    let slots = 64 * layers.len() as u64;
    let ids: Vec<u64> = rows
        .iter()
        .flat_map(|r| {
            r.experts
                .iter()
                .map(move |&e| r.layer as u64 * experts as u64 + e as u64)
        })
        .collect();
    // next_access_vtime for Belady: index of the next request to the same object, -1 if none.
    let mut next = vec![-1i64; ids.len()];
    let mut last: std::collections::HashMap<u64, usize> = Default::default();
    for (i, id) in ids.iter().enumerate().rev() {
        if let Some(&j) = last.get(id) {
            next[i] = j as i64;
        }
        last.insert(*id, i);
    }
    // A temporary directory, not target/: CARGO_TARGET_DIR may put the build elsewhere.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench-trace.oracleGeneral");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    for (i, id) in ids.iter().enumerate() {
        f.write_all(&(i as u32).to_le_bytes()).unwrap();
        f.write_all(&id.to_le_bytes()).unwrap();
        f.write_all(&1u32.to_le_bytes()).unwrap();
        f.write_all(&next[i].to_le_bytes()).unwrap();
    }
    f.flush().unwrap();
    drop(f);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/libcachesim_compare.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&path)
        .arg(slots.to_string())
        .output();
    let theirs: Vec<serde_json::Value> = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
        Ok(o) => {
            eprintln!(
                "libCacheSim comparison skipped: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            Vec::new()
        }
        Err(e) => {
            eprintln!("libCacheSim comparison skipped: {e}");
            Vec::new()
        }
    };
    let _ = std::fs::remove_file(&path);
    println!(
        "\nsimulator vs libCacheSim, one global pool of {slots} unit-size experts, {} accesses:",
        ids.len()
    );
    println!(
        "{:<8} {:>14} {:>18} {:>8} {:>10}",
        "policy", "ours M acc/s", "libCacheSim M/s", "ratio", "hit rates"
    );
    for p in ["lru", "lfu", "belady"] {
        let spec = PolicySpec::parse(p).unwrap();
        let t = std::time::Instant::now();
        let mut sim = Simulation::new(spec, Budget::BytesGlobal(slots), layers);
        sim.classic = true;
        let r = simulate(rows, &sim, |_| 1).unwrap();
        let ours = ids.len() as f64 / t.elapsed().as_secs_f64() / 1e6;
        let theirs = theirs.iter().find(|v| v["policy"] == p);
        let (their_rate, their_hit) = theirs.map_or((f64::NAN, f64::NAN), |v| {
            (
                ids.len() as f64 / v["seconds"].as_f64().unwrap_or(f64::NAN) / 1e6,
                1.0 - v["miss_ratio"].as_f64().unwrap_or(f64::NAN),
            )
        });
        println!(
            "{p:<8} {ours:>14.1} {their_rate:>18.1} {:>7.2}x {:>5.3}/{:.3}",
            ours / their_rate,
            r.hit_rate,
            their_hit
        );
    }
}

criterion_group!(benches, throughput);
