//! No secret in anything mqtls writes: `mqtls run` at trace level (rustls and tokio trace too), once with
//! text logs and once with `--log-format json`, through a whole scenario in front of a real Mosquitto, its
//! stdout and stderr and a scrape of `/metrics` searched for every private key it was given and for the
//! password a device sent.
//!
//! The scenario walks every path that touches a key or a password: devices that send a user name and a
//! password and are served (MQTT 3.1.1 and 5.0), a device served by the `[fallback]` (an RSA key in
//! PKCS#1, which rustls holds as another encoding), a forged client id and an unknown one refused, a
//! first packet carrying a password that is not a valid CONNECT, and a reload that renews a device's
//! certificate and key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

use crate::common::daemon::{logged_value, scrub_env, Daemon, BIN, GUARD};
use crate::common::metrics::Scrape;
use crate::common::pki::{random_bytes, write_file, ClientCert};
use crate::common::proxy::{DeviceEntry, ProxyConfig};
use crate::common::raw::{self, Version};
use crate::common::{Mosquitto, Pki};

#[tokio::test]
async fn no_key_or_password_in_trace_logs_as_text() {
    scan_whole_scenario(Format::Text).await;
}

#[tokio::test]
async fn no_key_or_password_in_trace_logs_as_json() {
    scan_whole_scenario(Format::Json).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

impl Format {
    fn arg(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Json => "json",
        }
    }

    /// The value of `key` on a log line in this format.
    fn value(self, line: &str, key: &str) -> String {
        match self {
            Format::Text => logged_value(line, key)
                .unwrap_or_else(|| panic!("no {key}= in {line}"))
                .to_string(),
            Format::Json => {
                let object: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                match &object[key] {
                    serde_json::Value::String(s) => s.clone(),
                    other => panic!("no string {key} ({other}) in {line}"),
                }
            }
        }
    }

    /// A marker every trace-level line carries.
    fn trace_marker(self) -> &'static str {
        match self {
            Format::Text => " TRACE ",
            Format::Json => "\"level\":\"TRACE\"",
        }
    }
}

async fn scan_whole_scenario(format: Format) {
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki).await;
    let password = format!("pw-{}", hex(&random_bytes(12)));
    let boiler = pki.client("boiler-1");
    // meter-1 connects from elsewhere: from this host, its client id is a forged one.
    let meter = pki.client("meter-1");
    // pump-9 has a listener of its own, where the fallback does not serve: a stranger there is unknown.
    let pump = pki.client("pump-9");
    let (reservation, pump_listener) = reserve_local_port();
    let fallback = rsa_fallback(&pki);
    let mut config = ProxyConfig::new(&pki, broker.addr())
        .device(DeviceEntry::new(&boiler).source("127.0.0.1"))
        .device(DeviceEntry::new(&meter).source("192.0.2.1"))
        .device(DeviceEntry::new(&pump).listen(pump_listener));
    config.extra = format!(
        "\n[reload]\nwatch = false\n\n[metrics]\naddress = \"127.0.0.1:0\"\n\n[fallback]\ncert = {:?}\nkey = {:?}\n",
        fallback.cert, fallback.key
    );
    let daemon = spawn_at_trace(&config.write(pki.dir()), format);
    let ready = daemon.wait_line(&["mqtls ready"]).await;
    drop(reservation);
    let shared: SocketAddr = format
        .value(&ready, "listen")
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let metrics: SocketAddr = format
        .value(&daemon.wait_line(&["metrics endpoint"]).await, "address")
        .parse()
        .unwrap();

    let login = |version, client_id: &str| {
        raw::Connect::new(version, client_id, 30)
            .login(client_id, password.as_bytes())
            .encode()
    };
    assert_eq!(connack(shared, &login(Version::V311, "boiler-1")).await, Some(0x00));
    assert_eq!(
        connack(shared, &login(Version::V5, "sensor-7")).await,
        Some(0x00),
        "the fallback serves it"
    );
    assert_eq!(
        connack(shared, &login(Version::V311, "meter-1")).await,
        Some(0x02),
        "forged"
    );
    assert_eq!(
        connack(pump_listener, &login(Version::V5, "stranger")).await,
        Some(0x85),
        "unknown"
    );
    assert_eq!(
        connack(shared, &login(Version::V311, "nul\0id")).await,
        None,
        "not a valid CONNECT"
    );

    let renewed = pki.client("boiler-1");
    daemon.wait_signal_handlers().await;
    daemon.signal("HUP");
    daemon.wait_line(&["configuration reloaded"]).await;
    assert_eq!(
        connack(shared, &login(Version::V311, "boiler-1")).await,
        Some(0x00),
        "after the renewal"
    );
    let scrape = Scrape::take(metrics).await;
    let mut daemon = daemon;
    daemon.signal("TERM");
    assert!(daemon.wait_exit(GUARD).await.is_some(), "mqtls did not stop");

    let output = daemon.stderr();
    let walked = |needles: &[&str]| output.lines().any(|l| needles.iter().all(|n| l.contains(n)));
    assert!(
        walked(&[format.trace_marker(), "rustls"]),
        "rustls traced nothing:\n{output}"
    );
    assert!(walked(&["connection opened", "fallback"]), "the fallback served no one");
    assert!(walked(&["client_id_spoofed"]) && walked(&["unknown_device"]) && walked(&["bad_connect"]));
    assert!(walked(&["configuration reloaded", "boiler-1"]), "no renewal");
    assert_eq!(
        broker.connected_usernames(),
        ["boiler-1", "gateway-shared", "boiler-1"],
        "{}",
        broker.diagnostics()
    );

    let mut keys: Vec<Key> = [&boiler, &meter, &pump, &renewed]
        .iter()
        .map(|c| Key::ecdsa(c))
        .collect();
    keys.push(fallback.secret);
    let searched = format!("{output}\n{}", scrape.0);
    for key in &keys {
        if let Some(form) = key.leak(&searched) {
            panic!("{} appears in what mqtls wrote, as {form}", key.name);
        }
    }
    let secret = Key::bytes("the password", password.as_bytes());
    if let Some(form) = secret.leak(&searched) {
        panic!("the password appears in what mqtls wrote, as {form}");
    }
}

/// `mqtls run` logging everything (MQTLS_LOG=trace) in `format`, its stdout sent to its stderr so that
/// both are read.
fn spawn_at_trace(config: &Path, format: Format) -> Daemon {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("exec \"$0\" \"$@\" 1>&2")
        .arg(BIN)
        .args(["run", "--config"])
        .arg(config)
        .args(["--log-format", format.arg()]);
    scrub_env(&mut cmd);
    cmd.env("MQTLS_LOG", "trace");
    Daemon::start(cmd)
}

/// Sends `connect` to `addr` and returns the CONNACK code, or `None` if the connection is closed without
/// one.
async fn connack(addr: SocketAddr, connect: &[u8]) -> Option<u8> {
    let mut s = raw::device(addr).await;
    s.write_all(connect).await.unwrap();
    let deadline = tokio::time::Instant::now() + GUARD;
    let code = match raw::read_packet(&mut s, deadline).await {
        Ok(p) => Some(p.body[1]),
        Err(e) if e.contains("end of stream") || e.contains("UnexpectedEof") => None,
        Err(e) => panic!("{e}"),
    };
    if code == Some(0) {
        s.write_all(&raw::disconnect()).await.unwrap();
        let _ = raw::read_until_closed(&mut s, deadline).await;
    }
    code
}

/// A local port held (bound with SO_REUSEADDR, not listening) until mqtls has bound it too.
fn reserve_local_port() -> (TcpSocket, SocketAddr) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
    let addr = socket.local_addr().expect("local addr");
    (socket, addr)
}

/// The fallback identity: an RSA key written in PKCS#1, its certificate signed by the test CA.
struct Fallback {
    cert: PathBuf,
    key: PathBuf,
    secret: Key,
}

fn rsa_fallback(pki: &Pki) -> Fallback {
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    use rsa::pkcs8::EncodePrivateKey as _;
    use rsa::traits::PrivateKeyParts as _;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("an RSA key");
    let pkcs1 = key.to_pkcs1_der().expect("PKCS#1").as_bytes().to_vec();
    let pkcs8 = key.to_pkcs8_der().expect("PKCS#8").as_bytes().to_vec();
    let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &rustls::pki_types::PrivatePkcs8KeyDer::from(pkcs8.clone()),
        &rcgen::PKCS_RSA_SHA256,
    )
    .expect("rcgen takes the key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "gateway-shared");
    let csr = params.serialize_request(&pair).expect("a CSR").pem().expect("PEM");
    let (cert_pem, _) = pki.sign_csr(&csr);
    let dir = pki.dir().join("fallback");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    write_file(&cert, cert_pem.as_bytes(), 0o644);
    let pem = pem("RSA PRIVATE KEY", &pkcs1);
    write_file(&key_path, pem.as_bytes(), 0o600);
    let mut secrets = vec![key.d().to_bytes_be()];
    secrets.extend(key.primes().iter().map(|p| p.to_bytes_be()));
    Fallback {
        cert,
        key: key_path,
        secret: Key {
            name: "the fallback's RSA key".into(),
            pem,
            ders: vec![pkcs1, pkcs8],
            secrets,
        },
    }
}

/// A secret and the forms a writer could put it in.
struct Key {
    name: String,
    /// The key file's text (empty for a password).
    pem: String,
    /// Whole encodings.
    ders: Vec<Vec<u8>>,
    /// The secret bytes alone, of which no piece may appear (a key's DER also holds its public half,
    /// which the certificate shows).
    secrets: Vec<Vec<u8>>,
}

impl Key {
    /// A device key as `Pki` writes it: ECDSA P-256 in PKCS#8.
    fn ecdsa(cert: &ClientCert) -> Key {
        let pem = std::fs::read_to_string(&cert.key).unwrap();
        let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("a PEM key");
        let der = der.secret_der().to_vec();
        // PKCS#8 wraps the SEC1 ECPrivateKey: version 1 (02 01 01), then the 32-byte scalar (04 20 ...).
        let at = der
            .windows(5)
            .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
            .expect("the scalar of an EC key")
            + 5;
        let scalar = der[at..at + 32].to_vec();
        Key {
            name: format!("the key of {} ({})", cert.cn, cert.key.display()),
            pem,
            ders: vec![der],
            secrets: vec![scalar],
        }
    }

    fn bytes(name: &str, bytes: &[u8]) -> Key {
        Key {
            name: name.into(),
            pem: String::new(),
            ders: Vec::new(),
            secrets: vec![bytes.to_vec()],
        }
    }

    /// The form in which `text` holds the secret, if it does: a PEM line, a whole DER in hex or base64,
    /// or any 12 bytes of the secret as text, hex, base64 (at any alignment) or a list of numbers.
    fn leak(&self, text: &str) -> Option<String> {
        let body = self.pem.lines().filter(|l| !l.starts_with("-----") && l.len() >= 16);
        if let Some(line) = body.into_iter().find(|l| text.contains(l)) {
            return Some(format!("the PEM line {line}"));
        }
        for der in &self.ders {
            for form in [hex(der), hex(der).to_uppercase(), base64(der)] {
                if text.contains(&form) {
                    return Some("its whole DER".into());
                }
            }
        }
        for secret in &self.secrets {
            for piece in secret.windows(12.min(secret.len())) {
                let list = |f: fn(&u8) -> String| piece.iter().map(f).collect::<Vec<_>>().join(", ");
                let lists = [
                    list(u8::to_string),
                    list(|b| format!("{b:x}")),
                    list(|b| format!("{b:02x}")),
                ];
                let mut forms = vec![hex(piece), hex(piece).to_uppercase(), base64(piece)];
                forms.extend(lists);
                forms.extend(std::str::from_utf8(piece).ok().map(str::to_string));
                if let Some(form) = forms.into_iter().find(|f| text.contains(f)) {
                    return Some(form);
                }
            }
        }
        None
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = base64(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

#[test]
fn the_search_finds_a_secret_in_every_form_it_looks_for() {
    let secret = Key::bytes("a password", b"pw-0123456789abcdef01234567");
    let piece = &secret.secrets[0][2..20];
    assert!(secret.leak("password=pw-0123456789abcdef01234567").is_some());
    assert!(secret.leak(&hex(piece)).is_some());
    assert!(
        secret.leak(&base64(&secret.secrets[0][1..])).is_some(),
        "base64 at another alignment"
    );
    assert!(secret.leak(&format!("{piece:?}")).is_some(), "a list of numbers");
    assert!(secret.leak(&format!("{piece:x?}")).is_some(), "a list of hex numbers");
    assert!(
        secret.leak(&format!("{piece:02x?}")).is_some(),
        "a list of two-digit hex numbers"
    );
    assert!(
        secret.leak("pw-01234567").is_none(),
        "pieces shorter than 12 bytes are not looked for"
    );
    assert_eq!(base64(b"mqtls"), "bXF0bHM=");
}
