//! Reports: every run writes `run-<attack>-<policy>.json` into the report directory; the
//! directory's `report.json`, `report.md` and `agreement.png` are then rebuilt from all
//! the run files found there, so runs made one at a time (or by `--compare`) end up on one
//! table and one figure: agreement with the victim against queries, defended and
//! undefended.
//!
//! The plot is drawn with plotters' bitmap backend and a bundled font (DejaVu Sans,
//! registered through `ab_glyph`), so it renders without fontconfig or system fonts.

use anyhow::Context;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One point of an attack's progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// rows charged so far
    pub queries: u64,
    /// top-1 agreement with the victim on held-out MNIST images
    pub agreement: f64,
    /// the stolen model's accuracy on held-out MNIST images
    pub accuracy: f64,
}

/// The record of one attack run under one policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// `"papernot"`, `"baseline"` or `"carlini"`
    pub attack: String,
    /// the policy, e.g. `"logits, no budget"`
    pub policy: String,
    /// whether the policy is the defended one (labels only)
    pub defended: bool,
    /// the oracle
    pub oracle: String,
    /// the victim model file
    pub model: String,
    /// rows charged in all
    pub queries: u64,
    /// wall time of the run
    pub seconds: f64,
    /// progress (agreement against queries)
    pub curve: Vec<CurvePoint>,
    /// why the attack was refused or stopped, if it was
    pub outcome: Option<String>,
    /// the attack's full report
    pub details: serde_json::Value,
}

impl RunRecord {
    /// The file name of this run in a report directory.
    pub fn file_name(&self) -> String {
        let policy: String = self
            .policy
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        format!("run-{}-{}-{}.json", self.attack, self.model_stem(), policy)
    }

    /// The victim model's file name (for the tables).
    fn model_file(&self) -> String {
        Path::new(&self.model)
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// The victim model's file name without its extension (for run files and plots).
    fn model_stem(&self) -> String {
        Path::new(&self.model)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// The number under `key` of a JSON object, NaN when missing.
fn json_f64(v: &serde_json::Value, key: &str) -> f64 {
    v.get(key)
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(f64::NAN)
}

/// Writes `run` into `dir` and rebuilds the merged report; returns the paths written.
pub fn write(dir: &Path, runs: &[RunRecord]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for run in runs {
        let p = dir.join(run.file_name());
        std::fs::write(&p, serde_json::to_vec_pretty(run)?)
            .with_context(|| format!("writing {}", p.display()))?;
        written.push(p);
    }
    let all = load_runs(dir)?;
    let json = dir.join("report.json");
    std::fs::write(
        &json,
        serde_json::to_vec_pretty(&serde_json::json!({ "runs": all }))?,
    )?;
    let md = dir.join("report.md");
    std::fs::write(&md, markdown(&all))?;
    let png = dir.join("agreement.png");
    plot(&png, &all)?;
    written.extend([json, md, png]);
    Ok(written)
}

/// Every `run-*.json` in `dir`, sorted by file name.
pub fn load_runs(dir: &Path) -> anyhow::Result<Vec<RunRecord>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("run-") && n.ends_with(".json"))
        })
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p)?;
            serde_json::from_slice(&bytes).with_context(|| format!("reading {}", p.display()))
        })
        .collect()
}

/// The Markdown table: one row per run.
pub fn markdown(runs: &[RunRecord]) -> String {
    let mut s = String::from(
        "| attack | model | policy | queries | accuracy | agreement | time (s) | outcome |\n\
         |---|---|---|---:|---:|---:|---:|---|\n",
    );
    for r in runs {
        let last = r.curve.last();
        let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}%", 100.0 * v));
        let model = r.model_file();
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {} |\n",
            r.attack,
            model,
            r.policy,
            r.queries,
            pct(last.map(|p| p.accuracy)),
            pct(last.map(|p| p.agreement)),
            r.seconds,
            r.outcome.as_deref().unwrap_or("completed"),
        ));
    }
    if let Some(lines) = carlini_lines(runs) {
        s.push_str("\nCarlini et al. extraction, errors against the victim:\n\n");
        s.push_str(&lines);
    }
    if let Some(lines) = first_layer_lines(runs) {
        s.push_str(
            "\nCarlini et al. against a deeper network: the first layer (rows, and their signs \
             where the chain decided them; right / wrong checked against the victim):\n\n",
        );
        s.push_str(&lines);
    }
    if let Some(lines) = hybrid_lines(runs) {
        s.push_str(
            "\nhybrid completion (learned rest): not cryptanalytic extraction; the recovered \
             first-layer rows fixed, the rest learned from logits (Jagielski et al. 2020), \
             against the same learning with no row fixed; queries include the first layer's \
             for the hybrid; time: each model's own training (also in the table above), the \
             logit queries both learn from listed once below:\n\n",
        );
        s.push_str(&lines);
    }
    s
}

/// The table of hybrid completions and their controls (`carlini-hybrid`,
/// `logit-learning` runs), if any.
fn hybrid_lines(runs: &[RunRecord]) -> Option<String> {
    let mut s = String::from(
        "| model | policy | method | rows fixed | learn queries | queries in all | accuracy | agreement | logit error random max / mean | logit error held-out max / mean | training (s) |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut any = false;
    // the phases shared by a hybrid and its control, once per (model, policy, oracle)
    let mut shared: Vec<((String, String, String), String)> = Vec::new();
    for r in runs
        .iter()
        .filter(|r| r.attack == "carlini-hybrid" || r.attack == "logit-learning")
    {
        let Some(c) = r.details.get("this").filter(|v| !v.is_null()) else {
            continue;
        };
        any = true;
        let m = c.get("metrics").cloned().unwrap_or(serde_json::Value::Null);
        let pct = |v: f64| {
            if v.is_nan() {
                "-".to_string()
            } else {
                format!("{:.2}%", 100.0 * v)
            }
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.3} / {:.4} | {:.3} / {:.4} | {:.1} |\n",
            r.model_file(),
            r.policy,
            c.get("method").and_then(|v| v.as_str()).unwrap_or("-"),
            json_f64(c, "fixed_rows"),
            json_f64(&r.details, "learn_queries"),
            r.queries,
            pct(json_f64(&m, "mnist_accuracy")),
            pct(json_f64(&m, "mnist_agreement")),
            json_f64(&m, "max_logit_error"),
            json_f64(&m, "mean_logit_error"),
            json_f64(c, "heldout_max_logit_error"),
            json_f64(c, "heldout_mean_logit_error"),
            json_f64(c, "seconds"),
        ));
        let key = (r.model_file(), r.policy.clone(), r.oracle.clone());
        if !shared.iter().any(|(k, _)| *k == key) {
            shared.push((key, shared_lines(r)));
        }
    }
    for (_, lines) in &shared {
        s.push_str(lines);
    }
    any.then_some(s)
}

/// The lines of what a hybrid and its control share (from either's record): the logit
/// query phase and, for a loaded first layer, its signs decided again.
fn shared_lines(r: &RunRecord) -> String {
    let d = &r.details;
    let n = |v: &serde_json::Value, k: &str| {
        v.get(k)
            .and_then(serde_json::Value::as_u64)
            .map_or("-".to_string(), |v| v.to_string())
    };
    let mut s = format!(
        "\n{}, {}: logit queries shared by the hybrid and the control: {} rows in {:.1} s \
         (once, not in either model's training time)\n",
        r.model_file(),
        r.policy,
        n(d, "learn_queries"),
        json_f64(d, "query_seconds"),
    );
    if let Some(g) = d.get("signs").filter(|v| !v.is_null()) {
        s.push_str(&format!(
            "\n{}, {}: first-layer signs of the loaded file decided again: the file had {} of \
             {} rows signed; the sign step decided {} ({} disagree with the file, {} of the \
             file's kept where it decided none), {} rows\n",
            r.model_file(),
            r.policy,
            n(g, "file_signed"),
            n(g, "rows"),
            n(g, "fresh_decided"),
            n(g, "disagree"),
            n(g, "kept_from_file"),
            n(g, "queries"),
        ));
    }
    s
}

fn carlini_lines(runs: &[RunRecord]) -> Option<String> {
    let mut s = String::from(
        "| model | policy | neurons | max logit error | mean logit error | agreement (random) | row error max / mean | output column error max |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut any = false;
    for r in runs.iter().filter(|r| r.attack == "carlini") {
        let Some(m) = r.details.get("metrics").filter(|m| !m.is_null()) else {
            continue;
        };
        any = true;
        let f = |k: &str| json_f64(m, k);
        let model = r.model_file();
        s.push_str(&format!(
            "| {} | {} | {}/{} | {:.3e} | {:.3e} | {:.2}% | {:.2e} / {:.2e} | {:.2e} |\n",
            model,
            r.policy,
            f("matched_neurons"),
            f("victim_neurons"),
            f("max_logit_error"),
            f("mean_logit_error"),
            100.0 * f("random_agreement"),
            f("row_rel_error_max"),
            f("row_rel_error_mean"),
            f("out_col_rel_error_max"),
        ));
    }
    any.then_some(s)
}

/// The first-layer table of deep Carlini runs (`details.first_layer`), if any.
fn first_layer_lines(runs: &[RunRecord]) -> Option<String> {
    let mut s = String::from(
        "| model | policy | rows recovered | matched to a victim row | spurious | row error max / mean | probes rejected | signs decided (right / wrong) |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut any = false;
    for r in runs.iter().filter(|r| r.attack == "carlini") {
        let Some(fl) = r.details.get("first_layer").filter(|v| !v.is_null()) else {
            continue;
        };
        any = true;
        let m = fl
            .get("metrics")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        let n = |v: &serde_json::Value, k: &str| v.get(k).and_then(serde_json::Value::as_u64);
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        let model = r.model_file();
        let signs = r
            .details
            .get("deeper")
            .and_then(|d| d.get("signs_1"))
            .and_then(|s1| n(s1, "decided"))
            .map_or("-".to_string(), |d| {
                match (n(&m, "signs_right"), n(&m, "signs_wrong")) {
                    (Some(r), Some(w)) => format!("{d} ({r} / {w})"),
                    _ => d.to_string(),
                }
            });
        s.push_str(&format!(
            "| {} | {} | {} of {} | {} | {} | {:.2e} / {:.2e} | {} of {} | {} |\n",
            model,
            r.policy,
            opt(n(fl, "recovered")),
            opt(n(fl, "width")),
            opt(n(&m, "matched")),
            opt(n(&m, "spurious")),
            json_f64(&m, "row_rel_error_max"),
            json_f64(&m, "row_rel_error_mean"),
            opt(n(fl, "probes_rejected")),
            opt(n(fl, "probed")),
            signs,
        ));
    }
    any.then_some(s)
}

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Cannot fail for the bundled file; if it did, text would be missing, not the plot.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// The figure: agreement (%) against queries (log scale), one series per run.
pub fn plot(path: &Path, runs: &[RunRecord]) -> anyhow::Result<()> {
    register_font();
    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let max_q = runs
        .iter()
        .flat_map(|r| r.curve.iter().map(|p| p.queries))
        .max()
        .unwrap_or(10)
        .max(10) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Model extraction: agreement with the victim vs queries",
            ("sans-serif", 24),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((10f64..max_q * 1.5).log_scale(), 0f64..100f64)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("queries (rows)")
        .y_desc("top-1 agreement on held-out MNIST (%)")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(23, 190, 207),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(227, 119, 194),
        RGBColor(0, 0, 0),
        RGBColor(0, 90, 50),
    ];
    for (i, r) in runs.iter().filter(|r| !r.curve.is_empty()).enumerate() {
        let color = palette[i % palette.len()];
        let pts: Vec<(f64, f64)> = r
            .curve
            .iter()
            .map(|p| ((p.queries.max(10)) as f64, 100.0 * p.agreement))
            .collect();
        let model = r.model_stem();
        let label = format!("{} {} ({})", r.attack, model, r.policy);
        // Defended runs dashed with crosses, undefended solid with dots.
        let series = if r.defended {
            chart.draw_series(DashedLineSeries::new(
                pts.clone(),
                8,
                6,
                ShapeStyle::from(&color).stroke_width(2),
            ))
        } else {
            chart.draw_series(LineSeries::new(
                pts.clone(),
                ShapeStyle::from(&color).stroke_width(2),
            ))
        };
        series
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        if r.defended {
            chart
                .draw_series(pts.iter().map(|&p| Cross::new(p, 6, color.stroke_width(2))))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        } else {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Runs without a curve (refused, e.g. extraction against labels only) as notes.
    let mut y = 330;
    for r in runs.iter().filter(|r| r.curve.is_empty()) {
        let model = r.model_stem();
        let outcome = r.outcome.as_deref().unwrap_or("no result");
        let short: String = outcome.chars().take(64).collect();
        let text = format!(
            "{} {} ({}): {} queries, {short}",
            r.attack, model, r.policy, r.queries
        );
        root.draw_text(
            &text,
            &("sans-serif", 14).into_font().color(&BLACK),
            (90, y),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        y += 16;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_deep_carlini_run_gets_its_first_layer_table() {
        let run = RunRecord {
            attack: "carlini".into(),
            policy: "logits, no budget".into(),
            defended: false,
            oracle: "local-fixed".into(),
            model: "models/mnist-dnn.safetensors".into(),
            queries: 5,
            seconds: 1.0,
            curve: Vec::new(),
            outcome: None,
            details: serde_json::json!({
                "metrics": null,
                "first_layer": {
                    "recovered": 25, "width": 128, "probed": 3132, "probes_rejected": 1915,
                    "metrics": {"matched": 20, "spurious": 5,
                                "row_rel_error_max": 0.0204, "row_rel_error_mean": 0.014}
                }
            }),
        };
        // a run with the chain's signs (decided, and checked against the victim)
        let mut signed = run.clone();
        signed.details = serde_json::json!({
            "metrics": null,
            "first_layer": {
                "recovered": 81, "width": 128, "probed": 2133, "probes_rejected": 1280,
                "metrics": {"matched": 81, "spurious": 0, "signs_right": 80, "signs_wrong": 1,
                            "row_rel_error_max": 0.0371, "row_rel_error_mean": 0.0161}
            },
            "deeper": {"signs_1": {"decided": 81, "neurons": 81}}
        });
        let md = markdown(&[run, signed]);
        assert!(
            md.contains("| mnist-dnn.safetensors | logits, no budget | 25 of 128 | 20 | 5 | 2.04e-2 / 1.40e-2 | 1915 of 3132 | - |"),
            "{md}"
        );
        assert!(
            md.contains("| mnist-dnn.safetensors | logits, no budget | 81 of 128 | 81 | 0 | 3.71e-2 / 1.61e-2 | 1280 of 2133 | 81 (80 / 1) |"),
            "{md}"
        );
        assert!(!md.contains("errors against the victim"), "{md}");
    }

    use super::*;

    /// A hybrid completion and its control get their own section, named as learning; each
    /// with its own training time, the shared query phase and the loaded file's signs once.
    #[test]
    fn hybrid_runs_get_their_own_section() {
        let rec = |attack: &str, method: &str, fixed: u64, q: u64, agree: f64, t: f64| RunRecord {
            attack: attack.into(),
            policy: "logits, no budget".into(),
            defended: false,
            oracle: "local-fixed".into(),
            model: "models/mnist-dnn.safetensors".into(),
            queries: q,
            seconds: t,
            curve: vec![CurvePoint {
                queries: q,
                agreement: agree,
                accuracy: 0.9,
            }],
            outcome: None,
            details: serde_json::json!({
                "learn_queries": 60000,
                "query_seconds": 40.25,
                "signs": {"rows": 81, "file_signed": 75, "fresh_decided": 81, "disagree": 2,
                          "kept_from_file": 0, "signed": 81, "queries": 1968},
                "this": {
                    "method": method, "fixed_rows": fixed, "queries": q, "seconds": t,
                    "heldout_max_logit_error": 1.5, "heldout_mean_logit_error": 0.25,
                    "metrics": {"mnist_accuracy": 0.9, "mnist_agreement": agree,
                                "max_logit_error": 3.0, "mean_logit_error": 0.5}
                }
            }),
        };
        let md = markdown(&[
            rec(
                "carlini-hybrid",
                "hybrid (recovered rows fixed)",
                75,
                9_060_000,
                0.95,
                120.0,
            ),
            rec(
                "logit-learning",
                "learning only (no row fixed)",
                0,
                60_000,
                0.94,
                95.5,
            ),
        ]);
        assert!(md.contains("hybrid completion (learned rest): not cryptanalytic extraction"));
        assert!(
            md.contains("| mnist-dnn.safetensors | logits, no budget | hybrid (recovered rows fixed) | 75 | 60000 | 9060000 | 90.00% | 95.00% | 3.000 / 0.5000 | 1.500 / 0.2500 |"),
            "{md}"
        );
        assert!(
            md.contains("| learning only (no row fixed) | 0 | 60000 | 60000 |"),
            "{md}"
        );
        assert!(!md.contains("errors against the victim"), "{md}");
        // each its own training time, in the main table and the section
        assert!(md.contains("| 1.500 / 0.2500 | 120.0 |"), "{md}");
        assert!(md.contains("| 1.500 / 0.2500 | 95.5 |"), "{md}");
        assert!(
            md.contains("| carlini-hybrid | mnist-dnn.safetensors | logits, no budget | 9060000 | 90.00% | 95.00% | 120.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| logit-learning | mnist-dnn.safetensors | logits, no budget | 60000 | 90.00% | 94.00% | 95.5 |"),
            "{md}"
        );
        // the shared query phase and the loaded file's signs, once
        let shared = "mnist-dnn.safetensors, logits, no budget: logit queries shared by the \
                      hybrid and the control: 60000 rows in 40.2 s";
        assert_eq!(md.matches(shared).count(), 1, "{md}");
        let signs = "first-layer signs of the loaded file decided again: the file had 75 of 81 \
                     rows signed; the sign step decided 81 (2 disagree with the file, 0 of the \
                     file's kept where it decided none), 1968 rows";
        assert_eq!(md.matches(signs).count(), 1, "{md}");
    }

    fn run(attack: &str, defended: bool, q: &[u64]) -> RunRecord {
        RunRecord {
            attack: attack.into(),
            policy: if defended {
                "labels, budget 10000".into()
            } else {
                "logits, no budget".into()
            },
            defended,
            oracle: "local".into(),
            model: "models/x.safetensors".into(),
            queries: q.last().copied().unwrap_or(0),
            seconds: 1.0,
            curve: q
                .iter()
                .enumerate()
                .map(|(i, &queries)| CurvePoint {
                    queries,
                    agreement: 0.5 + 0.05 * i as f64,
                    accuracy: 0.5,
                })
                .collect(),
            outcome: None,
            details: serde_json::json!({}),
        }
    }

    #[test]
    fn report_dir_merges_runs_and_renders_a_png() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &[run("papernot", false, &[150, 300, 600])]).unwrap();
        write(dir.path(), &[run("papernot", true, &[150, 300])]).unwrap();
        let mut refused = run("carlini", true, &[]);
        refused.outcome = Some("refused: needs logits".into());
        write(dir.path(), &[refused]).unwrap();
        let all = load_runs(dir.path()).unwrap();
        assert_eq!(all.len(), 3);
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(md.contains("labels, budget 10000") && md.contains("logits, no budget"));
        let png = std::fs::read(dir.path().join("agreement.png")).unwrap();
        assert_eq!(&png[..4], b"\x89PNG");
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap())
                .unwrap();
        assert_eq!(json["runs"].as_array().unwrap().len(), 3);
        assert!(md.contains("refused: needs logits"));
    }
}
