//! The session handshake: the client's `Start` and the server's `Accepted`, typed and
//! checked while decoding.

use std::collections::BTreeMap;

use super::frame::FrameLimits;
use super::info::{Budget, InfoError, OutputMode};
use super::pb;

/// The session protocol version this code speaks.
pub const SESSION_VERSION: u32 = 1;
/// Most parameters in a start or accepted frame.
pub const MAX_PARAMS: usize = 64;
/// Longest parameter key.
pub const MAX_PARAM_KEY: usize = 64;
/// Longest parameter value.
pub const MAX_PARAM_VALUE: usize = 1024;
/// Longest backend name.
pub const MAX_BACKEND_NAME: usize = 32;

/// A start or accepted frame that is not well formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A session protocol version this code does not speak.
    #[error("session protocol version {got} (this side speaks {SESSION_VERSION})")]
    Version {
        /// the version received
        got: u32,
    },
    /// A backend name that is empty, too long or has characters other than `[a-z0-9_-]`.
    #[error("invalid backend name {0:?}")]
    BackendName(String),
    /// Too many parameters, or one too long.
    #[error("invalid parameters: {0}")]
    Params(String),
    /// Frame or message limits outside the allowed range.
    #[error("invalid limits: {0}")]
    Limits(String),
    /// An unknown output mode, budget or other field.
    #[error(transparent)]
    Field(#[from] InfoError),
}

/// What the client asks for in its first frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStart {
    /// the backend to run, e.g. `echo`, `cheetah`
    pub backend: String,
    /// batch rows (charged against the budget)
    pub rows: u64,
    /// columns per row
    pub cols: u64,
    /// requested output mode; `None` takes the server's policy
    pub output: Option<OutputMode>,
    /// backend-specific parameters, declared in the open
    pub params: BTreeMap<String, String>,
}

impl SessionStart {
    /// A start for `backend` with no rows and no parameters.
    pub fn new(backend: impl Into<String>) -> Self {
        Self {
            backend: backend.into(),
            rows: 0,
            cols: 0,
            output: None,
            params: BTreeMap::new(),
        }
    }

    /// Sets the batch shape.
    pub fn with_batch(mut self, rows: u64, cols: u64) -> Self {
        self.rows = rows;
        self.cols = cols;
        self
    }

    /// Requests an output mode.
    pub fn with_output(mut self, output: OutputMode) -> Self {
        self.output = Some(output);
        self
    }

    /// Adds a parameter.
    pub fn with_param(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.insert(key.into(), value.into());
        self
    }

    /// The wire form, announcing this side's receive limits.
    pub fn to_pb(&self, recv: FrameLimits) -> pb::Start {
        pb::Start {
            version: SESSION_VERSION,
            backend: self.backend.clone(),
            rows: self.rows,
            cols: self.cols,
            output: self
                .output
                .map_or(pb::OutputMode::Unspecified, |o| o.to_pb()) as i32,
            params: self.params.clone().into_iter().collect(),
            max_frame_bytes: recv.frame_limit as u64,
            max_message_bytes: recv.max_message as u64,
        }
    }

    /// From the wire form, checked; also returns the client's receive limits.
    pub fn from_pb(s: pb::Start) -> Result<(Self, FrameLimits), StartError> {
        if s.version != SESSION_VERSION {
            return Err(StartError::Version { got: s.version });
        }
        check_backend(&s.backend)?;
        let params = check_params(s.params)?;
        let limits = limits(s.max_frame_bytes, s.max_message_bytes)?;
        Ok((
            Self {
                backend: s.backend,
                rows: s.rows,
                cols: s.cols,
                output: OutputMode::from_pb(s.output)?,
                params,
            },
            limits,
        ))
    }
}

/// The server's acceptance of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionAccepted {
    /// the server's number for this session (for logs on both sides)
    pub session_id: u64,
    /// the backend that runs
    pub backend: String,
    /// batch rows accepted
    pub rows: u64,
    /// columns per row
    pub cols: u64,
    /// the output mode in force
    pub output: OutputMode,
    /// the caller's budget after this batch was charged
    pub budget: Budget,
    /// parameters the server settled
    pub params: BTreeMap<String, String>,
}

impl SessionAccepted {
    /// The wire form, announcing the server's receive limits.
    pub fn to_pb(&self, recv: FrameLimits) -> pb::Accepted {
        pb::Accepted {
            session_id: self.session_id,
            backend: self.backend.clone(),
            rows: self.rows,
            cols: self.cols,
            output: self.output.to_pb() as i32,
            budget: Some(self.budget.to_pb()),
            max_frame_bytes: recv.frame_limit as u64,
            max_message_bytes: recv.max_message as u64,
            params: self.params.clone().into_iter().collect(),
        }
    }

    /// From the wire form, checked; also returns the server's receive limits.
    pub fn from_pb(a: pb::Accepted) -> Result<(Self, FrameLimits), StartError> {
        check_backend(&a.backend)?;
        let params = check_params(a.params)?;
        let limits = limits(a.max_frame_bytes, a.max_message_bytes)?;
        let output = OutputMode::from_pb(a.output)?.ok_or(InfoError::Missing("output"))?;
        Ok((
            Self {
                session_id: a.session_id,
                backend: a.backend,
                rows: a.rows,
                cols: a.cols,
                output,
                budget: Budget::from_pb(a.budget)?,
                params,
            },
            limits,
        ))
    }
}

fn check_backend(name: &str) -> Result<(), StartError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_BACKEND_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(StartError::BackendName(
            name.chars().take(MAX_BACKEND_NAME).collect(),
        ))
    }
}

fn check_params(
    params: std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>, StartError> {
    if params.len() > MAX_PARAMS {
        return Err(StartError::Params(format!(
            "{} parameters (at most {MAX_PARAMS})",
            params.len()
        )));
    }
    for (k, v) in &params {
        if k.is_empty() || k.len() > MAX_PARAM_KEY || v.len() > MAX_PARAM_VALUE {
            return Err(StartError::Params(format!(
                "key of {} bytes with a value of {} bytes",
                k.len(),
                v.len()
            )));
        }
    }
    Ok(params.into_iter().collect())
}

fn limits(frame: u64, message: u64) -> Result<FrameLimits, StartError> {
    let l = FrameLimits {
        frame_limit: usize::try_from(frame).unwrap_or(usize::MAX),
        max_message: usize::try_from(message).unwrap_or(usize::MAX),
    };
    l.validate().map_err(StartError::Limits)?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_and_accepted_round_trip() {
        let s = SessionStart::new("cheetah")
            .with_batch(10, 784)
            .with_output(OutputMode::Labels)
            .with_param("T", "20");
        let l = FrameLimits::default();
        assert_eq!(SessionStart::from_pb(s.to_pb(l)).unwrap(), (s, l));
        let a = SessionAccepted {
            session_id: 7,
            backend: "echo".into(),
            rows: 3,
            cols: 0,
            output: OutputMode::Logits,
            budget: Budget::Rows {
                limit: 10,
                remaining: 7,
            },
            params: BTreeMap::new(),
        };
        assert_eq!(SessionAccepted::from_pb(a.to_pb(l)).unwrap(), (a, l));
    }

    #[test]
    fn malformed_starts_are_named() {
        let good = SessionStart::new("echo").to_pb(FrameLimits::default());
        type Want = fn(&StartError) -> bool;
        let cases: Vec<(pb::Start, Want)> = vec![
            (pb::Start::default(), |e| {
                matches!(e, StartError::Version { got: 0 })
            }),
            (
                pb::Start {
                    backend: String::new(),
                    ..good.clone()
                },
                |e| matches!(e, StartError::BackendName(_)),
            ),
            (
                pb::Start {
                    backend: "Echo!".into(),
                    ..good.clone()
                },
                |e| matches!(e, StartError::BackendName(_)),
            ),
            (
                pb::Start {
                    max_frame_bytes: 10,
                    ..good.clone()
                },
                |e| matches!(e, StartError::Limits(_)),
            ),
            (
                pb::Start {
                    output: 9,
                    ..good.clone()
                },
                |e| matches!(e, StartError::Field(_)),
            ),
            (
                pb::Start {
                    params: [("k".to_string(), "v".repeat(MAX_PARAM_VALUE + 1))].into(),
                    ..good.clone()
                },
                |e| matches!(e, StartError::Params(_)),
            ),
        ];
        for (i, (start, want)) in cases.into_iter().enumerate() {
            let e = SessionStart::from_pb(start).unwrap_err();
            assert!(want(&e), "case {i}: {e}");
        }
    }
}
