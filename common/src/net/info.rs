//! The service's public description, as both parties see it, checked while decoding.
//!
//! These are the typed forms of `ModelInfo` and `PublicPool` in `proto/fusion.proto`:
//! what the server announces (model architecture, ring and scale, backends, output
//! policy, claimed accuracy, public pool and digests, limits, the caller's budget).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::pb;

/// Longest name or string field accepted from the peer.
const MAX_NAME: usize = 256;
/// Most dimensions in a shape.
const MAX_DIMS: usize = 8;
/// Most layers in an architecture.
const MAX_LAYERS: usize = 1024;
/// Most bytes in a digest.
const MAX_DIGEST: usize = 64;
/// Most backends announced.
const MAX_BACKENDS: usize = 64;
/// Most entries in a public pool.
pub const MAX_POOL: usize = 100_000;

/// A reply from the peer that does not describe a valid service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InfoError {
    /// A required field is missing.
    #[error("missing field {0}")]
    Missing(&'static str),
    /// A field out of its range.
    #[error("field {field} out of range: {detail}")]
    OutOfRange {
        /// which field
        field: &'static str,
        /// what is wrong
        detail: String,
    },
}

fn out_of_range(field: &'static str, detail: impl Into<String>) -> InfoError {
    InfoError::OutOfRange {
        field,
        detail: detail.into(),
    }
}

/// What may leave the protocol for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputMode {
    /// the top-1 label of each row only (argmax inside the protocol)
    Labels,
    /// the logits (the undefended setting)
    Logits,
}

impl OutputMode {
    /// The wire value.
    pub fn to_pb(self) -> pb::OutputMode {
        match self {
            OutputMode::Labels => pb::OutputMode::Labels,
            OutputMode::Logits => pb::OutputMode::Logits,
        }
    }

    /// From the wire value; `None` for unspecified, an error for unknown numbers.
    pub fn from_pb(v: i32) -> Result<Option<Self>, InfoError> {
        match pb::OutputMode::try_from(v) {
            Ok(pb::OutputMode::Unspecified) => Ok(None),
            Ok(pb::OutputMode::Labels) => Ok(Some(OutputMode::Labels)),
            Ok(pb::OutputMode::Logits) => Ok(Some(OutputMode::Logits)),
            Err(_) => Err(out_of_range("output", format!("unknown mode {v}"))),
        }
    }
}

impl fmt::Display for OutputMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutputMode::Labels => "labels",
            OutputMode::Logits => "logits",
        })
    }
}

impl FromStr for OutputMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "labels" => Ok(OutputMode::Labels),
            "logits" => Ok(OutputMode::Logits),
            other => Err(format!("unknown output mode {other:?} (labels|logits)")),
        }
    }
}

/// One layer of the public architecture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// e.g. `dense`, `relu`
    pub kind: String,
    /// shape of the layer's input
    pub input_shape: Vec<u64>,
    /// shape of the layer's output
    pub output_shape: Vec<u64>,
}

/// The model's public architecture.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Architecture {
    /// shape of one input row
    pub input_shape: Vec<u64>,
    /// the layers in order
    pub layers: Vec<LayerInfo>,
    /// shape of one output row (logits)
    pub output_shape: Vec<u64>,
}

/// The served model's public description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    /// a name for people
    pub name: String,
    /// layers and shapes
    pub architecture: Architecture,
    /// l: the ring is Z_{2^l}
    pub ring_bits: u32,
    /// f: fixed-point scale 2^f
    pub scale_bits: u32,
    /// the accuracy the owner claims, in [0, 1]
    pub claimed_accuracy: f64,
    /// how many test rows the claim was measured on
    pub accuracy_samples: u64,
    /// digest binding the served weights
    #[serde(with = "hex_bytes")]
    pub model_digest: Vec<u8>,
    /// the public pool's dataset name
    pub pool_dataset: String,
    /// entries in the public pool
    pub pool_size: u64,
    /// digest of the public pool's (index, label) pairs
    #[serde(with = "hex_bytes")]
    pub pool_digest: Vec<u8>,
}

/// A client's budget, in rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Budget {
    /// no limit
    Unlimited,
    /// `remaining` of `limit` rows left
    Rows {
        /// rows per client certificate
        limit: u64,
        /// rows still available
        remaining: u64,
    },
}

impl Budget {
    /// Rows still available (`u64::MAX` when unlimited).
    pub fn remaining(&self) -> u64 {
        match self {
            Budget::Unlimited => u64::MAX,
            Budget::Rows { remaining, .. } => *remaining,
        }
    }

    /// The wire form.
    pub fn to_pb(self) -> pb::Budget {
        match self {
            Budget::Unlimited => pb::Budget {
                unlimited: true,
                limit_rows: 0,
                remaining_rows: 0,
            },
            Budget::Rows { limit, remaining } => pb::Budget {
                unlimited: false,
                limit_rows: limit,
                remaining_rows: remaining,
            },
        }
    }

    /// From the wire form, checked.
    pub fn from_pb(b: Option<pb::Budget>) -> Result<Self, InfoError> {
        let b = b.ok_or(InfoError::Missing("budget"))?;
        if b.unlimited {
            return Ok(Budget::Unlimited);
        }
        if b.remaining_rows > b.limit_rows {
            return Err(out_of_range(
                "budget",
                format!("{} remaining of {}", b.remaining_rows, b.limit_rows),
            ));
        }
        Ok(Budget::Rows {
            limit: b.limit_rows,
            remaining: b.remaining_rows,
        })
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Unlimited => f.write_str("unlimited"),
            Budget::Rows { limit, remaining } => write!(f, "{remaining} of {limit} rows"),
        }
    }
}

/// Everything `GetModelInfo` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// the server's version string
    pub server_version: String,
    /// the model, if one is loaded
    pub model: Option<ModelSummary>,
    /// backends this server runs
    pub backends: Vec<String>,
    /// what leaves the protocol
    pub output: OutputMode,
    /// largest batch one session may declare
    pub max_rows: u64,
    /// the caller's remaining budget
    pub budget: Budget,
    /// payload bytes per frame the server accepts
    pub max_frame_bytes: u64,
    /// bytes per message the server accepts
    pub max_message_bytes: u64,
    /// the caller's certificate subject as the server sees it
    pub client_subject: String,
}

fn check_name(field: &'static str, s: &str) -> Result<(), InfoError> {
    if s.len() > MAX_NAME {
        return Err(out_of_range(field, format!("{} bytes", s.len())));
    }
    Ok(())
}

fn check_digest(field: &'static str, d: &[u8]) -> Result<(), InfoError> {
    if d.len() > MAX_DIGEST {
        return Err(out_of_range(field, format!("{} bytes", d.len())));
    }
    Ok(())
}

fn check_shape(field: &'static str, s: &[u64]) -> Result<(), InfoError> {
    if s.len() > MAX_DIMS || s.iter().any(|&d| d == 0 || d > u64::from(u32::MAX)) {
        return Err(out_of_range(field, format!("{s:?}")));
    }
    Ok(())
}

impl Architecture {
    fn to_pb(&self) -> pb::Architecture {
        pb::Architecture {
            input_shape: self.input_shape.clone(),
            layers: self
                .layers
                .iter()
                .map(|l| pb::Layer {
                    kind: l.kind.clone(),
                    input_shape: l.input_shape.clone(),
                    output_shape: l.output_shape.clone(),
                })
                .collect(),
            output_shape: self.output_shape.clone(),
        }
    }

    fn from_pb(a: pb::Architecture) -> Result<Self, InfoError> {
        check_shape("architecture.input_shape", &a.input_shape)?;
        check_shape("architecture.output_shape", &a.output_shape)?;
        if a.layers.len() > MAX_LAYERS {
            return Err(out_of_range(
                "architecture.layers",
                format!("{} layers", a.layers.len()),
            ));
        }
        let layers = a
            .layers
            .into_iter()
            .map(|l| {
                check_name("layer.kind", &l.kind)?;
                check_shape("layer.input_shape", &l.input_shape)?;
                check_shape("layer.output_shape", &l.output_shape)?;
                Ok(LayerInfo {
                    kind: l.kind,
                    input_shape: l.input_shape,
                    output_shape: l.output_shape,
                })
            })
            .collect::<Result<Vec<_>, InfoError>>()?;
        Ok(Self {
            input_shape: a.input_shape,
            layers,
            output_shape: a.output_shape,
        })
    }
}

impl ModelSummary {
    /// The wire form.
    pub fn to_pb(&self) -> pb::ModelSummary {
        pb::ModelSummary {
            name: self.name.clone(),
            architecture: Some(self.architecture.to_pb()),
            ring_bits: self.ring_bits,
            scale_bits: self.scale_bits,
            claimed_accuracy: self.claimed_accuracy,
            accuracy_samples: self.accuracy_samples,
            model_digest: self.model_digest.clone(),
            pool_dataset: self.pool_dataset.clone(),
            pool_size: self.pool_size,
            pool_digest: self.pool_digest.clone(),
        }
    }

    /// From the wire form, checked.
    pub fn from_pb(m: pb::ModelSummary) -> Result<Self, InfoError> {
        check_name("model.name", &m.name)?;
        check_name("model.pool_dataset", &m.pool_dataset)?;
        check_digest("model.model_digest", &m.model_digest)?;
        check_digest("model.pool_digest", &m.pool_digest)?;
        if !(1..=64).contains(&m.ring_bits) {
            return Err(out_of_range("model.ring_bits", m.ring_bits.to_string()));
        }
        if m.scale_bits >= m.ring_bits {
            return Err(out_of_range(
                "model.scale_bits",
                format!("f = {} with l = {}", m.scale_bits, m.ring_bits),
            ));
        }
        if !(0.0..=1.0).contains(&m.claimed_accuracy) {
            return Err(out_of_range(
                "model.claimed_accuracy",
                m.claimed_accuracy.to_string(),
            ));
        }
        if m.pool_size > MAX_POOL as u64 {
            return Err(out_of_range("model.pool_size", m.pool_size.to_string()));
        }
        let architecture = Architecture::from_pb(
            m.architecture
                .ok_or(InfoError::Missing("model.architecture"))?,
        )?;
        Ok(Self {
            name: m.name,
            architecture,
            ring_bits: m.ring_bits,
            scale_bits: m.scale_bits,
            claimed_accuracy: m.claimed_accuracy,
            accuracy_samples: m.accuracy_samples,
            model_digest: m.model_digest,
            pool_dataset: m.pool_dataset,
            pool_size: m.pool_size,
            pool_digest: m.pool_digest,
        })
    }
}

/// The dataset the model module's public pool indexes (the MNIST test set, t10k; see
/// `crate::nn` pool docs).
pub const MNIST_POOL_DATASET: &str = "mnist-t10k";

fn shape(s: &[usize]) -> Vec<u64> {
    s.iter().map(|&d| d as u64).collect()
}

impl Architecture {
    /// The public part of a model architecture.
    pub fn from_nn(a: &crate::nn::Architecture) -> Self {
        let layers: Vec<LayerInfo> = a
            .layers()
            .iter()
            .enumerate()
            .map(|(i, l)| LayerInfo {
                kind: l.kind().to_owned(),
                input_shape: shape(a.layer_input_shape(i).unwrap_or_default()),
                output_shape: shape(a.layer_output_shape(i).unwrap_or_default()),
            })
            .collect();
        let output_shape = layers
            .last()
            .map_or_else(|| shape(a.input_shape()), |l| l.output_shape.clone());
        Self {
            input_shape: shape(a.input_shape()),
            layers,
            output_shape,
        }
    }
}

impl ModelSummary {
    /// The public description of a loaded model: architecture, l and f, the claimed
    /// accuracy (0 with `accuracy_samples = 0` when the file records no evaluation), the
    /// digests, and the public pool's size (0 and an empty digest when it has none).
    pub fn from_model(name: &str, m: &crate::nn::Model) -> Self {
        let fixed = m.fixed_point();
        let (claimed_accuracy, accuracy_samples) = match m.evaluation() {
            Some(e) => (e.claimed_accuracy(), e.heldout.images as u64),
            None => (0.0, 0),
        };
        let (pool_size, pool_digest) = match m.public_pool() {
            Some(p) => (p.len() as u64, p.digest.as_bytes().to_vec()),
            None => (0, vec![]),
        };
        Self {
            name: name.to_owned(),
            architecture: Architecture::from_nn(m.architecture()),
            ring_bits: fixed.ring_bits(),
            scale_bits: fixed.frac_bits(),
            claimed_accuracy,
            accuracy_samples,
            model_digest: m.digest().as_bytes().to_vec(),
            pool_dataset: MNIST_POOL_DATASET.to_owned(),
            pool_size,
            pool_digest,
        }
    }
}

impl ServiceInfo {
    /// The wire form.
    pub fn to_pb(&self) -> pb::ModelInfo {
        pb::ModelInfo {
            server_version: self.server_version.clone(),
            model: self.model.as_ref().map(ModelSummary::to_pb),
            backends: self.backends.clone(),
            output: self.output.to_pb() as i32,
            max_rows: self.max_rows,
            budget: Some(self.budget.to_pb()),
            max_frame_bytes: self.max_frame_bytes,
            max_message_bytes: self.max_message_bytes,
            client_subject: self.client_subject.clone(),
        }
    }

    /// From the wire form, checked.
    pub fn from_pb(m: pb::ModelInfo) -> Result<Self, InfoError> {
        check_name("server_version", &m.server_version)?;
        check_name("client_subject", &m.client_subject)?;
        if m.backends.len() > MAX_BACKENDS {
            return Err(out_of_range("backends", format!("{}", m.backends.len())));
        }
        for b in &m.backends {
            check_name("backends", b)?;
        }
        let output = OutputMode::from_pb(m.output)?.ok_or(InfoError::Missing("output"))?;
        Ok(Self {
            server_version: m.server_version,
            model: m.model.map(ModelSummary::from_pb).transpose()?,
            backends: m.backends,
            output,
            max_rows: m.max_rows,
            budget: Budget::from_pb(m.budget)?,
            max_frame_bytes: m.max_frame_bytes,
            max_message_bytes: m.max_message_bytes,
            client_subject: m.client_subject,
        })
    }
}

/// One entry of the public pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolEntry {
    /// index into the public dataset
    pub index: u32,
    /// the served model's label on it
    pub label: u32,
}

/// The public pool: samples whose results the client knows (see DESIGN.md).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PublicPool {
    /// dataset the indices refer to, e.g. `mnist-test`
    pub dataset: String,
    /// (index, label) pairs
    pub entries: Vec<PoolEntry>,
    /// the digest the server published
    #[serde(with = "hex_bytes")]
    pub digest: Vec<u8>,
}

impl PublicPool {
    /// The wire form.
    pub fn to_pb(&self) -> pb::PublicPool {
        pb::PublicPool {
            dataset: self.dataset.clone(),
            entries: self
                .entries
                .iter()
                .map(|e| pb::PoolEntry {
                    index: e.index,
                    label: e.label,
                })
                .collect(),
            digest: self.digest.clone(),
        }
    }

    /// The model module's form of the pool (for [`crate::nn::PublicPool::verify`]).
    pub fn to_nn(&self) -> Result<crate::nn::PublicPool, InfoError> {
        let digest: [u8; 32] = self
            .digest
            .as_slice()
            .try_into()
            .map_err(|_| out_of_range("pool.digest", format!("{} bytes", self.digest.len())))?;
        Ok(crate::nn::PublicPool {
            indices: self.entries.iter().map(|e| e.index).collect(),
            labels: self.entries.iter().map(|e| e.label).collect(),
            digest: crate::nn::PoolDigest(digest),
        })
    }

    /// From the model module's form.
    pub fn from_nn(dataset: &str, pool: &crate::nn::PublicPool) -> Self {
        Self {
            dataset: dataset.to_owned(),
            entries: pool
                .entries()
                .map(|(index, label)| PoolEntry { index, label })
                .collect(),
            digest: pool.digest.as_bytes().to_vec(),
        }
    }

    /// From the wire form, checked for size (the digest is checked by the client
    /// against the model's, with [`crate::nn::PublicPool::verify`]).
    pub fn from_pb(p: pb::PublicPool) -> Result<Self, InfoError> {
        check_name("pool.dataset", &p.dataset)?;
        check_digest("pool.digest", &p.digest)?;
        if p.entries.len() > MAX_POOL {
            return Err(out_of_range("pool.entries", p.entries.len().to_string()));
        }
        Ok(Self {
            dataset: p.dataset,
            entries: p
                .entries
                .into_iter()
                .map(|e| PoolEntry {
                    index: e.index,
                    label: e.label,
                })
                .collect(),
            digest: p.digest,
        })
    }
}

/// Serde for digests: lowercase hex strings.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> ModelSummary {
        ModelSummary {
            name: "m".into(),
            architecture: Architecture {
                input_shape: vec![784],
                layers: vec![LayerInfo {
                    kind: "dense".into(),
                    input_shape: vec![784],
                    output_shape: vec![10],
                }],
                output_shape: vec![10],
            },
            ring_bits: 37,
            scale_bits: 12,
            claimed_accuracy: 0.98,
            accuracy_samples: 9000,
            model_digest: vec![1; 32],
            pool_dataset: "mnist-test".into(),
            pool_size: 1000,
            pool_digest: vec![2; 32],
        }
    }

    fn info() -> ServiceInfo {
        ServiceInfo {
            server_version: "0.1.0".into(),
            model: Some(summary()),
            backends: vec!["echo".into()],
            output: OutputMode::Labels,
            max_rows: 256,
            budget: Budget::Rows {
                limit: 100,
                remaining: 40,
            },
            max_frame_bytes: 1 << 20,
            max_message_bytes: 1 << 30,
            client_subject: "CN=client".into(),
        }
    }

    #[test]
    fn service_info_round_trips_through_the_wire_form_and_json() {
        let i = info();
        assert_eq!(ServiceInfo::from_pb(i.to_pb()).unwrap(), i);
        let j = serde_json::to_string(&i).unwrap();
        assert!(j.contains("\"model_digest\":\"0101"));
        assert_eq!(serde_json::from_str::<ServiceInfo>(&j).unwrap(), i);
        let none = ServiceInfo {
            model: None,
            budget: Budget::Unlimited,
            ..info()
        };
        assert_eq!(ServiceInfo::from_pb(none.to_pb()).unwrap(), none);
    }

    #[test]
    fn out_of_range_fields_are_refused() {
        let mut p = info().to_pb();
        p.output = 7;
        assert!(ServiceInfo::from_pb(p).is_err());
        let mut p = info().to_pb();
        p.output = 0;
        assert_eq!(ServiceInfo::from_pb(p), Err(InfoError::Missing("output")));
        let mut p = info().to_pb();
        p.budget = None;
        assert!(ServiceInfo::from_pb(p).is_err());
        let mut p = info().to_pb();
        p.budget = Some(pb::Budget {
            unlimited: false,
            limit_rows: 1,
            remaining_rows: 2,
        });
        assert!(ServiceInfo::from_pb(p).is_err());
        type Spoil = Box<dyn Fn(&mut pb::ModelSummary)>;
        let bad_models: Vec<Spoil> = vec![
            Box::new(|m| m.ring_bits = 65),
            Box::new(|m| m.ring_bits = 0),
            Box::new(|m| m.scale_bits = 37),
            Box::new(|m| m.claimed_accuracy = 1.5),
            Box::new(|m| m.claimed_accuracy = f64::NAN),
            Box::new(|m| m.model_digest = vec![0; 65]),
            Box::new(|m| m.architecture = None),
            Box::new(|m| m.name = "x".repeat(300)),
            Box::new(|m| {
                if let Some(a) = m.architecture.as_mut() {
                    a.input_shape = vec![0];
                }
            }),
        ];
        for (i, f) in bad_models.iter().enumerate() {
            let mut p = info().to_pb();
            if let Some(m) = p.model.as_mut() {
                f(m);
            }
            assert!(ServiceInfo::from_pb(p).is_err(), "case {i}");
        }
    }

    #[test]
    fn pool_round_trips_and_is_bounded() {
        let pool = PublicPool {
            dataset: "mnist-test".into(),
            entries: vec![PoolEntry { index: 5, label: 3 }],
            digest: vec![9; 32],
        };
        assert_eq!(PublicPool::from_pb(pool.to_pb()).unwrap(), pool);
        let mut big = pool.to_pb();
        big.entries = vec![pb::PoolEntry::default(); MAX_POOL + 1];
        assert!(PublicPool::from_pb(big).is_err());
    }

    #[test]
    fn output_mode_parses() {
        assert_eq!("labels".parse::<OutputMode>(), Ok(OutputMode::Labels));
        assert_eq!("logits".parse::<OutputMode>(), Ok(OutputMode::Logits));
        assert!("all".parse::<OutputMode>().is_err());
        assert_eq!(OutputMode::from_pb(0), Ok(None));
    }
}
