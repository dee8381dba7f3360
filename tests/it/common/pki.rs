//! A throwaway PKI in a temporary directory: one CA, server certificates and
//! per-device client certificates, written as PEM files.
//!
//! Layout:
//! ```text
//! <tmp>/ca.pem
//! <tmp>/ca.key
//! <tmp>/server-<name>.pem, <tmp>/server-<name>.key
//! <tmp>/devices/<cn>/cert.pem, <tmp>/devices/<cn>/key.pem
//! ```
//! Private keys are written with mode 0600.

use std::fs;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Common Name of the test CA.
pub const CA_CN: &str = "mqtls test CA";

/// A server certificate and its key on disk.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A device (client) certificate and its key on disk.
#[derive(Debug, Clone)]
pub struct ClientCert {
    pub cn: String,
    /// Leaf certificate only (no chain).
    pub cert: PathBuf,
    /// PKCS#8 private key, mode 0600.
    pub key: PathBuf,
    /// The DER INTEGER content bytes of the serial, exactly as
    /// `x509_parser::certificate::X509Certificate::raw_serial()` returns them.
    pub serial: Vec<u8>,
}

/// A test certificate authority living in its own temporary directory.
pub struct Pki {
    dir: tempfile::TempDir,
    ca_cert: Certificate,
    ca_key: KeyPair,
    ca_pem_path: PathBuf,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    /// A fresh CA ("mqtls test CA") in a new temporary directory.
    pub fn new() -> Pki {
        Self::with_ca_name(CA_CN)
    }

    /// An unrelated CA (different key, CN "mqtls untrusted CA") in its own
    /// temporary directory: certificates it issues are not trusted by `self`.
    pub fn other_ca() -> Pki {
        Self::with_ca_name("mqtls untrusted CA")
    }

    /// A fresh CA with the given Common Name.
    pub fn with_ca_name(ca_cn: &str) -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("mqtls-test-")
            .tempdir()
            .expect("create temp dir");
        let ca_key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name = dn(ca_cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        let ca_cert = params.self_signed(&ca_key).expect("self-sign CA");
        let ca_pem_path = dir.path().join("ca.pem");
        write_file(&ca_pem_path, ca_cert.pem().as_bytes(), 0o644);
        write_file(&dir.path().join("ca.key"), ca_key.serialize_pem().as_bytes(), 0o600);
        Pki {
            dir,
            ca_cert,
            ca_key,
            ca_pem_path,
        }
    }

    /// The temporary directory (removed when the `Pki` is dropped).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `<tmp>/ca.pem`.
    pub fn ca_pem_path(&self) -> &Path {
        &self.ca_pem_path
    }

    /// The CA certificate in DER form.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca_cert.der().clone()
    }

    /// A server certificate (serverAuth) for `sans`; each SAN is parsed as an
    /// IP address first, otherwise taken as a DNS name. CN = `name`.
    /// Written to `<tmp>/server-<name>.pem` / `.key`.
    pub fn server(&self, name: &str, sans: &[&str]) -> ServerCert {
        let key = KeyPair::generate().expect("generate server key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("server params");
        params.distinguished_name = dn(name);
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*s).try_into().expect("valid DNS SAN")),
            })
            .collect();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("sign server cert");
        let cert_path = self.dir().join(format!("server-{name}.pem"));
        let key_path = self.dir().join(format!("server-{name}.key"));
        write_file(&cert_path, cert.pem().as_bytes(), 0o644);
        write_file(&key_path, key.serialize_pem().as_bytes(), 0o600);
        ServerCert {
            cert: cert_path,
            key: key_path,
        }
    }

    /// A device certificate: subject CN = `cn`, clientAuth EKU, a random
    /// 16-byte serial (recorded in [`ClientCert::serial`]). Written to
    /// `<tmp>/devices/<cn>/cert.pem` (leaf only) and `key.pem` (mode 0600).
    /// Calling it again for the same `cn` replaces the files with a new
    /// certificate and key (new serial).
    pub fn client(&self, cn: &str) -> ClientCert {
        self.client_in(&self.device_dir(cn), cn)
    }

    /// Like [`Pki::client`] but written to `<tmp>/operators/<cn>/`, for
    /// identities that are not devices (e.g. the observer), so they never
    /// show up in the devices directory.
    pub fn operator(&self, cn: &str) -> ClientCert {
        self.client_in(&self.dir().join("operators").join(cn), cn)
    }

    /// A client certificate for `cn` written as `cert.pem`/`key.pem` in `dir`.
    pub fn client_in(&self, dev_dir: &Path, cn: &str) -> ClientCert {
        let key = KeyPair::generate().expect("generate client key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name = dn(cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("sign client cert");
        fs::create_dir_all(dev_dir).expect("create device dir");
        let cert_path = dev_dir.join("cert.pem");
        let key_path = dev_dir.join("key.pem");
        write_file(&cert_path, cert.pem().as_bytes(), 0o644);
        write_file(&key_path, key.serialize_pem().as_bytes(), 0o600);
        ClientCert {
            cn: cn.to_owned(),
            cert: cert_path,
            key: key_path,
            serial,
        }
    }

    /// Signs a PKCS#10 request (PEM) as a device certificate, the way an outside CA answers a CSR; returns
    /// the certificate (PEM) and its serial.
    pub fn sign_csr(&self, csr_pem: &str) -> (String, Vec<u8>) {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).expect("parse CSR");
        let serial = random_serial();
        csr.params.serial_number = Some(SerialNumber::from_slice(&serial));
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        csr.params.use_authority_key_identifier_extension = true;
        let cert = csr.signed_by(&self.ca_cert, &self.ca_key).expect("sign CSR");
        (cert.pem(), serial)
    }

    /// `<tmp>/devices/<cn>/` (may not exist yet).
    pub fn device_dir(&self, cn: &str) -> PathBuf {
        self.dir().join("devices").join(cn)
    }

    /// `<tmp>/devices/`.
    pub fn devices_dir(&self) -> PathBuf {
        self.dir().join("devices")
    }

    /// Root store containing only this CA.
    pub fn root_store(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der()).expect("add CA to root store");
        roots
    }

    /// A rustls client config trusting only this CA, presenting `client` if
    /// given (otherwise no client certificate).
    pub fn rustls_client_config(&self, client: Option<&ClientCert>) -> Arc<rustls::ClientConfig> {
        self.rustls_client_config_versions(client, rustls::DEFAULT_VERSIONS)
    }

    /// Like [`Pki::rustls_client_config`], restricted to the given protocol
    /// versions (e.g. `&[&rustls::version::TLS12]`).
    pub fn rustls_client_config_versions(
        &self,
        client: Option<&ClientCert>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ClientConfig> {
        let builder = rustls::ClientConfig::builder_with_provider(super::provider())
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_root_certificates(self.root_store());
        let config = match client {
            Some(c) => builder
                .with_client_auth_cert(load_certs(&c.cert), load_key(&c.key))
                .expect("client auth cert"),
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }
}

/// All certificates in a PEM file.
pub fn load_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap_or_else(|e| panic!("open {}: {e:?}", path.display()))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("parse {}: {e:?}", path.display()))
}

/// The private key in a PEM file.
pub fn load_key(path: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(path).unwrap_or_else(|e| panic!("read key {}: {e:?}", path.display()))
}

/// The raw serial (DER INTEGER content bytes) of a DER certificate.
pub fn raw_serial(der: &[u8]) -> Vec<u8> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse certificate");
    cert.raw_serial().to_vec()
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// 16 random bytes from the OS with the top bit clear and the first byte
/// non-zero, so the DER encoding is exactly these bytes (no sign padding, no
/// stripped leading zero) and `raw_serial()` returns them unchanged.
pub fn random_serial() -> Vec<u8> {
    let mut serial = random_bytes(16);
    serial[0] = (serial[0] & 0x7f).max(1);
    serial
}

/// `n` bytes from /dev/urandom.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf
}

/// Write `contents` to `path` (create or truncate) with the given mode. The
/// mode applies on creation; an existing file is chmod'ed as well.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_permissions(fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    f.write_all(contents)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
