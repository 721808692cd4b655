//! SVG charts for BENCHMARKS.md.

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// One line of a chart: (service count, latency ratio) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    /// Write each point's value next to it.
    pub annotate: bool,
}

pub const BLUE: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
pub const RED: RGBColor = RGBColor(0xd6, 0x27, 0x28);
pub const ORANGE: RGBColor = RGBColor(0xff, 0x7f, 0x0e);
pub const GREY: RGBColor = RGBColor(0x88, 0x88, 0x88);

/// The target the L4 benchmark holds steerd to.
const TARGET_RATIO: f64 = 1.02;

/// Two panels of p50 latency relative to a direct connect against the number of services (log
/// scale): `overview` on the left, `zoom` (a narrow range around 1×, to show the target) on the
/// right; the 1.02× target dashed in both. Written to `path` (through a temporary file).
pub fn ratio_chart(path: &Path, overview: &[Series], zoom: &[Series]) -> Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 440)).into_drawing_area();
        let draw = || -> Result<(), Box<dyn std::error::Error>> {
            root.fill(&WHITE)?;
            let root = root.titled(
                "connect + first byte, p50, relative to a direct connect to the same backend",
                ("sans-serif", 18),
            )?;
            let (left, right) = root.split_horizontally(520);
            panel(&left, "all cases", overview, 0.05)?;
            panel(&right, "close-up around 1×", zoom, 0.005)?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    }
    super::write_atomically(path, svg.as_bytes())
}

fn panel(
    area: &DrawingArea<SVGBackend, Shift>,
    title: &str,
    series: &[Series],
    min_pad: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    let points = || series.iter().flat_map(|s| s.points.iter().copied());
    let x_max = points().map(|(x, _)| x).fold(10.0, f64::max) * 3.0;
    let y_max = points().map(|(_, y)| y).fold(TARGET_RATIO, f64::max);
    let y_min = points().map(|(_, y)| y).fold(1.0, f64::min);
    let pad = ((y_max - y_min) * 0.12).max(min_pad);
    // Room above the data for the legend.
    let top = y_max + 2.0 * pad + (y_max - y_min) * 0.35;

    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 14))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d((0.5..x_max).log_scale(), (y_min - pad)..top)?;
    chart
        .configure_mesh()
        .x_desc("services")
        .y_desc("× direct")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.2}"))
        .bold_line_style(BLACK.mix(0.12))
        .light_line_style(TRANSPARENT)
        .draw()?;

    let target = ShapeStyle::from(&BLACK.mix(0.7)).stroke_width(1);
    chart
        .draw_series(DashedLineSeries::new(
            [(0.5, TARGET_RATIO), (x_max, TARGET_RATIO)],
            6,
            4,
            target,
        ))?
        .label(format!("target ≤ {TARGET_RATIO}×"))
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], target));

    for s in series {
        let color = s.color;
        let style = color.stroke_width(2);
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), style))?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
        chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        if s.annotate {
            chart.draw_series(s.points.iter().map(|&(x, y)| {
                EmptyElement::at((x, y))
                    + Text::new(
                        format!("{y:.3}"),
                        (6, -16),
                        ("sans-serif", 12).into_font().color(&color),
                    )
            }))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK.mix(0.4))
        .background_style(WHITE.mix(0.9))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_is_an_svg_with_every_series() {
        let series = |name: &str, y: f64, color| Series {
            name: name.into(),
            points: vec![(1.0, y), (1000.0, y * 1.5), (10_000.0, y * 7.0)],
            color,
            annotate: true,
        };
        let path =
            std::env::temp_dir().join(format!("steerd-bench-plot-{}.svg", std::process::id()));
        ratio_chart(
            &path,
            &[series("fast", 1.01, BLUE), series("slow", 1.1, RED)],
            &[series("fast", 1.01, BLUE)],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        for text in ["fast", "slow", "target ≤ 1.02×", "7.070", "close-up"] {
            assert!(svg.contains(text), "no {text:?} in the chart");
        }
    }
}
