//! The client's side of the diagnostic `echo` backend: send messages of chosen sizes,
//! check that each comes back unchanged. One cost-report step per message.

use fusion_common::channel::{Channel, ChannelError};
use fusion_common::cost::group;
use rand::RngCore;

/// An echo that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EchoError {
    /// The transport failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// A message came back different.
    #[error("the echo of a {size}-byte message differs from what was sent")]
    Mismatch {
        /// bytes in the message
        size: usize,
    },
}

/// Sends one random message of each size in `sizes` and checks its echo; the step of
/// each is `echo <size> B`.
pub fn echo_exchange(
    ch: &mut dyn Channel,
    sizes: &[usize],
    rng: &mut impl RngCore,
) -> Result<(), EchoError> {
    for &size in sizes {
        ch.set_step(&format!("echo {} B", group(size as u64)));
        let mut msg = vec![0u8; size];
        rng.fill_bytes(&mut msg);
        ch.send(&msg)?;
        let back = ch.recv()?;
        if back != msg {
            return Err(EchoError::Mismatch { size });
        }
    }
    Ok(())
}
