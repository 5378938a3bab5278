//! `harness trace import`: files in each engine's published format (tests/fixtures/traces, made by
//! scripts/make_trace_fixtures.py from each format's definition) import into exactly the rows
//! the generator expects, replay under every policy, and feed `harness bench --replay`; bad files
//! are refused naming file, record and field, leaving no output behind.

use std::path::{Path, PathBuf};

use candle_core::Device;
use moe_harness::experts::budget::Pool;
use moe_harness::experts::policies::PolicySpec;
use moe_harness::simulate::{study, TraceStudy};

use crate::common::{fixture, harness_in};

fn harness(args: &[&str]) -> (i32, String, String) {
    harness_in(None, args)
}

fn traces() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/traces")
}

fn format_of(file: &str) -> &'static str {
    match file {
        f if f.starts_with("vllm") => "vllm",
        f if f.starts_with("expert_distribution") => "sglang",
        f if f.starts_with("router_trace") => "megatron",
        f if f.ends_with(".csv") => "llama.cpp",
        _ => "moe-infinity",
    }
}

fn config() -> String {
    fixture("deepseek_v3-f32")
        .join("config.json")
        .display()
        .to_string()
}

fn import(out: &Path, format: &str, files: &[&Path], extra: &[&str]) -> (i32, String) {
    let mut args = vec![
        "trace",
        "import",
        "--from",
        format,
        "--out",
        out.to_str().unwrap(),
    ];
    for f in files {
        args.push(f.to_str().unwrap());
    }
    args.extend(extra);
    let (code, _, err) = harness(&args);
    (code, err)
}

type Expected = (u32, u32, u32, String, u32, Vec<u32>);

#[test]
fn every_format_imports_into_the_expected_rows_and_replays() {
    let exp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(traces().join("expected.json")).unwrap())
            .unwrap();
    let d = tempfile::tempdir().unwrap();
    let cfg = config();
    let mut formats = std::collections::BTreeSet::new();
    for (file, rows) in exp["rows"].as_object().unwrap() {
        let format = format_of(file);
        formats.insert(format);
        let out = d.path().join(format!("{file}.parquet"));
        let (code, err) = import(&out, format, &[&traces().join(file)], &["--config", &cfg]);
        assert_eq!(code, 0, "{file}: {err}");
        let want: Vec<Expected> = serde_json::from_value(rows.clone()).unwrap();
        let cells = moe_harness::trace::read(&out).unwrap();
        assert_eq!(cells.len(), 1);
        let got: Vec<Expected> = cells[0]
            .rows
            .iter()
            .map(|r| {
                (
                    r.prompt,
                    r.step,
                    r.pos,
                    r.phase.to_string(),
                    r.layer,
                    r.experts.clone(),
                )
            })
            .collect();
        assert_eq!(got, want, "{file}");
        // Provenance travels with the file.
        let f = moe_harness::trace::TraceFile::open(&out).unwrap();
        let kv = f.key_values();
        let has = |k: &str, v: &str| kv.iter().any(|(a, b)| a == k && b.contains(v));
        assert!(has("moe_harness.format", format), "{kv:?}");
        assert!(has("moe_harness.files", file), "{kv:?}");
        assert!(has("moe_harness.model", "deepseek_v3-f32"), "{kv:?}");
        // Every policy replays it (order-free ones only for an aggregate trace).
        let aggregate = format == "moe-infinity";
        let policies = if aggregate {
            vec!["static-2"]
        } else {
            vec![
                "lru",
                "lfu",
                "lcp",
                "lfu-decay",
                "lookahead",
                "belady",
                "static-2",
            ]
        };
        let s = TraceStudy {
            trace: out.clone(),
            cell: None,
            policies: policies
                .iter()
                .map(|p| PolicySpec::parse(p).unwrap())
                .collect(),
            capacities: vec![5, 8],
            budgets: vec![],
            pool: Pool::Global,
            model: Some(fixture("deepseek_v3-f32")),
            expert_bytes: None,
            warmup_prompts: 0,
            reset_per_prompt: false,
            classic: false,
            miss: moe_harness::experts::miss::MissMode::Load,
        };
        let (res, _) = study(&s).unwrap_or_else(|e| panic!("{file}: {e}"));
        let accesses: u64 = want.iter().map(|r| r.5.len() as u64).sum();
        for r in &res {
            assert_eq!(r.accesses, accesses, "{file} {}", r.policy);
        }
        if aggregate {
            let mut s = s.clone();
            s.policies = vec![PolicySpec::Lru];
            let e = study(&s).unwrap_err().to_string();
            assert!(e.contains("aggregate") && e.contains("lru"), "{e}");
        }
    }
    assert_eq!(formats.len(), 5, "{formats:?}");
}

#[test]
fn an_imported_trace_drives_bench_replay() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("vllm.parquet");
    let files = [traces().join("vllm_v022.json"), traces().join("vllm.npz")];
    let (code, err) = import(
        &out,
        "vllm",
        &[&files[0], &files[1]],
        &["--model", fixture("deepseek_v3-f32").to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
    let mut o = crate::bench::opts();
    o.policies = vec![PolicySpec::Lru];
    o.capacities = vec![2];
    o.load_threads = Some(0);
    o.resident = false;
    o.replay = Some((out.clone(), None));
    let r =
        moe_harness::bench::bench(&fixture("deepseek_v3-f32"), Device::Cpu, &o, |_| {}).unwrap();
    assert!(r.routing.contains("replay"), "{}", r.routing);
    // The measured prompt is the .npz request: 2 prompt tokens, 3 decode steps.
    assert_eq!(r.rows[0].decode_tokens, 3);
}

#[test]
fn bad_imports_name_file_record_and_field_and_leave_nothing() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("t.parquet");
    let cfg = config();
    let write = |name: &str, text: &str| {
        let p = d.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let check = |format: &str, file: &Path, extra: &[&str], needles: &[&str]| {
        let (code, err) = import(&out, format, &[file], extra);
        assert_ne!(code, 0, "{format} {}: {err}", file.display());
        for n in needles {
            assert!(err.contains(n), "{format}: `{n}` not in: {err}");
        }
        assert!(!out.exists(), "{format}: output left behind");
        let leftovers = std::fs::read_dir(d.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".tmp")
            })
            .count();
        assert_eq!(leftovers, 0, "{format}: temp file left behind");
    };
    // Unknown format: the error lists the supported ones.
    let csv = traces().join("moe_trace.csv");
    check(
        "deepspeed",
        &csv,
        &[],
        &[
            "deepspeed",
            "vllm, sglang, megatron, llama.cpp, moe-infinity",
        ],
    );
    // A file of the wrong format.
    check("sglang", &csv, &[], &["moe_trace.csv", "torch.save"]);
    check("megatron", &csv, &[], &["moe_trace.csv", "line 1", "JSON"]);
    // A truncated pickle.
    let pt =
        std::fs::read(traces().join("expert_distribution_recorder_1780000000.0_0.pt")).unwrap();
    let cut = d.path().join("cut.pt");
    std::fs::write(&cut, &pt[..pt.len() / 2]).unwrap();
    check("sglang", &cut, &[], &["cut.pt"]);
    // Ids beyond the model's expert count.
    let big = write(
        "big.jsonl",
        r#"{"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 1, "rank": 0, "num_tokens": 1, "topk": 2, "top_indices": [[3, 9]]}"#,
    );
    check(
        "megatron",
        &big,
        &["--config", &cfg],
        &["big.jsonl", "line 1", "expert 9", "8 routed experts"],
    );
    // Top-k that varies within a layer.
    let vary = write(
        "vary.jsonl",
        "{\"step\": 0, \"stage\": \"pre_dispatch\", \"block\": \"decoder\", \"layer\": 1, \"rank\": 0, \"num_tokens\": 1, \"topk\": 2, \"top_indices\": [[3, 4]]}\n{\"step\": 1, \"stage\": \"pre_dispatch\", \"block\": \"decoder\", \"layer\": 1, \"rank\": 0, \"num_tokens\": 1, \"topk\": 3, \"top_indices\": [[3, 4, 5]]}\n",
    );
    check(
        "megatron",
        &vary,
        &[],
        &["vary.jsonl", "line 2", "top-k varies"],
    );
    // Layers missing from some tokens.
    let gap = write(
        "gap.jsonl",
        "{\"step\": 0, \"stage\": \"pre_dispatch\", \"block\": \"decoder\", \"layer\": 1, \"rank\": 0, \"num_tokens\": 1, \"topk\": 2, \"top_indices\": [[3, 4]]}\n{\"step\": 0, \"stage\": \"pre_dispatch\", \"block\": \"decoder\", \"layer\": 2, \"rank\": 0, \"num_tokens\": 1, \"topk\": 2, \"top_indices\": [[1, 4]]}\n{\"step\": 1, \"stage\": \"pre_dispatch\", \"block\": \"decoder\", \"layer\": 1, \"rank\": 0, \"num_tokens\": 1, \"topk\": 2, \"top_indices\": [[3, 5]]}\n",
    );
    check(
        "megatron",
        &gap,
        &[],
        &["gap.jsonl", "line 3", "1 of the trace's 2", "missing"],
    );
    // A record missing a field, a corrupt line.
    let nofield = write(
        "nofield.jsonl",
        r#"{"step": 0, "block": "decoder", "layer": 1}"#,
    );
    check(
        "megatron",
        &nofield,
        &[],
        &["nofield.jsonl", "line 1", "`num_tokens`"],
    );
    let corrupt = write("corrupt.jsonl", "{\"step\": 0, \"layer\": ");
    check(
        "megatron",
        &corrupt,
        &[],
        &["corrupt.jsonl", "line 1", "not a JSON record"],
    );
    // A CSV line that is not a pair of integers.
    let badcsv = write("bad.csv", "1,3\n1,x\n");
    check(
        "llama.cpp",
        &badcsv,
        &[],
        &["bad.csv", "line 2", "layer,expert"],
    );
    // A vLLM response without routing.
    let noroute = write(
        "noroute.json",
        r#"{"choices": [{"index": 0, "text": "x"}], "usage": {"prompt_tokens": 1}}"#,
    );
    check(
        "vllm",
        &noroute,
        &[],
        &[
            "noroute.json",
            "choices[0].routed_experts",
            "--enable-return-routed-experts",
        ],
    );
    // An activation matrix of the wrong rank.
    check(
        "moe-infinity",
        &traces().join("vllm.npz"),
        &[],
        &["vllm.npz"],
    );
}
