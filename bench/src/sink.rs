//! Fast upstreams for the throughput measurement: a rustls server that requires a client certificate
//! (from the bench CA) and a plain TCP one. Both answer the device's CONNECT at once with a CONNACK, as a
//! broker does (mqtls starts copying only once the broker has answered), then discard what they read and
//! answer one byte `K` once they have received the number of bytes the driver announced, so that no
//! contender's half-close behaviour matters. The TLS sink records whether each handshake resumed a
//! session.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::common::codec::CONNACK_ACCEPTED;
use crate::common::provider;

#[derive(Clone, Default)]
pub struct SinkState {
    /// Bytes each connection must receive before it answers.
    pub expected: Arc<AtomicU64>,
    /// Whether each TLS handshake resumed a session, in order.
    pub resumed: Arc<Mutex<Vec<bool>>>,
}

pub struct Sinks {
    pub tls: SocketAddr,
    pub plain: SocketAddr,
    pub state: SinkState,
}

impl Sinks {
    pub async fn start(ca: &Path, cert: &Path, key: &Path) -> Result<Sinks> {
        let provider = provider();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).context("read CA")? {
            roots.add(c?)?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
        let certs = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(key)?;
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let state = SinkState::default();

        let tls_l = TcpListener::bind("127.0.0.1:0").await?;
        let plain_l = TcpListener::bind("127.0.0.1:0").await?;
        let (tls, plain) = (tls_l.local_addr()?, plain_l.local_addr()?);
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = tls_l.accept().await {
                let _ = tcp.set_nodelay(true);
                let (acceptor, st) = (acceptor.clone(), st.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                    st.resumed.lock().unwrap().push(resumed);
                    serve(tls, st.expected.load(Ordering::SeqCst)).await;
                });
            }
        });
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = plain_l.accept().await {
                let _ = tcp.set_nodelay(true);
                let st = st.clone();
                tokio::spawn(async move { serve(tcp, st.expected.load(Ordering::SeqCst)).await });
            }
        });
        Ok(Sinks { tls, plain, state })
    }
}

/// All a sink ever sends: the CONNACK ([`CONNACK_ACCEPTED`]), then `K` once everything announced has
/// arrived.
pub const ANSWER: [u8; 5] = [0x20, 0x02, 0x00, 0x00, b'K'];

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, expected: u64) {
    if s.write_all(&CONNACK_ACCEPTED).await.is_err() || s.flush().await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    let mut answered = false;
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => got += n as u64,
        }
        if !answered && got >= expected {
            answered = true;
            if s.write_all(b"K").await.is_err() || s.flush().await.is_err() {
                return;
            }
        }
    }
}
