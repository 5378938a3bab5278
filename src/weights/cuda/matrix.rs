//! An MLX-quantized dense matrix held packed in CUDA memory (attention projections, shared
//! experts, dense MLPs, `lm_head`, embeddings): 4-bit checkpoints keep 1/7 of the f32 bytes on
//! the GPU, and a decode step reads 1/7 of the bytes.

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg, SyncOnDrop,
};
use candle_core::{CudaDevice, Storage, Tensor};

use super::{driver, ROW_DOT_SRC, SCALE_SRC};
use crate::config::QuantParams;
use crate::error::{Error, Result};

const SRC: &str = r#"
// y[t * rows + r] = row r · x[t] for t < T: one warp per row in a grid-stride loop, x[t] in
// shared memory. Where `nw` is not null, x[t] is first RMS-normalised with weights nw and
// epsilon eps (every block normalises its own copy: the norm before a projection, fused).
extern "C" __global__ void __launch_bounds__(256, 4) packed_matvec(
const Packed m, unsigned int kind, const float* x, float* y, unsigned int rows,
unsigned int cols, unsigned int T, unsigned int bits, unsigned int group, const float* nw,
float eps) {
extern __shared__ float xs[];
__shared__ float red[32];
unsigned int warp = threadIdx.x / 32u, lane = threadIdx.x % 32u, nw_ = blockDim.x / 32u;
for (unsigned int t = 0; t < T; ++t) {
    load_x(xs, x + (unsigned long long)t * cols, cols);
    __syncthreads();
    if (nw) {
        float ss = 0.0f;
        for (unsigned int i = threadIdx.x; i < cols; i += blockDim.x) {
            float v = xs[pad(i)];
            ss = fmaf(v, v, ss);
        }
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (lane == 0) red[warp] = ss;
        __syncthreads();
        float tot = 0.0f;
        for (unsigned int i = 0; i < nw_; ++i) tot += red[i];
        float scale = rsqrtf(tot / (float)cols + eps);
        if (cols % 32u == 0u) {
            // Runs of four, with the run sums the 4-bit products read (`put4`).
            for (unsigned int base = 0; base < cols / 4u; base += blockDim.x) {
                unsigned int i = base + threadIdx.x;
                bool ok = i < cols / 4u;
                float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (ok) {
                    v = *(const float4*)(xs + pad(4u * i));
                    v = make_float4(scale * v.x * nw[4u * i], scale * v.y * nw[4u * i + 1u],
                                    scale * v.z * nw[4u * i + 2u], scale * v.w * nw[4u * i + 3u]);
                }
                put4(xs, i, v, ok);
            }
        } else {
            for (unsigned int i = threadIdx.x; i < cols; i += blockDim.x)
                xs[pad(i)] = scale * xs[pad(i)] * nw[i];
        }
        __syncthreads();
    }
    for (unsigned int r = blockIdx.x * nw_ + warp; r < rows; r += gridDim.x * nw_) {
        float v = dot(bits, m, kind, xs, r, cols, group, lane);
        if (lane == 0) y[(unsigned long long)t * rows + r] = v;
    }
    __syncthreads();
}
}

// out[i * cols + c] = s * q + b of row ids[i] for i < n (rows given by value: up to 8 per
// launch), of row row0 + i where row0 is not 0xffffffff (any n), or, where `at` is not null,
// of row at[i] (ids in device memory, read when the kernel runs: a CUDA graph's next token;
// one at or past `nrows` reads the last row rather than past the matrix).
struct Ids { unsigned int id[8]; };
extern "C" __global__ void packed_rows(
const unsigned char* buf, unsigned long long q_off, unsigned long long s_off,
unsigned long long b_off, unsigned int kind, const Ids ids, unsigned int row0, unsigned int n,
float* out, unsigned int cols, unsigned int bits, unsigned int group, const unsigned int* at,
unsigned int nrows) {
for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
     i < (unsigned long long)n * cols; i += (unsigned long long)gridDim.x * blockDim.x) {
unsigned int k = (unsigned int)(i / cols), c = (unsigned int)(i % cols);
unsigned long long row = at ? (unsigned long long)min(at[k], nrows - 1u)
                       : row0 == 0xffffffffu ? ids.id[k] : (unsigned long long)row0 + k;
unsigned long long e = row * cols + c;
unsigned int per = 32u / bits;
unsigned int word = ((const unsigned int*)(buf + q_off))[e / per];
float q = (float)((word >> ((e % per) * bits)) & ((1u << bits) - 1u));
unsigned long long g = e / group;
out[i] = __fadd_rn(__fmul_rn(scale_at(buf + s_off, kind, g), q), scale_at(buf + b_off, kind, g));
}
}
"#;

/// Rows decoded per `packed_rows` launch (the kernel's `Ids`).
const IDS: usize = 8;

#[repr(C)]
#[derive(Clone, Copy)]
struct Ids {
    id: [u32; IDS],
}

// SAFETY: plain-old-data with the C layout of the kernel's `Ids`.
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for Ids {}

/// Which rows a `packed_rows` launch decodes.
enum RowsFrom<'a> {
    /// Up to [`IDS`] ids by value.
    Ids(Ids),
    /// Consecutive rows from this one.
    From(u32),
    /// Ids in device memory, read when the launch runs (clamped to the matrix by the kernel).
    At(&'a CudaSlice<u32>),
}

static KERNELS: super::KernelSet = super::KernelSet::new();

/// `packed_matvec` and `packed_rows` for `dev`.
fn kernels(dev: &CudaDevice) -> Result<(&'static CudaFunction, &'static CudaFunction)> {
    let f = KERNELS
        .get(
            dev,
            || format!("{SCALE_SRC}{ROW_DOT_SRC}{SRC}"),
            &["packed_matvec", "packed_rows"],
        )
        .map_err(|e| {
            Error::Input(format!(
                "packed GPU weight kernels: {e} (run with --gpu-dense f32)"
            ))
        })?;
    Ok((&f[0], &f[1]))
}

/// Tokens multiplied by the matrix-vector kernel in one launch; longer inputs (prefill) decode
/// the matrix to f32 once and use cuBLAS.
const MATVEC_TOKENS: usize = 8;

/// An MLX-quantized `[rows, cols]` matrix in GPU memory as its checkpoint bytes.
pub struct DeviceMatrix {
    dev: CudaDevice,
    /// Shared by the row ranges of one stacked matrix ([`DeviceMatrix::stack`]).
    buf: std::sync::Arc<CudaSlice<u8>>,
    /// Offsets in `buf` of this matrix's first row of words, scales, biases.
    offs: [u64; 3],
    kind: u32,
    rows: usize,
    cols: usize,
    params: QuantParams,
}

impl std::fmt::Debug for DeviceMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMatrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("params", &self.params)
            .finish()
    }
}

impl DeviceMatrix {
    /// Copies the packed words, scales and biases `[w, s, b]` (scale type `kind`, see
    /// [`super::scale_kind`]) to `dev`; `None` where the kernels do not take this matrix (the
    /// caller then keeps f32).
    pub fn upload(
        dev: &CudaDevice,
        [w, s, b]: [&[u8]; 3],
        kind: u32,
        params: QuantParams,
        rows: usize,
        cols: usize,
    ) -> Result<Option<Self>> {
        if !super::fits(params.bits, params.group_size, cols) {
            return Ok(None);
        }
        let a = |n: usize| n.div_ceil(256) * 256;
        let offs = [0, a(w.len()) as u64, (a(w.len()) + a(s.len())) as u64];
        let mut host = vec![0u8; a(w.len()) + a(s.len()) + b.len()];
        host[..w.len()].copy_from_slice(w);
        host[offs[1] as usize..offs[1] as usize + s.len()].copy_from_slice(s);
        host[offs[2] as usize..].copy_from_slice(b);
        let buf = dev
            .cuda_stream()
            .clone_htod(&host)
            .map_err(|e| driver("upload", e))?;
        kernels(dev)?;
        Ok(Some(DeviceMatrix {
            dev: dev.clone(),
            buf: std::sync::Arc::new(buf),
            offs,
            kind,
            rows,
            cols,
            params,
        }))
    }

    /// Bytes held on the GPU (this matrix's rows of a stacked buffer).
    pub fn bytes(&self) -> usize {
        let [w, s] = self.row_bytes();
        self.rows * (w + 2 * s)
    }

    /// Bytes of one row's words and of one row's scales (as many for its biases).
    fn row_bytes(&self) -> [usize; 2] {
        let size = if self.kind == 0 { 4 } else { 2 };
        [
            self.cols * self.params.bits / 8,
            self.cols / self.params.group_size * size,
        ]
    }

    /// `parts` stacked by rows into one matrix (one product instead of several over the same
    /// input), and each part again as a view of its rows of it, sharing its memory (the
    /// parts' own buffers can then be dropped); `None` where the parts differ in columns,
    /// quantization or scale type.
    pub fn stack(parts: &[&DeviceMatrix]) -> Result<Option<(DeviceMatrix, Vec<DeviceMatrix>)>> {
        let Some(first) = parts.first() else {
            return Ok(None);
        };
        if parts.iter().any(|p| {
            p.cols != first.cols
                || p.params != first.params
                || p.kind != first.kind
                || p.dev.id() != first.dev.id()
        }) {
            return Ok(None);
        }
        let [wr, sr] = first.row_bytes();
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        let a = |n: usize| n.div_ceil(256) * 256;
        let offs = [0, a(rows * wr) as u64, (a(rows * wr) + a(rows * sr)) as u64];
        let stream = first.dev.cuda_stream();
        let mut buf = stream
            .alloc_zeros::<u8>(offs[2] as usize + rows * sr)
            .map_err(|e| driver("allocation", e))?;
        let mut row0 = 0;
        let mut views = Vec::with_capacity(parts.len());
        for p in parts {
            for (i, per_row) in [wr, sr, sr].into_iter().enumerate() {
                let (src0, dst0, n) = (
                    p.offs[i] as usize,
                    offs[i] as usize + row0 * per_row,
                    p.rows * per_row,
                );
                stream
                    .memcpy_dtod(
                        &p.buf.slice(src0..src0 + n),
                        &mut buf.slice_mut(dst0..dst0 + n),
                    )
                    .map_err(|e| driver("copy", e))?;
            }
            row0 += p.rows;
        }
        let stacked = DeviceMatrix {
            dev: first.dev.clone(),
            buf: std::sync::Arc::new(buf),
            offs,
            kind: first.kind,
            rows,
            cols: first.cols,
            params: first.params,
        };
        let mut row0 = 0;
        for p in parts {
            let o = stacked.offs;
            views.push(DeviceMatrix {
                buf: stacked.buf.clone(),
                offs: [
                    o[0] + (row0 * wr) as u64,
                    o[1] + (row0 * sr) as u64,
                    o[2] + (row0 * sr) as u64,
                ],
                rows: p.rows,
                dev: stacked.dev.clone(),
                kind: p.kind,
                cols: p.cols,
                params: p.params,
            });
            row0 += p.rows;
        }
        Ok(Some((stacked, views)))
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bit width and group size.
    pub fn params(&self) -> QuantParams {
        self.params
    }

    /// The scale type (see [`super::scale_kind`]).
    pub fn kind(&self) -> u32 {
        self.kind
    }

    /// The device addresses of the words, scales and biases for a kernel on `stream`; the
    /// guard records the read when dropped (after the launch).
    pub fn packed<'a>(&'a self, stream: &'a CudaStream) -> (super::Packed, SyncOnDrop<'a>) {
        let (base, guard) = self.buf.device_ptr(stream);
        (super::Packed::at(base, self.offs), guard)
    }

    fn wrap(&self, s: CudaSlice<f32>, shape: (usize, usize)) -> Tensor {
        super::wrap(&self.dev, s, shape)
    }

    /// Launches `packed_rows` for `n` rows (which: `rows`) into `out`.
    fn rows_into(
        &self,
        rows: RowsFrom<'_>,
        n: usize,
        out: &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let (_, rows_kernel) = kernels(&self.dev)?;
        let stream = self.dev.cuda_stream();
        let (bits, group, cols) = (
            self.params.bits as u32,
            self.params.group_size as u32,
            self.cols as u32,
        );
        let nu = n as u32;
        let nrows = self.rows as u32;
        // The kernel's three forms: ids by value, `row0..`, or ids in device memory (`at`, null
        // otherwise; `row0` 0xffffffff unless set).
        let none = Ids { id: [0; IDS] };
        let (ids, r0, at, _read) = match rows {
            RowsFrom::Ids(ids) => (ids, u32::MAX, 0, None),
            RowsFrom::From(r0) => (none, r0, 0, None),
            RowsFrom::At(a) => {
                let (p, g) = a.device_ptr(&stream);
                (none, u32::MAX, p, Some(g))
            }
        };
        let mut b = stream.launch_builder(rows_kernel);
        b.arg(&*self.buf)
            .arg(&self.offs[0])
            .arg(&self.offs[1])
            .arg(&self.offs[2])
            .arg(&self.kind)
            .arg(&ids)
            .arg(&r0)
            .arg(&nu)
            .arg(out)
            .arg(&cols)
            .arg(&bits)
            .arg(&group)
            .arg(&at)
            .arg(&nrows);
        let cfg = LaunchConfig {
            grid_dim: ((n * self.cols).div_ceil(256).min(1 << 16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: reads rows below `rows` (checked by the callers; ids from `at` are clamped
        // by the kernel, and `at` holds `n` of them) of the packed matrix in `buf` and writes
        // `n · cols` values into `out`, which holds that many.
        unsafe { b.launch(cfg) }.map_err(|e| driver("packed row kernel", e))?;
        Ok(())
    }

    /// Rows `ids` decoded to f32: `[ids.len(), cols]` (embedding lookups).
    pub fn decode_rows(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.rows) {
            return Err(Error::Input(format!(
                "internal: row {bad} of a {}-row matrix",
                self.rows
            )));
        }
        let cols = self.cols;
        // SAFETY: every element is written by the launches below.
        let mut out: CudaSlice<f32> = unsafe { self.dev.cuda_stream().alloc(ids.len() * cols) }
            .map_err(|e| driver("allocation", e))?;
        for (c, chunk) in ids.chunks(IDS).enumerate() {
            let mut id = Ids { id: [0; IDS] };
            id.id[..chunk.len()].copy_from_slice(chunk);
            let mut dst = out.slice_mut(c * IDS * cols..(c * IDS + chunk.len()) * cols);
            self.rows_into(RowsFrom::Ids(id), chunk.len(), &mut dst)?;
        }
        Ok(self.wrap(out, (ids.len(), cols)))
    }

    /// The row whose id is in device memory (`at[0]`, read when the launch runs: a CUDA
    /// graph embeds the token its previous launch chose) decoded to f32: `[1, cols]`.
    pub fn decode_row_at(&self, at: &CudaSlice<u32>) -> Result<Tensor> {
        if at.is_empty() {
            return Err(Error::Input("internal: no device row id".into()));
        }
        let cols = self.cols;
        // SAFETY: every element is written by the launch.
        let mut out: CudaSlice<f32> =
            unsafe { self.dev.cuda_stream().alloc(cols) }.map_err(|e| driver("allocation", e))?;
        let mut dst = out.slice_mut(..);
        self.rows_into(RowsFrom::At(at), 1, &mut dst)?;
        Ok(self.wrap(out, (1, cols)))
    }

    /// The whole matrix as f32 `[rows, cols]` (a temporary for long inputs).
    pub fn decode_all(&self) -> Result<Tensor> {
        let n = self.rows * self.cols;
        // SAFETY: every element is written by the launch.
        let mut out: CudaSlice<f32> =
            unsafe { self.dev.cuda_stream().alloc(n) }.map_err(|e| driver("allocation", e))?;
        let mut dst = out.slice_mut(..);
        self.rows_into(RowsFrom::From(0), self.rows, &mut dst)?;
        Ok(self.wrap(out, (self.rows, self.cols)))
    }

    /// `x Wᵀ` for `x` `[T, cols]` (f32, this device): `[T, rows]`.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        self.matmul_normed(x, None)
    }

    /// `norm(x) Wᵀ` where `norm` is `(weights, eps)` of an RMSNorm over `x`'s rows (in the
    /// matrix-vector kernel for up to 8 tokens), else `x Wᵀ`.
    pub fn matmul_normed(&self, x: &Tensor, norm: Option<(&Tensor, f32)>) -> Result<Tensor> {
        let (t, c) = x.dims2()?;
        if c != self.cols {
            return Err(Error::Input(format!(
                "internal: [{t}, {c}] input to a [{}, {}] matrix",
                self.rows, self.cols
            )));
        }
        if t > MATVEC_TOKENS {
            let x = match norm {
                Some((w, eps)) => candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)?,
                None => x.clone(),
            };
            return Ok(x.matmul(&self.decode_all()?.t()?)?);
        }
        let nw = match norm {
            Some((w, _)) => Some(w.contiguous()?),
            None => None,
        };
        if nw.as_ref().is_some_and(|w| w.elem_count() != c) {
            return Err(Error::Input(format!(
                "internal: norm of {} weights before a [{}, {c}] matrix",
                nw.as_ref().map_or(0, |w| w.elem_count()),
                self.rows
            )));
        }
        let eps = norm.map_or(0.0, |(_, e)| e);
        let nw_guard = nw.as_ref().map(|w| w.storage_and_layout());
        let nw_ptr: u64 = match &nw_guard {
            Some((st, layout)) => {
                let Storage::Cuda(cs) = &**st else {
                    return Err(Error::Input(
                        "internal: norm weights are not on the GPU".into(),
                    ));
                };
                let v = cs.as_cuda_slice::<f32>()?;
                let (p, _) = v.device_ptr(&self.dev.cuda_stream());
                p + 4 * layout.start_offset() as u64
            }
            None => 0,
        };
        let (matvec, _) = kernels(&self.dev)?;
        let x = x.contiguous()?;
        let (st, layout) = x.storage_and_layout();
        let Storage::Cuda(cs) = &*st else {
            return Err(Error::Input("internal: input is not on the GPU".into()));
        };
        let xs = cs.as_cuda_slice::<f32>()?;
        let xv = xs.slice(layout.start_offset()..layout.start_offset() + t * c);
        let stream = self.dev.cuda_stream();
        // SAFETY: every element is written by the kernel.
        let mut y: CudaSlice<f32> =
            unsafe { stream.alloc(t * self.rows) }.map_err(|e| driver("allocation", e))?;
        let (rows, cols, tu) = (self.rows as u32, c as u32, t as u32);
        let (bits, group) = (self.params.bits as u32, self.params.group_size as u32);
        let (m, guard) = self.packed(&stream);
        let mut b = stream.launch_builder(matvec);
        b.arg(&m)
            .arg(&self.kind)
            .arg(&xv)
            .arg(&mut y)
            .arg(&rows)
            .arg(&cols)
            .arg(&tu)
            .arg(&bits)
            .arg(&group)
            .arg(&nw_ptr)
            .arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (
                super::row_blocks(matvec, &stream, self.rows, super::x_bytes(self.cols)),
                1,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: super::x_bytes(self.cols) as u32,
        };
        // SAFETY: each block copies the T inputs into the shared memory sized for one of them
        // (and reads the `cols` norm weights, checked above, where given);
        // each warp reads packed rows in `buf` and writes their T outputs into `y` (T · rows
        // values).
        unsafe { b.launch(cfg) }.map_err(|e| driver("packed matrix-vector kernel", e))?;
        drop((st, guard, nw_guard));
        Ok(self.wrap(y, (t, self.rows)))
    }
}
