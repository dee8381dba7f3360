//! The real broker side: resolve, connect (addresses in order, each under a timeout), and the TLS
//! handshake with the device's identity.
//!
//! Names are resolved for every connection rather than once at start-up: gateways often boot before
//! their DNS works, and brokers move. The connector knows nothing about MQTT or about the device socket.
//!
//! Connections are opened a bounded number at a time (`upstream.max_connecting`). When thousands of
//! devices reconnect at once, opening all their broker connections together overflows the broker's
//! accept queue (Mosquitto listens with a backlog of 100): the kernel drops the SYNs it has no room for and
//! retries them only after 1 s, 3 s, 7 s, so the broker idles between bursts and slow devices get "server
//! unavailable". Waiting for a turn in mqtls instead keeps the broker busy at its own pace; see
//! [`super::turn`] for how long a connection keeps its turn.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::timeout;

use super::{Broker, BrokerStream, ConnectError, Connected, Failure};
use crate::config::{HostPort, Upstream};
use crate::socket;
use crate::tls::stream::{self, TlsStream};
use crate::tls::Identity;

/// Opens TLS connections to the configured broker.
#[derive(Debug, Clone)]
pub struct Connector {
    addresses: Vec<HostPort>,
    server_name: Option<ServerName<'static>>,
    connect_timeout: Duration,
    handshake_timeout: Duration,
    /// Turns to open a connection (resolve, connect, handshake): `max_connecting` of them.
    turns: Arc<Semaphore>,
    max_connecting: usize,
}

impl Connector {
    /// A connector for the `[upstream]` settings, sharing `previous`'s turns when `max_connecting` is
    /// unchanged: the limit holds for the process across a reload, not for each configuration generation.
    pub(crate) fn new_after(upstream: &Upstream, previous: Option<&Connector>) -> Self {
        let turns = match previous {
            Some(p) if p.max_connecting == upstream.max_connecting => p.turns.clone(),
            _ => Arc::new(Semaphore::new(upstream.max_connecting)),
        };
        Connector {
            addresses: upstream.addresses.clone(),
            server_name: upstream.server_name.clone(),
            connect_timeout: upstream.connect_timeout,
            handshake_timeout: upstream.handshake_timeout,
            turns,
            max_connecting: upstream.max_connecting,
        }
    }

    /// Connects to the first broker address that answers and completes the TLS handshake with `config`.
    /// An address that fails at any step (resolve, connect, handshake) passes the turn to the next. Waits
    /// first, at most the handshake timeout, until fewer than `upstream.max_connecting` connections are
    /// being opened.
    async fn open(&self, config: Arc<ClientConfig>) -> Result<Connected<Session>, ConnectError> {
        let Ok(Ok(permit)) = timeout(self.handshake_timeout, self.turns.clone().acquire_owned()).await else {
            let text = format!(
                "no turn to connect within {:?}: {} connections to the broker were being opened all that time (upstream.max_connecting)",
                self.handshake_timeout, self.max_connecting
            );
            return Err(ConnectError {
                attempts: vec![(Failure::QueueTimeout, text)],
            });
        };
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
                    Ok(tls) => {
                        let failed = attempts.into_iter().map(|(f, _)| f).collect();
                        let stream = BrokerStream::new(tls, permit, self.handshake_timeout);
                        return Ok(Connected { stream, failed });
                    }
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
        match timeout(self.handshake_timeout, TlsStream::connect(config, name, tcp)).await {
            Ok(Ok(tls)) => {
                tracing::debug!(resumed = tls.resumed(), "TLS handshake with the broker done");
                Ok(tls)
            }
            Ok(Err(e)) => Err((Failure::Tls, format!("TLS handshake failed: {e}"))),
            Err(_) => Err((
                Failure::HandshakeTimeout,
                format!("TLS handshake took longer than {:?}", self.handshake_timeout),
            )),
        }
    }
}

/// A session opened by the [`Connector`].
pub(crate) type Session = BrokerStream<TlsStream<TcpStream>>;

impl Broker for Connector {
    type Stream = Session;

    async fn connect(&self, identity: &Identity) -> Result<Connected<Session>, ConnectError> {
        self.open(identity.client_config.clone()).await
    }

    fn answer_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    fn refused_session(&self, error: &io::Error) -> bool {
        stream::is_tls_failure(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Instant;

    use rustls::RootCertStore;
    use tokio::net::TcpListener;

    fn connector(port: u16, max_connecting: usize, handshake_timeout: Duration) -> Connector {
        Connector::new_after(&upstream(port, max_connecting, handshake_timeout), None)
    }

    fn upstream(port: u16, max_connecting: usize, handshake_timeout: Duration) -> Upstream {
        Upstream {
            addresses: vec![HostPort {
                host: "127.0.0.1".into(),
                port,
            }],
            server_name: None,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            handshake_timeout,
            max_connecting,
            alpn: Vec::new(),
            allow_readable_keys: false,
        }
    }

    #[test]
    fn a_reloaded_connector_shares_the_turns_unless_their_number_changed() {
        let old = connector(1, 2, Duration::from_secs(10));
        let _taken = old.turns.clone().try_acquire_owned().unwrap();
        let same = Connector::new_after(&upstream(2, 2, Duration::from_secs(5)), Some(&old));
        assert_eq!(
            same.turns.available_permits(),
            1,
            "the turn taken under the old configuration counts"
        );
        let resized = Connector::new_after(&upstream(1, 3, Duration::from_secs(10)), Some(&old));
        assert_eq!(resized.turns.available_permits(), 3);
    }

    fn client_config() -> Arc<ClientConfig> {
        let config = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        Arc::new(config)
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_gets_no_turn_within_the_handshake_timeout_fails_as_queued() {
        // Nothing listens on port 1: reaching the network at all would fail as `connect` instead.
        let c = connector(1, 2, Duration::from_secs(10));
        let _taken = c.turns.clone().acquire_many_owned(2).await.unwrap();
        let e = c.open(client_config()).await.unwrap_err();
        assert_eq!(e.failure(), Failure::QueueTimeout, "{e}");
        assert!(e.to_string().contains("upstream.max_connecting"), "{e}");
    }

    /// The broker side: accepts connections and holds them open (so each one's TLS handshake waits)
    /// until the test closes them; records the most it ever held at once.
    #[derive(Default)]
    struct Held {
        open: Vec<TcpStream>,
        accepted: usize,
        most: usize,
    }

    #[tokio::test]
    async fn never_more_than_max_connecting_connections_are_being_opened_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = Arc::new(Mutex::new(Held::default()));
        let h = held.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let mut h = h.lock().unwrap();
                h.open.push(s);
                h.accepted += 1;
                h.most = h.most.max(h.open.len());
            }
        });
        let c = connector(port, 2, Duration::from_secs(60));
        let attempts: Vec<_> = (0..6)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.open(client_config()).await })
            })
            .collect();
        // Close the held connections two at a time (their handshakes then fail), as the turns allow.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let closed = {
                let mut h = held.lock().unwrap();
                let ready = h.open.len() == 2 || (h.accepted == 6 && !h.open.is_empty());
                if ready {
                    h.open.clear();
                }
                h.accepted == 6 && h.open.is_empty()
            };
            if closed {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the broker saw {} connections",
                held.lock().unwrap().accepted
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for a in attempts {
            let e = a.await.unwrap().unwrap_err();
            assert_eq!(e.failure(), Failure::Tls, "{e}");
        }
        assert_eq!(held.lock().unwrap().most, 2, "connections opened at once");
    }
}
