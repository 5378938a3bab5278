//! `harness synth`: writes a random-weight checkpoint with the exact tensor names, shapes and
//! layout of a real model (from its `config.json`), so that speed can be measured at real expert
//! sizes without downloading weights. Layouts: MLX affine 4/8-bit (stacked `switch_mlp`, as
//! `mlx_lm.convert -q` writes it) or bf16 HF per-expert. Routing on random weights is
//! unrealistic: use it for speed, not hit rates.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::experts::Phase;
use crate::trace::TraceRow;

/// On-disk layout to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthLayout {
    /// MLX affine, group 64, at this many bits (4 or 8).
    Mlx(usize),
    /// HF per-expert keys, bf16.
    Bf16,
}

impl std::fmt::Display for SynthLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SynthLayout::Mlx(b) => write!(f, "mlx{b}"),
            SynthLayout::Bf16 => f.write_str("bf16"),
        }
    }
}

impl serde::Serialize for SynthLayout {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl std::str::FromStr for SynthLayout {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mlx4" => Ok(SynthLayout::Mlx(4)),
            "mlx8" => Ok(SynthLayout::Mlx(8)),
            "bf16" => Ok(SynthLayout::Bf16),
            _ => Err(Error::Input(format!(
                "unknown layout `{s}` (known: mlx4, mlx8, bf16)"
            ))),
        }
    }
}

mod plan;

use plan::{plan, Fill, Planned, GROUP};

/// What `synth` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SynthReport {
    /// Output directory.
    pub dir: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
    /// Shard files.
    pub shards: usize,
}

/// Writes a random checkpoint for `config_path` into `out` (created; must not hold a checkpoint).
/// `layers` keeps only the first N decoder layers. Deterministic for a given `seed`.
pub fn synth(
    config_path: &Path,
    out: &Path,
    layout: SynthLayout,
    layers: Option<usize>,
    seed: u64,
    shard_bytes: u64,
) -> Result<SynthReport> {
    let text = std::fs::read_to_string(config_path).map_err(|e| Error::io(config_path, e))?;
    let mut value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(config_path, format!("not valid JSON: {e}")))?;
    // Wrapped configs (kimi_k25) keep their text model in `text_config`: write that as a plain model.
    if value.get("model_type").and_then(|m| m.as_str()) == Some("kimi_k25") {
        value = value["text_config"].clone();
        value["model_type"] = serde_json::json!("deepseek_v3");
    }
    for k in ["quantization_config", "quantization"] {
        value.as_object_mut().map(|o| o.remove(k));
    }
    if let Some(n) = layers {
        if n == 0 {
            return Err(Error::Input("--layers must be at least 1".into()));
        }
        value["num_hidden_layers"] = serde_json::json!(n);
        // Per-layer lists keep their first n entries; Kimi-Linear's 1-indexed layer lists keep
        // the layers up to n.
        for key in ["mlp_layer_types", "layer_types"] {
            if let Some(t) = value.get(key).and_then(|t| t.as_array()).cloned() {
                value[key] = serde_json::json!(t.into_iter().take(n).collect::<Vec<_>>());
            }
        }
        for key in ["kda_layers", "full_attn_layers"] {
            if let Some(t) = value["linear_attn_config"]
                .get(key)
                .and_then(|t| t.as_array())
                .cloned()
            {
                value["linear_attn_config"][key] = serde_json::json!(t
                    .into_iter()
                    .filter(|l| l.as_u64().is_some_and(|l| l as usize <= n))
                    .collect::<Vec<_>>());
            }
        }
    }
    if let SynthLayout::Mlx(bits) = layout {
        value["quantization"] =
            serde_json::json!({"group_size": GROUP, "bits": bits, "mode": "affine"});
    }
    let spec = crate::models::spec_from_value(config_path, value.clone())?;
    if spec
        .unsupported
        .as_deref()
        .is_some_and(|r| !r.contains("quantized with"))
    {
        return Err(Error::Input(format!(
            "{}: {}",
            config_path.display(),
            spec.unsupported.unwrap_or_default()
        )));
    }
    if out.join("config.json").exists() {
        return Err(Error::Input(format!(
            "{} already holds a checkpoint; choose an empty directory",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let p = plan(&spec, layout);
    // Group tensors into shards of about `shard_bytes`.
    let mut shards: Vec<Vec<&Planned>> = vec![Vec::new()];
    let mut cur = 0u64;
    for t in &p.tensors {
        if cur > 0 && cur + t.bytes() > shard_bytes {
            shards.push(Vec::new());
            cur = 0;
        }
        cur += t.bytes();
        shards.last_mut().expect("one shard").push(t);
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut rng = seed ^ 0x9e37_79b9_7f4a_7c15;
    let jumps = Jumps::new();
    let mut total = 0u64;
    for (si, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", si + 1, n);
        let mut header = serde_json::Map::new();
        let mut off = 0u64;
        for t in shard {
            header.insert(t.name.clone(), serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, off + t.bytes()]}));
            off += t.bytes();
            weight_map.insert(t.name.clone(), file.clone());
        }
        let mut h = serde_json::to_string(&header).map_err(|e| Error::Input(e.to_string()))?;
        while h.len() % 8 != 0 {
            h.push(' ');
        }
        let path = out.join(&file);
        total += write_shard(&path, &h, shard, &mut rng, &jumps, writers())?;
    }
    let idx = serde_json::json!({"metadata": {"total_size": total, "generator": "harness synth", "seed": seed}, "weight_map": weight_map});
    crate::io::write_atomic(
        &out.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&idx)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    crate::io::write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&value)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    // A byte-level tokenizer (256 ids, one per byte) so that `harness run` can drive the model
    // with text prompts; made by scripts/make_byte_tokenizer.py.
    if spec.vocab_size >= 256 {
        crate::io::write_atomic(
            &out.join("tokenizer.json"),
            include_bytes!("../byte_tokenizer.json"),
        )?;
    }
    Ok(SynthReport {
        dir: out.to_path_buf(),
        tensors: p.tensors.len(),
        bytes: total,
        shards: n,
    })
}

/// Bytes a [`fill`] call writes at most (a tensor is filled in pieces of this size).
const PIECE: usize = 1 << 20;

/// Threads writing a shard's pieces: the machine's cores, at most 16.
fn writers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(16))
}

/// Writes one shard: the safetensors header `header` (padded JSON), then `tensors`' bytes in
/// pieces of [`PIECE`], each filled from the generator state it would have had if every piece
/// before it had been filled in turn (`jumps`), so `threads` threads write the same bytes as
/// one, each piece at its place in the file. Advances `rng` past the shard; returns its tensor
/// bytes.
fn write_shard(
    path: &Path,
    header: &str,
    tensors: &[&plan::Planned],
    rng: &mut u64,
    jumps: &Jumps,
    threads: usize,
) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let io = |e| Error::io(path, e);
    let f = std::fs::File::create(path).map_err(io)?;
    f.write_all_at(&(header.len() as u64).to_le_bytes(), 0)
        .map_err(io)?;
    f.write_all_at(header.as_bytes(), 8).map_err(io)?;
    // Every piece: its fill, length, place in the file and generator state.
    let mut pieces = Vec::new();
    let mut at = 8 + header.len() as u64;
    for t in tensors {
        let mut left = t.bytes() as usize;
        while left > 0 {
            let len = left.min(PIECE);
            pieces.push((t.fill, len, at, *rng));
            *rng = jumps.jump(*rng, draws(t.fill, len));
            at += len as u64;
            left -= len;
        }
    }
    let threads = threads.clamp(1, pieces.len().max(1));
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        for w in 0..threads {
            let (pieces, f, failed) = (&pieces, &f, &failed);
            scope.spawn(move || {
                let mut buf = Vec::with_capacity(PIECE);
                for &(fill_kind, len, at, state) in pieces.iter().skip(w).step_by(threads) {
                    let mut state = state;
                    buf.clear();
                    fill(&mut buf, fill_kind, len, &mut state);
                    if let Err(e) = f.write_all_at(&buf, at) {
                        *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(io(e));
    }
    Ok(tensors.iter().map(|t| t.bytes()).sum())
}

/// Generator draws [`fill`] makes for `len` bytes of `f`.
fn draws(f: Fill, len: usize) -> u64 {
    match f {
        Fill::Words => len.div_ceil(8) as u64,
        Fill::Random(_) => len.div_ceil(2) as u64,
        Fill::Const(_) | Fill::ConstF32(_) => 0,
    }
}

/// Jumps of the [`next`] generator: its state update is linear over GF(2), so `n` draws move the
/// state by the bit matrix `T^n`, applied as the product of the precomputed `T^(2^k)` of `n`'s
/// bits (columns: the images of the 64 unit states).
struct Jumps(Box<[[u64; 64]; 64]>);

impl Jumps {
    fn new() -> Self {
        let mut m = Box::new([[0u64; 64]; 64]);
        for j in 0..64 {
            let mut s = 1u64 << j;
            next(&mut s);
            m[0][j] = s;
        }
        for k in 1..64 {
            let prev = m[k - 1];
            for j in 0..64 {
                m[k][j] = apply(&prev, prev[j]);
            }
        }
        Jumps(m)
    }

    /// The state `n` draws after `s`.
    fn jump(&self, mut s: u64, n: u64) -> u64 {
        for (k, m) in self.0.iter().enumerate() {
            if n >> k & 1 == 1 {
                s = apply(m, s);
            }
        }
        s
    }
}

/// The bit matrix `m` (columns) applied to the state `s`.
fn apply(m: &[u64; 64], s: u64) -> u64 {
    (0..64).filter(|j| s >> j & 1 == 1).fold(0, |r, j| r ^ m[j])
}

/// xorshift64*: fast, seeded, good enough for weights whose values do not matter.
fn next(s: &mut u64) -> u64 {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    s.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn fill(buf: &mut Vec<u8>, f: Fill, bytes: usize, rng: &mut u64) {
    match f {
        Fill::Words => {
            let start = buf.len();
            buf.resize(start + bytes.saturating_sub(start).div_ceil(8) * 8, 0);
            for w in buf[start..].chunks_exact_mut(8) {
                w.copy_from_slice(&next(rng).to_le_bytes());
            }
            buf.truncate(bytes);
        }
        Fill::Const(c) => {
            let b = half::bf16::from_f32(c).to_bits().to_le_bytes();
            while buf.len() < bytes {
                buf.extend_from_slice(&b);
            }
            buf.truncate(bytes);
        }
        Fill::ConstF32(c) => {
            while buf.len() < bytes {
                buf.extend_from_slice(&c.to_le_bytes());
            }
            buf.truncate(bytes);
        }
        Fill::Random(scale) => {
            let start = buf.len();
            buf.resize(start + bytes.saturating_sub(start).div_ceil(2) * 2, 0);
            for v in buf[start..].chunks_exact_mut(2) {
                // Uniform in [-√3, √3)·scale: std = scale.
                let u = (next(rng) >> 40) as f32 / (1u64 << 24) as f32;
                let x = (u * 2.0 - 1.0) * 1.732 * scale;
                v.copy_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes());
            }
            buf.truncate(bytes);
        }
    }
}

/// SplitMix64: a tiny seeded generator, stable across dependency versions.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n.
    fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize % n.max(1)
    }
}

/// A seeded synthetic routing trace for tests and benchmarks: one prompt, `tokens` tokens, each
/// through every layer of `layers` (token-major, rows in execution order).
///
/// Each layer has its own popularity order (a seeded permutation of `0..num_experts`); an expert
/// slot is, with probability `reuse`, one of the same layer's experts of the previous token
/// (temporal locality), otherwise a Zipf(`zipf_s`) draw over the popularity order; the `top_k`
/// experts of a row are distinct. The first `max(1, tokens / 8)` tokens are prefill (step 0),
/// the rest decode (steps 1, 2, …). Decode rows after the first layer carry a `lookahead`
/// prediction: the true experts, each replaced with probability 1/4 by a Zipf draw.
pub fn synthetic_trace(
    seed: u64,
    tokens: usize,
    layers: &[u32],
    num_experts: u32,
    top_k: usize,
    zipf_s: f64,
    reuse: f64,
) -> Vec<TraceRow> {
    let mut g = SyntheticTrace::new(seed, tokens, layers, num_experts, top_k, zipf_s, reuse);
    let mut rows = Vec::with_capacity(tokens * layers.len());
    while let Some(t) = g.next_token() {
        rows.extend(t);
    }
    rows
}

/// [`synthetic_trace`] one token at a time, for traces too long to hold in memory (the same
/// seed gives the same rows).
pub struct SyntheticTrace {
    rng: SplitMix64,
    layers: Vec<u32>,
    n: usize,
    k: usize,
    reuse: f64,
    cdf: Vec<f64>,
    total: f64,
    perms: Vec<Vec<u32>>,
    prev: Vec<Vec<u32>>,
    tokens: usize,
    n_prefill: usize,
    t: usize,
}

impl SyntheticTrace {
    /// The generator of [`synthetic_trace`]'s rows, with the same arguments.
    pub fn new(
        seed: u64,
        tokens: usize,
        layers: &[u32],
        num_experts: u32,
        top_k: usize,
        zipf_s: f64,
        reuse: f64,
    ) -> Self {
        let n = num_experts.max(1) as usize;
        let k = top_k.min(n);
        let mut rng = SplitMix64(seed ^ 0x6D6F_652D_6861_726E);
        let mut cdf: Vec<f64> = Vec::with_capacity(n);
        let mut acc = 0.0;
        for r in 0..n {
            acc += 1.0 / ((r + 1) as f64).powf(zipf_s);
            cdf.push(acc);
        }
        let perms: Vec<Vec<u32>> = layers
            .iter()
            .map(|_| {
                let mut p: Vec<u32> = (0..n as u32).collect();
                for i in (1..n).rev() {
                    p.swap(i, rng.below(i + 1));
                }
                p
            })
            .collect();
        SyntheticTrace {
            rng,
            layers: layers.to_vec(),
            n,
            k,
            reuse,
            cdf,
            total: acc,
            perms,
            prev: vec![Vec::new(); layers.len()],
            tokens,
            n_prefill: (tokens / 8).max(1).min(tokens),
            t: 0,
        }
    }

    fn zipf(&mut self, li: usize) -> u32 {
        let u = self.rng.unit() * self.total;
        self.perms[li][self.cdf.partition_point(|&c| c <= u).min(self.n - 1)]
    }

    /// The rows of the next token (one per layer), or `None` after the last token.
    pub fn next_token(&mut self) -> Option<Vec<TraceRow>> {
        if self.t >= self.tokens {
            return None;
        }
        let t = self.t;
        self.t += 1;
        let k = self.k;
        let phase = if t < self.n_prefill {
            Phase::Prefill
        } else {
            Phase::Decode
        };
        let step = if phase == Phase::Prefill {
            0
        } else {
            (t - self.n_prefill + 1) as u32
        };
        let mut rows = Vec::with_capacity(self.layers.len());
        for li in 0..self.layers.len() {
            let layer = self.layers[li];
            // The previous token's experts of this layer, in random order: reuse candidates.
            let mut recent = std::mem::take(&mut self.prev[li]);
            for i in (1..recent.len()).rev() {
                recent.swap(i, self.rng.below(i + 1));
            }
            let mut experts: Vec<u32> = Vec::with_capacity(k);
            while experts.len() < k {
                let e = if !recent.is_empty() && self.rng.unit() < self.reuse {
                    recent.pop().expect("non-empty")
                } else {
                    self.zipf(li)
                };
                if !experts.contains(&e) {
                    experts.push(e);
                }
            }
            let lookahead = (phase == Phase::Decode && li > 0).then(|| {
                let mut p: Vec<u32> = Vec::with_capacity(k);
                for &e in &experts {
                    let guess = if self.rng.unit() < 0.25 {
                        self.zipf(li)
                    } else {
                        e
                    };
                    if !p.contains(&guess) {
                        p.push(guess);
                    }
                }
                p
            });
            self.prev[li] = experts.clone();
            rows.push(TraceRow {
                prompt: 0,
                step,
                pos: t as u32,
                phase,
                layer,
                weights: vec![1.0 / k as f32; k],
                experts,
                lookahead,
                hits: Vec::new(),
                load_ns: 0,
            });
        }
        Some(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_equal_stepping_and_threaded_shards_equal_one_writer() {
        let jumps = Jumps::new();
        for n in [0u64, 1, 2, 63, 64, 1000, (1 << 17) + 3] {
            let mut s = 0x1234_5678_9abc_def1;
            let j = jumps.jump(s, n);
            for _ in 0..n {
                next(&mut s);
            }
            assert_eq!(j, s, "{n} draws");
        }
        // Tensors of several pieces (the last ones partial), words and noise, a constant between.
        let t = |name: &str, dtype, n: usize, fill| plan::Planned {
            name: name.into(),
            dtype,
            shape: vec![n],
            fill,
        };
        let tensors = [
            t("a", "U32", PIECE * 5 / 8 + 3, Fill::Words),
            t("b", "BF16", 7, Fill::Const(1.0)),
            t("c", "BF16", PIECE + 5, Fill::Random(0.02)),
            t("d", "U32", 9, Fill::Words),
        ];
        let refs: Vec<&plan::Planned> = tensors.iter().collect();
        // The reference: every piece filled in turn from one generator.
        let header = "{}      ";
        let mut want = (header.len() as u64).to_le_bytes().to_vec();
        want.extend_from_slice(header.as_bytes());
        let (mut rng_want, mut buf) = (99u64, Vec::new());
        for t in &tensors {
            let mut left = t.bytes() as usize;
            while left > 0 {
                let len = left.min(PIECE);
                buf.clear();
                fill(&mut buf, t.fill, len, &mut rng_want);
                want.extend_from_slice(&buf);
                left -= len;
            }
        }
        let d = tempfile::tempdir().unwrap();
        for threads in [1, 3] {
            let path = d.path().join(format!("s{threads}"));
            let mut rng = 99u64;
            let bytes = write_shard(&path, header, &refs, &mut rng, &jumps, threads).unwrap();
            assert_eq!(bytes, tensors.iter().map(|t| t.bytes()).sum::<u64>());
            assert_eq!(rng, rng_want, "{threads} threads");
            assert!(std::fs::read(&path).unwrap() == want, "{threads} threads");
        }
    }

    #[test]
    fn synthetic_trace_is_seeded_and_well_formed() {
        let layers = [1, 2, 5];
        let a = synthetic_trace(7, 40, &layers, 16, 4, 1.1, 0.5);
        let b = synthetic_trace(7, 40, &layers, 16, 4, 1.1, 0.5);
        let c = synthetic_trace(8, 40, &layers, 16, 4, 1.1, 0.5);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 120);
        for (i, r) in a.iter().enumerate() {
            assert_eq!(r.layer, layers[i % 3]);
            assert_eq!(r.pos as usize, i / 3);
            assert_eq!(r.experts.len(), 4);
            let mut e = r.experts.clone();
            e.sort();
            e.dedup();
            assert_eq!(e.len(), 4, "duplicate experts in {r:?}");
            assert!(r.experts.iter().all(|&x| x < 16));
            let first_layer = r.layer == 1;
            assert_eq!(
                r.lookahead.is_some(),
                r.phase == Phase::Decode && !first_layer,
                "{r:?}"
            );
        }
        assert_eq!(
            a.iter().filter(|r| r.phase == Phase::Prefill).count(),
            5 * 3
        );
    }

    #[test]
    fn synthetic_locality_and_skew_raise_lru_hits() {
        let layers = [0, 1];
        let hr = |s: f64, reuse: f64| {
            let rows = synthetic_trace(3, 2000, &layers, 64, 4, s, reuse);
            let sim = crate::simulate::Simulation::new(
                crate::experts::policies::PolicySpec::Lru,
                crate::experts::budget::Budget::SlotsPerLayer(8),
                &layers,
            );
            crate::simulate::simulate(&rows, &sim, |_| 1)
                .unwrap()
                .hit_rate
        };
        let base = hr(0.0, 0.0); // uniform, no reuse: about 8/64 hits per slot pick
        assert!(base < 0.2, "{base}");
        assert!(hr(1.2, 0.0) > base + 0.1);
        assert!(hr(0.0, 0.8) > base + 0.3);
    }
}
