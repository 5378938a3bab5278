//! Seeded fuzzing of everything the harness reads from files it did not write: safetensors
//! headers, `model.safetensors.index.json`, and routing traces (Parquet).
//!
//! Mutations are of the malformed kind (lying offsets, dtypes, shapes, lengths, JSON); a change
//! that leaves a well-formed file of other weights (two equal-size tensors trading places) is a
//! different checkpoint, not a malformed one, and is not generated.
//!
//! The invariant for checkpoints: every mutant either loads the exact same tensors as the
//! original (or, when it loads different ones, the engine refuses it or computes the original's
//! logits bit for bit) or fails with a clean error naming a file — never different numbers with
//! success, never a panic. For traces: every mutant either reads into rows that a replay accepts
//! (non-empty, distinct, in-range ids) or fails with a clean error naming the file.
//!
//! `MOE_FUZZ_CASES` sets the number of mutants per target (default 150 here; `scripts/fuzz.sh`
//! runs more).

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::{copy_fixture, fixture, Reference};
use crate::reliability::{split_safetensors, write_safetensors};
use moe_harness::weights::Checkpoint;

fn cases() -> usize {
    std::env::var("MOE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150)
}

/// Every tensor of a checkpoint: key → (dtype, shape, bytes).
type Tensors = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

fn tensors(ck: &Checkpoint) -> Tensors {
    ck.keys()
        .map(|k| {
            let e = ck.get(k).unwrap();
            (
                k.to_string(),
                (
                    format!("{:?}", e.dtype),
                    e.shape.clone(),
                    ck.mapped(e).to_vec(),
                ),
            )
        })
        .collect()
}

/// One random change to a header (JSON value and the declared-length delta) or to the data.
fn mutate_header(
    rng: &mut StdRng,
    header: &mut serde_json::Value,
    data: &mut Vec<u8>,
) -> (i64, String) {
    let keys: Vec<String> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    let key = keys[rng.random_range(0..keys.len())].clone();
    let other = keys[rng.random_range(0..keys.len())].clone();
    let t = &mut header[&key];
    match rng.random_range(0..12) {
        0 => {
            let o = t["data_offsets"][0].as_i64().unwrap();
            let d = rng.random_range(-16i64..=16);
            t["data_offsets"][0] = serde_json::json!((o + d).max(0));
            (0, format!("{key}: begin {d:+}"))
        }
        1 => {
            let o = t["data_offsets"][1].as_i64().unwrap();
            let d = rng.random_range(-16i64..=16);
            t["data_offsets"][1] = serde_json::json!((o + d).max(0));
            (0, format!("{key}: end {d:+}"))
        }
        2 => {
            // Two tensors claim the same bytes (a well-formed file never does).
            let b = header[&other]["data_offsets"].clone();
            header[&key]["data_offsets"] = b;
            (0, format!("{key} takes the offsets of {other}"))
        }
        3 => {
            let dt = [
                "F32", "F16", "BF16", "U32", "I64", "U8", "F64", "BOOL", "Q4",
            ][rng.random_range(0..9)];
            t["dtype"] = serde_json::json!(dt);
            (0, format!("{key}: dtype {dt}"))
        }
        4 => {
            let shape = t["shape"].as_array_mut().unwrap();
            if shape.is_empty() {
                shape.push(serde_json::json!(1));
            } else {
                let i = rng.random_range(0..shape.len());
                let v = shape[i].as_i64().unwrap();
                shape[i] = serde_json::json!((v + rng.random_range(-2i64..=2)).max(0));
            }
            (0, format!("{key}: shape dim"))
        }
        5 => {
            let shape = t["shape"].as_array_mut().unwrap();
            if rng.random_bool(0.5) && !shape.is_empty() {
                let v = shape.remove(0).as_i64().unwrap();
                if let Some(first) = shape.first_mut() {
                    *first = serde_json::json!(first.as_i64().unwrap() * v);
                }
            } else {
                shape.insert(0, serde_json::json!(1));
            }
            (0, format!("{key}: reshape"))
        }
        6 => {
            header.as_object_mut().unwrap().remove(&key);
            (0, format!("drop {key}"))
        }
        7 => {
            let v = header[&key].clone();
            header.as_object_mut().unwrap().remove(&key);
            header[format!("{key}.x")] = v;
            (0, format!("rename {key}"))
        }
        8 => (rng.random_range(-9i64..=9), "header length".into()),
        9 | 10 => {
            // The data's length changes (its bytes never do: without checksums, a flipped
            // weight is a different checkpoint, not a malformed one).
            let d = rng.random_range(1..64);
            if rng.random_bool(0.5) {
                data.truncate(data.len() - d.min(data.len()));
                (0, format!("cut {d} data bytes"))
            } else {
                data.extend(std::iter::repeat_n(0u8, d));
                (0, format!("append {d} data bytes"))
            }
        }
        _ => {
            t["data_offsets"] = serde_json::json!(["0", 4]);
            (0, format!("{key}: offsets not numbers"))
        }
    }
}

/// Opens `dir` and checks the invariant against the original tensors and logits.
fn check_mutant(dir: &Path, original: &Tensors, logits: &[f32], tokens: &[u32], what: &str) {
    let opened = catch_unwind(AssertUnwindSafe(|| Checkpoint::open(dir)));
    let ck = match opened {
        Err(_) => panic!("{what}: panic while opening"),
        Ok(Err(e)) => {
            let m = e.to_string();
            assert!(
                m.contains(".safetensors")
                    || m.contains(".json")
                    || m.contains(&dir.display().to_string()),
                "{what}: error names no file: {m}"
            );
            return;
        }
        Ok(Ok(ck)) => ck,
    };
    if &tensors(&ck) == original {
        return;
    }
    // Different tensors loaded: the engine must refuse them or compute the same numbers.
    let run = catch_unwind(AssertUnwindSafe(|| {
        moe_harness::engine::Engine::open(dir, candle_core::Device::Cpu, Default::default())
            .and_then(|mut e| e.logits(tokens))
    }));
    match run {
        Err(_) => panic!("{what}: panic in the engine"),
        Ok(Err(_)) => {}
        Ok(Ok((got, _))) => {
            let got: Vec<f32> = got.into_iter().flatten().collect();
            assert!(
                got.iter()
                    .zip(logits)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what}: a mutant loaded and changed the logits"
            );
        }
    }
}

fn reference_logits(dir: &Path, tokens: &[u32]) -> Vec<f32> {
    let mut e =
        moe_harness::engine::Engine::open(dir, candle_core::Device::Cpu, Default::default())
            .unwrap();
    e.logits(tokens).unwrap().0.into_iter().flatten().collect()
}

#[test]
fn safetensors_header_mutants_load_the_same_tensors_or_fail_cleanly() {
    let name = "mixtral-f32";
    let src = fixture(name);
    let tokens = Reference::load(&src).tokens();
    let original = tensors(&Checkpoint::open(&src).unwrap());
    let logits = reference_logits(&src, &tokens);
    let d = copy_fixture(name);
    let path = d.path().join("model.safetensors");
    let (header, _, data) = split_safetensors(&path);
    let mut rng = StdRng::seed_from_u64(0x5afe);
    let mut refused = 0;
    for case in 0..cases() {
        let (mut h, mut dt) = (header.clone(), data.clone());
        let mut what = Vec::new();
        let mut delta = 0;
        for _ in 0..rng.random_range(1..=2) {
            let len = dt.len();
            let (dl, w) = mutate_header(&mut rng, &mut h, &mut dt);
            if dt.len() != len && dt.len() != data.len() {
                // One change of the data length per mutant (two could restore it).
                what.push(w);
                delta += dl;
                break;
            }
            delta += dl;
            what.push(w);
        }
        write_safetensors(&path, &h, &dt, delta);
        let what = format!("case {case}: {}", what.join(", "));
        check_mutant(d.path(), &original, &logits, &tokens, &what);
        refused += Checkpoint::open(d.path()).is_err() as usize;
    }
    assert!(
        refused > cases() / 2,
        "only {refused} mutants refused: the mutator is too gentle"
    );
}

#[test]
fn raw_byte_mutants_of_a_header_fail_cleanly() {
    let name = "qwen3_moe-f32";
    let src = fixture(name);
    let tokens = Reference::load(&src).tokens();
    let original = tensors(&Checkpoint::open(&src).unwrap());
    let logits = reference_logits(&src, &tokens);
    let d = copy_fixture(name);
    let path = d.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut rng = StdRng::seed_from_u64(0xb17e);
    for case in 0..cases() {
        let mut b = bytes.clone();
        for _ in 0..rng.random_range(1..=3) {
            let i = rng.random_range(0..8 + n);
            b[i] = rng.random();
        }
        std::fs::write(&path, &b).unwrap();
        check_mutant(
            d.path(),
            &original,
            &logits,
            &tokens,
            &format!("byte case {case}"),
        );
    }
}

#[test]
fn index_mutants_load_the_same_tensors_or_fail_cleanly() {
    let name = "glm4_moe-f32-sharded";
    let src = fixture(name);
    let tokens = Reference::load(&src).tokens();
    let original = tensors(&Checkpoint::open(&src).unwrap());
    let logits = reference_logits(&src, &tokens);
    let d = copy_fixture(name);
    let path = d.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let index: serde_json::Value = serde_json::from_str(&text).unwrap();
    let keys: Vec<String> = index["weight_map"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let shards: Vec<String> = {
        let mut s: Vec<String> = index["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        s.sort();
        s.dedup();
        s
    };
    let mut rng = StdRng::seed_from_u64(0x1de);
    for case in 0..cases() {
        let mut v = index.clone();
        let key = &keys[rng.random_range(0..keys.len())];
        let what = match rng.random_range(0..8) {
            0 => {
                v["weight_map"][key] = serde_json::json!(shards[rng.random_range(0..shards.len())]);
                "move a key to another shard".to_string()
            }
            1 => {
                v["weight_map"].as_object_mut().unwrap().remove(key);
                "drop a key".into()
            }
            2 => {
                v["weight_map"][format!("{key}.extra")] = v["weight_map"][key].clone();
                "add a key no shard holds".into()
            }
            3 => {
                v["weight_map"][key] = serde_json::json!("../model-00001-of-00004.safetensors");
                "a path outside the directory".into()
            }
            4 => {
                v["weight_map"][key] = serde_json::json!(7);
                "a non-string file".into()
            }
            5 => {
                v["weight_map"] = serde_json::json!([]);
                "weight_map not an object".into()
            }
            6 => {
                v["weight_map"][key] = serde_json::json!("model-99999-of-00004.safetensors");
                "a shard that does not exist".into()
            }
            _ => {
                let mut t = serde_json::to_vec(&v).unwrap();
                let i = rng.random_range(0..t.len());
                t[i] = rng.random();
                std::fs::write(&path, &t).unwrap();
                check_mutant(
                    d.path(),
                    &original,
                    &logits,
                    &tokens,
                    &format!("index case {case}: byte flip"),
                );
                continue;
            }
        };
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        check_mutant(
            d.path(),
            &original,
            &logits,
            &tokens,
            &format!("index case {case}: {what}"),
        );
    }
}

#[test]
fn trace_mutants_read_into_valid_rows_or_fail_cleanly() {
    use polars::prelude::*;
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("t.parquet");
    let rows = moe_harness::synth::synthetic_trace(3, 40, &[1, 2, 3], 16, 4, 1.0, 0.3);
    moe_harness::trace::write(
        &path,
        &[moe_harness::trace::CellTrace {
            cell: "c".into(),
            rows,
        }],
    )
    .unwrap();
    let base = moe_harness::trace::read_frame(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let n = base.height();
    let mut rng = StdRng::seed_from_u64(0x7ace);
    let mutant = d.path().join("m.parquet");
    for case in 0..cases() {
        let mut df = base.clone();
        let col = [
            "prompt",
            "step",
            "pos",
            "layer",
            "experts",
            "lookahead",
            "phase",
            "hits",
        ][rng.random_range(0..8)];
        let what = match rng.random_range(0..7) {
            0 => {
                let c = df.column(col).unwrap().cast(&DataType::Float64);
                match c {
                    Ok(c) => {
                        df.replace(col, c).unwrap();
                    }
                    Err(_) => continue,
                }
                format!("{col} as floats")
            }
            1 => {
                let c = df.column(col).unwrap().cast(&DataType::String);
                match c {
                    Ok(c) => {
                        df.replace(col, c).unwrap();
                    }
                    Err(_) => continue,
                }
                format!("{col} as strings")
            }
            2 => {
                let mask: Vec<bool> = (0..n).map(|_| rng.random_bool(0.9)).collect();
                let m = BooleanChunked::new("m".into(), mask);
                let c = df.column(col).unwrap().as_materialized_series().clone();
                let nulls = Series::full_null(col.into(), n, c.dtype());
                let s = c.zip_with(&m, &nulls).unwrap();
                df.replace(col, s.into()).unwrap();
                format!("nulls in {col}")
            }
            3 => {
                let _ = df.drop_in_place(col);
                format!("drop {col}")
            }
            4 => {
                // Experts: one row gets an out-of-range or duplicated id, or an empty list.
                let i = rng.random_range(0..n);
                let kind = rng.random_range(0..3);
                let mut b = ListPrimitiveChunkedBuilder::<Int64Type>::new(
                    "experts".into(),
                    n,
                    n * 4,
                    DataType::Int64,
                );
                let ex = df.column("experts").unwrap().list().unwrap().clone();
                for (r, cell) in ex.series_iter().enumerate() {
                    let mut v: Vec<i64> = cell
                        .unwrap()
                        .cast(&DataType::Int64)
                        .unwrap()
                        .i64()
                        .unwrap()
                        .into_no_null_iter()
                        .collect();
                    if r == i {
                        match kind {
                            0 => v[0] = [1i64 << 40, -1, 1 << 20][rng.random_range(0..3)],
                            1 => v[1] = v[0],
                            _ => v.clear(),
                        }
                    }
                    b.append_slice(&v);
                }
                df.replace("experts", b.finish().into_series().into())
                    .unwrap();
                format!("experts row {i} kind {kind}")
            }
            5 => {
                let v: Vec<i64> = (0..n)
                    .map(|_| [0i64, 1, 2, 3, -1, 1 << 33, u32::MAX as i64][rng.random_range(0..7)])
                    .collect();
                df.replace("layer", Column::new("layer".into(), v)).unwrap();
                "layer ids".into()
            }
            _ => {
                let mut b = bytes.clone();
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(0..b.len());
                    b[i] = rng.random();
                }
                std::fs::write(&mutant, &b).unwrap();
                check_trace(&mutant, &format!("trace case {case}: byte flips"));
                continue;
            }
        };
        moe_harness::trace::write_frame(&mutant, &mut df).unwrap();
        check_trace(&mutant, &format!("trace case {case}: {what}"));
    }
}

fn check_trace(path: &Path, what: &str) {
    let read = catch_unwind(AssertUnwindSafe(|| moe_harness::trace::read(path)));
    match read {
        Err(_) => panic!("{what}: panic while reading"),
        Ok(Err(e)) => {
            let m = e.to_string();
            assert!(m.contains("m.parquet"), "{what}: error names no file: {m}");
        }
        Ok(Ok(cells)) => {
            for c in &cells {
                for r in &c.rows {
                    let mut e = r.experts.clone();
                    e.sort_unstable();
                    e.dedup();
                    assert!(
                        !r.experts.is_empty()
                            && e.len() == r.experts.len()
                            && r.experts
                                .iter()
                                .all(|&x| x < moe_harness::experts::MAX_EXPERT_ID)
                            && r.layer < moe_harness::experts::MAX_LAYER_ID,
                        "{what}: read an invalid row {r:?}"
                    );
                }
                let layers: Vec<u32> = {
                    let mut l: Vec<u32> = c.rows.iter().map(|r| r.layer).collect();
                    l.sort_unstable();
                    l.dedup();
                    l
                };
                let sim = moe_harness::simulate::Simulation::new(
                    moe_harness::experts::policies::PolicySpec::Lru,
                    moe_harness::experts::budget::Budget::SlotsPerLayer(8),
                    &layers,
                );
                let r = catch_unwind(AssertUnwindSafe(|| {
                    moe_harness::simulate::simulate(&c.rows, &sim, |_| 1)
                }));
                assert!(r.is_ok(), "{what}: panic in the replay");
            }
        }
    }
}
