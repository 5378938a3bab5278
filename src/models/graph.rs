//! Decode steps replayed from a CUDA graph (`--gpu-graph auto`, the default on CUDA).
//!
//! A resident decode token is host-bound: the host spends 7–12 µs issuing each of the step's
//! launches (about fourteen a MoE layer) while the GPU waits for them. Where a step's whole
//! work is on the device — every attention layer MLA with its fused kernels, every MoE layer
//! routed on the device ([`super::device_routing`]) — the step is captured once into a CUDA
//! graph and each later token is one launch of it. Everything a step reads that changes from
//! token to token is in device memory: the embedded token (copied into the graph's input
//! before each launch), the position (written before each launch; `mla_absorb` and
//! `mla_attend` read it, with its RoPE row, instead of taking it by value: see
//! [`super::mla::DeviceStep`]), the routes (chosen on the device into the fused launches'
//! tables). The logits go to the graph's output, copied out after each launch; the routes come
//! back as on the uncaptured path, in [`super::device_routing::Session::finish`].
//!
//! What a graph wrote through is its key: the cache's buffers (a new sequence, or grown
//! buffers), the device-routing tables (rebuilt when the cache's resident experts change) and
//! the lookahead setting; a new RoPE table (for a longer cache) drops the graph too. A step whose
//! key differs is captured again. The first device-routed step of the process runs uncaptured (it compiles and
//! loads the kernels and makes the buffers kept between launches, outside any graph). A capture
//! that fails turns graphs off for the process, says why once, and the step runs uncaptured;
//! the kernel label counts captures and graph tokens (`Engine::kernels_label`).

use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent, CudaGraph};
use candle_core::{DType, Device, Tensor, TensorId};

use super::device_routing::Session;
use super::mla::{DeviceStep, MlaAttention};
use super::moe::ExpertAccess;
use super::{Attn, KvCache, LayerKv, Model, Routing};
use crate::error::{Error, Result};
use crate::weights::cuda::driver;

/// What a captured step wrote through and read: equal keys, the same graph.
#[derive(Debug, PartialEq)]
struct Key {
    kv: Vec<Option<(TensorId, TensorId)>>,
    routes: u64,
    lookahead: bool,
}

/// A captured step.
struct Captured {
    graph: SendGraph,
    key: Key,
    /// The MoE layers the step routed, in order (with their lookahead targets).
    ran: Vec<(usize, Option<usize>)>,
}

/// A CUDA graph that may move between threads.
struct SendGraph(CudaGraph);

// SAFETY: a graph's handles are plain driver handles, usable from any thread whose context is
// current (cudarc binds it on every call); CUDA asks that calls on one graph be serialised,
// which the `Mutex` around [`Graphs`] does.
unsafe impl Send for SendGraph {}

/// A model's CUDA-graph state: the captured step and the device buffers it reads and writes.
#[derive(Default)]
pub(super) struct Graphs {
    /// A device-routed step has run uncaptured in this process.
    warm: bool,
    /// Why graphs were turned off for the process, after a capture failed.
    off: Option<String>,
    step: Option<DeviceStep>,
    /// The embedded token `[1, D]`, read by the graph.
    input: Option<Tensor>,
    /// The logits `[1, vocab]`, written by the graph.
    output: Option<Tensor>,
    captured: Option<Captured>,
    /// Timing events around each launch: the GPU's time for a graph token, against which the
    /// token's whole time shows the host's share.
    events: Option<[CudaEvent; 2]>,
}

impl std::fmt::Debug for Graphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graphs")
            .field("captured", &self.captured.is_some())
            .field("off", &self.off)
            .finish()
    }
}

impl Model {
    /// Runs the one-token decode step `tokens` from a CUDA graph where it applies (see the
    /// module doc), capturing it first when none matches; `None`: run it uncaptured.
    pub(super) fn decode_graphed(
        &self,
        tokens: &[u32],
        kv: &mut KvCache,
        access: &mut dyn ExpertAccess,
    ) -> Result<Option<(Tensor, Routing)>> {
        use std::sync::atomic::Ordering::Relaxed;
        let Device::Cuda(dev) = &self.device else {
            return Ok(None);
        };
        if tokens.len() != 1 || !self.graph_on.load(Relaxed) || self.profiling.load(Relaxed) {
            return Ok(None);
        }
        let Some(first) = self.uniform_mla() else {
            return Ok(None);
        };
        let mut g = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
        if g.off.is_some() {
            return Ok(None);
        }
        // The prompt made every layer's buffers; a captured step never grows them.
        let pos0 = kv.len;
        let positions = kv.layers.iter().map(LayerKv::room).min().unwrap_or(0);
        if pos0 >= positions || kv.layers.iter().any(|l| l.len() != pos0) {
            return Ok(None);
        }
        let Some(mut session) = self.device_session(1, pos0, &*access)? else {
            return Ok(None);
        };
        if !g.warm {
            g.warm = true;
            return Ok(None);
        }
        let h = self.embed.forward(tokens, &self.device)?;
        if h.dtype() != DType::F32 {
            return Ok(None);
        }
        if g.step.as_ref().is_none_or(|s| s.positions < positions) {
            g.captured = None;
            match first.device_step(dev, positions) {
                Ok(step) => g.step = Some(step),
                Err(e) => {
                    eprintln!("CUDA graph: decode steps run uncaptured from now on ({e})");
                    g.off = Some(e.to_string());
                    return Ok(None);
                }
            }
        }
        let key = Key {
            kv: kv.layers.iter().map(LayerKv::buffer_ids).collect(),
            routes: session.generation(),
            lookahead: access.wants_lookahead(),
        };
        let input = match &g.input {
            Some(t) => t.clone(),
            None => g
                .input
                .insert(Tensor::zeros(h.dims(), DType::F32, &self.device)?)
                .clone(),
        };
        let output = match &g.output {
            Some(t) => t.clone(),
            None => g
                .output
                .insert(Tensor::zeros(
                    (1, self.spec.vocab_size),
                    DType::F32,
                    &self.device,
                )?)
                .clone(),
        };
        let stream = dev.cuda_stream();
        let step = g
            .step
            .as_mut()
            .ok_or_else(|| Error::Input("internal: no device step".into()))?;
        stream
            .memcpy_htod(&[pos0 as u32][..], &mut step.pos)
            .map_err(|e| driver("position upload", e))?;
        input.slice_set(&h, 0, 0)?;
        drop(h);
        if g.captured.as_ref().is_some_and(|c| c.key == key) {
            for l in &mut kv.layers {
                l.advance(1)?;
            }
            kv.len += 1;
            let c = g.captured.as_ref().expect("matched above");
            session.replayed(&c.ran);
        } else {
            g.captured = None;
            let lens: Vec<usize> = kv.layers.iter().map(LayerKv::len).collect();
            if let Err(e) =
                stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            {
                eprintln!("CUDA graph: decode steps run uncaptured from now on ({e})");
                g.off = Some(e.to_string());
                return Ok(None);
            }
            let step = g.step.as_ref().expect("made above");
            let body = self.captured_step(&input, &output, pos0, kv, access, &mut session, step);
            let made = stream.end_capture(
                sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
            );
            let why = match (body, made) {
                (Ok(()), Ok(Some(graph))) => {
                    super::fallback::graph_captured();
                    g.captured = Some(Captured {
                        graph: SendGraph(graph),
                        key,
                        ran: session.layers_ran().to_vec(),
                    });
                    None
                }
                (Err(e), _) => Some(e.to_string()),
                (Ok(()), Err(e)) => Some(format!("the capture failed: {e}")),
                (Ok(()), Ok(None)) => Some("the capture made no graph".into()),
            };
            if let Some(why) = why {
                // The capture ran nothing: undo its bookkeeping, and clear any error that a
                // buffer freed inside it recorded on the context.
                for (l, n) in kv.layers.iter_mut().zip(lens) {
                    l.truncate(n);
                }
                kv.len = pos0;
                let _ = stream.context().check_err();
                eprintln!("CUDA graph: decode steps run uncaptured from now on ({why})");
                g.off = Some(why);
                return Ok(None);
            }
        }
        // Timing is a diagnostic: a token whose events fail is counted untimed, never failed.
        if g.events.is_none() {
            let ev = || {
                stream
                    .context()
                    .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .ok()
            };
            g.events = ev().zip(ev()).map(|(a, b)| [a, b]);
        }
        let c = g.captured.as_ref().expect("captured or matched above");
        let events = g
            .events
            .as_ref()
            .filter(|[start, _]| start.record(&stream).is_ok());
        c.graph.0.launch().map_err(|e| driver("graph launch", e))?;
        let events = events.filter(|[_, end]| end.record(&stream).is_ok());
        let routing = session.finish(access, pos0)?;
        // The routes' copy waited for the graph: both events have happened.
        let ms = events.and_then(|[start, end]| start.elapsed_ms(end).ok());
        super::fallback::graph_token(ms);
        drop(g);
        // A copy: the next launch overwrites the graph's output.
        Ok(Some((output.copy()?, routing)))
    }

    /// The first MLA layer, where every attention layer is MLA with its fused decode kernels
    /// on and one RoPE table serves them all; `None` otherwise.
    fn uniform_mla(&self) -> Option<&MlaAttention> {
        let mut mla = self.layers.iter().map(|l| match &l.attn {
            Attn::Mla(a) if a.fused_on() => Some(a),
            _ => None,
        });
        let first = mla.next()??;
        mla.all(|a| a.is_some_and(|a| first.same_rope(a)))
            .then_some(first)
    }

    /// The step's device work, issued while the stream captures it: the decoder layers on
    /// `input` with the position read from `step`, the final norm, `lm_head` and the logits'
    /// copy into `output`. Every tensor made here is dropped before it returns, so the graph
    /// frees all it allocates.
    #[allow(clippy::too_many_arguments)]
    fn captured_step(
        &self,
        input: &Tensor,
        output: &Tensor,
        pos0: usize,
        kv: &mut KvCache,
        access: &mut dyn ExpertAccess,
        session: &mut Session<'_>,
        step: &DeviceStep,
    ) -> Result<()> {
        let (x, routing) = self.layers_forward(
            input.clone(),
            pos0,
            kv,
            access,
            Some(session),
            &mut None,
            Some(step),
        )?;
        if !routing.is_empty() {
            return Err(Error::Input(
                "graph capture: a MoE layer was routed on the host".into(),
            ));
        }
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        output.slice_set(&logits, 0, 0)?;
        Ok(())
    }
}
