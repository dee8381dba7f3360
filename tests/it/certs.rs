//! `mqtls certs` as an operator runs it: every verb on a temporary directory, the results checked by
//! openssl and x509-parser, loaded by `mqtls check`, and finally used for real: devices issued by
//! `mqtls certs` publish through mqtls to a real Mosquitto that trusts only the CA made by `init-ca`.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::common::daemon::{BIN, GUARD};
use crate::common::logs::Logs;
use crate::common::mqtt_client::{
    device_v4, is_puback_v4, observer_as, spawn_eventloop_v4, wait_connack_v4, MQTT_DEADLINE,
};
use crate::common::pki::{load_certs, raw_serial, write_file, ClientCert};
use crate::common::proxy::{ProxyConfig, RunningProxy};
use crate::common::{Mosquitto, Pki};
use rumqttc::QoS;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateSigningRequestDer;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;

const KEY_TYPES: [&str; 3] = ["ecdsa-p256", "ed25519", "rsa2048"];

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// A temporary working directory where the commands run, as an operator would run them in a shell: the
/// CA goes to `./ca`, devices to the default `./devices`.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::Builder::new()
            .prefix("mqtls-certs-")
            .tempdir()
            .expect("tempdir");
        Site { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs `mqtls ARGS` in the site directory.
    fn mqtls(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run mqtls")
    }

    /// Runs `mqtls ARGS` and requires exit 0.
    fn ok(&self, args: &[&str]) -> Output {
        let out = self.mqtls(args);
        assert_eq!(out.status.code(), Some(0), "mqtls {args:?}:\n{}", describe(&out));
        out
    }

    fn init_ca(&self) {
        self.ok(&["certs", "init-ca", "--out", "ca"]);
    }

    fn issue(&self, name: &str, extra: &[&str]) -> Output {
        let mut args = vec!["certs", "issue", "--ca", "ca", name];
        args.extend_from_slice(extra);
        self.ok(&args)
    }

    fn device(&self, name: &str) -> PathBuf {
        self.path("devices").join(name)
    }

    /// Runs openssl in the site directory.
    fn openssl(&self, args: &[&str]) -> Output {
        Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run openssl (scripts/install-deps.sh installs it)")
    }

    /// A config that serves the device directory, for `mqtls check` and `certs list --config`.
    fn config(&self, extra_upstream: &str) -> PathBuf {
        let path = self.path("mqtls.toml");
        let text = format!(
            "[listen]\naddress = \"127.0.0.1:1883\"\n\n[upstream]\naddress = \"broker.example.com:8883\"\n\
             ca_file = \"ca/ca.pem\"\n{extra_upstream}\n[device_dir]\npath = \"devices\"\nsource = \"192.168.10.0/24\"\n"
        );
        std::fs::write(&path, text).expect("write config");
        path
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn leaf_der(path: &Path) -> Vec<u8> {
    load_certs(path).swap_remove(0).to_vec()
}

fn file_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// The row of `name` in a table printed by `certs list` or `check`.
fn row<'a>(table: &'a str, name: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row for {name} in:\n{table}"))
}

/// What an identity looks like to a certificate parser.
struct Leaf {
    cn: String,
    issuer_cn: String,
    client_auth_only: bool,
    digital_signature_only: bool,
    is_ca: Option<bool>,
    aki: Option<Vec<u8>>,
    serial: Vec<u8>,
    days: i64,
    key_oid: String,
}

fn parse_leaf(der: &[u8]) -> Leaf {
    let (_, c) = x509_parser::parse_x509_certificate(der).expect("parse certificate");
    let cn = |n: &x509_parser::x509::X509Name| n.iter_common_name().next().unwrap().as_str().unwrap().to_string();
    let eku = c.extended_key_usage().unwrap().map(|e| e.value.clone());
    let ku = c.key_usage().unwrap().map(|k| k.value);
    let aki = c.iter_extensions().find_map(|e| match e.parsed_extension() {
        ParsedExtension::AuthorityKeyIdentifier(a) => a.key_identifier.as_ref().map(|k| k.0.to_vec()),
        _ => None,
    });
    Leaf {
        cn: cn(c.subject()),
        issuer_cn: cn(c.issuer()),
        client_auth_only: eku.is_some_and(|e| e.client_auth && !e.server_auth && !e.any && e.other.is_empty()),
        digital_signature_only: ku.is_some_and(|k| k.digital_signature() && k.flags.count_ones() == 1),
        is_ca: c.basic_constraints().unwrap().map(|b| b.value.ca),
        aki,
        serial: c.raw_serial().to_vec(),
        days: (c.validity().not_after.timestamp() - c.validity().not_before.timestamp()) / 86_400,
        key_oid: c.public_key().algorithm.algorithm.to_id_string(),
    }
}

fn subject_key_id(der: &[u8]) -> Vec<u8> {
    let (_, c) = x509_parser::parse_x509_certificate(der).expect("parse certificate");
    let ski = c.iter_extensions().find_map(|e| match e.parsed_extension() {
        ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
        _ => None,
    });
    ski.expect("SKI")
}

// ---------------------------------------------------------------------------------------------------------
// init-ca

#[test]
fn init_ca_writes_a_ca_certificate_and_a_key_only_its_owner_can_read() {
    let site = Site::new();
    site.ok(&[
        "certs",
        "init-ca",
        "--out",
        "ca",
        "--name",
        "Plant 3 devices",
        "--days",
        "1000",
    ]);
    assert_eq!(file_names(&site.path("ca")), set(&["ca.key", "ca.pem"]));
    assert_eq!(mode(&site.path("ca/ca.key")), 0o600);
    assert_eq!(mode(&site.path("ca")), 0o700);
    let der = leaf_der(&site.path("ca/ca.pem"));
    let (_, c) = x509_parser::parse_x509_certificate(&der).expect("parse CA");
    let bc = c.basic_constraints().unwrap().expect("basicConstraints").value;
    assert!(bc.ca && bc.path_len_constraint == Some(0), "{bc:?}");
    let ku = c.key_usage().unwrap().expect("keyUsage").value;
    assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature(), "{ku:?}");
    assert_eq!(c.subject(), c.issuer());
    assert_eq!(c.subject().to_string(), "CN=Plant 3 devices");
    let days = (c.validity().not_after.timestamp() - c.validity().not_before.timestamp()) / 86_400;
    assert_eq!(days, 1000, "1000 days from now, started an hour ago");
    let verify = site.openssl(&["verify", "-CAfile", "ca/ca.pem", "ca/ca.pem"]);
    assert!(verify.status.success(), "{}", describe(&verify));
}

#[test]
fn init_ca_never_replaces_an_existing_ca() {
    let site = Site::new();
    site.init_ca();
    let before = std::fs::read(site.path("ca/ca.key")).unwrap();
    let out = site.mqtls(&["certs", "init-ca", "--out", "ca"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("ca/ca.pem: a CA certificate already exists"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(site.path("ca/ca.key")).unwrap(),
        before,
        "the CA key was replaced"
    );
}

// ---------------------------------------------------------------------------------------------------------
// issue

#[test]
fn issue_writes_the_device_directory_layout_with_a_client_certificate_for_the_name() {
    let site = Site::new();
    site.init_ca();
    let out = site.issue("boiler-7", &[]);
    let dir = site.device("boiler-7");
    assert_eq!(
        file_names(&dir),
        set(&["cert.pem", "key.pem"]),
        "no device.toml without --client-id"
    );
    assert_eq!(mode(&dir.join("key.pem")), 0o600);

    let leaf = parse_leaf(&leaf_der(&dir.join("cert.pem")));
    assert_eq!(leaf.cn, "boiler-7");
    assert_eq!(leaf.issuer_cn, "mqtls device CA");
    assert!(leaf.client_auth_only, "EKU must be clientAuth only");
    assert!(leaf.digital_signature_only, "keyUsage must be digitalSignature only");
    assert_eq!(leaf.is_ca, Some(false));
    assert_eq!(leaf.days, 365);
    assert_eq!(leaf.key_oid, "1.2.840.10045.2.1", "ecdsa-p256 is the default");
    let ca_ski = subject_key_id(&leaf_der(&site.path("ca/ca.pem")));
    assert_eq!(leaf.aki.as_deref(), Some(&ca_ski[..]), "AKI must name the CA's key");

    let verify = site.openssl(&[
        "verify",
        "-CAfile",
        "ca/ca.pem",
        "-purpose",
        "sslclient",
        "devices/boiler-7/cert.pem",
    ]);
    assert!(verify.status.success(), "{}", describe(&verify));
    assert!(text(&verify.stdout).contains("devices/boiler-7/cert.pem: OK"));

    // The serial printed by issue is the one in the certificate, as openssl prints it.
    let serial = site.openssl(&["x509", "-in", "devices/boiler-7/cert.pem", "-noout", "-serial"]);
    let serial = text(&serial.stdout)
        .trim()
        .strip_prefix("serial=")
        .expect("serial=")
        .to_string();
    assert!(
        text(&out.stdout).contains(&format!("serial {serial}")),
        "{}",
        describe(&out)
    );
    assert_eq!(serial.len(), 32, "16 random bytes");
    let parsed: String = leaf.serial.iter().map(|b| format!("{b:02X}")).collect();
    assert_eq!(parsed, serial, "x509-parser and openssl read the same serial");
}

#[test]
fn every_key_type_is_issued_verified_by_openssl_and_loaded_by_mqtls() {
    let site = Site::new();
    site.init_ca();
    let oids = [
        ("ecdsa-p256", "1.2.840.10045.2.1"),
        ("ed25519", "1.3.101.112"),
        ("rsa2048", "1.2.840.113549.1.1.1"),
    ];
    for (key_type, oid) in oids {
        let name = format!("dev-{key_type}");
        site.issue(&name, &["--key-type", key_type]);
        let cert = format!("devices/{name}/cert.pem");
        let verify = site.openssl(&["verify", "-CAfile", "ca/ca.pem", "-purpose", "sslclient", &cert]);
        assert!(verify.status.success(), "{key_type}: {}", describe(&verify));
        let leaf = parse_leaf(&leaf_der(&site.path(&cert)));
        assert_eq!(leaf.key_oid, oid, "{key_type}");
        assert_eq!(leaf.cn, name);
        assert_eq!(mode(&site.device(&name).join("key.pem")), 0o600, "{key_type}");
        // The key parses for openssl too (PKCS#8), and it is the certificate's key.
        let pubkey_of_key = site.openssl(&["pkey", "-in", &format!("devices/{name}/key.pem"), "-pubout"]);
        let pubkey_of_cert = site.openssl(&["x509", "-in", &cert, "-noout", "-pubkey"]);
        assert!(pubkey_of_key.status.success(), "{}", describe(&pubkey_of_key));
        assert_eq!(
            pubkey_of_key.stdout, pubkey_of_cert.stdout,
            "{key_type}: key and certificate differ"
        );
    }
    // mqtls builds a TLS client identity from each (the same loading as `mqtls run`).
    let config = site.config("");
    let out = site.ok(&["check", "--config", config.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("OK: 3 device(s)"), "{stdout}");
    for (key_type, _) in oids {
        let r = row(&stdout, &format!("dev-{key_type}"));
        assert!(r.contains("CN=mqtls device CA"), "check shows the issuer: {r}");
    }
}

#[test]
fn issue_gives_every_certificate_its_own_serial() {
    let site = Site::new();
    site.init_ca();
    site.issue("a", &[]);
    site.issue("b", &[]);
    let a = raw_serial(&leaf_der(&site.device("a").join("cert.pem")));
    let b = raw_serial(&leaf_der(&site.device("b").join("cert.pem")));
    assert_ne!(a, b);
}

#[test]
fn issue_refuses_to_replace_an_identity_and_force_rotates_it() {
    let site = Site::new();
    site.init_ca();
    site.issue("boiler-7", &[]);
    let dir = site.device("boiler-7");
    let (cert_before, key_before) = (
        std::fs::read(dir.join("cert.pem")).unwrap(),
        std::fs::read(dir.join("key.pem")).unwrap(),
    );

    let out = site.mqtls(&["certs", "issue", "--ca", "ca", "boiler-7"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("devices/boiler-7: a device identity already exists"),
        "{stderr}"
    );
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(std::fs::read(dir.join("cert.pem")).unwrap(), cert_before);
    assert_eq!(std::fs::read(dir.join("key.pem")).unwrap(), key_before);

    let out = site.issue("boiler-7", &["--force"]);
    assert!(
        text(&out.stdout).contains("replaced the identity of device \"boiler-7\""),
        "{}",
        describe(&out)
    );
    assert_ne!(std::fs::read(dir.join("cert.pem")).unwrap(), cert_before);
    assert_ne!(
        std::fs::read(dir.join("key.pem")).unwrap(),
        key_before,
        "rotation makes a new key"
    );
    assert_eq!(mode(&dir.join("key.pem")), 0o600);
    assert_eq!(
        file_names(&dir),
        set(&["cert.pem", "key.pem"]),
        "no temporary file is left behind"
    );
    // The new pair matches: mqtls loads it.
    let config = site.config("");
    site.ok(&["check", "--config", config.to_str().unwrap()]);
}

#[test]
fn issue_client_id_goes_to_device_toml_and_the_config_matches_on_it() {
    let site = Site::new();
    site.init_ca();
    site.issue("boiler-7", &["--client-id", "BOILER 7 \"legacy\""]);
    let settings = site.device("boiler-7").join("device.toml");
    let config_path = site.config("");
    let config = mqtls::Config::load(&config_path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.devices[0].client_id.as_deref(), Some("BOILER 7 \"legacy\""));

    // Rotation keeps device.toml (and whatever else the operator put there) unless asked.
    let extra = "# boiler room\nsource = \"192.168.10.7\"\n";
    let kept = format!("{}{extra}", std::fs::read_to_string(&settings).unwrap());
    std::fs::write(&settings, &kept).unwrap();
    site.issue("boiler-7", &["--force"]);
    assert_eq!(std::fs::read_to_string(&settings).unwrap(), kept);
    site.issue("boiler-7", &["--force", "--client-id", "boiler-7b"]);
    let now = std::fs::read_to_string(&settings).unwrap();
    assert!(now.contains(extra), "other settings and comments survive:\n{now}");
    let config = mqtls::Config::load(&config_path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.devices[0].client_id.as_deref(), Some("boiler-7b"));
    assert_eq!(config.devices[0].sources[0].to_string(), "192.168.10.7/32");
}

#[test]
fn names_that_are_not_safe_directory_names_are_refused_and_nothing_is_written() {
    let site = Site::new();
    site.init_ca();
    for (name, why) in [
        ("", "a name is required"),
        ("..", "`.` and `..` are not directory names"),
        ("../escape", "must not contain `/`"),
        ("a/b", "must not contain `/`"),
        (".hidden", "must not start with `.`"),
        ("tab\there", "must not contain control characters"),
    ] {
        for verb in [&["certs", "issue", "--ca", "ca"][..], &["certs", "csr"][..]] {
            let mut args = verb.to_vec();
            args.push(name);
            let out = site.mqtls(&args);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {}", describe(&out));
            let stderr = text(&out.stderr);
            assert!(
                stderr.contains(&format!("error: invalid name {name:?}: {why}")),
                "{args:?}: {stderr}"
            );
        }
    }
    assert!(!site.path("devices").exists(), "a refused name created files");
    assert!(!site.path("escape").exists());
}

#[test]
fn issue_refuses_a_ca_key_that_others_can_read() {
    let site = Site::new();
    site.init_ca();
    chmod(&site.path("ca/ca.key"), 0o644);
    let out = site.mqtls(&["certs", "issue", "--ca", "ca", "boiler-7"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(
            "ca/ca.key: the CA's private key is readable by group or others (mode 0644); run `chmod 600 ca/ca.key`"
        ),
        "{stderr}"
    );
    assert!(!site.device("boiler-7").exists());
}

#[test]
fn issue_refuses_a_directory_without_a_ca() {
    let site = Site::new();
    std::fs::create_dir(site.path("ca")).unwrap();
    let out = site.mqtls(&["certs", "issue", "--ca", "ca", "boiler-7"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("ca/ca.pem: cannot read"),
        "{}",
        describe(&out)
    );
    assert!(text(&out.stderr).contains("mqtls certs init-ca"), "{}", describe(&out));
}

#[test]
fn issue_refuses_a_ca_key_that_does_not_match_its_certificate_and_writes_nothing() {
    let site = Site::new();
    site.init_ca();
    site.ok(&["certs", "init-ca", "--out", "ca2"]);
    std::fs::copy(site.path("ca2/ca.key"), site.path("ca/ca.key")).unwrap();
    let out = site.mqtls(&["certs", "issue", "--ca", "ca", "boiler-7"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("ca/ca.key: does not match the CA certificate in ca/ca.pem"),
        "{}",
        describe(&out)
    );
    assert!(!site.device("boiler-7").exists(), "a device directory was left behind");
}

#[test]
fn issue_days_sets_the_validity_and_never_outlives_the_ca() {
    let site = Site::new();
    site.ok(&["certs", "init-ca", "--out", "ca", "--days", "90"]);
    site.issue("short", &["--days", "30"]);
    assert_eq!(parse_leaf(&leaf_der(&site.device("short").join("cert.pem"))).days, 30);

    let out = site.issue("long", &["--days", "365"]);
    assert!(
        text(&out.stdout).contains("cut to end with the CA's"),
        "{}",
        describe(&out)
    );
    let not_after = |path: &Path| {
        let der = leaf_der(path);
        let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
        c.validity().not_after.timestamp()
    };
    assert_eq!(
        not_after(&site.device("long").join("cert.pem")),
        not_after(&site.path("ca/ca.pem"))
    );

    let out = site.mqtls(&["certs", "issue", "--ca", "ca", "never", "--days", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--days 0: must be between 1 and 36500"),
        "{}",
        describe(&out)
    );
}

// ---------------------------------------------------------------------------------------------------------
// csr

fn parse_csr(path: &Path) -> (String, Vec<u8>, bool) {
    let der = CertificateSigningRequestDer::from_pem_file(path).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref()).expect("parse CSR");
    let info = &csr.certification_request_info;
    let cn = info
        .subject
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let client_auth = csr
        .requested_extensions()
        .into_iter()
        .flatten()
        .any(|e| matches!(e, ParsedExtension::ExtendedKeyUsage(k) if k.client_auth));
    (cn, info.subject_pki.raw.to_vec(), client_auth)
}

#[test]
fn csr_writes_a_key_and_a_request_that_carries_the_name() {
    let site = Site::new();
    for key_type in KEY_TYPES {
        let name = format!("ext-{key_type}");
        site.ok(&["certs", "csr", &name, "--key-type", key_type]);
        let dir = site.device(&name);
        assert_eq!(file_names(&dir), set(&["csr.pem", "key.pem"]));
        assert_eq!(mode(&dir.join("key.pem")), 0o600);
        let (cn, _, client_auth) = parse_csr(&dir.join("csr.pem"));
        assert_eq!(cn, name);
        assert!(client_auth, "{key_type}: the CSR asks for clientAuth");
        let verify = site.openssl(&["req", "-in", &format!("devices/{name}/csr.pem"), "-noout", "-verify"]);
        assert!(verify.status.success(), "{key_type}: {}", describe(&verify));
        let subject = site.openssl(&["req", "-in", &format!("devices/{name}/csr.pem"), "-noout", "-subject"]);
        assert_eq!(text(&subject.stdout).trim(), format!("subject=CN = {name}"));
    }
}

/// A CA that is not mqtls's: made and run by openssl, as a corporate PKI would.
fn openssl_ca(site: &Site) {
    let out = site.openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "other-ca.key",
        "-out",
        "other-ca.pem",
        "-subj",
        "/CN=Corporate PKI",
        "-days",
        "30",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
}

fn openssl_sign(site: &Site, ca: &str, name: &str, days: &str) {
    let out = site.openssl(&[
        "x509",
        "-req",
        "-in",
        &format!("devices/{name}/csr.pem"),
        "-CA",
        &format!("{ca}.pem"),
        "-CAkey",
        &format!("{ca}.key"),
        "-set_serial",
        "0x1234abcd",
        "-days",
        days,
        "-copy_extensions",
        "copy",
        "-out",
        &format!("devices/{name}/cert.pem"),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn a_pending_device_is_skipped_with_a_warning_and_its_signed_certificate_completes_it() {
    let site = Site::new();
    site.init_ca();
    site.issue("boiler-7", &[]);
    site.ok(&["certs", "csr", "meter-9"]);
    let config = site.config("");
    let config_arg = config.to_str().unwrap();

    let parsed = mqtls::Config::load(&config).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        parsed.devices.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        ["boiler-7"]
    );
    assert_eq!(parsed.pending.len(), 1);
    let out = site.ok(&["check", "--config", config_arg]);
    let stderr = text(&out.stderr);
    let pending = format!(
        "warning: device \"meter-9\" is pending: {} has key.pem and csr.pem but no cert.pem",
        site.device("meter-9").display()
    );
    assert!(stderr.contains(&pending), "{}", describe(&out));
    assert!(row(&text(&out.stdout), "meter-9").contains("PENDING"));
    assert!(text(&out.stdout).contains("OK: 1 device(s)"));

    // Someone else's CA signs the request; the certificate dropped next to the key completes the device.
    openssl_ca(&site);
    openssl_sign(&site, "other-ca", "meter-9", "20");
    let verify = site.openssl(&[
        "verify",
        "-CAfile",
        "other-ca.pem",
        "-purpose",
        "sslclient",
        "devices/meter-9/cert.pem",
    ]);
    assert!(verify.status.success(), "{}", describe(&verify));
    let out = site.ok(&["check", "--config", config_arg]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("OK: 2 device(s)"), "{}", describe(&out));
    assert!(row(&stdout, "meter-9").contains("CN=Corporate PKI"), "{stdout}");
    assert!(!text(&out.stderr).contains("pending"), "{}", describe(&out));
}

#[test]
fn an_entry_with_a_csr_but_no_key_is_still_a_configuration_error() {
    let site = Site::new();
    site.init_ca();
    site.issue("boiler-7", &[]);
    site.ok(&["certs", "csr", "meter-9"]);
    std::fs::remove_file(site.device("meter-9").join("key.pem")).unwrap();
    let config = site.config("");
    let out = site.mqtls(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let missing = format!(
        "{}: device \"meter-9\": the device's certificate is missing",
        site.device("meter-9").join("cert.pem").display()
    );
    assert!(text(&out.stderr).contains(&missing), "{}", describe(&out));
}

#[test]
fn a_config_whose_only_devices_are_pending_serves_nobody_and_says_why() {
    let site = Site::new();
    site.ok(&["certs", "csr", "meter-9"]);
    let config = site.config("");
    let out = site.mqtls(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("`device`: no device is ready: 1 device(s) in the device directory are pending"),
        "{}",
        describe(&out)
    );
}

#[test]
fn csr_reuse_key_renews_without_touching_the_working_key() {
    let site = Site::new();
    site.init_ca();
    site.issue("boiler-7", &[]);
    let dir = site.device("boiler-7");
    let key_before = std::fs::read(dir.join("key.pem")).unwrap();
    site.ok(&["certs", "csr", "boiler-7", "--reuse-key"]);
    assert_eq!(std::fs::read(dir.join("key.pem")).unwrap(), key_before);
    assert_eq!(file_names(&dir), set(&["cert.pem", "csr.pem", "key.pem"]));
    let (_, csr_spki, _) = parse_csr(&dir.join("csr.pem"));
    let cert = leaf_der(&dir.join("cert.pem"));
    let (_, c) = x509_parser::parse_x509_certificate(&cert).unwrap();
    assert_eq!(csr_spki, c.public_key().raw, "the CSR is for the key already in use");
    // Still complete: the current certificate keeps serving until the renewed one replaces it.
    let config = site.config("");
    let out = site.ok(&["check", "--config", config.to_str().unwrap()]);
    assert!(!row(&text(&out.stdout), "boiler-7").contains("PENDING"));
}

#[test]
fn csr_refuses_an_existing_identity_and_force_makes_it_pending_with_a_new_key() {
    let site = Site::new();
    site.init_ca();
    site.issue("boiler-7", &[]);
    let dir = site.device("boiler-7");
    let key_before = std::fs::read(dir.join("key.pem")).unwrap();
    let out = site.mqtls(&["certs", "csr", "boiler-7"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("devices/boiler-7: a device identity already exists"),
        "{stderr}"
    );
    assert!(stderr.contains("--reuse-key") && stderr.contains("--force"), "{stderr}");
    assert_eq!(file_names(&dir), set(&["cert.pem", "key.pem"]));

    let out = site.ok(&["certs", "csr", "boiler-7", "--force"]);
    assert!(
        text(&out.stdout).contains("old cert.pem was removed"),
        "{}",
        describe(&out)
    );
    assert_eq!(file_names(&dir), set(&["csr.pem", "key.pem"]));
    assert_ne!(std::fs::read(dir.join("key.pem")).unwrap(), key_before);
    let out = site.ok(&["certs", "list", "--dir", "devices"]);
    assert!(row(&text(&out.stdout), "boiler-7").contains("PENDING"));
}

#[test]
fn issue_completes_a_pending_device_and_drops_its_stale_csr() {
    let site = Site::new();
    site.init_ca();
    site.ok(&["certs", "csr", "meter-9"]);
    site.issue("meter-9", &["--force"]);
    assert_eq!(file_names(&site.device("meter-9")), set(&["cert.pem", "key.pem"]));
}

// ---------------------------------------------------------------------------------------------------------
// list

/// A device whose certificate expired yesterday (self-signed: `list` reports, it does not verify).
fn expired_device(dir: &Path, name: &str) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(400);
    params.not_after = now - time::Duration::days(1);
    let cert = params.self_signed(&key).unwrap();
    std::fs::create_dir_all(dir.join(name)).unwrap();
    write_file(&dir.join(name).join("cert.pem"), cert.pem().as_bytes(), 0o644);
    write_file(&dir.join(name).join("key.pem"), key.serialize_pem().as_bytes(), 0o600);
}

#[test]
fn list_flags_expired_expiring_readable_and_pending_identities() {
    let site = Site::new();
    site.init_ca();
    site.issue("fine", &[]);
    site.issue("soon", &["--days", "10"]);
    site.issue("open-key", &[]);
    chmod(&site.device("open-key").join("key.pem"), 0o640);
    expired_device(&site.path("devices"), "old");
    site.ok(&["certs", "csr", "waiting"]);

    let out = site.mqtls(&["certs", "list", "--dir", "devices"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let table = text(&out.stdout);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(row(&table, "fine").ends_with(" -"), "{table}");
    assert!(row(&table, "soon").ends_with("EXPIRES SOON"), "{table}");
    assert!(row(&table, "open-key").ends_with("KEY READABLE BY OTHERS"), "{table}");
    assert!(row(&table, "old").ends_with("EXPIRED"), "{table}");
    assert!(row(&table, "waiting").ends_with("PENDING"), "{table}");
    assert!(
        text(&out.stderr).contains("3 of 5 identities need attention"),
        "{}",
        describe(&out)
    );

    // The serial column is openssl's.
    let serial = site.openssl(&["x509", "-in", "devices/fine/cert.pem", "-noout", "-serial"]);
    let serial = text(&serial.stdout).trim().strip_prefix("serial=").unwrap().to_string();
    assert!(row(&table, "fine").contains(&serial), "{table}");
    assert!(row(&table, "fine").contains(" 364 "), "days left: {table}");

    // A shorter threshold; and JSON for scripts.
    let out = site.mqtls(&["certs", "list", "--dir", "devices", "--expires-within", "5", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    let flags = |name: &str| {
        let r = rows
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {rows:?}"));
        r["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert!(flags("soon").is_empty(), "10 days left is not within 5");
    assert_eq!(flags("old"), ["EXPIRED"]);
    assert_eq!(flags("open-key"), ["KEY_READABLE_BY_OTHERS"]);
    assert_eq!(flags("waiting"), ["PENDING"]);
    let fine = rows.iter().find(|r| r["name"] == "fine").unwrap();
    assert_eq!(fine["serial"], serial.as_str());
    assert_eq!(fine["key_mode"], "0600");
    assert_eq!(fine["subject"], "CN=fine");
}

#[test]
fn list_exits_0_when_nothing_needs_attention_even_with_a_pending_device() {
    let site = Site::new();
    site.init_ca();
    site.issue("fine", &[]);
    site.ok(&["certs", "csr", "waiting"]);
    let config = site.config("");
    let out = site.ok(&[
        "certs",
        "list",
        "--config",
        config.to_str().unwrap(),
        "--dir",
        "devices",
    ]);
    let table = text(&out.stdout);
    assert_eq!(
        table.lines().count(),
        3,
        "the config's directory is listed once:\n{table}"
    );
    assert!(row(&table, "fine").contains("CN=mqtls device CA"));
}

#[test]
fn list_with_a_broken_config_exits_1_naming_the_problem() {
    let site = Site::new();
    let config = site.path("mqtls.toml");
    std::fs::write(
        &config,
        "[upstream]\naddress = \"b:8883\"\n[device_dir]\npath = \"nowhere\"\n",
    )
    .unwrap();
    let out = site.mqtls(&["certs", "list", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("`device_dir.path`: cannot read"),
        "{}",
        describe(&out)
    );
}

#[test]
fn list_flags_a_certificate_that_is_not_pem_as_invalid_naming_the_file() {
    let site = Site::new();
    site.init_ca();
    site.issue("fine", &[]);
    site.issue("broken", &[]);
    std::fs::write(site.device("broken").join("cert.pem"), "not a certificate\n").unwrap();
    let out = site.mqtls(&["certs", "list", "--dir", "devices"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let table = text(&out.stdout);
    assert!(
        row(&table, "broken").contains("INVALID: devices/broken/cert.pem: "),
        "{}",
        describe(&out)
    );
    assert!(!row(&table, "fine").contains("INVALID"), "{}", describe(&out));
}

#[test]
fn list_of_a_missing_directory_fails_naming_it() {
    let site = Site::new();
    let out = site.mqtls(&["certs", "list", "--dir", "no-such-devices"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("no-such-devices: cannot read the directory"),
        "{}",
        describe(&out)
    );
}

// ---------------------------------------------------------------------------------------------------------
// Private key permissions (mqtls refuses keys that others can read, unless told otherwise)

#[test]
fn a_0644_device_key_is_refused_naming_the_file_and_the_fix() {
    let site = Site::new();
    site.init_ca();
    site.issue("boiler-7", &[]);
    let key = site.device("boiler-7").join("key.pem");
    chmod(&key, 0o644);
    let config = site.config("");
    for verb in ["check", "run"] {
        let out = site.mqtls(&[verb, "--config", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{verb}: {}", describe(&out));
        let stderr = text(&out.stderr);
        let key = key.display();
        assert!(
            stderr.contains(&format!(
                "{key}: device \"boiler-7\": `key`: private key is readable by group or others (mode 0644); \
                 run `chmod 600 {key}` or set upstream.allow_readable_keys = true"
            )),
            "{verb}: {stderr}"
        );
    }
}

#[test]
fn allow_readable_keys_accepts_a_0644_key_and_still_flags_it() {
    let site = Site::new();
    site.init_ca();
    site.issue("boiler-7", &[]);
    chmod(&site.device("boiler-7").join("key.pem"), 0o644);
    let config = site.config("allow_readable_keys = true");
    let out = site.ok(&["check", "--config", config.to_str().unwrap()]);
    assert!(
        row(&text(&out.stdout), "boiler-7").contains("KEY READABLE BY OTHERS"),
        "{}",
        describe(&out)
    );
    assert!(
        text(&out.stderr).contains("warning: device \"boiler-7\": its private key is readable by group or others (mode 0644; allowed by upstream.allow_readable_keys)"),
        "{}",
        describe(&out)
    );
    let out = site.mqtls(&["certs", "list", "--config", config.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "listed even when allowed: {}",
        describe(&out)
    );
}

// ---------------------------------------------------------------------------------------------------------
// Ownership (--owner): files for a service that runs as its own user

/// The owner and group of `path`.
fn ids(path: &Path) -> (u32, u32) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.uid(), m.gid())
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Giving files away needs root; CI runs the suite as root.
fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test gives files to other users, which needs root (CI runs the suite as root)"
    );
}

/// A user that exists on this machine, other than root, from /etc/passwd (`nobody` where there is one):
/// its name, uid and primary gid.
fn system_user() -> (String, u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let users: Vec<(String, u32, u32)> = passwd
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((f.first()?.to_string(), f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
        })
        .filter(|(_, uid, gid)| *uid != 0 && *gid != 0)
        .collect();
    users
        .iter()
        .find(|(name, _, _)| name == "nobody")
        .or(users.first())
        .cloned()
        .expect("a user other than root in /etc/passwd")
}

/// A group from /etc/group other than root's and `primary`: its name and gid.
fn other_group(primary: u32) -> (String, u32) {
    let group = std::fs::read_to_string("/etc/group").expect("read /etc/group");
    group
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((f.first()?.to_string(), f.get(2)?.parse().ok()?))
        })
        .find(|(_, gid)| *gid != 0 && *gid != primary)
        .expect("a second group in /etc/group")
}

/// Runs `mqtls ARGS` in the site directory as `uid:gid` (no supplementary groups), as a service user
/// or an operator without sudo would.
fn mqtls_as(site: &Site, uid: u32, gid: u32, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--",
            BIN,
        ])
        .args(args)
        .current_dir(site.dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("run setpriv (util-linux)")
}

#[test]
fn issue_owner_gives_the_files_and_the_new_directory_to_a_user_from_etc_passwd() {
    require_root();
    let (user, uid, gid) = system_user();
    let site = Site::new();
    site.init_ca();
    let out = site.issue("boiler-7", &["--owner", &user, "--client-id", "B7"]);
    assert!(
        text(&out.stdout).contains(&format!("owner        {user} (uid {uid}, gid {gid})")),
        "{}",
        describe(&out)
    );
    let dir = site.device("boiler-7");
    assert_eq!(
        file_names(&dir),
        set(&["cert.pem", "device.toml", "key.pem"]),
        "no temporary file is left"
    );
    for path in [
        dir.clone(),
        dir.join("key.pem"),
        dir.join("cert.pem"),
        dir.join("device.toml"),
    ] {
        assert_eq!(ids(&path), (uid, gid), "{}", path.display());
    }
    assert_eq!(mode(&dir.join("key.pem")), 0o600);
    assert_eq!(
        ids(&site.path("devices")),
        (0, 0),
        "only the device's own directory is given away"
    );
    assert_eq!(ids(&site.path("ca/ca.key")), (0, 0), "the CA is never given away");
    assert_eq!(mode(&site.path("ca/ca.key")), 0o600);

    // That user can load what was made for it, as the service would; a key left to root it cannot.
    chmod(site.dir.path(), 0o755);
    chmod(&site.path("ca"), 0o755);
    let config = site.config("");
    let check = mqtls_as(&site, uid, gid, &["check", "--config", config.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(0), "{}", describe(&check));
    assert!(
        row(&text(&check.stdout), "boiler-7").contains("CN=boiler-7"),
        "{}",
        describe(&check)
    );
    site.issue("boiler-8", &[]);
    assert_eq!(
        ids(&site.device("boiler-8").join("key.pem")),
        (0, 0),
        "without --owner: the invoking user"
    );
    let check = mqtls_as(&site, uid, gid, &["check", "--config", config.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(1), "{}", describe(&check));
    assert!(text(&check.stderr).contains("boiler-8/key.pem"), "{}", describe(&check));
}

#[test]
fn issue_and_csr_owner_take_numeric_ids_and_a_group_name() {
    require_root();
    let (user, uid, gid) = system_user();
    let (group, other_gid) = other_group(gid);
    let site = Site::new();
    site.init_ca();

    site.issue("boiler-7", &["--owner", "4242:4343"]);
    let dir = site.device("boiler-7");
    for file in ["", "key.pem", "cert.pem"] {
        assert_eq!(ids(&dir.join(file)), (4242, 4343), "{file}");
    }
    // Rotation gives the new files to the new owner; the directory was there already and stays as it is.
    site.issue("boiler-7", &["--force", "--owner", &format!("{user}:{group}")]);
    assert_eq!(file_names(&dir), set(&["cert.pem", "key.pem"]));
    assert_eq!(ids(&dir.join("key.pem")), (uid, other_gid));
    assert_eq!(ids(&dir.join("cert.pem")), (uid, other_gid));
    assert_eq!(ids(&dir), (4242, 4343));
    assert_eq!(mode(&dir.join("key.pem")), 0o600);

    site.ok(&["certs", "csr", "pump-3", "--owner", &uid.to_string()]);
    let pump = site.device("pump-3");
    assert_eq!(file_names(&pump), set(&["csr.pem", "key.pem"]));
    for file in ["", "key.pem", "csr.pem"] {
        assert_eq!(
            ids(&pump.join(file)),
            (uid, gid),
            "a uid alone brings its primary group: {file}"
        );
    }
    assert_eq!(mode(&pump.join("key.pem")), 0o600);
    // Renewal with the key in place: the new CSR is given away, the key keeps its owner.
    site.ok(&["certs", "csr", "pump-3", "--reuse-key", "--owner", "4242:4343"]);
    assert_eq!(ids(&pump.join("csr.pem")), (4242, 4343));
    assert_eq!(ids(&pump.join("key.pem")), (uid, gid));
}

#[test]
fn an_unknown_owner_is_named_and_nothing_is_written() {
    let site = Site::new();
    site.init_ca();
    let (user, _, _) = system_user();
    for (owner, why) in [
        ("no-such-user-mqtls", "no user `no-such-user-mqtls` in /etc/passwd"),
        (
            &format!("{user}:no-such-group-mqtls"),
            "no group `no-such-group-mqtls` in /etc/group",
        ),
        (":4343", "a user is required"),
        ("4294967295:0", "`4294967295` is not a valid id (0 to 4294967294)"),
    ] {
        for verb in [&["certs", "issue", "--ca", "ca"][..], &["certs", "csr"][..]] {
            let mut args = verb.to_vec();
            args.extend(["--owner", owner, "boiler-7"]);
            let out = site.mqtls(&args);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {}", describe(&out));
            let stderr = text(&out.stderr);
            assert!(
                stderr.contains(&format!("error: --owner {owner}: {why}")),
                "{args:?}: {stderr}"
            );
        }
    }
    assert!(!site.path("devices").exists(), "a refused owner created files");
}

#[test]
fn owner_without_root_is_refused_before_anything_is_written() {
    require_root();
    let (_, uid, gid) = system_user();
    let site = Site::new();
    site.init_ca();
    // The site and the CA belong to that user, so it could write the device directory itself.
    for path in [
        site.dir.path().to_path_buf(),
        site.path("ca"),
        site.path("ca/ca.pem"),
        site.path("ca/ca.key"),
    ] {
        chown(&path, uid, gid);
    }
    for verb in [&["certs", "issue", "--ca", "ca"][..], &["certs", "csr"][..]] {
        let mut args = verb.to_vec();
        args.extend(["--owner", "0:0", "boiler-7"]);
        let out = mqtls_as(&site, uid, gid, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", describe(&out));
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "error: --owner 0:0: giving files to uid 0, gid 0 needs root (CAP_CHOWN), and this runs as uid {uid}; \
                 run the command with sudo"
            )),
            "{args:?}: {stderr}"
        );
        assert!(!site.path("devices").exists(), "{args:?}: files were written");
    }
    // The same user without --owner writes files it owns, and may name itself.
    let out = mqtls_as(&site, uid, gid, &["certs", "issue", "--ca", "ca", "boiler-7"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(ids(&site.device("boiler-7").join("key.pem")), (uid, gid));
    let me = format!("{uid}:{gid}");
    let out = mqtls_as(&site, uid, gid, &["certs", "csr", "--owner", &me, "pump-3"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(ids(&site.device("pump-3").join("key.pem")), (uid, gid));
}

// ---------------------------------------------------------------------------------------------------------
// Help

#[test]
fn every_verb_explains_its_use_in_help() {
    let site = Site::new();
    let out = site.ok(&["certs", "--help"]);
    for verb in ["init-ca", "issue", "csr", "list"] {
        assert!(
            text(&out.stdout).contains(verb),
            "{verb} missing from:\n{}",
            text(&out.stdout)
        );
        let help = text(&site.ok(&["certs", verb, "--help"]).stdout);
        assert!(
            help.contains(&format!("Example: mqtls certs {verb}")),
            "{verb}:\n{help}"
        );
        assert!(help.contains("Usage: mqtls certs"), "{verb}:\n{help}");
    }
    let issue = text(&site.ok(&["certs", "issue", "--help"]).stdout);
    assert!(
        issue.contains("[possible values: ecdsa-p256, ed25519, rsa2048]"),
        "{issue}"
    );
    let list = text(&site.ok(&["certs", "list", "--help"]).stdout);
    assert!(list.contains("Exit status"), "{list}");
    for verb in ["issue", "csr"] {
        let help = text(&site.ok(&["certs", verb, "--help"]).stdout);
        assert!(
            help.contains("--owner <USER[:GROUP]>"),
            "{verb}:
{help}"
        );
        assert!(
            help.contains("renamed into place"),
            "{verb}:
{help}"
        );
        assert!(
            help.contains("Needs root"),
            "{verb}:
{help}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------
// Documentation: the commands it shows write where the commands after them read

/// The Markdown files that show `mqtls certs` commands to operators.
fn operator_docs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut docs = vec![
        root.join("README.md"),
        root.join("certs/README.md"),
        root.join("systemd/README.md"),
    ];
    for entry in std::fs::read_dir(root.join("deploy")).expect("read deploy/") {
        let readme = entry.unwrap().path().join("README.md");
        if readme.is_file() {
            docs.push(readme);
        }
    }
    docs
}

/// The shell commands in the fenced code blocks of `markdown`, one per block (continuation lines joined,
/// comments dropped).
fn shell_blocks(markdown: &str) -> Vec<Vec<String>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    let mut pending = String::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            match current.take() {
                Some(block) => blocks.push(block),
                None => current = Some(Vec::new()),
            }
            continue;
        }
        let Some(block) = current.as_mut() else { continue };
        let code = line.split(" #").next().unwrap_or("").trim();
        if code.starts_with('#') {
            continue;
        }
        match code.strip_suffix('\\') {
            Some(part) => pending.push_str(part),
            None => {
                pending.push_str(code);
                block.push(std::mem::take(&mut pending));
            }
        }
    }
    blocks
}

/// Whitespace-separated words, with "double quoted" words kept whole.
fn shell_words(command: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in command.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => words.extend((!word.is_empty()).then(|| std::mem::take(&mut word))),
            c => word.push(c),
        }
    }
    words.extend((!word.is_empty()).then_some(word));
    words
}

/// For `mqtls certs issue|csr ...`: the `--out` value (if given), whether `--owner` is given, and NAME.
fn certs_write_command(command: &str) -> Option<(Option<String>, bool, String)> {
    let words = shell_words(command);
    let at = words
        .windows(2)
        .position(|w| w[0] == "certs" && (w[1] == "issue" || w[1] == "csr"))?;
    let mut args = words[at + 2..].iter();
    let (mut out, mut owner, mut name) = (None, false, None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = args.next().cloned(),
            "--owner" => owner = args.next().is_some(),
            "--ca" | "--client-id" | "--days" | "--key-type" => {
                args.next();
            }
            a if a.starts_with("--") => {}
            a => name = Some(a.to_string()),
        }
    }
    Some((out, owner, name?))
}

/// What is wrong with the `mqtls certs issue|csr` commands in `markdown`, and how many were checked.
fn certs_command_problems(doc: &str, markdown: &str) -> (usize, Vec<String>) {
    let mut problems = Vec::new();
    let mut checked = 0;
    for block in shell_blocks(markdown) {
        for (i, command) in block.iter().enumerate() {
            let Some((out, owner, name)) = certs_write_command(command) else {
                continue;
            };
            checked += 1;
            let Some(out) = out else {
                problems.push(format!("{doc}: `{command}` has no --out (it writes to ./devices)"));
                continue;
            };
            if out.starts_with("/etc/mqtls") && !owner {
                problems.push(format!("{doc}: `{command}` writes for the service without --owner"));
            }
            // Later commands in the block that name this device's files must find them under --out.
            let wanted = format!("{out}/{name}/");
            for later in &block[i + 1..] {
                for word in shell_words(later) {
                    let path = word.trim_start_matches("file://");
                    let names_file = ["key.pem", "cert.pem", "csr.pem", "device.toml"]
                        .iter()
                        .any(|f| path.ends_with(&format!("/{name}/{f}")) || path == format!("{name}/{f}"));
                    if names_file && !path.starts_with(&wanted) {
                        problems.push(format!(
                            "{doc}: `{command}` writes to {wanted}, but `{later}` reads {path}"
                        ));
                    }
                }
            }
        }
    }
    (checked, problems)
}

#[test]
fn documented_certs_commands_write_where_the_commands_after_them_read() {
    // The check itself finds the mistakes it is for.
    let sample = "```sh\nmqtls certs csr boiler-7\nsudo mqtls certs csr --out /etc/mqtls/devices.d pump-3\n\
                  sudo mqtls certs issue --ca ca --out /srv/d --client-id \"METER 0042\" --owner mqtls meter-42\n\
                  aws iot x --csr file:///etc/mqtls/devices.d/meter-42/csr.pem \\\n  --out /srv/d/meter-42/cert.pem\n```\n";
    let (checked, found) = certs_command_problems("sample", sample);
    assert_eq!(checked, 3, "{found:?}");
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(
        found[0].contains("`mqtls certs csr boiler-7` has no --out"),
        "{found:#?}"
    );
    assert!(
        found[1].contains("pump-3` writes for the service without --owner"),
        "{found:#?}"
    );
    assert!(
        found[2]
            .contains("writes to /srv/d/meter-42/, but `aws iot x --csr file:///etc/mqtls/devices.d/meter-42/csr.pem"),
        "{found:#?}"
    );

    let mut problems = Vec::new();
    let mut checked = 0;
    for doc in operator_docs() {
        let markdown = std::fs::read_to_string(&doc).expect("read doc");
        let (n, found) = certs_command_problems(&doc.display().to_string(), &markdown);
        checked += n;
        problems.extend(found);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        checked >= 8,
        "only {checked} documented commands were found; is the parser still right?"
    );
}

// ---------------------------------------------------------------------------------------------------------
// End to end

/// The observer identity (CN "observer" reads everything in the shipped ACL) issued by the same CA.
fn issued_observer(site: &Site) -> ClientCert {
    site.ok(&["certs", "issue", "--ca", "ca", "--out", "operators", "observer"]);
    let dir = site.path("operators/observer");
    ClientCert {
        cn: "observer".into(),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        serial: raw_serial(&leaf_der(&dir.join("cert.pem"))),
    }
}

async fn publish_as(client_id: &str, proxy: std::net::SocketAddr) {
    let (client, mut el) = device_v4(client_id, proxy, Duration::from_secs(30));
    if let Err(e) = wait_connack_v4(&mut el).await {
        panic!("{client_id}: not accepted through mqtls: {e:?}");
    }
    let mut events = spawn_eventloop_v4(el);
    client
        .publish(
            format!("sensors/{client_id}/reading"),
            QoS::AtLeastOnce,
            false,
            format!("hello from {client_id}"),
        )
        .await
        .unwrap();
    events.wait_for(is_puback_v4, MQTT_DEADLINE).await.expect("PUBACK");
}

#[tokio::test]
async fn devices_made_by_certs_publish_through_mqtls_to_a_broker_that_trusts_the_init_ca() {
    // The site's device PKI, made only with mqtls certs (and openssl playing a CA signing a CSR).
    let site = Site::new();
    site.init_ca();
    site.issue("sensor-ec", &[]);
    site.issue("sensor-ed", &["--key-type", "ed25519"]);
    site.issue("sensor-rsa", &["--key-type", "rsa2048"]);
    site.ok(&["certs", "csr", "meter-csr"]);
    openssl_sign(&site, "ca/ca", "meter-csr", "90");
    site.ok(&["certs", "csr", "meter-late"]);
    let observer_cert = issued_observer(&site);
    let listed = site.ok(&["certs", "list", "--dir", "devices"]);
    let table = text(&listed.stdout);
    assert_eq!(table.lines().filter(|l| l.ends_with(" -")).count(), 4, "{table}");
    assert!(row(&table, "meter-late").ends_with("PENDING"), "{table}");

    // The broker's own certificate comes from another CA; it accepts client certificates from the
    // init-ca CA only.
    let broker_pki = Pki::new();
    let server = broker_pki.server("mosquitto", &["localhost", "127.0.0.1"]);
    let broker = Mosquitto::start_with_client_ca(&broker_pki, &server, &site.path("ca/ca.pem")).await;
    let mut observer = observer_as(&broker_pki, &broker, &observer_cert, "sensors/#").await;

    let mut config = ProxyConfig::new(&broker_pki, broker.addr());
    config.extra = format!("\n[device_dir]\npath = {:?}\n", site.path("devices"));
    let (logs, _guard) = Logs::capture();
    let proxy = RunningProxy::start(&config, site.dir.path()).await;
    // The pending entry is skipped, and said so in the log, rather than failing the configuration.
    logs.wait_line(&["WARN", "device \"meter-late\" is pending"], GUARD)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let names = ["meter-csr", "sensor-ec", "sensor-ed", "sensor-rsa"];
    for name in names {
        tokio::time::timeout(GUARD, publish_as(name, proxy.addr()))
            .await
            .expect("publish in time");
    }
    let mut received = BTreeSet::new();
    while received.len() < names.len() {
        let Some((topic, payload)) = observer.next_message(GUARD).await else {
            panic!("the observer got only {received:?}\n{}", broker.diagnostics());
        };
        let name = topic
            .strip_prefix("sensors/")
            .and_then(|t| t.strip_suffix("/reading"))
            .unwrap()
            .to_string();
        assert_eq!(text(&payload), format!("hello from {name}"));
        received.insert(name);
    }
    assert_eq!(received, names.iter().map(|s| s.to_string()).collect());
    // Each arrived under its own certificate's CN (the broker's username; its ACL allows only that tree).
    let users: BTreeSet<String> = broker.connected_usernames().into_iter().collect();
    for name in names {
        assert!(users.contains(name), "{name} not among the broker's users {users:?}");
    }
    proxy.stop().await;
}
