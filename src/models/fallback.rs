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

static ROUTER_FUSED: AtomicU64 = AtomicU64::new(0);
static ROUTER_SPLIT: AtomicU64 = AtomicU64::new(0);

/// A MoE layer's device routing was issued (`models::device_routing`; a captured graph's
/// replays issue nothing): in one launch (`moe_router`, `fused`) or as the router product then
/// one route kernel a route.
pub fn router_issued(fused: bool) {
    match fused {
        true => ROUTER_FUSED.fetch_add(1, Relaxed),
        false => ROUTER_SPLIT.fetch_add(1, Relaxed),
    };
}

/// MoE layers' device routings issued since the process started: in one launch, and split.
pub fn router_counts() -> (u64, u64) {
    (ROUTER_FUSED.load(Relaxed), ROUTER_SPLIT.load(Relaxed))
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

static GATED_MISSES: AtomicU64 = AtomicU64::new(0);

/// `n` experts chosen at a gate were not held when the host began the gate's step (the misses
/// the gates may copy; one a prefetch already loads is counted too).
pub fn gated_misses(n: u64) {
    GATED_MISSES.fetch_add(n, Relaxed);
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
    /// Experts chosen at those gates that were not held when their step began.
    pub gated_misses: u64,
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
        gated_misses: GATED_MISSES.load(Relaxed),
        gpu_ms: (timed > 0).then(|| ns / 1e6 / timed as f64),
    }
}

/// Where the time of gated decode steps' gates went (`experts::upload::Gates`), summed over
/// every gate run since the process started: the device's global timer for the GPU's parts,
/// the host's clock for its turn. Durations only, so the two clocks never meet.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct GateTimes {
    /// Gates run (MoE layers of gated steps).
    pub gates: u64,
    /// Nanoseconds from a gate's start to its posting the routes (publishing the route words).
    pub post_ns: u64,
    /// Nanoseconds the GPU waited for the host's answer (from the post to seeing the answer).
    pub wait_ns: u64,
    /// Of those, nanoseconds of the host's turn (from seeing the post to writing the answer:
    /// the cache's step and any misses loaded on the host's thread).
    pub host_ns: u64,
    /// Nanoseconds from the answer to the gate's end (the addresses read, the step's own copies
    /// of misses, the grid's end).
    pub after_ns: u64,
    /// Nanoseconds between one gate's end and the next gate's start in the same step (the
    /// layer's attention, router and experts).
    pub between_ns: u64,
}

impl GateTimes {
    /// Nothing timed.
    const ZERO: GateTimes = GateTimes {
        gates: 0,
        post_ns: 0,
        wait_ns: 0,
        host_ns: 0,
        after_ns: 0,
        between_ns: 0,
    };

    /// `f` applied field by field to `self` and `other`.
    fn zip(&self, other: &GateTimes, f: impl Fn(u64, u64) -> u64) -> GateTimes {
        GateTimes {
            gates: f(self.gates, other.gates),
            post_ns: f(self.post_ns, other.post_ns),
            wait_ns: f(self.wait_ns, other.wait_ns),
            host_ns: f(self.host_ns, other.host_ns),
            after_ns: f(self.after_ns, other.after_ns),
            between_ns: f(self.between_ns, other.between_ns),
        }
    }

    /// The times accumulated since `before` was taken.
    pub fn since(&self, before: &GateTimes) -> GateTimes {
        self.zip(before, u64::saturating_sub)
    }
}

static GATE_TIMES: std::sync::Mutex<GateTimes> = std::sync::Mutex::new(GateTimes::ZERO);

/// Adds one gated step's gate times.
pub fn gate_times(t: &GateTimes) {
    let mut g = GATE_TIMES.lock().unwrap_or_else(|e| e.into_inner());
    *g = g.zip(t, u64::saturating_add);
}

/// The gate times so far ([`GateTimes`]).
pub fn gate_times_so_far() -> GateTimes {
    *GATE_TIMES.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::GateTimes;

    #[test]
    fn gate_times_since_takes_each_field_and_never_underflows() {
        let t = |g, p, w, h, a, b| GateTimes {
            gates: g,
            post_ns: p,
            wait_ns: w,
            host_ns: h,
            after_ns: a,
            between_ns: b,
        };
        let before = t(46, 10, 200, 150, 30, 4000);
        let after = t(92, 25, 410, 290, 70, 8100);
        assert_eq!(after.since(&before), t(46, 15, 210, 140, 40, 4100));
        assert_eq!(before.since(&after), GateTimes::default());
    }
}
