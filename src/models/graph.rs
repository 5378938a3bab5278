//! Decode steps replayed from a CUDA graph (`--gpu-graph auto`, the default on CUDA).
//!
//! A resident decode token is host-bound: the host spends 7–12 µs issuing each of the step's
//! launches (about fourteen a MoE layer) while the GPU waits for them. Where a step's whole
//! work is on the device — every attention layer MLA with its fused kernels, every MoE layer
//! routed on the device ([`super::device_routing`]) — the step is captured once into a CUDA
//! graph and each later token is one launch of it. Everything a step reads that changes from
//! token to token is in device memory: the token (embedded by the graph where the table is
//! packed on the GPU, else embedded by the host into the graph's input), the position
//! (`mla_absorb` and `mla_attend` read it, with its RoPE row, instead of taking it by value: see
//! [`super::mla::DeviceStep`]), the routes (chosen on the device into the fused launches'
//! tables). The graph ends with the logits in its output, the greedy token written over its
//! input token and the position advanced: the state of the next step. In a lazy cell (experts
//! may miss) each MoE layer's router is followed by a gate where the step waits for the host
//! to report the layer's step to the cache, load its misses and answer with the experts'
//! addresses ([`Session::serve`]); such a step is never queued ahead of its call.
//!
//! After each launch its routes, its greedy token (and under `HARNESS_CHECK_GREEDY` its logits)
//! are copied into pinned host memory without a wait, one slot of two per launch in flight. A
//! greedy generation ([`Model::decode_greedy`]) queues the next token's launch before it reads
//! the current one's slot: the GPU runs it while the host reports the routes to the cache in
//! layer order ([`super::device_routing::Session::finish_with`]) and returns the token, and the
//! next call finds its launch already queued when it asks for that very token at that position
//! (anything else leaves it behind: stream order overwrites what it wrote). Logits callers
//! (teacher forcing, sampling) copy the output after their own launch.
//!
//! What a graph wrote through is its key: the cache's buffers (a new sequence on new buffers, or
//! grown ones; the engine reuses a generation's buffers for the next that fits), the
//! device-routing tables (rebuilt when the cache's resident experts change) and the lookahead
//! setting; a new RoPE table (for a longer cache) drops the graph too. A step whose key differs
//! is captured again. The first device-routed step of the process runs uncaptured (it compiles
//! and loads the kernels and makes the buffers kept between launches, outside any graph). A
//! capture that fails turns graphs off for the process, says why once, and the step runs
//! uncaptured; the kernel label counts captures, graph tokens and those queued ahead
//! (`Engine::kernels_label`).

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaEvent, CudaGraph, CudaSlice, CudaStream, PinnedHostSlice,
};
use candle_core::{DType, Device, Tensor, TensorId};

use super::device_routing::Session;
use super::mla::{DeviceStep, MlaAttention};
use super::moe::ExpertAccess;
use super::{Attn, KvCache, LayerKv, Model, Routing};
use crate::error::{Error, Result};
use crate::weights::cuda::{driver, DeviceMatrix};

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

/// Where one launch's results come back: copied into pinned host memory after the launch
/// without a wait (its routes, its greedy token, and under `HARNESS_CHECK_GREEDY` its logits),
/// with timing events around it.
struct Slot {
    routes: PinnedHostSlice<u32>,
    token: PinnedHostSlice<u32>,
    logits: Option<PinnedHostSlice<f32>>,
    /// Recorded after the copies: what the host waits for before reading them (the pinned
    /// slices' own events are recorded only where cudarc manages several streams).
    copied: CudaEvent,
    /// Timing events around the launch: the GPU's time for a graph token, against which the
    /// token's whole time shows the host's share.
    events: Option<[CudaEvent; 2]>,
    timed: bool,
}

/// A greedy launch queued ahead of the call that will ask for it: the step at `pos`, whose
/// input is the token the launch before it chose (`input`, once read back).
#[derive(Debug)]
struct Ahead {
    pos: usize,
    slot: usize,
    input: Option<u32>,
}

/// A model's CUDA-graph state: the captured step and the device buffers it reads and writes.
#[derive(Default)]
pub(super) struct Graphs {
    /// A device-routed step has run uncaptured in this process.
    warm: bool,
    /// Why graphs were turned off for the process, after a capture failed.
    off: Option<String>,
    step: Option<DeviceStep>,
    /// The step's token: written before a launch, or by the launch before it (its greedy
    /// choice), and embedded by the graph where the embedding table is packed on the GPU.
    token: Option<CudaSlice<u32>>,
    /// The embedded token `[1, D]`, read by the graph where the host embeds it.
    input: Option<Tensor>,
    /// The logits `[1, vocab]`, written by the graph.
    output: Option<Tensor>,
    captured: Option<Captured>,
    slots: Vec<Slot>,
    ahead: Option<Ahead>,
}

impl std::fmt::Debug for Graphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graphs")
            .field("captured", &self.captured.is_some())
            .field("off", &self.off)
            .field("ahead", &self.ahead)
            .finish()
    }
}

/// What a graphed step hands back.
#[derive(Clone, Copy, PartialEq)]
enum Want {
    /// The logits (teacher forcing, sampling, kept logits).
    Logits,
    /// The greedy token; with `ahead`, the next token's launch is queued before this one's
    /// results are read.
    Greedy { ahead: bool },
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
        match self.graph_step(tokens, kv, access, Want::Logits)? {
            Some((Done::Logits(t), r)) => Ok(Some((t, r))),
            Some((Done::Token(_), _)) => Err(Error::Input(
                "internal: a graphed step gave a token for logits".into(),
            )),
            None => Ok(None),
        }
    }

    /// [`Model::decode_greedy`] on CUDA.
    pub(super) fn greedy_graphed(
        &self,
        token: u32,
        kv: &mut KvCache,
        access: &mut dyn ExpertAccess,
        ahead: bool,
    ) -> Result<Option<(u32, Routing)>> {
        match self.graph_step(&[token], kv, access, Want::Greedy { ahead })? {
            Some((Done::Token(t), r)) => Ok(Some((t, r))),
            Some((Done::Logits(_), _)) => Err(Error::Input(
                "internal: a graphed greedy step gave logits".into(),
            )),
            None => Ok(None),
        }
    }

    /// One decode step from the graph (captured first when none matches), handing back what
    /// `want` asks; `None` where it does not run from a graph.
    fn graph_step(
        &self,
        tokens: &[u32],
        kv: &mut KvCache,
        access: &mut dyn ExpertAccess,
        want: Want,
    ) -> Result<Option<(Done, Routing)>> {
        use std::sync::atomic::Ordering::Relaxed;
        let Device::Cuda(dev) = &self.device else {
            return Ok(None);
        };
        let mut g = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
        // A launch queued ahead serves only the call it was queued for (below); any other forward
        // call (a prompt, a new sequence on reused cache buffers, a profiled step) leaves it
        // behind, and stream order overwrites what it wrote (its cache row by this position's
        // step, the token and routes by the next launch).
        let ahead = g.ahead.take();
        if tokens.len() != 1 || !self.graph_on.load(Relaxed) || self.profiling.load(Relaxed) {
            return Ok(None);
        }
        let Some(first) = self.uniform_mla() else {
            return Ok(None);
        };
        // The graph embeds its token where the table is packed on the GPU; a greedy step needs
        // that (its next launch embeds the token the device chose).
        let embed_at = self.embed.device_matrix();
        if embed_at.is_none() && want != Want::Logits {
            return Ok(None);
        }
        if g.off.is_some() {
            return Ok(None);
        }
        // The prompt made every layer's buffers; a captured step never grows them.
        let pos0 = kv.len;
        let positions = kv.layers.iter().map(LayerKv::room).min().unwrap_or(0);
        if pos0 >= positions || kv.layers.iter().any(|l| l.len() != pos0) {
            return Ok(None);
        }
        let gated = self.gates_on.load(Relaxed);
        let Some(mut session) = self.device_session(1, pos0, &*access, gated)? else {
            return Ok(None);
        };
        if !g.warm {
            // Warmed by the uncaptured step that follows (a greedy call falls back to it).
            g.warm = want == Want::Logits;
            return Ok(None);
        }
        let h = match embed_at {
            Some(_) => None,
            None => {
                let h = self.embed.forward(tokens, &self.device)?;
                if h.dtype() != DType::F32 {
                    return Ok(None);
                }
                Some(h)
            }
        };
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
        let stream = dev.cuda_stream();
        if g.token.is_none() {
            let t = stream
                .alloc_zeros::<u32>(1)
                .map_err(|e| driver("allocation", e))?;
            g.token = Some(t);
        }
        let key = Key {
            kv: kv.layers.iter().map(LayerKv::buffer_ids).collect(),
            routes: session.generation(),
            lookahead: access.wants_lookahead(),
        };
        let input = match (&g.input, &h) {
            (_, None) => None,
            (Some(t), Some(_)) => Some(t.clone()),
            (None, Some(h)) => Some(
                g.input
                    .insert(Tensor::zeros(h.dims(), DType::F32, &self.device)?)
                    .clone(),
            ),
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
        let matched = g.captured.as_ref().is_some_and(|c| c.key == key);
        let queued = ahead.filter(|a| {
            want != Want::Logits && matched && a.pos == pos0 && a.input == Some(tokens[0])
        });
        // A gated step waits for the host at its gates: none is queued ahead of its call.
        let queued = queued.filter(|_| !session.gated());
        let slot = if let Some(a) = queued {
            // This step's launch and its copies were queued by the call before.
            replayed(&g, kv, &mut session)?;
            super::fallback::graph_ahead();
            a.slot
        } else {
            {
                let Graphs { step, token, .. } = &mut *g;
                let step = step
                    .as_mut()
                    .ok_or_else(|| Error::Input("internal: no device step".into()))?;
                stream
                    .memcpy_htod(&[pos0 as u32][..], &mut step.pos)
                    .map_err(|e| driver("position upload", e))?;
                let token = token.as_mut().expect("made above");
                stream
                    .memcpy_htod(tokens, token)
                    .map_err(|e| driver("token upload", e))?;
            }
            if let (Some(input), Some(h)) = (&input, h) {
                input.slice_set(&h, 0, 0)?;
            }
            if matched {
                replayed(&g, kv, &mut session)?;
            } else if !self.capture(
                &mut g,
                &stream,
                key,
                Io {
                    embed_at,
                    input: &input,
                    output: &output,
                },
                pos0,
                kv,
                access,
                &mut session,
            )? {
                return Ok(None);
            }
            launch(&mut g, 0, &stream, &session, &output)?;
            0
        };
        // The next token's launch goes in before this one's results are read: the GPU runs it
        // while the host reports this step's routes and the caller takes the token.
        if want == (Want::Greedy { ahead: true }) && pos0 + 1 < positions && !session.gated() {
            let next = 1 - slot;
            launch(&mut g, next, &stream, &session, &output)?;
            g.ahead = Some(Ahead {
                pos: pos0 + 1,
                slot: next,
                input: None,
            });
        }
        let s = &g.slots[slot];
        let served = match session.gated() {
            // The host's turn at each MoE layer's gate, while the step runs.
            true => Some(
                session.serve(access, pos0, || match s.copied.try_is_complete() {
                    Ok(false) => Ok(()),
                    Ok(true) => Err(Error::Input(
                        "internal: a gated step ended before its gates were answered".into(),
                    )),
                    Err(e) => Err(driver("gated decode step", e)),
                })?,
            ),
            false => None,
        };
        s.copied
            .synchronize()
            .map_err(|e| driver("graph results copy", e))?;
        let routing = match served {
            Some(routing) => {
                session.release();
                super::fallback::graph_gated();
                routing
            }
            None => {
                let routes = s.routes.as_slice().map_err(|e| driver("routes copy", e))?;
                session.finish_with(routes, access, pos0)?
            }
        };
        // Timing is a diagnostic: a token whose events fail is counted untimed, never failed.
        let ms = (s.timed)
            .then_some(s.events.as_ref())
            .flatten()
            .and_then(|[start, end]| start.elapsed_ms(end).ok());
        super::fallback::graph_token(ms);
        let done = match want {
            // A copy: the next launch overwrites the graph's output.
            Want::Logits => Done::Logits(output.copy()?),
            Want::Greedy { .. } => {
                let t = s.token.as_slice().map_err(|e| driver("token copy", e))?[0];
                if let Some(logits) = &s.logits {
                    let row = logits.as_slice().map_err(|e| driver("logits copy", e))?;
                    super::layers::argmax_cuda::check_device_pick(t, row)?;
                }
                if let Some(a) = &mut g.ahead {
                    a.input = Some(t);
                }
                Done::Token(t)
            }
        };
        Ok(Some((done, routing)))
    }

    /// Captures the step into a graph (`g.captured`); `false` (graphs off for the process, said
    /// once, the host's bookkeeping undone) where the capture fails.
    #[allow(clippy::too_many_arguments)]
    fn capture(
        &self,
        g: &mut Graphs,
        stream: &std::sync::Arc<CudaStream>,
        key: Key,
        io: Io<'_>,
        pos0: usize,
        kv: &mut KvCache,
        access: &mut dyn ExpertAccess,
        session: &mut Session<'_>,
    ) -> Result<bool> {
        g.captured = None;
        let lens: Vec<usize> = kv.layers.iter().map(LayerKv::len).collect();
        if let Err(e) =
            stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        {
            eprintln!("CUDA graph: decode steps run uncaptured from now on ({e})");
            g.off = Some(e.to_string());
            return Ok(false);
        }
        let Graphs { step, token, .. } = g;
        let (step, token) = (
            step.as_mut().expect("made by the caller"),
            token.as_mut().expect("made by the caller"),
        );
        let body = self.captured_step(io, pos0, kv, access, session, step, token);
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
                return Ok(true);
            }
            (Err(e), _) => e.to_string(),
            (Ok(()), Err(e)) => format!("the capture failed: {e}"),
            (Ok(()), Ok(None)) => "the capture made no graph".into(),
        };
        // The capture ran nothing: undo its bookkeeping, and clear any error that a buffer
        // freed inside it recorded on the context.
        for (l, n) in kv.layers.iter_mut().zip(lens) {
            l.truncate(n);
        }
        kv.len = pos0;
        let _ = stream.context().check_err();
        eprintln!("CUDA graph: decode steps run uncaptured from now on ({why})");
        g.off = Some(why);
        Ok(false)
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

    /// The step's device work, issued while the stream captures it: the token embedded from
    /// device memory (`embed_at`) or the host's embedding in `input`, the decoder layers with
    /// the position read from `step`, the final norm, `lm_head` into `output`, and the greedy
    /// token into `token` with the position advanced (the next launch's input). Every tensor
    /// made here is dropped before it returns, so the graph frees all it allocates.
    #[allow(clippy::too_many_arguments)]
    fn captured_step(
        &self,
        Io {
            embed_at,
            input,
            output,
        }: Io<'_>,
        pos0: usize,
        kv: &mut KvCache,
        access: &mut dyn ExpertAccess,
        session: &mut Session<'_>,
        step: &mut DeviceStep,
        token: &mut CudaSlice<u32>,
    ) -> Result<()> {
        let h = match (embed_at, input) {
            (Some(m), _) => m.decode_row_at(token)?,
            (None, Some(input)) => input.clone(),
            (None, None) => return Err(Error::Input("internal: a graph without its input".into())),
        };
        let (x, routing) =
            self.layers_forward(h, pos0, kv, access, Some(session), &mut None, Some(step))?;
        if !routing.is_empty() {
            return Err(Error::Input(
                "graph capture: a MoE layer was routed on the host".into(),
            ));
        }
        let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
        output.slice_set(&logits, 0, 0)?;
        if !super::layers::argmax_cuda::greedy_token_to(output, token, &mut step.pos)? {
            return Err(Error::Input(
                "graph capture: the greedy token kernels are unavailable".into(),
            ));
        }
        Ok(())
    }
}

/// The graph's input and output: the embedding table it looks its token up in (packed on the
/// GPU), else the buffer the host embeds the token into; the logits buffer.
struct Io<'a> {
    embed_at: Option<&'a DeviceMatrix>,
    input: &'a Option<Tensor>,
    output: &'a Tensor,
}

/// Counts a launch of the captured graph on the host as it counts the step it replays: one more
/// entry in every layer's cache (written in place by the kernels), and the MoE layers the
/// capture routed, for [`Session::finish_with`] to report.
fn replayed(g: &Graphs, kv: &mut KvCache, session: &mut Session<'_>) -> Result<()> {
    let c = g
        .captured
        .as_ref()
        .ok_or_else(|| Error::Input("internal: no graph to replay".into()))?;
    for l in &mut kv.layers {
        l.advance(1)?;
    }
    kv.len += 1;
    session.replayed(&c.ran);
    Ok(())
}

/// What [`Model::graph_step`] hands back.
enum Done {
    Logits(Tensor),
    Token(u32),
}

/// Launches the captured graph with timing events around it and queues the copies of its
/// results into slot `i` (made or remade to fit): the routes, the greedy token, and under
/// `HARNESS_CHECK_GREEDY` the logits. Nothing waits.
fn launch(
    g: &mut Graphs,
    i: usize,
    stream: &std::sync::Arc<CudaStream>,
    session: &Session<'_>,
    output: &Tensor,
) -> Result<()> {
    let routes = session.routes()?;
    let vocab = output.elem_count();
    let check = super::layers::check_greedy();
    while g.slots.len() <= i {
        g.slots.push(new_slot(stream, routes.len(), vocab, check)?);
    }
    if g.slots[i].routes.len() != routes.len() {
        g.slots[i] = new_slot(stream, routes.len(), vocab, check)?;
    }
    let Graphs {
        slots,
        captured,
        token,
        ..
    } = g;
    let (s, c) = (
        &mut slots[i],
        captured
            .as_ref()
            .ok_or_else(|| Error::Input("internal: no graph to launch".into()))?,
    );
    s.timed = s
        .events
        .as_ref()
        .is_some_and(|[start, _]| start.record(stream).is_ok());
    c.graph.0.launch().map_err(|e| driver("graph launch", e))?;
    s.timed = s.timed
        && s.events
            .as_ref()
            .is_some_and(|[_, end]| end.record(stream).is_ok());
    stream
        .memcpy_dtoh(routes, &mut s.routes)
        .map_err(|e| driver("routes copy", e))?;
    let token = token
        .as_ref()
        .ok_or_else(|| Error::Input("internal: no device token".into()))?;
    stream
        .memcpy_dtoh(token, &mut s.token)
        .map_err(|e| driver("token copy", e))?;
    if let Some(logits) = &mut s.logits {
        let (st, l) = output.storage_and_layout();
        let candle_core::Storage::Cuda(cs) = &*st else {
            return Err(Error::Input("internal: logits are not on the GPU".into()));
        };
        let v = cs.as_cuda_slice::<f32>()?;
        let v = v.slice(l.start_offset()..l.start_offset() + vocab);
        stream
            .memcpy_dtoh(&v, logits)
            .map_err(|e| driver("logits copy", e))?;
    }
    s.copied
        .record(stream)
        .map_err(|e| driver("graph results event", e))
}

/// A slot for `routes` route words and (with `check`) `vocab` logits, in pinned host memory.
fn new_slot(
    stream: &std::sync::Arc<CudaStream>,
    routes: usize,
    vocab: usize,
    check: bool,
) -> Result<Slot> {
    let ctx = stream.context();
    // SAFETY (all three): the memory is written by a copy before it is read (the host waits
    // for the slot's `copied` event first).
    let pinned = |n: usize| unsafe { ctx.alloc_pinned_with_flags::<u32>(n, 0) };
    let routes = pinned(routes).map_err(|e| driver("pinned allocation", e))?;
    let token = pinned(1).map_err(|e| driver("pinned allocation", e))?;
    let logits = match check {
        true => Some(
            unsafe { ctx.alloc_pinned_with_flags::<f32>(vocab, 0) }
                .map_err(|e| driver("pinned allocation", e))?,
        ),
        false => None,
    };
    let copied = ctx
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
        .map_err(|e| driver("event", e))?;
    let ev = || {
        ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .ok()
    };
    Ok(Slot {
        routes,
        token,
        logits,
        copied,
        events: ev().zip(ev()).map(|(a, b)| [a, b]),
        timed: false,
    })
}
