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

fn register_font() {
    REGISTER.call_once(|| {
        // The embedded font is valid; failure would only mean plots without text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// One line of a line chart.
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    dashed: bool,
}

struct LineChart {
    title: String,
    x_label: String,
    y_label: String,
    series: Vec<Series>,
    y_range: Option<(f64, f64)>,
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

fn perr(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::format(path, format!("plotting: {e}"))
}

fn draw_lines<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    c: &LineChart,
) -> std::result::Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let pts = c.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
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
    let (y0, y1) = c.y_range.unwrap_or((y0.min(0.0), y1 * 1.05 + 1e-9));
    let mut chart = ChartBuilder::on(&root)
        .caption(&c.title, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(&c.x_label)
        .y_desc(&c.y_label)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, s) in c.series.iter().enumerate() {
        let color = if s.dashed {
            BLACK
        } else {
            COLORS[i % COLORS.len()]
        };
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
        anno.label(&s.label).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
        });
        if !s.dashed && s.points.len() < 40 {
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| e.to_string())?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
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
) -> std::result::Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let max = counts.values().copied().max().unwrap_or(1).max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Expert selection frequency (layer × expert)",
            ("sans-serif", 26),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0..experts as u32, 0..layers.len() as u32)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("expert id")
        .y_desc("MoE layer (index among MoE layers)")
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(layers.iter().enumerate().flat_map(|(li, &l)| {
            (0..experts as u32).map(move |e| {
                let v = counts.get(&(l, e)).copied().unwrap_or(0) as f64 / max;
                let c = ViridisRGB::get_color(v);
                Rectangle::new([(e, li as u32), (e + 1, li as u32 + 1)], c.filled())
            })
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

/// Draws every figure of a results directory from its `summary.parquet` and `trace.parquet`.
pub fn plot_dir(dir: &Path) -> Result<()> {
    register_font();
    let summary = super::read_summary(&dir.join("summary.parquet"))?;
    let cells = trace::read(&dir.join("trace.parquet"))?;
    let mut groups: BTreeMap<String, Vec<&CellSummary>> = BTreeMap::new();
    for s in &summary {
        groups.entry(label(s)).or_default().push(s);
    }
    let pct = |s: &CellSummary| 100.0 * s.budget_fraction;
    let mut hit = Vec::new();
    let mut demand = Vec::new();
    let mut tps = Vec::new();
    for (name, cells) in &groups {
        let mut c = cells.clone();
        c.sort_by(|a, b| a.budget_fraction.total_cmp(&b.budget_fraction));
        hit.push(Series {
            label: name.clone(),
            points: c.iter().map(|s| (pct(s), s.effective_hit_rate)).collect(),
            dashed: false,
        });
        demand.push(Series {
            label: name.clone(),
            points: c.iter().map(|s| (pct(s), s.hit_rate)).collect(),
            dashed: false,
        });
        tps.push(Series {
            label: name.clone(),
            points: c.iter().map(|s| (pct(s), s.decode_tps)).collect(),
            dashed: false,
        });
    }
    // The Belady bound per budget: the best offline hit rate over the cells at that budget.
    let mut bound: BTreeMap<u64, f64> = BTreeMap::new();
    for s in &summary {
        let k = (pct(s) * 1e6) as u64;
        let e = bound.entry(k).or_insert(0.0);
        *e = e.max(s.belady_hit_rate);
    }
    hit.push(Series {
        label: "Belady (offline optimum)".into(),
        points: bound.iter().map(|(k, v)| (*k as f64 / 1e6, *v)).collect(),
        dashed: true,
    });
    save_lines(
        dir,
        "hit_rate_vs_budget",
        &LineChart {
            title: "Expert-cache hit rate vs budget".into(),
            x_label: "cache budget (% of routed-expert bytes)".into(),
            y_label: "hit rate (1 − expert loads / expert uses)".into(),
            series: hit,
            y_range: Some((0.0, 1.0)),
        },
    )?;
    save_lines(
        dir,
        "demand_hit_rate_vs_budget",
        &LineChart {
            title: "Demand hit rate vs budget (prefetched experts count as hits)".into(),
            x_label: "cache budget (% of routed-expert bytes)".into(),
            y_label: "demand hit rate".into(),
            series: demand,
            y_range: Some((0.0, 1.0)),
        },
    )?;
    save_lines(
        dir,
        "decode_tps_vs_budget",
        &LineChart {
            title: "Decode speed vs budget".into(),
            x_label: "cache budget (% of routed-expert bytes)".into(),
            y_label: "decode tokens/s".into(),
            series: tps,
            y_range: None,
        },
    )?;

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
        per_layer.push(Series {
            label: label(s),
            points: layer
                .iter()
                .map(|(l, (a, h))| (*l as f64, *h as f64 / (*a).max(1) as f64))
                .collect(),
            dashed: false,
        });
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
        rolling.push(Series {
            label: label(s),
            points: pts,
            dashed: false,
        });
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
            x_label: "decoder layer".into(),
            y_label: "hit rate".into(),
            series: per_layer,
            y_range: Some((0.0, 1.0)),
        },
    )?;
    save_lines(
        dir,
        "hit_rate_over_decode",
        &LineChart {
            title: format!("Rolling hit rate over decode steps{budget_note}"),
            x_label: "decode step (all prompts, in order; window 16)".into(),
            y_label: "hit rate".into(),
            series: rolling,
            y_range: Some((0.0, 1.0)),
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
        let png = dir.join("expert_frequency.png");
        draw_heatmap(
            BitMapBackend::new(&png, (1000, 500)).into_drawing_area(),
            &layers,
            max_e,
            &counts,
        )
        .map_err(|e| perr(&png, e))?;
        let svg = dir.join("expert_frequency.svg");
        draw_heatmap(
            SVGBackend::new(&svg, (1000, 500)).into_drawing_area(),
            &layers,
            max_e,
            &counts,
        )
        .map_err(|e| perr(&svg, e))?;
    }
    Ok(())
}
