//! The cost report as `infer --json` and `bench infer --json` print it: `setup` and
//! `online` totals and the per-step list, each step with its layer (the part of the
//! step name before `/`).

use fusion_common::channel::{CostReport, StepCost};
use fusion_common::cost::SETUP_PREFIX;
use serde::Serialize;

/// Totals of a phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PhaseCost {
    /// bytes this side sent
    pub bytes_sent: u64,
    /// bytes this side received
    pub bytes_received: u64,
    /// messages sent
    pub messages_sent: u64,
    /// messages received
    pub messages_received: u64,
    /// flights (direction changes)
    pub rounds: u64,
    /// wall time, seconds
    pub seconds: f64,
}

impl PhaseCost {
    fn add(&mut self, s: &StepCost) {
        self.bytes_sent += s.bytes_sent;
        self.bytes_received += s.bytes_received;
        self.messages_sent += s.messages_sent;
        self.messages_received += s.messages_received;
        self.rounds += s.rounds;
        self.seconds += s.seconds;
    }

    /// Bytes both ways.
    pub fn bytes_total(&self) -> u64 {
        self.bytes_sent + self.bytes_received
    }
}

/// One step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepJson {
    /// e.g. `layer1/linear`
    pub step: String,
    /// e.g. `layer1` (`setup`, `batch`, `output`)
    pub layer: String,
    /// bytes this side sent
    pub bytes_sent: u64,
    /// bytes this side received
    pub bytes_received: u64,
    /// messages sent
    pub messages_sent: u64,
    /// messages received
    pub messages_received: u64,
    /// flights that started in this step
    pub rounds: u64,
    /// wall time, seconds
    pub seconds: f64,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostJson {
    /// the `setup*` steps
    pub setup: PhaseCost,
    /// every other step
    pub online: PhaseCost,
    /// the steps in the order they first appeared
    pub steps: Vec<StepJson>,
}

/// The layer of a step: its name up to the first `/`.
pub fn layer_of(step: &str) -> &str {
    step.split('/').next().unwrap_or(step)
}

impl CostJson {
    /// From a counting channel's report.
    pub fn from_report(r: &CostReport) -> Self {
        let mut setup = PhaseCost::default();
        let mut online = PhaseCost::default();
        for s in &r.steps {
            if s.step.starts_with(SETUP_PREFIX) {
                setup.add(s);
            } else {
                online.add(s);
            }
        }
        let steps = r
            .steps
            .iter()
            .map(|s| StepJson {
                step: s.step.clone(),
                layer: layer_of(&s.step).to_owned(),
                bytes_sent: s.bytes_sent,
                bytes_received: s.bytes_received,
                messages_sent: s.messages_sent,
                messages_received: s.messages_received,
                rounds: s.rounds,
                seconds: s.seconds,
            })
            .collect();
        Self {
            setup,
            online,
            steps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_and_layers() {
        let st = |name: &str, b| StepCost {
            step: name.into(),
            bytes_sent: b,
            bytes_received: 2 * b,
            messages_sent: 1,
            messages_received: 1,
            rounds: 2,
            seconds: 0.25,
        };
        let r = CostReport {
            steps: vec![
                st("setup/he-keys", 10),
                st("setup/base-ot", 5),
                st("batch/header", 1),
                st("layer1/linear", 100),
            ],
        };
        let j = CostJson::from_report(&r);
        assert_eq!((j.setup.bytes_sent, j.setup.bytes_received), (15, 30));
        assert_eq!((j.online.bytes_sent, j.online.rounds), (101, 4));
        assert_eq!(j.online.bytes_total(), 303);
        assert_eq!(j.steps[3].layer, "layer1");
        assert_eq!(j.steps[0].layer, "setup");
        assert_eq!(layer_of("echo"), "echo");
        let v = serde_json::to_value(&j).unwrap();
        assert_eq!(v["online"]["bytes_received"], 202);
        assert_eq!(v["steps"][2]["step"], "batch/header");
    }
}
