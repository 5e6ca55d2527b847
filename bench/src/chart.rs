//! The chart: tps and p99 latency per scenario, one bar per target, as SVG.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::row::Row;
use crate::scenarios::Scenario;
use crate::targets::TargetKind;

const COLORS: [RGBColor; 3] = [
    RGBColor(31, 119, 180),  // pooler
    RGBColor(255, 127, 14),  // PgBouncer
    RGBColor(140, 140, 140), // direct
];

fn value(
    rows: &[Row],
    scenario: &str,
    target: TargetKind,
    metric: fn(&Row) -> Option<f64>,
) -> Option<f64> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.target == Some(target))
        .and_then(metric)
        .filter(|v| v.is_finite() && *v > 0.0)
}

fn short(v: &f64) -> String {
    if *v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// One panel of grouped bars on a logarithmic axis: between scenarios, tps and
/// latencies span three decades.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    root: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    keys: &[&str],
    rows: &[Row],
    metric: fn(&Row) -> Option<f64>,
    legend: bool,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("drawing the chart: {e:?}");
    let n = keys.len() as f64;
    let values: Vec<f64> = keys
        .iter()
        .flat_map(|k| TargetKind::ALL.map(|t| value(rows, k, t, metric)))
        .flatten()
        .collect();
    // Headroom above the tallest bar for the legend (a log axis: a factor, not a sum).
    let max = values.iter().copied().fold(1.0, f64::max) * 8.0;
    let floor = values.iter().copied().fold(max, f64::min) / 2.0;
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60);
    let mut chart = builder
        .build_cartesian_2d(0f64..n, (floor..max).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|_| String::new())
        .y_label_formatter(&short)
        .draw()
        .map_err(err)?;
    for (ti, target) in TargetKind::ALL.into_iter().enumerate() {
        let color = COLORS[ti];
        let bars = keys.iter().enumerate().filter_map(|(i, k)| {
            let v = value(rows, k, target, metric)?;
            let x0 = i as f64 + 0.1 + 0.27 * ti as f64;
            Some(Rectangle::new(
                [(x0, floor), (x0 + 0.25, v)],
                color.filled(),
            ))
        });
        let series = chart.draw_series(bars).map_err(err)?;
        if legend {
            series.label(target.label()).legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
            });
        }
    }
    if legend {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.9))
            .draw()
            .map_err(err)?;
    }
    // Scenario keys under each group, placed in pixels: the x axis is continuous.
    let style = ("sans-serif", 14)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Top));
    for (i, k) in keys.iter().enumerate() {
        let at = chart.backend_coord(&(i as f64 + 0.5, floor));
        root.draw(&Text::new(
            format!("({k})"),
            (at.0, at.1 + 6),
            style.clone(),
        ))
        .map_err(err)?;
    }
    Ok(())
}

/// The SVG text of the chart, over every scenario that measured transactions.
pub fn svg(scenarios: &[Scenario], rows: &[Row], subtitle: &str) -> anyhow::Result<String> {
    let keys: Vec<&str> = scenarios
        .iter()
        .map(|s| s.key)
        .filter(|k| rows.iter().any(|r| r.scenario == *k && r.tps.is_some()))
        .collect();
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, (1200, 520)).into_drawing_area();
        let err = |e| anyhow::anyhow!("drawing the chart: {e:?}");
        root.fill(&WHITE).map_err(err)?;
        let (top, body) = root.split_vertically(30);
        top.draw(&Text::new(
            subtitle.to_owned(),
            (10, 8),
            ("sans-serif", 14).into_font().color(&BLACK),
        ))
        .map_err(err)?;
        let (left, right) = body.split_horizontally(600);
        panel(
            &left,
            &root,
            "transactions per second, log scale (higher is better)",
            &keys,
            rows,
            |r| r.tps,
            true,
        )?;
        panel(
            &right,
            &root,
            "p99 latency, ms, log scale (lower is better)",
            &keys,
            rows,
            |r| r.p99_ms,
            false,
        )?;
        root.present().map_err(err)?;
    }
    Ok(text)
}
