//! Counts of decode work that left a fused GPU kernel for a slower path, and of the GPU paths
//! decode tokens took (routed on the device, run from a CUDA graph), so that a run cannot claim
//! kernels or paths it did not use: the engine's kernel label (`Engine::kernels_label`, printed
//! by `logits`, `generate`, `bench` and every experiment cell) names them, and the GPU check
//! fails on fallbacks and requires the paths.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

static EXPERTS: AtomicU64 = AtomicU64::new(0);
static ATTENTION: AtomicU64 = AtomicU64::new(0);

/// A token's routed experts ran one at a time although the fused kernels were asked for (a
/// form or shape the kernels do not take, or experts of mixed forms).
pub fn experts() {
    EXPERTS.fetch_add(1, Relaxed);
}

/// An MLA decode step on a GPU took the tensor-op path although the fused kernels were asked
/// for (kernels unavailable, a shape they do not take, or a context past their shared memory).
pub fn attention() {
    ATTENTION.fetch_add(1, Relaxed);
}

/// `(experts, attention)`: the tokens and steps counted since the process started.
pub fn counts() -> (u64, u64) {
    (EXPERTS.load(Relaxed), ATTENTION.load(Relaxed))
}

static ROUTED_ON_DEVICE: AtomicU64 = AtomicU64::new(0);

/// A decode token was routed on the GPU (`models::device_routing`): not a fallback, counted so
/// the kernel label says how many tokens took that path.
pub fn routed_on_device() {
    ROUTED_ON_DEVICE.fetch_add(1, Relaxed);
}

/// Decode tokens routed on the GPU since the process started.
pub fn routed_on_device_count() -> u64 {
    ROUTED_ON_DEVICE.load(Relaxed)
}

static GRAPH_CAPTURED: AtomicU64 = AtomicU64::new(0);
static GRAPH_TOKENS: AtomicU64 = AtomicU64::new(0);

/// A decode step was captured into a CUDA graph (`models::graph`).
pub fn graph_captured() {
    GRAPH_CAPTURED.fetch_add(1, Relaxed);
}

static GRAPH_AHEAD: AtomicU64 = AtomicU64::new(0);

/// A greedy decode token's graph launch had been queued by the call before, ahead of that
/// call's results being read (`models::graph`).
pub fn graph_ahead() {
    GRAPH_AHEAD.fetch_add(1, Relaxed);
}

static GRAPH_GATED: AtomicU64 = AtomicU64::new(0);

/// A decode token's graph waited at its MoE layers' gates for the host (`models::graph`).
pub fn graph_gated() {
    GRAPH_GATED.fetch_add(1, Relaxed);
}

static GATE_COPIES: AtomicU64 = AtomicU64::new(0);

/// A gated decode step copied `n` missed experts itself, in its gates
/// (`experts::upload::Gates`), rather than the host through the copy engine.
pub fn gate_copies(n: u64) {
    GATE_COPIES.fetch_add(n, Relaxed);
}

static GRAPH_GPU_NS: AtomicU64 = AtomicU64::new(0);
static GRAPH_TIMED: AtomicU64 = AtomicU64::new(0);

/// A decode token ran as one launch of a captured CUDA graph, taking `gpu_ms` on the GPU
/// (timing events around the launch; `None` where they failed).
pub fn graph_token(gpu_ms: Option<f32>) {
    GRAPH_TOKENS.fetch_add(1, Relaxed);
    if let Some(ms) = gpu_ms {
        GRAPH_TIMED.fetch_add(1, Relaxed);
        GRAPH_GPU_NS.fetch_add((f64::from(ms.max(0.0)) * 1e6) as u64, Relaxed);
    }
}

/// The decode steps that ran from CUDA graphs since the process started.
#[derive(Debug, Clone, Copy)]
pub struct GraphCounts {
    /// Steps captured into a graph.
    pub captures: u64,
    /// Tokens run as a graph launch.
    pub tokens: u64,
    /// Of those, greedy tokens whose launch was queued by the call before.
    pub ahead: u64,
    /// Of those, tokens whose MoE layers waited at gates for the host (experts could miss).
    pub gated: u64,
    /// Missed experts those gates copied themselves.
    pub gate_copies: u64,
    /// Their mean time on the GPU (`None` if none was timed).
    pub gpu_ms: Option<f64>,
}

/// The [`GraphCounts`] so far.
pub fn graph_counts() -> GraphCounts {
    let timed = GRAPH_TIMED.load(Relaxed);
    let ns = GRAPH_GPU_NS.load(Relaxed) as f64;
    GraphCounts {
        captures: GRAPH_CAPTURED.load(Relaxed),
        tokens: GRAPH_TOKENS.load(Relaxed),
        ahead: GRAPH_AHEAD.load(Relaxed),
        gated: GRAPH_GATED.load(Relaxed),
        gate_copies: GATE_COPIES.load(Relaxed),
        gpu_ms: (timed > 0).then(|| ns / 1e6 / timed as f64),
    }
}
