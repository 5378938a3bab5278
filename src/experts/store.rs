//! The expert store: for every routed expert, a handle naming the exact byte ranges of its three
//! projections in the shard files, and the miss path that reads exactly those bytes (positioned
//! reads, never the whole tensor) and turns them into matrices the model can run: on the CPU an
//! MLX-quantized expert stays packed; on a GPU the checkpoint bytes are uploaded as they are
//! (see [`super::upload`]) and decoded to f32 on the device.
//!
//! Building the store reads headers only: zero expert bytes are read at load time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::config::{ModelSpec, QuantParams};
use crate::error::{Error, Result};
use crate::weights::host::HostMatrix;
use crate::weights::layout::{ExpertLayout, Prefix};
use crate::weights::matrix::{FloatMatrix, Floats, Source};
use crate::weights::packed::PackedMatrix;
use crate::weights::storage::IoMode;
use crate::weights::{quant, quantized_parts, ByteRange, Checkpoint, DType, IoSetup};

use super::upload::{GpuExperts, Part, QuantProj, Staging, TransferStats, Uploader};
use super::ExpertKey;

/// Where one projection matrix `[rows, cols]` of an expert is stored.
#[derive(Debug, Clone)]
pub enum ProjSource {
    /// Plain floats.
    Float {
        /// Data range.
        data: ByteRange,
        /// Element type.
        dtype: DType,
    },
    /// MLX affine quantized.
    Quant {
        /// Packed words.
        weight: ByteRange,
        /// Scales.
        scales: ByteRange,
        /// Biases.
        biases: ByteRange,
        /// Scale/bias element type.
        scale_dtype: DType,
        /// Bits and group size.
        params: QuantParams,
    },
}

impl ProjSource {
    /// Every byte range of this projection.
    fn ranges(&self) -> Vec<ByteRange> {
        match self {
            ProjSource::Float { data, .. } => vec![*data],
            ProjSource::Quant {
                weight,
                scales,
                biases,
                ..
            } => vec![*weight, *scales, *biases],
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            ProjSource::Float { data, .. } => data.len,
            ProjSource::Quant {
                weight,
                scales,
                biases,
                ..
            } => weight.len + scales.len + biases.len,
        }
    }
}

/// Handle of one routed expert: gate, up, down projection sources.
#[derive(Debug, Clone)]
pub struct ExpertHandle {
    /// (gate `[I, H]`, up `[I, H]`, down `[H, I]`).
    pub proj: [ProjSource; 3],
    /// Checkpoint bytes of the expert (all three projections, scales and biases included).
    pub bytes: u64,
}

impl ExpertHandle {
    /// Every byte range of the expert, in reading order.
    pub fn ranges(&self) -> Vec<ByteRange> {
        self.proj.iter().flat_map(ProjSource::ranges).collect()
    }
}

/// The matrices of a resident expert.
// Every expert lives behind an `Arc`, so the larger variant costs nothing per reference.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ExpertMats {
    /// f32 tensors on the compute device: gate rows then up rows `[2I, H]`, and down `[H, I]`.
    Dense {
        /// `[2I, H]`.
        gate_up: Tensor,
        /// `[H, I]`.
        down: Tensor,
    },
    /// MLX-quantized experts on a CUDA GPU, kept packed in GPU memory.
    #[cfg(feature = "cuda")]
    DevicePacked(super::upload::DevicePacked),
    /// Experts on the CPU in their checkpoint form (MLX-packed, or floats in their type: the
    /// budget's bytes are the bytes held), decoded or widened inside each product.
    Host {
        /// Gate `[I, H]`.
        gate: HostMatrix,
        /// Up `[I, H]`.
        up: HostMatrix,
        /// Down `[H, I]`.
        down: HostMatrix,
    },
}

/// A checkpoint opened for the engine: validated shards, where the model's tensors live, and a
/// handle for every routed expert. The one open sequence (checkpoint → key prefix → expert
/// layout → store) that the engine, `inspect` and `simulate --model` share.
#[derive(Debug)]
pub struct OpenCheckpoint {
    /// The shards, every header validated.
    pub ck: Arc<Checkpoint>,
    /// Where the decoder layers, embeddings and head live.
    pub prefix: Prefix,
    /// The expert handles (no expert bytes read).
    pub store: ExpertStore,
}

impl OpenCheckpoint {
    /// Opens `dir` for `spec`, with expert misses served on `device`.
    pub fn open(dir: &std::path::Path, spec: &ModelSpec, device: Device) -> Result<Self> {
        let ck = Arc::new(Checkpoint::open(dir)?);
        let prefix = crate::weights::layout::detect_prefix(&ck)?;
        let layout = crate::weights::layout::detect_experts(&ck, spec, &prefix)?;
        let store = ExpertStore::new(ck.clone(), spec, &prefix, layout, device)?;
        Ok(OpenCheckpoint { ck, prefix, store })
    }

    /// Checkpoint bytes of the dense tensors the model uses: every tensor of its decoder layers
    /// (not an MTP layer beyond them, not a vision tower), its embeddings, final norm and head,
    /// less the routed experts.
    pub fn dense_bytes(&self, spec: &ModelSpec) -> u64 {
        let p = &self.prefix;
        let used = |key: &str| {
            if let Some(rest) = key.strip_prefix(&p.layers) {
                let idx: Option<usize> = rest.split('.').next().and_then(|s| s.parse().ok());
                return idx.is_some_and(|i| i < spec.num_layers);
            }
            key.starts_with(&format!("{}embed_tokens", p.model))
                || key.starts_with(&format!("{}norm", p.model))
                || key.starts_with(&p.lm_head)
        };
        let total: u64 = self
            .ck
            .keys()
            .filter(|k| used(k))
            .map(|k| self.ck.get(k).map_or(0, |e| e.len))
            .sum();
        total.saturating_sub(self.store.total_bytes())
    }
}

/// Why misses cannot be copied straight from registered shard mappings under `io`, with
/// `expert_bytes` to lock on a host of `host_memory` bytes: they read around the page cache,
/// they are slowed to an emulated device, or the experts exceed half of the host's memory (or
/// its size is unknown). `None`: they can.
fn not_registrable(io: &IoSetup, expert_bytes: u64, host_memory: Option<u64>) -> Option<String> {
    if io.effective != IoMode::PageCache {
        return Some(format!(
            "misses read with io `{}`, around the page cache",
            io.effective
        ));
    }
    if let Some(d) = io.device {
        return Some(format!(
            "misses are slowed to an emulated storage device ({d})"
        ));
    }
    match host_memory.map(|m| m / 2) {
        Some(c) if expert_bytes <= c => None,
        Some(c) => Some(format!(
            "the experts' {:.2} GB exceed half of this host's memory ({:.2} GB)",
            expert_bytes as f64 / 1e9,
            c as f64 / 1e9
        )),
        None => Some("this host's memory size is unknown".into()),
    }
}

/// A resident expert, ready to run.
#[derive(Debug)]
pub struct ExpertWeights {
    /// Its matrices.
    pub mats: ExpertMats,
    /// Checkpoint bytes this expert accounts for in the cache budget.
    pub bytes: u64,
}

/// Set while the host follows a decode step's MoE gates (`crate::experts::upload::Gates`): the
/// step's graph then waits at a gate for the host, so waiting for the compute stream there
/// would never end. Every expert the step's kernels read is held by the step until it has run
/// (`models::device_routing`), so an expert dropped meanwhile is read by no queued kernel.
#[cfg(feature = "cuda")]
static GATED_STEP: AtomicBool = AtomicBool::new(false);

/// Marks the time the host follows a step's gates (see `GATED_STEP`); cleared when dropped.
#[cfg(feature = "cuda")]
pub(crate) struct GatedStep(());

#[cfg(feature = "cuda")]
impl GatedStep {
    /// Starts the mark.
    pub(crate) fn start() -> Self {
        GATED_STEP.store(true, Ordering::SeqCst);
        GatedStep(())
    }
}

#[cfg(feature = "cuda")]
impl Drop for GatedStep {
    fn drop(&mut self) {
        GATED_STEP.store(false, Ordering::SeqCst);
    }
}

impl Drop for ExpertWeights {
    fn drop(&mut self) {
        // A GPU expert's buffers were made on a copy stream and are freed there, while kernels
        // queued on the compute stream may still read them (with cudarc's event tracking off,
        // nothing else orders the two): wait for the compute stream first. Evictions happen
        // after a router's logits came back, so the stream is then usually idle already; while
        // a gated step runs, no queued kernel reads an expert that is dropped (`GATED_STEP`).
        #[cfg(feature = "cuda")]
        if !GATED_STEP.load(Ordering::SeqCst) {
            let dev = match &self.mats {
                ExpertMats::DevicePacked(p) => Some(p.device().clone()),
                ExpertMats::Dense { gate_up, .. } => match gate_up.device() {
                    candle_core::Device::Cuda(d) => Some(d.clone()),
                    _ => None,
                },
                ExpertMats::Host { .. } => None,
            };
            if let Some(d) = dev {
                let _ = d.cuda_stream().synchronize();
            }
        }
    }
}

/// All routed experts of a checkpoint, by layer.
#[derive(Debug)]
pub struct ExpertStore {
    ck: Arc<Checkpoint>,
    hidden: usize,
    inter: usize,
    /// Handles indexed by decoder layer (empty for dense layers), then expert id.
    handles: Vec<Vec<ExpertHandle>>,
    layout: ExpertLayout,
    device: Device,
    uploader: Uploader,
    /// Use the device miss path even on the CPU (tests of the GPU path's arithmetic).
    device_path: AtomicBool,
    /// The staging asked for and what is in effect (for reports).
    staging: std::sync::Mutex<(Staging, String)>,
    /// The host miss path holds MLX 4-bit experts in 8-row tiles (the int8 kernels' layout).
    host_tiles: AtomicBool,
}

impl ExpertStore {
    /// Builds handles for every expert of every MoE layer, validating names, dtypes and shapes
    /// against the config. Reads no expert bytes.
    pub fn new(
        ck: Arc<Checkpoint>,
        spec: &ModelSpec,
        prefix: &Prefix,
        layout: ExpertLayout,
        device: Device,
    ) -> Result<Self> {
        let (h, i, e_n) = (
            spec.hidden_size,
            spec.moe.intermediate_size,
            spec.moe.num_experts,
        );
        let dims = [(i, h), (i, h), (h, i)];
        let quant = spec.quantization.as_ref();
        let module = crate::weights::layout::moe_module(spec, layout);
        let mut handles = vec![Vec::new(); spec.num_layers];
        for &layer in &spec.moe.moe_layers {
            let mut experts = Vec::with_capacity(e_n);
            match layout {
                ExpertLayout::PerExpert => {
                    for e in 0..e_n {
                        let proj: Vec<ProjSource> = (0..3)
                            .map(|p| {
                                let module = prefix.layer(
                                    layer,
                                    &format!("{module}.experts.{e}.{}", spec.keys.expert_proj[p]),
                                );
                                source(&ck, quant, &module, None, dims[p])
                            })
                            .collect::<Result<_>>()?;
                        experts.push(handle(proj));
                    }
                }
                ExpertLayout::Stacked => {
                    let names = ["gate_proj", "up_proj", "down_proj"];
                    let stacked: Vec<ProjSource> = (0..3)
                        .map(|p| {
                            let module =
                                prefix.layer(layer, &format!("{module}.switch_mlp.{}", names[p]));
                            source(&ck, quant, &module, Some(e_n), dims[p])
                        })
                        .collect::<Result<_>>()?;
                    for e in 0..e_n {
                        let slice = |r: &ByteRange| ByteRange {
                            shard: r.shard,
                            offset: r.offset + e as u64 * (r.len / e_n as u64),
                            len: r.len / e_n as u64,
                        };
                        let proj = stacked
                            .iter()
                            .map(|s| match s {
                                ProjSource::Float { data, dtype } => ProjSource::Float {
                                    data: slice(data),
                                    dtype: *dtype,
                                },
                                ProjSource::Quant {
                                    weight,
                                    scales,
                                    biases,
                                    scale_dtype,
                                    params,
                                } => ProjSource::Quant {
                                    weight: slice(weight),
                                    scales: slice(scales),
                                    biases: slice(biases),
                                    scale_dtype: *scale_dtype,
                                    params: *params,
                                },
                            })
                            .collect();
                        experts.push(handle(proj));
                    }
                }
            }
            handles[layer] = experts;
        }
        Ok(ExpertStore {
            ck,
            hidden: h,
            inter: i,
            handles,
            layout,
            uploader: Uploader::new(device.clone()),
            device_path: (!device.is_cpu()).into(),
            staging: std::sync::Mutex::new((Staging::Auto, String::new())),
            host_tiles: false.into(),
            device,
        })
    }

    /// The handle of an expert.
    pub fn handle(&self, key: ExpertKey) -> &ExpertHandle {
        &self.handles[key.layer as usize][key.expert as usize]
    }

    /// Checkpoint bytes of one expert (what the cache budget counts).
    pub fn expert_bytes(&self, key: ExpertKey) -> u64 {
        self.handle(key).bytes
    }

    /// The checkpoint the experts are read from.
    pub fn checkpoint(&self) -> &Arc<Checkpoint> {
        &self.ck
    }

    /// The rate (bytes/s) at which this machine reads whole experts now: the experts `keys`
    /// (every byte range of each), on `threads` threads at once, in the checkpoint's current
    /// read mode. In `cold` mode the caller drops the page cache first.
    pub fn read_rate(&self, keys: &[ExpertKey], threads: usize) -> Result<f64> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let t0 = std::time::Instant::now();
        let read_one = || -> Result<u64> {
            let mut buf = Vec::new();
            let mut bytes = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&k) = keys.get(i) else {
                    return Ok(bytes);
                };
                for r in self.handle(k).ranges() {
                    self.read(&r, &mut buf)?;
                    bytes += r.len;
                }
            }
        };
        let bytes: u64 = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..threads.max(1)).map(|_| sc.spawn(read_one)).collect();
            hs.into_iter()
                .map(|h| h.join().expect("reader thread"))
                .sum::<Result<u64>>()
        })?;
        Ok(bytes as f64 / t0.elapsed().as_secs_f64().max(1e-9))
    }

    /// Checkpoint bytes of every routed expert of every MoE layer.
    pub fn total_bytes(&self) -> u64 {
        self.handles.iter().flatten().map(|h| h.bytes).sum()
    }

    /// The detected layout.
    pub fn layout(&self) -> ExpertLayout {
        self.layout
    }

    /// Expert bytes the miss path took from the shards so far: read, or copied straight from
    /// registered mappings.
    pub fn bytes_read(&self) -> u64 {
        self.ck.bytes_read() + self.uploader.mapped_bytes()
    }

    /// Makes misses take the device path ([`ExpertStore::load_on_device`]) even on the CPU, so
    /// the arithmetic of the GPU miss path can be checked where no GPU is. Off devices other
    /// than the CPU always take it.
    pub fn set_device_path(&self, on: bool) {
        let on = on || !self.device.is_cpu();
        self.device_path.store(on, Ordering::Relaxed);
    }

    /// Hold MLX 4-bit experts loaded on the host from now on in 8-row tiles (`PackedMatrix::tile`,
    /// the engine's choice for the int8 kinds). Cached experts keep theirs; both run any kernel.
    pub fn set_host_tiles(&self, on: bool) {
        self.host_tiles.store(on, Ordering::Relaxed);
    }

    /// Keep MLX-quantized experts packed in GPU memory (default on CUDA) or decode them to f32
    /// at upload.
    pub fn set_gpu_experts(&self, form: GpuExperts) {
        self.uploader.set_gpu_experts(form);
    }

    /// Whether quantized experts stay packed on the GPU (CUDA device, MLX-quantized experts).
    pub fn gpu_packed(&self) -> bool {
        self.uploader.gpu_packed() && self.quantized()
    }

    /// Whether every routed expert is MLX-quantized.
    pub fn quantized(&self) -> bool {
        self.handles
            .iter()
            .flatten()
            .all(|h| h.proj.iter().all(|p| matches!(p, ProjSource::Quant { .. })))
    }

    /// Puts `asked` (how CUDA misses reach the copy engine, see [`Staging`]) in effect under
    /// the checkpoint's current I/O mode (the engine calls it after every
    /// [`Checkpoint::set_io`]): registers the experts' ranges of the shard mappings when
    /// misses go through the page cache with no emulated device, the experts' bytes are at
    /// most half of the host's memory and the driver agrees; otherwise unregisters and stages
    /// (an error if `registered` was asked for). Off CUDA nothing is staged (`registered` is
    /// an error there too).
    pub fn apply_staging(&self, asked: Staging) -> Result<()> {
        if self.staging.lock().expect("staging").0 != asked {
            self.uploader.set_staging(asked);
            self.staging.lock().expect("staging").0 = asked;
        }
        if !self.device.is_cuda() {
            if asked == Staging::Registered {
                return Err(Error::Input(
                    "staging `registered` needs --device cuda (registered shard mappings are the CUDA miss path's)".into(),
                ));
            }
            self.staging.lock().expect("staging").1 = "no".into();
            return Ok(());
        }
        if !matches!(asked, Staging::Auto | Staging::Registered) {
            self.uploader.unregister();
            self.staging.lock().expect("staging").1 = asked.to_string();
            return Ok(());
        }
        let mut why_not = not_registrable(
            &self.ck.io_setup(),
            self.total_bytes(),
            crate::weights::storage::meminfo_bytes("MemTotal"),
        );
        if why_not.is_none() && !self.uploader.registered() {
            let ranges: Vec<ByteRange> = self
                .handles
                .iter()
                .flatten()
                .flat_map(|h| h.ranges())
                .collect();
            let maps = (0..self.ck.num_shards())
                .map(|i| self.ck.shard_map(i))
                .collect();
            match self.uploader.register(maps, &ranges) {
                Ok((b, secs)) => {
                    self.staging.lock().expect("staging").1 = format!(
                        "registered ({:.2} GB of expert bytes page-locked in {secs:.1} s)",
                        b as f64 / 1e9
                    )
                }
                Err(e) => why_not = Some(e),
            }
        }
        if let Some(why) = why_not {
            self.uploader.unregister();
            if asked == Staging::Registered {
                return Err(Error::Input(format!("staging `registered`: {why}")));
            }
            self.staging.lock().expect("staging").1 =
                format!("write-combined (not registered: {why})");
        }
        Ok(())
    }

    /// Whether CUDA misses are copied straight from registered shard mappings now.
    pub fn registered(&self) -> bool {
        self.uploader.registered()
    }

    /// The staging in effect, as reports print it.
    pub fn staging_label(&self) -> String {
        self.staging.lock().expect("staging").1.clone()
    }

    /// Reader threads per upload on CUDA (see [`Uploader::set_read_threads`]).
    pub fn set_read_threads(&self, n: usize) {
        self.uploader.set_read_threads(n);
    }

    /// Host→device transfer counters of the device miss path.
    pub fn transfer_stats(&self) -> TransferStats {
        self.uploader.stats()
    }

    /// The miss path: reads exactly the expert's byte ranges. On the CPU an MLX-quantized expert
    /// stays packed and a float one becomes f32; on any other device the checkpoint bytes are
    /// uploaded and decoded there ([`ExpertStore::load_on_device`]).
    pub fn load(&self, key: ExpertKey) -> Result<Arc<ExpertWeights>> {
        if self.device_path.load(Ordering::Relaxed) {
            return self.load_on_device(key);
        }
        self.load_on_host(key)
    }

    /// The device miss path: the expert's checkpoint bytes (packed words, scales and biases, or
    /// floats) are staged and copied to the device as they are, then decoded there to f32
    /// `[2I, H]` (gate rows then up rows) and `[H, I]`. Works on every device, the CPU included.
    pub fn load_on_device(&self, key: ExpertKey) -> Result<Arc<ExpertWeights>> {
        let hd = self.handle(key);
        let (h, i) = (self.hidden, self.inter);
        let dims = [(i, h), (i, h), (h, i)];
        let mut parts = Vec::with_capacity(9);
        for (p, src) in hd.proj.iter().enumerate() {
            let (rows, cols) = dims[p];
            match src {
                ProjSource::Float { data, dtype } => parts.push(Part {
                    range: *data,
                    dtype: candle_dtype(*dtype)?,
                    shape: (rows, cols),
                }),
                ProjSource::Quant {
                    weight,
                    scales,
                    biases,
                    scale_dtype,
                    params,
                } => {
                    let groups = (rows, cols / params.group_size);
                    let sd = candle_dtype(*scale_dtype)?;
                    parts.push(Part {
                        range: *weight,
                        dtype: candle_core::DType::U8,
                        shape: (rows, cols * params.bits / 8),
                    });
                    parts.push(Part {
                        range: *scales,
                        dtype: sd,
                        shape: groups,
                    });
                    parts.push(Part {
                        range: *biases,
                        dtype: sd,
                        shape: groups,
                    });
                }
            }
        }
        let read = |r: &ByteRange, buf: &mut [u8]| self.ck.read_at(r.shard, r.offset, buf);
        let quant: Vec<QuantProj> = hd
            .proj
            .iter()
            .zip(dims)
            .filter_map(|(src, (rows, cols))| match src {
                ProjSource::Quant { params, .. } => Some(QuantProj {
                    rows,
                    cols,
                    params: *params,
                }),
                ProjSource::Float { .. } => None,
            })
            .collect();
        if let Ok(projs) = <[QuantProj; 3]>::try_from(quant) {
            #[cfg(feature = "cuda")]
            if self.uploader.gpu_packed() {
                let p = self.uploader.upload_packed(&parts, &projs, &read)?;
                return Ok(Arc::new(ExpertWeights {
                    mats: ExpertMats::DevicePacked(p),
                    bytes: hd.bytes,
                }));
            }
            if let Some((gate_up, down)) = self.uploader.upload_quant(&parts, &projs, &read)? {
                return Ok(Arc::new(ExpertWeights {
                    mats: ExpertMats::Dense { gate_up, down },
                    bytes: hd.bytes,
                }));
            }
        }
        let mut tensors = self.uploader.upload(&parts, &read)?.into_iter();
        let mut mats = Vec::with_capacity(3);
        for (p, src) in hd.proj.iter().enumerate() {
            let (rows, cols) = dims[p];
            let mut next = || tensors.next().expect("one tensor per part");
            mats.push(match src {
                ProjSource::Float { .. } => next().to_dtype(candle_core::DType::F32)?,
                ProjSource::Quant { params, .. } => {
                    let (w, s, b) = (next(), next(), next());
                    quant::dequantize_tensor(&w, &s, &b, *params, rows, cols)?
                }
            });
        }
        let down = mats.pop().expect("3");
        let gate_up = Tensor::cat(&mats, 0)?;
        Ok(Arc::new(ExpertWeights {
            mats: ExpertMats::Dense { gate_up, down },
            bytes: hd.bytes,
        }))
    }

    /// The host miss path (see [`ExpertStore::load`]): exactly the expert's byte ranges are read
    /// and kept in their checkpoint form (MLX-packed or floats in their type), so a cached expert
    /// costs its checkpoint bytes.
    pub fn load_on_host(&self, key: ExpertKey) -> Result<Arc<ExpertWeights>> {
        let hd = self.handle(key);
        let (h, i) = (self.hidden, self.inter);
        let dims = [(i, h), (i, h), (h, i)];
        let fail = |shard: usize, m: String| {
            Error::format(self.ck.shard_path(shard), format!("expert {key:?}: {m}"))
        };
        let mut mats = Vec::with_capacity(3);
        let mut bufs = [Vec::new(), Vec::new(), Vec::new()];
        let mut fell_back = false;
        for (p, src) in hd.proj.iter().enumerate() {
            let (rows, cols) = dims[p];
            let [wb, sb, bb] = &mut bufs;
            mats.push(match src {
                ProjSource::Quant {
                    weight,
                    scales,
                    biases,
                    scale_dtype,
                    params,
                } => {
                    self.read(weight, wb)?;
                    self.read(scales, sb)?;
                    self.read(biases, bb)?;
                    let (tile, d, q) = (
                        self.host_tiles.load(Ordering::Relaxed),
                        *scale_dtype,
                        *params,
                    );
                    HostMatrix::Packed(
                        PackedMatrix::from_bytes(wb, sb, bb, d, q, rows, cols, tile)
                            .map_err(|m| fail(weight.shard, m))?,
                    )
                }
                ProjSource::Float { data, dtype } => {
                    self.read(data, wb)?;
                    let floats = Floats::new(Source::Bytes(wb), *dtype, &mut fell_back)
                        .ok_or_else(|| fail(data.shard, format!("dtype {dtype:?}")))?;
                    HostMatrix::Float(
                        FloatMatrix::new(floats, rows, cols).map_err(|m| fail(data.shard, m))?,
                    )
                }
            });
        }
        let down = mats.pop().expect("3");
        let up = mats.pop().expect("3");
        let gate = mats.pop().expect("3");
        Ok(Arc::new(ExpertWeights {
            mats: ExpertMats::Host { gate, up, down },
            bytes: hd.bytes,
        }))
    }

    fn read(&self, r: &ByteRange, buf: &mut Vec<u8>) -> Result<()> {
        buf.resize(r.len as usize, 0);
        self.ck.read_at(r.shard, r.offset, buf)
    }
}

fn candle_dtype(d: DType) -> Result<candle_core::DType> {
    match d {
        DType::F32 => Ok(candle_core::DType::F32),
        DType::F16 => Ok(candle_core::DType::F16),
        DType::BF16 => Ok(candle_core::DType::BF16),
        other => Err(Error::Input(format!(
            "internal: expert tensor of type {other:?} has no device path"
        ))),
    }
}

fn handle(proj: Vec<ProjSource>) -> ExpertHandle {
    let bytes = proj.iter().map(ProjSource::bytes).sum();
    let proj: [ProjSource; 3] = proj.try_into().expect("3 projections");
    ExpertHandle { proj, bytes }
}

/// Resolves one projection (optionally stacked over `experts`) to its byte ranges.
fn source(
    ck: &Checkpoint,
    quant: Option<&crate::config::QuantSpec>,
    module: &str,
    experts: Option<usize>,
    (rows, cols): (usize, usize),
) -> Result<ProjSource> {
    let lead: Vec<usize> = experts.into_iter().collect();
    if ck.get(&format!("{module}.scales")).is_some() {
        let (w, s, b, params) = quantized_parts(ck, quant, module, &lead, rows, cols)?;
        return Ok(ProjSource::Quant {
            weight: w.range(),
            scales: s.range(),
            biases: b.range(),
            scale_dtype: s.dtype,
            params,
        });
    }
    let key = format!("{module}.weight");
    let e = ck.require(&key)?;
    let mut shape = lead;
    shape.extend([rows, cols]);
    ck.check_shape(&key, e, &shape)?;
    if !matches!(e.dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(ck.tensor_err(
            &key,
            e,
            format!(
                "dtype {:?} is not a float type and there are no `.scales` (not MLX-quantized)",
                e.dtype
            ),
        ));
    }
    Ok(ProjSource::Float {
        data: e.range(),
        dtype: e.dtype,
    })
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
