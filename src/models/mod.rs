//! Model families. Each family file (`glm4_moe`, `qwen3_moe`, `mixtral`) mirrors its HF config
//! and resolves it into a [`ModelSpec`]; the shared decoder below runs any of them, with dense
//! weights resident and routed experts resolved per token through an [`moe::ExpertAccess`].

mod decoder_rows;
pub mod deepseek_v3;
pub mod deltanet;
#[cfg(feature = "cuda")]
mod device_routing;
#[cfg(not(feature = "cuda"))]
#[path = "device_routing_none.rs"]
mod device_routing;
pub mod fallback;
pub mod glm4_moe;
#[cfg(feature = "cuda")]
mod graph;
#[cfg(not(feature = "cuda"))]
#[path = "graph_none.rs"]
mod graph;
pub(crate) mod host_attention;
pub mod kda;
pub mod kimi_linear;
pub mod kv;
pub mod layers;
pub mod mixtral;
pub mod mla;
pub mod moe;
pub mod profile;
pub mod qwen3_moe;
pub mod qwen3_next;
pub mod weight;

use candle_core::{Device, Tensor};

use std::path::Path;

use crate::config::{self, Family, LayerKind, LinearKind, ModelSpec};
use crate::error::{Error, Result};
use crate::weights::layout::{self, ExpertLayout, Prefix};
use crate::weights::{Checkpoint, Vb};

use layers::{Attention, Embedding, LayerKv, Linear, Mlp, RmsNorm};
use moe::{ExpertAccess, MoeBlock, Route};
use profile::{Clock, Part, Profile};

/// Reads `config.json` (given a checkpoint directory or the file itself), dispatches on its
/// `model_type` to the family file that knows HF's field names, and resolves a [`ModelSpec`].
pub fn load_spec(path: &Path) -> Result<ModelSpec> {
    let (file, value) = config::read_json(path)?;
    spec_from_value(&file, value)
}

/// Resolves an already-parsed config (see [`load_spec`]).
pub fn spec_from_value(file: &Path, value: serde_json::Value) -> Result<ModelSpec> {
    let model_type = match value.get("model_type") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(_) => return Err(Error::config(file, "model_type", "must be a string")),
        None => return Err(Error::config(file, "model_type", "missing")),
    };
    let quantization = config::parse_quantization(file, &value)?;
    let mut spec = match model_type.as_str() {
        "glm4_moe" => glm4_moe::Config::parse(file, &value)?.spec(file)?,
        "qwen3_moe" => qwen3_moe::Config::parse(file, &value)?.spec(file)?,
        "mixtral" => mixtral::Config::parse(file, &value)?.spec(file)?,
        "deepseek_v3" | "kimi_k2" => {
            deepseek_v3::spec(file, &value, &model_type, deepseek_v3::Variant::DeepseekV3)?
        }
        "qwen3_next" => qwen3_next::Config::parse(file, &value)?.spec(file)?,
        "kimi_linear" => kimi_linear::Config::parse(file, &value)?.spec(file)?,
        "glm4_moe_lite" => {
            deepseek_v3::spec(file, &value, &model_type, deepseek_v3::Variant::Glm4MoeLite)?
        }
        "mistral3" => return wrapped_text_model(file, &value, "mistral3"),
        "kimi_k25" => return wrapped_text_model(file, &value, "kimi_k25"),
        t if config::KNOWN_DENSE.contains(&t) => {
            return Err(Error::DenseModel {
                path: file.to_path_buf(),
                model_type,
                supported: config::SUPPORTED_MOE.join(", "),
            })
        }
        _ => {
            return Err(Error::UnknownModel {
                path: file.to_path_buf(),
                model_type,
                supported: config::SUPPORTED_MOE.join(", "),
            })
        }
    };
    spec.quantization = quantization;
    spec.unsupported = spec
        .unsupported
        .take()
        .or(config::foreign_quantization(&value));
    config::validate(file, &spec)?;
    Ok(spec)
}

/// A multimodal wrapper (`kimi_k25`; `mistral3`: Mistral Large 3 and Devstral) whose language
/// model is its `text_config`: a DeepSeek-V3-style MoE runs (its tensors under `language_model.`,
/// the vision tower never read); a dense text model (Devstral's `mistral` / `ministral3`) is
/// refused as dense. The two are told apart by the text config, never by the wrapper's
/// `model_type`. A `kimi_k25` text config without a `model_type` is `kimi_k2`.
fn wrapped_text_model(file: &Path, value: &serde_json::Value, wrapper: &str) -> Result<ModelSpec> {
    let text = value
        .get("text_config")
        .filter(|t| t.is_object())
        .ok_or_else(|| {
            Error::config(
                file,
                "text_config",
                format!("missing: a {wrapper} config wraps its language model in `text_config`"),
            )
        })?;
    let inner = text
        .get("model_type")
        .and_then(|t| t.as_str())
        .unwrap_or(if wrapper == "kimi_k25" { "kimi_k2" } else { "" })
        .to_string();
    let mut spec = match inner.as_str() {
        "deepseek_v3" | "kimi_k2" => {
            deepseek_v3::spec(file, text, &inner, deepseek_v3::Variant::DeepseekV3)?
        }
        t if config::KNOWN_DENSE.contains(&t) || text.get("n_routed_experts").is_none() => {
            return Err(Error::DenseModel {
                path: file.to_path_buf(),
                model_type: format!("{wrapper} (text model `{inner}`)"),
                supported: config::SUPPORTED_MOE.join(", "),
            })
        }
        _ => {
            return Err(Error::config(
                file,
                "text_config.model_type",
                format!(
                "`{inner}`: the {wrapper} wrappers this engine runs hold deepseek_v3 text models"
            ),
            ))
        }
    };
    spec.model_type = wrapper.into();
    spec.quantization =
        config::parse_quantization(file, text)?.or(config::parse_quantization(file, value)?);
    spec.unsupported = spec
        .unsupported
        .take()
        .or(config::foreign_quantization(text).or(config::foreign_quantization(value)));
    config::validate(file, &spec)?;
    Ok(spec)
}

/// The feed-forward part of a decoder layer.
#[derive(Debug)]
// One per decoder layer, built once: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Ffn {
    Dense(Mlp),
    Moe(MoeBlock),
}

named_enum! {
    /// The form of MLX-quantized dense weights (attention, shared experts, dense MLPs,
    /// embeddings, `lm_head`) on a CUDA GPU. Fixed when the engine opens.
    pub enum GpuDense {
        /// Their checkpoint bytes, multiplied by the packed matrix-vector kernel (1/7 of the
        /// f32 bytes at 4 bits: memory left to the expert cache).
        #[default]
        Packed = "packed",
        /// Decoded to f32 once at load (cuBLAS products; the form before packed dense weights).
        F32 = "f32",
    }
}

named_enum! {
    /// The kernels of attention for decode tokens on a CUDA GPU.
    pub enum GpuAttention {
        /// MLA: two fused kernels (latent norm + RoPE + query split; scores + softmax + the
        /// weighted sum of cached latents) between the cuBLAS projections.
        #[default]
        Fused = "fused",
        /// One tensor op per step (the form before the fused kernels, kept for comparison).
        Ops = "ops",
    }
}

named_enum! {
    /// Where a decode token's experts are chosen on a CUDA GPU.
    pub enum GpuRouting {
        /// On the device when every routed expert is resident (the router kernel writes the
        /// fused launch's table; the routes come back once per token); elsewhere on the host.
        #[default]
        Device = "device",
        /// On the host at every MoE layer (the router logits copied back each time).
        Host = "host",
    }
}

named_enum! {
    /// Whether a decode step on a CUDA GPU may run from a captured CUDA graph.
    pub enum GpuGraph {
        /// Where every attention layer is MLA with its fused kernels and every MoE layer is
        /// routed on the device: the step is captured once and each later token is one graph
        /// launch — in an all-resident cell without a wait, in a lazy cell (miss mode `load`)
        /// with a gate after each MoE layer's router where the host reports the step to the
        /// cache, loads its misses and answers with the experts' addresses; elsewhere, or if a
        /// capture fails, launch by launch.
        #[default]
        Auto = "auto",
        /// Graphs only where every expert is resident (no gates: lazy cells launch by launch,
        /// routed on the host; the form before gates, kept for comparison).
        Resident = "resident",
        /// Launch by launch always (the form before graphs, kept for comparison).
        Off = "off",
    }
}

/// The attention part of a decoder layer.
#[derive(Debug)]
// One per decoder layer, built once: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Attn {
    Gqa(Attention),
    Mla(mla::MlaAttention),
    Delta(deltanet::DeltaNet),
    Kda(kda::Kda),
}

impl Attn {
    /// With `step`, a decode step being captured into a CUDA graph: only attention that reads
    /// its position from device memory (MLA's fused kernels) may run.
    fn forward(
        &self,
        x: &Tensor,
        pos0: usize,
        kv: &mut LayerKv,
        step: Option<&mla::DeviceStep>,
    ) -> Result<Tensor> {
        if step.is_some() && !matches!(self, Attn::Mla(_)) {
            return Err(Error::Input(
                "graph capture: only MLA attention reads its position from the device".into(),
            ));
        }
        match self {
            Attn::Gqa(a) => a.forward(x, pos0, kv),
            Attn::Mla(a) => a.forward(x, pos0, kv, step),
            Attn::Delta(a) => a.forward(x, &mut kv.delta),
            Attn::Kda(a) => a.forward(x, &mut kv.delta),
        }
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Attn,
    post_norm: RmsNorm,
    ffn: Ffn,
}

/// Per-sequence KV cache, sized for the sequence it will hold.
#[derive(Debug, Default, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// An empty cache for a sequence of up to `tokens` tokens (prompt + new tokens).
    pub fn with_capacity(tokens: usize) -> Self {
        KvCache {
            layers: Vec::new(),
            len: 0,
            capacity: tokens,
        }
    }
    /// This cache's buffers, emptied, for a new sequence of up to `tokens` tokens, where every
    /// layer's hold it and none holds more than twice it (a decode step captured into a CUDA
    /// graph writes through them, so the new sequence replays that graph); a new cache
    /// otherwise.
    pub fn reuse(mut self, tokens: usize) -> Self {
        let fits = |l: &LayerKv| (tokens..=2 * tokens.max(1)).contains(&l.room());
        if self.layers.is_empty() || !self.layers.iter().all(fits) {
            return Self::with_capacity(tokens);
        }
        for l in &mut self.layers {
            l.truncate(0);
            l.delta = Default::default();
        }
        self.len = 0;
        self.capacity = tokens;
        self
    }
    /// Tokens already processed.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes of the key/value buffers allocated (for the whole sequence).
    pub fn bytes(&self) -> u64 {
        self.layers.iter().map(LayerKv::bytes).sum()
    }
}

/// Routing decisions of one forward call: `(decoder layer, per-token routes)` for each MoE layer.
pub type Routing = Vec<(u32, Vec<Route>)>;

/// A decoder-only MoE language model with lazily resolved experts.
#[derive(Debug)]
pub struct Model {
    /// The resolved configuration.
    pub spec: ModelSpec,
    /// Where its tensors live.
    pub prefix: Prefix,
    embed: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    device: Device,
    profiling: std::sync::atomic::AtomicBool,
    profile: std::sync::Mutex<Profile>,
    /// `--gpu-routing device`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    routing_on_device: std::sync::atomic::AtomicBool,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device_routes: std::sync::Mutex<device_routing::DeviceRoutes>,
    /// `--gpu-graph auto` or `resident`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    graph_on: std::sync::atomic::AtomicBool,
    /// `--gpu-graph auto`: also steps whose experts may miss, with gates.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    gates_on: std::sync::atomic::AtomicBool,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    graphs: std::sync::Mutex<graph::Graphs>,
    /// Dense matrices loaded into 8-row tiles.
    tiled_matrices: usize,
}

impl Model {
    /// Loads every dense tensor (attention, norms, embeddings, routers, shared experts, dense
    /// layers). Routed experts are not touched.
    /// On the CPU, dense weights are read in place from the memory map when `in_place`, else
    /// copied into memory; on a CUDA GPU, MLX-quantized ones stay packed when `gpu_packed`, else
    /// f32; with `tile`, MLX 4-bit dense matrices go to 8-row tiles on the CPU (the int8
    /// kernels' layout, an owned copy in place of the mapped bytes). `layout` is how the
    /// checkpoint stores its experts (as the expert store detected it): it names the MoE module
    /// and tells Qwen3-Next's norm convention.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        ck: &Checkpoint,
        spec: &ModelSpec,
        prefix: &Prefix,
        layout: ExpertLayout,
        dev: &Device,
        in_place: bool,
        gpu_packed: bool,
        tile: bool,
    ) -> Result<Self> {
        let tiled = std::sync::atomic::AtomicUsize::new(0);
        let mut root = Vb::root(ck, spec.quantization.as_ref(), dev);
        root.in_place = in_place;
        root.gpu_packed = gpu_packed;
        root.tile = tile.then_some(&tiled);
        let (h, v) = (spec.hidden_size, spec.vocab_size);
        let model = root.pp(&prefix.model);
        let embed = Embedding::load(&model.pp("embed_tokens"), v, h)?;
        let layers_vb = root.pp(&prefix.layers);
        let eps = spec.rms_norm_eps;
        // Qwen3-Next's HF checkpoints store zero-centred norms (scale 1 + weight); mlx-lm's
        // converter shifts them (its stacked `switch_mlp` experts mark the layout).
        let centred = spec.family == Family::Qwen3Next && layout == ExpertLayout::PerExpert;
        let norm = |vb: &Vb, n: usize| RmsNorm::load_maybe_centred(vb, n, eps, centred);
        let moe_module = layout::moe_module(spec, layout);
        let mut layers = Vec::with_capacity(spec.num_layers);
        for i in 0..spec.num_layers {
            let vb = layers_vb.pp(i);
            let ffn = if spec.is_moe_layer(i) {
                Ffn::Moe(MoeBlock::load(&vb.pp(moe_module), spec, i)?)
            } else {
                // transformers' save_pretrained writes Kimi-Linear's dense MLPs under the MoE
                // module's name (it reverts its `block_sparse_moe` → `mlp` renaming on every
                // layer); the hub checkpoints keep them under `mlp`.
                let dense = match vb.pp("mlp").pp("gate_proj").has("weight") {
                    false if vb.pp(spec.keys.mlp).pp("gate_proj").has("weight") => spec.keys.mlp,
                    _ => "mlp",
                };
                Ffn::Dense(Mlp::load(&vb.pp(dense), h, spec.dense_intermediate)?)
            };
            let attn_vb = vb.pp("self_attn");
            let kind = spec.hybrid.as_ref().map(|hy| (hy.layer_types[i], hy));
            layers.push(DecoderLayer {
                input_norm: norm(&vb.pp("input_layernorm"), h)?,
                attn: match (kind, &spec.mla) {
                    (Some((LayerKind::LinearAttention, hy)), _) => match hy.linear {
                        LinearKind::GatedDeltaNet => Attn::Delta(deltanet::DeltaNet::load(
                            &vb.pp("linear_attn"),
                            h,
                            &hy.delta,
                            eps,
                        )?),
                        LinearKind::Kda => Attn::Kda(kda::Kda::load(&attn_vb, h, &hy.delta, eps)?),
                    },
                    (_, Some(m)) => Attn::Mla(mla::MlaAttention::load(
                        &attn_vb,
                        h,
                        spec.attention.num_heads,
                        m,
                    )?),
                    (Some((LayerKind::FullAttention, _)), None) => Attn::Gqa(
                        Attention::load_gated(&attn_vb, h, &spec.attention, eps, centred)?,
                    ),
                    (None, None) => Attn::Gqa(Attention::load(&attn_vb, h, &spec.attention, eps)?),
                },
                post_norm: norm(&vb.pp("post_attention_layernorm"), h)?,
                ffn,
            });
        }
        let head = root.pp(&prefix.lm_head);
        let lm_head = if spec.tie_word_embeddings && !head.has("weight") {
            Linear::from_weight(embed.weight().clone())
        } else {
            Linear::load(&head, v, h, false)?
        };
        Ok(Model {
            norm: norm(&model.pp("norm"), h)?,
            spec: spec.clone(),
            prefix: prefix.clone(),
            embed,
            layers,
            lm_head,
            device: dev.clone(),
            profiling: Default::default(),
            profile: Default::default(),
            routing_on_device: true.into(),
            device_routes: Default::default(),
            graph_on: true.into(),
            gates_on: true.into(),
            graphs: Default::default(),
            tiled_matrices: tiled.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Dense matrices held in 8-row tiles (`Model::load`'s `tile`): what the engine's kernel
    /// label reports, so it says the layout that was loaded, not the one asked for.
    pub fn tiled_matrices(&self) -> usize {
        self.tiled_matrices
    }

    /// Chooses the GPU attention kernels of decode tokens: fused (default) or tensor ops (the
    /// form before the fused kernels, kept for comparison). MLA layers on CUDA only.
    pub fn set_gpu_attention(&self, form: GpuAttention) {
        for l in &self.layers {
            if let Attn::Mla(a) = &l.attn {
                a.set_fused(form == GpuAttention::Fused);
            }
        }
    }

    /// Chooses where decode tokens are routed on a CUDA GPU (see [`GpuRouting`]).
    pub fn set_gpu_routing(&self, r: GpuRouting) {
        self.routing_on_device.store(
            r == GpuRouting::Device,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Chooses whether decode steps on a CUDA GPU may run from a captured graph (see
    /// [`GpuGraph`]).
    pub fn set_gpu_graph(&self, g: GpuGraph) {
        use std::sync::atomic::Ordering::Relaxed;
        self.graph_on.store(g != GpuGraph::Off, Relaxed);
        self.gates_on.store(g == GpuGraph::Auto, Relaxed);
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn device_routing(&self) -> bool {
        self.routing_on_device
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether any layer is MLA attention (the only attention with fused GPU decode kernels).
    pub fn has_mla(&self) -> bool {
        self.layers.iter().any(|l| matches!(l.attn, Attn::Mla(_)))
    }

    /// Turns the per-part timing of forward calls on or off ([`profile`]: it waits for the
    /// device at every part boundary, so profiled calls run slower).
    pub fn set_profiling(&self, on: bool) {
        self.profiling
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The part times of the profiled forward calls so far.
    pub fn profile(&self) -> Profile {
        *self.profile.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The compute device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs `tokens` after the `kv.len()` tokens already cached; returns logits `[T, vocab]`
    /// (only the last row when `last_only`) and the routing of every MoE layer.
    pub fn forward(
        &self,
        tokens: &[u32],
        kv: &mut KvCache,
        access: &mut dyn ExpertAccess,
        last_only: bool,
    ) -> Result<(Tensor, Routing)> {
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.spec.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary (vocab_size = {})",
                self.spec.vocab_size
            )));
        }
        if tokens.is_empty() {
            return Err(Error::Input("empty token sequence".into()));
        }
        if kv.layers.is_empty() {
            kv.layers =
                vec![LayerKv::with_capacity(kv.capacity.max(tokens.len())); self.layers.len()];
        }
        if let Some(done) = self.decode_graphed(tokens, kv, access)? {
            return Ok(done);
        }
        let pos0 = kv.len;
        let on = self.profiling.load(std::sync::atomic::Ordering::Relaxed);
        let mut clock = Clock::start(&self.device, on, tokens.len())?;
        let h = self.embed.forward(tokens, &self.device)?;
        Clock::mark(&mut clock, Part::Embed)?;
        let mut session = self.device_session(tokens.len(), pos0, &*access, false)?;
        let rows = session.is_none()
            && self.device.is_cpu()
            && h.dtype() == candle_core::DType::F32
            && decoder_rows::host_layers_on();
        let (x, mut routing) = if rows {
            let (n, d) = h.dims2()?;
            let hv: Vec<f32> = h.flatten_all()?.to_vec1()?;
            let (x, routing) = self.layers_rows(hv, n, pos0, kv, access, &mut clock)?;
            (Tensor::from_vec(x, (n, d), &self.device)?, routing)
        } else {
            self.layers_forward(h, pos0, kv, access, session.as_mut(), &mut clock, None)?
        };
        // `x` is the final norm of every row.
        let x = if last_only {
            x.narrow(0, tokens.len() - 1, 1)?
        } else {
            x
        };
        let logits = self.lm_head.forward(&x)?;
        Clock::mark(&mut clock, Part::LmHead)?;
        if let Some(s) = session {
            routing = s.finish(access, pos0)?;
            Clock::mark(&mut clock, Part::Wait)?;
        }
        if let Some(c) = clock {
            self.profile
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(&c.finish());
        }
        Ok((logits, routing))
    }

    /// The greedy token after `token` at `kv.len()` where the decode step runs from a CUDA graph
    /// that embeds its token and picks the next on the device; with `ahead` (another step will
    /// follow unless this token stops the sequence) the next step's launch is queued before this
    /// one's results are read. `None` where the step does not run from a graph: then
    /// [`Model::forward`] and [`layers::greedy_token`].
    pub fn decode_greedy(
        &self,
        token: u32,
        kv: &mut KvCache,
        access: &mut dyn ExpertAccess,
        ahead: bool,
    ) -> Result<Option<(u32, Routing)>> {
        if token as usize >= self.spec.vocab_size || kv.layers.is_empty() {
            return Ok(None);
        }
        self.greedy_graphed(token, kv, access, ahead)
    }

    /// The decoder layers on the embedded tokens `h` `[T, D]` at positions `pos0..pos0+T`:
    /// the final norm of every row and the routing of the layers routed on the host (those of
    /// `session` are reported by [`device_routing::Session::finish`]); counts the `T` tokens in
    /// `kv`. With `step` (a decode step being captured into a CUDA graph) attention reads its
    /// position from device memory.
    #[allow(clippy::too_many_arguments)]
    fn layers_forward(
        &self,
        mut h: Tensor,
        pos0: usize,
        kv: &mut KvCache,
        access: &mut dyn ExpertAccess,
        mut session: Option<&mut device_routing::Session<'_>>,
        clock: &mut Option<Clock>,
        step: Option<&mla::DeviceStep>,
    ) -> Result<(Tensor, Routing)> {
        let n = h.dim(0)?;
        let mut routing = Vec::new();
        let lookahead = access.wants_lookahead();
        // `x` is the normalised input of the next module; each residual add and the norm after
        // it run together (`RmsNorm::add_forward`).
        let mut x = match self.layers.first() {
            Some(l) => l.input_norm.forward(&h)?,
            None => self.norm.forward(&h)?,
        };
        Clock::mark(clock, Part::Norms)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let a = layer.attn.forward(&x, pos0, &mut kv.layers[i], step)?;
            Clock::mark(clock, Part::Attention)?;
            (h, x) = layer.post_norm.add_forward(&h, &a)?;
            Clock::mark(clock, Part::Norms)?;
            let y = match (&layer.ffn, session.as_deref_mut()) {
                (Ffn::Dense(mlp), _) => {
                    let y = mlp.forward(&x)?;
                    Clock::mark(clock, Part::DenseMlp)?;
                    y
                }
                // Routed on the device (every expert resident): the host does not wait.
                (Ffn::Moe(moe), Some(s)) => {
                    let next = lookahead
                        .then(|| self.next_moe(i))
                        .flatten()
                        .map(|(j, nl, nm)| device_routing::Next {
                            layer: j,
                            moe: nm,
                            h: &h,
                            norm: &nl.post_norm,
                        });
                    s.route(i, moe, &x, next)?;
                    Clock::mark(clock, Part::Router)?;
                    let y = s.experts(i, moe, &x)?;
                    Clock::mark(clock, Part::Experts)?;
                    y
                }
                (Ffn::Moe(moe), None) => {
                    let (routes, predictions) =
                        self.host_routes(i, moe, &x, &h, pos0, n, lookahead, &*access)?;
                    Clock::mark(clock, Part::Router)?;
                    let pred_ref = predictions.as_ref().map(|(l, p)| (*l, p.as_slice()));
                    let y = moe.forward(&x, pos0, &routes, pred_ref, access)?;
                    Clock::mark(clock, Part::Experts)?;
                    routing.push((moe.layer, routes));
                    y
                }
            };
            let next_norm = match self.layers.get(i + 1) {
                Some(l) => &l.input_norm,
                None => &self.norm,
            };
            (h, x) = next_norm.add_forward(&h, &y)?;
            Clock::mark(clock, Part::Norms)?;
        }
        kv.len += n;
        Ok((x, routing))
    }

    /// Decoder layer `i`'s routes on its normalised input `x` (or the replayed trace's) and,
    /// with `lookahead`, the next MoE layer's predicted routes: its norm and router applied to
    /// the hidden state `h` available now. Where both routers run, their logits come back in one
    /// copy (on a GPU: one wait for the device a layer, not two).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn host_routes(
        &self,
        i: usize,
        moe: &MoeBlock,
        x: &Tensor,
        h: &Tensor,
        pos0: usize,
        n: usize,
        lookahead: bool,
        access: &dyn ExpertAccess,
    ) -> Result<(Vec<Route>, Option<(u32, Vec<Route>)>)> {
        let replayed = access.replayed_routes(moe.layer, pos0, n)?;
        let own = |r: Option<Vec<Route>>| match r {
            Some(r) => Ok(r),
            None => moe.router.route(x),
        };
        let next = if lookahead { self.next_moe(i) } else { None };
        let Some((j, nl, nm)) = next else {
            return Ok((own(replayed)?, None));
        };
        let (routes, predicted) = match (replayed, access.replayed_lookahead(j as u32, pos0, n)) {
            (r, Some(p)) => (own(r)?, p),
            (Some(r), None) => (r, nm.router.route(&nl.post_norm.forward(h)?)?),
            (None, None) => {
                let own = moe.router.logits(x)?;
                let e = own.dim(1)?;
                let ahead = nm.router.logits(&nl.post_norm.forward(h)?)?;
                let ahead = ahead.to_dtype(own.dtype())?;
                let both = Tensor::cat(&[&own, &ahead], 1)?;
                let rows = layers::rows(&both)?;
                let routes = rows.iter().map(|r| moe.router.select(&r[..e])).collect();
                let predicted = rows.iter().map(|r| nm.router.select(&r[e..])).collect();
                (routes, predicted)
            }
        };
        Ok((routes, Some((j as u32, predicted))))
    }

    fn next_moe(&self, i: usize) -> Option<(usize, &DecoderLayer, &MoeBlock)> {
        self.layers
            .iter()
            .enumerate()
            .skip(i + 1)
            .find_map(|(j, l)| match &l.ffn {
                Ffn::Moe(m) => Some((j, l, m)),
                Ffn::Dense(_) => None,
            })
    }
}

/// The CPU forms an A/B knob turned off in this process (`HARNESS_EXPERT_BLOCKS=0`,
/// `HARNESS_PROMPT_BLOCKS=0`, `HARNESS_PROMPT_ATTENTION=ops`, `HARNESS_HOST_MOE=0`,
/// `HARNESS_SHARED_BY_ROUTER=0`, `HARNESS_HOST_QKV=0`, `HARNESS_HOST_NORM_MLP=0`,
/// `HARNESS_HOST_LAYERS=0`), as the engine's kernel label names them.
pub fn forms_turned_off() -> Vec<&'static str> {
    [
        (moe::expert_blocks_on(), "experts one a thread"),
        (moe::prompt_blocks_on(), "a prompt's experts one a thread"),
        (
            layers::host_prompt_attention(),
            "prompt attention as tensor ops",
        ),
        (moe::host_moe_on(), "shared expert apart"),
        (
            moe::shared_by_router_on(),
            "shared expert apart from the router",
        ),
        (
            layers::host_qkv_on(),
            "attention's projections, norms and RoPE as tensor ops",
        ),
        (
            layers::host_norm_mlp_on(),
            "residual norms and MLPs as tensor ops",
        ),
        (
            decoder_rows::host_layers_on(),
            "tensors between the decoder's modules",
        ),
    ]
    .into_iter()
    .filter(|(on, _)| !on)
    .map(|(_, name)| name)
    .collect()
}
