//! What a hostile test pass found (issue 11), one test per finding: each failed on the code
//! before the fix. Malformed safetensors headers, prompts beyond the context, absurd trace ids,
//! two runs on one results directory, silent no-ops, and `--device` being read.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{copy_fixture, fixture, Reference};

fn harness(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "panic: {err}");
    (out.status.code().unwrap_or(-1), err)
}

/// Header JSON, declared header length and data bytes of a single-file checkpoint.
pub fn split_safetensors(path: &Path) -> (serde_json::Value, usize, Vec<u8>) {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&b[8..8 + n]).unwrap();
    (header, n, b[8 + n..].to_vec())
}

/// Writes a safetensors file from header JSON and data, with the header length field set to the
/// JSON's length plus `len_delta`.
pub fn write_safetensors(path: &Path, header: &serde_json::Value, data: &[u8], len_delta: i64) {
    let mut h = serde_json::to_vec(header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let n = (h.len() as i64 + len_delta) as u64;
    let mut out = n.to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

/// The (key, begin, end) of every tensor of a header, by begin.
fn spans(header: &serde_json::Value) -> Vec<(String, u64, u64)> {
    let mut v: Vec<_> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, t)| {
            let o = t["data_offsets"].as_array().unwrap();
            (k.clone(), o[0].as_u64().unwrap(), o[1].as_u64().unwrap())
        })
        .collect();
    v.sort_by_key(|s| s.1);
    v
}

fn set_offsets(header: &mut serde_json::Value, key: &str, b: u64, e: u64) {
    header[key]["data_offsets"] = serde_json::json!([b, e]);
}

/// Opening fails and the message names the shard (no silent load of shifted bytes).
fn refused(dir: &Path, what: &str) -> String {
    match moe_harness::weights::Checkpoint::open(dir) {
        Ok(_) => panic!("{what}: a malformed header was accepted"),
        Err(e) => {
            let m = e.to_string();
            assert!(m.contains("model.safetensors"), "{what}: {m}");
            m
        }
    }
}

#[test]
fn malformed_headers_are_refused_not_misread() {
    let d = copy_fixture("qwen3_moe-f32");
    let path = d.path().join("model.safetensors");
    let (header, n, data) = split_safetensors(&path);
    let s = spans(&header);
    let (k1, b1, e1) = s[1].clone();
    let (k2, b2, e2) = s[2].clone();

    // Two tensors whose byte ranges overlap: the second starts inside the first.
    let mut h = header.clone();
    let shift = (e1 - b1).min(8);
    set_offsets(&mut h, &k2, b2 - shift, e2 - shift);
    write_safetensors(&path, &h, &data, 0);
    let m = refused(d.path(), "overlap");
    assert!(m.contains(&k2) || m.contains(&k1), "overlap not named: {m}");

    // A gap between two tensors (the ranges after it shifted by the same amount).
    let mut h = header.clone();
    for (k, b, e) in &s[2..] {
        set_offsets(&mut h, k, b + 4, e + 4);
    }
    let mut more = data.clone();
    more.extend_from_slice(&[0; 4]);
    write_safetensors(&path, &h, &more, 0);
    let m = refused(d.path(), "gap");
    assert!(m.contains("gap") && m.contains(&k2), "{m}");

    // The header length shortened by one byte: every offset now points one byte early.
    write_safetensors(&path, &header, &data, -1);
    refused(d.path(), "short header length");

    // Trailing bytes the header does not account for.
    let mut more = data.clone();
    more.extend_from_slice(&[0; 8]);
    write_safetensors(&path, &header, &more, 0);
    refused(d.path(), "trailing bytes");

    // The original still loads (the helpers above write valid files when asked to).
    write_safetensors(&path, &header, &data, 0);
    moe_harness::weights::Checkpoint::open(d.path()).unwrap();
    let _ = n;
}

fn write_run(dir: &Path, prompts: &str, extra: &str) -> PathBuf {
    let model = fixture("glm4_moe-mlx4");
    std::fs::write(dir.join("prompts.txt"), prompts).unwrap();
    let body = format!(
        "name = \"t\"\n[model]\npath = \"{}\"\n[cache]\ncapacity = 4\n[prompts]\nfile = \"prompts.txt\"\n{extra}\n[generation]\nmax_new_tokens = 4\n[output]\ndir = \"out\"\n",
        model.display()
    );
    let p = dir.join("exp.toml");
    std::fs::write(&p, body).unwrap();
    p
}

fn leftovers(dir: &Path) -> Vec<String> {
    let exp = dir.join("out/t");
    std::fs::read_dir(&exp)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".lock"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_prompt_beyond_the_context_is_refused_before_any_cell_or_truncated_on_request() {
    let d = tempfile::tempdir().unwrap();
    // The fixture's context is 4096 tokens; its tokenizer is byte-level: line 2 is 5000 tokens.
    let long = "x".repeat(5000);
    let f = write_run(d.path(), &format!("def f():\n{long}\nimport os\n"), "");
    let (code, err) = harness(&["run", f.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("prompts.txt:2") && err.contains("4096") && err.contains("truncate"),
        "{err}"
    );
    assert!(
        leftovers(d.path()).is_empty(),
        "nothing may be written: {:?}",
        leftovers(d.path())
    );
    // `truncate = true` keeps the last tokens that fit, and says so in env.json.
    let f = write_run(
        d.path(),
        &format!("def f():\n{long}\nimport os\n"),
        "truncate = true",
    );
    let (code, err) = harness(&["run", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let run = std::fs::read_dir(d.path().join("out/t"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap();
    let env: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("env.json")).unwrap()).unwrap();
    let t = &env["truncated_prompts"][0];
    assert!(
        t["prompt"].as_str().unwrap().ends_with("prompts.txt:2"),
        "{env}"
    );
    assert_eq!(t["kept_last"].as_u64().unwrap() + 4 - 1, 4096, "{env}");
}

#[test]
fn a_trace_with_an_absurd_layer_id_is_an_error_not_an_abort() {
    use moe_harness::experts::Phase;
    use moe_harness::trace::{CellTrace, TraceRow};
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("t.parquet");
    let row = |layer: u32| TraceRow {
        prompt: 0,
        step: 0,
        pos: 0,
        phase: Phase::Prefill,
        layer,
        experts: vec![1, 2],
        weights: vec![],
        lookahead: None,
        hits: vec![],
        load_ns: 0,
    };
    moe_harness::trace::write(
        &t,
        &[CellTrace {
            cell: String::new(),
            rows: vec![row(1), row(u32::MAX)],
        }],
    )
    .unwrap();
    let (code, err) = harness(&[
        "simulate",
        "--trace",
        t.to_str().unwrap(),
        "--capacity",
        "2",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("row 1") && err.contains("4294967295") && err.contains("out of range"),
        "{err}"
    );
    // The library refuses such a layer too (a table of 2^32 layers would be 16 GiB).
    let e = moe_harness::experts::cache::CacheCore::new(
        &moe_harness::experts::policies::PolicySpec::Lru,
        moe_harness::experts::budget::Budget::SlotsPerLayer(2),
        &[u32::MAX],
    )
    .unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
}

#[test]
fn a_second_run_on_the_same_results_dir_fails_at_once_naming_the_first() {
    let d = tempfile::tempdir().unwrap();
    let prompts: String = (0..40).map(|i| format!("def f{i}(x):\n")).collect();
    let f = write_run(d.path(), &prompts, "");
    std::fs::write(
        &f,
        std::fs::read_to_string(&f).unwrap().replace(
            "capacity = 4",
            "policy = [\"lru\", \"lfu\", \"lcp\"]\ncapacity = [4, 5, 6, 8]",
        ),
    )
    .unwrap();
    let mut first = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(["run", f.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the first run holds the lock (its pid is written into the lock file).
    let lock = d.path().join("out/t");
    let t0 = std::time::Instant::now();
    let pid = loop {
        let held = std::fs::read_dir(&lock).ok().and_then(|r| {
            r.map(|e| e.unwrap().path())
                .find(|p| p.extension().is_some_and(|x| x == "lock"))
                .and_then(|p| std::fs::read_to_string(p).ok())
                .filter(|s| !s.is_empty())
        });
        if let Some(pid) = held {
            break pid;
        }
        assert!(
            t0.elapsed().as_secs() < 60,
            "the first run never took the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let t1 = std::time::Instant::now();
    let (code, err) = harness(&["run", f.to_str().unwrap()]);
    let status = first.wait().unwrap();
    assert!(status.success());
    assert_ne!(code, 0, "the second run must not also write");
    assert!(
        err.contains("in use by pid") && err.contains(pid.trim()),
        "{err}"
    );
    assert!(
        t1.elapsed().as_secs() < 30,
        "the second run must fail at once"
    );
    // After the first finished, running again finds complete results.
    let (code, err) = harness(&["run", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("already complete"), "{err}");
}

#[test]
fn silent_no_ops_are_errors() {
    let d = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("[cache]\npolicy = []", "cache.policy", "empty list"),
        ("[cache]\ncapacity = []", "cache.capacity", "empty list"),
        ("[cache]\nmiss = []", "cache.miss", "empty list"),
        (
            "[cache]\ncapacity = -4",
            "cache.capacity",
            "positive integer",
        ),
        (
            "[cache]\ncapacity = \"four\"",
            "cache.capacity",
            "positive integer",
        ),
        ("[cache]\nmiss = \"sometimes\"", "cache.miss", "load"),
        (
            "[cache]\nbudget = \"99999999999999999999999GiB\"",
            "cache.budget",
            "2^64",
        ),
        (
            "[cache]\nbudget = \"0GiB\"",
            "cache.budget",
            "holds nothing",
        ),
        ("[prompts]\nlimit = 0", "prompts.limit", "at least 1"),
    ];
    let model = fixture("glm4_moe-mlx4");
    for (snippet, field, words) in cases {
        let (section, line) = snippet.split_once('\n').unwrap();
        let mut cache = String::from("[cache]\ncapacity = 4\n");
        let mut prompts = String::from("[prompts]\ninline = [\"a\", \"b\"]\n");
        if section == "[cache]" {
            cache = format!("[cache]\n{line}\n");
        } else {
            prompts.push_str(line);
            prompts.push('\n');
        }
        let body = format!(
            "name = \"t\"\n[model]\npath = \"{}\"\n{cache}{prompts}[output]\ndir = \"out\"\n",
            model.display()
        );
        let f = d.path().join("e.toml");
        std::fs::write(&f, body).unwrap();
        let (code, err) = harness(&["run", f.to_str().unwrap()]);
        assert_ne!(code, 0, "{snippet}: accepted");
        assert!(
            err.contains(field) && err.contains(words) && err.contains("e.toml"),
            "{snippet}: {err}"
        );
        assert!(!err.contains("untagged"), "{snippet}: {err}");
    }
}

/// Writes a one-cell trace from explicit columns (polars), for mutants the writer cannot make.
fn write_frame(path: &Path, layer: polars::prelude::Column, experts: polars::prelude::Column) {
    use polars::prelude::*;
    let n = layer.len();
    let mut df = DataFrame::new(
        n,
        vec![
            Column::new("prompt".into(), vec![0u32; n]),
            Column::new("step".into(), vec![0u32; n]),
            Column::new("pos".into(), (0..n as u32).collect::<Vec<_>>()),
            Column::new("phase".into(), vec!["prefill"; n]),
            layer,
            experts,
        ],
    )
    .unwrap();
    moe_harness::trace::write_frame(path, &mut df).unwrap();
}

#[test]
fn malformed_trace_rows_are_errors_naming_the_row() {
    use polars::prelude::*;
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("t.parquet");
    let list_u32 = |rows: Vec<Vec<u32>>| -> Column {
        let mut b = ListPrimitiveChunkedBuilder::<UInt32Type>::new(
            "experts".into(),
            2,
            8,
            DataType::UInt32,
        );
        for r in rows {
            b.append_slice(&r);
        }
        b.finish().into_series().into()
    };
    let read = |t: &Path| {
        moe_harness::trace::read(t)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    // A duplicated expert id would be replayed as two accesses (an inflated hit rate).
    write_frame(
        &t,
        Column::new("layer".into(), vec![1u32, 1]),
        list_u32(vec![vec![1, 2], vec![3, 3]]),
    );
    let m = read(&t);
    assert!(m.contains("row 1") && m.contains("twice"), "{m}");
    // An empty expert list.
    write_frame(
        &t,
        Column::new("layer".into(), vec![1u32, 1]),
        list_u32(vec![vec![1, 2], vec![]]),
    );
    let m = read(&t);
    assert!(m.contains("row 1") && m.contains("empty"), "{m}");
    // Float expert ids are refused by type, not rounded.
    let mut b =
        ListPrimitiveChunkedBuilder::<Float64Type>::new("experts".into(), 2, 8, DataType::Float64);
    b.append_slice(&[1.0, 2.0]);
    b.append_slice(&[2.7, 3.0]);
    write_frame(
        &t,
        Column::new("layer".into(), vec![1u32, 1]),
        b.finish().into_series().into(),
    );
    let m = read(&t);
    assert!(m.contains("experts") && m.contains("integers"), "{m}");
    // Negative ids stored as i64 are called negative, not "null values".
    write_frame(
        &t,
        Column::new("layer".into(), vec![1i64, -3]),
        list_u32(vec![vec![1, 2], vec![3, 4]]),
    );
    let m = read(&t);
    assert!(
        m.contains("row 1") && m.contains("negative") && m.contains("-3"),
        "{m}"
    );
    let mut b =
        ListPrimitiveChunkedBuilder::<Int64Type>::new("experts".into(), 2, 8, DataType::Int64);
    b.append_slice(&[1, 2]);
    b.append_slice(&[-5, 2]);
    write_frame(
        &t,
        Column::new("layer".into(), vec![1u32, 1]),
        b.finish().into_series().into(),
    );
    let m = read(&t);
    assert!(m.contains("row 1") && m.contains("negative"), "{m}");
}

#[test]
fn the_device_flag_is_read_and_every_output_names_its_device() {
    let dir = fixture("mixtral-f32");
    let r = Reference::load(&dir);
    let toks: Vec<String> = r.tokens().iter().map(|t| t.to_string()).collect();
    let out = tempfile::tempdir().unwrap();
    let npy = out.path().join("l.npy");
    let args = |device: &str| {
        vec![
            "logits".to_string(),
            "--model".into(),
            dir.to_str().unwrap().into(),
            "--tokens".into(),
            toks.join(","),
            "--out".into(),
            npy.to_str().unwrap().into(),
            "--device".into(),
            device.into(),
        ]
    };
    let a = args("cpu");
    let (code, err) = harness(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("device: cpu (kernels exact/")),
        "{err}"
    );
    // On a build without CUDA the flag must fail loudly (so it is provably not ignored).
    if !cfg!(feature = "cuda") {
        let _ = std::fs::remove_file(&npy);
        let a = args("cuda");
        let (code, err) = harness(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        assert_ne!(code, 0, "--device cuda ran: {err}");
        assert!(err.contains("--features cuda"), "{err}");
        assert!(!npy.exists(), "no output from a refused device");
        let (code, err) = harness(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--tokens",
            "1,2",
            "--device",
            "cuda",
        ]);
        assert_ne!(code, 0);
        assert!(err.contains("--features cuda"), "{err}");
    }
    let (code, err) = harness(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        "1,2",
        "--max-tokens",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(" on cpu (exact/") && err.contains(" threads), io page-cache]"),
        "{err}"
    );
}
