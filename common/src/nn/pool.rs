//! The public pool: the labels the server's model gives on a fixed public slice of the
//! MNIST test set, bound to the model by a digest. Clients draw their T public rows from it
//! (Fusion's check (a)) after verifying the digest against the model digest the server
//! announces.
//!
//! pool digest = BLAKE3 (derive-key mode, context `"fusion 2025-11 public pool v1"`) over
//! the model digest (32 bytes), the pool size n (u64 LE), the n indices (u32 LE each) and
//! the n labels (u32 LE each).

use super::model::ModelDigest;
use serde::{Deserialize, Serialize};

/// BLAKE3 key-derivation context of pool digests.
const POOL_DIGEST_CONTEXT: &str = "fusion 2025-11 public pool v1";

/// The first test image of the MNIST public pool.
pub const MNIST_POOL_START: usize = 0;
/// The number of MNIST test images in the public pool (indices 0..1000); the model's
/// evaluation figures use the rest (1000..10000).
pub const MNIST_POOL_SIZE: usize = 1000;

/// Errors of public-pool construction and verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// Indices and labels differ in number.
    #[error("public pool: {indices} indices but {labels} labels")]
    LengthMismatch {
        /// number of indices
        indices: usize,
        /// number of labels
        labels: usize,
    },
    /// An index occurs twice.
    #[error("public pool: index {index} occurs twice")]
    DuplicateIndex {
        /// the index
        index: u32,
    },
    /// The pool's digest does not bind the given model digest, indices and labels.
    #[error("public pool digest mismatch: pool says {stored}, expected {computed}")]
    DigestMismatch {
        /// the digest carried by the pool
        stored: String,
        /// the digest of (model digest, indices, labels)
        computed: String,
    },
}

super::digest::hex_digest! {
    /// The 32-byte pool digest, lowercase hex when shown or serialised.
    PoolDigest
}

/// The public pool: test-set indices, the model's (fixed-point) label for each, and the
/// digest binding them to the model digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicPool {
    /// Indices into the MNIST test set (t10k).
    pub indices: Vec<u32>,
    /// The model's label for each index (the label the secure protocol outputs).
    pub labels: Vec<u32>,
    /// Digest of (model digest, indices, labels).
    pub digest: PoolDigest,
}

impl PublicPool {
    /// A pool for the model with digest `model`, with its digest computed.
    pub fn new(
        model: &ModelDigest,
        indices: Vec<u32>,
        labels: Vec<u32>,
    ) -> Result<Self, PoolError> {
        check_shape(&indices, &labels)?;
        let digest = Self::compute_digest(model, &indices, &labels);
        Ok(Self {
            indices,
            labels,
            digest,
        })
    }

    /// The digest binding a model digest, indices and labels (see the module doc).
    pub fn compute_digest(model: &ModelDigest, indices: &[u32], labels: &[u32]) -> PoolDigest {
        let mut h = blake3::Hasher::new_derive_key(POOL_DIGEST_CONTEXT);
        h.update(model.as_bytes());
        h.update(&(indices.len() as u64).to_le_bytes());
        for i in indices {
            h.update(&i.to_le_bytes());
        }
        for l in labels {
            h.update(&l.to_le_bytes());
        }
        PoolDigest(*h.finalize().as_bytes())
    }

    /// Checks (client side) that the pool is well formed and that its digest binds the
    /// announced model digest, its indices and its labels.
    pub fn verify(&self, model: &ModelDigest) -> Result<(), PoolError> {
        check_shape(&self.indices, &self.labels)?;
        let computed = Self::compute_digest(model, &self.indices, &self.labels);
        // Not secret: a plain comparison is fine.
        if computed != self.digest {
            return Err(PoolError::DigestMismatch {
                stored: self.digest.to_hex(),
                computed: computed.to_hex(),
            });
        }
        Ok(())
    }

    /// Number of pool entries.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// (test-set index, label) pairs.
    pub fn entries(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.indices
            .iter()
            .copied()
            .zip(self.labels.iter().copied())
    }
}

fn check_shape(indices: &[u32], labels: &[u32]) -> Result<(), PoolError> {
    if indices.len() != labels.len() {
        return Err(PoolError::LengthMismatch {
            indices: indices.len(),
            labels: labels.len(),
        });
    }
    let mut seen = std::collections::HashSet::with_capacity(indices.len());
    for &i in indices {
        if !seen.insert(i) {
            return Err(PoolError::DuplicateIndex { index: i });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_binds_model_indices_and_labels() {
        let m = ModelDigest([7; 32]);
        let pool = PublicPool::new(&m, vec![0, 1, 2], vec![7, 2, 1]).unwrap();
        assert_eq!(pool.verify(&m), Ok(()));
        assert!(matches!(
            pool.verify(&ModelDigest([8; 32])),
            Err(PoolError::DigestMismatch { .. })
        ));
        let mut p = pool.clone();
        p.labels[1] = 3;
        assert!(matches!(
            p.verify(&m),
            Err(PoolError::DigestMismatch { .. })
        ));
        let mut p = pool.clone();
        p.indices[2] = 5;
        assert!(matches!(
            p.verify(&m),
            Err(PoolError::DigestMismatch { .. })
        ));
        let mut p = pool.clone();
        p.labels.pop();
        assert_eq!(
            p.verify(&m),
            Err(PoolError::LengthMismatch {
                indices: 3,
                labels: 2
            })
        );
        assert_eq!(
            PublicPool::new(&m, vec![1, 1], vec![0, 0]),
            Err(PoolError::DuplicateIndex { index: 1 })
        );
        // The JSON form round-trips and is checked on verify.
        let json = serde_json::to_string(&pool).unwrap();
        let back: PublicPool = serde_json::from_str(&json).unwrap();
        assert_eq!(back, pool);
        assert_eq!(back.verify(&m), Ok(()));
        assert_eq!(
            pool.entries().collect::<Vec<_>>(),
            vec![(0, 7), (1, 2), (2, 1)]
        );
    }
}
