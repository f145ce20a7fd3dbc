//! Turning an [`Outcome`] into what people read and tools load: a table, JSON, the
//! HdrHistogram percentile-distribution text (`.hgrm`), and a latency-by-percentile chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;
use serde::Serialize;

use crate::generator::Outcome;

/// Percentiles every report shows.
pub const PERCENTILES: [(f64, &str); 5] = [
    (50.0, "p50"),
    (90.0, "p90"),
    (99.0, "p99"),
    (99.9, "p99.9"),
    (99.99, "p99.99"),
];

/// The achieved rate must be within this fraction of the target for the run to count.
pub const RATE_TOLERANCE: f64 = 0.01;

/// Summary statistics of a latency histogram, in microseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// Percentile name → value.
    pub percentiles: BTreeMap<String, u64>,
    /// Smallest value.
    pub min: u64,
    /// Largest value.
    pub max: u64,
    /// Mean.
    pub mean: f64,
    /// Standard deviation.
    pub stdev: f64,
    /// Values recorded.
    pub count: u64,
}

impl Summary {
    /// Summarises a histogram.
    pub fn of(h: &Histogram<u64>) -> Summary {
        let empty = h.is_empty();
        Summary {
            percentiles: PERCENTILES
                .iter()
                .map(|(p, name)| {
                    (
                        (*name).to_owned(),
                        if empty { 0 } else { h.value_at_percentile(*p) },
                    )
                })
                .collect(),
            min: if empty { 0 } else { h.min() },
            max: h.max(),
            mean: h.mean(),
            stdev: h.stdev(),
            count: h.len(),
        }
    }

    /// A percentile by name (`p99`).
    pub fn get(&self, name: &str) -> u64 {
        self.percentiles.get(name).copied().unwrap_or(0)
    }
}

/// One run's report, as written to JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What was measured (an address or a target name).
    pub target: String,
    /// Protocol.
    pub protocol: String,
    /// Connections.
    pub connections: usize,
    /// Measured seconds.
    pub duration_seconds: f64,
    /// Requests per second asked for.
    pub target_rate: f64,
    /// Completed requests per second over the window.
    pub achieved_rate: f64,
    /// Whether the achieved rate is within [`RATE_TOLERANCE`] of the target.
    pub rate_kept: bool,
    /// Requests scheduled in the window.
    pub scheduled: u64,
    /// Requests completed in the window.
    pub completed: u64,
    /// Failed requests by kind.
    pub errors: BTreeMap<String, u64>,
    /// Latency from intended send time, µs.
    pub latency_us: Summary,
    /// How late requests left, µs.
    pub send_lag_us: Summary,
}

impl Report {
    /// Builds the report of an outcome.
    pub fn new(target: &str, protocol: &str, connections: usize, outcome: &Outcome) -> Report {
        let achieved = outcome.achieved_rate();
        Report {
            target: target.to_owned(),
            protocol: protocol.to_owned(),
            connections,
            duration_seconds: outcome.elapsed.as_secs_f64(),
            target_rate: outcome.target_rate,
            achieved_rate: achieved,
            rate_kept: achieved >= outcome.target_rate * (1.0 - RATE_TOLERANCE),
            scheduled: outcome.scheduled,
            completed: outcome.completed,
            errors: outcome.errors.clone(),
            latency_us: Summary::of(&outcome.latency),
            send_lag_us: Summary::of(&outcome.send_lag),
        }
    }

    /// The human table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} {} | target {:.0}/s, achieved {:.1}/s | {} connections | {:.1}s measured",
            self.target,
            self.protocol,
            self.target_rate,
            self.achieved_rate,
            self.connections,
            self.duration_seconds
        );
        let _ = writeln!(out, "{}", header_row());
        let _ = writeln!(out, "{}", summary_row("latency", &self.latency_us));
        let _ = writeln!(out, "{}", summary_row("send lag", &self.send_lag_us));
        let _ = writeln!(
            out,
            "requests: {} scheduled, {} completed, errors: {}",
            self.scheduled,
            self.completed,
            errors_text(&self.errors)
        );
        if !self.rate_kept {
            let _ = writeln!(
                out,
                "WARNING: THE TARGET RATE WAS NOT KEPT ({:.1}/s of {:.0}/s): the target or the generator is saturated; these percentiles describe an overloaded system",
                self.achieved_rate, self.target_rate
            );
        }
        out
    }
}

/// Column headers shared by tables.
pub fn header_row() -> String {
    let mut row = format!("{:<12}", "µs");
    for (_, name) in PERCENTILES {
        let _ = write!(row, "{name:>9}");
    }
    let _ = write!(row, "{:>9}{:>9}{:>9}", "max", "mean", "stdev");
    row
}

/// One summary as a table row.
pub fn summary_row(label: &str, s: &Summary) -> String {
    let mut row = format!("{label:<12}");
    for (_, name) in PERCENTILES {
        let _ = write!(row, "{:>9}", s.get(name));
    }
    let _ = write!(row, "{:>9}{:>9.1}{:>9.1}", s.max, s.mean, s.stdev);
    row
}

/// `none`, or `kind n, kind n`.
pub fn errors_text(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "none".into();
    }
    errors
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The HdrHistogram percentile distribution (values in milliseconds, as wrk2 and the
/// HdrHistogram plotter expect).
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if !h.is_empty() {
        let mut total = 0;
        for v in h.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let q = v.quantile_iterated_to();
            let ms = v.value_iterated_to() as f64 / 1000.0;
            if q < 1.0 {
                let _ = writeln!(
                    out,
                    "{ms:12.3} {q:2.12} {total:10} {:14.2}",
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(out, "{ms:12.3} {q:2.12} {total:10}");
            }
        }
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(
        out,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        h.max() as f64 / 1000.0,
        h.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        h.distinct_values()
    );
    out
}

/// The x position of a quantile on a latency-by-percentile chart: log10(1/(1-q)).
fn chart_x(q: f64) -> f64 {
    (1.0 / (1.0 - q.min(1.0 - 1e-6))).log10()
}

/// Writes an SVG latency-by-percentile chart of several histograms.
pub fn chart(path: &Path, title: &str, series: &[(String, &Histogram<u64>)]) -> anyhow::Result<()> {
    let x_max = 5.0;
    let y_max = series
        .iter()
        .filter(|(_, h)| !h.is_empty())
        .map(|(_, h)| h.value_at_quantile(0.99999))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.1;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_labels(6)
        .x_label_formatter(&|x| match x.round() as i64 {
            0 => "0%".into(),
            1 => "90%".into(),
            2 => "99%".into(),
            3 => "99.9%".into(),
            4 => "99.99%".into(),
            5 => "99.999%".into(),
            _ => String::new(),
        })
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .draw()?;
    for (i, (name, h)) in series.iter().enumerate() {
        if h.is_empty() {
            continue;
        }
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = h
            .iter_quantiles(10)
            .map(|v| {
                (
                    chart_x(v.quantile_iterated_to()),
                    v.value_iterated_to() as f64,
                )
            })
            .filter(|(x, _)| *x <= x_max)
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::histogram;

    fn sample() -> Histogram<u64> {
        let mut h = histogram();
        for v in 1..=10_000u64 {
            h.record(v).unwrap();
        }
        h
    }

    #[test]
    fn hgrm_agrees_with_the_histogram() {
        let h = sample();
        let text = hgrm(&h);
        // Every data line parses; counts rise to the total; the 99% line matches the table.
        let rows: Vec<(f64, f64, u64)> = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#') && !l.contains("Percentile"))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (
                    f[0].parse().unwrap(),
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                )
            })
            .collect();
        assert_eq!(rows.last().unwrap().2, 10_000);
        assert!(
            rows.windows(2)
                .all(|w| w[0].2 <= w[1].2 && w[0].1 <= w[1].1)
        );
        let p99 = rows.iter().find(|r| r.1 >= 0.99).unwrap();
        let summary = Summary::of(&h);
        assert!(
            (p99.0 * 1000.0 - summary.get("p99") as f64).abs() <= 10.0,
            "{} vs {}",
            p99.0,
            summary.get("p99")
        );
        assert!(text.contains("Total count    =        10000"));
    }

    #[test]
    fn summary_is_exact_to_three_digits() {
        let s = Summary::of(&sample());
        // Values are reported as the top of their bucket: within 0.1% above the truth.
        let within = |value: u64, truth: u64| value >= truth && value <= truth + truth / 1000;
        assert!(within(s.get("p50"), 5000), "{}", s.get("p50"));
        assert!(within(s.get("p99"), 9900), "{}", s.get("p99"));
        assert!(within(s.get("p99.9"), 9990), "{}", s.get("p99.9"));
        assert!(within(s.max, 10_000), "{}", s.max);
        assert_eq!((s.min, s.count), (1, 10_000));
    }

    #[test]
    fn chart_is_an_svg_with_every_series() {
        let dir = std::env::temp_dir().join(format!("tern-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.svg");
        let h = sample();
        chart(&path, "test", &[("direct".into(), &h), ("tern".into(), &h)]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(
            svg.starts_with("<svg")
                && svg.contains("direct")
                && svg.contains("tern")
                && svg.contains("99.9%")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
