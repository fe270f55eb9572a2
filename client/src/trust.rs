//! The client's trust store: servers this client has caught cheating (or that aborted a
//! batch after the client's inputs were in the protocol), which it refuses to run further
//! batches with (DESIGN, "What an abort can leak": a selective-failure abort leaks about
//! one bit; refusing the server afterwards bounds the leak to one bit per server).
//!
//! ```text
//! connect (TLS 1.3) -> the server's leaf certificate, as presented in the handshake
//! key = "blake3:" + hex(BLAKE3(leaf certificate DER))
//! store lists key?  yes -> TrustError::Distrusted (exit status 4), no session is started
//!                   no  -> the Fusion batch; a detection or a mid-protocol failure -> record key
//! ```
//!
//! The store is one JSON file, `distrusted.json`, in the directory given by
//! `--trust-store DIR` / `FUSION_TRUST_STORE`, by default `$XDG_STATE_HOME/fusion` or
//! `~/.local/state/fusion`. Writes go to a temporary file in that directory, then a
//! rename (atomic on POSIX). A file that does not parse is [`TrustError::Corrupt`], never
//! read as empty. `--trust-again` or `fusion-client trust reset SERVER` clear an entry.
//! `fusion-client audit` neither reads nor writes the store (it talks to cheating
//! servers on purpose).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use crate::client::{Client, ClientError};
use crate::infer::InferError;
use crate::verified::FusionError;

/// The file name inside the store's directory.
pub const FILE_NAME: &str = "distrusted.json";
/// The exit status of `fusion-client infer` when it refuses a distrusted server.
pub const EXIT_DISTRUSTED: i32 = 4;
/// The store file's format version.
const VERSION: u32 = 1;

/// Errors of the trust store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// The server is distrusted: no batch is run with it.
    #[error(
        "refusing the server: this client distrusts the certificate it presented, {fingerprint}, since unix time {since}, when the server at {server} presented it ({reason}); recorded in {}; run again with --trust-again or `fusion-client trust reset {fingerprint}` to trust it again",
        path.display()
    )]
    Distrusted {
        /// the server's address when it was recorded
        server: String,
        /// the certificate fingerprint
        fingerprint: String,
        /// seconds since the Unix epoch
        since: u64,
        /// why
        reason: String,
        /// the store file
        path: PathBuf,
    },
    /// The store file exists but is not a valid store.
    #[error(
        "the trust store {} is corrupt ({detail}); fix or remove it by hand (it is never treated as empty)",
        path.display()
    )]
    Corrupt {
        /// the store file
        path: PathBuf,
        /// the parse error
        detail: String,
    },
    /// Reading or writing the store failed.
    #[error("the trust store {}: {source}", path.display())]
    Io {
        /// the file or directory
        path: PathBuf,
        /// the cause
        #[source]
        source: std::io::Error,
    },
    /// No directory for the store: neither --trust-store, `FUSION_TRUST_STORE`,
    /// `XDG_STATE_HOME` nor `HOME` is set.
    #[error("no trust store directory: pass --trust-store DIR (or set FUSION_TRUST_STORE)")]
    NoLocation,
    /// The connection did not expose the server's certificate.
    #[error("the server's certificate was not seen in the TLS handshake")]
    NoPeerCertificate,
}

/// One distrusted server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// the server address it was reached at
    pub server: String,
    /// seconds since the Unix epoch
    pub since: u64,
    /// why (the detection or the failure)
    pub reason: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    /// certificate fingerprint -> entry
    distrusted: BTreeMap<String, Entry>,
}

/// The trust store of one directory.
#[derive(Debug)]
pub struct TrustStore {
    path: PathBuf,
    entries: BTreeMap<String, Entry>,
}

/// The fingerprint the store is keyed on: BLAKE3 of the leaf certificate's DER.
pub fn fingerprint(leaf_der: &[u8]) -> String {
    format!("blake3:{}", blake3::hash(leaf_der).to_hex())
}

/// The fingerprint of the certificate `client`'s server presented.
pub fn server_fingerprint(client: &Client) -> Result<String, TrustError> {
    client
        .peer_certificate()
        .map(|d| fingerprint(&d))
        .ok_or(TrustError::NoPeerCertificate)
}

/// The default directory: `$XDG_STATE_HOME/fusion`, else `$HOME/.local/state/fusion`.
pub fn default_dir() -> Result<PathBuf, TrustError> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(x) = nonempty("XDG_STATE_HOME") {
        return Ok(PathBuf::from(x).join("fusion"));
    }
    nonempty("HOME")
        .map(|h| PathBuf::from(h).join(".local/state/fusion"))
        .ok_or(TrustError::NoLocation)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TrustStore {
    /// Opens the store in `dir` (the default directory when `None`). A missing file is an
    /// empty store; a file that does not parse is [`TrustError::Corrupt`].
    pub fn open(dir: Option<&Path>) -> Result<Self, TrustError> {
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => default_dir()?,
        };
        let path = dir.join(FILE_NAME);
        let entries = match std::fs::read(&path) {
            Ok(bytes) => {
                let f: File = serde_json::from_slice(&bytes).map_err(|e| TrustError::Corrupt {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
                if f.version != VERSION {
                    return Err(TrustError::Corrupt {
                        path,
                        detail: format!("format version {} (expected {VERSION})", f.version),
                    });
                }
                f.distrusted
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(TrustError::Io { path, source }),
        };
        Ok(Self { path, entries })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The distrusted servers, by fingerprint.
    pub fn entries(&self) -> &BTreeMap<String, Entry> {
        &self.entries
    }

    /// `Ok` when the certificate `fingerprint` is not distrusted.
    pub fn check(&self, fingerprint: &str) -> Result<(), TrustError> {
        match self.entries.get(fingerprint) {
            None => Ok(()),
            Some(e) => Err(TrustError::Distrusted {
                server: e.server.clone(),
                fingerprint: fingerprint.to_owned(),
                since: e.since,
                reason: e.reason.clone(),
                path: self.path.clone(),
            }),
        }
    }

    /// Records the server and saves.
    pub fn record(
        &mut self,
        fingerprint: &str,
        server: &str,
        reason: &str,
    ) -> Result<(), TrustError> {
        self.entries.insert(
            fingerprint.to_owned(),
            Entry {
                server: server.to_owned(),
                since: now(),
                reason: reason.to_owned(),
            },
        );
        self.save()
    }

    /// Removes the entries whose fingerprint or server address is `key` and saves;
    /// returns how many were removed.
    pub fn reset(&mut self, key: &str) -> Result<usize, TrustError> {
        let before = self.entries.len();
        self.entries.retain(|f, e| f != key && e.server != key);
        let removed = before - self.entries.len();
        if removed > 0 {
            self.save()?;
        }
        Ok(removed)
    }

    /// Writes the store: a temporary file in the same directory, then a rename.
    fn save(&self) -> Result<(), TrustError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TrustError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let file = File {
            version: VERSION,
            distrusted: self.entries.clone(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| TrustError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
        tmp.write_all(&json).map_err(io(tmp.path()))?;
        tmp.as_file().sync_all().map_err(io(&self.path))?;
        tmp.persist(&self.path).map_err(|e| TrustError::Io {
            path: self.path.clone(),
            source: e.error,
        })?;
        Ok(())
    }
}

/// Why a failed Fusion batch makes the server distrusted, or `None` when the failure
/// happened before the client's inputs entered the protocol (connecting, a refusal, a
/// pool or parameter problem) and so cannot carry a selective-failure signal.
///
/// Recorded: every detection (checks a, b, c), and every failure after the server
/// accepted the session (the protocol's error, e.g. the server aborting mid-protocol;
/// the session's transport failing; the server's end status reporting a failure after
/// the last message). The client cannot tell a deliberate abort from a network fault,
/// so both count.
pub fn distrust_reason(e: &FusionError) -> Option<String> {
    match e {
        FusionError::Detected(c) => Some(format!("detected: {c}")),
        FusionError::Infer(InferError::Client(
            c @ (ClientError::Protocol { .. } | ClientError::Session(_) | ClientError::Panicked(_)),
        )) => Some(format!("the batch failed after the session started: {c}")),
        _ => None,
    }
}

/// The trust flags of `infer`.
#[derive(Debug, Clone, Args)]
pub struct TrustArgs {
    /// Directory of the trust store (file `distrusted.json`; default
    /// `$XDG_STATE_HOME/fusion` or `~/.local/state/fusion`).
    #[arg(long = "trust-store", env = "FUSION_TRUST_STORE", value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Trust this server again (removes it from the trust store) before running.
    #[arg(long = "trust-again")]
    pub trust_again: bool,
}

impl TrustArgs {
    /// Opens the store; then refuses a distrusted server (before any session) or, with
    /// `--trust-again`, clears it. Returns the store and the server's fingerprint.
    pub fn admit(&self, client: &Client) -> Result<(TrustStore, String), TrustError> {
        let mut store = TrustStore::open(self.store.as_deref())?;
        let fp = server_fingerprint(client)?;
        if self.trust_again {
            if store.reset(&fp)? > 0 {
                eprintln!(
                    "--trust-again: {} ({fp}) removed from {}",
                    client.addr(),
                    store.path().display()
                );
            }
        } else {
            store.check(&fp)?;
        }
        Ok((store, fp))
    }
}

/// Records the server of a failed batch when [`distrust_reason`] says so; the batch's
/// error is returned unchanged (a failure to record is added to it).
pub fn record_failure(
    store: &mut TrustStore,
    fingerprint: &str,
    client: &Client,
    e: FusionError,
) -> anyhow::Error {
    let Some(reason) = distrust_reason(&e) else {
        return e.into();
    };
    match store.record(fingerprint, &client.addr().to_string(), &reason) {
        Ok(()) => {
            eprintln!(
                "this client now distrusts {} (certificate {fingerprint}), recorded in {}; further batches with it are refused unless --trust-again",
                client.addr(),
                store.path().display()
            );
            e.into()
        }
        Err(w) => anyhow::Error::from(e).context(format!("recording the server failed: {w}")),
    }
}

/// A verified inference guarded by the trust store: [`TrustArgs::admit`] (a distrusted
/// server is refused before any session starts), [`crate::verified::run_verified`], and
/// on failure [`record_failure`]. `own_pixels` are the client's B images.
pub async fn run_verified_trusted(
    trust: &TrustArgs,
    client: &Client,
    info: &fusion_common::net::ServiceInfo,
    public: &crate::verified::PublicRows,
    own_pixels: &[u8],
    opts: &crate::verified::FusionOptions,
) -> anyhow::Result<(
    crate::verified::VerifiedOutput,
    crate::verified::SessionOutcomes,
)> {
    let (mut store, fp) = trust.admit(client)?;
    crate::verified::run_verified(client, info, public, own_pixels, opts)
        .await
        .map_err(|e| record_failure(&mut store, &fp, client, e))
}

/// Whether a command's error is a refusal of a distrusted server (the binary then exits
/// with [`EXIT_DISTRUSTED`]).
pub fn is_distrusted(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<TrustError>(),
        Some(TrustError::Distrusted { .. })
    )
}

/// `fusion-client trust`.
#[derive(Debug, Args)]
pub struct TrustCmd {
    /// Directory of the trust store (default `$XDG_STATE_HOME/fusion` or
    /// `~/.local/state/fusion`).
    #[arg(
        long = "trust-store",
        env = "FUSION_TRUST_STORE",
        value_name = "DIR",
        global = true
    )]
    pub store: Option<PathBuf>,
    #[command(subcommand)]
    pub action: TrustAction,
}

/// What `trust` does.
#[derive(Debug, Subcommand)]
pub enum TrustAction {
    /// List the distrusted servers.
    List,
    /// Trust a server again: SERVER is its address (https://HOST:PORT, as recorded) or
    /// its certificate fingerprint (blake3:...).
    Reset {
        /// address or fingerprint
        server: String,
    },
}

/// Runs `fusion-client trust`.
pub fn run(cmd: &TrustCmd) -> anyhow::Result<()> {
    let mut store = TrustStore::open(cmd.store.as_deref())?;
    match &cmd.action {
        TrustAction::List => {
            if store.entries().is_empty() {
                println!("no distrusted servers ({})", store.path().display());
            }
            for (f, e) in store.entries() {
                println!("{}  {f}  since {}  {}", e.server, e.since, e.reason);
            }
        }
        TrustAction::Reset { server } => {
            let n = store.reset(server)?;
            if n == 0 {
                anyhow::bail!("{server} is not in {}", store.path().display());
            }
            println!(
                "{n} entr{} removed from {}",
                if n == 1 { "y" } else { "ies" },
                store.path().display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusion_common::fusion::check::CheckError;

    #[test]
    fn records_survive_reopening_and_reset_clears_by_address_or_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        let mut s = TrustStore::open(Some(&sub)).unwrap();
        assert!(s.entries().is_empty());
        let fp = fingerprint(b"leaf");
        assert!(fp.starts_with("blake3:") && fp.len() == 7 + 64);
        s.check(&fp).unwrap();
        s.record(&fp, "https://h:1", "detected: x").unwrap();
        s.record(&fingerprint(b"other"), "https://o:2", "y")
            .unwrap();
        let mut s = TrustStore::open(Some(&sub)).unwrap();
        let e = s.check(&fp).unwrap_err();
        assert!(matches!(&e, TrustError::Distrusted { server, .. } if server == "https://h:1"));
        assert!(e.to_string().contains("--trust-again"));
        // the store binds to the certificate: the same certificate at another address is
        // refused too, so the message names the certificate (and where it was recorded),
        // not the recorded address as if it were the one asked for
        let text = e.to_string();
        assert!(text.starts_with("refusing the server:"), "{text}");
        assert!(
            text.contains(&format!("trust reset {fp}`"))
                && text.contains("when the server at https://h:1 presented it"),
            "{text}"
        );
        assert_eq!(s.reset("https://h:1").unwrap(), 1);
        assert_eq!(s.reset(&fingerprint(b"other")).unwrap(), 1);
        assert_eq!(s.reset("nothing").unwrap(), 0);
        assert!(TrustStore::open(Some(&sub)).unwrap().entries().is_empty());
        // no temporary files left behind
        assert_eq!(std::fs::read_dir(&sub).unwrap().count(), 1);
    }

    #[test]
    fn a_corrupt_store_is_a_named_error_never_empty() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            &b"{not json"[..],
            b"",
            b"{\"version\":1}",
            b"{\"version\":2,\"distrusted\":{}}",
            b"{\"version\":1,\"distrusted\":{},\"extra\":0}",
        ] {
            std::fs::write(dir.path().join(FILE_NAME), bad).unwrap();
            let e = TrustStore::open(Some(dir.path())).unwrap_err();
            assert!(matches!(e, TrustError::Corrupt { .. }), "{e}");
        }
    }

    #[test]
    fn only_detections_and_failures_after_the_start_are_recorded() {
        let d = FusionError::Detected(CheckError::PublicMismatch { rows: 1, of: 13 });
        assert!(distrust_reason(&d).unwrap().starts_with("detected"));
        let abort = FusionError::Infer(InferError::Client(ClientError::Protocol {
            source: "channel closed".into(),
        }));
        assert!(distrust_reason(&abort).is_some());
        let refused = FusionError::Infer(InferError::Client(ClientError::Status {
            call: "session",
            code: tonic::Code::ResourceExhausted,
            message: "budget".into(),
        }));
        assert!(distrust_reason(&refused).is_none());
        assert!(distrust_reason(&FusionError::NoPool).is_none());
    }
}
