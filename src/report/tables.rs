//! Plain-text tables: the final table of `harness run` and the table of `harness simulate`.

use std::fmt::Write as _;

use crate::simulate::SimResult;

use super::CellSummary;

/// The table printed at the end of a run.
pub fn summary_table(rows: &[CellSummary]) -> String {
    let mut s = format!(
        "{:<32} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10} {:>9}\n",
        "cell", "hit", "prefill", "decode", "effect.", "belady", "MB read", "decode t/s", "top-1"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<32} {:>7.1}% {:>7.1}% {:>7.1}% {:>7.1}% {:>7.1}% {:>10.1} {:>10.1} {:>9}\n",
            r.cell,
            100.0 * r.hit_rate,
            100.0 * r.hit_rate_prefill,
            100.0 * r.hit_rate_decode,
            100.0 * r.effective_hit_rate,
            100.0 * r.belady_hit_rate,
            r.bytes_read as f64 / 1e6,
            r.decode_tps,
            r.top1_agreement
                .map_or("-".to_string(), |a| format!("{:.1}%", 100.0 * a)),
        ));
    }
    s
}

/// `pinned`/`classic`, and with a miss mode other than `load` what its misses ran.
fn mode(r: &SimResult) -> String {
    let base = if r.classic { "classic" } else { "pinned" };
    if r.miss_mode.is_empty() || r.miss_mode == "load" {
        return base.to_string();
    }
    let m = &r.miss;
    let parts: Vec<String> = [
        (m.substituted, "substituted"),
        (m.dropped, "dropped"),
        (m.low_bit, "low-bit"),
        (m.host, "on host"),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .collect();
    format!("{base}, {}: {}", r.miss_mode, parts.join(", "))
}

/// A plain-text table of results, one line per result.
pub fn simulation_table(results: &[SimResult]) -> String {
    let pct = |x: f64| format!("{:.2}", 100.0 * x);
    let opt = |x: Option<f64>| x.map_or("-".to_string(), pct);
    let header = [
        "policy",
        "budget",
        "mode",
        "accesses",
        "hit%",
        "prefill%",
        "decode%",
        "pf-prec%",
        "pf-recall%",
    ];
    let rows: Vec<[String; 9]> = results
        .iter()
        .map(|r| {
            [
                r.policy.clone(),
                r.budget.clone(),
                mode(r),
                r.accesses.to_string(),
                pct(r.hit_rate),
                if r.prefill.accesses > 0 {
                    pct(r.prefill.hit_rate)
                } else {
                    "-".into()
                },
                if r.decode.accesses > 0 {
                    pct(r.decode.hit_rate)
                } else {
                    "-".into()
                },
                opt(r.prefetch.precision),
                opt(r.prefetch.recall),
            ]
        })
        .collect();
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[&str]| {
        for (i, (c, w)) in cells.iter().zip(&width).enumerate() {
            let sep = if i == 0 { "" } else { "  " };
            if i < 3 {
                let _ = write!(out, "{sep}{c:<w$}");
            } else {
                let _ = write!(out, "{sep}{c:>w$}");
            }
        }
        out.push('\n');
    };
    line(&mut out, &header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(|s| s.as_str()).collect();
        line(&mut out, &cells);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experts::budget::Budget;
    use crate::experts::policies::PolicySpec;
    use crate::simulate::{simulate, Simulation};

    #[test]
    fn simulation_table_has_a_header_and_a_line_per_result() {
        let rows = crate::synth::synthetic_trace(1, 20, &[0, 1], 8, 2, 1.0, 0.3);
        let sim = Simulation::new(PolicySpec::Lfu, Budget::SlotsPerLayer(4), &[0, 1]);
        let r = simulate(&rows, &sim, |_| 1).unwrap();
        let t = simulation_table(&[r.clone(), r]);
        assert_eq!(t.lines().count(), 3);
        assert!(t.lines().nth(1).unwrap().starts_with("lfu "), "{t}");
        assert!(t.contains("hit%"));
    }
}
