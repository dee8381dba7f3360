//! A small mutual-TLS server standing in for the broker when a test needs to
//! see the exact bytes (and client certificate) that arrive over TLS.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::codec::CONNACK_ACCEPTED;
use super::pki::{self, Pki};

/// What the server does on each accepted connection.
#[derive(Debug, Clone)]
pub enum EchoMode {
    /// Read until the client's close_notify (or EOF), then write back the
    /// SHA-256 of everything received (32 bytes) followed by the byte count
    /// as a big-endian u64, then close with close_notify.
    EchoUntilEof,
    /// Answer at once with [`CONNACK_ACCEPTED`] (as a broker answers a CONNECT), then as [`EchoMode::EchoUntilEof`]:
    /// mqtls starts copying only once the broker's CONNACK has come.
    ConnackThenDigest,
    /// Immediately write `send`, then close the write side (close_notify +
    /// TCP FIN) while reading on until the client's EOF. Everything read is
    /// recorded.
    SendThenRead { send: Vec<u8> },
    /// Write back every chunk as soon as it arrives, until the client's EOF (an interactive peer for
    /// tests where a connection must keep passing bytes while something else happens).
    Echo,
}

/// How a client's byte stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The client sent close_notify.
    CloseNotify,
    /// TCP EOF without close_notify (rustls reports UnexpectedEof).
    EofWithoutCloseNotify,
    /// Some other read error.
    Error(String),
}

/// One finished connection that completed the TLS handshake.
#[derive(Debug, Clone)]
pub struct ConnRecord {
    /// Raw serial of the client's leaf certificate.
    pub serial: Vec<u8>,
    /// Everything the client sent.
    pub received: Vec<u8>,
    /// How the client's stream ended.
    pub ending: Ending,
    /// Error while writing our side, if any.
    pub write_error: Option<String>,
}

#[derive(Default)]
struct State {
    /// Serials in handshake order (recorded as soon as the handshake is done).
    serials: Vec<Vec<u8>>,
    /// The ALPN protocol agreed on each handshake, in handshake order.
    alpn: Vec<Option<Vec<u8>>>,
    finished: Vec<ConnRecord>,
    handshake_failures: Vec<String>,
}

/// The running server; the accept loop is aborted on drop.
pub struct TlsEcho {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    finished_rx: watch::Receiver<usize>,
    failures_rx: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

/// The reply that [`EchoMode::EchoUntilEof`] replies with.
pub fn expected_echo_reply(data: &[u8]) -> Vec<u8> {
    let mut out = Sha256::digest(data).to_vec();
    out.extend_from_slice(&(data.len() as u64).to_be_bytes());
    out
}

impl TlsEcho {
    /// Listen on 127.0.0.1:0 with a server certificate for `localhost` and
    /// `127.0.0.1`, requiring a client certificate signed by `pki`'s CA.
    pub async fn start(pki: &Pki, mode: EchoMode) -> TlsEcho {
        Self::start_with_alpn(pki, mode, &[]).await
    }

    /// Like [`TlsEcho::start`], offering these ALPN protocols (a client that offers others is refused,
    /// as AWS IoT Core does on port 443).
    pub async fn start_with_alpn(pki: &Pki, mode: EchoMode, alpn: &[&str]) -> TlsEcho {
        let server = pki.server("tls-echo", &["localhost", "127.0.0.1"]);
        let provider = super::provider();
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(pki.root_store()), provider.clone())
                .build()
                .expect("client verifier");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(pki::load_certs(&server.cert), pki::load_key(&server.key))
            .expect("server cert");
        let mut config = config;
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tls echo");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State::default()));
        let (finished_tx, finished_rx) = watch::channel(0usize);
        let (failures_tx, failures_rx) = watch::channel(0usize);
        let finished_tx = Arc::new(finished_tx);
        let failures_tx = Arc::new(failures_tx);
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _peer)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let st = st.clone();
                let mode = mode.clone();
                let finished_tx = finished_tx.clone();
                let failures_tx = failures_tx.clone();
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(tcp).await {
                        Ok(t) => t,
                        Err(e) => {
                            let mut s = st.lock().unwrap();
                            s.handshake_failures.push(e.to_string());
                            let n = s.handshake_failures.len();
                            drop(s);
                            failures_tx.send_replace(n);
                            return;
                        }
                    };
                    let serial = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| pki::raw_serial(c))
                        .unwrap_or_default();
                    let agreed = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                    {
                        let mut s = st.lock().unwrap();
                        s.serials.push(serial.clone());
                        s.alpn.push(agreed);
                    }
                    let record = serve(&mut tls, serial, &mode).await;
                    let mut s = st.lock().unwrap();
                    s.finished.push(record);
                    let n = s.finished.len();
                    drop(s);
                    finished_tx.send_replace(n);
                });
            }
        });
        TlsEcho {
            addr,
            state,
            finished_rx,
            failures_rx,
            task,
        }
    }

    /// The listening address (127.0.0.1).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The ALPN protocol agreed on each completed handshake, in handshake order.
    pub fn alpn(&self) -> Vec<Option<Vec<u8>>> {
        self.state.lock().unwrap().alpn.clone()
    }

    /// Serials of client leaf certificates, one per completed handshake, in
    /// handshake order (available while the connection is still open).
    pub fn serials(&self) -> Vec<Vec<u8>> {
        self.state.lock().unwrap().serials.clone()
    }

    /// Bytes received on each finished connection, in finishing order.
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.finished().into_iter().map(|r| r.received).collect()
    }

    /// All finished connections, in finishing order.
    pub fn finished(&self) -> Vec<ConnRecord> {
        self.state.lock().unwrap().finished.clone()
    }

    /// Error messages of failed handshakes (e.g. no client certificate).
    pub fn handshake_failures(&self) -> Vec<String> {
        self.state.lock().unwrap().handshake_failures.clone()
    }

    /// Wait until at least `n` connections have finished; returns all
    /// finished records, or an error describing what was seen on timeout.
    pub async fn wait_finished(&self, n: usize, timeout: Duration) -> Result<Vec<ConnRecord>, String> {
        let mut rx = self.finished_rx.clone();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n))
            .await
            .is_ok_and(|r| r.is_ok());
        match reached {
            true => Ok(self.finished()),
            false => Err(format!(
                "timed out after {timeout:?} waiting for {n} finished connections; \
                 finished: {}, handshakes: {}, handshake failures: {:?}",
                self.finished().len(),
                self.serials().len(),
                self.handshake_failures()
            )),
        }
    }

    /// Wait until at least `n` handshakes have failed; returns their errors.
    pub async fn wait_handshake_failures(&self, n: usize, timeout: Duration) -> Result<Vec<String>, String> {
        let mut rx = self.failures_rx.clone();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n))
            .await
            .is_ok_and(|r| r.is_ok());
        match reached {
            true => Ok(self.handshake_failures()),
            false => Err(format!(
                "timed out after {timeout:?} waiting for {n} handshake failures; got {:?}",
                self.handshake_failures()
            )),
        }
    }
}

impl Drop for TlsEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_to_eof<S: tokio::io::AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Ending {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut chunk).await {
            Ok(0) => return Ending::CloseNotify,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ending::EofWithoutCloseNotify,
            Err(e) => return Ending::Error(e.to_string()),
        }
    }
}

async fn serve(
    tls: &mut tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    serial: Vec<u8>,
    mode: &EchoMode,
) -> ConnRecord {
    let mut received = Vec::new();
    match mode {
        EchoMode::EchoUntilEof | EchoMode::ConnackThenDigest => {
            if matches!(mode, EchoMode::ConnackThenDigest) {
                let _ = tls.write_all(&CONNACK_ACCEPTED).await;
            }
            let ending = read_to_eof(tls, &mut received).await;
            let reply = expected_echo_reply(&received);
            let write_error = match tls.write_all(&reply).await {
                Ok(()) => tls.shutdown().await.err().map(|e| e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            ConnRecord {
                serial,
                received,
                ending,
                write_error,
            }
        }
        EchoMode::Echo => {
            let mut chunk = vec![0u8; 16 * 1024];
            let mut write_error = None;
            let ending = loop {
                match tls.read(&mut chunk).await {
                    Ok(0) => break Ending::CloseNotify,
                    Ok(n) => {
                        received.extend_from_slice(&chunk[..n]);
                        if let Err(e) = tls.write_all(&chunk[..n]).await {
                            write_error = Some(e.to_string());
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ending::EofWithoutCloseNotify,
                    Err(e) => break Ending::Error(e.to_string()),
                }
            };
            let _ = tls.shutdown().await;
            ConnRecord {
                serial,
                received,
                ending,
                write_error,
            }
        }
        EchoMode::SendThenRead { send } => {
            let write_error = match tls.write_all(send).await {
                // tokio-rustls: sends close_notify, then shuts down the TCP
                // write side; reading continues to work.
                Ok(()) => tls.shutdown().await.err().map(|e| e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            let ending = read_to_eof(tls, &mut received).await;
            ConnRecord {
                serial,
                received,
                ending,
                write_error,
            }
        }
    }
}
