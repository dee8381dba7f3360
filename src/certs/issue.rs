//! A device's identity in the device directory (`<out>/<name>/`): [`issue`] signs it with the site CA;
//! [`csr`] writes a key and a signing request for a CA that someone else runs. Both write the key
//! before anything that a reload would pair with it.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};

use super::ca::load_ca;
use super::files::{remove_if_present, sync_dir, DeviceDir, Staged, KEY_MODE, PUBLIC_MODE};
use super::keys::{random_serial, read_signing_key, KeyType};
use super::names::{check_client_id, check_name, common_name};
use super::{check_days, crypto, file_error, CertsError, Owner, BACKDATE};
use crate::config::{DEVICE_DIR_CERT, DEVICE_DIR_CSR, DEVICE_DIR_KEY, DEVICE_DIR_SETTINGS};
use crate::tls::CertSummary;

/// What [`issue`] makes.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The directory made by [`init_ca`](super::init_ca).
    pub ca_dir: PathBuf,
    /// The device's name: its directory and its certificate's Common Name.
    pub name: String,
    /// The device directory (`[device_dir] path` in the config).
    pub out: PathBuf,
    /// The MQTT client id to match, written to `device.toml`; `None` keeps what is there (by default the
    /// directory name).
    pub client_id: Option<String>,
    /// Validity in days (cut to the CA's own expiry).
    pub days: u32,
    /// The device's key type.
    pub key_type: KeyType,
    /// Replace an existing identity (rotation: a new key and certificate).
    pub force: bool,
    /// Whom the written files (and the device's directory, if this creates it) are given to; `None`
    /// leaves them to the user running this. The CA's files are never touched.
    pub owner: Option<Owner>,
}

/// What [`issue`] wrote.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The device's directory.
    pub dir: PathBuf,
    /// `cert.pem`.
    pub cert: PathBuf,
    /// `key.pem`, mode 0600.
    pub key: PathBuf,
    /// `device.toml`, when a client id was written to it.
    pub settings: Option<PathBuf>,
    /// The certificate's details.
    pub summary: CertSummary,
    /// The validity was cut short to end with the CA's.
    pub cut_to_ca_expiry: bool,
    /// An existing identity was replaced.
    pub replaced: bool,
}

/// Issues a device certificate (CN = name, clientAuth) and its new key into `<out>/<name>/`.
pub fn issue(req: &IssueRequest) -> Result<Issued, CertsError> {
    check_issue_request(req)?;
    let ca = load_ca(&req.ca_dir)?;
    let dir = req.out.join(&req.name);
    let replaced = holds_identity(&dir);
    if replaced && !req.force {
        return Err(CertsError::Exists {
            path: dir,
            what: "a device identity",
            hint: "use --force to replace it with a new key and certificate (rotation)",
        });
    }
    let key = req.key_type.generate()?;
    let (params, cut_to_ca_expiry) = device_cert_params(&req.name, req.days, ca.not_after)?;
    let cert = params
        .signed_by(&key, &ca.issuer, &ca.key)
        .map_err(crypto("signing the device certificate"))?;
    let summary = CertSummary::parse(cert.der()).map_err(CertsError::Crypto)?;
    let settings = write_issued(
        &dir,
        &key.serialize_pem(),
        &cert.pem(),
        req.client_id.as_deref(),
        req.owner.as_ref(),
    )?;
    Ok(Issued {
        cert: dir.join(DEVICE_DIR_CERT),
        key: dir.join(DEVICE_DIR_KEY),
        dir,
        settings,
        summary,
        cut_to_ca_expiry,
        replaced,
    })
}

/// Everything about the request that can be refused before the CA is read.
fn check_issue_request(req: &IssueRequest) -> Result<(), CertsError> {
    check_name(&req.name)?;
    if let Some(id) = &req.client_id {
        check_client_id(id)?;
    }
    check_days(req.days)?;
    if let Some(o) = &req.owner {
        o.check_allowed()?;
    }
    Ok(())
}

/// A device certificate for `name`, valid from a little before now for `days` but never past the CA's
/// own expiry; and whether it had to be cut short for that.
fn device_cert_params(
    name: &str,
    days: u32,
    ca_not_after: time::OffsetDateTime,
) -> Result<(CertificateParams, bool), CertsError> {
    let now = time::OffsetDateTime::now_utc();
    let wanted = now + time::Duration::days(i64::from(days));
    let mut params = client_auth_params(name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    params.not_before = now - BACKDATE;
    params.not_after = wanted.min(ca_not_after);
    Ok((params, wanted > ca_not_after))
}

/// What a device certificate and a device CSR share: CN = name, a signature key for client authentication.
fn client_auth_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

/// Puts an issued identity in place: the key, then `device.toml` (when a client id is given), then the
/// certificate, and removes a CSR left from a pending state (it belongs to a key that no longer exists).
/// Returns `device.toml` if it was written.
fn write_issued(
    dir: &Path,
    key_pem: &str,
    cert_pem: &str,
    client_id: Option<&str>,
    owner: Option<&Owner>,
) -> Result<Option<PathBuf>, CertsError> {
    let device_dir = DeviceDir::create(dir, owner)?;
    let settings_path = dir.join(DEVICE_DIR_SETTINGS);
    let staged_key = Staged::write(&dir.join(DEVICE_DIR_KEY), key_pem.as_bytes(), KEY_MODE, owner)?;
    let staged_settings = match client_id {
        Some(id) => Some(Staged::write(
            &settings_path,
            settings_with_client_id(&settings_path, id)?.as_bytes(),
            PUBLIC_MODE,
            owner,
        )?),
        None => None,
    };
    let staged_cert = Staged::write(&dir.join(DEVICE_DIR_CERT), cert_pem.as_bytes(), PUBLIC_MODE, owner)?;
    staged_key.commit()?;
    device_dir.keep();
    let settings = match staged_settings {
        Some(s) => {
            s.commit()?;
            Some(settings_path)
        }
        None => None,
    };
    staged_cert.commit()?;
    remove_if_present(&dir.join(DEVICE_DIR_CSR))?;
    sync_dir(dir)?;
    Ok(settings)
}

/// Whether `dir` already holds a device's certificate, key or CSR.
fn holds_identity(dir: &Path) -> bool {
    [DEVICE_DIR_CERT, DEVICE_DIR_KEY, DEVICE_DIR_CSR]
        .iter()
        .any(|f| dir.join(f).exists())
}

/// `device.toml` with `client_id` set, keeping every other setting and comment already in it.
fn settings_with_client_id(path: &Path, id: &str) -> Result<String, CertsError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(file_error(path, format!("cannot read: {e}"))),
    };
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| {
        file_error(
            path,
            format!("is not valid TOML, so client_id cannot be set in it: {e}"),
        )
    })?;
    doc["client_id"] = toml_edit::value(id);
    Ok(doc.to_string())
}

/// What [`csr`] makes.
#[derive(Debug, Clone)]
pub struct CsrRequest {
    /// The device's name: its directory and the CSR's Common Name.
    pub name: String,
    /// The device directory.
    pub out: PathBuf,
    /// The key type of a new key.
    pub key_type: KeyType,
    /// Sign the CSR with the device's existing `key.pem` instead of a new key (renewal at an outside CA:
    /// the new certificate matches the key already in place).
    pub reuse_key: bool,
    /// Replace an existing identity with a new key (the device is pending until its new certificate
    /// arrives).
    pub force: bool,
    /// Whom the written files (and the device's directory, if this creates it) are given to; `None`
    /// leaves them to the user running this. A reused key keeps its owner.
    pub owner: Option<Owner>,
}

/// What [`csr`] wrote.
#[derive(Debug, Clone)]
pub struct CsrCreated {
    /// The device's directory.
    pub dir: PathBuf,
    /// `key.pem`, mode 0600.
    pub key: PathBuf,
    /// `csr.pem`.
    pub csr: PathBuf,
    /// The existing key was used.
    pub key_reused: bool,
    /// A `cert.pem` for the old key was removed (with `force`).
    pub removed_cert: bool,
}

/// Writes a key (new, or the existing one with `reuse_key`) and a CSR (CN = name, asking for clientAuth)
/// into `<out>/<name>/`.
pub fn csr(req: &CsrRequest) -> Result<CsrCreated, CertsError> {
    check_name(&req.name)?;
    if let Some(o) = &req.owner {
        o.check_allowed()?;
    }
    let dir = req.out.join(&req.name);
    let (key, new_key) = csr_key(req, &dir)?;
    let request = client_auth_params(&req.name)
        .serialize_request(&key)
        .map_err(crypto("signing the CSR"))?
        .pem()
        .map_err(crypto("encoding the CSR"))?;
    let new_key_pem = new_key.then(|| key.serialize_pem());
    let removed_cert = write_csr(&dir, new_key_pem.as_deref(), &request, req.owner.as_ref())?;
    Ok(CsrCreated {
        key: dir.join(DEVICE_DIR_KEY),
        csr: dir.join(DEVICE_DIR_CSR),
        dir,
        key_reused: !new_key,
        removed_cert,
    })
}

/// The key to sign the CSR with: the device's own with `reuse_key`, else a new one (`true`), which
/// replaces an identity already in `dir` only with `force`.
fn csr_key(req: &CsrRequest, dir: &Path) -> Result<(KeyPair, bool), CertsError> {
    let key_path = dir.join(DEVICE_DIR_KEY);
    if req.reuse_key {
        if !key_path.exists() {
            return Err(file_error(
                &key_path,
                "--reuse-key: there is no key to reuse; leave out --reuse-key to make a new one",
            ));
        }
        return Ok((read_signing_key(&key_path)?, false));
    }
    if holds_identity(dir) && !req.force {
        return Err(CertsError::Exists {
            path: dir.to_path_buf(),
            what: "a device identity",
            hint: "use --reuse-key to renew with the key in place (the device keeps working until the new \
                   certificate replaces cert.pem), or --force for a new key (the device is pending until its \
                   new certificate arrives)",
        });
    }
    Ok((req.key_type.generate()?, true))
}

/// Puts the new key (if there is one) and the CSR in place. The old certificate cannot go with a new
/// key, so it is removed: without it the directory is pending, not broken. Returns whether it was.
fn write_csr(dir: &Path, new_key_pem: Option<&str>, request: &str, owner: Option<&Owner>) -> Result<bool, CertsError> {
    let device_dir = DeviceDir::create(dir, owner)?;
    let cert_path = dir.join(DEVICE_DIR_CERT);
    let staged_key = new_key_pem
        .map(|pem| Staged::write(&dir.join(DEVICE_DIR_KEY), pem.as_bytes(), KEY_MODE, owner))
        .transpose()?;
    let staged_csr = Staged::write(&dir.join(DEVICE_DIR_CSR), request.as_bytes(), PUBLIC_MODE, owner)?;
    let removed_cert = new_key_pem.is_some() && cert_path.exists();
    if removed_cert {
        remove_if_present(&cert_path)?;
    }
    if let Some(k) = staged_key {
        k.commit()?;
    }
    device_dir.keep();
    staged_csr.commit()?;
    sync_dir(dir)?;
    Ok(removed_cert)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_keep_other_keys_and_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.toml");
        fs::write(&path, "# the boiler\nsource = \"192.168.10.7\"\nclient_id = \"old\"\n").unwrap();
        let text = settings_with_client_id(&path, "new \"id\"").unwrap();
        assert!(text.contains("# the boiler"), "{text}");
        assert!(text.contains("source = \"192.168.10.7\""), "{text}");
        let parsed: toml::Table = text.parse().unwrap();
        assert_eq!(parsed["client_id"].as_str(), Some("new \"id\""));
    }
}
