//! The small model (784-32-10) served to the Fusion and trust-store tests, honestly or by
//! one of the cheating servers (shared by tests/tests/fusion.rs and trust.rs).

use std::path::Path;

use fusion_common::net::info::{MNIST_POOL_DATASET, PublicPool};
use fusion_server::adversary::{AdversaryRunner, AdversarySpec};
use fusion_server::runner::Registry;
use fusion_server::state::{Policy, ServedModel, ServerState, SessionLimits};
use fusion_tests::TestServer;

/// The small model's file, relative to the workspace.
pub(crate) const SMALL: &str = "models/mnist-784-32-10.safetensors";

/// The small model; with `without = Some(c)`, its public pool without the entries
/// labelled `c` (so a server answering `c` everywhere fails every public row).
pub(crate) fn served(without: Option<usize>) -> ServedModel {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(SMALL);
    let mut s = ServedModel::load(&path).expect("the small model");
    if let Some(c) = without {
        let p = s.model.public_pool().expect("a pool").clone();
        let (indices, labels): (Vec<u32>, Vec<u32>) =
            p.entries().filter(|(_, l)| *l as usize != c).unzip();
        let sub = fusion_common::nn::PublicPool::new(s.model.digest(), indices, labels)
            .expect("a sub-pool");
        s.pool = PublicPool::from_nn(MNIST_POOL_DATASET, &sub);
        s.summary.pool_size = sub.len() as u64;
        s.summary.pool_digest = sub.digest.as_bytes().to_vec();
    }
    s
}

/// Serves `model` under `policy`: honestly, or as the cheating server `adversary`
/// (an [`AdversarySpec`], e.g. `constant@0`).
pub(crate) async fn start(
    model: ServedModel,
    adversary: Option<&str>,
    policy: Policy,
) -> TestServer {
    let registry = match adversary {
        None => Registry::with_builtins(),
        Some(a) => {
            let spec: AdversarySpec = a.parse().expect("a strategy");
            AdversaryRunner::new(spec, &model.model, None)
                .expect("an adversary")
                .registry()
        }
    };
    let state = ServerState::new(Some(model), policy, SessionLimits::default());
    TestServer::start_with_state(state, registry).await
}
