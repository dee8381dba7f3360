//! TLS material: the broker's trust anchors and one `rustls::ClientConfig` per device identity.
//!
//! Everything here runs when a configuration generation is loaded, never per connection: a bad
//! certificate, a key that does not match it, or a key file that others can read is found at start-up
//! (or at reload) with the file named, not at a sensor's first connection. The whole build uses a single
//! crypto provider (ring); [`provider`] is the only place that names it.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::stamp::Stamp;

pub(crate) mod stream;

/// The crypto provider used for every TLS connection mqtls makes.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A problem with one TLS file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct TlsFileError {
    /// Which config key the file came from: `cert`, `key` or `upstream.ca_file`.
    pub key: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

fn file_error(key: &'static str, path: &Path, reason: impl Into<String>) -> TlsFileError {
    TlsFileError {
        key,
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The trust anchors for the broker's certificate: a CA file, or the system's roots.
pub fn load_roots(ca_file: Option<&Path>) -> Result<Arc<RootCertStore>, TlsFileError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = read_certs("upstream.ca_file", path)?;
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| file_error("upstream.ca_file", path, format!("not a usable CA certificate: {e}")))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let path = Path::new("/etc/ssl/certs");
                return Err(file_error(
                    "upstream.ca_file",
                    path,
                    "no trusted root certificates found on this system; install ca-certificates or set upstream.ca_file",
                ));
            }
        }
    }
    Ok(Arc::new(roots))
}

/// The certificates in the PEM file `path` (at least one), for the config key `key`.
pub(crate) fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let data = std::fs::read(path).map_err(|e| file_error(key, path, format!("cannot read: {e}")))?;
    certs_from_pem(key, path, &data)
}

/// The certificates in `data`, the contents of the PEM file `path` (at least one).
pub(crate) fn certs_from_pem(
    key: &'static str,
    path: &Path,
    data: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(data)
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(key, path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(
            key,
            path,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsFileError> {
    let data = std::fs::read(path).map_err(|e| file_error("key", path, format!("cannot read: {e}")))?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| {
        let swapped = CertificateDer::pem_slice_iter(&data).any(|c| c.is_ok());
        let reason = if swapped {
            "holds a certificate, not a private key (are `cert` and `key` swapped?)".to_string()
        } else {
            format!("no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}")
        };
        file_error("key", path, reason)
    })
}

/// Refuses a private key that group or others may read, unless the operator allowed it or systemd passed it
/// as a credential (readable by the service alone, whatever the mode bits say); returns the file's
/// permission bits.
fn check_key_permissions(path: &Path, allow_readable: bool) -> Result<u32, TlsFileError> {
    let meta = std::fs::metadata(path).map_err(|e| file_error("key", path, format!("cannot read: {e}")))?;
    let mode = meta.permissions().mode() & 0o777;
    if key_mode_is_open(mode) && !allow_readable && !crate::systemd::is_credential(path) {
        return Err(file_error(
            "key",
            path,
            format!(
                "private key is {} (mode {mode:04o}); run `chmod 600 {}` or set upstream.allow_readable_keys = true",
                key_mode_exposure(mode),
                path.display()
            ),
        ));
    }
    Ok(mode)
}

/// Whether permission bits let group or others read (or write) a private key.
pub fn key_mode_is_open(mode: u32) -> bool {
    mode & 0o077 != 0
}

/// What open permission bits let group or others do to a key, in words: a key that others can replace
/// is as bad as one they can read.
pub fn key_mode_exposure(mode: u32) -> &'static str {
    if mode & 0o044 != 0 {
        "readable by group or others"
    } else if mode & 0o022 != 0 {
        "writable by group or others"
    } else {
        "open to group or others"
    }
}

/// What an operator needs to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// Subject distinguished name, e.g. `CN=boiler-1`.
    pub subject: String,
    /// The subject's (first) Common Name, if it has one (`{cn}` in a `connect` template).
    pub common_name: Option<String>,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Serial number in hex.
    pub serial: String,
    /// Not valid before.
    pub not_before: SystemTime,
    /// Not valid after.
    pub not_after: SystemTime,
}

impl CertSummary {
    /// Parses the leaf certificate.
    pub fn parse(der: &CertificateDer<'_>) -> Result<CertSummary, String> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| format!("cannot parse X.509: {e}"))?;
        let to_time = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                UNIX_EPOCH + Duration::from_secs(secs as u64)
            } else {
                UNIX_EPOCH
            }
        };
        let common_name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok());
        Ok(CertSummary {
            subject: cert.subject().to_string(),
            common_name: common_name.map(str::to_string),
            issuer: cert.issuer().to_string(),
            serial: cert.raw_serial_as_string(),
            not_before: to_time(cert.validity().not_before),
            not_after: to_time(cert.validity().not_after),
        })
    }
}

/// A device identity ready to use: the client config that presents it, and what it says.
#[derive(Clone)]
pub struct Identity {
    /// Used for every connection of this identity; built once.
    pub client_config: Arc<ClientConfig>,
    /// The leaf certificate's details.
    pub summary: CertSummary,
    /// Permission bits of the private key file (e.g. `0o600`); others may read it only when
    /// `upstream.allow_readable_keys` allowed that.
    pub key_mode: u32,
    /// The certificate and key files as they were just before they were read: while both still look
    /// the same, a reload can keep this identity instead of building it again.
    pub files: SourceFiles,
}

/// Where an identity was read from, and what those files looked like then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFiles {
    /// The certificate chain file.
    pub cert: PathBuf,
    /// The private key file.
    pub key: PathBuf,
    stamps: (Option<Stamp>, Option<Stamp>),
}

impl SourceFiles {
    fn stamp(cert: &Path, key: &Path) -> SourceFiles {
        SourceFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            stamps: (Stamp::of(cert), Stamp::of(key)),
        }
    }

    /// True while `cert` and `key` are these files, unchanged since they were read.
    pub fn unchanged(&self, cert: &Path, key: &Path) -> bool {
        self.cert == cert && self.key == key && self.stamps == (Stamp::of(cert), Stamp::of(key))
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the config: it holds the private key.
        f.debug_struct("Identity")
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

/// TLS sessions each identity remembers for resumption: rustls keeps up to 8 per broker name, so this
/// covers four broker names. rustls's default (256) sizes each identity's cache for 32 names up front,
/// about 15 KiB per device identity before a single connection; a gateway talks to one broker.
const SESSION_CACHE_SIZE: usize = 32;

/// Options shared by every identity of a generation.
#[derive(Clone)]
pub struct TlsSettings {
    /// Trust anchors for the broker.
    pub roots: Arc<RootCertStore>,
    /// ALPN protocols to offer.
    pub alpn: Vec<Vec<u8>>,
    /// Accept private keys that group or others can read.
    pub allow_readable_keys: bool,
}

/// Loads a certificate chain and private key and builds the client config that presents them.
pub fn load_identity(cert: &Path, key: &Path, settings: &TlsSettings) -> Result<Identity, TlsFileError> {
    // Stamped first: a file that changes while it is read then looks changed at the next reload.
    let files = SourceFiles::stamp(cert, key);
    let chain = read_certs("cert", cert)?;
    let summary = CertSummary::parse(&chain[0]).map_err(|e| file_error("cert", cert, e))?;
    let key_der = read_key(key)?;
    let key_mode = check_key_permissions(key, settings.allow_readable_keys)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| file_error("cert", cert, e.to_string()))?
        .with_root_certificates(settings.roots.clone())
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => file_error(
                "key",
                key,
                format!("does not match the certificate in {}", cert.display()),
            ),
            other => file_error("key", key, format!("cannot be used with the certificate: {other}")),
        })?;
    config.alpn_protocols = settings.alpn.clone();
    config.resumption = Resumption::in_memory_sessions(SESSION_CACHE_SIZE);
    Ok(Identity {
        client_config: Arc::new(config),
        summary,
        key_mode,
        files,
    })
}

#[cfg(any(test, feature = "fuzzing"))]
impl Identity {
    /// An identity that presents no client certificate, made without files, for tests whose broker is
    /// a stand-in.
    pub(crate) fn in_memory(name: &str) -> Identity {
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the provider supports the default versions")
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        let now = SystemTime::now();
        Identity {
            client_config: Arc::new(config),
            summary: CertSummary {
                subject: format!("CN={name}"),
                common_name: Some(name.to_string()),
                issuer: "CN=test".into(),
                serial: "01".into(),
                not_before: now,
                not_after: now + Duration::from_secs(86_400),
            },
            key_mode: 0o600,
            files: SourceFiles::stamp(Path::new("/nonexistent/cert.pem"), Path::new("/nonexistent/key.pem")),
        }
    }
}
