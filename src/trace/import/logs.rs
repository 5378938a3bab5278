//! Training and local-inference routing logs: Megatron-Core's router trace JSONL, llama.cpp's
//! `moe-trace` CSV, and MoE-Infinity's per-sequence expert activation counts.

use std::io::BufRead;
use std::path::Path;

use super::{id, npy, Row, Sink};
use crate::error::{Error, Result};
use crate::experts::Phase;

/// Megatron-Core `router_trace_rank{r}.jsonl`: one record per (micro-batch, router), fields
/// `step, stage, block, layer, rank, num_tokens, topk, top_indices[num_tokens][topk]`. A
/// micro-batch ends where the decoder layer stops increasing or the step changes; MTP-head
/// records (`block: "mtp"`) are not the decoder's routing and are skipped.
pub(crate) fn megatron(
    sink: &mut Sink<'_>,
    file: &Path,
    prompt: u32,
    token: u64,
) -> Result<(u32, u64)> {
    let f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    let (mut prompt, mut token) = (prompt, token);
    let mut last: Option<(i64, u32)> = None;
    let mut width = 0u64;
    let mut mtp = 0u64;
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| Error::io(file, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("line {}", i + 1);
        let bad = |m: String| Error::format(file, format!("{at}: {m}"));
        let r: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
            bad(format!(
                "not a JSON record ({e}); a Megatron router trace has one JSON object per line"
            ))
        })?;
        let field = |k: &str| {
            r.get(k)
                .ok_or_else(|| bad(format!("no `{k}` field (expected step, stage, block, layer, rank, num_tokens, topk, top_indices)")))
        };
        let uint = |k: &str| -> Result<u64> {
            field(k)?
                .as_u64()
                .ok_or_else(|| bad(format!("`{k}` must be a non-negative integer")))
        };
        if field("block")?.as_str() == Some("mtp") {
            mtp += 1;
            continue;
        }
        let step = field("step")?
            .as_i64()
            .ok_or_else(|| bad("`step` must be an integer".into()))?;
        let layer =
            u32::try_from(uint("layer")?).map_err(|_| bad("`layer` is too large".into()))?;
        let n = uint("num_tokens")? as usize;
        let k = uint("topk")? as usize;
        let rows = field("top_indices")?
            .as_array()
            .ok_or_else(|| bad("`top_indices` must be a list of per-token lists".into()))?;
        if rows.len() != n {
            return Err(bad(format!(
                "`top_indices` has {} tokens, `num_tokens` says {n}",
                rows.len()
            )));
        }
        if last.is_some_and(|(s, l)| s != step || layer <= l) {
            prompt += 1;
            token += width;
        }
        last = Some((step, layer));
        width = n as u64;
        for (t, ids) in rows.iter().enumerate() {
            let ids = ids
                .as_array()
                .ok_or_else(|| bad(format!("`top_indices`[{t}] is not a list")))?;
            if ids.len() != k {
                return Err(bad(format!(
                    "`top_indices`[{t}] has {} ids, `topk` says {k}",
                    ids.len()
                )));
            }
            let w = format!("{at}, token {t}");
            let experts = ids
                .iter()
                .map(|x| {
                    let v = x
                        .as_f64()
                        .ok_or_else(|| bad(format!("`top_indices`[{t}] holds {x}")))?;
                    id(file, &w, v)?
                        .ok_or_else(|| bad(format!("`top_indices`[{t}] holds a negative id")))
                })
                .collect::<Result<Vec<u32>>>()?;
            sink.row(
                &w,
                Row {
                    prompt,
                    step: 0,
                    pos: t as u32,
                    phase: Phase::Prefill,
                    layer,
                    experts,
                    token: token + t as u64,
                },
            )?;
        }
    }
    if mtp > 0 {
        sink.skip(format!(
            "{}: {mtp} multi-token-prediction head records",
            file.display()
        ));
    }
    Ok((prompt + last.is_some() as u32, token + width))
}

/// llama.cpp `moe-trace` CSV: `layer,expert` rows, no token column. Rows of one layer that
/// follow one another are that layer's top-k ids for the tokens of one `llama_decode` call, in
/// token order; a call ends where the layer number stops increasing. `top_k` comes from the
/// model (`--model`/`--config`) or, without one, is the smallest run of one layer in the file.
pub(crate) fn llama_cpp(
    sink: &mut Sink<'_>,
    file: &Path,
    prompt: u32,
    token: u64,
) -> Result<(u32, u64)> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let mut runs: Vec<(u32, Vec<u32>, usize)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || (i == 0 && l.eq_ignore_ascii_case("layer,expert")) {
            continue;
        }
        let bad = || {
            Error::format(
                file,
                format!("line {}: `{l}` is not a `layer,expert` pair of integers (llama.cpp moe-trace CSV)", i + 1),
            )
        };
        let (a, b) = l.split_once(',').ok_or_else(bad)?;
        let layer: u32 = a.trim().parse().map_err(|_| bad())?;
        let e: i64 = b.trim().parse().map_err(|_| bad())?;
        let e = id(file, &format!("line {}", i + 1), e as f64)?.ok_or_else(bad)?;
        match runs.last_mut() {
            Some((l0, ids, _)) if *l0 == layer => ids.push(e),
            _ => runs.push((layer, vec![e], i + 1)),
        }
    }
    let k = match sink.spec {
        Some(s) => s.moe.top_k,
        None => runs.iter().map(|r| r.1.len()).min().unwrap_or(1),
    };
    let (mut prompt_tokens, mut step, mut pos) = (0u32, 0u32, 0u32);
    let mut i = 0;
    let mut token = token;
    while i < runs.len() {
        // One llama_decode call: runs of increasing layer.
        let mut j = i + 1;
        while j < runs.len() && runs[j].0 > runs[j - 1].0 {
            j += 1;
        }
        let n = runs[i].1.len() / k.max(1);
        for (layer, ids, line) in &runs[i..j] {
            if ids.len() % k != 0 || ids.len() / k != n {
                return Err(Error::format(
                    file,
                    format!("line {line}: layer {layer} has {} ids in this pass, not {n} tokens × top-{k} (top-k varies within the layer, or layers are missing from some tokens)", ids.len()),
                ));
            }
        }
        let phase = if n > 1 || (step == 0 && prompt_tokens == 0) {
            Phase::Prefill
        } else {
            Phase::Decode
        };
        if phase == Phase::Decode {
            step += 1;
        } else {
            prompt_tokens += n as u32;
        }
        for (layer, ids, line) in &runs[i..j] {
            for t in 0..n {
                sink.row(
                    &format!("line {}", line + t * k),
                    Row {
                        prompt,
                        step: if phase == Phase::Decode { step } else { 0 },
                        pos: pos + t as u32,
                        phase,
                        layer: *layer,
                        experts: ids[t * k..(t + 1) * k].to_vec(),
                        token: token + t as u64,
                    },
                )?;
            }
        }
        pos += n as u32;
        token += n as u64;
        i = j;
    }
    Ok((prompt + 1, token))
}

/// MoE-Infinity expert activation matrices, `.npy [sequences, layers, experts]` of counts.
/// They keep no access order: each sequence becomes one prompt whose rows, layer by layer,
/// list in round r the experts used more than r times (most used first), so counts are exact
/// and the order is a canonical one, marked `aggregate` in the file.
pub(crate) fn moe_infinity(
    sink: &mut Sink<'_>,
    file: &Path,
    prompt: u32,
    token: u64,
) -> Result<(u32, u64)> {
    let a = npy::read(file)?;
    if a.shape.len() != 3 {
        return Err(Error::format(
            file,
            format!(
                "an expert activation matrix file is [sequences, layers, experts], got shape {:?}",
                a.shape
            ),
        ));
    }
    let (s, l, e) = (a.shape[0], a.shape[1], a.shape[2]);
    if let Some(spec) = sink.spec {
        if e != spec.moe.num_experts {
            return Err(Error::format(
                file,
                format!(
                    "{e} experts per layer, but the model has {} routed experts",
                    spec.moe.num_experts
                ),
            ));
        }
    }
    let mut token = token;
    for si in 0..s {
        for li in 0..l {
            let at = format!("sequence {si}, layer {li}");
            let counts = &a.values[(si * l + li) * e..(si * l + li + 1) * e];
            let mut c: Vec<(u64, u32)> = Vec::new();
            for (x, &v) in counts.iter().enumerate() {
                if v < 0.0 || v.fract() != 0.0 || !v.is_finite() {
                    return Err(Error::format(
                        file,
                        format!("{at}, expert {x}: count {v} is not a non-negative integer"),
                    ));
                }
                if v > 0.0 {
                    c.push((v as u64, x as u32));
                }
            }
            let layer = sink.layer(li, l);
            if c.is_empty() {
                continue;
            }
            if sink.dense(layer) {
                return Err(Error::format(
                    file,
                    format!(
                        "{at}: activations at layer {layer}, which is not a MoE layer of the model"
                    ),
                ));
            }
            c.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            for r in 0..c[0].0 {
                let experts: Vec<u32> = c.iter().take_while(|x| x.0 > r).map(|x| x.1).collect();
                sink.row(
                    &at,
                    Row {
                        prompt: prompt + si as u32,
                        step: 0,
                        pos: r as u32,
                        phase: Phase::Prefill,
                        layer,
                        experts,
                        token,
                    },
                )?;
                token += 1;
            }
        }
    }
    Ok((prompt + s as u32, token))
}
