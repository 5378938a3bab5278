//! Compute devices by backend name, with the reason when a backend is not built in or not
//! present, and the GPU memory check.

use candle_core::Device;

use crate::error::{Error, Result};

named_enum! {
    /// A compute backend, as named on the command line (`--device`) and in experiment files
    /// (`[model] backend`).
    pub enum Backend {
        /// The host CPU (every build).
        #[default]
        Cpu = "cpu",
        /// An NVIDIA GPU (builds with `--features cuda`).
        Cuda = "cuda",
        /// An Apple GPU (builds with `--features metal`).
        Metal = "metal",
    }
}

impl Backend {
    /// The device, with a clear error when this binary was built without the backend or the
    /// machine has no such device.
    pub fn device(self) -> Result<Device> {
        let built = |feature: &str| {
            Error::Input(format!(
                "backend `{self}`: this harness was built without `--features {feature}` (rebuild with `cargo build --release --features {feature}`)"
            ))
        };
        match self {
            Backend::Cpu => Ok(Device::Cpu),
            Backend::Cuda => {
                let dev = Device::new_cuda(0).map_err(|e| match e {
                    candle_core::Error::NotCompiledWithCudaSupport => built("cuda"),
                    e => Error::Input(format!("backend `cuda`: no usable CUDA device: {e}")),
                })?;
                crate::experts::upload::keep_pool_memory(&dev);
                disable_event_tracking(&dev);
                Ok(dev)
            }
            Backend::Metal => Device::new_metal(0).map_err(|e| match e {
                candle_core::Error::NotCompiledWithMetalSupport => built("metal"),
                e => Error::Input(format!("backend `metal`: no usable Metal device: {e}")),
            }),
        }
    }
}

/// What produced a number: `cpu`, `cuda:0`, `metal:0` — the device a result came from, as every
/// output of the engine names it.
pub fn describe(dev: &Device) -> String {
    match dev.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Free and total memory of the current CUDA device, when this is a CUDA build on a GPU.
pub fn gpu_memory(dev: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        return candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
            .ok()
            .map(|(f, t)| (f as u64, t as u64));
    }
    let _ = dev;
    None
}

/// Turns off cudarc's per-buffer CUDA events (unless `HARNESS_CUDA_EVENTS` is set, the switch
/// to rule them out when a result looks racy). With them on, every kernel argument records an
/// event and every allocation creates two: host work that bounds a decode token's launches.
/// The engine orders its streams itself instead: every buffer a copy stream fills is
/// synchronized before the compute stream sees it (`experts::upload`), an expert's buffers are
/// freed only after the compute stream finished with them (`ExpertWeights`'s `Drop`, the
/// device-routing tables' `Drop`), and everything else runs on the one compute stream.
fn disable_event_tracking(dev: &Device) {
    #[cfg(feature = "cuda")]
    if let (Device::Cuda(d), None) = (dev, std::env::var_os("HARNESS_CUDA_EVENTS")) {
        // SAFETY: the cross-stream orderings above are kept by the engine (see the doc).
        unsafe { d.disable_event_tracking() };
    }
    let _ = dev;
}

/// Whether the host holds MLX 4-bit matrices in 8-row tiles (`PackedMatrix::tile`): on the CPU
/// with an int8 kernel kind, whose tile kernels they feed, unless `HARNESS_TILES=0` (A/B runs
/// of the row layout). Exact engines keep the checkpoint's layout, read in place.
pub(super) fn tiles_for(device: &Device, kernels: crate::weights::kernels::Kernels) -> bool {
    device.is_cpu()
        && kernels != crate::weights::kernels::Kernels::Exact
        && crate::weights::packed::tiles_on()
}

/// What the CPU's products ran with, as reports name it: the kernel kind and the SIMD form
/// (`int8/avx2`, `exact/neon`; `int8x2/avx512-vnni tiles` where the int8 kinds read 8-row
/// tiles, `int8x2/avx512-vnni tiles, 512-bit` where pairs of them fill 512-bit vectors), and in brackets the forms an A/B run turned off (so that its figures say what ran).
/// `tiles`: dense matrices were loaded into tiles (experts follow the kind in effect).
pub(super) fn cpu_kernels_label(kernels: crate::weights::kernels::Kernels, tiles: bool) -> String {
    use crate::weights::kernels::{q4, Kernels};
    let simd = q4::Simd::current();
    let mut off = crate::models::forms_turned_off();
    let form = match kernels {
        Kernels::Exact => {
            if tiles {
                off.push("exact through copies of tiled rows");
            }
            simd.name().to_string()
        }
        _ if tiles && q4::tile::vnni512_available() => "avx512-vnni tiles, 512-bit".to_string(),
        _ if tiles => {
            if q4::tile::vnni512_turned_off() {
                off.push("tiles on 256-bit vectors");
            }
            format!("{} tiles", simd.int8_name())
        }
        _ => {
            // Only where tiles could have been (elsewhere rows are the one layout).
            if q4::tile::simd_here() {
                off.push("rows untiled");
            }
            simd.int8_name().to_string()
        }
    };
    match off.is_empty() {
        true => format!("{kernels}/{form}"),
        false => format!("{kernels}/{form} ({})", off.join(", ")),
    }
}
