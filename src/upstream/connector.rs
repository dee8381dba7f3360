//! The real broker side: resolve, connect (addresses in order, each under a timeout), and the TLS
//! handshake with the device's identity.
//!
//! The connector knows nothing about MQTT or about the device socket. It opens connections a limited
//! number at a time ([`super::pacing`]), resolves names through a shared, bounded, remembering resolver
//! ([`super::resolve`]), and passes over addresses that just failed ([`super::health`]).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use super::health::Health;
use super::pacing::Pacer;
use super::resolve::Resolver;
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
    queue_timeout: Duration,
    resolve_timeout: Duration,
    failed_address_backoff: Duration,
    /// The line of connects: shared across reloads while `max_connecting` is unchanged.
    pacer: Arc<Pacer>,
    /// Which addresses just failed: shared across reloads while the address list is unchanged.
    health: Arc<Health>,
    /// Shared by every generation.
    resolver: Arc<Resolver>,
}

impl Connector {
    /// A connector for the `[upstream]` settings. What belongs to the process rather than to one
    /// configuration is taken over from `previous`: the line of connects (while `max_connecting` is
    /// unchanged, so the limit holds across a reload), the addresses' failures (while the list is
    /// unchanged) and the resolver's answers.
    pub(crate) fn new_after(upstream: &Upstream, previous: Option<&Connector>) -> Self {
        let pacer = match previous {
            Some(p) if p.pacer.ceiling() == upstream.max_connecting => p.pacer.clone(),
            _ => Pacer::new(upstream.max_connecting),
        };
        let health = match previous {
            Some(p) if p.health.is_for(&upstream.addresses) => p.health.clone(),
            _ => Arc::new(Health::new(&upstream.addresses)),
        };
        Connector {
            addresses: upstream.addresses.clone(),
            server_name: upstream.server_name.clone(),
            connect_timeout: upstream.connect_timeout,
            handshake_timeout: upstream.handshake_timeout,
            queue_timeout: upstream.queue_timeout,
            resolve_timeout: upstream.resolve_timeout,
            failed_address_backoff: upstream.failed_address_backoff,
            pacer,
            health,
            resolver: previous.map(|p| p.resolver.clone()).unwrap_or_default(),
        }
    }

    /// Waits in line for a turn, then connects to the first address from `from` on that answers and
    /// completes the TLS handshake with `config`. An address that fails at any step (resolve, connect,
    /// handshake) passes the turn to the next.
    async fn open(&self, config: Arc<ClientConfig>, from: usize) -> Result<Connected<Session>, ConnectError> {
        let Some(turn) = self.pacer.turn(self.queue_timeout).await else {
            let text = format!(
                "no turn to connect within {:?} (upstream.queue_timeout): at most {} connections to the broker \
                 are opened at once (upstream.max_connecting; {} now, while the broker is slow), and the line was \
                 that long",
                self.queue_timeout,
                self.pacer.ceiling(),
                self.pacer.limit()
            );
            return Err(ConnectError {
                attempts: vec![(Failure::QueueTimeout, text)],
            });
        };
        let mut attempts = Vec::new();
        for index in self.health.order(from, Instant::now()) {
            match self.attempt(index, &config, &mut attempts).await {
                Some(tls) => {
                    self.health.succeeded(index);
                    let failed = attempts.into_iter().map(|(f, _)| f).collect();
                    let stream = BrokerStream::new(tls, turn, self.handshake_timeout);
                    return Ok(Connected {
                        stream,
                        failed,
                        address: index,
                    });
                }
                None => {
                    let (failure, why) = attempts.last().expect("a failed attempt says why");
                    // A TLS failure may be this device's certificate, not the broker's health.
                    if *failure != Failure::Tls {
                        self.health
                            .failed(index, why, self.failed_address_backoff, Instant::now());
                    }
                }
            }
        }
        drop(turn);
        Err(ConnectError { attempts })
    }

    /// One configured address: resolve it, then connect to its addresses in turn until one completes the
    /// handshake. Failures are added to `attempts`.
    async fn attempt(
        &self,
        index: usize,
        config: &Arc<ClientConfig>,
        attempts: &mut Vec<(Failure, String)>,
    ) -> Option<TlsStream<TcpStream>> {
        let hp = &self.addresses[index];
        let addrs = match self.resolver.resolve(hp, self.resolve_timeout).await {
            Ok(addrs) => addrs,
            Err(e) => {
                attempts.push((Failure::Resolve, e));
                return None;
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
                    let text = format!("{addr}: no answer within {:?}", self.connect_timeout);
                    attempts.push((Failure::Connect, text));
                    continue;
                }
            };
            match self.handshake(tcp, hp, config.clone()).await {
                Ok(tls) => return Some(tls),
                Err(failure) => attempts.push((failure.0, format!("{addr}: {}", failure.1))),
            }
        }
        None
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

    async fn connect(&self, identity: &Identity, from: usize) -> Result<Connected<Session>, ConnectError> {
        self.open(identity.client_config.clone(), from).await
    }

    fn answer_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    fn refused_session(&self, error: &io::Error) -> bool {
        stream::is_tls_failure(error)
    }

    fn addresses(&self) -> usize {
        self.addresses.len()
    }

    fn unavailable(&self, address: usize, why: &str) {
        self.health
            .failed(address, why, self.failed_address_backoff, Instant::now());
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
            queue_timeout: Duration::from_secs(60),
            resolve_timeout: Duration::from_secs(5),
            failed_address_backoff: Duration::from_secs(30),
            alpn: Vec::new(),
            allow_readable_keys: false,
        }
    }

    #[tokio::test]
    async fn a_reloaded_connector_shares_the_line_unless_max_connecting_changed() {
        let old = connector(1, 2, Duration::from_secs(10));
        let _taken = old.pacer.turn(Duration::ZERO).await.unwrap();
        let _also = old.pacer.turn(Duration::ZERO).await.unwrap();
        let same = Connector::new_after(&upstream(2, 2, Duration::from_secs(5)), Some(&old));
        assert!(
            same.pacer.turn(Duration::ZERO).await.is_none(),
            "the turns taken under the old configuration count"
        );
        let resized = Connector::new_after(&upstream(1, 3, Duration::from_secs(10)), Some(&old));
        assert!(resized.pacer.turn(Duration::ZERO).await.is_some());
        assert!(
            Arc::ptr_eq(&old.resolver, &resized.resolver),
            "one resolver for the process"
        );
        assert!(
            !Arc::ptr_eq(&old.health, &same.health),
            "another address list, another state"
        );
        assert!(Arc::ptr_eq(&old.health, &resized.health));
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
    async fn a_connection_that_gets_no_turn_within_the_queue_timeout_fails_as_queued() {
        // Nothing listens on port 1: reaching the network at all would fail as `connect` instead.
        let c = connector(1, 2, Duration::from_secs(10));
        let _taken = (c.pacer.turn(Duration::ZERO).await, c.pacer.turn(Duration::ZERO).await);
        let started = tokio::time::Instant::now();
        let e = c.open(client_config(), 0).await.unwrap_err();
        assert_eq!(e.failure(), Failure::QueueTimeout, "{e}");
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(60),
            "waited its whole queue_timeout"
        );
        assert!(e.to_string().contains("upstream.queue_timeout"), "{e}");
    }

    /// A TLS server on 127.0.0.1 for the name `localhost` that completes handshakes and then holds the
    /// connections; and a client config that trusts it.
    async fn tls_server() -> (u16, Arc<ClientConfig>) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = rustls::pki_types::CertificateDer::from(certified.cert.der().to_vec());
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der());
        let server = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key.into())
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    held.push(tls);
                }
            }
        });
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (port, Arc::new(client))
    }

    #[tokio::test]
    async fn an_address_that_failed_is_passed_over_and_the_next_one_tried_first() {
        // The first address refuses connections (nothing listens on port 1); the second is a TLS server.
        let (port, client) = tls_server().await;
        let mut up = upstream(1, 4, Duration::from_secs(10));
        up.server_name = Some(ServerName::try_from("localhost").unwrap());
        up.addresses.push(HostPort {
            host: "127.0.0.1".into(),
            port,
        });
        let c = Connector::new_after(&up, None);
        let first = c.open(client.clone(), 0).await.unwrap();
        assert_eq!(first.address, 1);
        assert_eq!(
            first.failed,
            [Failure::Connect],
            "the first address was tried and failed"
        );
        let second = c.open(client.clone(), 0).await.unwrap();
        assert_eq!(second.address, 1);
        assert!(
            second.failed.is_empty(),
            "the failed address was passed over: {:?}",
            second.failed
        );
        let later = tokio::time::Instant::now() + Duration::from_secs(2);
        assert_eq!(c.health.order(0, later), [0, 1], "and tried again once its time is up");
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
                tokio::spawn(async move { c.open(client_config(), 0).await })
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
