//! Rendering a [`CostReport`] for people (an aligned table) and for programs (JSON).
//!
//! Steps whose names start with `setup` are summed into a `setup` row, those starting
//! with `offline` (a batch's input-independent preprocessing) into an `offline` row, and
//! the others into an `online` row; a `total` row closes the table.

use serde::{Deserialize, Serialize};

use crate::channel::{CostReport, StepCost};

/// The prefix of the steps counted as set-up (input-independent work).
pub const SETUP_PREFIX: &str = "setup";
/// The prefix of a batch's preprocessing steps (input-independent, per batch).
pub const OFFLINE_PREFIX: &str = "offline";

/// A report with its set-up, online and total sums, as printed by `--json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostSummary {
    /// the steps in the order they first appeared
    pub steps: Vec<StepCost>,
    /// the sum over `setup*` steps, when there are any
    pub setup: Option<StepCost>,
    /// the sum over `offline*` steps, when there are any
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline: Option<StepCost>,
    /// the sum over the other steps, when there are `setup*` steps
    pub online: Option<StepCost>,
    /// the sum over all steps
    pub total: StepCost,
}

/// The sums of a report.
pub fn summarize(report: &CostReport) -> CostSummary {
    let has_setup = report
        .steps
        .iter()
        .any(|s| s.step.starts_with(SETUP_PREFIX));
    let (setup, online) =
        if has_setup {
            let mut online = StepCost {
                step: "online".into(),
                ..StepCost::default()
            };
            for s in report.steps.iter().filter(|s| {
                !s.step.starts_with(SETUP_PREFIX) && !s.step.starts_with(OFFLINE_PREFIX)
            }) {
                online.absorb(s);
            }
            (Some(report.total_with_prefix(SETUP_PREFIX)), Some(online))
        } else {
            (None, None)
        };
    let offline = report
        .steps
        .iter()
        .any(|s| s.step.starts_with(OFFLINE_PREFIX))
        .then(|| report.total_with_prefix(OFFLINE_PREFIX));
    CostSummary {
        steps: report.steps.clone(),
        setup,
        offline,
        online,
        total: report.total("total"),
    }
}

/// The report as pretty JSON (a [`CostSummary`]).
pub fn to_json(report: &CostReport) -> String {
    // serialising plain numbers and strings cannot fail
    serde_json::to_string_pretty(&summarize(report)).unwrap_or_default()
}

/// A number with thousands separators: `1,048,576`.
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A byte count for people: `1.50 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

fn row(s: &StepCost) -> [String; 6] {
    [
        s.step.clone(),
        group(s.bytes_sent),
        group(s.bytes_received),
        format!("{}/{}", s.messages_sent, s.messages_received),
        s.rounds.to_string(),
        format!("{:.4}", s.seconds),
    ]
}

/// The report as an aligned text table: one row per step, then `setup` and `online`
/// (when there are `setup*` steps) and `total`.
pub fn render_table(report: &CostReport) -> String {
    let summary = summarize(report);
    let header = [
        "step".to_string(),
        "bytes sent".into(),
        "bytes received".into(),
        "messages (sent/recv)".into(),
        "rounds".into(),
        "seconds".into(),
    ];
    let body: Vec<[String; 6]> = summary.steps.iter().map(row).collect();
    let mut sums: Vec<[String; 6]> = vec![];
    if let (Some(setup), Some(online)) = (&summary.setup, &summary.online) {
        sums.push(row(setup));
        if let Some(offline) = &summary.offline {
            sums.push(row(offline));
        }
        sums.push(row(online));
    }
    sums.push(row(&summary.total));

    let mut width = [0usize; 6];
    for r in std::iter::once(&header).chain(&body).chain(&sums) {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |r: &[String; 6]| {
        let mut s = String::new();
        for (i, (cell, w)) in r.iter().zip(width).enumerate() {
            if i == 0 {
                s.push_str(&format!("{cell:<w$}"));
            } else {
                s.push_str(&format!("  {cell:>w$}"));
            }
        }
        s.push('\n');
        s
    };
    let rule = format!("{}\n", "-".repeat(width.iter().sum::<usize>() + 2 * 5));
    let mut out = line(&header);
    out.push_str(&rule);
    for r in &body {
        out.push_str(&line(r));
    }
    out.push_str(&rule);
    for r in &sums {
        out.push_str(&line(r));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, sent: u64, recv: u64, rounds: u64) -> StepCost {
        StepCost {
            step: name.into(),
            bytes_sent: sent,
            bytes_received: recv,
            messages_sent: 1,
            messages_received: 1,
            rounds,
            seconds: 0.5,
        }
    }

    #[test]
    fn setup_and_online_are_summed_apart() {
        let r = CostReport {
            steps: vec![
                step("setup/base-ot", 100, 200, 2),
                step("layer1", 1_234_567, 10, 2),
                step("setup/triples", 1, 2, 1),
            ],
        };
        let s = summarize(&r);
        let setup = s.setup.clone().unwrap();
        let online = s.online.clone().unwrap();
        assert_eq!(
            (setup.bytes_sent, setup.bytes_received, setup.rounds),
            (101, 202, 3)
        );
        assert_eq!(
            (online.step.as_str(), online.bytes_sent),
            ("online", 1_234_567)
        );
        assert_eq!(s.total.bytes_sent, 1_234_668);
        let t = render_table(&r);
        let lines: Vec<&str> = t.lines().collect();
        // header, rule, 3 steps, rule, setup, online, total
        assert_eq!(lines.len(), 9);
        assert!(lines[3].starts_with("layer1") && lines[3].contains("1,234,567"));
        assert!(lines[6].starts_with("setup "));
        assert!(lines[8].starts_with("total"));
        let widths: Vec<usize> = lines.iter().map(|l| l.chars().count()).collect();
        assert!(
            widths.iter().all(|&w| w == widths[0]),
            "aligned: {widths:?}"
        );
        let json: CostSummary = serde_json::from_str(&to_json(&r)).unwrap();
        assert_eq!(json, s);
    }

    #[test]
    fn without_setup_steps_only_the_total_is_added() {
        let r = CostReport {
            steps: vec![step("echo/1KiB", 1024, 1024, 2)],
        };
        let s = summarize(&r);
        assert!(s.setup.is_none() && s.online.is_none());
        assert_eq!(render_table(&r).lines().count(), 5);
        assert_eq!(render_table(&CostReport::default()).lines().count(), 4);
    }

    #[test]
    fn numbers_are_grouped_and_humanised() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1_048_576), "1,048,576");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(3 << 20), "3.00 MiB");
    }
}
