//! `fusion-client tune`: the exact escape probability of a cheating server for a batch of
//! B own inputs, the cheapest (T, R) that meets a target, and the alternatives with their
//! cost.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use fusion_common::fusion::tune::{self, Choice};

/// Flags of `tune`.
#[derive(Debug, Args)]
pub struct TuneArgs {
    /// B: own inputs per batch.
    #[arg(long = "batch", short = 'b')]
    pub batch: usize,
    /// Target escape probability: a number (1e-6) or a power of two (2^-40).
    #[arg(long, default_value = "2^-40", value_parser = parse_probability)]
    pub target: f64,
    /// Largest batch (rows) to consider; a server's --max-rows.
    #[arg(long, default_value_t = 4096)]
    pub max_rows: usize,
    /// Largest repetition count R to consider.
    #[arg(long, default_value_t = 32)]
    pub max_r: usize,
    /// Evaluate this T (with --r) instead of searching.
    #[arg(long, requires = "r")]
    pub t: Option<usize>,
    /// Evaluate this R (with --t) instead of searching.
    #[arg(long, requires = "t")]
    pub r: Option<usize>,
    /// Online seconds per row, to estimate the time of each choice.
    #[arg(long)]
    pub row_seconds: Option<f64>,
    /// Online bytes per row, to estimate the traffic of each choice.
    #[arg(long)]
    pub row_bytes: Option<f64>,
    /// Read the cost per row from `fusion-client bench infer --json` output.
    #[arg(long, conflicts_with_all = ["row_seconds", "row_bytes"])]
    pub bench: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses `1e-6`, `0.001` or `2^-40`.
pub fn parse_probability(s: &str) -> Result<f64, String> {
    let v = match s.trim().strip_prefix("2^") {
        Some(e) => e
            .parse::<f64>()
            .map(f64::exp2)
            .map_err(|e| format!("{s:?}: {e}"))?,
        None => s.trim().parse::<f64>().map_err(|e| format!("{s:?}: {e}"))?,
    };
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("{s:?} is not a probability in (0, 1]"))
    }
}

/// Cost per row, online.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct RowCost {
    seconds: Option<f64>,
    bytes: Option<f64>,
}

/// Reads `ms_per_row_online` and `bytes_per_row_online` from a bench JSON object, or from
/// the entry of a JSON array with the most rows not above `rows` (else the first).
fn row_cost_from_bench(path: &PathBuf, rows: usize) -> anyhow::Result<RowCost> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let runs: Vec<&serde_json::Value> = match &v {
        serde_json::Value::Array(a) => a.iter().collect(),
        o => vec![o],
    };
    let rows_of = |r: &serde_json::Value| r.get("rows").and_then(|x| x.as_u64()).unwrap_or(0);
    let run = runs
        .iter()
        .filter(|r| rows_of(r) as usize <= rows)
        .max_by_key(|r| rows_of(r))
        .or_else(|| runs.first())
        .context("the bench file holds no run")?;
    let get = |k: &str| run.get(k).and_then(|x| x.as_f64());
    let (ms, bytes) = (get("ms_per_row_online"), get("bytes_per_row_online"));
    if ms.is_none() && bytes.is_none() {
        bail!(
            "{} has neither ms_per_row_online nor bytes_per_row_online",
            path.display()
        );
    }
    Ok(RowCost {
        seconds: ms.map(|m| m / 1e3),
        bytes,
    })
}

/// Runs the tuner and prints.
pub fn run(args: &TuneArgs) -> anyhow::Result<()> {
    let choices: Vec<Choice> = match (args.t, args.r) {
        (Some(t), Some(r)) => vec![tune::evaluate(t, r, args.batch)?],
        _ => tune::alternatives(args.batch, args.target, args.max_rows, args.max_r)?,
    };
    let cost = match &args.bench {
        Some(p) => row_cost_from_bench(p, choices[0].rows)?,
        None => RowCost {
            seconds: args.row_seconds,
            bytes: args.row_bytes,
        },
    };
    if args.json {
        println!("{}", render_json(&choices, cost, args.target)?);
    } else {
        print!("{}", render_text(&choices, cost, args.target));
    }
    Ok(())
}

fn render_json(choices: &[Choice], cost: RowCost, target: f64) -> anyhow::Result<String> {
    let with_cost = |c: &Choice| -> anyhow::Result<serde_json::Value> {
        let mut v = serde_json::to_value(c)?;
        if let Some(o) = v.as_object_mut() {
            if let Some(s) = cost.seconds {
                o.insert("seconds".into(), (s * c.rows as f64).into());
            }
            if let Some(b) = cost.bytes {
                o.insert("bytes".into(), (b * c.rows as f64).into());
            }
        }
        Ok(v)
    };
    let mut best = with_cost(&choices[0])?;
    if let Some(o) = best.as_object_mut() {
        o.insert("target".into(), target.into());
        let alts: anyhow::Result<Vec<_>> = choices.iter().map(with_cost).collect();
        o.insert("alternatives".into(), alts?.into());
    }
    Ok(serde_json::to_string_pretty(&best)?)
}

fn render_text(choices: &[Choice], cost: RowCost, target: f64) -> String {
    let mut s = String::new();
    let best = &choices[0];
    let _ = writeln!(
        s,
        "B = {}: T = {}, R = {}, {} rows (overhead {:.2}x); a cheating server escapes with \
         probability at most {:.3e} = 2^{:.2} (target {:.3e}; best attack alters {} group(s) of {} rows)",
        best.b,
        best.t,
        best.r,
        best.rows,
        best.overhead,
        best.escape,
        best.log2_escape,
        target,
        best.worst_m,
        best.r
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:>6} {:>3} {:>7} {:>9} {:>12} {:>9} {:>7} {:>10} {:>12}",
        "T", "R", "rows", "overhead", "escape", "log2", "worst m", "seconds", "bytes"
    );
    for c in choices {
        let secs = cost
            .seconds
            .map_or("-".to_owned(), |x| format!("{:.3}", x * c.rows as f64));
        let bytes = cost
            .bytes
            .map_or("-".to_owned(), |x| format!("{:.0}", x * c.rows as f64));
        let _ = writeln!(
            s,
            "{:>6} {:>3} {:>7} {:>8.2}x {:>12.3e} {:>9.2} {:>7} {:>10} {:>12}",
            c.t, c.r, c.rows, c.overhead, c.escape, c.log2_escape, c.worst_m, secs, bytes
        );
    }
    let _ = writeln!(
        s,
        "\nescape = max over m of C(B, m) / C(T + R*B, R*m), exact; altering part of a group \
         or any public row is always caught."
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_parse() {
        assert_eq!(parse_probability("2^-40").unwrap(), 2f64.powi(-40));
        assert_eq!(parse_probability("1e-6").unwrap(), 1e-6);
        for bad in ["0", "2", "-1", "x", "2^x", "2^1"] {
            assert!(parse_probability(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn json_has_the_issue_keys_and_costs() {
        let choices = tune::alternatives(3, 1.0 / 7.0, 100, 2).unwrap();
        let cost = RowCost {
            seconds: Some(0.5),
            bytes: Some(10.0),
        };
        let v: serde_json::Value =
            serde_json::from_str(&render_json(&choices, cost, 1.0 / 7.0).unwrap()).unwrap();
        for k in [
            "B",
            "T",
            "R",
            "rows",
            "escape",
            "log2_escape",
            "alternatives",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        let rows = v["rows"].as_f64().unwrap();
        assert_eq!(v["seconds"].as_f64().unwrap(), 0.5 * rows);
        assert!(v["escape"].as_f64().unwrap() <= 1.0 / 7.0);
        assert!(render_text(&choices, cost, 1.0 / 7.0).contains("overhead"));
    }

    #[test]
    fn bench_files_give_the_row_cost() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.json");
        std::fs::write(
            &p,
            r#"[{"rows":1,"ms_per_row_online":40.0,"bytes_per_row_online":1e6},
                {"rows":256,"ms_per_row_online":4.0,"bytes_per_row_online":6e4}]"#,
        )
        .unwrap();
        let c = row_cost_from_bench(&p, 300).unwrap();
        assert_eq!(c.seconds, Some(0.004));
        let c = row_cost_from_bench(&p, 10).unwrap();
        assert_eq!(c.bytes, Some(1e6));
        std::fs::write(&p, "{}").unwrap();
        assert!(row_cost_from_bench(&p, 10).is_err());
    }
}
