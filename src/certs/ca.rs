//! The site CA: `mqtls certs init-ca` makes it, and [`issue`](fn@super::issue) loads it to sign device
//! certificates. A CA is never replaced (every certificate it issued would stop verifying), and one
//! whose key others can read is not used.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::CertificateDer;

use super::files::{create_dir, sync_dir, Staged, KEY_MODE, PUBLIC_MODE};
use super::keys::{random_serial, read_signing_key, KeyType};
use super::names::{check_ca_name, common_name};
use super::{check_days, crypto, file_error, tls_file_error, CertsError, BACKDATE};
use crate::tls::{certs_from_pem, key_mode_exposure, key_mode_is_open, CertSummary};

/// The CA certificate inside the directory made by [`init_ca`].
const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key inside the directory made by [`init_ca`].
const CA_KEY_FILE: &str = "ca.key";
/// The CA's directory, if [`init_ca`] creates it: its key is in there.
const CA_DIR_MODE: u32 = 0o700;

/// What [`init_ca`] makes.
#[derive(Debug, Clone)]
pub struct CaRequest {
    /// The directory that receives `ca.pem` and `ca.key` (created with mode 0700 if missing).
    pub out: PathBuf,
    /// The CA's Common Name.
    pub name: String,
    /// Validity in days.
    pub days: u32,
    /// The CA's key type.
    pub key_type: KeyType,
}

/// The files [`init_ca`] wrote.
#[derive(Debug, Clone)]
pub struct CaCreated {
    /// The CA certificate (give it to the broker as the CA for client certificates).
    pub cert: PathBuf,
    /// The CA private key, mode 0600.
    pub key: PathBuf,
    /// The certificate's details.
    pub summary: CertSummary,
}

/// Creates a private CA: a self-signed certificate allowed to sign device certificates only (path length
/// 0), and its key. Never replaces an existing CA: every certificate it issued would stop verifying.
pub fn init_ca(req: &CaRequest) -> Result<CaCreated, CertsError> {
    check_ca_name(&req.name)?;
    check_days(req.days)?;
    let cert_path = req.out.join(CA_CERT_FILE);
    let key_path = req.out.join(CA_KEY_FILE);
    refuse_to_replace(&cert_path, &key_path)?;
    create_dir(&req.out, CA_DIR_MODE)?;
    let key = req.key_type.generate()?;
    let cert = ca_params(&req.name, req.days)?
        .self_signed(&key)
        .map_err(crypto("signing the CA certificate"))?;
    let summary = CertSummary::parse(cert.der()).map_err(CertsError::Crypto)?;
    let staged_key = Staged::write(&key_path, key.serialize_pem().as_bytes(), KEY_MODE, None)?;
    let staged_cert = Staged::write(&cert_path, cert.pem().as_bytes(), PUBLIC_MODE, None)?;
    staged_key.commit()?;
    staged_cert.commit()?;
    sync_dir(&req.out)?;
    Ok(CaCreated {
        cert: cert_path,
        key: key_path,
        summary,
    })
}

fn refuse_to_replace(cert_path: &Path, key_path: &Path) -> Result<(), CertsError> {
    for (path, what) in [(cert_path, "a CA certificate"), (key_path, "a CA key")] {
        if path.exists() {
            return Err(CertsError::Exists {
                path: path.to_path_buf(),
                what,
                hint: "mqtls never replaces a CA (every certificate it issued would stop verifying); \
                       choose another --out, or move the old CA away yourself",
            });
        }
    }
    Ok(())
}

/// A CA that signs end-entity certificates only, valid from a little before now for `days`.
fn ca_params(name: &str, days: u32) -> Result<CertificateParams, CertsError> {
    let now = time::OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial()?);
    params.not_before = now - BACKDATE;
    params.not_after = now + time::Duration::days(i64::from(days));
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A CA loaded for signing.
pub(super) struct Ca {
    /// rcgen needs a `Certificate` as the issuer; it is rebuilt from the CA file's subject and key
    /// identifier, the only parts of it that go into what it signs.
    pub(super) issuer: rcgen::Certificate,
    pub(super) key: KeyPair,
    pub(super) not_after: time::OffsetDateTime,
}

/// Loads the CA that [`init_ca`] made in `dir`, refusing one that is expired, whose key others can
/// read, or whose key does not match its certificate.
pub(super) fn load_ca(dir: &Path) -> Result<Ca, CertsError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let cert = read_ca_cert(&cert_path)?;
    check_key_is_private(&key_path)?;
    let key = read_signing_key(&key_path)?;
    if key.public_key_der() != cert.public_key {
        return Err(file_error(
            &key_path,
            format!("does not match the CA certificate in {}", cert_path.display()),
        ));
    }
    let params = CertificateParams::from_ca_cert_der(&cert.der)
        .map_err(|e| file_error(&cert_path, format!("cannot be used as an issuer: {e}")))?;
    let issuer = params.self_signed(&key).map_err(crypto("loading the CA"))?;
    Ok(Ca {
        issuer,
        key,
        not_after: cert.not_after,
    })
}

/// What signing needs from the CA certificate.
struct CaCert {
    der: CertificateDer<'static>,
    public_key: Vec<u8>,
    not_after: time::OffsetDateTime,
}

/// Reads the CA certificate, which must be a CA's and still valid.
fn read_ca_cert(path: &Path) -> Result<CaCert, CertsError> {
    let data = fs::read(path).map_err(|e| {
        file_error(
            path,
            format!("cannot read: {e} (is --ca a directory made by `mqtls certs init-ca`?)"),
        )
    })?;
    let der = certs_from_pem("ca", path, &data)
        .map_err(tls_file_error)?
        .swap_remove(0);
    let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| file_error(path, format!("cannot parse X.509: {e}")))?;
    let is_ca = x509.basic_constraints().ok().flatten().is_some_and(|b| b.value.ca);
    if !is_ca {
        return Err(file_error(
            path,
            "is not a CA certificate (basicConstraints CA:TRUE is missing)",
        ));
    }
    let not_after = x509.validity().not_after.to_datetime();
    if not_after <= time::OffsetDateTime::now_utc() {
        return Err(file_error(
            path,
            format!("the CA certificate expired on {not_after}; make a new CA with `mqtls certs init-ca`"),
        ));
    }
    let public_key = x509.public_key().raw.to_vec();
    Ok(CaCert {
        der,
        public_key,
        not_after,
    })
}

/// Refuses a CA key that group or others can read: signing with it would hide that it may be copied.
fn check_key_is_private(path: &Path) -> Result<(), CertsError> {
    let mode = fs::metadata(path)
        .map_err(|e| file_error(path, format!("cannot read: {e}")))?
        .permissions()
        .mode()
        & 0o777;
    if key_mode_is_open(mode) {
        return Err(file_error(
            path,
            format!(
                "the CA's private key is {} (mode {mode:04o}); run `chmod 600 {}` \
                 (and consider whether someone else has copied it)",
                key_mode_exposure(mode),
                path.display()
            ),
        ));
    }
    Ok(())
}
