//! The figures of a run, each as PNG and SVG: hit rate vs budget per policy (with the Belady
//! bound), decode tokens/s vs budget, hit rate per layer, rolling hit rate over decode steps, and
//! the layer × expert frequency heat map.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::CellSummary;
use crate::error::{Error, Result};
use crate::experts::Phase;
use crate::trace::{self, TraceRow};

static FONT: &[u8] = include_bytes!("DejaVuSans.ttf");
static REGISTER: Once = Once::new();

pub(super) fn register_font() {
    REGISTER.call_once(|| {
        // The embedded font is valid; failure would only mean plots without text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// One line of a line chart.
pub(super) struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    /// Colour (policies keep theirs across every figure); `None`: black.
    color: Option<RGBColor>,
    /// Dashed, thinner, no markers (bounds and references).
    dashed: bool,
    /// Min–max whiskers at some points: (x, low, high).
    whiskers: Vec<(f64, f64, f64)>,
}

impl Series {
    pub(super) fn line(label: impl Into<String>, points: Vec<(f64, f64)>, color: RGBColor) -> Self {
        Series {
            label: label.into(),
            points,
            color: Some(color),
            dashed: false,
            whiskers: Vec::new(),
        }
    }
    pub(super) fn bound(
        label: impl Into<String>,
        points: Vec<(f64, f64)>,
        color: Option<RGBColor>,
    ) -> Self {
        Series {
            label: label.into(),
            points,
            color,
            dashed: true,
            whiskers: Vec::new(),
        }
    }
}

pub(super) struct LineChart {
    pub(super) title: String,
    /// A second line under the title: what produced the numbers.
    pub(super) subtitle: Option<String>,
    pub(super) x_label: String,
    pub(super) y_label: String,
    pub(super) series: Vec<Series>,
    pub(super) y_range: Option<(f64, f64)>,
    /// Tick labels of the x axis (default: the number).
    pub(super) x_fmt: Option<Box<dyn Fn(f64) -> String>>,
    /// Number of x tick labels (default: 7 with `x_fmt`, else 10).
    pub(super) x_ticks: Option<usize>,
}

pub(super) const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// One colour per series label (policy and miss mode), the same in every figure of a run.
struct Palette(Vec<String>);

impl Palette {
    fn new(summary: &[CellSummary]) -> Self {
        let mut labels: Vec<String> = Vec::new();
        for s in summary {
            let l = label(s);
            if !labels.contains(&l) {
                labels.push(l);
            }
        }
        Palette(labels)
    }
    fn of(&self, label: &str) -> RGBColor {
        let i = self.0.iter().position(|l| l == label).unwrap_or(0);
        COLORS[i % COLORS.len()]
    }
}

pub(super) fn perr(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::format(path, format!("plotting: {e}"))
}

pub(super) fn draw_lines<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    c: &LineChart,
) -> std::result::Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let pts = c.series.iter().flat_map(|s| {
        s.points.iter().copied().chain(
            s.whiskers
                .iter()
                .flat_map(|&(x, lo, hi)| [(x, lo), (x, hi)]),
        )
    });
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if (x1 - x0).abs() < 1e-12 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    let pad = (x1 - x0) * 0.03;
    let (x0, x1) = (x0 - pad, x1 + pad);
    let (y0, y1) = c.y_range.unwrap_or((y0.min(0.0), y1 * 1.08 + 1e-9));
    let root = match &c.subtitle {
        Some(sub) => {
            let (top, rest) = root.split_vertically(84);
            top.draw_text(&c.title, &("sans-serif", 26).into_text_style(&top), (16, 8))
                .map_err(|e| e.to_string())?;
            // At most two lines of about 125 characters, split at ` · `.
            let mut lines = vec![String::new()];
            for part in sub.split(" · ") {
                let full = lines.len() >= 2;
                let cur = lines.last_mut().expect("one line");
                if !cur.is_empty() && cur.len() + part.len() > 125 && !full {
                    lines.push(part.to_string());
                } else {
                    if !cur.is_empty() {
                        cur.push_str(" · ");
                    }
                    cur.push_str(part);
                }
            }
            for (i, l) in lines.iter().enumerate() {
                top.draw_text(
                    l,
                    &("sans-serif", 15).into_text_style(&top),
                    (16, 40 + 18 * i as i32),
                )
                .map_err(|e| e.to_string())?;
            }
            rest
        }
        None => root,
    };
    let mut builder = ChartBuilder::on(&root);
    if c.subtitle.is_none() {
        builder.caption(&c.title, ("sans-serif", 26));
    }
    let mut chart = builder
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    let default_fmt = |x: &f64| format!("{x}");
    let fmt: &dyn Fn(&f64) -> String = match &c.x_fmt {
        Some(f) => &|x: &f64| f(*x),
        None => &default_fmt,
    };
    chart
        .configure_mesh()
        .x_desc(&c.x_label)
        .y_desc(&c.y_label)
        .x_labels(c.x_ticks.unwrap_or(if c.x_fmt.is_some() { 7 } else { 10 }))
        .x_label_formatter(fmt)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(|e| e.to_string())?;
    for s in &c.series {
        let color = s.color.unwrap_or(BLACK);
        let style = color.stroke_width(if s.dashed { 2 } else { 3 });
        let anno = if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(s.points.iter().copied(), 8, 6, style))
                .map_err(|e| e.to_string())?
        } else {
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), style))
                .map_err(|e| e.to_string())?
        };
        let dashed = s.dashed;
        anno.label(&s.label).legend(move |(x, y)| {
            if dashed {
                PathElement::new(vec![(x, y), (x + 8, y)], color.stroke_width(2))
            } else {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            }
        });
        if !s.dashed && s.points.len() < 40 {
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| e.to_string())?;
        }
        if !s.whiskers.is_empty() {
            let cap = (x1 - x0) * 0.006;
            chart
                .draw_series(s.whiskers.iter().flat_map(|&(x, lo, hi)| {
                    [
                        PathElement::new(vec![(x, lo), (x, hi)], color.stroke_width(2)),
                        PathElement::new(vec![(x - cap, lo), (x + cap, lo)], color.stroke_width(2)),
                        PathElement::new(vec![(x - cap, hi), (x + cap, hi)], color.stroke_width(2)),
                    ]
                }))
                .map_err(|e| e.to_string())?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

fn save_lines(dir: &Path, name: &str, c: &LineChart) -> Result<()> {
    let png = dir.join(format!("{name}.png"));
    draw_lines(BitMapBackend::new(&png, (1000, 700)).into_drawing_area(), c)
        .map_err(|e| perr(&png, e))?;
    let svg = dir.join(format!("{name}.svg"));
    draw_lines(SVGBackend::new(&svg, (1000, 700)).into_drawing_area(), c)
        .map_err(|e| perr(&svg, e))?;
    Ok(())
}

fn draw_heatmap<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    layers: &[u32],
    experts: usize,
    counts: &BTreeMap<(u32, u32), u64>,
    title: &str,
) -> std::result::Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let max = counts.values().copied().max().unwrap_or(1).max(1);
    let (w, _) = root.dim_in_pixel();
    let (main, bar) = root.split_horizontally(w.saturating_sub(120));
    let n = layers.len();
    let mut chart = ChartBuilder::on(&main)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..experts as f64, 0f64..n.max(1) as f64)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("expert id")
        .y_desc("decoder layer")
        .x_label_formatter(&|v| format!("{v:.0}"))
        // Ticks every half row; only the row centres are labelled.
        .y_labels(2 * n + 1)
        .y_label_formatter(&|v| {
            if (v.fract() - 0.5).abs() < 1e-6 {
                layers
                    .get(v.floor() as usize)
                    .map_or(String::new(), |l| l.to_string())
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(layers.iter().enumerate().flat_map(|(li, &l)| {
            (0..experts as u32).map(move |e| {
                let v = counts.get(&(l, e)).copied().unwrap_or(0) as f64 / max as f64;
                let c = ViridisRGB::get_color(v);
                Rectangle::new(
                    [(e as f64, li as f64), (e as f64 + 1.0, li as f64 + 1.0)],
                    c.filled(),
                )
            })
        }))
        .map_err(|e| e.to_string())?;
    // The colour bar: selections per (layer, expert), 0 to the maximum.
    let mut cb = ChartBuilder::on(&bar)
        .margin_top(60)
        .margin_bottom(64)
        .margin_right(16)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..1f64, 0f64..max as f64)
        .map_err(|e| e.to_string())?;
    cb.configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_desc("selections")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(|e| e.to_string())?;
    let steps = 100;
    cb.draw_series((0..steps).map(|i| {
        let (a, b) = (i as f64 / steps as f64, (i + 1) as f64 / steps as f64);
        Rectangle::new(
            [(0.0, a * max as f64), (1.0, b * max as f64)],
            ViridisRGB::get_color(a).filled(),
        )
    }))
    .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// A small viridis-like ramp.
struct ViridisRGB;
impl ViridisRGB {
    fn get_color(v: f64) -> RGBColor {
        let stops = [
            (68.0, 1.0, 84.0),
            (59.0, 82.0, 139.0),
            (33.0, 145.0, 140.0),
            (94.0, 201.0, 98.0),
            (253.0, 231.0, 37.0),
        ];
        let x = v.clamp(0.0, 1.0) * (stops.len() - 1) as f64;
        let i = (x.floor() as usize).min(stops.len() - 2);
        let t = x - i as f64;
        let (a, b) = (stops[i], stops[i + 1]);
        let m = |p: f64, q: f64| (p + (q - p) * t) as u8;
        RGBColor(m(a.0, b.0), m(a.1, b.1), m(a.2, b.2))
    }
}

fn label(s: &CellSummary) -> String {
    if s.miss == "load" {
        s.policy.clone()
    } else {
        format!("{} ({})", s.policy, s.miss)
    }
}

/// Draws the budget, speed, per-layer, over-time and frequency figures of a results directory
/// from its `summary.parquet` and `trace.parquet`.
pub(super) fn plot_figures(dir: &Path) -> Result<()> {
    register_font();
    let summary = super::read_summary(&dir.join("summary.parquet"))?;
    let cells = trace::read(&dir.join("trace.parquet"))?;
    let palette = Palette::new(&summary);
    let mut groups: BTreeMap<String, Vec<&CellSummary>> = BTreeMap::new();
    for s in &summary {
        groups.entry(label(s)).or_default().push(s);
    }
    for g in groups.values_mut() {
        g.sort_by(|a, b| a.budget_fraction.total_cmp(&b.budget_fraction));
    }
    let pct = |s: &CellSummary| 100.0 * s.budget_fraction;
    let budget_axis = "cache budget (% of routed-expert bytes)";
    let mut hit = Vec::new();
    let mut demand = Vec::new();
    for (name, c) in &groups {
        let color = palette.of(name);
        hit.push(Series::line(
            name.clone(),
            c.iter().map(|s| (pct(s), s.effective_hit_rate)).collect(),
            color,
        ));
        demand.push(Series::line(
            name.clone(),
            c.iter().map(|s| (pct(s), s.hit_rate)).collect(),
            color,
        ));
    }
    // The Belady bound per budget: the best offline hit rate over the cells at that budget.
    let mut bound: BTreeMap<u64, f64> = BTreeMap::new();
    for s in &summary {
        let k = (pct(s) * 1e6) as u64;
        let e = bound.entry(k).or_insert(0.0);
        *e = e.max(s.belady_hit_rate);
    }
    hit.push(Series::bound(
        "Belady (offline optimum)",
        bound.iter().map(|(k, v)| (*k as f64 / 1e6, *v)).collect(),
        None,
    ));
    let routing = summary.first().map_or(String::new(), |s| {
        s.routing.trim_end_matches(", replayed").to_string()
    });
    save_lines(
        dir,
        "hit_rate_vs_budget",
        &LineChart {
            title: "Expert-cache hit rate vs budget".into(),
            subtitle: Some(format!("routing: {routing}")),
            x_label: budget_axis.into(),
            y_label: "hit rate (1 − expert loads / expert uses)".into(),
            series: hit,
            y_range: Some((0.0, 1.0)),
            x_fmt: None,
            x_ticks: None,
        },
    )?;
    save_lines(
        dir,
        "demand_hit_rate_vs_budget",
        &LineChart {
            title: "Demand hit rate vs budget (prefetched experts count as hits)".into(),
            subtitle: Some(format!("routing: {routing}")),
            x_label: budget_axis.into(),
            y_label: "demand hit rate".into(),
            series: demand,
            y_range: Some((0.0, 1.0)),
            x_fmt: None,
            x_ticks: None,
        },
    )?;
    // Decode speed, one figure per model the speed was measured on (the real-size replay first).
    let mut speed_models: Vec<(&str, u64)> = Vec::new();
    for s in &summary {
        if !speed_models.iter().any(|(m, _)| *m == s.speed_model) {
            speed_models.push((&s.speed_model, s.expert_bytes));
        }
    }
    speed_models.sort_by_key(|m| std::cmp::Reverse(m.1));
    for (i, (model, _)) in speed_models.iter().enumerate() {
        let rows: Vec<&CellSummary> = summary.iter().filter(|s| s.speed_model == *model).collect();
        let name = if i == 0 {
            "decode_tps_vs_budget".to_string()
        } else {
            format!("decode_tps_vs_budget_{}", i + 1)
        };
        save_lines(dir, &name, &speed_chart(&rows, &palette))?;
    }

    // Per-layer and over-time views at the smallest budget, one line per policy.
    let smallest = summary
        .iter()
        .map(|s| s.budget_fraction)
        .fold(f64::INFINITY, f64::min);
    let at_smallest: Vec<&CellSummary> = summary
        .iter()
        .filter(|s| (s.budget_fraction - smallest).abs() < 1e-12)
        .collect();
    let by_cell: BTreeMap<&str, &[TraceRow]> = cells
        .iter()
        .map(|c| (c.cell.as_str(), c.rows.as_slice()))
        .collect();
    let mut per_layer = Vec::new();
    let mut rolling = Vec::new();
    for s in &at_smallest {
        let Some(rs) = by_cell.get(s.cell.as_str()) else {
            continue;
        };
        let mut layer: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        for r in rs.iter() {
            let e = layer.entry(r.layer).or_default();
            e.0 += r.hits.len() as u64;
            e.1 += r.hits.iter().filter(|&&h| h).count() as u64;
        }
        let color = palette.of(&label(s));
        per_layer.push(Series::line(
            label(s),
            layer
                .iter()
                .map(|(l, (a, h))| (*l as f64, *h as f64 / (*a).max(1) as f64))
                .collect(),
            color,
        ));
        // Rolling hit rate over the decode steps, in execution order (window of 16 steps).
        let mut steps: Vec<(u64, u64)> = Vec::new();
        let mut last: Option<(u32, u32)> = None;
        for r in rs.iter().filter(|r| r.phase == Phase::Decode) {
            if last != Some((r.prompt, r.step)) {
                steps.push((0, 0));
                last = Some((r.prompt, r.step));
            }
            let e = steps.last_mut().expect("pushed");
            e.0 += r.hits.len() as u64;
            e.1 += r.hits.iter().filter(|&&h| h).count() as u64;
        }
        let w = 16usize;
        let pts = (0..steps.len())
            .map(|i| {
                let lo = i.saturating_sub(w - 1);
                let (a, h) = steps[lo..=i]
                    .iter()
                    .fold((0, 0), |acc, x| (acc.0 + x.0, acc.1 + x.1));
                (i as f64, h as f64 / a.max(1) as f64)
            })
            .collect();
        rolling.push(Series::line(label(s), pts, color));
    }
    let budget_note = at_smallest.first().map_or(String::new(), |s| {
        format!(
            " (budget {:.1}% of expert bytes)",
            100.0 * s.budget_fraction
        )
    });
    save_lines(
        dir,
        "hit_rate_per_layer",
        &LineChart {
            title: format!("Hit rate per layer{budget_note}"),
            subtitle: Some(format!("routing: {routing}")),
            x_label: "decoder layer".into(),
            y_label: "hit rate".into(),
            series: per_layer,
            y_range: Some((0.0, 1.0)),
            x_fmt: None,
            x_ticks: None,
        },
    )?;
    save_lines(
        dir,
        "hit_rate_over_decode",
        &LineChart {
            title: format!("Rolling hit rate over decode steps{budget_note}"),
            subtitle: Some(format!("routing: {routing}")),
            x_label: "decode step (all prompts, in order; window 16)".into(),
            y_label: "hit rate".into(),
            series: rolling,
            y_range: Some((0.0, 1.0)),
            x_fmt: None,
            x_ticks: None,
        },
    )?;

    // Expert-frequency heat map from the first cell (routing is the same for every exact cell).
    if let Some(first) = summary.first() {
        let mut counts: BTreeMap<(u32, u32), u64> = BTreeMap::new();
        let mut layers: Vec<u32> = Vec::new();
        let mut max_e = 0;
        for r in by_cell
            .get(first.cell.as_str())
            .copied()
            .unwrap_or_default()
        {
            if !layers.contains(&r.layer) {
                layers.push(r.layer);
            }
            for &e in &r.experts {
                *counts.entry((r.layer, e)).or_default() += 1;
                max_e = max_e.max(e as usize + 1);
            }
        }
        layers.sort_unstable();
        let title = format!(
            "Expert selections per layer and expert (cell {})",
            first.cell
        );
        let png = dir.join("expert_frequency.png");
        draw_heatmap(
            BitMapBackend::new(&png, (1100, 500)).into_drawing_area(),
            &layers,
            max_e,
            &counts,
            &title,
        )
        .map_err(|e| perr(&png, e))?;
        let svg = dir.join("expert_frequency.svg");
        draw_heatmap(
            SVGBackend::new(&svg, (1100, 500)).into_drawing_area(),
            &layers,
            max_e,
            &counts,
            &title,
        )
        .map_err(|e| perr(&svg, e))?;
    }
    Ok(())
}

/// Decode tokens/s vs budget for the cells measured on one model: per policy the median over
/// repeats with min–max whiskers and its storage bound (dashed, same colour), and the
/// all-resident speed as a reference line; budgets as % of expert bytes and in GB.
fn speed_chart(rows: &[&CellSummary], palette: &Palette) -> LineChart {
    let pct = |s: &CellSummary| 100.0 * s.budget_fraction;
    // Cells of one sweep may have run on machines of different kinds: their tok/s are then
    // separate series, named by machine, each with its own all-resident line.
    let machine = |s: &CellSummary| format!("{} ({})", s.host, s.device);
    let mut machines: Vec<String> = Vec::new();
    for s in rows {
        if !machines.contains(&machine(s)) {
            machines.push(machine(s));
        }
    }
    let several = machines.len() > 1;
    let mut groups: BTreeMap<String, Vec<&CellSummary>> = BTreeMap::new();
    for s in rows {
        let name = if several {
            format!("{} @ {}", label(s), machine(s))
        } else {
            label(s)
        };
        groups.entry(name).or_default().push(s);
    }
    let mut series = Vec::new();
    for (name, c) in groups.iter_mut() {
        c.sort_by(|a, b| a.budget_fraction.total_cmp(&b.budget_fraction));
        let color = if several {
            COLORS[(palette
                .0
                .iter()
                .position(|l| l == &label(c[0]))
                .unwrap_or(0)
                + machines
                    .iter()
                    .position(|m| m == &machine(c[0]))
                    .unwrap_or(0)
                    * 3)
                % COLORS.len()]
        } else {
            palette.of(name)
        };
        let mut s = Series::line(
            name.clone(),
            c.iter().map(|s| (pct(s), s.decode_tps)).collect(),
            color,
        );
        if c.iter().any(|s| s.repeats > 1) {
            s.whiskers = c
                .iter()
                .map(|s| (pct(s), s.decode_tps_min, s.decode_tps_max))
                .collect();
        }
        series.push(s);
        series.push(Series::bound(
            format!("storage bound ({name})"),
            c.iter().map(|s| (pct(s), s.storage_bound_tps)).collect(),
            Some(color),
        ));
    }
    let (lo, hi) = rows.iter().fold((f64::MAX, f64::MIN), |(a, b), s| {
        (a.min(pct(s)), b.max(pct(s)))
    });
    for m in &machines {
        let Some(r) = rows.iter().find(|s| &machine(s) == m) else {
            continue;
        };
        series.push(Series::bound(
            if several {
                format!("all resident @ {m} ({:.1} tok/s)", r.resident_decode_tps)
            } else {
                format!("all experts resident ({:.1} tok/s)", r.resident_decode_tps)
            },
            vec![(lo, r.resident_decode_tps), (hi, r.resident_decode_tps)],
            Some(RGBColor(110, 110, 110)),
        ));
    }
    let first = rows.first();
    // GB per budget percent on this model (budget bytes are proportional to the fraction).
    let gb_per_pct = rows
        .iter()
        .find(|s| s.budget_fraction > 0.0)
        .map(|s| s.cache_budget_bytes as f64 / 1e9 / (100.0 * s.budget_fraction));
    let x_fmt: Option<Box<dyn Fn(f64) -> String>> =
        gb_per_pct.filter(|g| g * 100.0 >= 0.05).map(|g| {
            Box::new(move |x: f64| format!("{x:.0}% · {:.2} GB", x * g))
                as Box<dyn Fn(f64) -> String>
        });
    let subtitle = first.map(|s| {
        format!(
            "{} · {} per expert · {} on {}{} · io {}{} · read {:.2} GB/s · routing: {}",
            s.speed_model,
            crate::experts::budget::human_bytes(s.expert_bytes),
            if s.repeats > 1 {
                format!("median of {}", s.repeats)
            } else {
                "1 run".into()
            },
            if several {
                format!("{} machines", machines.len())
            } else {
                s.device.clone()
            },
            if s.kernels.is_empty() || s.kernels == "gpu" {
                String::new()
            } else {
                format!(" ({} threads, {})", s.threads, s.kernels)
            },
            s.io,
            s.storage_device
                .as_deref()
                .map_or(String::new(), |d| format!(" ({d})")),
            s.storage_read_gbps,
            s.routing
        )
    });
    LineChart {
        title: "Decode speed vs budget, between the storage bound and all-resident".into(),
        subtitle,
        x_label: "cache budget (% of routed-expert bytes · GB)".into(),
        y_label: "decode tokens/s".into(),
        series,
        y_range: None,
        x_fmt,
        x_ticks: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(policy: &str, cap: f64, host: &str, device: &str, tps: f64) -> CellSummary {
        CellSummary {
            cell: format!("{policy}_{cap}"),
            policy: policy.into(),
            miss: "load".into(),
            budget_fraction: cap,
            host: host.into(),
            device: device.into(),
            decode_tps: tps,
            resident_decode_tps: tps * 2.0,
            storage_bound_tps: tps * 1.5,
            ..CellSummary::default()
        }
    }

    #[test]
    fn cells_from_different_machines_are_separate_series() {
        let rows = vec![
            row("lru", 0.25, "a", "cpu", 5.0),
            row("lru", 0.5, "a", "cpu", 6.0),
            row("lru", 0.25, "b", "cuda:0", 50.0),
            row("lru", 0.5, "b", "cuda:0", 60.0),
        ];
        let palette = Palette::new(&rows);
        let refs: Vec<&CellSummary> = rows.iter().collect();
        let chart = speed_chart(&refs, &palette);
        let names: Vec<&str> = chart.series.iter().map(|s| s.label.as_str()).collect();
        assert!(names.contains(&"lru @ a (cpu)"), "{names:?}");
        assert!(names.contains(&"lru @ b (cuda:0)"), "{names:?}");
        let a = chart
            .series
            .iter()
            .find(|s| s.label == "lru @ a (cpu)")
            .unwrap();
        assert_eq!(a.points, vec![(25.0, 5.0), (50.0, 6.0)]);
        assert_eq!(
            names
                .iter()
                .filter(|n| n.starts_with("all resident @"))
                .count(),
            2
        );
        assert!(chart.subtitle.unwrap().contains("2 machines"));
        // One machine: names as before.
        let one: Vec<&CellSummary> = rows[..2].iter().collect();
        let chart = speed_chart(&one, &palette);
        assert!(chart.series.iter().any(|s| s.label == "lru"));
    }
}
