//! Cluster certificates: a private certificate authority and host certificates.
//!
//! # Trust model
//!
//! A Tandem cluster (a primary, its secondary, and any migration targets) trusts
//! exactly one thing: its own certificate authority, created once with
//! [`init_ca`]. Every host gets a certificate from that CA with [`issue`]; the
//! certificate is valid both as a TLS *server* and as a TLS *client* certificate
//! (extended key usages `serverAuth` and `clientAuth`), because either side of a
//! replication pair may be the one that dials.
//!
//! The channel (see [`crate::channel`]) uses mutual TLS: each side presents its
//! host certificate and verifies the other side's against the cluster CA only
//! (never the system roots). Holding *any* certificate issued by the cluster CA
//! therefore means "member of this cluster": it may send a log, receive a VM,
//! or take over. Keep `ca.key` offline (or at least off the hosts) once hosts
//! are issued; whoever has it can mint members. Host keys (`HOST.key`) and the
//! CA key are written with mode 0600 and never overwritten.
//!
//! Files written (all PEM):
//!
//! | file | content |
//! | --- | --- |
//! | `ca.pem` | CA certificate (distribute to every host) |
//! | `ca.key` | CA private key (mode 0600; keep secret) |
//! | `HOST.pem` | host certificate, signed by the CA |
//! | `HOST.key` | host private key (mode 0600) |

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// File name of the cluster CA certificate inside a certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the cluster CA private key inside a certificate directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// Common name of the cluster CA certificate.
const CA_COMMON_NAME: &str = "Tandem cluster CA";
/// Validity of the CA certificate.
const CA_VALIDITY_DAYS: i64 = 365 * 20;
/// Validity of host certificates.
const HOST_VALIDITY_DAYS: i64 = 365 * 5;

/// Errors from creating or loading certificates. Every variant names the file
/// involved.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The file already exists; certificates and keys are never overwritten.
    #[error("refusing to overwrite existing {what} at {}", path.display())]
    Exists {
        /// Which file (CA certificate, host key...).
        what: &'static str,
        /// Its path.
        path: PathBuf,
    },
    /// A required file does not exist.
    #[error("{what} not found at {} ({hint})", path.display())]
    Missing {
        /// Which file (CA certificate, host key...).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// How to create it.
        hint: &'static str,
    },
    /// A file exists but could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// Which file (CA certificate, host key...).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A file could not be created or written.
    #[error("cannot write {what} {}: {source}", path.display())]
    Write {
        /// Which file (CA certificate, host key...).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A file was read but its content is not what was expected.
    #[error("{} is not a valid {what}: {detail}", path.display())]
    Invalid {
        /// Which file (CA certificate, host key...).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The host name cannot be used as a file name and certificate name.
    #[error("invalid host name {name:?}: {reason}")]
    BadName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An extra subject alternative name is neither an IP address nor a DNS name.
    #[error("invalid subject alternative name {san:?}: {detail}")]
    BadSan {
        /// The name given.
        san: String,
        /// Why it is neither.
        detail: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, CertError>;

/// Create a new cluster CA in `dir` (`ca.pem`, and `ca.key` with mode 0600).
///
/// `dir` is created if missing. Refuses (with [`CertError::Exists`]) if either
/// file already exists: replacing a CA silently would lock every host out.
pub fn init_ca(dir: &Path) -> Result<()> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for (what, p) in [("CA certificate", &cert_path), ("CA key", &key_path)] {
        if p.exists() {
            return Err(CertError::Exists {
                what,
                path: p.clone(),
            });
        }
    }
    create_dir(dir)?;

    let key = KeyPair::generate()?;
    // A per-cluster CA name (suffix from the public key) so a certificate
    // from another Tandem cluster fails as "unknown issuer", not as a bad
    // signature from a same-named CA.
    let suffix: String = key
        .public_key_raw()
        .iter()
        .skip(1)
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    let params = ca_params(&format!("{CA_COMMON_NAME} {suffix}"));
    let cert = params.self_signed(&key)?;

    write_new(&key_path, "CA key", key.serialize_pem().as_bytes(), 0o600)?;
    if let Err(e) = write_new(&cert_path, "CA certificate", cert.pem().as_bytes(), 0o644) {
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    Ok(())
}

/// Issue a host certificate `NAME.pem` / `NAME.key` signed by the CA in `ca_dir`.
///
/// The files go to `out_dir` (default: `ca_dir`). Subject alternative names:
/// `name`, `localhost`, `127.0.0.1`, `::1`, plus each of `extra_sans` (an IP
/// address or a DNS name). The certificate is usable as both a TLS server and a
/// TLS client certificate. Refuses to overwrite existing host files. After
/// signing, the certificate is verified against `ca.pem` so that a mismatched
/// `ca.key` is reported here rather than at the first handshake.
pub fn issue(
    ca_dir: &Path,
    name: &str,
    out_dir: Option<&Path>,
    extra_sans: &[String],
) -> Result<()> {
    validate_name(name)?;
    let out_dir = out_dir.unwrap_or(ca_dir);
    let cert_path = out_dir.join(format!("{name}.pem"));
    let key_path = out_dir.join(format!("{name}.key"));
    for (what, p) in [("host certificate", &cert_path), ("host key", &key_path)] {
        if p.exists() {
            return Err(CertError::Exists {
                what,
                path: p.clone(),
            });
        }
    }

    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_cert_pem = read_text(&ca_cert_path, "CA certificate", "run `certs init` first")?;
    let ca_key_pem = read_text(&ca_key_path, "CA key", "run `certs init` first")?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| CertError::Invalid {
        what: "PEM private key (CA key)",
        path: ca_key_path.clone(),
        detail: e.to_string(),
    })?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key).map_err(|e| CertError::Invalid {
            what: "PEM CA certificate",
            path: ca_cert_path.clone(),
            detail: e.to_string(),
        })?;

    // Subject alternative names, deduplicated, in a stable order.
    let mut sans: Vec<String> = Vec::new();
    let mut seen = BTreeSet::new();
    let defaults = [name, "localhost", "127.0.0.1", "::1"];
    for s in defaults
        .iter()
        .copied()
        .chain(extra_sans.iter().map(String::as_str))
    {
        let s = s.trim();
        if s.is_empty() {
            continue;
        }
        if s.parse::<IpAddr>().is_err() {
            validate_dns(s).map_err(|detail| CertError::BadSan {
                san: s.to_string(),
                detail: detail.to_string(),
            })?;
        }
        if seen.insert(s.to_ascii_lowercase()) {
            sans.push(s.to_string());
        }
    }

    let mut params = CertificateParams::new(sans).map_err(|e| CertError::BadSan {
        san: name.to_string(),
        detail: e.to_string(),
    })?;
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Tandem cluster");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(HOST_VALIDITY_DAYS);

    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;

    // Check the result chains to ca.pem (catches a ca.key that does not belong
    // to ca.pem) as both server and client certificate.
    let ca_ders = load_certs(&ca_cert_path, "CA certificate")?;
    verify_leaf(&ca_ders, cert.der()).map_err(|detail| CertError::Invalid {
        what: "CA (key and certificate do not match, or the CA cannot sign)",
        path: ca_key_path.clone(),
        detail,
    })?;

    create_dir(out_dir)?;
    write_new(&key_path, "host key", key.serialize_pem().as_bytes(), 0o600)?;
    if let Err(e) = write_new(&cert_path, "host certificate", cert.pem().as_bytes(), 0o644) {
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    Ok(())
}

/// What a host needs to join the cluster: the CA to trust, its own certificate
/// chain, and its private key.
pub struct Credentials {
    /// Trust anchors: the cluster CA certificate(s). Peers must chain to one.
    pub ca: Vec<CertificateDer<'static>>,
    /// This host's certificate chain, leaf first. Empty means "present no
    /// client certificate" (the peer will refuse; useful only for tests).
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// This host's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Self {
            ca: self.ca.clone(),
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("ca", &self.ca.len())
            .field("cert_chain", &self.cert_chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// Load credentials from PEM files: the CA certificate(s), this host's
    /// certificate (chain) and its private key.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self> {
        let ca_ders = load_certs(ca, "CA certificate")?;
        let chain = load_certs(cert, "host certificate")?;
        let key = load_key(key)?;
        Ok(Self {
            ca: ca_ders,
            cert_chain: chain,
            key,
        })
    }

    /// Load `dir/ca.pem`, `dir/NAME.pem` and `dir/NAME.key`.
    pub fn load_host(dir: &Path, name: &str) -> Result<Self> {
        validate_name(name)?;
        Self::load(
            &dir.join(CA_CERT_FILE),
            &dir.join(format!("{name}.pem")),
            &dir.join(format!("{name}.key")),
        )
    }
}

/// The rcgen parameters of the cluster CA.
fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Tandem cluster");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
    params
}

fn validate_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(CertError::BadName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name == "ca" {
        return bad("\"ca\" is reserved for the CA files");
    }
    if name.parse::<IpAddr>().is_ok() {
        if name.contains('/') {
            return bad("contains '/'");
        }
        return Ok(());
    }
    match validate_dns(name) {
        Ok(()) => Ok(()),
        Err(reason) => bad(reason),
    }
}

fn validate_dns(name: &str) -> std::result::Result<(), &'static str> {
    if name.len() > 253 {
        return Err("longer than 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each dot-separated label must be 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("only ASCII letters, digits, '-' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("labels must not start or end with '-'");
        }
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|source| CertError::Write {
        what: "certificate directory",
        path: dir.to_path_buf(),
        source,
    })
}

/// Create `path` exclusively with `mode` and write `data`.
fn write_new(path: &Path, what: &'static str, data: &[u8], mode: u32) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                CertError::Exists {
                    what,
                    path: path.to_path_buf(),
                }
            } else {
                CertError::Write {
                    what,
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|source| CertError::Write {
            what,
            path: path.to_path_buf(),
            source,
        })
}

fn read_file(path: &Path, what: &'static str, hint: &'static str) -> Result<Vec<u8>> {
    fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            CertError::Missing {
                what,
                path: path.to_path_buf(),
                hint,
            }
        } else {
            CertError::Read {
                what,
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

fn read_text(path: &Path, what: &'static str, hint: &'static str) -> Result<String> {
    let bytes = read_file(path, what, hint)?;
    String::from_utf8(bytes).map_err(|_| CertError::Invalid {
        what: "PEM file (not UTF-8 text)",
        path: path.to_path_buf(),
        detail: format!("{what} must be PEM text"),
    })
}

/// Read all certificates from a PEM file; error if there are none.
pub(crate) fn load_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = read_file(path, what, "check the path, or issue it with `certs issue`")?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| CertError::Invalid {
            what: "PEM certificate file",
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::Invalid {
            what: "PEM certificate file",
            path: path.to_path_buf(),
            detail: "no \"BEGIN CERTIFICATE\" block found".into(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let bytes = read_file(
        path,
        "private key",
        "check the path, or issue it with `certs issue`",
    )?;
    match rustls_pemfile::private_key(&mut bytes.as_slice()) {
        Ok(Some(k)) => Ok(k),
        Ok(None) => Err(CertError::Invalid {
            what: "PEM private key file",
            path: path.to_path_buf(),
            detail: "no \"BEGIN PRIVATE KEY\" block found".into(),
        }),
        Err(e) => Err(CertError::Invalid {
            what: "PEM private key file",
            path: path.to_path_buf(),
            detail: e.to_string(),
        }),
    }
}

/// Verify `leaf` against `ca` as a server certificate for "localhost" and as a
/// client certificate.
fn verify_leaf(
    ca: &[CertificateDer<'static>],
    leaf: &CertificateDer<'static>,
) -> std::result::Result<(), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in ca {
        roots.add(c.clone()).map_err(|e| e.to_string())?;
    }
    let roots = Arc::new(roots);
    let now = UnixTime::now();
    let server = rustls::client::WebPkiServerVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    server
        .verify_server_cert(leaf, &[], &name, &[], now)
        .map_err(|e| format!("as server certificate: {e}"))?;
    let client = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|e| e.to_string())?;
    client
        .verify_client_cert(leaf, &[], now)
        .map_err(|e| format!("as client certificate: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_refuses_overwrite_and_sets_key_mode() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let before = fs::read(dir.path().join(CA_CERT_FILE)).unwrap();
        let err = init_ca(dir.path()).unwrap_err();
        assert!(matches!(err, CertError::Exists { .. }), "{err}");
        assert!(err.to_string().contains("ca.pem"), "{err}");
        assert_eq!(before, fs::read(dir.path().join(CA_CERT_FILE)).unwrap());
    }

    #[test]
    fn issue_and_load() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        issue(
            dir.path(),
            "alpha",
            None,
            &["10.0.0.7".into(), "alpha.example".into()],
        )
        .unwrap();
        let mode = fs::metadata(dir.path().join("alpha.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let creds = Credentials::load_host(dir.path(), "alpha").unwrap();
        assert_eq!(creds.ca.len(), 1);
        assert_eq!(creds.cert_chain.len(), 1);
        let err = issue(dir.path(), "alpha", None, &[]).unwrap_err();
        assert!(matches!(err, CertError::Exists { .. }), "{err}");
        // Separate output directory.
        let out = dir.path().join("out");
        issue(dir.path(), "beta", Some(&out), &[]).unwrap();
        assert!(out.join("beta.pem").exists() && out.join("beta.key").exists());
    }

    #[test]
    fn clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = issue(dir.path(), "alpha", None, &[]).unwrap_err();
        assert!(matches!(err, CertError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("ca.pem"), "{err}");

        init_ca(dir.path()).unwrap();
        assert!(matches!(
            issue(dir.path(), "../evil", None, &[]),
            Err(CertError::BadName { .. })
        ));
        assert!(matches!(
            issue(dir.path(), "ok", None, &["bad name!".into()]),
            Err(CertError::BadSan { .. })
        ));

        // Key file that is not PEM.
        let junk = dir.path().join("junk.key");
        fs::write(&junk, "hello").unwrap();
        let err = Credentials::load(
            &dir.path().join(CA_CERT_FILE),
            &dir.path().join(CA_CERT_FILE),
            &junk,
        )
        .unwrap_err();
        assert!(err.to_string().contains("junk.key"), "{err}");
        // Certificate file that is not PEM.
        let err = Credentials::load(&junk, &junk, &junk).unwrap_err();
        assert!(err.to_string().contains("junk.key"), "{err}");
        // Corrupt CA key.
        fs::write(dir.path().join("other.key"), "x").unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        fs::copy(
            dir.path().join(CA_CERT_FILE),
            dir2.path().join(CA_CERT_FILE),
        )
        .unwrap();
        fs::write(dir2.path().join(CA_KEY_FILE), "not a key").unwrap();
        let err = issue(dir2.path(), "alpha", None, &[]).unwrap_err();
        assert!(err.to_string().contains("ca.key"), "{err}");
    }

    #[test]
    fn mismatched_ca_key_is_detected() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init_ca(a.path()).unwrap();
        init_ca(b.path()).unwrap();
        // ca.pem from A with ca.key from B.
        let mixed = tempfile::tempdir().unwrap();
        fs::copy(a.path().join(CA_CERT_FILE), mixed.path().join(CA_CERT_FILE)).unwrap();
        fs::copy(b.path().join(CA_KEY_FILE), mixed.path().join(CA_KEY_FILE)).unwrap();
        let err = issue(mixed.path(), "alpha", None, &[]).unwrap_err();
        assert!(err.to_string().contains("ca.key"), "{err}");
        assert!(!mixed.path().join("alpha.key").exists());
    }
}
