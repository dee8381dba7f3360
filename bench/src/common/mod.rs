//! Code shared with the integration tests, included as is so that the bench and the tests build their
//! certificates the same way and write and read MQTT packets with one codec (itself independent of
//! mqtls's parser).
#![allow(dead_code)]

use std::sync::Arc;

/// The ring crypto provider (the only one compiled in).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[path = "../../../tests/it/common/codec.rs"]
pub mod codec;
#[path = "../../../tests/it/common/pki.rs"]
pub mod pki;
