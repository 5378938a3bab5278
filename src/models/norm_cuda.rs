//! The residual add and the RMSNorm after it in one launch on CUDA (a child module of
//! [`super`]): `h' = h + a`, `x = h' · rsqrt(mean(h'²) + eps) · w` per row, one block per row.
//! Per decoder layer this replaces four launches (two adds, two norms) by two.

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, LaunchConfig, PushKernelArg,
};
use candle_core::{CudaDevice, DType, Device, Storage, Tensor};

use super::RmsNorm;
use crate::error::{Error, Result};
use crate::weights::cuda::{driver, wrap};

const SRC: &str = r#"
extern "C" __global__ void add_rms_norm(const float* h, const float* a, const float* w,
                                        float eps, unsigned int n, float* h_out, float* x_out) {
__shared__ float red[32];
unsigned long long row = (unsigned long long)blockIdx.x * n;
unsigned int tid = threadIdx.x, nt = blockDim.x;
float ss = 0.0f;
for (unsigned int i = tid; i < n; i += nt) {
    float v = __fadd_rn(h[row + i], a[row + i]);
    h_out[row + i] = v;
    ss = fmaf(v, v, ss);
}
for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
if (tid % 32u == 0u) red[tid / 32u] = ss;
__syncthreads();
float t = 0.0f;
for (unsigned int i = 0; i < nt / 32u; ++i) t += red[i];
float scale = rsqrtf(t / (float)n + eps);
for (unsigned int i = tid; i < n; i += nt) x_out[row + i] = scale * h_out[row + i] * w[i];
}
"#;

static KERNELS: crate::weights::cuda::KernelSet = crate::weights::cuda::KernelSet::new();

/// `add_rms_norm` for `dev`; `None` (separate add and norm) where it failed to compile, said
/// once, or on a second device.
fn kernel(dev: &CudaDevice) -> Option<&'static CudaFunction> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    KERNELS
        .get_or_warn(
            dev,
            || SRC.to_string(),
            &["add_rms_norm"],
            &WARNED,
            "fused add + RMSNorm kernel",
            "separate add and norm",
        )
        .map(|f| &f[0])
}

impl RmsNorm {
    /// `(h + a, norm(h + a))` in one launch where `h`, `a` are f32 `[T, n]` on a CUDA device;
    /// `None` otherwise.
    pub(super) fn add_forward_cuda(
        &self,
        h: &Tensor,
        a: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let Device::Cuda(dev) = h.device() else {
            return Ok(None);
        };
        let (t, n) = h.dims2()?;
        if a.dims2()? != (t, n) || h.dtype() != DType::F32 || a.dtype() != DType::F32 {
            return Ok(None);
        }
        let Some(f) = kernel(dev) else {
            return Ok(None);
        };
        let (h, a, w) = (
            h.contiguous()?,
            a.contiguous()?,
            self.weight().contiguous()?,
        );
        let stream = dev.cuda_stream();
        // SAFETY (both): the kernel writes every element.
        let mut h_out: CudaSlice<f32> =
            unsafe { stream.alloc(t * n) }.map_err(|e| driver("allocation", e))?;
        let mut x_out: CudaSlice<f32> =
            unsafe { stream.alloc(t * n) }.map_err(|e| driver("allocation", e))?;
        let (hs, hl) = h.storage_and_layout();
        let (as_, al) = a.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (Storage::Cuda(hc), Storage::Cuda(ac), Storage::Cuda(wc)) = (&*hs, &*as_, &*ws) else {
            return Err(Error::Input(
                "internal: norm input is not on the GPU".into(),
            ));
        };
        let hv = hc.as_cuda_slice::<f32>()?;
        let hv = hv.slice(hl.start_offset()..hl.start_offset() + t * n);
        let av = ac.as_cuda_slice::<f32>()?;
        let av = av.slice(al.start_offset()..al.start_offset() + t * n);
        let wv = wc.as_cuda_slice::<f32>()?;
        let wv = wv.slice(wl.start_offset()..wl.start_offset() + n);
        let (eps, nu) = (self.eps(), n as u32);
        let mut b = stream.launch_builder(f);
        b.arg(&hv)
            .arg(&av)
            .arg(&wv)
            .arg(&eps)
            .arg(&nu)
            .arg(&mut h_out)
            .arg(&mut x_out);
        let cfg = LaunchConfig {
            grid_dim: (t as u32, 1, 1),
            block_dim: (1024.min(n.div_ceil(32) * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: block r reads row r of h and a (n values each) and the n weights, and writes
        // row r of both outputs, allocated for T·n values.
        unsafe { b.launch(cfg) }.map_err(|e| driver("add + RMSNorm kernel", e))?;
        drop((hs, as_, ws));
        Ok(Some((wrap(dev, h_out, (t, n)), wrap(dev, x_out, (t, n)))))
    }
}
