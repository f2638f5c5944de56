//! Experiment results rendered for people: `docs/results.md` with tables
//! and SVG plots, generated from the JSON lines `netlab/fault-under-load.sh`
//! writes (one migration report per line, labelled with its link and
//! mode). Never hand-typed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde_json::Value;

/// Why results could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// A line is not a labelled report.
    #[error("{path}:{line}: {why}")]
    Format {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// A plot could not be drawn.
    #[error("plot {0}")]
    Plot(String),
    /// Nothing to render.
    #[error("no runs in the input")]
    Empty,
}

/// One migration of the experiment.
#[derive(Debug, Clone)]
pub struct Run {
    /// Link rate label (`1gbit`, `10gbit`, `none`).
    pub rate: String,
    /// Mode label.
    pub mode: String,
    /// Workload pattern.
    pub workload: String,
    /// Guest size in MiB.
    pub size_mib: u64,
    /// The report.
    pub report: Value,
}

impl Run {
    fn num(&self, path: &[&str]) -> f64 {
        let mut v = &self.report;
        for p in path {
            v = &v[*p];
        }
        v.as_f64().unwrap_or(0.0)
    }

    fn workload_ms(&self) -> f64 {
        self.num(&["workload", "ms"])
    }

    /// Pages that crossed the wire (pre-copy rounds included) plus zero
    /// pages installed, as a multiple of the guest's pages.
    fn moved(&self) -> f64 {
        let sent = match self.report["pages_transferred"].as_f64() {
            Some(p) => p,
            None => self.num(&["bytes_received"]) / 4096.0,
        };
        // Engine counts are in guest memory's pages (2 MiB on hugetlbfs),
        // pages sent in the source's 4 KiB.
        let per = self.report["page_size"].as_f64().unwrap_or(4096.0) / 4096.0;
        (sent + self.num(&["zero_pages"]) * per) / (self.num(&["pages_total"]) * per).max(1.0)
    }

    /// Downtime in ms, when the source's guest was running.
    fn downtime(&self) -> String {
        self.report["downtime_ms"]
            .as_f64()
            .map_or("–".into(), |d| format!("{d:.1}"))
    }
}

/// Reads labelled reports, one per line.
pub fn load(paths: &[PathBuf]) -> Result<Vec<Run>, ResultsError> {
    let mut runs = Vec::new();
    for path in paths {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| ResultsError::Io {
            path: name.clone(),
            error,
        })?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let bad = |why: String| ResultsError::Format {
                path: name.clone(),
                line: i + 1,
                why,
            };
            let report: Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
            let label = |k: &str| {
                report[k]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(format!("no \"{k}\" label")))
            };
            let mut workload = report["workload"]["pattern"]
                .as_str()
                .map(|s| s.to_lowercase())
                .ok_or_else(|| bad("no workload".into()))?;
            if let Some(t) = report["workload"]["trace"].as_str() {
                workload = format!("trace-{t}");
            }
            let pages = report["pages_total"]
                .as_u64()
                .ok_or_else(|| bad("no pages_total".into()))?;
            let page_size = report["page_size"].as_u64().unwrap_or(4096);
            runs.push(Run {
                rate: label("rate")?,
                mode: label("mode")?,
                workload,
                size_mib: pages.saturating_mul(page_size) >> 20,
                report,
            });
        }
    }
    if runs.is_empty() {
        return Err(ResultsError::Empty);
    }
    Ok(runs)
}

/// (size, rate) -> workload -> mode -> the median run by workload time.
type Medians<'a> = BTreeMap<(u64, String), BTreeMap<String, Vec<(String, &'a Run)>>>;

fn medians<'a>(runs: &[&'a Run]) -> Medians<'a> {
    let mut groups: BTreeMap<(u64, String, String, String), Vec<&Run>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for &r in runs {
        if !order.contains(&r.mode) {
            order.push(r.mode.clone());
        }
        groups
            .entry((
                r.size_mib,
                r.rate.clone(),
                r.workload.clone(),
                r.mode.clone(),
            ))
            .or_default()
            .push(r);
    }
    let mut out: Medians<'a> = BTreeMap::new();
    for ((size, rate, workload, mode), mut rs) in groups {
        rs.sort_by(|a, b| a.workload_ms().total_cmp(&b.workload_ms()));
        let median = rs[rs.len() / 2];
        out.entry((size, rate))
            .or_default()
            .entry(workload)
            .or_default()
            .push((mode, median));
    }
    // Modes in the order they were run.
    for per_rate in out.values_mut() {
        for modes in per_rate.values_mut() {
            modes.sort_by_key(|(m, _)| order.iter().position(|o| o == m));
        }
    }
    out
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn plot_err<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> ResultsError + '_ {
    move |e| ResultsError::Plot(format!("{what}: {e:?}"))
}

/// Axes and look of a line chart.
struct Lines<'a> {
    title: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    x_max: f64,
    y_max: f64,
    stroke: u32,
    legend: SeriesLabelPosition,
}

/// One line per mode.
fn line_plot(
    path: &Path,
    l: Lines<'_>,
    series: Vec<(&str, Vec<(f64, f64)>)>,
) -> Result<(), ResultsError> {
    let name = path.display().to_string();
    let root = SVGBackend::new(path, (760, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err(&name))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(l.title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..l.x_max, 0.0..l.y_max)
        .map_err(plot_err(&name))?;
    chart
        .configure_mesh()
        .x_desc(l.x_desc)
        .y_desc(l.y_desc)
        .draw()
        .map_err(plot_err(&name))?;
    for (i, (mode, points)) in series.into_iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(l.stroke)))
            .map_err(plot_err(&name))?
            .label(mode)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(l.legend)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err(&name))?;
    root.present().map_err(plot_err(&name))
}

/// Fault latency CDF per mode, x capped at 1.5 times the largest p99 shown.
fn cdf_plot(path: &Path, title: &str, modes: &[(String, &Run)]) -> Result<(), ResultsError> {
    let x_max = modes
        .iter()
        .map(|(_, r)| r.num(&["fault_latency_us", "p99"]))
        .fold(1.0, f64::max)
        * 1.5;
    let series = modes
        .iter()
        .map(|(mode, r)| {
            let cdf = r.report["fault_latency_cdf_us"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .enumerate()
                        .filter_map(|(k, v)| {
                            v.as_f64().map(|x| (x.min(x_max), (k + 1) as f64 / 100.0))
                        })
                        .collect()
                })
                .unwrap_or_default();
            (mode.as_str(), cdf)
        })
        .collect();
    let l = Lines {
        title,
        x_desc: "fault latency (µs)",
        y_desc: "share of faults",
        x_max,
        y_max: 1.0,
        stroke: 2,
        legend: SeriesLabelPosition::LowerRight,
    };
    line_plot(path, l, series)
}

/// Faults per timeline step over one migration, one line per mode.
fn timeline_plot(path: &Path, title: &str, modes: &[(String, &Run)]) -> Result<(), ResultsError> {
    let mut x_max: f64 = 1.0;
    let series: Vec<(&str, Vec<(f64, f64)>)> = modes
        .iter()
        .filter_map(|(m, r)| {
            let step = r.report["timeline_step_ms"].as_f64()?;
            let v = r.report["faults_over_time"].as_array()?;
            x_max = x_max.max(step * v.len() as f64);
            let points = v
                .iter()
                .enumerate()
                .filter_map(|(k, y)| y.as_f64().map(|y| (k as f64 * step, y)))
                .collect();
            Some((m.as_str(), points))
        })
        .collect();
    let y_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.1;
    let l = Lines {
        title,
        x_desc: "time since resume (ms)",
        y_desc: "faults per step",
        x_max,
        y_max,
        stroke: 1,
        legend: SeriesLabelPosition::UpperRight,
    };
    line_plot(path, l, series)
}

/// One value per (workload, mode) as grouped bars.
fn bar_plot(
    path: &Path,
    title: &str,
    y_desc: &str,
    per_workload: &BTreeMap<String, Vec<(String, &Run)>>,
    value: impl Fn(&Run) -> f64,
) -> Result<(), ResultsError> {
    let name = path.display().to_string();
    let root = SVGBackend::new(path, (760, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err(&name))?;
    let workloads: Vec<&String> = per_workload.keys().collect();
    let nmodes = per_workload
        .values()
        .map(Vec::len)
        .max()
        .unwrap_or(1)
        .max(1);
    let ymax = per_workload
        .values()
        .flatten()
        .map(|(_, r)| value(r))
        .fold(1.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..workloads.len() as f64, 0.0..ymax)
        .map_err(plot_err(&name))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(workloads.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.26 {
                workloads.get(i).map(|w| w.to_string()).unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .draw()
        .map_err(plot_err(&name))?;
    let width = 0.8 / nmodes as f64;
    let mut labelled: Vec<String> = Vec::new();
    for (wi, w) in workloads.iter().enumerate() {
        for (mi, (mode, r)) in per_workload[*w].iter().enumerate() {
            let color = COLORS[mi % COLORS.len()];
            let x0 = wi as f64 + 0.1 + mi as f64 * width;
            let bar = Rectangle::new([(x0, 0.0), (x0 + width * 0.9, value(r))], color.filled());
            let series = chart
                .draw_series(std::iter::once(bar))
                .map_err(plot_err(&name))?;
            if !labelled.contains(mode) {
                labelled.push(mode.clone());
                series.label(mode.as_str()).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled())
                });
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err(&name))?;
    root.present().map_err(plot_err(&name))
}

/// Network faults against bubble radius, one line per prepager and
/// workload (medians over runs), and its table.
fn sweep_section(md: &mut String, plots: &Path, runs: &[&Run]) -> Result<(), ResultsError> {
    // (size, rate) -> (prepager, workload) -> radius -> network faults.
    type Points = BTreeMap<(String, String), BTreeMap<u64, Vec<(f64, f64)>>>;
    let mut cells: BTreeMap<(u64, String), Points> = BTreeMap::new();
    for r in runs {
        let (Some(radius), Some(kind)) = (
            r.report["bubble_sweep"].as_u64(),
            r.report["prepager"].as_str(),
        ) else {
            continue;
        };
        let touched = r.num(&["workload", "distinct_pages"]).max(1.0);
        cells
            .entry((r.size_mib, r.rate.clone()))
            .or_default()
            .entry((kind.to_string(), r.workload.clone()))
            .or_default()
            .entry(radius)
            .or_default()
            .push((r.num(&["network_faults"]), touched));
    }
    for ((size, rate), lines) in cells {
        let med = |v: &Vec<(f64, f64)>| {
            let mut v = v.clone();
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            v[v.len() / 2]
        };
        let _ = writeln!(
            md,
            "## Network faults against bubble radius: {size} MiB guest, link {rate}\n\n\
             Push running; the median of the runs at each radius. % is of the pages the \
             workload touched.\n\n| workload | prepager | {} |\n|---|---|{}",
            lines
                .values()
                .next()
                .map(|m| m
                    .keys()
                    .map(|r| format!("radius {r}"))
                    .collect::<Vec<_>>()
                    .join(" | "))
                .unwrap_or_default(),
            "---|".repeat(lines.values().next().map_or(0, BTreeMap::len)),
        );
        for ((kind, workload), points) in &lines {
            let cols: Vec<String> = points
                .values()
                .map(|v| {
                    let (f, t) = med(v);
                    format!("{f:.0} ({:.1} %)", 100.0 * f / t)
                })
                .collect();
            let _ = writeln!(md, "| {workload} | {kind} | {} |", cols.join(" | "));
        }
        let tag = format!("{size}mib-{rate}");
        let path = plots.join(format!("bubble-sweep-{tag}.svg"));
        let x_max = lines
            .values()
            .flat_map(|m| m.keys())
            .map(|&r| r as f64)
            .fold(1.0, f64::max)
            * 1.05;
        let y_max = lines
            .values()
            .flat_map(|m| m.values().map(|v| med(v).0))
            .fold(1.0, f64::max)
            * 1.1;
        let labels: Vec<String> = lines.keys().map(|(k, w)| format!("{w}, {k}")).collect();
        let series = lines
            .values()
            .zip(&labels)
            .map(|(m, label)| {
                (
                    label.as_str(),
                    m.iter().map(|(&r, v)| (r as f64, med(v).0)).collect(),
                )
            })
            .collect();
        line_plot(
            &path,
            Lines {
                title: &format!("network faults against bubble radius, {size} MiB, {rate}"),
                x_desc: "bubble radius (pages each way)",
                y_desc: "network faults",
                x_max,
                y_max,
                stroke: 2,
                legend: SeriesLabelPosition::UpperRight,
            },
            series,
        )?;
        let _ = writeln!(
            md,
            "\n![network faults against bubble radius](plots/bubble-sweep-{tag}.svg)\n"
        );
    }
    Ok(())
}

/// Writes `results.md` and its plots into `out`.
pub fn render(runs: &[Run], out: &Path, command: &str) -> Result<PathBuf, ResultsError> {
    let (sweep, matrix): (Vec<&Run>, Vec<&Run>) =
        runs.iter().partition(|r| r.report["bubble_sweep"].is_u64());
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |error| ResultsError::Io { path, error }
    };
    let plots = out.join("plots");
    std::fs::create_dir_all(&plots).map_err(io(&plots))?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Results\n\nGenerated by `{command}` from {} migrations; do not edit by hand. Each \
         cell is the median run (by workload time) of its mode. Network faults are also given \
         as a share of the pages the workload touched; pages moved count pages sent (pre-copy \
         rounds included) plus zero pages installed, as a multiple of the guest. Downtime runs \
         from the source pausing its guest to the destination resuming it (shown when the \
         guest kept running at the source until the switch-over). Fault latency is the \
         engine's (from reading the fault to installing the page); a guest stall is a touch \
         as the workload thread saw it (every touch that blocked at least 2 µs, from the \
         touch to running again, waking included). Times and latencies are compared with \
         demand-only paging on the same link in the same run.\n",
        runs.len()
    );
    for ((size, rate), per_workload) in medians(&matrix) {
        let iperf = per_workload
            .values()
            .flatten()
            .find_map(|(_, r)| r.report["iperf3_bps"].as_f64())
            .map(|b| format!(", iperf3 {:.0} Mbit/s", b / 1e6))
            .unwrap_or_default();
        let _ = writeln!(md, "## {size} MiB guest, link {rate}{iperf}\n");
        let _ = writeln!(
            md,
            "| workload | mode | network faults | % of touched | fault p50 µs | fault p99 µs | p99 vs demand | guest stall p99 µs | vs demand | workload ms | vs demand | total ms | downtime ms | pages moved (× guest) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for (workload, modes) in &per_workload {
            let base = modes
                .iter()
                .find(|(m, _)| m.starts_with("demand"))
                .map(|(_, r)| *r);
            for (mode, r) in modes {
                let rel = |v: f64, b: Option<f64>| match b {
                    Some(b) if b > 0.0 => format!("{:.2}×", v / b),
                    _ => "–".into(),
                };
                let touched = r.num(&["workload", "distinct_pages"]).max(1.0);
                let _ = writeln!(
                    md,
                    "| {workload} | {mode} | {:.0} | {:.1} % | {:.0} | {:.0} | {} | {:.0} | {} | {:.0} | {} | {:.0} | {} | {:.2} |",
                    r.num(&["network_faults"]),
                    100.0 * r.num(&["network_faults"]) / touched,
                    r.num(&["fault_latency_us", "p50"]),
                    r.num(&["fault_latency_us", "p99"]),
                    rel(r.num(&["fault_latency_us", "p99"]), base.map(|b| b.num(&["fault_latency_us", "p99"]))),
                    r.num(&["workload", "stalls", "p99"]),
                    rel(r.num(&["workload", "stalls", "p99"]), base.map(|b| b.num(&["workload", "stalls", "p99"]))),
                    r.workload_ms(),
                    rel(r.workload_ms(), base.map(Run::workload_ms)),
                    r.num(&["total_ms"]),
                    r.downtime(),
                    r.moved(),
                );
            }
        }
        let tag = format!("{size}mib-{rate}");
        let faults = plots.join(format!("faults-{tag}.svg"));
        bar_plot(
            &faults,
            &format!("network faults per mode, {size} MiB, {rate}"),
            "network faults",
            &per_workload,
            |r| r.num(&["network_faults"]),
        )?;
        let moved = plots.join(format!("moved-{tag}.svg"));
        bar_plot(
            &moved,
            &format!("pages moved per mode (× guest size), {size} MiB, {rate}"),
            "pages moved / guest pages",
            &per_workload,
            Run::moved,
        )?;
        let _ = writeln!(
            md,
            "\n![network faults](plots/faults-{tag}.svg)\n![pages moved](plots/moved-{tag}.svg)\n"
        );
        for (workload, modes) in &per_workload {
            let cdf = plots.join(format!("cdf-{tag}-{workload}.svg"));
            cdf_plot(
                &cdf,
                &format!("fault latency CDF, {workload}, {size} MiB, {rate}"),
                modes,
            )?;
            let _ = writeln!(
                md,
                "![fault latency CDF, {workload}](plots/cdf-{tag}-{workload}.svg)"
            );
            if modes
                .iter()
                .any(|(_, r)| r.report["faults_over_time"].is_array())
            {
                let tl = plots.join(format!("timeline-{tag}-{workload}.svg"));
                timeline_plot(
                    &tl,
                    &format!("faults over time, {workload}, {size} MiB, {rate}"),
                    modes,
                )?;
                let _ = writeln!(
                    md,
                    "![faults over time, {workload}](plots/timeline-{tag}-{workload}.svg)"
                );
            }
        }
        md.push('\n');
    }
    sweep_section(&mut md, &plots, &sweep)?;
    let path = out.join("results.md");
    std::fs::write(&path, md).map_err(io(&path))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(rate: &str, mode: &str, workload: &str, faults: u64, ms: f64) -> String {
        serde_json::json!({
            "rate": rate, "mode": mode, "pages_total": 65536, "network_faults": faults,
            "bytes_received": 4096 * faults, "zero_pages": 100, "total_ms": ms,
            "fault_latency_us": {"p50": 50.0, "p99": 120.0},
            "fault_latency_cdf_us": (1..=100).map(f64::from).collect::<Vec<_>>(),
            "workload": {"pattern": workload, "ms": ms, "distinct_pages": 1000},
            "iperf3_bps": 957e6,
            "timeline_step_ms": 20, "faults_over_time": [5, 3, 1],
        })
        .to_string()
    }

    #[test]
    fn reports_become_tables_and_plots() {
        let dir = std::env::temp_dir().join(format!("pw-results-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("in.jsonl");
        let lines = [
            line("1gbit", "demand-only", "Random", 800, 200.0),
            line("1gbit", "push + bubbles", "Random", 400, 100.0),
            line("1gbit", "push + bubbles", "Random", 300, 150.0),
            line("1gbit", "push + bubbles", "Random", 500, 90.0),
            line("1gbit", "demand-only", "Seq", 900, 300.0),
            {
                // A hybrid run: pre-copied pages count as moved.
                let mut v: Value =
                    serde_json::from_str(&line("1gbit", "hybrid", "Seq", 10, 50.0)).unwrap();
                v["downtime_ms"] = serde_json::json!(12.25);
                v["pages_transferred"] = serde_json::json!(65536 + 100);
                v.to_string()
            },
        ];
        let mut lines = lines.to_vec();
        for (radius, kind, faults) in [
            (8, "paper", 900),
            (64, "paper", 500),
            (8, "adaptive", 700),
            (64, "adaptive", 300),
        ] {
            let mut v: Value = serde_json::from_str(&line(
                "1gbit",
                &format!("{kind} r={radius}"),
                "Stride",
                faults,
                80.0,
            ))
            .unwrap();
            v["bubble_sweep"] = serde_json::json!(radius);
            v["prepager"] = serde_json::json!(kind);
            lines.push(v.to_string());
        }
        std::fs::write(&input, lines.join("\n")).unwrap();
        let runs = load(&[input]).unwrap();
        let md = render(&runs, &dir, "test").unwrap();
        let text = std::fs::read_to_string(md).unwrap();
        // The median of the three push runs by workload time: 100 ms.
        assert!(
            text.contains("| random | push + bubbles | 400 | 40.0 % |"),
            "{text}"
        );
        assert!(text.contains("| 0.50× |"), "{text}");
        assert!(text.contains("| 12.2 | 1.00 |"), "{text}");
        assert!(text.contains("| – | 0.01 |"), "{text}");
        // The sweep has its own table and plot, not rows in the matrix.
        assert!(
            text.contains("| stride | adaptive | 700 (70.0 %) | 300 (30.0 %) |"),
            "{text}"
        );
        assert!(!text.contains("| stride | paper r=8"), "{text}");
        assert!(dir.join("plots/bubble-sweep-256mib-1gbit.svg").exists());
        assert!(text.contains("iperf3 957 Mbit/s"));
        for f in [
            "faults-256mib-1gbit.svg",
            "moved-256mib-1gbit.svg",
            "cdf-256mib-1gbit-random.svg",
        ] {
            let svg = std::fs::read_to_string(dir.join("plots").join(f)).unwrap();
            assert!(svg.starts_with("<svg"), "{f}");
        }
        assert!(matches!(load(&[]), Err(ResultsError::Empty)));
        std::fs::write(dir.join("bad.jsonl"), "{\"mode\": 1}").unwrap();
        assert!(matches!(
            load(&[dir.join("bad.jsonl")]),
            Err(ResultsError::Format { line: 1, .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
