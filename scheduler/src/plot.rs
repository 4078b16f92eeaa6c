//! `balloonctl plot TRACE -o FILE.svg`: memory per guest over time from a `--trace` file.

use crate::trace::TraceRecord;
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
    #[error("the trace has no ticks")]
    Empty,
    #[error("drawing: {0}")]
    Draw(String),
}

/// Reads a trace: one JSON record per line; blank lines are skipped.
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

/// Draws each guest's allocation (solid) and used memory (thin), the budget and the total.
pub fn plot_trace(records: &[TraceRecord], out: &Path) -> Result<(), PlotError> {
    let (first, last) = match (records.first(), records.last()) {
        (Some(f), Some(l)) => (f, l),
        _ => return Err(PlotError::Empty),
    };
    let draw = |e: &dyn std::fmt::Display| PlotError::Draw(e.to_string());
    let t0 = first.time_s;
    let t1 = last.time_s.max(t0 + 1.0);
    let y_max = records
        .iter()
        .map(|r| {
            let total: u64 = r.guests.iter().map(|g| g.allocation_bytes).sum();
            total.max(r.budget_bytes)
        })
        .max()
        .unwrap_or(1) as f64
        / MIB
        * 1.1;
    let names: Vec<String> = first.guests.iter().map(|g| g.name.clone()).collect();
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
        .draw()
        .map_err(|e| draw(&e))?;
    let series = |f: &dyn Fn(&TraceRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter_map(|r| f(r).map(|v| (r.time_s, v)))
            .collect()
    };
    for (i, name) in names.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let find = |r: &TraceRecord| r.guests.iter().find(|g| &g.name == name).cloned();
        chart
            .draw_series(LineSeries::new(
                series(&|r| find(r).map(|g| g.allocation_bytes as f64 / MIB)),
                color.stroke_width(2),
            ))
            .map_err(|e| draw(&e))?
            .label(format!("{name} allocation"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(LineSeries::new(
                series(&|r| find(r).and_then(|g| g.used_bytes).map(|u| u as f64 / MIB)),
                color.mix(0.5).stroke_width(1),
            ))
            .map_err(|e| draw(&e))?
            .label(format!("{name} used"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.mix(0.5)));
    }
    chart
        .draw_series(LineSeries::new(
            series(&|r| Some(r.budget_bytes as f64 / MIB)),
            BLACK.stroke_width(2),
        ))
        .map_err(|e| draw(&e))?
        .label("budget")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            series(&|r| {
                Some(r.guests.iter().map(|g| g.allocation_bytes).sum::<u64>() as f64 / MIB)
            }),
            RED.mix(0.6).stroke_width(1),
        ))
        .map_err(|e| draw(&e))?
        .label("total allocated")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.mix(0.6)));
    chart
        .configure_series_labels()
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
    use crate::sim::{run, Scenario};

    #[test]
    fn plots_a_simulated_trace() {
        let scenario = Scenario::parse(
            r#"
            duration_s = 60
            host_memory = "4G"
            budget = "2G"
            [[guest]]
            name = "alpha"
            memory = "1G"
            working_set = [[0, "200M"], [30, "700M"]]
            [[guest]]
            name = "beta"
            memory = "1G"
            working_set = [[0, "300M"]]
            "#,
        )
        .unwrap();
        let out = run(&scenario);
        let dir = std::env::temp_dir().join(format!("plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let trace = dir.join("t.jsonl");
        let text: String = out
            .trace
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect();
        std::fs::write(&trace, text + "\n").unwrap();
        let records = read_trace(&trace).unwrap();
        assert_eq!(records.len(), out.trace.len());
        let svg = dir.join("m.svg");
        plot_trace(&records, &svg).unwrap();
        let body = std::fs::read_to_string(&svg).unwrap();
        assert!(body.starts_with("<svg"), "{}", &body[..60.min(body.len())]);
        for name in ["alpha allocation", "beta used", "budget"] {
            assert!(body.contains(name), "{name} missing");
        }
        std::fs::write(&trace, "{\"time_s\": 1}\nnot json\n").unwrap();
        let err = read_trace(&trace).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
        assert!(matches!(plot_trace(&[], &svg), Err(PlotError::Empty)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
