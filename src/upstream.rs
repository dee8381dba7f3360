//! Reaching the broker: resolve, connect (addresses in order, each under a timeout), TLS handshake with
//! the device's identity.
//!
//! Names are resolved for every connection rather than once at start-up: gateways often boot before
//! their DNS works, and brokers move. The connector knows nothing about MQTT or about the device socket.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{HostPort, Upstream};
use crate::socket;

/// Why the broker could not be reached. The `reason` label is what metrics and logs use.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Name resolution failed for every address.
    #[error("cannot resolve {host}: {error}")]
    Resolve {
        /// The name.
        host: String,
        /// The resolver's answer.
        error: io::Error,
    },
    /// Every address refused, was unreachable or timed out.
    #[error("cannot connect to the broker: {0}")]
    Connect(String),
    /// The TLS handshake failed (untrusted chain, wrong name, client certificate rejected...).
    #[error("TLS handshake with {addr} failed: {error}")]
    Tls {
        /// The broker address.
        addr: SocketAddr,
        /// The TLS error.
        error: io::Error,
    },
    /// The TLS handshake did not finish in time.
    #[error("TLS handshake with {0} timed out")]
    HandshakeTimeout(SocketAddr),
}

impl ConnectError {
    /// A short, stable label for metrics and log fields.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::Resolve { .. } => "resolve",
            ConnectError::Connect(_) => "connect",
            ConnectError::Tls { .. } => "tls",
            ConnectError::HandshakeTimeout(_) => "handshake_timeout",
        }
    }
}

/// Opens TLS connections to the configured broker.
#[derive(Debug, Clone)]
pub struct Connector {
    addresses: Vec<HostPort>,
    server_name: Option<ServerName<'static>>,
    connect_timeout: Duration,
    handshake_timeout: Duration,
}

impl Connector {
    /// A connector for the `[upstream]` settings.
    pub fn new(upstream: &Upstream) -> Self {
        Connector {
            addresses: upstream.addresses.clone(),
            server_name: upstream.server_name.clone(),
            connect_timeout: upstream.connect_timeout,
            handshake_timeout: upstream.handshake_timeout,
        }
    }

    /// The limit for the TLS handshake, also used for the broker's first answer.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    /// Connects to the first broker address that answers and completes the TLS handshake with `config`.
    pub async fn connect(&self, config: Arc<ClientConfig>) -> Result<TlsStream<TcpStream>, ConnectError> {
        let mut failures = Vec::new();
        let mut resolve_error = None;
        for hp in &self.addresses {
            let lookup = tokio::net::lookup_host((hp.host.as_str(), hp.port));
            let resolved = timeout(self.connect_timeout, lookup).await.unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no answer from the resolver in time",
                ))
            });
            let addrs = match resolved {
                Ok(a) => a,
                Err(error) => {
                    failures.push(format!("{hp}: cannot resolve: {error}"));
                    resolve_error.get_or_insert(ConnectError::Resolve {
                        host: hp.host.clone(),
                        error,
                    });
                    continue;
                }
            };
            for addr in addrs {
                match timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                    Ok(Ok(tcp)) => return self.handshake(tcp, addr, hp, config).await,
                    Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
                    Err(_) => failures.push(format!("{addr}: no answer within {:?}", self.connect_timeout)),
                }
            }
        }
        match resolve_error {
            Some(e) if failures.len() == 1 => Err(e),
            _ => Err(ConnectError::Connect(failures.join("; "))),
        }
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
        hp: &HostPort,
        config: Arc<ClientConfig>,
    ) -> Result<TlsStream<TcpStream>, ConnectError> {
        socket::tune(&tcp);
        let name = match &self.server_name {
            Some(n) => n.clone(),
            // Validation checked that every host is a valid name when server_name is unset.
            None => hp.server_name().map_err(|e| ConnectError::Connect(e.to_string()))?,
        };
        match timeout(self.handshake_timeout, TlsConnector::from(config).connect(name, tcp)).await {
            Ok(Ok(tls)) => Ok(tls),
            Ok(Err(error)) => Err(ConnectError::Tls { addr, error }),
            Err(_) => Err(ConnectError::HandshakeTimeout(addr)),
        }
    }
}
