//! One PNG per workload: rows/s against relay count (or peer concurrency), for
//! outboxd, the raw MongoDB loop and the peers, from the report's figures.

use plotters::prelude::*;

use super::*;

/// A font for the labels: DejaVu Sans from Debian's fonts-dejavu-core.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// A line: its label and the report key of each count's figure (`{n}` is the count).
type Series = (&'static str, &'static str);

const INSERT: &[Series] = &[
    ("outboxd relay", "drain_rps_{n}"),
    ("raw MongoDB loop", "mongo_raw_rps_{n}"),
];

const UPDATE: &[Series] = &[
    ("outboxd relay", "update_drain_rps_{n}"),
    ("raw MongoDB loop", "update_raw_rps_{n}"),
    ("graphile-worker", "peer_gw_rps_{n}"),
    ("seed-style relay", "peer_seed_rps_{n}"),
];

/// Writes `drain-insert.png` and `drain-update.png` beside the report; a
/// figure missing from the report leaves its point out.
pub fn write(out: &Path, plan: &Plan, report: &Report) -> anyhow::Result<Vec<PathBuf>> {
    let font = std::fs::read(FONT).with_context(|| {
        format!("no font for the plots ({FONT}: apt-get install fonts-dejavu-core)")
    })?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))?;
    let mut written = Vec::new();
    for (name, title, series) in [
        (
            "drain-insert.png",
            format!("Insert workload: {} new aggregates", plan.drain_rows),
            INSERT,
        ),
        (
            "drain-update.png",
            format!(
                "Update workload: {} rows onto {} documents",
                plan.update_rows, plan.update_docs
            ),
            UPDATE,
        ),
    ] {
        let lines: Vec<(&str, Vec<(usize, f64)>)> = series
            .iter()
            .map(|(label, key)| {
                let points = plan
                    .relay_counts
                    .iter()
                    .enumerate()
                    .filter_map(|(i, n)| {
                        let v = report.num(&key.replace("{n}", &n.to_string()))?;
                        Some((i, v))
                    })
                    .collect();
                (*label, points)
            })
            .filter(|(_, p): &(&str, Vec<(usize, f64)>)| !p.is_empty())
            .collect();
        if lines.is_empty() {
            continue;
        }
        let path = out.join(name);
        draw(&path, &title, &plan.relay_counts, &lines)
            .with_context(|| format!("drawing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Draws one chart: x is each count in turn (evenly spaced), y rows/s.
fn draw(
    path: &Path,
    title: &str,
    counts: &[usize],
    lines: &[(&str, Vec<(usize, f64)>)],
) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let y_max = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (0..counts.len() as i32 - 1).into_segmented(),
            0f64..y_max * 1.15,
        )?;
    chart
        .configure_mesh()
        .x_desc("relays (peers: concurrency)")
        .y_desc("rows/s")
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => counts
                .get(*i as usize)
                .map_or(String::new(), |c| c.to_string()),
            _ => String::new(),
        })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 15))
        .draw()?;
    let colors = [BLUE, RED, GREEN, MAGENTA, BLACK];
    for (i, (label, points)) in lines.iter().enumerate() {
        let color = colors[i % colors.len()];
        let points: Vec<_> = points
            .iter()
            .map(|(x, y)| (SegmentValue::CenterOf(*x as i32), *y))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(*label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()?;
    Ok(())
}
