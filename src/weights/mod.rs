//! Checkpoint access: safetensors shards (single file or `model.safetensors.index.json`), tensor
//! lookup with validated byte ranges, conversion of f32/f16/bf16 and MLX affine-quantized tensors
//! to f32, and detection of the on-disk layout (key prefix, per-expert vs stacked experts).
//!
//! Dense tensors are read through a memory map at load time. Routed experts are never touched
//! here: `experts::store` reads exactly their byte ranges on demand.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod host;
pub mod kernels;
pub mod layout;
pub mod matrix;
pub mod packed;
pub mod quant;
pub mod quantized_rows;
pub mod safetensors;
pub mod storage;

pub use self::quantized_rows::QuantizedRows;
pub use self::safetensors::{ByteRange, Checkpoint, DType, IoSetup, MappedBytes, TensorEntry};

use crate::config::{QuantParams, QuantSpec};
use crate::error::Result;

/// A checkpoint seen at one module path, as candle-transformers' `VarBuilder`: layers are built
/// from a prefix chain (`vb.pp("self_attn").pp("q_proj")`), so the module tree mirrors the
/// checkpoint's key tree and a loader takes one scope instead of a path plus the checkpoint, the
/// quantization block and the device.
#[derive(Debug, Clone)]
pub struct Vb<'a> {
    /// The shards.
    pub ck: &'a Checkpoint,
    /// The MLX quantization block, if the checkpoint has one.
    pub quant: Option<&'a QuantSpec>,
    /// Where the loaded weights go.
    pub dev: &'a candle_core::Device,
    /// On the CPU, read dense weights in place from the memory map (default) rather than copying
    /// them into memory.
    pub in_place: bool,
    /// On a CUDA GPU, keep MLX-quantized dense weights packed (default) rather than as f32.
    pub gpu_packed: bool,
    /// On the CPU, hold MLX 4-bit dense matrices in 8-row tiles for the int8 kernels
    /// ([`packed::PackedMatrix::tile`]: an owned copy in place of the mapped bytes), counting
    /// each matrix tiled here.
    pub tile: Option<&'a std::sync::atomic::AtomicUsize>,
    path: String,
}

impl<'a> Vb<'a> {
    /// The root scope (empty path).
    pub fn root(
        ck: &'a Checkpoint,
        quant: Option<&'a QuantSpec>,
        dev: &'a candle_core::Device,
    ) -> Self {
        Vb {
            ck,
            quant,
            dev,
            in_place: true,
            gpu_packed: true,
            tile: None,
            path: String::new(),
        }
    }

    /// The scope one level down: `{path}.{name}` (`name` may itself hold dots, e.g. a detected
    /// key prefix such as `language_model.model`; a trailing dot is ignored).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let name = name.to_string();
        let name = name.trim_end_matches('.');
        Vb {
            path: if self.path.is_empty() {
                name.to_string()
            } else if name.is_empty() {
                self.path.clone()
            } else {
                format!("{}.{name}", self.path)
            },
            ..self.clone()
        }
    }

    /// The module path of this scope.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The full key of tensor `leaf` in this scope (`{path}.{leaf}`).
    pub fn key(&self, leaf: &str) -> String {
        self.pp(leaf).path
    }

    /// The bytes of tensor `e` as dense modules take them: in place in the memory map, or
    /// copied when this scope does not read in place.
    pub fn source(&self, e: &TensorEntry) -> matrix::Source<'a> {
        if self.in_place {
            matrix::Source::Mapped(self.ck.mapped_bytes(e))
        } else {
            matrix::Source::Bytes(self.ck.mapped(e))
        }
    }

    /// Whether tensor `leaf` exists in this scope.
    pub fn has(&self, leaf: &str) -> bool {
        self.ck.get(&self.key(leaf)).is_some()
    }
}

/// Loads module `module` as a row-major f32 `[rows, cols]` matrix: a float `{module}.weight`, or an
/// MLX-quantized `{module}.weight` (u32) + `.scales` + `.biases`.
pub fn load_matrix(
    ck: &Checkpoint,
    quant: Option<&QuantSpec>,
    module: &str,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>> {
    load_stacked(ck, quant, module, &[], rows, cols)
}

/// Loads `[lead.., rows, cols]` (float, or MLX-quantized along `cols`) as row-major f32.
pub fn load_stacked(
    ck: &Checkpoint,
    quant: Option<&QuantSpec>,
    module: &str,
    lead: &[usize],
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>> {
    let wkey = format!("{module}.weight");
    if ck.get(&format!("{module}.scales")).is_none() {
        let mut shape = lead.to_vec();
        shape.extend([rows, cols]);
        return ck.f32_vec(&wkey, &shape);
    }
    let (w, s, b, p) = quantized_parts(ck, quant, module, lead, rows, cols)?;
    let mut out = Vec::new();
    quant::dequantize_into(
        ck.mapped(w),
        ck.mapped(s),
        ck.mapped(b),
        s.dtype,
        p,
        cols,
        &mut out,
    )
    .map_err(|m| ck.tensor_err(&wkey, w, m))?;
    Ok(out)
}

/// Finds and checks the three tensors of a quantized matrix `[lead.., rows, cols]`.
pub fn quantized_parts<'a>(
    ck: &'a Checkpoint,
    quant: Option<&QuantSpec>,
    module: &str,
    lead: &[usize],
    rows: usize,
    cols: usize,
) -> Result<(
    &'a TensorEntry,
    &'a TensorEntry,
    &'a TensorEntry,
    QuantParams,
)> {
    let wkey = format!("{module}.weight");
    let skey = format!("{module}.scales");
    let bkey = format!("{module}.biases");
    let w = ck.require(&wkey)?;
    let s = ck.require(&skey)?;
    let b = ck.require(&bkey)?;
    let n = lead.len();
    let shape_ok =
        |e: &TensorEntry| e.shape.len() == n + 2 && e.shape[..n] == *lead && e.shape[n] == rows;
    if w.dtype != DType::U32 || !shape_ok(w) {
        return Err(ck.tensor_err(&wkey, w, format!("expected packed U32 [{lead:?}.., {rows}, in·bits/32] for in = {cols}, found {:?} {:?}", w.dtype, w.shape)));
    }
    if !shape_ok(s)
        || s.shape != b.shape
        || s.dtype != b.dtype
        || !matches!(s.dtype, DType::F16 | DType::BF16 | DType::F32)
    {
        return Err(ck.tensor_err(
            &skey,
            s,
            format!(
                "scales {:?} {:?} / biases {:?} {:?} do not match the weight rows {rows}",
                s.dtype, s.shape, b.dtype, b.shape
            ),
        ));
    }
    let inferred = quant::infer_params(cols, w.shape[n + 1], s.shape[n + 1]).ok_or_else(|| {
        ck.tensor_err(
            &wkey,
            w,
            format!(
                "packed width {} and {} scale groups do not fit {cols} inputs at 2, 4 or 8 bits",
                w.shape[n + 1],
                s.shape[n + 1]
            ),
        )
    })?;
    if let Some(cfg) = quant.and_then(|q| q.for_module(module)) {
        if cfg != inferred {
            return Err(ck.tensor_err(
                &wkey,
                w,
                format!("config `quantization` says {} bits group {}, but the tensor shapes give {} bits group {}", cfg.bits, cfg.group_size, inferred.bits, inferred.group_size),
            ));
        }
    }
    Ok((w, s, b, inferred))
}
