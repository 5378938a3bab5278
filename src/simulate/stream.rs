//! `harness simulate` over a trace file of any length: the file is read one Parquet row group
//! at a time, every (policy, budget) replay is fed each decoded block (in parallel over cores),
//! and memory stays O(caches + two row groups) whatever the trace's length.
//!
//! Passes over the file:
//! 1. a scan of the `layer` and `cell` columns (the MoE layers the budgets are split over, which
//!    cell to replay);
//! 2. only when a policy needs the future (`belady`) or an oracle profile (`static-<N>` without
//!    one): a backward pass, row groups last to first, writing each block's next-use numbers to
//!    an unnamed temporary file (8 bytes per demand access and per lookahead entry);
//! 3. the replay, row groups first to last, decoded on one thread while the replays of the
//!    previous block run on the others.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use super::future::{Backward, BlockFuture, ProfileCounter, SpillFile};
use super::replay::Replayer;
use super::{SimResult, Simulation};
use crate::config::ModelSpec;
use crate::error::{Error, Result};
use crate::experts::budget::{Budget, Pool};
use crate::experts::policies::PolicySpec;
use crate::experts::ExpertKey;
use crate::trace::{Columns, RowBlock, TraceFile};

/// `harness simulate`: every policy × budget over one cell of a trace file.
#[derive(Debug, Clone)]
pub struct TraceStudy {
    /// The trace file (see [`crate::trace`] for the schema).
    pub trace: PathBuf,
    /// Which cell of a multi-cell run trace (default: the first).
    pub cell: Option<String>,
    /// Policies.
    pub policies: Vec<PolicySpec>,
    /// Expert slots per layer.
    pub capacities: Vec<usize>,
    /// Byte budgets, shared as `pool` says.
    pub budgets: Vec<u64>,
    /// How byte budgets are shared.
    pub pool: Pool,
    /// The checkpoint the trace came from: expert sizes, and layer/expert ids checked against it.
    pub model: Option<PathBuf>,
    /// Size of every expert when no model is given (byte budgets need one of the two).
    pub expert_bytes: Option<u64>,
    /// Prompts below this index are replayed but not counted.
    pub warmup_prompts: u32,
    /// Empty the cache at every new prompt.
    pub reset_per_prompt: bool,
    /// Classic (libCacheSim) mode.
    pub classic: bool,
    /// The miss mode whose actions are counted.
    pub miss: crate::experts::miss::MissMode,
}

/// How a study ran (`harness simulate --stats`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StudyStats {
    /// Rows of the replayed cell.
    pub rows: u64,
    /// Demand accesses of the replayed cell.
    pub accesses: u64,
    /// Parquet row groups of the file.
    pub row_groups: usize,
    /// (policy, budget) replays.
    pub replays: usize,
    /// Passes over the file (scan, backward when needed, replay).
    pub passes: u32,
    /// Bytes of next-use numbers written by the backward pass (0 when none).
    pub future_bytes: u64,
    /// Wall time of the whole study, file reading included.
    pub seconds: f64,
    /// Wall time of each pass (scan, backward when run, replay).
    pub pass_seconds: Vec<f64>,
}

/// Runs a [`TraceStudy`]: one [`SimResult`] per policy × budget, policies outermost.
pub fn study(s: &TraceStudy) -> Result<(Vec<SimResult>, StudyStats)> {
    let t0 = Instant::now();
    let file = TraceFile::open(&s.trace)?;
    let path = s.trace.as_path();
    if is_aggregate(&file) {
        if let Some(p) = s
            .policies
            .iter()
            .find(|p| !matches!(p, PolicySpec::Static { .. }))
        {
            return Err(Error::Input(format!(
                "{}: an aggregate-only trace (expert activation counts without access order, e.g. imported from MoE-Infinity): policy `{p}` depends on the order of accesses; only static-<N> (each layer's N most used experts pinned) replays it",
                path.display()
            )));
        }
    }
    let mut stats = StudyStats {
        row_groups: file.groups(),
        passes: 1,
        ..StudyStats::default()
    };
    // Pass 1: which cell, which layers.
    let has_cell = file.has("cell");
    let mut all_cells: Vec<String> = Vec::new();
    let mut seen = Vec::new();
    let mut chosen = s.cell.clone();
    for g in 0..file.groups() {
        if has_cell && chosen.is_none() {
            chosen = file.cells(g)?.into_iter().next();
        }
        let filter = chosen.as_deref().filter(|_| has_cell);
        for c in file.scan(g, filter, &mut seen)? {
            if !all_cells.contains(&c) {
                all_cells.push(c);
            }
        }
    }
    if let Some(name) = &chosen {
        if !all_cells.contains(name) {
            return Err(Error::Input(format!(
                "{}: no cell `{name}` in the trace (cells: {})",
                path.display(),
                all_cells.join(", ")
            )));
        }
        if s.cell.is_none() && all_cells.len() > 1 {
            eprintln!(
                "{}: the trace holds {} cells; using `{name}` (choose with --cell)",
                path.display(),
                all_cells.len()
            );
        }
    }
    let cell = chosen.as_deref().filter(|_| has_cell);
    stats.pass_seconds.push(t0.elapsed().as_secs_f64());
    let layers: Vec<u32> = (0..seen.len() as u32)
        .filter(|&l| seen[l as usize])
        .collect();
    if layers.is_empty() {
        return Err(Error::format(path, "the trace has no rows"));
    }
    // Expert sizes and id checks from the model, when given.
    let (spec, store) = match &s.model {
        Some(dir) => {
            let spec = crate::models::load_spec(dir)?;
            if let Some(&l) = layers.iter().find(|&&l| !spec.is_moe_layer(l as usize)) {
                return Err(Error::Input(format!(
                    "{}: layer {l} is not a MoE layer of {} (MoE layers: {:?})",
                    path.display(),
                    dir.display(),
                    spec.moe.moe_layers
                )));
            }
            let open =
                crate::experts::store::OpenCheckpoint::open(dir, &spec, candle_core::Device::Cpu)?;
            (Some((spec, dir.clone())), Some(open.store))
        }
        None => (None, None),
    };
    let unit = s.expert_bytes.unwrap_or(1);
    let size = |k: ExpertKey| store.as_ref().map_or(unit, |st| st.expert_bytes(k));
    let mut budgets: Vec<Budget> = s
        .capacities
        .iter()
        .map(|&n| Budget::SlotsPerLayer(n))
        .collect();
    if !s.budgets.is_empty() && store.is_none() && s.expert_bytes.is_none() {
        return Err(Error::Input("--budget needs expert sizes: pass --model DIR (the checkpoint the trace came from) or --expert-bytes N".into()));
    }
    budgets.extend(
        s.budgets
            .iter()
            .map(|&b| Budget::from_bytes(b, s.pool, layers.len())),
    );
    if budgets.is_empty() {
        return Err(Error::Input(
            "give --capacity N[,N…] and/or --budget SIZE[,SIZE…]".into(),
        ));
    }
    let sims: Vec<Simulation> = s
        .policies
        .iter()
        .flat_map(|p| budgets.iter().map(move |&b| (p, b)))
        .map(|(p, b)| {
            let mut sim = Simulation::new(p.clone(), b, &layers);
            sim.classic = s.classic;
            sim.warmup_prompts = s.warmup_prompts;
            sim.reset_per_prompt = s.reset_per_prompt;
            sim.working_set = spec.as_ref().map_or(0, |(m, _)| m.moe.top_k);
            sim.miss = s.miss;
            sim.unit_bytes = super::first_expert_bytes(&sim, &size);
            sim
        })
        .collect();
    stats.replays = sims.len();
    let columns = Columns {
        lookahead: sims.iter().any(|m| m.policy.prefetch()),
        weights: sims.iter().any(|m| m.policy.needs_weights()),
        all: false,
    };
    let check = |b: &RowBlock| match &spec {
        Some((spec, dir)) => check_block(path, b, spec, dir),
        None => Ok(()),
    };
    // Pass 2 (when needed): the future, backward, row groups decoded on other threads; next
    // uses kept in a temporary file as variable-length distances.
    let needs_future = sims.iter().any(|m| m.policy.needs_future());
    let needs_profile = sims.iter().any(|m| m.policy.needs_profile());
    let mut profiles = needs_profile.then(|| ProfileCounter::new(s.reset_per_prompt));
    let mut future: Option<SpillFile> = None;
    if needs_future || needs_profile {
        stats.passes += 1;
        let mut back = Backward::new(s.reset_per_prompt);
        let mut spill = SpillFile::new()?;
        let groups: Vec<usize> = (0..file.groups()).rev().collect();
        let decode = |g: usize| -> Result<(usize, RowBlock)> {
            let (b, _) = file.block(g, cell, columns)?;
            check(&b)?;
            Ok((g, b))
        };
        for_each_ordered(&groups, &decode, |(g, b)| {
            if b.is_empty() {
                return Ok(());
            }
            if let Some(p) = &mut profiles {
                p.add(&b);
            }
            if needs_future {
                spill.put(g, &back.block(&b))?;
            }
            Ok(())
        })?;
        stats.future_bytes = spill.bytes;
        stats
            .pass_seconds
            .push(t0.elapsed().as_secs_f64() - stats.pass_seconds.iter().sum::<f64>());
        future = needs_future.then_some(spill);
    }
    // Pass 3: the replay.
    stats.passes += 1;
    let mut replays: Vec<Replayer<'_>> = sims
        .iter()
        .map(|sim| Replayer::new(sim, profiles.as_ref()))
        .collect::<std::result::Result<_, _>>()?;
    let profiles = profiles.as_ref();
    let size_ref: &(dyn Fn(ExpertKey) -> u64 + Sync) = &size;
    let groups: Vec<usize> = (0..file.groups()).collect();
    let decode = |g: usize| -> Result<Option<(RowBlock, Option<BlockFuture>)>> {
        let (b, _) = file.block(g, cell, columns)?;
        if future.is_none() {
            check(&b)?;
        }
        let f = future.as_ref().map(|s| s.get(g)).transpose()?;
        Ok(Some((b, f)))
    };
    let mut pending: Option<(RowBlock, Option<BlockFuture>)> = None;
    let mut feed = |block: &RowBlock,
                    bf: &Option<BlockFuture>,
                    next: Option<&(RowBlock, Option<BlockFuture>)>|
     -> Result<()> {
        let next = next.map(|(nb, nf)| {
            let la = &nb.lookahead;
            let uses = nf
                .as_ref()
                .map_or(&[][..], |f| &f.prefetch[la.offsets[0]..la.offsets[1]]);
            (nb.row(0), uses)
        });
        let fut = bf.as_ref();
        let run = |r: &mut Replayer<'_>| r.feed(block, fut, next, profiles, size_ref);
        if replays.len() > 1 {
            replays.par_iter_mut().try_for_each(run)?;
        } else {
            replays.iter_mut().try_for_each(run)?;
        }
        stats.rows += block.len() as u64;
        stats.accesses += block.accesses() as u64;
        Ok(())
    };
    for_each_ordered(&groups, &decode, |item| {
        let Some(item) = item.filter(|i| !i.0.is_empty()) else {
            return Ok(());
        };
        if let Some((b, f)) = pending.take() {
            feed(&b, &f, Some(&item))?;
        }
        pending = Some(item);
        Ok(())
    })?;
    if let Some((b, f)) = pending.take() {
        feed(&b, &f, None)?;
    }
    if stats.rows == 0 {
        return Err(Error::format(path, "the trace has no rows"));
    }
    stats.seconds = t0.elapsed().as_secs_f64();
    stats
        .pass_seconds
        .push(stats.seconds - stats.pass_seconds.iter().sum::<f64>());
    Ok((replays.into_iter().map(Replayer::finish).collect(), stats))
}

/// Runs `produce` over `items` on several threads (as many as the machine has cores, at most
/// 4) and hands the results to `consume` in `items`' order, with at most two results per
/// thread in flight: row groups decode in parallel while one thread replays them in order.
fn for_each_ordered<T: Send>(
    items: &[usize],
    produce: &(dyn Fn(usize) -> Result<T> + Sync),
    mut consume: impl FnMut(T) -> Result<()>,
) -> Result<()> {
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 4)
        .min(items.len().max(1));
    std::thread::scope(|scope| -> Result<()> {
        let mut rxs = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<T>>(1);
            rxs.push(rx);
            let mine: Vec<usize> = items.iter().skip(w).step_by(workers).copied().collect();
            scope.spawn(move || {
                for i in mine {
                    let r = produce(i);
                    let stop = r.is_err();
                    if tx.send(r).is_err() || stop {
                        return;
                    }
                }
            });
        }
        for j in 0..items.len() {
            let r = rxs[j % workers]
                .recv()
                .map_err(|_| Error::Input("a decoding thread stopped unexpectedly".into()))?;
            consume(r?)?;
        }
        Ok(())
    })
}

/// True for a trace whose rows are counts in a canonical order, not recorded accesses.
pub fn is_aggregate(file: &TraceFile) -> bool {
    file.key_values()
        .iter()
        .any(|(k, v)| k == "moe_harness.order" && v == "aggregate")
}

/// Checks a block's layers and expert ids against the model it is said to come from.
fn check_block(trace: &Path, b: &RowBlock, spec: &ModelSpec, dir: &Path) -> Result<()> {
    for i in 0..b.len() {
        let r = b.row(i);
        if !spec.is_moe_layer(r.layer as usize) {
            return Err(Error::Input(format!(
                "{}: layer {} is not a MoE layer of {} (MoE layers: {:?})",
                trace.display(),
                r.layer,
                dir.display(),
                spec.moe.moe_layers
            )));
        }
        if let Some(e) = r
            .experts
            .iter()
            .chain(r.lookahead.into_iter().flatten())
            .find(|&&e| e as usize >= spec.moe.num_experts)
        {
            return Err(Error::Input(format!(
                "{}: expert {e} at layer {} is out of range: {} has {} routed experts",
                trace.display(),
                r.layer,
                dir.display(),
                spec.moe.num_experts
            )));
        }
    }
    Ok(())
}
