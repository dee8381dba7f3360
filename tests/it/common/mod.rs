//! The integration tests' harness, shared by every module of the `it` test binary (`tests/it/main.rs`): a
//! throwaway PKI, a real Mosquitto configured from `deploy/mosquitto/`, a mutual-TLS echo server, MQTT
//! clients (rumqttc, and raw packets from [`codec`]), mqtls in-process or as `mqtls run`, per-test log
//! capture, and the usual set-up of all of these in one [`scenario`]. The demo (`examples/demo.rs`)
//! includes it too, and the bench driver includes `pki.rs` and `codec.rs`.

pub mod codec;
pub mod daemon;
pub mod logs;
pub mod metrics;
pub mod metrics_contract;
pub mod mosquitto;
pub mod mqtt_client;
pub mod pki;
pub mod proxy;
pub mod raw;
pub mod scenario;
pub mod tls_echo;

use std::sync::Arc;

pub use mosquitto::Mosquitto;
pub use mqtt_client::{observer, Observer};
pub use pki::{ClientCert, Pki};
pub use tls_echo::{EchoMode, TlsEcho};

/// The ring crypto provider (the only one compiled in).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Poll `cond` every 10 ms until it holds or `timeout` passes; returns
/// whether it held.
pub async fn wait_until(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Like [`wait_until`], for a condition that must itself wait (connect, scrape).
pub async fn wait_until_async<F, Fut>(timeout: std::time::Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The rustls error somewhere in `err`'s source chain (rumqttc wraps TLS
/// failures several layers deep, e.g. a handshake alert received while
/// reading CONNACK arrives as
/// `MqttState(Deserialization(Io(Custom { error: AlertReceived(UnknownCA) })))`).
/// `io::Error::source()` skips its own payload, so each io::Error's inner
/// error is inspected explicitly.
pub fn rustls_error<E: std::error::Error + 'static>(err: &E) -> Option<rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r.clone());
        }
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                return Some(r.clone());
            }
        }
        cur = e.source();
    }
    None
}
