//! `balloonctl plot TRACE -o FILE.svg`: memory per guest over time from a `--trace` file.
//!
//! SVG only, and without plotters' `ttf` feature: text is written as SVG `<text>` elements laid
//! out by plotters' built-in size estimate, so no font files (fontconfig, freetype) are needed.

use crate::trace::TraceRecord;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}, line {line}: {source}")]
    Parse {
        path: String,
        line: usize,
        source: serde_json::Error,
    },
    #[error("the trace is empty: no ticks to plot")]
    Empty,
    #[error("the trace's times are not finite numbers")]
    BadTime,
    #[error("drawing {path}: {message}")]
    Draw { path: String, message: String },
}

/// Reads a trace: one JSON record per line; blank lines are skipped (but counted in the line
/// numbers errors name).
pub fn read_trace(path: &Path) -> Result<Vec<TraceRecord>, PlotError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PlotError::Read {
        path: p.clone(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|source| PlotError::Parse {
                path: p.clone(),
                line: i + 1,
                source,
            })
        })
        .collect()
}

const MIB: f64 = (1u64 << 20) as f64;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB
}

/// Runs of consecutive records where `value` has a value: a line is broken where a guest is
/// missing from a tick or has no statistics, rather than drawn across the gap.
fn segments(
    records: &[TraceRecord],
    value: impl Fn(&TraceRecord) -> Option<f64>,
) -> Vec<Vec<(f64, f64)>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    for r in records {
        match value(r) {
            Some(v) => current.push((r.time_s, v)),
            None if !current.is_empty() => out.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// A value that holds from its tick until the next one: horizontal runs joined by vertical steps.
fn steps(records: &[TraceRecord], value: impl Fn(&TraceRecord) -> f64) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::with_capacity(records.len() * 2);
    for r in records {
        let v = value(r);
        if let Some(&(_, prev)) = out.last() {
            out.push((r.time_s, prev));
        }
        out.push((r.time_s, v));
    }
    out
}

/// Draws each guest's allocation (solid), its used memory (thin, dashed, when the guest has
/// statistics), the part of its balloon a guest app holds (dotted, where there is one), the
/// budget and the sum of the allocations (both stepped).
pub fn plot_trace(records: &[TraceRecord], out: &Path) -> Result<(), PlotError> {
    let last = records.last().ok_or(PlotError::Empty)?;
    let path = out.display().to_string();
    let draw = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.clone(),
        message: e.to_string(),
    };
    let t0 = records
        .iter()
        .map(|r| r.time_s)
        .fold(f64::INFINITY, f64::min);
    let t_end = records
        .iter()
        .map(|r| r.time_s)
        .fold(f64::NEG_INFINITY, f64::max);
    if !t0.is_finite() || !t_end.is_finite() {
        return Err(PlotError::BadTime);
    }
    let t1 = t_end.max(t0 + 1.0);
    let total = |r: &TraceRecord| r.guests.iter().map(|g| g.allocation_bytes).sum::<u64>();
    let y_top = records
        .iter()
        .flat_map(|r| {
            let used = r.guests.iter().filter_map(|g| g.used_bytes);
            [total(r), r.budget_bytes].into_iter().chain(used)
        })
        .max()
        .unwrap_or(0);
    let y_max = (mib(y_top) * 1.1).max(1.0);
    // Every guest of the trace, in the order it first appears.
    let mut names: Vec<&str> = Vec::new();
    for g in records.iter().flat_map(|r| &r.guests) {
        if !names.contains(&g.name.as_str()) {
            names.push(&g.name);
        }
    }

    let root = SVGBackend::new(out, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Memory per guest ({} policy)", last.policy),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(t0..t1, 0f64..y_max)
        .map_err(|e| draw(&e))?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("memory (MiB)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| draw(&e))?;

    for (i, &name) in names.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let guest = |r: &TraceRecord| r.guests.iter().find(|g| g.name == name).cloned();
        let solid = color.stroke_width(2);
        chart
            .draw_series(
                segments(records, |r| guest(r).map(|g| mib(g.allocation_bytes)))
                    .into_iter()
                    .map(|s| PathElement::new(s, solid)),
            )
            .map_err(|e| draw(&e))?
            .label(format!("{name} allocation"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], solid));
        // The part of the balloon the guest app holds (our backend's guests that have one).
        let app = |r: &TraceRecord| {
            guest(r)
                .and_then(|g| g.balloon_split)
                .map(|s| mib(s.app_actual_bytes))
        };
        if records.iter().any(|r| app(r).is_some_and(|v| v > 0.0)) {
            let dotted = color.mix(0.8).stroke_width(1);
            chart
                .draw_series(
                    segments(records, app)
                        .into_iter()
                        .map(|s| DashedPathElement::new(s, 2, 3, dotted)),
                )
                .map_err(|e| draw(&e))?
                .label(format!("{name} app balloon"))
                .legend(move |(x, y)| {
                    DashedPathElement::new(vec![(x, y), (x + 20, y)], 2, 3, dotted)
                });
        }
        let used = segments(records, |r| guest(r).and_then(|g| g.used_bytes).map(mib));
        if used.is_empty() {
            continue;
        }
        let dashed = color.stroke_width(1);
        chart
            .draw_series(
                used.into_iter()
                    .map(|s| DashedPathElement::new(s, 6, 4, dashed)),
            )
            .map_err(|e| draw(&e))?
            .label(format!("{name} used"))
            .legend(move |(x, y)| DashedPathElement::new(vec![(x, y), (x + 20, y)], 6, 4, dashed));
    }
    // The budget last, so that it stays visible where the total meets it.
    let allocated = RED.mix(0.7).stroke_width(1);
    chart
        .draw_series(LineSeries::new(
            steps(records, |r| mib(total(r))),
            allocated,
        ))
        .map_err(|e| draw(&e))?
        .label("total allocated")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], allocated));
    let budget = BLACK.stroke_width(2);
    chart
        .draw_series(LineSeries::new(
            steps(records, |r| mib(r.budget_bytes)),
            budget,
        ))
        .map_err(|e| draw(&e))?
        .label("budget")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], budget));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw(&e))?;
    root.present().map_err(|e| draw(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::host_level::HostLevel;
    use crate::policy::PolicyKind;
    use crate::trace::{GuestCondition, TraceGuest};

    const MIB: u64 = 1 << 20;

    fn guest(name: &str, allocation_mib: u64, used_mib: Option<u64>) -> TraceGuest {
        TraceGuest {
            name: name.into(),
            memory_bytes: 1024 * MIB,
            allocation_bytes: allocation_mib * MIB,
            used_bytes: used_mib.map(|u| u * MIB),
            available_bytes: used_mib.map(|u| (allocation_mib - u) * MIB),
            balloon_target_bytes: (1024 - allocation_mib) * MIB,
            balloon_actual_bytes: (1024 - allocation_mib) * MIB,
            decided_allocation_bytes: allocation_mib * MIB,
            sent_balloon_bytes: None,
            state: GuestCondition::Ok,
            balloon_split: None,
            size_disputed: false,
        }
    }

    /// Three guests over ten ticks: "alpha" grows, "beta" shrinks, "gamma & <co>" (a name that
    /// needs XML escaping) has no statistics and joins late.
    fn trace() -> Vec<TraceRecord> {
        (0..10u64)
            .map(|i| {
                let mut guests = vec![
                    guest("alpha", 300 + 40 * i, Some(200 + 30 * i)),
                    guest("beta", 700 - 40 * i, Some(250)),
                ];
                if i >= 3 {
                    guests.push(guest("gamma & <co>", 256, None));
                }
                // beta's balloon is partly the app's.
                guests[1].balloon_split = Some(crate::drivers::split::BalloonSplit {
                    mechanism: crate::drivers::split::BalloonMechanism::Both,
                    driver_target_bytes: 100 * MIB,
                    driver_actual_bytes: 100 * MIB,
                    app_target_bytes: 40 * i * MIB,
                    app_actual_bytes: 40 * i * MIB,
                    driver_stalled: i > 2,
                    app_stalled: false,
                    handovers: 0,
                });
                TraceRecord {
                    time_s: 2.0 * i as f64,
                    policy: PolicyKind::Shares,
                    host_state: HostLevel::High,
                    host_total_bytes: 4096 * MIB,
                    host_available_bytes: 2048 * MIB,
                    budget_bytes: if i < 5 { 1100 * MIB } else { 1300 * MIB },
                    minimums_bytes: 512 * MIB,
                    budget_infeasible: false,
                    guests,
                }
            })
            .collect()
    }

    #[test]
    fn plots_three_guests_to_an_svg() {
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("m.svg");
        plot_trace(&trace(), &svg).unwrap();
        let body = std::fs::read_to_string(&svg).unwrap();
        assert!(body.starts_with("<svg"), "{}", &body[..60.min(body.len())]);
        assert!(body.trim_end().ends_with("</svg>"));
        for text in [
            "alpha allocation",
            "alpha used",
            "beta allocation",
            "beta used",
            "beta app balloon",
            "gamma &amp; &lt;co&gt; allocation",
            "budget",
            "total allocated",
            "time (s)",
            "memory (MiB)",
            "shares policy",
        ] {
            assert!(body.contains(text), "{text} missing");
        }
        // gamma has no statistics: no "used" line or legend entry for it; alpha has no app.
        assert!(!body.contains("&lt;co&gt; used"));
        assert!(!body.contains("alpha app balloon"));
    }

    #[test]
    fn lines_break_where_values_are_missing_and_steps_hold_values() {
        let mut records = trace();
        records[5].guests[0].used_bytes = None;
        let used = segments(&records, |r| {
            r.guests
                .iter()
                .find(|g| g.name == "alpha")
                .and_then(|g| g.used_bytes)
                .map(mib)
        });
        assert_eq!(used.iter().map(Vec::len).collect::<Vec<_>>(), [5, 4]);
        let gamma = segments(&records, |r| {
            r.guests
                .iter()
                .find(|g| g.name.starts_with("gamma"))
                .map(|_| 1.0)
        });
        assert_eq!(gamma.len(), 1);
        assert_eq!(gamma[0][0].0, 6.0);
        let budget = steps(&records, |r| mib(r.budget_bytes));
        assert_eq!(budget.len(), 19);
        // The budget changes at t=10: it holds 1100 until then and jumps there.
        assert_eq!(budget[9], (10.0, 1100.0));
        assert_eq!(budget[10], (10.0, 1300.0));
    }

    #[test]
    fn an_empty_trace_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("m.svg");
        let err = plot_trace(&[], &svg).unwrap_err();
        assert!(matches!(err, PlotError::Empty), "{err}");
        assert!(err.to_string().contains("empty"), "{err}");
        assert!(!svg.exists());
        // A file of blank lines reads as no records, which then cannot be plotted.
        let file = dir.path().join("t.jsonl");
        std::fs::write(&file, "\n  \n").unwrap();
        assert!(read_trace(&file).unwrap().is_empty());
    }

    #[test]
    fn reads_a_trace_and_names_the_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.jsonl");
        let records = trace();
        let good = serde_json::to_string(&records[0]).unwrap();
        let again = serde_json::to_string(&records[1]).unwrap();
        std::fs::write(&file, format!("{good}\n\n{again}\n\n")).unwrap();
        assert_eq!(read_trace(&file).unwrap(), records[..2]);

        // Line 3 is bad; the blank line 2 still counts.
        std::fs::write(&file, format!("{good}\n\n{{\"time_s\": 1}}\n{again}\n")).unwrap();
        let err = read_trace(&file).unwrap_err();
        match &err {
            PlotError::Parse { line, .. } => assert_eq!(*line, 3, "{err}"),
            other => panic!("expected a parse error, got {other}"),
        }
        assert!(err.to_string().contains("line 3"), "{err}");
        assert!(err.to_string().contains("t.jsonl"), "{err}");

        let missing = dir.path().join("missing.jsonl");
        let err = read_trace(&missing).unwrap_err();
        assert!(matches!(err, PlotError::Read { .. }), "{err}");
        assert!(err.to_string().contains("missing.jsonl"), "{err}");
    }

    #[test]
    fn plots_a_simulated_trace_read_back_from_a_file() {
        let scenario = crate::sim::Scenario::parse(
            r#"
            duration_s = 60
            host_memory = "4G"
            budget = "2G"
            [[guest]]
            name = "alpha"
            memory = "1G"
            driver.working_set = [[0, "200M"], [30, "700M"]]
            [[guest]]
            name = "beta"
            memory = "1G"
            driver.working_set = [[0, "300M"]]
            "#,
        )
        .unwrap();
        let out = crate::sim::run(&scenario);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.jsonl");
        let text: String = out
            .trace
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect();
        std::fs::write(&file, text).unwrap();
        let records = read_trace(&file).unwrap();
        assert_eq!(records, out.trace);
        let svg = dir.path().join("m.svg");
        plot_trace(&records, &svg).unwrap();
        let body = std::fs::read_to_string(&svg).unwrap();
        for text in ["alpha allocation", "alpha used", "beta used", "budget"] {
            assert!(body.contains(text), "{text} missing");
        }
    }

    #[test]
    fn a_single_tick_of_zeros_still_plots() {
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("m.svg");
        let mut record = trace().remove(0);
        record.budget_bytes = 0;
        record.guests = vec![guest("only", 0, Some(0))];
        plot_trace(&[record], &svg).unwrap();
        assert!(std::fs::read_to_string(&svg)
            .unwrap()
            .contains("only allocation"));
    }
}
