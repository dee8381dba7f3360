//! Reaching the broker: resolve, connect (addresses in order, each under a timeout), TLS handshake with
//! the device's identity.
//!
//! Names are resolved for every connection rather than once at start-up: gateways often boot before
//! their DNS works, and brokers move. The connector knows nothing about MQTT or about the device socket.
//!
//! Connections are opened a bounded number at a time (`upstream.max_connecting`). When thousands of
//! devices reconnect at once, opening all their broker connections together overflows the broker's
//! accept queue (Mosquitto listens with a backlog of 100): the kernel drops the SYNs it has no room for and
//! retries them only after 1 s, 3 s, 7 s, so the broker idles between bursts and slow devices get "server
//! unavailable". Waiting for a turn in mqtls instead keeps the broker busy at its own pace.
//!
//! A connection keeps its turn until the broker first answers on it (its CONNACK), not only until the
//! TLS handshake ends on our side: until then the broker still has work to do for it (our last handshake
//! message, the CONNECT), and by then it has sent its TLS 1.3 session tickets, so that the next connection
//! to start can resume a session (cheaper for the broker) rather than make a full handshake.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep, timeout, Sleep};

use crate::config::{HostPort, Upstream};
use crate::socket;
use crate::tls_stream::TlsStream;

/// What kind of failure stopped an attempt to reach the broker; the label metrics and logs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// No turn to connect came within the handshake timeout: `upstream.max_connecting` connections were
    /// being opened all that time.
    QueueTimeout,
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
    /// Every failure, in declaration order (`failure as usize` indexes it).
    pub const ALL: [Failure; 5] = [
        Failure::QueueTimeout,
        Failure::Resolve,
        Failure::Connect,
        Failure::HandshakeTimeout,
        Failure::Tls,
    ];

    /// A short, stable label.
    pub fn label(self) -> &'static str {
        match self {
            Failure::QueueTimeout => "queue_timeout",
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

/// A TLS connection to the broker, and the attempts that failed before it (failover).
#[derive(Debug)]
pub struct Connected {
    /// The connection.
    pub stream: BrokerStream,
    /// Each earlier address's failure, in order.
    pub failed: Vec<Failure>,
}

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
    /// A connector for the `[upstream]` settings.
    pub fn new(upstream: &Upstream) -> Self {
        Connector::new_after(upstream, None)
    }

    /// Like [`Connector::new`], sharing `previous`'s turns when `max_connecting` is unchanged: the limit
    /// holds for the process across a reload, not for each configuration generation.
    pub fn new_after(upstream: &Upstream, previous: Option<&Connector>) -> Self {
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

    /// The limit for the TLS handshake, also used for the broker's first answer.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    /// Connects to the first broker address that answers and completes the TLS handshake with `config`.
    /// An address that fails at any step (resolve, connect, handshake) passes the turn to the next. Waits
    /// first, at most the handshake timeout, until fewer than `upstream.max_connecting` connections are
    /// being opened.
    pub async fn connect(&self, config: Arc<ClientConfig>) -> Result<Connected, ConnectError> {
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
    ) -> Result<TlsStream, (Failure, String)> {
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

/// The broker side of a proxied connection: a TLS stream that holds its connector's turn until the broker
/// first answers on it (a read that returns bytes, the end of the stream or an error), or for at most the
/// handshake timeout after the handshake, so that a broker that never answers does not keep it.
pub struct BrokerStream<S = TlsStream> {
    tls: S,
    turn: Option<Turn>,
}

struct Turn {
    _permit: OwnedSemaphorePermit,
    deadline: Pin<Box<Sleep>>,
}

impl<S> BrokerStream<S> {
    fn new(tls: S, permit: OwnedSemaphorePermit, answer_within: Duration) -> BrokerStream<S> {
        let turn = Turn {
            _permit: permit,
            deadline: Box::pin(sleep(answer_within)),
        };
        BrokerStream { tls, turn: Some(turn) }
    }
}

impl<S> std::fmt::Debug for BrokerStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerStream")
            .field("holds_turn", &self.turn.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for BrokerStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.tls).poll_read(cx, buf);
        if let Some(turn) = &mut this.turn {
            // Polling the deadline registers this task to be woken when it passes.
            if polled.is_ready() || turn.deadline.as_mut().poll(cx).is_ready() {
                this.turn = None;
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for BrokerStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Instant;

    use rustls::RootCertStore;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn connector(port: u16, max_connecting: usize, handshake_timeout: Duration) -> Connector {
        Connector::new(&upstream(port, max_connecting, handshake_timeout))
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
        let e = c.connect(client_config()).await.unwrap_err();
        assert_eq!(e.reason(), "queue_timeout", "{e}");
        assert!(e.to_string().contains("upstream.max_connecting"), "{e}");
    }

    #[tokio::test]
    async fn the_turn_is_kept_until_the_broker_first_answers() {
        let turns = Arc::new(Semaphore::new(1));
        let (mut broker, ours) = tokio::io::duplex(64);
        let mut s = BrokerStream::new(
            ours,
            turns.clone().try_acquire_owned().unwrap(),
            Duration::from_secs(3600),
        );
        s.write_all(b"CONNECT").await.unwrap();
        assert_eq!(turns.available_permits(), 0, "writing is no answer");
        broker.write_all(b"CONNACK").await.unwrap();
        let mut got = [0u8; 7];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"CONNACK");
        assert_eq!(turns.available_permits(), 1, "given back at the first answer");
    }

    #[tokio::test(start_paused = true)]
    async fn a_broker_that_never_answers_keeps_the_turn_only_until_the_deadline() {
        let turns = Arc::new(Semaphore::new(1));
        let (_broker, ours) = tokio::io::duplex(64);
        let s = BrokerStream::new(
            ours,
            turns.clone().try_acquire_owned().unwrap(),
            Duration::from_secs(10),
        );
        let reader = tokio::spawn(async move {
            let mut s = s;
            let mut b = [0u8; 1];
            s.read(&mut b).await
        });
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(turns.available_permits(), 0);
        // Only the deadline can wake the reader: the broker says nothing.
        let again = timeout(Duration::from_secs(60), turns.acquire()).await;
        assert!(again.is_ok(), "the turn was not given back at the deadline");
        assert!(!reader.is_finished(), "the stream itself stays open");
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
                tokio::spawn(async move { c.connect(client_config()).await })
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
            assert_eq!(e.reason(), "tls", "{e}");
        }
        assert_eq!(held.lock().unwrap().most, 2, "connections opened at once");
    }
}
