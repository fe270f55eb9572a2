//! TLS 1.3 with mutual authentication, built with rustls directly.
//!
//! tonic's own TLS settings (`tls-ring`) build their rustls configurations with
//! `with_safe_default_protocol_versions()`, which also offers TLS 1.2; so both ends here
//! build their configurations themselves: TLS 1.3 only, the ring provider, ALPN `h2`, a
//! client certificate required by the server and checked against the client CA
//! (`WebPkiClientVerifier`), the server certificate checked against the server CA and
//! the expected name.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use zeroize::Zeroizing;

/// The ALPN protocol gRPC runs over.
pub const ALPN_H2: &[u8] = b"h2";

/// Errors while loading certificates and building TLS configurations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} from {}: {source}", path.display())]
    Read {
        /// what the file should hold
        what: &'static str,
        /// where
        path: PathBuf,
        /// why
        #[source]
        source: std::io::Error,
    },
    /// No certificate in a PEM input.
    #[error("no PEM certificate in the {what} file")]
    NoCertificate {
        /// which input
        what: &'static str,
    },
    /// No private key in a PEM input.
    #[error("no PEM private key in the {what} file")]
    NoKey {
        /// which input
        what: &'static str,
    },
    /// The private key is not the key of the certificate it is given with.
    #[error("the private key does not match the certificate (check that --key belongs to --cert)")]
    KeyMismatch,
    /// A PEM section that does not parse.
    #[error("bad PEM in {what}: {detail}")]
    BadPem {
        /// which input
        what: &'static str,
        /// the parser's complaint
        detail: String,
    },
    /// A certificate rustls does not accept as a trust anchor.
    #[error("unusable CA certificate in {what}: {source}")]
    BadAnchor {
        /// which input
        what: &'static str,
        /// rustls' complaint
        #[source]
        source: rustls::Error,
    },
    /// A server name that is neither a DNS name nor an IP address.
    #[error("invalid server name {0:?}")]
    BadServerName(String),
    /// A certificate whose subject cannot be read.
    #[error("cannot parse certificate: {0}")]
    BadCertificate(String),
    /// rustls refused the configuration (e.g. a key that does not match the certificate).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Makes ring the process-wide rustls crypto provider (idempotent). Both binaries, the
/// demo and the tests call it at start-up so nothing panics choosing a provider.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key, in PEM. The key is zeroized on drop and
/// never printed.
#[derive(Clone)]
pub struct Identity {
    cert_pem: Vec<u8>,
    key_pem: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"[redacted]")
            .finish()
    }
}

impl Identity {
    /// From PEM text.
    pub fn from_pem(cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        Self {
            cert_pem: cert_pem.into(),
            key_pem: Zeroizing::new(key_pem.into()),
        }
    }

    /// From a certificate (chain) file and a key file.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            cert_pem: read(cert, "certificate")?,
            key_pem: Zeroizing::new(read(key, "private key")?),
        })
    }

    /// The certificate chain, PEM.
    pub fn cert_pem(&self) -> &[u8] {
        &self.cert_pem
    }

    fn parts(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let chain = certificates(&self.cert_pem, "certificate")?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
                what: "private key",
            },
            other => TlsError::BadPem {
                what: "private key",
                detail: other.to_string(),
            },
        })?;
        Ok((chain, key))
    }

    /// The subject of the first certificate of the chain.
    pub fn subject(&self) -> Result<String, TlsError> {
        let chain = certificates(&self.cert_pem, "certificate")?;
        let first = chain.first().ok_or(TlsError::NoCertificate {
            what: "certificate",
        })?;
        certificate_subject(first)
    }
}

/// Reads a whole file, naming it in the error.
pub fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn certificates(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            what,
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(certs)
}

fn roots(pem: &[u8], what: &'static str) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certificates(pem, what)? {
        store
            .add(cert)
            .map_err(|source| TlsError::BadAnchor { what, source })?;
    }
    Ok(store)
}

/// The server's configuration: TLS 1.3 only, a client certificate issued by one of the
/// CAs in `client_ca_pem` required, ALPN `h2`.
pub fn server_config(
    identity: &Identity,
    client_ca_pem: &[u8],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(client_ca_pem, "client CA")?),
        provider.clone(),
    )
    .build()?;
    let (chain, key) = identity.parts()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(key_error)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The client's configuration: TLS 1.3 only, the server checked against the CAs in
/// `server_ca_pem`, this client's certificate presented, ALPN `h2`.
pub fn client_config(
    identity: &Identity,
    server_ca_pem: &[u8],
) -> Result<Arc<ClientConfig>, TlsError> {
    let (chain, key) = identity.parts()?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(server_ca_pem, "server CA")?)
        .with_client_auth_cert(chain, key)
        .map_err(key_error)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// rustls' refusal of a certificate and key pair, named when the key is another's.
fn key_error(e: rustls::Error) -> TlsError {
    match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            TlsError::KeyMismatch
        }
        other => TlsError::Config(other),
    }
}

/// A client configuration that presents no certificate. Only useful to show that the
/// server refuses such clients (the tests do); the product never builds one.
pub fn client_config_without_certificate(
    server_ca_pem: &[u8],
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(server_ca_pem, "server CA")?)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Parses a server name (DNS name or IP address) for certificate checking.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_owned()).map_err(|_| TlsError::BadServerName(name.to_owned()))
}

/// The subject of a DER certificate, e.g. `CN=client`.
pub fn certificate_subject(der: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    Ok(cert.subject().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::certs::{CertSpec, generate};

    /// Runs a handshake between two in-memory connections; the negotiated version or
    /// the first error.
    fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    ) -> Result<rustls::ProtocolVersion, rustls::Error> {
        let mut c = rustls::ClientConnection::new(client, server_name("localhost").unwrap())?;
        let mut s = rustls::ServerConnection::new(server)?;
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut buf.as_slice()).unwrap();
            let server_result = s.process_new_packets();
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
            server_result?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(c.protocol_version().unwrap());
            }
        }
        panic!("handshake did not finish")
    }

    fn tls12_only_client(identity: &Identity, ca: &[u8]) -> Arc<ClientConfig> {
        let (chain, key) = identity.parts().unwrap();
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots(ca, "server CA").unwrap())
            .with_client_auth_cert(chain, key)
            .unwrap();
        Arc::new(config)
    }

    #[test]
    fn mutual_tls13_handshake_succeeds_and_tls12_is_refused() {
        let b = generate(&CertSpec::default()).unwrap();
        let ca = b.ca_pem.as_bytes();
        let server = server_config(&b.server.identity(), ca).unwrap();
        let client = client_config(&b.clients[0].identity(), ca).unwrap();
        assert_eq!(server.alpn_protocols, vec![b"h2".to_vec()]);
        assert_eq!(client.alpn_protocols, vec![b"h2".to_vec()]);
        assert_eq!(
            handshake(client, server.clone()).unwrap(),
            rustls::ProtocolVersion::TLSv1_3
        );
        let old = tls12_only_client(&b.clients[0].identity(), ca);
        assert!(handshake(old, server.clone()).is_err());
        let anonymous = client_config_without_certificate(ca).unwrap();
        assert!(handshake(anonymous, server).is_err());
    }

    #[test]
    fn identity_subject_and_redacted_debug() {
        let b = generate(&CertSpec::default()).unwrap();
        let id = b.clients[0].identity();
        assert_eq!(id.subject().unwrap(), "CN=client");
        let dbg = format!("{id:?}");
        assert!(dbg.contains("[redacted]") && !dbg.contains("PRIVATE KEY"));
    }

    #[test]
    fn bad_inputs_are_named() {
        assert!(matches!(
            roots(b"", "client CA"),
            Err(TlsError::NoCertificate { what: "client CA" })
        ));
        let b = generate(&CertSpec::default()).unwrap();
        let other = generate(&CertSpec::default()).unwrap();
        // a key that does not belong to the certificate
        let mixed = Identity::from_pem(b.server.cert_pem.clone(), other.server.key_pem());
        assert!(matches!(
            server_config(&mixed, b.ca_pem.as_bytes()),
            Err(TlsError::KeyMismatch)
        ));
        let mixed = Identity::from_pem(b.clients[0].cert_pem.clone(), other.server.key_pem());
        let e = client_config(&mixed, b.ca_pem.as_bytes()).unwrap_err();
        assert!(matches!(e, TlsError::KeyMismatch), "{e}");
        assert!(e.to_string().contains("does not match"), "{e}");
        // a key file without a key is named as such (not as a missing certificate)
        let keyless = Identity::from_pem(b.clients[0].cert_pem.clone(), b"garbage\n".to_vec());
        let e = client_config(&keyless, b.ca_pem.as_bytes()).unwrap_err();
        assert!(matches!(e, TlsError::NoKey { .. }), "{e}");
        assert_eq!(e.to_string(), "no PEM private key in the private key file");
        assert!(matches!(
            server_name("not a name"),
            Err(TlsError::BadServerName(_))
        ));
        assert!(server_name("127.0.0.1").is_ok());
        assert!(matches!(
            Identity::from_files(Path::new("/nonexistent/x.pem"), Path::new("/nonexistent/k")),
            Err(TlsError::Read { .. })
        ));
    }
}
