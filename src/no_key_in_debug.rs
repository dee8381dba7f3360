//! No private key reaches a `Debug` output: every type that holds, names or was built from a device's
//! key is loaded from real files and printed with `{:?}` and `{:#?}`, and none of it may hold the key's
//! bytes in any form a formatter would write them (PEM lines, hex, base64, a list of numbers).
//!
//! A `Debug` is where a key escapes without anyone deciding it: a `?field` in a log line, an error that
//! wraps a value, a panic message. So the test covers every holder, not only the ones logged today.

use std::fmt::Debug;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rcgen::{CertificateParams, KeyPair, PKCS_RSA_SHA256};
use rustls::pki_types::PrivatePkcs8KeyDer;

/// A private key as files hold it, and the bytes whose disclosure would give it away.
struct Key {
    /// The PEM file's text.
    pem: String,
    /// Whole encodings (PKCS#8, and PKCS#1 for RSA).
    ders: Vec<Vec<u8>>,
    /// The secret numbers alone (EC scalar; RSA private exponent and primes): short pieces of these must
    /// not appear either, where the DER's public parts (also in the certificate) may.
    secrets: Vec<Vec<u8>>,
}

/// An ECDSA P-256 key in PKCS#8, as `mqtls certs` and most tools write it; and its certificate.
fn ec_key() -> (Key, KeyPair) {
    let pair = KeyPair::generate().expect("a P-256 key");
    let der = pair.serialize_der();
    // PKCS#8 wraps the SEC1 ECPrivateKey: version 1 (02 01 01), then the 32-byte scalar (04 20 ...).
    let at = der
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .expect("the scalar of a SEC1 key")
        + 5;
    let key = Key {
        pem: pair.serialize_pem(),
        ders: vec![der.clone()],
        secrets: vec![der[at..at + 32].to_vec()],
    };
    (key, pair)
}

/// An RSA key written in PKCS#1 (`BEGIN RSA PRIVATE KEY`), which rustls turns into a signing key too.
fn rsa_key() -> (Key, KeyPair) {
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    use rsa::pkcs8::EncodePrivateKey as _;
    use rsa::traits::PrivateKeyParts as _;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("an RSA key");
    let pkcs1 = key.to_pkcs1_der().expect("PKCS#1").as_bytes().to_vec();
    let pkcs8 = key.to_pkcs8_der().expect("PKCS#8").as_bytes().to_vec();
    let mut secrets = vec![key.d().to_bytes_be()];
    secrets.extend(key.primes().iter().map(|p| p.to_bytes_be()));
    let pair = KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(pkcs8.clone()), &PKCS_RSA_SHA256)
        .expect("rcgen takes the key");
    let key = Key {
        pem: pem("RSA PRIVATE KEY", &pkcs1),
        ders: vec![pkcs1, pkcs8],
        secrets,
    };
    (key, pair)
}

/// Writes a self-signed certificate for `pair` and the key's PEM, mode 0600, into `dir`.
fn write_identity(dir: &Path, cn: &str, key: &Key, pair: &KeyPair) {
    fs::create_dir_all(dir).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let cert = params.self_signed(pair).expect("a certificate");
    fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    fs::write(dir.join("key.pem"), &key.pem).unwrap();
    fs::set_permissions(dir.join("key.pem"), fs::Permissions::from_mode(0o600)).unwrap();
}

/// Which form of `key`, if any, `text` holds.
fn leak(text: &str, key: &Key) -> Option<String> {
    let body = key.pem.lines().filter(|l| !l.starts_with("-----") && l.len() >= 16);
    if let Some(line) = body.into_iter().find(|l| text.contains(l)) {
        return Some(format!("the PEM line {line}"));
    }
    for der in &key.ders {
        for form in [hex(der), hex(der).to_uppercase(), base64(der)] {
            if text.contains(&form) {
                return Some("the whole DER".into());
            }
        }
    }
    for secret in &key.secrets {
        for piece in secret.windows(12.min(secret.len())) {
            let list = |f: fn(&u8) -> String| piece.iter().map(f).collect::<Vec<_>>().join(", ");
            let lists = [
                list(u8::to_string),
                list(|b| format!("{b:x}")),
                list(|b| format!("{b:02x}")),
            ];
            let forms = [hex(piece), hex(piece).to_uppercase(), base64(piece)];
            for form in forms.into_iter().chain(lists) {
                if text.contains(&form) {
                    return Some(format!("a piece of the secret as {form}"));
                }
            }
        }
    }
    None
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

/// Prints `value` both ways and checks neither holds any of `keys`.
fn assert_no_key(what: &str, value: &dyn Debug, keys: &[&Key]) {
    for text in [format!("{value:?}"), format!("{value:#?}")] {
        for key in keys {
            if let Some(form) = leak(&text, key) {
                panic!("the Debug of {what} holds {form}:\n{text}");
            }
        }
    }
}

#[test]
fn the_search_finds_a_key_in_every_form_it_looks_for() {
    let (key, _) = ec_key();
    let secret = &key.secrets[0];
    assert!(leak(&key.pem, &key).is_some());
    assert!(leak(&format!("{secret:?}"), &key).is_some(), "a list of numbers");
    assert!(leak(&format!("{secret:x?}"), &key).is_some(), "a list of hex numbers");
    assert!(
        leak(&format!("{secret:02x?}"), &key).is_some(),
        "a list of two-digit hex numbers"
    );
    assert!(leak(&hex(&secret[3..20]), &key).is_some(), "a hex piece");
    assert!(
        leak(&base64(&secret[1..30]), &key).is_some(),
        "a base64 piece at another alignment"
    );
    assert!(leak("nothing here", &key).is_none());
    assert_eq!(base64(b"mqtls"), "bXF0bHM=");
}

#[test]
fn no_config_or_identity_type_prints_a_private_key() {
    let dir = tempfile::tempdir().unwrap();
    let (device, device_pair) = ec_key();
    let (fallback, fallback_pair) = rsa_key();
    write_identity(&dir.path().join("boiler-1"), "boiler-1", &device, &device_pair);
    write_identity(
        &dir.path().join("fallback"),
        "gateway-shared",
        &fallback,
        &fallback_pair,
    );
    let config = "[listen]\naddress = \"127.0.0.1:1883\"\n\n[upstream]\naddress = \"broker.example:8883\"\n\
                  ca_file = \"boiler-1/cert.pem\"\n\n[[device]]\nname = \"boiler-1\"\nclient_id = \"boiler-1\"\n\
                  cert = \"boiler-1/cert.pem\"\nkey = \"boiler-1/key.pem\"\n\n\
                  [fallback]\ncert = \"fallback/cert.pem\"\nkey = \"fallback/key.pem\"\n";
    let path = dir.path().join("mqtls.toml");
    fs::write(&path, config).unwrap();
    let loaded = crate::load(&path).unwrap_or_else(|e| panic!("{e}"));

    let keys = [&device, &fallback];
    let table = &loaded.generation.table;
    let entries: Vec<_> = table.all().collect();
    assert_eq!(entries.len(), 2, "the device and the fallback");
    assert_no_key("Config", &loaded.config, &keys);
    assert_no_key("DeviceSpec", &loaded.config.devices[0], &keys);
    assert_no_key("IdentityFiles", &loaded.config.fallback, &keys);
    assert_no_key("Baseline", &loaded.baseline, &keys);
    assert_no_key("Generation", &loaded.generation, &keys);
    assert_no_key("DeviceTable", table, &keys);
    for entry in entries {
        assert_no_key("Device", entry, &keys);
        assert_no_key("Identity", &entry.identity, &keys);
        assert_no_key(
            "the identity's rustls ClientConfig",
            &entry.identity.client_config,
            &keys,
        );
    }
}
