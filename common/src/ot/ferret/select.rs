//! Choosing the core OT at run time: [`OtKind`] names it, [`CoreOt`] holds either and
//! implements [`RandomCot`] by delegation, so one session type serves both.

use rand::{CryptoRng, Rng};

use super::super::iknp::Iknp;
use super::super::{Block, CotBatch, OtError, Party, RandomCot};
use super::Ferret;
use crate::channel::Channel;

/// Which core random-COT extension a session runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum OtKind {
    /// IKNP/ALSZ: 128 bits per COT, cheap setup
    Iknp,
    /// Ferret silent OT: about 0.45 bits per COT, setup of about 3 MB; the default
    #[default]
    Ferret,
}

impl OtKind {
    /// The name used in reports (`"iknp"`, `"ferret"`).
    pub fn name(self) -> &'static str {
        match self {
            OtKind::Iknp => "iknp",
            OtKind::Ferret => "ferret",
        }
    }
}

/// A core OT chosen at run time.
#[derive(Debug)]
pub enum CoreOt {
    /// IKNP/ALSZ (boxed, as both states are large)
    Iknp(Box<Iknp>),
    /// Ferret
    Ferret(Box<Ferret>),
}

impl CoreOt {
    /// Sets up the chosen core OT in both directions (both parties pass the same kind).
    pub fn setup<R: Rng + CryptoRng + ?Sized>(
        ch: &mut dyn Channel,
        party: Party,
        kind: OtKind,
        rng: &mut R,
    ) -> Result<Self, OtError> {
        Ok(match kind {
            OtKind::Iknp => CoreOt::Iknp(Box::new(Iknp::setup(ch, party, rng)?)),
            OtKind::Ferret => CoreOt::Ferret(Box::new(Ferret::setup(ch, party, rng)?)),
        })
    }

    /// Which kind this is.
    pub fn kind(&self) -> OtKind {
        match self {
            CoreOt::Iknp(_) => OtKind::Iknp,
            CoreOt::Ferret(_) => OtKind::Ferret,
        }
    }

    /// The public session identifier fixed by the base OTs.
    pub fn session_id(&self) -> [u8; 32] {
        match self {
            CoreOt::Iknp(c) => c.session_id(),
            CoreOt::Ferret(c) => c.session_id(),
        }
    }

    fn inner(&self) -> &dyn RandomCot {
        match self {
            CoreOt::Iknp(c) => c.as_ref(),
            CoreOt::Ferret(c) => c.as_ref(),
        }
    }

    fn inner_mut(&mut self) -> &mut dyn RandomCot {
        match self {
            CoreOt::Iknp(c) => c.as_mut(),
            CoreOt::Ferret(c) => c.as_mut(),
        }
    }
}

impl RandomCot for CoreOt {
    fn delta(&self) -> Block {
        self.inner().delta()
    }

    fn extend(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        n_recv: usize,
    ) -> Result<CotBatch, OtError> {
        self.inner_mut().extend(ch, n_send, n_recv)
    }

    fn split_extend(&self) -> bool {
        self.inner().split_extend()
    }

    fn extend_send(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        n_recv: usize,
    ) -> Result<(), OtError> {
        self.inner_mut().extend_send(ch, n_send, n_recv)
    }

    fn extend_recv(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        n_recv: usize,
    ) -> Result<CotBatch, OtError> {
        self.inner_mut().extend_recv(ch, n_send, n_recv)
    }

    fn extend_into(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        n_recv: usize,
        out: &mut CotBatch,
    ) -> Result<(), OtError> {
        self.inner_mut().extend_into(ch, n_send, n_recv, out)
    }

    fn extend_send_into(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        n_recv: usize,
        out: &mut CotBatch,
    ) -> Result<(), OtError> {
        self.inner_mut().extend_send_into(ch, n_send, n_recv, out)
    }

    fn extend_recv_into(
        &mut self,
        ch: &mut dyn Channel,
        n_send: usize,
        n_recv: usize,
        out: &mut CotBatch,
    ) -> Result<(), OtError> {
        self.inner_mut().extend_recv_into(ch, n_send, n_recv, out)
    }

    fn extend_cost(&self, n_send: usize, n_recv: usize) -> (usize, usize) {
        self.inner().extend_cost(n_send, n_recv)
    }

    fn name(&self) -> &'static str {
        self.inner().name()
    }
}
