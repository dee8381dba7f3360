//! Private keys: the types offered, generating them (each in a form that OpenSSL reads too), reading a
//! signing key back, and the random bytes that seeds and serial numbers come from.

use std::fmt;
use std::fs;
use std::path::Path;
use std::str::FromStr;

use rcgen::{KeyPair, SerialNumber};
use rustls::pki_types::PrivatePkcs8KeyDer;

use super::{crypto, file_error, CertsError};

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
    pub(super) fn generate(self) -> Result<KeyPair, CertsError> {
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
pub(super) fn read_signing_key(path: &Path) -> Result<KeyPair, CertsError> {
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

pub(super) fn random_serial() -> Result<SerialNumber, CertsError> {
    let mut bytes: [u8; 16] = random_bytes()?;
    // Positive and exactly 16 bytes long once DER-encoded (no sign padding, no stripped leading zero).
    bytes[0] = (bytes[0] & 0x7f).max(1);
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
