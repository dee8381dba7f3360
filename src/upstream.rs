//! Reaching the broker: resolve, connect (addresses in order, each under a timeout), TLS handshake with
//! the device's identity.
//!
//! Names are resolved for every connection rather than once at start-up: gateways often boot before
//! their DNS works, and brokers move. The connector knows nothing about MQTT or about the device socket.

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

/// What kind of failure stopped an attempt to reach the broker; the label metrics and logs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// The name did not resolve.
    Resolve,
    /// TCP connect refused, unreachable or timed out.
    Connect,
    /// The TLS handshake did not finish in time.
    HandshakeTimeout,
    /// The TLS handshake failed (untrusted chain, wrong name, client certificate rejected...).
    Tls,
}

impl Failure {
    /// A short, stable label.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Resolve => "resolve",
            Failure::Connect => "connect",
            Failure::HandshakeTimeout => "handshake_timeout",
            Failure::Tls => "tls",
        }
    }
}

/// Why the broker could not be reached: every attempt, in order.
#[derive(Debug, thiserror::Error)]
#[error("{}", .attempts.iter().map(|(_, text)| text.as_str()).collect::<Vec<_>>().join("; "))]
pub struct ConnectError {
    /// Each attempt's failure and its description (address and cause).
    pub attempts: Vec<(Failure, String)>,
}

impl ConnectError {
    /// The most telling failure: a broker that answered but could not be trusted says more than one
    /// that did not answer, which says more than a name that did not resolve.
    pub fn reason(&self) -> &'static str {
        self.attempts
            .iter()
            .map(|(f, _)| *f)
            .max()
            .unwrap_or(Failure::Connect)
            .label()
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
    /// An address that fails at any step (resolve, connect, handshake) passes the turn to the next.
    pub async fn connect(&self, config: Arc<ClientConfig>) -> Result<TlsStream<TcpStream>, ConnectError> {
        let mut attempts = Vec::new();
        for hp in &self.addresses {
            let lookup = tokio::net::lookup_host((hp.host.as_str(), hp.port));
            let addrs = match timeout(self.connect_timeout, lookup).await {
                Ok(Ok(addrs)) => addrs,
                Ok(Err(e)) => {
                    attempts.push((Failure::Resolve, format!("{hp}: cannot resolve: {e}")));
                    continue;
                }
                Err(_) => {
                    attempts.push((Failure::Resolve, format!("{hp}: no answer from the resolver in time")));
                    continue;
                }
            };
            for addr in addrs {
                let tcp = match timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                    Ok(Ok(tcp)) => tcp,
                    Ok(Err(e)) => {
                        attempts.push((Failure::Connect, format!("{addr}: {e}")));
                        continue;
                    }
                    Err(_) => {
                        attempts.push((
                            Failure::Connect,
                            format!("{addr}: no answer within {:?}", self.connect_timeout),
                        ));
                        continue;
                    }
                };
                match self.handshake(tcp, hp, config.clone()).await {
                    Ok(tls) => return Ok(tls),
                    Err(failure) => attempts.push((failure.0, format!("{addr}: {}", failure.1))),
                }
            }
        }
        Err(ConnectError { attempts })
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
        hp: &HostPort,
        config: Arc<ClientConfig>,
    ) -> Result<TlsStream<TcpStream>, (Failure, String)> {
        socket::tune(&tcp);
        let name = match &self.server_name {
            Some(n) => n.clone(),
            // Validation checked that every host is a valid name when server_name is unset.
            None => hp.server_name().map_err(|e| (Failure::Tls, e))?,
        };
        match timeout(self.handshake_timeout, TlsConnector::from(config).connect(name, tcp)).await {
            Ok(Ok(tls)) => Ok(tls),
            Ok(Err(e)) => Err((Failure::Tls, format!("TLS handshake failed: {e}"))),
            Err(_) => Err((
                Failure::HandshakeTimeout,
                format!("TLS handshake took longer than {:?}", self.handshake_timeout),
            )),
        }
    }
}
