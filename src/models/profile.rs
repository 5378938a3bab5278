//! Where a forward pass spends its time, by part of the decoder (opt-in:
//! [`super::Model::set_profiling`]). Each boundary between parts first waits for the device
//! (`Device::synchronize`), so that a GPU's queued work is charged to the part that queued it
//! rather than to the next one that reads a result back. That also removes any overlap between
//! parts and adds one wait per boundary, so a profiled pass is slower than an unprofiled one: its
//! shares say where the time goes, the unprofiled pass says how fast the engine is.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Device;

use crate::error::Result;

/// The parts of the decoder a profile names, in report order.
pub const PARTS: [&str; 8] = [
    "attention",
    "norms",
    "router",
    "experts",
    "dense_mlp",
    "lm_head",
    "embed",
    "wait",
];

/// Seconds spent per part of the decoder, over some forward calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct PartTimes {
    /// Seconds per part, indexed by [`Part`] (the order of [`PARTS`]).
    pub seconds: [f64; PARTS.len()],
    /// Forward calls.
    pub calls: u64,
    /// Tokens they processed.
    pub tokens: u64,
    /// Parallel regions of the CPU's compute threads in these calls (products, attention,
    /// expert blocks: each one fork and join).
    pub regions: u64,
    /// Seconds spent in them per part (the rest of a part's time ran on the engine thread
    /// alone), indexed as `seconds`.
    pub parallel: [f64; PARTS.len()],
}

impl PartTimes {
    /// The difference `self − before` (for a window of a run).
    pub fn since(&self, before: &PartTimes) -> PartTimes {
        PartTimes {
            seconds: std::array::from_fn(|i| self.seconds[i] - before.seconds[i]),
            calls: self.calls - before.calls,
            tokens: self.tokens - before.tokens,
            regions: self.regions - before.regions,
            parallel: std::array::from_fn(|i| self.parallel[i] - before.parallel[i]),
        }
    }

    /// Milliseconds per token of each part (named as in [`PARTS`]), and their `total`.
    pub fn ms_per_token(&self) -> BTreeMap<&'static str, f64> {
        let n = self.tokens.max(1) as f64;
        let mut m = self.per_token(&self.seconds);
        m.insert("parallel", self.parallel.iter().sum::<f64>() * 1e3 / n);
        m.insert("regions", self.regions as f64 / n);
        m
    }

    /// Milliseconds per token of each part (named as in [`PARTS`]) spent in the compute
    /// threads' parallel regions, and their `total`: what of each part the threads shared.
    pub fn parallel_ms_per_token(&self) -> BTreeMap<&'static str, f64> {
        self.per_token(&self.parallel)
    }

    /// `seconds` per part as milliseconds per token, named as in [`PARTS`], and their `total`.
    fn per_token(&self, seconds: &[f64]) -> BTreeMap<&'static str, f64> {
        let n = self.tokens.max(1) as f64;
        let mut m: BTreeMap<&'static str, f64> = PARTS
            .iter()
            .zip(seconds)
            .map(|(&k, v)| (k, v * 1e3 / n))
            .collect();
        m.insert("total", seconds.iter().sum::<f64>() * 1e3 / n);
        m
    }

    fn add(&mut self, other: &PartTimes) {
        for (a, b) in self.seconds.iter_mut().zip(other.seconds) {
            *a += b;
        }
        self.calls += other.calls;
        self.tokens += other.tokens;
        self.regions += other.regions;
        for (a, b) in self.parallel.iter_mut().zip(other.parallel) {
            *a += b;
        }
    }
}

/// Part times of prefill calls (more than one token) and decode calls (one token) apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Profile {
    /// Forward calls over more than one token.
    pub prefill: PartTimes,
    /// Forward calls over one token.
    pub decode: PartTimes,
}

impl Profile {
    /// Adds one forward call's times.
    pub(crate) fn record(&mut self, times: &PartTimes) {
        if times.tokens > 1 {
            self.prefill.add(times);
        } else {
            self.decode.add(times);
        }
    }
}

/// A part of the decoder, for [`Clock::mark`]; its discriminant is its index in [`PARTS`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Part {
    /// The token mixers (attention, MLA, DeltaNet, KDA) with their input norms.
    Attention = 0,
    /// Post-attention norms and the residual additions.
    Norms = 1,
    /// Routers, and the router lookahead's predictions when a policy asks for them (on the CPU
    /// with several threads, a decode step's shared-expert gate and up products too: they run
    /// in the router's parallel region, `MoeBlock::route_step_rows`).
    Router = 2,
    /// Routed and shared experts of MoE layers, including any wait for an expert to load.
    Experts = 3,
    /// Dense MLP layers.
    DenseMlp = 4,
    /// Final norm and `lm_head`.
    LmHead = 5,
    /// Token embedding.
    Embed = 6,
    /// A step routed on the device: the wait for its routes at the end (where the device, not
    /// the host, bounds the step, what remains of its work) and the cache's bookkeeping.
    Wait = 7,
}

/// Whether profiled calls time only the host's side (`HARNESS_PROFILE_HOST` set): the device is
/// not synchronized at part boundaries, so each part's time is what the host spent issuing it
/// (where the host, not the GPU, bounds a decode step, the parts sum to the step).
pub fn host_only() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("HARNESS_PROFILE_HOST").is_some())
}

/// Times one forward call (when profiling is on; otherwise every call is a no-op).
pub(crate) struct Clock<'a> {
    dev: &'a Device,
    last: Instant,
    /// The parallel regions counted at the last mark ([`crate::weights::kernels::spin::regions`]).
    regions: (u64, f64),
    /// The times so far.
    pub(crate) times: PartTimes,
}

impl<'a> Clock<'a> {
    /// Starts timing after the device has finished what was queued before the call.
    pub(crate) fn start(dev: &'a Device, on: bool, tokens: usize) -> Result<Option<Self>> {
        if !on {
            return Ok(None);
        }
        dev.synchronize()?;
        crate::weights::kernels::spin::count_regions(true);
        Ok(Some(Clock {
            dev,
            regions: crate::weights::kernels::spin::regions(),
            last: Instant::now(),
            times: PartTimes {
                calls: 1,
                tokens: tokens as u64,
                ..Default::default()
            },
        }))
    }

    /// Charges the time since the last mark (once the device is done, unless [`host_only`])
    /// to `part`.
    pub(crate) fn mark(clock: &mut Option<Self>, part: Part) -> Result<()> {
        let Some(c) = clock else {
            return Ok(());
        };
        if !host_only() {
            c.dev.synchronize()?;
        }
        let now = Instant::now();
        let dt = (now - c.last).as_secs_f64();
        c.last = now;
        c.times.seconds[part as usize] += dt;
        let r = crate::weights::kernels::spin::regions();
        c.times.regions += r.0 - c.regions.0;
        c.times.parallel[part as usize] += r.1 - c.regions.1;
        c.regions = r;
        Ok(())
    }

    /// The call's times (its parallel regions charged to the parts they ran in); stops
    /// counting regions.
    pub(crate) fn finish(self) -> PartTimes {
        crate::weights::kernels::spin::count_regions(false);
        self.times
    }
}

/// A table of milliseconds per token by part (`cells`: each cell's name and its
/// [`PartTimes::ms_per_token`] or [`PartTimes::parallel_ms_per_token`]), the columns every cell
/// has among the parts, `total`, `parallel` (ms per token inside the compute threads' parallel
/// regions) and `regions` (how many a token ran); empty without cells.
pub fn table(title: &str, cells: Vec<(&str, &BTreeMap<String, f64>)>) -> String {
    let mut out = String::new();
    if cells.is_empty() {
        return out;
    }
    let cols: Vec<&str> = PARTS
        .iter()
        .chain(&["total", "parallel", "regions"])
        .copied()
        .filter(|p| cells.iter().any(|(_, m)| m.contains_key(*p)))
        .collect();
    out.push_str(&format!("{title}\n{:<18}", "cell"));
    cols.iter().for_each(|p| out.push_str(&format!(" {p:>9}")));
    out.push('\n');
    for (cell, ms) in cells {
        out.push_str(&format!("{cell:<18}"));
        for p in &cols {
            out.push_str(&format!(" {:>9.3}", ms.get(*p).copied().unwrap_or(0.0)));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_indexes_its_own_name() {
        for (part, name) in [
            (Part::Attention, "attention"),
            (Part::Norms, "norms"),
            (Part::Router, "router"),
            (Part::Experts, "experts"),
            (Part::DenseMlp, "dense_mlp"),
            (Part::LmHead, "lm_head"),
            (Part::Embed, "embed"),
            (Part::Wait, "wait"),
        ] {
            assert_eq!(PARTS[part as usize], name);
        }
    }
}
