//! Making a small PKI with rcgen: one CA, a server certificate, client certificates.
//!
//! `fusion-server certs`, the demo and the tests use it. The CA's private key is never
//! written anywhere: to add a client later, make a new set (or use your own CA).

use std::fmt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use super::tls::Identity;

/// Errors while making or writing certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// rcgen refused (e.g. a server name that is not a valid DNS name).
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A client name that cannot be a file name.
    #[error("client name {0:?}: use letters, digits, '.', '_' or '-' (and not 'ca' or 'server')")]
    BadClientName(String),
    /// No server name or no client given.
    #[error("{0}")]
    Empty(&'static str),
    /// A validity period that overflows the calendar.
    #[error("validity of {0} days is out of range")]
    BadValidity(u32),
    /// The file exists and overwriting was not asked for.
    #[error("{} already exists (pass --force to overwrite)", .0.display())]
    Exists(PathBuf),
    /// Writing failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// the file
        path: PathBuf,
        /// why
        #[source]
        source: std::io::Error,
    },
}

/// What to issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSpec {
    /// names in the server certificate (DNS names or IP addresses)
    pub server_names: Vec<String>,
    /// one client certificate per name (its subject is `CN=<name>`)
    pub clients: Vec<String>,
    /// validity in days from now
    pub days: u32,
}

impl Default for CertSpec {
    fn default() -> Self {
        Self {
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            clients: vec!["client".into()],
            days: 365,
        }
    }
}

/// One issued certificate and its private key (zeroized on drop, never printed).
#[derive(Clone)]
pub struct IssuedCert {
    /// file stem and common name
    pub name: String,
    /// the certificate, PEM
    pub cert_pem: String,
    key_pem: Zeroizing<String>,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("name", &self.name)
            .field("key_pem", &"[redacted]")
            .finish()
    }
}

impl IssuedCert {
    /// Certificate and key as a TLS identity.
    pub fn identity(&self) -> Identity {
        Identity::from_pem(self.cert_pem.as_bytes(), self.key_pem.as_bytes())
    }

    /// The private key, PEM.
    pub fn key_pem(&self) -> Vec<u8> {
        self.key_pem.as_bytes().to_vec()
    }
}

/// A CA certificate with the server and client certificates it issued.
#[derive(Debug, Clone)]
pub struct CertBundle {
    /// the CA certificate, PEM (the trust anchor for both sides)
    pub ca_pem: String,
    /// the server's certificate
    pub server: IssuedCert,
    /// the clients' certificates, in the order asked
    pub clients: Vec<IssuedCert>,
}

fn valid_client_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "ca"
        && name != "server"
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Issues a fresh CA, a server certificate for `spec.server_names` and one client
/// certificate per name in `spec.clients`. Keys are ECDSA P-256 from the OS RNG.
pub fn generate(spec: &CertSpec) -> Result<CertBundle, CertError> {
    if spec.server_names.is_empty() {
        return Err(CertError::Empty("at least one server name is needed"));
    }
    if spec.clients.is_empty() {
        return Err(CertError::Empty("at least one client name is needed"));
    }
    for c in &spec.clients {
        if !valid_client_name(c) {
            return Err(CertError::BadClientName(c.clone()));
        }
    }
    let now = OffsetDateTime::now_utc();
    let not_before = now - Duration::hours(1);
    let not_after = now
        .checked_add(Duration::days(i64::from(spec.days)))
        .ok_or(CertError::BadValidity(spec.days))?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    // a distinct name per CA, so a certificate from another Fusion CA is reported as
    // from an unknown issuer rather than as a bad signature
    ca_params.distinguished_name.push(
        DnType::CommonName,
        format!("Fusion CA {:08x}", rand::random::<u32>()),
    );
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |cn: &str, sans: Vec<String>, eku: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::new(sans)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![eku];
        p.use_authority_key_identifier_extension = true;
        p.not_before = not_before;
        p.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &issuer)?;
        Ok::<_, rcgen::Error>(IssuedCert {
            name: cn.to_owned(),
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    };

    let mut server = leaf(
        "fusion-server",
        spec.server_names.clone(),
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    server.name = "server".into();
    let clients = spec
        .clients
        .iter()
        .map(|c| leaf(c, vec![], ExtendedKeyUsagePurpose::ClientAuth))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(CertBundle {
        ca_pem: ca_cert.pem(),
        server,
        clients,
    })
}

impl CertBundle {
    /// Writes `ca.pem`, `server.pem`, `server.key` and `<client>.pem`, `<client>.key` for
    /// each client into `dir` (created if missing). Keys are written with mode 0600 on
    /// Unix. Returns the paths written.
    pub fn write_to(&self, dir: &Path, overwrite: bool) -> Result<Vec<PathBuf>, CertError> {
        std::fs::create_dir_all(dir).map_err(|source| CertError::Write {
            path: dir.to_owned(),
            source,
        })?;
        let mut files: Vec<(PathBuf, &[u8], bool)> =
            vec![(dir.join("ca.pem"), self.ca_pem.as_bytes(), false)];
        for c in std::iter::once(&self.server).chain(&self.clients) {
            files.push((
                dir.join(format!("{}.pem", c.name)),
                c.cert_pem.as_bytes(),
                false,
            ));
            files.push((
                dir.join(format!("{}.key", c.name)),
                c.key_pem.as_bytes(),
                true,
            ));
        }
        let existing = files.iter().find(|(p, _, _)| p.exists());
        if let (false, Some((p, _, _))) = (overwrite, existing) {
            return Err(CertError::Exists(p.clone()));
        }
        for (path, bytes, secret) in &files {
            crate::files::write_file(path, bytes, *secret).map_err(|source| CertError::Write {
                path: path.clone(),
                source,
            })?;
        }
        Ok(files.into_iter().map(|(p, _, _)| p).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_has_the_asked_names_and_writes_the_files() {
        let spec = CertSpec {
            clients: vec!["client".into(), "alice".into()],
            ..CertSpec::default()
        };
        let b = generate(&spec).unwrap();
        assert_eq!(b.clients.len(), 2);
        assert_eq!(b.clients[1].identity().subject().unwrap(), "CN=alice");
        assert_eq!(b.server.identity().subject().unwrap(), "CN=fusion-server");
        let dir = tempfile::tempdir().unwrap();
        let written = b.write_to(dir.path(), false).unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "ca.pem",
                "server.pem",
                "server.key",
                "client.pem",
                "client.key",
                "alice.pem",
                "alice.key"
            ]
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("client.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(
            b.write_to(dir.path(), false),
            Err(CertError::Exists(_))
        ));
        assert!(b.write_to(dir.path(), true).is_ok());
        // overwriting narrows a key that had been left readable by others
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let key = dir.path().join("client.key");
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
            b.write_to(dir.path(), true).unwrap();
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in ["", "../x", "a/b", "ca", "server", ".hidden"] {
            let spec = CertSpec {
                clients: vec![bad.into()],
                ..CertSpec::default()
            };
            assert!(
                matches!(generate(&spec), Err(CertError::BadClientName(_))),
                "{bad}"
            );
        }
        let spec = CertSpec {
            server_names: vec![],
            ..CertSpec::default()
        };
        assert!(matches!(generate(&spec), Err(CertError::Empty(_))));
    }
}
