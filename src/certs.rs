//! `mqtls certs`: device identities on disk, made the way the rest of mqtls reads them.
//!
//! Copied openssl recipes get the details wrong: a certificate without the clientAuth purpose, a key left
//! readable by everyone, files in a layout the daemon does not look at. This module writes them one way:
//!
//! - [`init_ca`]: a private CA for a lab or a site (`ca.pem`, and `ca.key` with mode 0600);
//! - [`issue`]: a device's key and certificate signed by that CA, in the device-directory layout that
//!   [`crate::config`] loads (`<out>/<name>/{key.pem,cert.pem,device.toml}`);
//! - [`csr`]: a key and a certificate signing request for a CA that someone else runs; until the signed
//!   `cert.pem` is saved next to the key, the directory is a [`PendingDevice`] that the loader skips;
//! - [`IdentityRow`]: what `mqtls certs list` and `mqtls check` print about every identity, with flags for
//!   what needs attention.
//!
//! Files are written the way a daemon that reloads on file changes needs them: every file goes to a
//! temporary name in its own directory and is renamed into place, keys are created with mode 0600 (never
//! written first and chmod'ed later), and the key lands before the certificate, so a reload triggered by
//! `cert.pem` finds the key that matches it. With an [`Owner`] (`--owner`), each file is given to that
//! user while it still has its temporary name, so the daemon's user never meets a key it cannot read.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::PrivatePkcs8KeyDer;
use serde::Serialize;

use crate::config::{
    device_dir_entries, pending_device, Config, PendingDevice, DEVICE_DIR_CERT, DEVICE_DIR_CSR, DEVICE_DIR_KEY,
    DEVICE_DIR_SETTINGS, FALLBACK_NAME,
};
use crate::tls::{certs_from_pem, key_mode_exposure, key_mode_is_open, read_certs, CertSummary, TlsFileError};

mod owner;
pub use owner::Owner;

/// The CA certificate inside the directory made by [`init_ca`].
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key inside the directory made by [`init_ca`].
pub const CA_KEY_FILE: &str = "ca.key";
/// Default validity of a site CA: ten years, longer than any device certificate it signs.
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default validity of a device certificate.
pub const DEFAULT_DEVICE_DAYS: u32 = 365;
/// A certificate that expires within this many days is flagged EXPIRES SOON.
pub const DEFAULT_EXPIRY_WARNING_DAYS: u32 = 30;
/// Default Common Name of a CA made by [`init_ca`].
pub const DEFAULT_CA_NAME: &str = "mqtls device CA";
/// The longest validity accepted, in days (100 years).
pub const MAX_DAYS: u32 = 36_500;
/// X.509's upper bound for a Common Name (RFC 5280, ub-common-name), which a device name becomes.
pub const MAX_NAME_CHARS: usize = 64;

/// Certificates start this long before "now", so a broker whose clock runs a little behind still
/// accepts a certificate issued a moment ago.
const BACKDATE: time::Duration = time::Duration::hours(1);

/// Why a `certs` command could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// The device or CA name cannot be used.
    #[error("invalid name {name:?}: {reason}")]
    BadName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The client id cannot be used.
    #[error("invalid client id {id:?}: {reason}")]
    BadClientId {
        /// The client id as given.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The validity is out of range.
    #[error("--days {days}: must be between 1 and {MAX_DAYS}")]
    BadDays {
        /// The number of days given.
        days: u32,
    },
    /// The command would replace files that already exist.
    #[error("{}: {what} already exists; {hint}", path.display())]
    Exists {
        /// The file or directory in the way.
        path: PathBuf,
        /// What it holds.
        what: &'static str,
        /// What the operator can do.
        hint: &'static str,
    },
    /// A file could not be read, written or used.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Key generation or signing failed.
    #[error("{0}")]
    Crypto(String),
    /// The owner given for the written files cannot be used.
    #[error("--owner {owner}: {reason}")]
    BadOwner {
        /// The owner as given.
        owner: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn file_error(path: &Path, reason: impl fmt::Display) -> CertsError {
    CertsError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn tls_file_error(e: TlsFileError) -> CertsError {
    CertsError::File {
        path: e.path,
        reason: e.reason,
    }
}

fn crypto(what: &str) -> impl Fn(rcgen::Error) -> CertsError + '_ {
    move |e| CertsError::Crypto(format!("{what}: {e}"))
}

// ---------------------------------------------------------------------------------------------------------
// Keys

/// The kind of private key to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256: small, fast, and accepted by every broker and cloud service.
    #[default]
    EcdsaP256,
    /// Ed25519: smallest and fastest, but not accepted everywhere (e.g. not by AWS IoT Core).
    Ed25519,
    /// RSA 2048 with SHA-256: for brokers and PKIs that accept nothing else.
    Rsa2048,
}

impl KeyType {
    /// Every key type, in the order the help lists them.
    pub const ALL: [KeyType; 3] = [KeyType::EcdsaP256, KeyType::Ed25519, KeyType::Rsa2048];

    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::Ed25519 => "ed25519",
            KeyType::Rsa2048 => "rsa2048",
        }
    }

    /// A new private key of this type.
    fn generate(self) -> Result<KeyPair, CertsError> {
        match self {
            KeyType::EcdsaP256 => {
                KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(crypto("ECDSA P-256 key"))
            }
            KeyType::Ed25519 => generate_ed25519(),
            KeyType::Rsa2048 => generate_rsa2048(),
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyType::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown key type `{s}`: use ecdsa-p256, ed25519 or rsa2048"))
    }
}

/// ring writes Ed25519 keys as PKCS#8 v2 (with the public key inside), which OpenSSL 3.0 cannot read; the
/// RFC 8410 v1 form (the 32-byte seed alone) is read by everything, ring included.
fn generate_ed25519() -> Result<KeyPair, CertsError> {
    const PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
    ];
    let mut pkcs8 = PREFIX.to_vec();
    let seed: [u8; 32] = random_bytes()?;
    pkcs8.extend_from_slice(&seed);
    KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(pkcs8), &rcgen::PKCS_ED25519)
        .map_err(crypto("Ed25519 key"))
}

/// ring signs with RSA but cannot generate RSA keys, so the `rsa` crate makes the key and ring (through
/// rcgen) does everything after that.
fn generate_rsa2048() -> Result<KeyPair, CertsError> {
    use rsa::pkcs8::EncodePrivateKey as _;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
        .map_err(|e| CertsError::Crypto(format!("RSA 2048 key: {e}")))?;
    let pkcs8 = key
        .to_pkcs8_der()
        .map_err(|e| CertsError::Crypto(format!("RSA 2048 key: {e}")))?;
    KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(pkcs8.as_bytes()), &rcgen::PKCS_RSA_SHA256)
        .map_err(crypto("RSA 2048 key"))
}

/// Reads a PKCS#8 PEM private key (what mqtls writes) for signing.
fn read_signing_key(path: &Path) -> Result<KeyPair, CertsError> {
    let text = fs::read_to_string(path).map_err(|e| file_error(path, format!("cannot read: {e}")))?;
    KeyPair::from_pem(&text).map_err(|_| {
        file_error(
            path,
            "not a usable PKCS#8 private key (-----BEGIN PRIVATE KEY-----, ECDSA P-256/P-384, Ed25519 or RSA); \
             convert another format with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pkcs8`",
        )
    })
}

/// `N` bytes from the system's random number generator.
fn random_bytes<const N: usize>() -> Result<[u8; N], CertsError> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CertsError::Crypto("the system's random number generator failed".into()))?;
    Ok(bytes)
}

fn random_serial() -> Result<SerialNumber, CertsError> {
    let mut bytes: [u8; 16] = random_bytes()?;
    // Positive and exactly 16 bytes long once DER-encoded (no sign padding, no stripped leading zero).
    bytes[0] = (bytes[0] & 0x7f).max(1);
    Ok(SerialNumber::from_slice(&bytes))
}

// ---------------------------------------------------------------------------------------------------------
// Names

/// Checks that `name` can be a device directory name and a certificate's Common Name.
fn check_name(name: &str) -> Result<(), CertsError> {
    let bad = |reason: &str| {
        Err(CertsError::BadName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return bad("a name is required");
    }
    if name == "." || name == ".." {
        return bad("`.` and `..` are not directory names");
    }
    if name.contains('/') || name.contains('\\') {
        return bad("must not contain `/` or `\\` (it names one directory)");
    }
    if name.starts_with('.') {
        return bad("must not start with `.` (the device directory skips hidden entries)");
    }
    if let Some(reason) = common_name_problem(name) {
        return bad(&reason);
    }
    if name.trim() != name {
        return bad("must not start or end with white space");
    }
    Ok(())
}

/// What keeps `name` from being a certificate's Common Name: a control character, or more characters
/// than X.509 allows.
fn common_name_problem(name: &str) -> Option<String> {
    if name.chars().any(char::is_control) {
        return Some("must not contain control characters".into());
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Some(format!(
            "longer than {MAX_NAME_CHARS} characters (the X.509 limit for a Common Name)"
        ));
    }
    None
}

fn check_client_id(id: &str) -> Result<(), CertsError> {
    let bad = |reason: &str| {
        Err(CertsError::BadClientId {
            id: id.to_string(),
            reason: reason.to_string(),
        })
    };
    if id.is_empty() {
        return bad(
            "must not be empty (a device with an empty client id needs `source` or `listen` rules in device.toml)",
        );
    }
    if id.len() > usize::from(u16::MAX) {
        return bad("longer than 65535 bytes (the MQTT limit)");
    }
    if id.chars().any(char::is_control) {
        return bad("must not contain control characters");
    }
    Ok(())
}

fn check_days(days: u32) -> Result<(), CertsError> {
    if (1..=MAX_DAYS).contains(&days) {
        Ok(())
    } else {
        Err(CertsError::BadDays { days })
    }
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

// ---------------------------------------------------------------------------------------------------------
// Writing files

/// A file written under a temporary name beside its destination, renamed into place by [`Staged::commit`]
/// and removed if never committed.
struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl Staged {
    /// Writes `contents` to a new temporary file created with `mode` and given to `owner`, and flushes it
    /// to disk.
    fn write(dest: &Path, contents: &[u8], mode: u32, owner: Option<&Owner>) -> Result<Staged, CertsError> {
        let name = dest.file_name().unwrap_or_default().to_string_lossy();
        let tmp = dest.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        // A leftover from a crashed run of this same pid; create_new below must not trip over it.
        let _ = fs::remove_file(&tmp);
        let staged = Staged {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        };
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&staged.tmp)
            .map_err(|e| file_error(&staged.tmp, format!("cannot create: {e}")))?;
        if let Some(o) = owner {
            std::os::unix::fs::fchown(&f, Some(o.uid), Some(o.gid))
                .map_err(|e| file_error(&staged.dest, format!("cannot give the new file to {o}: {e}")))?;
        }
        f.write_all(contents)
            .and_then(|()| f.sync_all())
            .map_err(|e| file_error(&staged.tmp, format!("cannot write: {e}")))?;
        Ok(staged)
    }

    fn commit(mut self) -> Result<(), CertsError> {
        fs::rename(&self.tmp, &self.dest).map_err(|e| file_error(&self.dest, format!("cannot replace: {e}")))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Makes the renames in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), CertsError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| file_error(dir, format!("cannot sync: {e}")))
}

fn create_dir(dir: &Path, mode: u32) -> Result<(), CertsError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|e| file_error(dir, format!("cannot create the directory: {e}")))
}

/// A device's directory, removed again (if still empty) unless [`DeviceDir::keep`] is called: an empty
/// directory left by a failed command would be a device without files, which fails the next reload.
struct DeviceDir {
    path: PathBuf,
    created: bool,
}

impl DeviceDir {
    /// Creates `dir` (and its parents) if missing; a directory it creates is given to `owner`.
    fn create(dir: &Path, owner: Option<&Owner>) -> Result<DeviceDir, CertsError> {
        let created = !dir.exists();
        create_dir(dir, DEVICE_DIR_MODE)?;
        let guard = DeviceDir {
            path: dir.to_path_buf(),
            created,
        };
        if let (true, Some(o)) = (created, owner) {
            std::os::unix::fs::chown(dir, Some(o.uid), Some(o.gid))
                .map_err(|e| file_error(dir, format!("cannot give the new directory to {o}: {e}")))?;
        }
        Ok(guard)
    }

    fn keep(mut self) {
        self.created = false;
    }
}

impl Drop for DeviceDir {
    fn drop(&mut self) {
        if self.created {
            let _ = fs::remove_dir(&self.path);
        }
    }
}

const KEY_MODE: u32 = 0o600;
const PUBLIC_MODE: u32 = 0o644;
const DEVICE_DIR_MODE: u32 = 0o755;

// ---------------------------------------------------------------------------------------------------------
// init-ca

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
    for (path, what) in [(&cert_path, "a CA certificate"), (&key_path, "a CA key")] {
        if path.exists() {
            return Err(CertsError::Exists {
                path: path.clone(),
                what,
                hint: "mqtls never replaces a CA (every certificate it issued would stop verifying); \
                       choose another --out, or move the old CA away yourself",
            });
        }
    }
    create_dir(&req.out, 0o700)?;
    let key = req.key_type.generate()?;
    let now = time::OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(&req.name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial()?);
    params.not_before = now - BACKDATE;
    params.not_after = now + time::Duration::days(i64::from(req.days));
    params.use_authority_key_identifier_extension = true;
    let cert = params.self_signed(&key).map_err(crypto("signing the CA certificate"))?;
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

fn check_ca_name(name: &str) -> Result<(), CertsError> {
    let bad = |reason: &str| {
        Err(CertsError::BadName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.trim().is_empty() {
        return bad("a CA name is required");
    }
    match common_name_problem(name) {
        Some(reason) => bad(&reason),
        None => Ok(()),
    }
}

/// A CA loaded for signing.
struct Ca {
    /// rcgen needs a `Certificate` as the issuer; it is rebuilt from the CA file's subject and key
    /// identifier, the only parts of it that go into what it signs.
    issuer: rcgen::Certificate,
    key: KeyPair,
    not_after: time::OffsetDateTime,
}

fn load_ca(dir: &Path) -> Result<Ca, CertsError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let data = fs::read(&cert_path).map_err(|e| {
        file_error(
            &cert_path,
            format!("cannot read: {e} (is --ca a directory made by `mqtls certs init-ca`?)"),
        )
    })?;
    let der = certs_from_pem("ca", &cert_path, &data)
        .map_err(tls_file_error)?
        .swap_remove(0);
    let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| file_error(&cert_path, format!("cannot parse X.509: {e}")))?;
    let is_ca = x509.basic_constraints().ok().flatten().is_some_and(|b| b.value.ca);
    if !is_ca {
        return Err(file_error(
            &cert_path,
            "is not a CA certificate (basicConstraints CA:TRUE is missing)",
        ));
    }
    let not_after = x509.validity().not_after.to_datetime();
    if not_after <= time::OffsetDateTime::now_utc() {
        return Err(file_error(
            &cert_path,
            format!("the CA certificate expired on {not_after}; make a new CA with `mqtls certs init-ca`"),
        ));
    }
    let mode = fs::metadata(&key_path)
        .map_err(|e| file_error(&key_path, format!("cannot read: {e}")))?
        .permissions()
        .mode()
        & 0o777;
    if key_mode_is_open(mode) {
        return Err(file_error(
            &key_path,
            format!(
                "the CA's private key is {} (mode {mode:04o}); run `chmod 600 {}` \
                 (and consider whether someone else has copied it)",
                key_mode_exposure(mode),
                key_path.display()
            ),
        ));
    }
    let key = read_signing_key(&key_path)?;
    if key.public_key_der() != x509.public_key().raw {
        return Err(file_error(
            &key_path,
            format!("does not match the CA certificate in {}", cert_path.display()),
        ));
    }
    let params = CertificateParams::from_ca_cert_der(&der)
        .map_err(|e| file_error(&cert_path, format!("cannot be used as an issuer: {e}")))?;
    let issuer = params.self_signed(&key).map_err(crypto("loading the CA"))?;
    Ok(Ca { issuer, key, not_after })
}

// ---------------------------------------------------------------------------------------------------------
// issue

/// What [`issue`] makes.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The directory made by [`init_ca`].
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
    check_name(&req.name)?;
    if let Some(id) = &req.client_id {
        check_client_id(id)?;
    }
    check_days(req.days)?;
    if let Some(o) = &req.owner {
        o.check_allowed()?;
    }
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
    let now = time::OffsetDateTime::now_utc();
    let wanted = now + time::Duration::days(i64::from(req.days));
    let cut_to_ca_expiry = wanted > ca.not_after;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(&req.name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    params.not_before = now - BACKDATE;
    params.not_after = wanted.min(ca.not_after);
    let cert = params
        .signed_by(&key, &ca.issuer, &ca.key)
        .map_err(crypto("signing the device certificate"))?;
    let summary = CertSummary::parse(cert.der()).map_err(CertsError::Crypto)?;

    let owner = req.owner.as_ref();
    let device_dir = DeviceDir::create(&dir, owner)?;
    let key_path = dir.join(DEVICE_DIR_KEY);
    let cert_path = dir.join(DEVICE_DIR_CERT);
    let settings_path = dir.join(DEVICE_DIR_SETTINGS);
    let staged_key = Staged::write(&key_path, key.serialize_pem().as_bytes(), KEY_MODE, owner)?;
    let staged_settings = match &req.client_id {
        Some(id) => Some(Staged::write(
            &settings_path,
            settings_with_client_id(&settings_path, id)?.as_bytes(),
            PUBLIC_MODE,
            owner,
        )?),
        None => None,
    };
    let staged_cert = Staged::write(&cert_path, cert.pem().as_bytes(), PUBLIC_MODE, owner)?;
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
    // A CSR left from a pending state belongs to a key that no longer exists.
    remove_if_present(&dir.join(DEVICE_DIR_CSR))?;
    sync_dir(&dir)?;
    Ok(Issued {
        dir,
        cert: cert_path,
        key: key_path,
        settings,
        summary,
        cut_to_ca_expiry,
        replaced,
    })
}

fn holds_identity(dir: &Path) -> bool {
    [DEVICE_DIR_CERT, DEVICE_DIR_KEY, DEVICE_DIR_CSR]
        .iter()
        .any(|f| dir.join(f).exists())
}

fn remove_if_present(path: &Path) -> Result<(), CertsError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(file_error(path, format!("cannot remove: {e}"))),
        _ => Ok(()),
    }
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

// ---------------------------------------------------------------------------------------------------------
// csr

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
    let key_path = dir.join(DEVICE_DIR_KEY);
    let csr_path = dir.join(DEVICE_DIR_CSR);
    let cert_path = dir.join(DEVICE_DIR_CERT);
    let (key, new_key) = if req.reuse_key {
        if !key_path.exists() {
            return Err(file_error(
                &key_path,
                "--reuse-key: there is no key to reuse; leave out --reuse-key to make a new one",
            ));
        }
        (read_signing_key(&key_path)?, false)
    } else {
        if holds_identity(&dir) && !req.force {
            return Err(CertsError::Exists {
                path: dir,
                what: "a device identity",
                hint: "use --reuse-key to renew with the key in place (the device keeps working until the new \
                       certificate replaces cert.pem), or --force for a new key (the device is pending until its \
                       new certificate arrives)",
            });
        }
        (req.key_type.generate()?, true)
    };
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(&req.name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let request = params
        .serialize_request(&key)
        .map_err(crypto("signing the CSR"))?
        .pem()
        .map_err(crypto("encoding the CSR"))?;

    let owner = req.owner.as_ref();
    let device_dir = DeviceDir::create(&dir, owner)?;
    let staged_key = match new_key {
        true => Some(Staged::write(
            &key_path,
            key.serialize_pem().as_bytes(),
            KEY_MODE,
            owner,
        )?),
        false => None,
    };
    let staged_csr = Staged::write(&csr_path, request.as_bytes(), PUBLIC_MODE, owner)?;
    // The old certificate cannot go with a new key; without it the directory is pending, not broken.
    let removed_cert = new_key && cert_path.exists();
    if removed_cert {
        remove_if_present(&cert_path)?;
    }
    if let Some(k) = staged_key {
        k.commit()?;
    }
    device_dir.keep();
    staged_csr.commit()?;
    sync_dir(&dir)?;
    Ok(CsrCreated {
        dir,
        key: key_path,
        csr: csr_path,
        key_reused: !new_key,
        removed_cert,
    })
}

// ---------------------------------------------------------------------------------------------------------
// Listing

/// Something about an identity that an operator should know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Flag {
    /// The certificate's notAfter has passed: the broker refuses it.
    Expired,
    /// The certificate expires within the warning threshold.
    ExpiresSoon,
    /// Group or others can read the private key (listed even when `upstream.allow_readable_keys` allows it).
    KeyReadableByOthers,
    /// A key and a CSR, no certificate yet: not served.
    Pending,
    /// The certificate or key cannot be read or parsed.
    Invalid,
}

impl Flag {
    /// The text printed in the FLAGS column.
    fn label(self) -> &'static str {
        match self {
            Flag::Expired => "EXPIRED",
            Flag::ExpiresSoon => "EXPIRES SOON",
            Flag::KeyReadableByOthers => "KEY READABLE BY OTHERS",
            Flag::Pending => "PENDING",
            Flag::Invalid => "INVALID",
        }
    }

    /// Whether the flag calls for action (`mqtls certs list` exits 3). A pending device is waiting for
    /// someone else's CA, which is normal.
    pub fn needs_attention(self) -> bool {
        self != Flag::Pending
    }
}

/// One identity as `mqtls certs list` and `mqtls check` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRow {
    /// The device's name (`fallback` for the fallback identity).
    pub name: String,
    /// The MQTT client id the device is matched by, if any (`mqtls certs list`).
    pub client_id: Option<String>,
    /// The certificate file (none for a pending device).
    pub cert: Option<PathBuf>,
    /// The private key file.
    pub key: Option<PathBuf>,
    /// The leaf certificate's details, when it could be read.
    pub summary: Option<CertSummary>,
    /// Whole days until notAfter (negative once expired).
    pub days_left: Option<i64>,
    /// The key file's permission bits.
    pub key_mode: Option<u32>,
    /// What needs attention.
    pub flags: Vec<Flag>,
    /// Why the identity is INVALID.
    pub problem: Option<String>,
    /// The match rules (for `mqtls check`).
    pub rules: Option<String>,
}

impl IdentityRow {
    /// A row for a certificate already parsed; flags EXPIRED/EXPIRES SOON against `now` and
    /// `soon_days`, and KEY READABLE BY OTHERS from `key_mode`.
    pub fn new(name: &str, summary: CertSummary, key_mode: Option<u32>, now: SystemTime, soon_days: u32) -> Self {
        let days_left = days_between(now, summary.not_after);
        let mut flags = Vec::new();
        if summary.not_after <= now {
            flags.push(Flag::Expired);
        } else if days_left < i64::from(soon_days) {
            flags.push(Flag::ExpiresSoon);
        }
        if key_mode.is_some_and(key_mode_is_open) {
            flags.push(Flag::KeyReadableByOthers);
        }
        IdentityRow {
            name: name.to_string(),
            client_id: None,
            cert: None,
            key: None,
            summary: Some(summary),
            days_left: Some(days_left),
            key_mode,
            flags,
            problem: None,
            rules: None,
        }
    }

    /// A device directory entry waiting for its certificate.
    pub fn pending(p: &PendingDevice) -> Self {
        let key_mode = file_mode(&p.key);
        let mut flags = vec![Flag::Pending];
        if key_mode.is_some_and(key_mode_is_open) {
            flags.push(Flag::KeyReadableByOthers);
        }
        IdentityRow {
            name: p.name.clone(),
            client_id: Some(dir_client_id(&p.dir, &p.name)),
            cert: None,
            key: Some(p.key.clone()),
            summary: None,
            days_left: None,
            key_mode,
            flags,
            problem: None,
            rules: None,
        }
    }

    /// Reads `cert` and the permissions of `key` from disk.
    fn inspect(name: &str, cert: &Path, key: &Path, now: SystemTime, soon_days: u32) -> Self {
        let key_mode = file_mode(key);
        let mut row = match read_leaf(cert) {
            Ok(summary) => IdentityRow::new(name, summary, key_mode, now, soon_days),
            Err(problem) => IdentityRow {
                name: name.to_string(),
                client_id: None,
                cert: None,
                key: None,
                summary: None,
                days_left: None,
                key_mode,
                flags: vec![Flag::Invalid],
                problem: Some(problem),
                rules: None,
            },
        };
        if key_mode.is_none() && row.problem.is_none() {
            row.flags.push(Flag::Invalid);
            row.problem = Some(format!("{}: cannot read the private key", key.display()));
        }
        row.cert = Some(cert.to_path_buf());
        row.key = Some(key.to_path_buf());
        row
    }

    /// The same row with the client id the device is matched by.
    pub fn with_client_id(mut self, client_id: Option<String>) -> Self {
        self.client_id = client_id;
        self
    }

    /// The same row with the match rules set (for `mqtls check`).
    pub fn with_rules(mut self, rules: String) -> Self {
        self.rules = Some(rules);
        self
    }

    /// Whether any flag calls for action.
    pub fn needs_attention(&self) -> bool {
        self.flags.iter().any(|f| f.needs_attention())
    }

    fn cell(&self, column: Column) -> String {
        let dash = || "-".to_string();
        let summary = self.summary.as_ref();
        match column {
            Column::Name => self.name.clone(),
            Column::ClientId => self.client_id.clone().unwrap_or_else(dash),
            Column::NotAfter => summary.map_or_else(dash, |s| rfc3339(s.not_after)),
            Column::DaysLeft => self.days_left.map_or_else(dash, |d| d.to_string()),
            Column::Subject => summary.map_or_else(dash, |s| s.subject.clone()),
            Column::Issuer => summary.map_or_else(dash, |s| s.issuer.clone()),
            Column::Serial => summary.map_or_else(dash, |s| serial_hex(&s.serial)),
            Column::Flags => {
                let labels: Vec<String> = self
                    .flags
                    .iter()
                    .map(|f| match (f, &self.problem) {
                        (Flag::Invalid, Some(p)) => format!("INVALID: {p}"),
                        _ => f.label().to_string(),
                    })
                    .collect();
                if labels.is_empty() {
                    dash()
                } else {
                    labels.join(", ")
                }
            }
            Column::Match => self.rules.clone().unwrap_or_else(dash),
        }
    }
}

/// A column of the identity table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// The device's name.
    Name,
    /// The MQTT client id it is matched by.
    ClientId,
    /// notAfter, RFC 3339 in UTC.
    NotAfter,
    /// Whole days until notAfter.
    DaysLeft,
    /// The subject DN.
    Subject,
    /// The issuer DN.
    Issuer,
    /// The serial number in hex, as `openssl x509 -serial` prints it.
    Serial,
    /// The flags.
    Flags,
    /// The match rules.
    Match,
}

impl Column {
    fn header(self) -> &'static str {
        match self {
            Column::Name => "NAME",
            Column::ClientId => "CLIENT ID",
            Column::NotAfter => "NOT AFTER",
            Column::DaysLeft => "DAYS LEFT",
            Column::Subject => "SUBJECT",
            Column::Issuer => "ISSUER",
            Column::Serial => "SERIAL",
            Column::Flags => "FLAGS",
            Column::Match => "MATCH",
        }
    }
}

/// The columns of `mqtls certs list`.
pub const LIST_COLUMNS: &[Column] = &[
    Column::Name,
    Column::ClientId,
    Column::NotAfter,
    Column::DaysLeft,
    Column::Subject,
    Column::Issuer,
    Column::Serial,
    Column::Flags,
];

/// The columns of `mqtls check` (the serial gives way to the match rules).
pub const CHECK_COLUMNS: &[Column] = &[
    Column::Name,
    Column::NotAfter,
    Column::DaysLeft,
    Column::Subject,
    Column::Issuer,
    Column::Flags,
    Column::Match,
];

/// An aligned text table of `rows` (a header line first); the last column is not padded.
pub fn render_table(rows: &[IdentityRow], columns: &[Column]) -> String {
    let header: Vec<String> = columns.iter().map(|c| c.header().to_string()).collect();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|&c| r.cell(c)).collect())
        .collect();
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| {
            cells
                .iter()
                .chain([&header])
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in [&header].into_iter().chain(&cells) {
        let last = line.len() - 1;
        for (i, cell) in line.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:w$}  ", w = widths[i]));
            }
        }
        out.push('\n');
    }
    out
}

#[derive(Serialize)]
struct JsonRow<'a> {
    name: &'a str,
    client_id: Option<&'a str>,
    cert: Option<&'a Path>,
    key: Option<&'a Path>,
    subject: Option<&'a str>,
    issuer: Option<&'a str>,
    serial: Option<String>,
    not_before: Option<String>,
    not_after: Option<String>,
    days_left: Option<i64>,
    key_mode: Option<String>,
    flags: &'a [Flag],
    problem: Option<&'a str>,
}

/// `rows` as a JSON array, one object per identity (for scripts and monitoring).
pub fn render_json(rows: &[IdentityRow]) -> String {
    let json: Vec<JsonRow<'_>> = rows
        .iter()
        .map(|r| {
            let s = r.summary.as_ref();
            JsonRow {
                name: &r.name,
                client_id: r.client_id.as_deref(),
                cert: r.cert.as_deref(),
                key: r.key.as_deref(),
                subject: s.map(|s| s.subject.as_str()),
                issuer: s.map(|s| s.issuer.as_str()),
                serial: s.map(|s| serial_hex(&s.serial)),
                not_before: s.map(|s| rfc3339(s.not_before)),
                not_after: s.map(|s| rfc3339(s.not_after)),
                days_left: r.days_left,
                key_mode: r.key_mode.map(|m| format!("{m:04o}")),
                flags: &r.flags,
                problem: r.problem.as_deref(),
            }
        })
        .collect();
    let mut text = serde_json::to_string_pretty(&json).unwrap_or_else(|_| "[]".into());
    text.push('\n');
    text
}

/// Every identity a configuration names: its devices, the fallback, and pending directory entries.
pub fn rows_from_config(config: &Config, now: SystemTime, soon_days: u32) -> Vec<IdentityRow> {
    let devices = config.devices.iter().map(|d| {
        IdentityRow::inspect(&d.name, &d.identity.cert, &d.identity.key, now, soon_days)
            .with_client_id(d.client_id.clone())
    });
    let fallback = config
        .fallback
        .iter()
        .map(|f| IdentityRow::inspect(FALLBACK_NAME, &f.cert, &f.key, now, soon_days));
    let pending = config.pending.iter().map(IdentityRow::pending);
    devices.chain(fallback).chain(pending).collect()
}

/// Every entry of a device directory, read without a configuration.
pub fn rows_from_dir(dir: &Path, now: SystemTime, soon_days: u32) -> Result<Vec<IdentityRow>, CertsError> {
    let paths = device_dir_entries(dir).map_err(|e| file_error(dir, format!("cannot read the directory: {e}")))?;
    Ok(paths.iter().map(|p| dir_row(p, now, soon_days)).collect())
}

fn dir_row(entry: &Path, now: SystemTime, soon_days: u32) -> IdentityRow {
    if let Some(p) = pending_device(entry) {
        return IdentityRow::pending(&p);
    }
    let name = entry.file_name().unwrap_or_default().to_string_lossy();
    IdentityRow::inspect(
        &name,
        &entry.join(DEVICE_DIR_CERT),
        &entry.join(DEVICE_DIR_KEY),
        now,
        soon_days,
    )
    .with_client_id(Some(dir_client_id(entry, &name)))
}

/// The client id of a device directory entry: `client_id` in its `device.toml`, else the entry's name
/// (as the configuration reads it). An unreadable `device.toml` is the configuration's to report.
fn dir_client_id(entry: &Path, name: &str) -> String {
    fs::read_to_string(entry.join(DEVICE_DIR_SETTINGS))
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .and_then(|t| t.get("client_id")?.as_str().map(String::from))
        .unwrap_or_else(|| name.to_string())
}

fn read_leaf(path: &Path) -> Result<CertSummary, String> {
    let chain = read_certs("cert", path).map_err(|e| e.to_string())?;
    CertSummary::parse(&chain[0]).map_err(|e| format!("{}: {e}", path.display()))
}

fn file_mode(path: &Path) -> Option<u32> {
    fs::metadata(path).ok().map(|m| m.permissions().mode() & 0o777)
}

/// Whole days from `now` to `then`, rounded towards minus infinity (an hour past expiry is day -1).
fn days_between(now: SystemTime, then: SystemTime) -> i64 {
    match then.duration_since(now) {
        Ok(left) => (left.as_secs() / 86_400) as i64,
        Err(past) => -((past.duration().as_secs() / 86_400) as i64) - 1,
    }
}

/// `2027-03-01T12:00:00Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A serial from [`CertSummary::serial`] (`0a:1b:...`) as `openssl x509 -serial` prints it (`A1B...`):
/// upper case, no separators, no leading zero bytes.
pub fn serial_hex(colon_hex: &str) -> String {
    let hex: String = colon_hex.split(':').collect::<String>().to_ascii_uppercase();
    let trimmed = hex.trim_start_matches("00");
    if trimmed.is_empty() {
        "00".into()
    } else {
        trimmed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_be_directories_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a\\b",
            "a\nb",
            " pad",
            "pad ",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(check_name(bad), Err(CertsError::BadName { .. })),
                "{bad:?} was accepted"
            );
        }
        for good in ["boiler-7", "Zähler 3", "a.b", &"x".repeat(64)] {
            check_name(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
    }

    #[test]
    fn key_types_parse_from_their_names() {
        for k in KeyType::ALL {
            assert_eq!(k.as_str().parse::<KeyType>(), Ok(k));
        }
        assert!("rsa4096"
            .parse::<KeyType>()
            .unwrap_err()
            .contains("ecdsa-p256, ed25519 or rsa2048"));
    }

    #[test]
    fn serial_is_printed_like_openssl() {
        assert_eq!(serial_hex("00:8a:0b"), "8A0B");
        assert_eq!(serial_hex("7f:01"), "7F01");
        assert_eq!(serial_hex("00"), "00");
    }

    #[test]
    fn days_left_round_down_and_go_negative_after_expiry() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
        let day = std::time::Duration::from_secs(86_400);
        assert_eq!(days_between(now, now + day * 3 + day / 2), 3);
        assert_eq!(days_between(now, now - day / 24), -1);
        assert_eq!(days_between(now, now - day * 2 - day / 2), -3);
    }

    /// An owner that is not the user running the test where that is allowed (as root), else the same.
    fn other_owner() -> Owner {
        let euid = rustix::process::geteuid();
        let spec = match euid.is_root() {
            true => "65534:65534".to_string(),
            false => format!("{}:{}", euid.as_raw(), rustix::process::getegid().as_raw()),
        };
        Owner::resolve(&spec).unwrap()
    }

    #[test]
    fn a_staged_file_has_its_owner_before_it_takes_its_name() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join(DEVICE_DIR_KEY);
        let owner = other_owner();
        let staged = Staged::write(&dest, b"key", KEY_MODE, Some(&owner)).unwrap();
        let tmp = fs::metadata(&staged.tmp).unwrap();
        assert_eq!((tmp.uid(), tmp.gid()), (owner.uid, owner.gid));
        assert_eq!(tmp.mode() & 0o777, KEY_MODE);
        assert!(!dest.exists(), "the final name appeared before the rename");
        let tmp_path = staged.tmp.clone();
        staged.commit().unwrap();
        let placed = fs::metadata(&dest).unwrap();
        assert_eq!(
            placed.ino(),
            tmp.ino(),
            "the file in place is the one that was given away"
        );
        assert_eq!((placed.uid(), placed.gid()), (owner.uid, owner.gid));
        assert!(!tmp_path.exists());
    }

    #[test]
    fn a_device_directory_made_for_a_failed_command_is_removed() {
        use std::os::unix::fs::MetadataExt as _;
        let out = tempfile::tempdir().unwrap();
        let owner = other_owner();
        let dir = out.path().join("boiler-7");
        let made = DeviceDir::create(&dir, Some(&owner)).unwrap();
        let m = fs::metadata(&dir).unwrap();
        assert_eq!((m.uid(), m.gid()), (owner.uid, owner.gid));
        drop(made);
        assert!(!dir.exists(), "an empty device directory was left behind");
        DeviceDir::create(&dir, Some(&owner)).unwrap().keep();
        assert!(dir.is_dir());
        let existing = DeviceDir::create(&dir, None).unwrap();
        drop(existing);
        assert!(dir.is_dir(), "a directory that was there before was removed");
    }

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
