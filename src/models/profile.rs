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
pub const PARTS: [&str; 7] = [
    "attention",
    "norms",
    "router",
    "experts",
    "dense_mlp",
    "lm_head",
    "embed",
];

/// Seconds spent per part of the decoder, over some forward calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct PartTimes {
    /// Token embedding.
    pub embed: f64,
    /// The token mixers (attention, MLA, DeltaNet, KDA) with their input norms.
    pub attention: f64,
    /// Post-attention norms and the residual additions.
    pub norms: f64,
    /// Routers, and the router lookahead's predictions when a policy asks for them.
    pub router: f64,
    /// Routed and shared experts of MoE layers, including any wait for an expert to load.
    pub experts: f64,
    /// Dense MLP layers.
    pub dense_mlp: f64,
    /// Final norm and `lm_head`.
    pub lm_head: f64,
    /// Forward calls.
    pub calls: u64,
    /// Tokens they processed.
    pub tokens: u64,
}

impl PartTimes {
    /// The difference `self − before` (for a window of a run).
    pub fn since(&self, before: &PartTimes) -> PartTimes {
        PartTimes {
            embed: self.embed - before.embed,
            attention: self.attention - before.attention,
            norms: self.norms - before.norms,
            router: self.router - before.router,
            experts: self.experts - before.experts,
            dense_mlp: self.dense_mlp - before.dense_mlp,
            lm_head: self.lm_head - before.lm_head,
            calls: self.calls - before.calls,
            tokens: self.tokens - before.tokens,
        }
    }

    /// The parts' seconds, in the order of [`PARTS`].
    pub fn seconds(&self) -> [f64; 7] {
        [
            self.attention,
            self.norms,
            self.router,
            self.experts,
            self.dense_mlp,
            self.lm_head,
            self.embed,
        ]
    }

    /// Milliseconds per token of each part (named as in [`PARTS`]), and their `total`.
    pub fn ms_per_token(&self) -> BTreeMap<&'static str, f64> {
        let n = self.tokens.max(1) as f64;
        let secs = self.seconds();
        let mut m: BTreeMap<&'static str, f64> = PARTS
            .iter()
            .zip(secs)
            .map(|(&k, v)| (k, v * 1e3 / n))
            .collect();
        m.insert("total", secs.iter().sum::<f64>() * 1e3 / n);
        m
    }

    fn add(&mut self, other: &PartTimes) {
        self.embed += other.embed;
        self.attention += other.attention;
        self.norms += other.norms;
        self.router += other.router;
        self.experts += other.experts;
        self.dense_mlp += other.dense_mlp;
        self.lm_head += other.lm_head;
        self.calls += other.calls;
        self.tokens += other.tokens;
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

/// A part of the decoder, for [`Clock::mark`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Part {
    Embed,
    Attention,
    Norms,
    Router,
    Experts,
    DenseMlp,
    LmHead,
}

/// Times one forward call (when profiling is on; otherwise every call is a no-op).
pub(crate) struct Clock<'a> {
    dev: &'a Device,
    last: Instant,
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
        Ok(Some(Clock {
            dev,
            last: Instant::now(),
            times: PartTimes {
                calls: 1,
                tokens: tokens as u64,
                ..Default::default()
            },
        }))
    }

    /// Charges the time since the last mark (once the device is done) to `part`.
    pub(crate) fn mark(clock: &mut Option<Self>, part: Part) -> Result<()> {
        let Some(c) = clock else {
            return Ok(());
        };
        c.dev.synchronize()?;
        let now = Instant::now();
        let dt = (now - c.last).as_secs_f64();
        c.last = now;
        let t = &mut c.times;
        *match part {
            Part::Embed => &mut t.embed,
            Part::Attention => &mut t.attention,
            Part::Norms => &mut t.norms,
            Part::Router => &mut t.router,
            Part::Experts => &mut t.experts,
            Part::DenseMlp => &mut t.dense_mlp,
            Part::LmHead => &mut t.lm_head,
        } += dt;
        Ok(())
    }
}
