//! `--report DIR`: the cost report written as files.
//!
//! - `report.json`: what `--json` prints;
//! - `report.md`: per run the per-step and per-layer tables (setup, online, total rows)
//!   and, through a link, measured time against the model;
//! - `layers.png` (one per run, `layers-<run>.png` when there are several): payload bytes
//!   (sent and received, stacked) and wall time per layer;
//! - `sweep.png` when a bench sweeps batch sizes: online bytes and time per row for each
//!   run, with the link model's time as a dot next to the measured bar.
//!
//! The charts are drawn with plotters' bitmap backend and the bundled DejaVu Sans (the
//! same approach as the attack reports), so they render without system fonts.

use std::path::{Path, PathBuf};

use fusion_common::channel::{CostReport, StepCost};
use fusion_common::cost::{OFFLINE_PREFIX, SETUP_PREFIX, group, summarize};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use crate::report::{LinkJson, by_layer};

/// Errors of writing a report directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// A file or the directory could not be written.
    #[error("writing {path}: {source}")]
    Io {
        /// the path
        path: PathBuf,
        /// why
        source: std::io::Error,
    },
    /// Plotting failed.
    #[error("drawing {path}: {detail}")]
    Plot {
        /// the PNG
        path: PathBuf,
        /// the backend's message
        detail: String,
    },
    /// The JSON could not be rendered.
    #[error("rendering the JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// One run of a report.
#[derive(Debug, Clone)]
pub struct RunCost {
    /// a short name, e.g. `16 rows` (used in titles, file names and the sweep's axis)
    pub label: String,
    /// rows in the run, when it is an inference
    pub rows: Option<usize>,
    /// the client's counting-channel report
    pub cost: CostReport,
    /// the link model, when the run went through the emulator
    pub link: Option<LinkJson>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `report.json` (`json` as given), `report.md` and the charts into `dir`; returns
/// the files written.
pub fn write_report(
    dir: &Path,
    title: &str,
    json: &impl serde::Serialize,
    runs: &[RunCost],
) -> Result<Vec<PathBuf>, ReportError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut written = Vec::new();
    let p = dir.join("report.json");
    std::fs::write(&p, serde_json::to_string_pretty(json)?).map_err(io(&p))?;
    written.push(p);
    let p = dir.join("report.md");
    std::fs::write(&p, render_markdown(title, runs)).map_err(io(&p))?;
    written.push(p);
    for r in runs {
        let p = if runs.len() == 1 {
            dir.join("layers.png")
        } else {
            dir.join(format!("layers-{}.png", file_part(&r.label)))
        };
        plot_layers(
            &p,
            &format!("{title}, {}", r.label),
            &by_layer(&r.cost).steps,
        )?;
        written.push(p);
    }
    if runs.len() > 1 {
        let p = dir.join("sweep.png");
        plot_sweep(&p, title, runs)?;
        written.push(p);
    }
    Ok(written)
}

fn file_part(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// A cost report as a Markdown table (steps, then setup, online and total rows).
pub fn markdown_table(r: &CostReport) -> String {
    let sum = summarize(r);
    let mut s = String::from(
        "| step | bytes sent | bytes received | messages (sent/recv) | rounds | seconds |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    let row = |s: &mut String, c: &StepCost, bold: bool| {
        let name = if bold {
            format!("**{}**", c.step)
        } else {
            c.step.clone()
        };
        s.push_str(&format!(
            "| {name} | {} | {} | {}/{} | {} | {:.4} |\n",
            group(c.bytes_sent),
            group(c.bytes_received),
            c.messages_sent,
            c.messages_received,
            c.rounds,
            c.seconds
        ));
    };
    for c in &sum.steps {
        row(&mut s, c, false);
    }
    if let (Some(a), Some(b)) = (&sum.setup, &sum.online) {
        row(&mut s, a, true);
        if let Some(o) = &sum.offline {
            row(&mut s, o, true);
        }
        row(&mut s, b, true);
    }
    row(&mut s, &sum.total, true);
    s
}

/// The Markdown report of the runs.
pub fn render_markdown(title: &str, runs: &[RunCost]) -> String {
    let mut s = format!(
        "# {title}\n\nClient-side costs from the counting channel: payload bytes each way, \
         messages, rounds (flights: direction changes) and wall time per protocol step; \
         steps named `{SETUP_PREFIX}*` are the session set-up, `{OFFLINE_PREFIX}*` a batch's \
         input-independent preprocessing (preprocessed linear layers), the others the online \
         phase.\n"
    );
    if runs.iter().any(|r| r.link.is_some()) {
        s.push_str(
            "\n## Measured against the model\n\n\
             model = compute + rounds x one-way delay + payload bytes / rate\n\n\
             | run | link | phase | measured s | model s | compute s | latency s | transfer s | rounds | effective flights | payload bytes | wire bytes | overhead |\n\
             |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for r in runs {
            let Some(l) = &r.link else { continue };
            for (phase, p) in [("setup", &l.setup), ("online", &l.online)] {
                s.push_str(&format!(
                    "| {} | {} | {phase} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {} |\n",
                    r.label,
                    l.profile,
                    p.measured_seconds,
                    p.model_seconds,
                    p.compute_seconds,
                    p.latency_seconds,
                    p.transfer_seconds,
                    p.rounds,
                    p.effective_flights
                        .map_or_else(|| "-".into(), |f| format!("{f:.1}")),
                    group(p.bytes),
                    if phase == "setup" {
                        group(l.wire_bytes_up + l.wire_bytes_down)
                    } else {
                        String::new()
                    },
                    if phase == "setup" {
                        group(l.overhead_bytes)
                    } else {
                        String::new()
                    },
                ));
            }
        }
        if let Some(l) = runs.iter().find_map(|r| r.link.as_ref()) {
            s.push_str(&format!(
                "\ncompute: {}. rounds: the flights (direction changes) the client \
                 counted; effective flights = (measured - compute - transfer) / one-way \
                 delay, the one-way delays the run actually waited for (fewer than rounds \
                 where both parties send in the same flight). Wire bytes are the whole session's (both phases) as the \
                 link emulator relayed them; the overhead is TLS records, HTTP/2 and gRPC \
                 framing and the session's start and end.\n",
                l.compute_from
            ));
        }
    }
    for r in runs {
        s.push_str(&format!(
            "\n## {}\n\n### per protocol step\n\n{}\n### per layer\n\n{}",
            r.label,
            markdown_table(&r.cost),
            markdown_table(&by_layer(&r.cost))
        ));
    }
    s
}

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Cannot fail for the bundled file; if it did, text would be missing, not the plot.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

const SENT: RGBColor = RGBColor(31, 119, 180);
const RECEIVED: RGBColor = RGBColor(255, 127, 14);
const TIME: RGBColor = RGBColor(44, 160, 44);

/// One bar chart on `area`: categories `names`, stacked `values` (one colour each), an
/// optional dot per category.
fn bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    y_desc: &str,
    names: &[String],
    values: &[(&str, RGBColor, Vec<f64>)],
    dots: Option<(&str, Vec<f64>)>,
) -> Result<(), String> {
    // plotters' integer range includes its end: `0..last` makes `last + 1` segments
    let last = names.len().saturating_sub(1).max(1) as u32;
    let stacked_max = (0..names.len())
        .map(|i| values.iter().map(|v| v.2[i]).sum::<f64>())
        .fold(0.0f64, f64::max);
    let dot_max = dots
        .as_ref()
        .map_or(0.0, |d| d.1.iter().copied().fold(0.0f64, f64::max));
    let top = stacked_max.max(dot_max).max(1e-9) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0u32..last).into_segmented(), 0f64..top)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(names.len() + 1)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_formatter(&|v| {
            if top >= 20.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        })
        .light_line_style(WHITE.mix(0.0))
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| e.to_string())?;
    let mut base = vec![0.0; names.len()];
    for (label, color, v) in values {
        let color = *color;
        let rects: Vec<Rectangle<(SegmentValue<u32>, f64)>> = (0..names.len())
            .map(|i| {
                let i32_ = i as u32;
                let mut r = Rectangle::new(
                    [
                        (SegmentValue::Exact(i32_), base[i]),
                        (SegmentValue::Exact(i32_ + 1), base[i] + v[i]),
                    ],
                    color.filled(),
                );
                r.set_margin(0, 0, 8, 8);
                base[i] += v[i];
                r
            })
            .collect();
        chart
            .draw_series(rects)
            .map_err(|e| e.to_string())?
            .label(*label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    if let Some((label, d)) = dots {
        chart
            .draw_series(d.iter().enumerate().map(|(i, &y)| {
                Circle::new((SegmentValue::CenterOf(i as u32), y), 6, BLACK.filled())
            }))
            .map_err(|e| e.to_string())?
            .label(label)
            .legend(|(x, y)| Circle::new((x + 6, y), 5, BLACK.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The per-layer chart: payload KiB (sent and received, stacked) and seconds per layer.
pub fn plot_layers(path: &Path, title: &str, layers: &[StepCost]) -> Result<(), ReportError> {
    register_font();
    let err = |detail: String| ReportError::Plot {
        path: path.to_owned(),
        detail,
    };
    let root = BitMapBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let root = root
        .titled(title, ("sans-serif", 24))
        .map_err(|e| err(e.to_string()))?;
    let (left, right) = root.split_horizontally(600);
    let names: Vec<String> = layers.iter().map(|l| l.step.clone()).collect();
    let kib = |f: fn(&StepCost) -> u64| layers.iter().map(|l| f(l) as f64 / 1024.0).collect();
    bars(
        &left,
        "payload bytes per layer",
        "KiB (client side)",
        &names,
        &[
            ("sent", SENT, kib(|l| l.bytes_sent)),
            ("received", RECEIVED, kib(|l| l.bytes_received)),
        ],
        None,
    )
    .map_err(err)?;
    bars(
        &right,
        "wall time per layer",
        "seconds",
        &names,
        &[("time", TIME, layers.iter().map(|l| l.seconds).collect())],
        None,
    )
    .map_err(err)?;
    root.present().map_err(|e| err(e.to_string()))
}

/// The sweep chart: per run, online KiB per row and online milliseconds per row (the link
/// model as a dot, when there is one).
pub fn plot_sweep(path: &Path, title: &str, runs: &[RunCost]) -> Result<(), ReportError> {
    register_font();
    let err = |detail: String| ReportError::Plot {
        path: path.to_owned(),
        detail,
    };
    let root = BitMapBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let root = root
        .titled(title, ("sans-serif", 24))
        .map_err(|e| err(e.to_string()))?;
    let (left, right) = root.split_horizontally(600);
    let names: Vec<String> = runs.iter().map(|r| r.label.clone()).collect();
    let online: Vec<StepCost> = runs
        .iter()
        .map(|r| {
            summarize(&r.cost)
                .online
                .unwrap_or_else(|| r.cost.total(""))
        })
        .collect();
    let per_row = |r: &RunCost| r.rows.unwrap_or(1).max(1) as f64;
    let kib = |f: fn(&StepCost) -> u64| -> Vec<f64> {
        online
            .iter()
            .zip(runs)
            .map(|(o, r)| f(o) as f64 / 1024.0 / per_row(r))
            .collect()
    };
    let unit = if runs.iter().any(|r| r.rows.is_some()) {
        " per row"
    } else {
        ""
    };
    bars(
        &left,
        &format!("online payload{unit}"),
        "KiB (client side)",
        &names,
        &[
            ("sent", SENT, kib(|o| o.bytes_sent)),
            ("received", RECEIVED, kib(|o| o.bytes_received)),
        ],
        None,
    )
    .map_err(err)?;
    let ms: Vec<f64> = online
        .iter()
        .zip(runs)
        .map(|(o, r)| o.seconds * 1e3 / per_row(r))
        .collect();
    let dots = runs.iter().all(|r| r.link.is_some()).then(|| {
        (
            "model",
            runs.iter()
                .map(|r| {
                    r.link
                        .as_ref()
                        .map_or(0.0, |l| l.online.model_seconds * 1e3 / per_row(r))
                })
                .collect(),
        )
    });
    bars(
        &right,
        &format!("online wall time{unit}"),
        "milliseconds",
        &names,
        &[("measured", TIME, ms)],
        dots,
    )
    .map_err(err)?;
    root.present().map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, sent: u64, recv: u64) -> StepCost {
        StepCost {
            step: name.into(),
            bytes_sent: sent,
            bytes_received: recv,
            messages_sent: 1,
            messages_received: 2,
            rounds: 2,
            seconds: 0.125,
        }
    }

    fn run(label: &str, rows: usize) -> RunCost {
        RunCost {
            label: label.into(),
            rows: Some(rows),
            cost: CostReport {
                steps: vec![
                    step("setup/hello", 10, 20),
                    step("setup/base-ot", 1000, 2000),
                    step("layer1/linear", 5000 * rows as u64, 300),
                    step("layer1/relu", 700, 800),
                    step("output/reveal", 1, 40),
                ],
            },
            link: None,
        }
    }

    #[test]
    fn markdown_has_every_step_layer_and_the_phase_rows() {
        let md = render_markdown("bench infer", &[run("1 row", 1)]);
        for needle in [
            "| setup/base-ot | 1,000 | 2,000 | 1/2 | 2 | 0.1250 |",
            "| layer1/linear | 5,000 |",
            "| layer1 | 5,700 | 1,100 | 2/4 | 4 | 0.2500 |",
            "| **setup** | 1,010 | 2,020 |",
            "| **online** | 5,701 | 1,140 |",
            "| **total** | 6,711 | 3,160 |",
        ] {
            assert!(md.contains(needle), "{needle} missing from\n{md}");
        }
        assert!(!md.contains("Measured against the model"));
    }

    #[test]
    fn report_dir_gets_json_markdown_and_pngs() {
        let dir = tempfile::tempdir().unwrap();
        let runs = [run("1 row", 1), run("16 rows", 16)];
        let json = serde_json::json!([{"rows": 1}, {"rows": 16}]);
        let files = write_report(dir.path(), "bench infer", &json, &runs).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "report.json",
                "report.md",
                "layers-1-row.png",
                "layers-16-rows.png",
                "sweep.png"
            ]
        );
        for f in &files {
            let bytes = std::fs::read(f).unwrap();
            if f.extension().is_some_and(|e| e == "png") {
                assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{f:?}");
                assert!(bytes.len() > 5_000, "{f:?} looks empty");
            }
        }
        let back: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap())
                .unwrap();
        assert_eq!(back, json);
        // one run: a single `layers.png`, no sweep
        let one = tempfile::tempdir().unwrap();
        let files = write_report(one.path(), "t", &json, &runs[..1]).unwrap();
        assert!(files.iter().any(|p| p.ends_with("layers.png")));
        assert!(!one.path().join("sweep.png").exists());
    }
}
