//! The timeline as an SVG chart next to the JSON: throughput, report latency p50/p99, connected
//! devices, and the memory of each stack process, over time.

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use plotters::prelude::*;

use crate::timeline::Sample;

/// `results.json` -> `results.svg`.
pub fn path_next_to(json: &Path) -> PathBuf {
    json.with_extension("svg")
}

type Series<'a> = Vec<(&'a str, Vec<(f64, f64)>)>;

const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    unit: &str,
    t_max: f64,
    series: &Series<'_>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let y_max = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
        .fold(0.0_f64, f64::max)
        .max(1e-3)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..t_max.max(1.0), 0.0..y_max)
        .map_err(|e| anyhow!("chart: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the first agent started")
        .y_desc(unit)
        .draw()
        .map_err(|e| anyhow!("chart: {e}"))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow!("chart: {e}"))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("chart: {e}"))?;
    Ok(())
}

/// Draws the timeline into `path` (SVG).
pub fn draw(path: &Path, title: &str, samples: &[Sample]) -> anyhow::Result<()> {
    let t_max = samples.last().map_or(1.0, |s| s.t);
    let points = |f: &dyn Fn(&Sample) -> Option<f64>| -> Vec<(f64, f64)> {
        samples
            .iter()
            .filter_map(|s| Some((s.t, f(s)?)))
            .filter(|(_, y)| y.is_finite())
            .collect()
    };
    let root = SVGBackend::new(path, (1100, 1400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("chart: {e}"))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| anyhow!("chart: {e}"))?;
    let areas = root.split_evenly((4, 1));
    panel(
        &areas[0],
        "Throughput",
        "per second",
        t_max,
        &vec![
            ("agent requests/s", points(&|s| Some(s.requests_per_second))),
            ("reports/s", points(&|s| Some(s.reports_per_second))),
            ("errors/s", points(&|s| Some(s.errors as f64))),
        ],
    )?;
    panel(
        &areas[1],
        "Report latency (agents' view, upper bound of the bucket)",
        "ms",
        t_max,
        &vec![
            ("p50", points(&|s| Some(s.p50_ms))),
            ("p99", points(&|s| Some(s.p99_ms))),
        ],
    )?;
    panel(
        &areas[2],
        "Devices",
        "devices",
        t_max,
        &vec![
            ("agents started", points(&|s| Some(s.agents_started as f64))),
            (
                "long polls held by the gateways (connected)",
                points(&|s| s.long_polls_held),
            ),
        ],
    )?;
    let roles: Vec<String> = samples
        .iter()
        .flat_map(|s| s.rss_mib.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let memory: Series<'_> = roles
        .iter()
        .map(|r| {
            (
                r.as_str(),
                points(&|s: &Sample| s.rss_mib.get(r.as_str()).copied()),
            )
        })
        .collect();
    panel(&areas[3], "Memory (RSS) per process", "MiB", t_max, &memory)?;
    root.present().map_err(|e| anyhow!("chart: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_written_next_to_the_json() {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = dir.path().join("run.json");
        let samples: Vec<Sample> = (1..=5)
            .map(|i| Sample {
                t: f64::from(i) * 5.0,
                requests_per_second: 100.0 * f64::from(i),
                reports_per_second: 50.0,
                errors: 0,
                p50_ms: 1.0,
                p99_ms: 5.0,
                agents_started: 10 * i as usize,
                long_polls_held: Some(9.0 * f64::from(i)),
                cpu_percent: [("router".to_owned(), 10.0)].into(),
                rss_mib: [("router".to_owned(), 20.0), ("gateway-0".to_owned(), 30.0)].into(),
            })
            .collect();
        let svg = path_next_to(&json);
        draw(&svg, "test run", &samples).expect("draw");
        let text = std::fs::read_to_string(&svg).expect("svg written");
        assert!(text.starts_with("<svg"), "{}", &text[..40.min(text.len())]);
        assert!(text.contains("p99") && text.contains("gateway-0"));
    }
}
