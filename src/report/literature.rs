//! The policy and miss-mode comparison of a run that has several of them
//! (`experiments/literature.toml`): one figure, `policies_and_miss_modes.{png,svg}`, and one
//! table, `policies_and_miss_modes.md`.
//!
//! Panels: (a) each policy's hit rate (exact `load` cells) with the Belady bound of the same
//! cell, one colour per budget; (b) each miss mode's quality cost, mean KL(exact ‖ cell) over the
//! policies, per budget; (c) top-1 agreement with the exact model; (d) decode tokens/s, median
//! over the policies. Drawn from `summary.parquet` alone.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::plots::{draw_lines, perr, LineChart, Series, COLORS};
use super::CellSummary;
use crate::error::Result;
use crate::io::write_atomic;

/// A cell's budget as the figure names it.
fn budget(s: &CellSummary) -> String {
    match s.capacity {
        Some(n) => format!("{n} slots/layer"),
        None => format!("{:.1}% {}", 100.0 * s.budget_fraction, s.pool),
    }
}

/// The cell of policy `p` at budget `b` (as [`budget`] names it) with miss mode `m`.
fn cell<'a>(summary: &'a [CellSummary], p: &str, b: &str, m: &str) -> Option<&'a CellSummary> {
    summary
        .iter()
        .find(|s| s.policy == p && budget(s) == b && s.miss == m)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Names in order of first appearance.
fn ordered<'a>(it: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in it {
        if !out.iter().any(|o| o == s) {
            out.push(s.to_string());
        }
    }
    out
}

/// Tick labels naming categories at integer positions.
fn categories(names: Vec<String>) -> Box<dyn Fn(f64) -> String> {
    Box::new(move |x: f64| {
        let i = x.round();
        if (x - i).abs() > 1e-6 || i < 0.0 {
            return String::new();
        }
        names.get(i as usize).cloned().unwrap_or_default()
    })
}

/// Draws the comparison when the run has at least two policies or two miss modes.
pub(super) fn plot(dir: &Path, summary: &[CellSummary]) -> Result<()> {
    let policies = ordered(summary.iter().map(|s| s.policy.as_str()));
    let misses = ordered(summary.iter().map(|s| s.miss.as_str()));
    if policies.len() < 2 && misses.len() < 2 {
        return Ok(());
    }
    let names: Vec<String> = summary.iter().map(budget).collect();
    let budgets = ordered(names.iter().map(String::as_str));
    let at = |p: &str, b: &str, m: &str| cell(summary, p, b, m);
    let color = |i: usize| COLORS[i % COLORS.len()];
    // (a) hit rate per policy with its Belady bound.
    let mut hit = Vec::new();
    for (bi, b) in budgets.iter().enumerate() {
        let cells: Vec<(f64, &CellSummary)> = policies
            .iter()
            .enumerate()
            .filter_map(|(i, p)| at(p, b, "load").map(|s| (i as f64, s)))
            .collect();
        if cells.is_empty() {
            continue;
        }
        hit.push(Series::line(
            b.clone(),
            cells
                .iter()
                .map(|(x, s)| (*x, s.effective_hit_rate))
                .collect(),
            color(bi),
        ));
        hit.push(Series::bound(
            format!("Belady, {b}"),
            cells.iter().map(|(x, s)| (*x, s.belady_hit_rate)).collect(),
            Some(color(bi)),
        ));
    }
    // (b–d) per miss mode, over the policies.
    let per_mode = |f: &dyn Fn(&[&CellSummary]) -> Option<f64>| -> Vec<Series> {
        let mut out = Vec::new();
        for (bi, b) in budgets.iter().enumerate() {
            let pts: Vec<(f64, f64)> = misses
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    let cells: Vec<&CellSummary> = summary
                        .iter()
                        .filter(|s| &s.miss == m && &budget(s) == b)
                        .collect();
                    f(&cells).map(|v| (i as f64, v))
                })
                .collect();
            if !pts.is_empty() {
                out.push(Series::line(b.clone(), pts, color(bi)));
            }
        }
        out
    };
    let kl = per_mode(&|c| {
        if c.iter()
            .all(|s| s.miss == "load" || s.miss == "cpu-compute")
        {
            return (!c.is_empty()).then_some(0.0);
        }
        mean(&c.iter().filter_map(|s| s.kl_mean).collect::<Vec<_>>())
    });
    let top1 = per_mode(&|c| {
        if c.iter()
            .all(|s| s.miss == "load" || s.miss == "cpu-compute")
        {
            return (!c.is_empty()).then_some(1.0);
        }
        mean(
            &c.iter()
                .filter_map(|s| s.top1_agreement)
                .collect::<Vec<_>>(),
        )
    });
    let tps = per_mode(&|c| median(c.iter().map(|s| s.decode_tps).collect()));
    let routing = summary.first().map_or(String::new(), |s| {
        s.routing.trim_end_matches(", replayed").to_string()
    });
    // What produced the speeds: device, I/O mode, storage, and the model the speed is of.
    let device = summary.first().map_or(String::new(), |s| {
        format!(
            "{} · io {} · storage {} · speed of {} · routing: {}",
            s.device,
            s.io,
            s.storage_device.as_deref().unwrap_or("this machine's own"),
            s.speed_model,
            s.routing
        )
    });
    let charts = [
        LineChart {
            title: "(a) Hit rate per policy, under its Belady bound".into(),
            subtitle: Some(format!("exact (load) cells · routing: {routing}")),
            x_label: "policy".into(),
            y_label: "hit rate (1 − expert loads / uses)".into(),
            series: hit,
            y_range: Some((0.0, 1.0)),
            x_fmt: Some(categories(policies.clone())),
            x_ticks: Some(policies.len()),
        },
        per_mode_chart(
            "(b) Quality cost of each miss mode",
            "mean over policies of KL(exact ‖ cell), next-token distributions".into(),
            "mean KL (nats)",
            kl,
            None,
            &misses,
        ),
        per_mode_chart(
            "(c) Top-1 agreement with the exact model",
            "mean over policies; 1 for load".into(),
            "top-1 agreement",
            top1,
            Some((0.0, 1.0)),
            &misses,
        ),
        per_mode_chart(
            "(d) Decode speed of each miss mode",
            format!("median over policies · {device}"),
            "decode tokens/s",
            tps,
            None,
            &misses,
        ),
    ];
    let png = dir.join("policies_and_miss_modes.png");
    panels(
        BitMapBackend::new(&png, (2000, 1400)).into_drawing_area(),
        &charts,
    )
    .map_err(|e| perr(&png, e))?;
    let svg = dir.join("policies_and_miss_modes.svg");
    panels(
        SVGBackend::new(&svg, (2000, 1400)).into_drawing_area(),
        &charts,
    )
    .map_err(|e| perr(&svg, e))?;
    write_atomic(
        &dir.join("policies_and_miss_modes.md"),
        format!(
            "{}\ntok/s: decode, {device}.\n",
            table(summary, &policies, &budgets, &misses)
        )
        .as_bytes(),
    )
}

/// A chart with one point per miss mode and a line per budget.
fn per_mode_chart(
    title: &str,
    subtitle: String,
    y_label: &str,
    series: Vec<Series>,
    y_range: Option<(f64, f64)>,
    misses: &[String],
) -> LineChart {
    LineChart {
        title: title.into(),
        subtitle: Some(subtitle),
        x_label: "miss mode".into(),
        y_label: y_label.into(),
        series,
        y_range,
        x_fmt: Some(categories(misses.to_vec())),
        x_ticks: Some(misses.len()),
    }
}

/// Four charts on a 2 × 2 grid.
fn panels<DB: DrawingBackend>(
    area: DrawingArea<DB, plotters::coord::Shift>,
    charts: &[LineChart],
) -> std::result::Result<(), String> {
    for (p, c) in area.split_evenly((2, 2)).into_iter().zip(charts) {
        draw_lines(p, c)?;
    }
    Ok(())
}

/// The table: per policy and budget, the exact hit rate and Belady's, then per other miss mode
/// its KL, top-1 agreement and decode tokens/s (and the exact cell's tokens/s).
fn table(
    summary: &[CellSummary],
    policies: &[String],
    budgets: &[String],
    misses: &[String],
) -> String {
    let at = |p: &str, b: &str, m: &str| cell(summary, p, b, m);
    let mut out = String::from("| policy | budget | hit rate | Belady | load tok/s |");
    let lossy: Vec<&String> = misses.iter().filter(|m| *m != "load").collect();
    for m in &lossy {
        let _ = write!(out, " {m}: KL / top-1 / tok/s |");
    }
    out.push_str("\n|---|---|---|---|---|");
    for _ in &lossy {
        out.push_str("---|");
    }
    out.push('\n');
    let f = |v: Option<f64>, d: usize| v.map_or("-".to_string(), |v| format!("{v:.d$}"));
    let mut by_policy: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (pi, p) in policies.iter().enumerate() {
        for b in budgets {
            let load = at(p, b, "load");
            let mut row = format!(
                "| {p} | {b} | {} | {} | {} |",
                f(load.map(|s| s.effective_hit_rate), 3),
                f(load.map(|s| s.belady_hit_rate), 3),
                f(load.map(|s| s.decode_tps), 1),
            );
            for m in &lossy {
                let c = at(p, b, m);
                let _ = write!(
                    row,
                    " {} / {} / {} |",
                    f(c.and_then(|s| s.kl_mean), 3),
                    f(c.and_then(|s| s.top1_agreement), 2),
                    f(c.map(|s| s.decode_tps), 1)
                );
            }
            by_policy.entry(pi).or_default().push(row);
        }
    }
    for rows in by_policy.values() {
        for r in rows {
            out.push_str(r);
            out.push('\n');
        }
    }
    out
}
