//! The cost report as `infer --json` and `bench infer --json` print it: `setup` and
//! `online` totals, the per-step list (each step with its layer, the part of the step
//! name before `/`) and the per-layer sums; [`render_tables`] prints the same for people
//! (per step and per layer, with setup, online and total rows). With a link profile,
//! [`LinkJson`] puts the measured time next to the model
//! `compute + flights x one-way delay + bytes / rate`.

use fusion_common::channel::{CostReport, StepCost};
use fusion_common::cost::{OFFLINE_PREFIX, SETUP_PREFIX, render_table};
use serde::Serialize;

use crate::link::LinkProfile;

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
    /// the `offline*` steps (a batch's preprocessing; zero without)
    pub offline: PhaseCost,
    /// every other step
    pub online: PhaseCost,
    /// the steps in the order they first appeared
    pub steps: Vec<StepJson>,
    /// the steps summed per layer, in the order the layers first appeared
    pub layers: Vec<StepCost>,
}

/// The layer of a step: its name up to the first `/`.
pub fn layer_of(step: &str) -> &str {
    step.split('/').next().unwrap_or(step)
}

impl CostJson {
    /// From a counting channel's report.
    pub fn from_report(r: &CostReport) -> Self {
        let mut setup = PhaseCost::default();
        let mut offline = PhaseCost::default();
        let mut online = PhaseCost::default();
        for s in &r.steps {
            if s.step.starts_with(SETUP_PREFIX) {
                setup.add(s);
            } else if s.step.starts_with(OFFLINE_PREFIX) {
                offline.add(s);
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
            offline,
            online,
            steps,
            layers: by_layer(r).steps,
        }
    }
}

/// The report's steps summed per layer (each named by its layer), in the order the
/// layers first appeared.
pub fn by_layer(r: &CostReport) -> CostReport {
    let mut out = CostReport::default();
    for s in &r.steps {
        out.merge(&CostReport {
            steps: vec![StepCost {
                step: layer_of(&s.step).to_owned(),
                ..s.clone()
            }],
        });
    }
    out
}

/// The cost tables every `infer`, `bench infer` and `demo` run ends with: one row per
/// protocol step, then one per layer, each closed by the setup, online and total rows.
pub fn render_tables(r: &CostReport) -> String {
    format!(
        "per protocol step\n{}\nper layer\n{}",
        render_table(r),
        render_table(&by_layer(r))
    )
}

/// One phase under a link profile: the measured time and the model's terms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PhaseModel {
    /// wall time through the emulated link, seconds
    pub measured_seconds: f64,
    /// the same phase's wall time with no link (see [`LinkJson::compute_from`]), seconds
    pub compute_seconds: f64,
    /// flights (direction changes) the client counted
    pub rounds: u64,
    /// payload bytes both ways
    pub bytes: u64,
    /// rounds x one-way delay, seconds
    pub latency_seconds: f64,
    /// bytes / rate, seconds
    pub transfer_seconds: f64,
    /// compute + latency + transfer, seconds
    pub model_seconds: f64,
    /// (measured - compute - transfer) / one-way delay: how many one-way delays the run
    /// actually waited for, to set against `rounds` (fewer when both parties send in the
    /// same flight: the client counts both directions, the wire carries them at once);
    /// null for a link without delay, and where the latency term is smaller than the
    /// compute term (then the compute term's noise swamps it)
    pub effective_flights: Option<f64>,
}

impl PhaseModel {
    /// The model for a phase measured through `link` (`measured`) and without (`compute`).
    pub fn new(link: &LinkProfile, measured: &PhaseCost, compute: &PhaseCost) -> Self {
        let latency = measured.rounds as f64 * link.delay.as_secs_f64();
        let transfer = link.serialisation(measured.bytes_total()).as_secs_f64();
        Self {
            measured_seconds: measured.seconds,
            compute_seconds: compute.seconds,
            rounds: measured.rounds,
            bytes: measured.bytes_total(),
            latency_seconds: latency,
            transfer_seconds: transfer,
            model_seconds: link.model_seconds(
                compute.seconds,
                measured.rounds,
                measured.bytes_total(),
            ),
            // Only where waiting dominates: otherwise the run-to-run noise of the compute
            // term swamps the delays (on a LAN this would print nonsense, even negatives).
            effective_flights: (link.delay.as_secs_f64() > 0.0 && latency >= compute.seconds).then(
                || (measured.seconds - compute.seconds - transfer) / link.delay.as_secs_f64(),
            ),
        }
    }
}

/// A run through the link emulator: the profile, the bytes on the wire next to the
/// payload, and per phase the measured time next to the model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkJson {
    /// `lan`, `wan`, `wan100` or `RATE_MBIT/DELAY_MS` as given
    pub profile: String,
    /// the rate per direction, Mbit/s
    pub rate_mbit: f64,
    /// the one-way delay, milliseconds
    pub one_way_delay_ms: f64,
    /// where the compute term comes from
    pub compute_from: String,
    /// bytes the relay carried client -> server during the session (TLS records: payload,
    /// gRPC and HTTP/2 framing, TLS record overhead, HTTP/2 control frames)
    pub wire_bytes_up: u64,
    /// bytes the relay carried server -> client during the session
    pub wire_bytes_down: u64,
    /// the protocol's payload bytes both ways (the counting channel's total)
    pub payload_bytes: u64,
    /// wire minus payload: TLS, HTTP/2 and gRPC framing, the session's start and end
    pub overhead_bytes: u64,
    /// the session set-up
    pub setup: PhaseModel,
    /// the rest (batches)
    pub online: PhaseModel,
}

impl LinkJson {
    /// From the link, the wire counters of the session and both runs' phase costs
    /// (`measured`: through the link; `compute`: without it).
    pub fn new(
        link: &LinkProfile,
        label: &str,
        compute_from: &str,
        wire: (u64, u64),
        measured: (&PhaseCost, &PhaseCost),
        compute: (&PhaseCost, &PhaseCost),
    ) -> Self {
        let payload = measured.0.bytes_total() + measured.1.bytes_total();
        Self {
            profile: label.to_owned(),
            rate_mbit: link.rate_bits_per_sec / 1e6,
            one_way_delay_ms: link.delay.as_secs_f64() * 1e3,
            compute_from: compute_from.to_owned(),
            wire_bytes_up: wire.0,
            wire_bytes_down: wire.1,
            payload_bytes: payload,
            overhead_bytes: (wire.0 + wire.1).saturating_sub(payload),
            setup: PhaseModel::new(link, measured.0, compute.0),
            online: PhaseModel::new(link, measured.1, compute.1),
        }
    }

    /// The text lines: measured against model per phase, and the wire bytes.
    pub fn render(&self) -> String {
        let mut s = format!(
            "link {} ({} Mbit/s each way, {} ms one way); compute = {}\n",
            self.profile, self.rate_mbit, self.one_way_delay_ms, self.compute_from
        );
        s.push_str(&format!(
            "    {:<7} {:>10} {:>10} {:>8} {:>14} {:>10} {:>10} {:>10} {:>11}\n",
            "phase",
            "measured",
            "model",
            "rounds",
            "bytes",
            "compute",
            "latency",
            "transfer",
            "eff.flights"
        ));
        for (name, p) in [("setup", &self.setup), ("online", &self.online)] {
            s.push_str(&format!(
                "    {:<7} {:>9.3}s {:>9.3}s {:>8} {:>14} {:>9.3}s {:>9.3}s {:>9.3}s {:>11}\n",
                name,
                p.measured_seconds,
                p.model_seconds,
                p.rounds,
                fusion_common::cost::group(p.bytes),
                p.compute_seconds,
                p.latency_seconds,
                p.transfer_seconds,
                p.effective_flights
                    .map_or_else(|| "-".into(), |f| format!("{f:.1}"))
            ));
        }
        s.push_str(&format!(
            "    wire {} B (up {}, down {}) = payload {} + TLS/HTTP2/gRPC overhead {} ({:.2}%)\n",
            fusion_common::cost::group(self.wire_bytes_up + self.wire_bytes_down),
            fusion_common::cost::group(self.wire_bytes_up),
            fusion_common::cost::group(self.wire_bytes_down),
            fusion_common::cost::group(self.payload_bytes),
            fusion_common::cost::group(self.overhead_bytes),
            100.0 * self.overhead_bytes as f64 / self.payload_bytes.max(1) as f64
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_model_terms_and_effective_flights() {
        let wan = LinkProfile::WAN;
        let phase = |rounds, bytes, seconds| PhaseCost {
            bytes_sent: bytes,
            rounds,
            seconds,
            ..PhaseCost::default()
        };
        // 10 flights at 40 ms = 0.4 s; 5 MB at 400 Mbit/s = 0.1 s
        let p = PhaseModel::new(&wan, &phase(10, 5_000_000, 0.9), &phase(10, 5_000_000, 0.2));
        assert!((p.latency_seconds - 0.4).abs() < 1e-12);
        assert!((p.transfer_seconds - 0.1).abs() < 1e-12);
        assert!((p.model_seconds - 0.7).abs() < 1e-12);
        // waited (0.9 - 0.2 - 0.1) / 0.04 = 15 one-way delays
        assert!((p.effective_flights.unwrap() - 15.0).abs() < 1e-9);
        // compute larger than the latency term: no estimate
        let q = PhaseModel::new(&wan, &phase(2, 0, 1.0), &phase(2, 0, 0.9));
        assert_eq!(q.effective_flights, None);
        let j = LinkJson::new(
            &wan,
            "wan",
            "test",
            (3_000_000, 2_100_000),
            (&phase(10, 5_000_000, 0.9), &phase(1, 0, 0.0)),
            (&phase(10, 5_000_000, 0.2), &phase(1, 0, 0.0)),
        );
        assert_eq!((j.payload_bytes, j.overhead_bytes), (5_000_000, 100_000));
        assert!(j.render().contains("overhead 100,000 (2.00%)"));
    }

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
        let layers: Vec<(&str, u64)> = j
            .layers
            .iter()
            .map(|l| (l.step.as_str(), l.bytes_sent))
            .collect();
        assert_eq!(layers, [("setup", 15), ("batch", 1), ("layer1", 100)]);
        assert_eq!(j.layers[0].rounds, 4);
        let t = render_tables(&r);
        assert!(t.contains("per protocol step") && t.contains("per layer"));
        assert!(t.lines().any(|l| l.starts_with("layer1/linear")));
        assert_eq!(layer_of("echo"), "echo");
        let v = serde_json::to_value(&j).unwrap();
        assert_eq!(v["online"]["bytes_received"], 202);
        assert_eq!(v["steps"][2]["step"], "batch/header");
    }
}
