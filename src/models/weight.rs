//! Weight matrices of the dense modules in the form each device keeps them.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::weights::host::HostMatrix;
use crate::weights::matrix::{dot_f32, FloatMatrix, Floats};
use crate::weights::packed::PackedMatrix;
use crate::weights::{load_matrix, quantized_parts, TensorEntry, Vb};

/// A weight matrix `[out, in]`. On the CPU it is the checkpoint's own bytes, read in place from
/// the memory map (MLX-packed, or floats in their checkpoint type); on a GPU, an f32 tensor.
#[derive(Debug, Clone)]
pub enum Weight {
    /// f32 tensor on the device.
    Dense(Tensor),
    /// MLX-quantized, packed in CUDA memory (`--gpu-dense packed`).
    #[cfg(feature = "cuda")]
    Device(std::sync::Arc<crate::weights::cuda::DeviceMatrix>),
    /// The checkpoint's bytes (MLX-packed, or floats in their type), decoded or widened inside
    /// each product (CPU).
    Host(HostMatrix),
}

impl Weight {
    /// Loads the matrix `[rows, cols]` of the module `vb`: on the CPU its checkpoint bytes (in
    /// place, unless `vb` asks for copies), elsewhere f32 on the device.
    pub fn load(vb: &Vb, rows: usize, cols: usize) -> Result<Self> {
        let ck = vb.ck;
        #[cfg(feature = "cuda")]
        if let Some(m) = Self::device_packed(vb, &[], rows, cols)? {
            return Ok(Weight::Device(std::sync::Arc::new(m)));
        }
        if !vb.dev.is_cpu() {
            return Ok(Weight::Dense(Tensor::from_vec(
                load_matrix(ck, vb.quant, vb.path(), rows, cols)?,
                (rows, cols),
                vb.dev,
            )?));
        }
        let mut fell_back = false;
        let place = |e: &TensorEntry| vb.source(e);
        let mut tiled = false;
        let (weight, used) = if vb.has("scales") {
            let (w, s, b, p) = quantized_parts(ck, vb.quant, vb.path(), &[], rows, cols)?;
            let mut m = PackedMatrix::from_sources(
                place(w),
                place(s),
                place(b),
                s.dtype,
                p,
                rows,
                cols,
                &mut fell_back,
            )
            .map_err(|m| ck.tensor_err(&vb.key("weight"), w, m))?;
            // Tiled: an owned copy, so the mapped pages go as below.
            if let Some(count) = vb.tile {
                tiled = m.tile();
                count.fetch_add(usize::from(tiled), std::sync::atomic::Ordering::Relaxed);
            }
            (Weight::Host(HostMatrix::Packed(m)), vec![w, s, b])
        } else {
            let key = vb.key("weight");
            let e = ck.require(&key)?;
            ck.check_shape(&key, e, &[rows, cols])?;
            let data = Floats::new(place(e), e.dtype, &mut fell_back).ok_or_else(|| {
                ck.tensor_err(
                    &key,
                    e,
                    format!("dtype {:?} where a float matrix (F32, F16, BF16) or MLX-packed weights are needed", e.dtype),
                )
            })?;
            let m = FloatMatrix::new(data, rows, cols).map_err(|m| ck.tensor_err(&key, e, m))?;
            (Weight::Host(HostMatrix::Float(m)), vec![e])
        };
        if fell_back || tiled || !vb.in_place {
            // Copied: the mapped pages are not needed any more.
            for e in used {
                ck.release(e);
            }
        }
        if fell_back {
            warn_copied(&vb.key("weight"), ck.shard_path(0));
        }
        Ok(weight)
    }

    /// The stacked MLX-packed matrix `[lead, rows, cols]` of the module `vb` as one packed
    /// matrix `[lead·rows, cols]` in CUDA memory, where `vb` is on a CUDA device with packed
    /// dense weights (`--gpu-dense packed`) and the kernels take its form; `None` otherwise.
    #[cfg(feature = "cuda")]
    pub fn device_stacked(
        vb: &Vb,
        lead: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Option<crate::weights::cuda::DeviceMatrix>> {
        Self::device_packed(vb, &[lead], rows, cols)
    }

    /// The MLX-packed matrix `[lead.., rows, cols]` of `vb` as one packed matrix in CUDA
    /// memory (`[Πlead·rows, cols]`), where `vb` is on CUDA with packed dense weights and the
    /// kernels take its form; `None` otherwise.
    #[cfg(feature = "cuda")]
    fn device_packed(
        vb: &Vb,
        lead: &[usize],
        rows: usize,
        cols: usize,
    ) -> Result<Option<crate::weights::cuda::DeviceMatrix>> {
        let (candle_core::Device::Cuda(dev), true, true) =
            (vb.dev, vb.gpu_packed, vb.has("scales"))
        else {
            return Ok(None);
        };
        let ck = vb.ck;
        let (w, s, b, p) = quantized_parts(ck, vb.quant, vb.path(), lead, rows, cols)?;
        let Some(kind) = crate::weights::cuda::scale_kind(s.dtype) else {
            return Ok(None);
        };
        crate::weights::cuda::DeviceMatrix::upload(
            dev,
            [ck.mapped(w), ck.mapped(s), ck.mapped(b)],
            kind,
            p,
            lead.iter().product::<usize>() * rows,
            cols,
        )
    }

    /// Loads the stacked matrix `[lead, rows, cols]` of the module `vb` as one host matrix
    /// `[lead·rows, cols]` in its checkpoint form (CPU only: MLA's `embed_q`/`unembed_out`).
    pub fn load_stacked(vb: &Vb, lead: usize, rows: usize, cols: usize) -> Result<HostMatrix> {
        let ck = vb.ck;
        let mut fell_back = false;
        let place = |e: &TensorEntry| vb.source(e);
        let m = if vb.has("scales") {
            let (w, s, b, p) = quantized_parts(ck, vb.quant, vb.path(), &[lead], rows, cols)?;
            HostMatrix::Packed(
                PackedMatrix::from_sources(
                    place(w),
                    place(s),
                    place(b),
                    s.dtype,
                    p,
                    lead * rows,
                    cols,
                    &mut fell_back,
                )
                .map_err(|m| ck.tensor_err(&vb.key("weight"), w, m))?,
            )
        } else {
            let key = vb.key("weight");
            let e = ck.require(&key)?;
            ck.check_shape(&key, e, &[lead, rows, cols])?;
            let data = Floats::new(place(e), e.dtype, &mut fell_back).ok_or_else(|| {
                ck.tensor_err(&key, e, format!("dtype {:?} is not a float type", e.dtype))
            })?;
            HostMatrix::Float(
                FloatMatrix::new(data, lead * rows, cols).map_err(|m| ck.tensor_err(&key, e, m))?,
            )
        };
        if fell_back {
            warn_copied(&vb.key("weight"), ck.dir());
        }
        Ok(m)
    }

    /// Bytes this weight holds in the process's heap (0 when read in place).
    pub fn owned_bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            #[cfg(feature = "cuda")]
            Weight::Device(m) => m.bytes(),
            Weight::Host(m) => m.owned_bytes(),
        }
    }

    /// `x Wᵀ` for `x` `[T, in]`: `[T, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Weight::Host(_) => self.matmul_rows(x)?.expect("host forms always multiply"),
            Weight::Dense(w) => match gemv(x, w)? {
                Some(y) => y,
                None => x.matmul(&w.t()?)?,
            },
            #[cfg(feature = "cuda")]
            Weight::Device(m) => m.matmul(x)?,
        })
    }

    /// Rows `ids` as f32 `[ids.len(), cols]` on `dev` (embedding lookups; `cols` = `in`).
    pub fn rows(&self, ids: &[u32], cols: usize, dev: &candle_core::Device) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => {
                Ok(w.index_select(&Tensor::from_vec(ids.to_vec(), ids.len(), dev)?, 0)?)
            }
            #[cfg(feature = "cuda")]
            Weight::Device(m) => m.decode_rows(ids),
            Weight::Host(m) => {
                let mut out = Vec::with_capacity(ids.len() * cols);
                for &id in ids {
                    m.row_into(id as usize, &mut out);
                }
                Ok(Tensor::from_vec(out, (ids.len(), cols), dev)?)
            }
        }
    }

    /// `x Wᵀ` for `x` `[T, in]` on the CPU forms; `None` for a device tensor.
    fn matmul_rows(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let t = x.dim(0)?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let (y, n) = match self {
            Weight::Host(m) => (m.matmul_rows(&xs), m.rows()),
            _ => return Ok(None),
        };
        Ok(Some(Tensor::from_vec(y, (t, n), x.device())?))
    }
}

/// Says once per process that a tensor was copied because its bytes were not aligned in the file
/// (a hand-made checkpoint with odd offsets): it then costs heap memory instead of page cache.
fn warn_copied(key: &str, shard: &std::path::Path) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        eprintln!(
            "note: {}: `{key}` (and any other such tensor) is not aligned for use in place; it is copied into memory",
            shard.display()
        )
    });
}

/// `x Wᵀ` for a single row `x` `[1, in]` and a contiguous f32 `W` `[out, in]` on the CPU, as
/// row dot products split across cores; `None` for anything else (the caller uses matmul).
/// gemm packs its right-hand side into a freshly allocated buffer on every call: at real model
/// sizes (a 154880 × 2048 `lm_head`, 2048 × 3072 experts) that page-fault churn dominated
/// one-row decode steps, which are all this engine's expert calls.
pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if !x.device().is_cpu()
        || x.dims().len() != 2
        || x.dim(0)? != 1
        || !w.is_contiguous()
        || w.dtype() != DType::F32
    {
        return Ok(None);
    }
    let (o, i) = w.dims2()?;
    let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
    if xv.len() != i {
        return Ok(None);
    }
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let wv = &cpu.as_slice::<f32>()?[layout.start_offset()..layout.start_offset() + o * i];
    let mut y = vec![0f32; o];
    let rows = |y: &mut [f32], r0: usize| {
        for (k, yk) in y.iter_mut().enumerate() {
            *yk = dot_f32(&wv[(r0 + k) * i..(r0 + k + 1) * i], &xv);
        }
    };
    let block = o.div_ceil(4 * crate::weights::kernels::cores()).max(8);
    crate::weights::kernels::by_blocks(&mut y, block, o * i, |r0, part| rows(part, r0));
    Ok(Some(Tensor::from_vec(y, (1, o), x.device())?))
}
