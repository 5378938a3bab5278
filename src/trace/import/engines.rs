//! Serving engines' routing records: vLLM's routed-experts output and SGLang's expert
//! distribution recorder.

use std::path::Path;

use base64::Engine as _;

use super::npy::{self, Array};
use super::torch::{self, Value};
use super::{id, Row, Sink};
use crate::error::{Error, Result};
use crate::experts::Phase;

/// Rows of one vLLM request: `prompt` rows (prefill, layer-major as a prefill pass runs) and
/// `gen` rows (decode, token by token), arrays `[tokens, layers, top_k]`. A token whose every
/// entry is padding (prefix-cache hits) or a (token, layer) whose entries are all equal with
/// top_k ≥ 2 (a layer vLLM leaves unwritten, e.g. a dense one) is not routing and is skipped.
fn vllm_request(
    sink: &mut Sink<'_>,
    at: &str,
    arrays: &[(&Array, Phase)],
    prompt: u32,
    token0: u64,
) -> Result<u64> {
    let mut token = token0;
    let mut pos = 0u32;
    let mut step = 0u32;
    for &(a, phase) in arrays {
        if a.shape.len() != 3 {
            return Err(Error::format(
                &sink.file,
                format!(
                    "{at}: routed experts must be [tokens, layers, top_k], got shape {:?}",
                    a.shape
                ),
            ));
        }
        let (t, l, k) = (a.shape[0], a.shape[1], a.shape[2]);
        let cell = |ti: usize, li: usize| &a.values[(ti * l + li) * k..(ti * l + li + 1) * k];
        let routed =
            |v: &[f64]| !(v.iter().all(|&x| x < 0.0) || (k >= 2 && v.iter().all(|&x| x == v[0])));
        let live: Vec<bool> = (0..t)
            .map(|ti| (0..l).any(|li| routed(cell(ti, li))))
            .collect();
        let emit = |sink: &mut Sink<'_>, ti: usize, li: usize, pos: u32, step: u32| -> Result<()> {
            let v = cell(ti, li);
            let layer = sink.layer(li, l);
            if !routed(v) || sink.dense(layer) {
                return Ok(());
            }
            let where_ = format!("{at}, token {ti}, layer {li}");
            let experts = v
                .iter()
                .map(|&x| id(&sink.file, &where_, x))
                .collect::<Result<Option<Vec<u32>>>>()?
                .ok_or_else(|| {
                    Error::format(
                        &sink.file,
                        format!("{where_}: a negative expert id next to real ones"),
                    )
                })?;
            sink.row(
                &where_,
                Row {
                    prompt,
                    step,
                    pos,
                    phase,
                    layer,
                    experts,
                    token: token0 + ti as u64 + if phase == Phase::Decode { 1 << 40 } else { 0 },
                },
            )
        };
        match phase {
            Phase::Prefill => {
                for li in 0..l {
                    for ti in (0..t).filter(|&ti| live[ti]) {
                        emit(sink, ti, li, pos + ti as u32, 0)?;
                    }
                }
                pos += t as u32;
            }
            Phase::Decode => {
                for (ti, &live) in live.iter().enumerate() {
                    step += 1;
                    if live {
                        for li in 0..l {
                            emit(sink, ti, li, pos, step)?;
                        }
                    }
                    pos += 1;
                }
            }
        }
        token += t as u64;
    }
    Ok(token)
}

/// A JSON routing value: nested lists `[tokens][layers][top_k]`, or a base64 `.npy` string.
fn json_array(file: &Path, at: &str, v: &serde_json::Value) -> Result<Array> {
    match v {
        serde_json::Value::String(s) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(s.trim())
                .map_err(|e| Error::format(file, format!("{at}: not base64 (.npy) data: {e}")))?;
            npy::parse(&file.join(at), &bytes)
        }
        serde_json::Value::Array(tokens) => {
            let mut shape = vec![tokens.len(), 0, 0];
            let mut values = Vec::new();
            for (ti, tok) in tokens.iter().enumerate() {
                let layers = tok.as_array().ok_or_else(|| {
                    Error::format(file, format!("{at}[{ti}]: expected a list of layers"))
                })?;
                if ti == 0 {
                    shape[1] = layers.len();
                }
                if layers.len() != shape[1] {
                    return Err(Error::format(
                        file,
                        format!(
                            "{at}[{ti}]: {} layers, token 0 has {}",
                            layers.len(),
                            shape[1]
                        ),
                    ));
                }
                for (li, ids) in layers.iter().enumerate() {
                    let ids = ids.as_array().ok_or_else(|| {
                        Error::format(
                            file,
                            format!("{at}[{ti}][{li}]: expected a list of expert ids"),
                        )
                    })?;
                    if ti == 0 && li == 0 {
                        shape[2] = ids.len();
                    }
                    if ids.len() != shape[2] {
                        return Err(Error::format(
                            file,
                            format!("{at}[{ti}][{li}]: layer {li}: top-k varies within the layer: {} ids, token 0 has {}", ids.len(), shape[2]),
                        ));
                    }
                    for x in ids {
                        values.push(x.as_f64().ok_or_else(|| {
                            Error::format(file, format!("{at}[{ti}][{li}]: {x} is not a number"))
                        })?);
                    }
                }
            }
            Ok(Array {
                shape,
                values,
                descr: "json".into(),
            })
        }
        other => Err(Error::format(
            file,
            format!("{at}: expected a list or a base64 string, found {other}"),
        )),
    }
}

/// One vLLM completion response (`/v1/completions` or chat, or an offline `RequestOutput`
/// serialised the same way).
fn vllm_response(
    sink: &mut Sink<'_>,
    at: &str,
    r: &serde_json::Value,
    prompt: &mut u32,
    token: &mut u64,
) -> Result<()> {
    let file = sink.file.clone();
    let choices = r.get("choices").and_then(|c| c.as_array()).ok_or_else(|| {
        Error::format(
            &file,
            format!("{at}: not a vLLM completion response (no `choices` list)"),
        )
    })?;
    let prompt_arr = match r.get("prompt_routed_experts") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(json_array(
            &file,
            &format!("{at}.prompt_routed_experts"),
            v,
        )?),
    };
    let prompt_tokens = r.pointer("/usage/prompt_tokens").and_then(|v| v.as_u64());
    for (ci, c) in choices.iter().enumerate() {
        let where_ = format!("{at}.choices[{ci}].routed_experts");
        let Some(v) = c.get("routed_experts").filter(|v| !v.is_null()) else {
            return Err(Error::format(
                &file,
                format!("{where_}: missing (start vLLM with --enable-return-routed-experts)"),
            ));
        };
        let gen = json_array(&file, &where_, v)?;
        let arrays: Vec<(Array, Phase)> = match (&prompt_arr, prompt_tokens) {
            // v0.21: prompt and generated tokens apart.
            (Some(p), _) => vec![(p.clone(), Phase::Prefill), (gen, Phase::Decode)],
            // v0.22+: one array over prompt + output; the prompt is its first rows.
            (None, Some(n)) if v.is_string() => {
                let n = (n as usize).min(gen.shape[0]);
                split(&gen, n)
            }
            (None, _) => vec![(gen, Phase::Decode)],
        };
        let refs: Vec<(&Array, Phase)> = arrays.iter().map(|(a, p)| (a, *p)).collect();
        *token = vllm_request(sink, &where_, &refs, *prompt, *token)?;
        *prompt += 1;
    }
    Ok(())
}

/// The first `n` tokens of `a` as prefill, the rest as decode.
fn split(a: &Array, n: usize) -> Vec<(Array, Phase)> {
    let per = a.shape[1] * a.shape[2];
    let part = |from: usize, to: usize| Array {
        shape: vec![to - from, a.shape[1], a.shape[2]],
        values: a.values[from * per..to * per].to_vec(),
        descr: a.descr.clone(),
    };
    vec![
        (part(0, n), Phase::Prefill),
        (part(n, a.shape[0]), Phase::Decode),
    ]
}

/// vLLM: a JSON response (or a list / JSONL of them), an `.npz` with `prompt_routed_experts`
/// and `routed_experts`, or a bare `.npy`. Returns the next prompt and token numbers.
pub(crate) fn vllm(
    sink: &mut Sink<'_>,
    file: &Path,
    prompt: u32,
    token: u64,
) -> Result<(u32, u64)> {
    let (mut prompt, mut token) = (prompt, token);
    let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "npy" => {
            let a = npy::read(file)?;
            token = vllm_request(sink, "array", &[(&a, Phase::Decode)], prompt, token)?;
            prompt += 1;
        }
        "npz" => {
            let members = npy::read_npz(file)?;
            let get = |n: &str| members.iter().find(|(k, _)| k == n).map(|(_, a)| a);
            let gen = get("routed_experts").ok_or_else(|| {
                Error::format(file, "no `routed_experts` array in the archive (expected np.savez(f, prompt_routed_experts=…, routed_experts=…))")
            })?;
            let mut arrays = Vec::new();
            if let Some(p) = get("prompt_routed_experts") {
                arrays.push((p, Phase::Prefill));
            }
            arrays.push((gen, Phase::Decode));
            token = vllm_request(sink, "archive", &arrays, prompt, token)?;
            prompt += 1;
        }
        _ => {
            let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
            let docs: Vec<(String, serde_json::Value)> =
                match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(serde_json::Value::Array(v)) => v
                        .into_iter()
                        .enumerate()
                        .map(|(i, r)| (format!("response {i}"), r))
                        .collect(),
                    Ok(v) => vec![("response".to_string(), v)],
                    Err(_) => text
                        .lines()
                        .enumerate()
                        .filter(|(_, l)| !l.trim().is_empty())
                        .map(|(i, l)| {
                            serde_json::from_str(l)
                                .map(|v| (format!("line {}", i + 1), v))
                                .map_err(|e| {
                                    Error::format(file, format!("line {}: not JSON: {e}", i + 1))
                                })
                        })
                        .collect::<Result<_>>()?,
                };
            for (at, r) in &docs {
                vllm_response(sink, at, r, &mut prompt, &mut token)?;
            }
        }
    }
    Ok((prompt, token))
}

fn int_list(file: &Path, at: &str, v: Option<&Value>, key: &str) -> Result<Vec<i64>> {
    match v {
        Some(Value::List(l)) => l
            .iter()
            .map(|x| match x {
                Value::Int(i) => Ok(*i),
                other => Err(Error::format(file, format!("{at}: `{key}` holds a {}, not ints", other.kind()))),
            })
            .collect(),
        Some(Value::Tensor(_, v)) => Ok(v.clone()),
        Some(other) => Err(Error::format(file, format!("{at}: `{key}` is a {}, not a list of ints", other.kind()))),
        None => Err(Error::format(file, format!("{at}: no `{key}` (not a per_token dump? start SGLang with --expert-distribution-recorder-mode per_token)"))),
    }
}

/// SGLang `per_token` dump: `{records: [...], last_physical_to_logical_map}`. Each forward
/// pass is one prompt; its rows run layer by layer; physical expert ids are mapped to logical
/// ones; `-1` entries (top-k below 8, padding, dense layers) are dropped.
pub(crate) fn sglang(
    sink: &mut Sink<'_>,
    file: &Path,
    prompt: u32,
    token: u64,
) -> Result<(u32, u64)> {
    let (mut prompt, mut token) = (prompt, token);
    let root = torch::load(file)?;
    let records = match root.get("records") {
        Some(Value::List(r)) => r,
        _ => {
            return Err(Error::format(
                file,
                "not an SGLang expert-distribution dump: no `records` list (stat-mode dumps hold counts only; record with --expert-distribution-recorder-mode per_token)",
            ))
        }
    };
    let map = match root.get("last_physical_to_logical_map") {
        Some(Value::Tensor(s, v)) if s.len() == 2 => Some((s[1], v.clone())),
        _ => None,
    };
    for (ri, rec) in records.iter().enumerate() {
        let at = format!("record {ri}");
        let mode = match rec.get("forward_mode") {
            Some(Value::Int(m)) => *m,
            _ => {
                return Err(Error::format(
                    file,
                    format!("{at}: no integer `forward_mode`"),
                ))
            }
        };
        let (shape, ids) = match rec.get("topk_ids_of_layer") {
            Some(Value::Tensor(s, v)) if s.len() == 3 => (s.clone(), v),
            Some(other) => return Err(Error::format(file, format!("{at}: `topk_ids_of_layer` must be a [layers, tokens, k] tensor, found a {}", other.kind()))),
            None => return Err(Error::format(file, format!("{at}: no `topk_ids_of_layer` (per_pass dumps hold counts only; record with --expert-distribution-recorder-mode per_token)"))),
        };
        let (l, t, k) = (shape[0], shape[1], shape[2]);
        let positions = int_list(file, &at, rec.get("positions"), "positions")?;
        if positions.len() != t {
            return Err(Error::format(
                file,
                format!("{at}: {} positions for {t} tokens", positions.len()),
            ));
        }
        // Per token: prefill or decode. EXTEND (1) and draft/verify passes (≥ 5) are
        // multi-token; DECODE (2) one token per request; MIXED (3): requests of one token
        // after position 0 are decoding.
        let lens = match rec.get("extend_seq_lens") {
            Some(Value::None) | None => None,
            v => Some(int_list(file, &at, v, "extend_seq_lens")?),
        };
        let mut phase = vec![
            if mode == 2 {
                Phase::Decode
            } else {
                Phase::Prefill
            };
            t
        ];
        if mode == 3 {
            if let Some(lens) = &lens {
                let mut i = 0usize;
                for &n in lens {
                    let n = n.max(0) as usize;
                    for p in phase.iter_mut().skip(i).take(n) {
                        *p = if n == 1 && positions[i] > 0 {
                            Phase::Decode
                        } else {
                            Phase::Prefill
                        };
                    }
                    i += n;
                }
            }
        }
        if mode == 4 || t == 0 {
            continue;
        }
        for li in 0..l {
            for ti in 0..t {
                let raw = &ids[(li * t + ti) * k..(li * t + ti + 1) * k];
                let mut experts = Vec::with_capacity(k);
                for &p in raw.iter().filter(|&&p| p >= 0) {
                    let logical = match &map {
                        Some((np, m)) => {
                            let p = p as usize;
                            if p >= *np {
                                return Err(Error::format(file, format!("{at}, layer {li}, token {ti}: physical expert {p} beyond the map's {np}")));
                            }
                            m[li * np + p]
                        }
                        None => p,
                    };
                    let w = format!("{at}, layer {li}, token {ti}");
                    if let Some(e) = id(file, &w, logical as f64)? {
                        experts.push(e);
                    }
                }
                if experts.is_empty() || sink.dense(li as u32) {
                    continue;
                }
                let ph = phase[ti];
                sink.row(
                    &format!(
                        "{at} (forward pass {}), layer {li}, token {ti}",
                        match rec.get("forward_pass_id") {
                            Some(Value::Int(i)) => i.to_string(),
                            _ => "?".into(),
                        }
                    ),
                    Row {
                        prompt,
                        step: (ph == Phase::Decode) as u32,
                        pos: positions[ti].max(0) as u32,
                        phase: ph,
                        layer: li as u32,
                        experts,
                        token: token + ti as u64,
                    },
                )?;
            }
        }
        token += t as u64;
        prompt += 1;
    }
    Ok((prompt, token))
}
