//! One connection's life, from its first byte to its last: read the device's CONNECT, pick the device,
//! reach the broker as that device, start the session (the device's first bytes delivered, the broker's
//! CONNACK relayed), then copy both ways until the connection ends.
//!
//! Every slow step runs inside the connection's own task, under a named timeout, so one slow or hostile
//! device never delays another. Whatever ends a connection before its session starts is a
//! [`Refusal`], counted, logged and answered in one call ([`refuse`]).
//!
//! The code is generic over the device stream and over the [`Broker`], so that the unit tests below
//! drive it over in-memory streams with a stand-in broker; the proxy runs it over TCP with the real
//! [`crate::upstream::Connector`].
//!
//! Memory is what this module is careful about, because a gateway holds thousands of idle sensors and
//! each one is a task running [`Connection::serve`]: the set-up runs boxed and its future is freed
//! before the copy starts (set-up futures, the TLS handshake's above all, are large), the copy borrows
//! the open connection instead of owning it (a second copy of the TLS state otherwise), and the copy does
//! not keep the configuration generation alive. `tests::the_idle_connection_task_stays_small` in
//! [`super`] guards this.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::timeout;
use tracing::{debug, info, Span};

use super::admission::{Over, SourceSlot};
use super::retire::Watch;
use super::Generation;
use crate::config::Listen;
use crate::device::{Device, NotPresented, Presented, Unmatched};
use crate::duplex::Duplex;
use crate::metrics::{ActiveGuard, Metered, Metrics};
use crate::mqtt::{self, Connect, ProtocolVersion, ReadConnectError};
use crate::pipe::{self, End, Silence};
use crate::refusal::{refuse, Refusal};
use crate::upstream::{Broker, Failure};

/// A connection accepted to be served: the device's stream, where it came from, and what holds its
/// place.
pub(crate) struct Connection<B, D> {
    /// The configured listen address it arrived on (device rules name it).
    pub listener: SocketAddr,
    /// The device's address.
    pub peer: SocketAddr,
    /// The configuration it is served with; released once the session has started.
    pub generation: Arc<Generation<B>>,
    pub metrics: Arc<Metrics>,
    /// Counts it against its address (as not identified, until the device is).
    pub slot: SourceSlot,
    /// Its place under `listen.max_connections`, for its whole life.
    pub _permit: OwnedSemaphorePermit,
    /// The device's stream.
    pub device: D,
}

/// What the set-up needs, and only the set-up: it is gone, with the configuration generation, once the
/// session has started.
struct SetUp<'a, B> {
    listener: SocketAddr,
    peer: SocketAddr,
    generation: Arc<Generation<B>>,
    metrics: &'a Metrics,
}

/// A connection ready for the copy: both streams, what set-up learnt, and the device's counters.
struct Open<D, S> {
    device: D,
    broker: S,
    session: Session,
    started: Instant,
    /// The device's counters; counts the connection in `mqtls_connections_active` until it ends.
    stats: ActiveGuard,
}

/// How long a retired connection's close may take (its close_notify and FIN).
const RETIRE_CLOSE: Duration = Duration::from_secs(2);

/// Bytes mqtls passed on itself before the copy started (the device's first bytes and the broker's
/// CONNACK), and the keep-alive in force.
#[derive(Debug)]
struct Session {
    keep_alive: u16,
    /// `listen.max_idle` of the generation the connection was set up with.
    max_idle: Duration,
    /// When to retire it, if `[retire]` is configured.
    retire: Option<Box<Watch>>,
    first_in: u64,
    first_out: u64,
}

/// Why the session did not start.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// No broker address could be reached.
    #[error("{0}")]
    Unreachable(crate::upstream::ConnectError),
    /// The broker refused the TLS session after the handshake (TLS 1.3 reports a rejected client
    /// certificate with an alert at the first read).
    #[error("the broker rejected the TLS session: {0}")]
    Rejected(io::Error),
    /// The broker did not take the CONNECT, or did not answer it, in time.
    #[error("{0}")]
    TimedOut(&'static str),
    /// The broker closed the connection, or it failed, before its CONNACK, after saying `said`.
    #[error("{error}")]
    Closed { said: Vec<u8>, error: io::Error },
}

/// Why no CONNECT was read.
#[derive(Debug)]
enum NoConnect {
    Invalid(ReadConnectError),
    /// The first bytes are a TLS record (a ClientHello): a device set up for MQTTS.
    Tls,
    TimedOut {
        received: usize,
    },
}

impl NoConnect {
    /// The refusal, and the version of the CONNACK that answers it, if any.
    fn refusal(&self, limits: &Listen) -> (Refusal<'_>, Option<ProtocolVersion>) {
        use mqtt::ConnectError::UnsupportedProtocol;
        match self {
            NoConnect::Invalid(error @ ReadConnectError::Parse(UnsupportedProtocol { answer_as, .. })) => {
                (Refusal::UnsupportedProtocol { error }, *answer_as)
            }
            NoConnect::Invalid(error) => (Refusal::BadConnect { error }, None),
            NoConnect::Tls => (Refusal::TlsOnPlainPort, None),
            NoConnect::TimedOut { received } => {
                let refusal = Refusal::ConnectTimeout {
                    received: *received,
                    limit: limits.connect_timeout,
                };
                (refusal, None)
            }
        }
    }
}

/// The first bytes of a TLS handshake record: content type 22, protocol major version 3.
const TLS_RECORD_START: [u8; 2] = [0x16, 0x03];

impl<B: Broker, D: AsyncRead + AsyncWrite + Unpin + Send> Connection<B, D> {
    /// Serves the connection to its end.
    ///
    /// The connection arrives boxed and is taken apart at once: what only the set-up needs goes into
    /// the set-up's future, which is boxed too and freed before the copy starts (set-up futures, the TLS
    /// handshake's above all, are large), so that the task of a connection that stays open for months
    /// keeps only what the copy needs. Nor does it keep the configuration generation, which leaves with
    /// the set-up: an old generation (thousands of identities) is not held alive after reloads.
    pub(crate) async fn serve(self: Box<Self>) {
        let Connection {
            listener,
            peer,
            generation,
            metrics,
            mut slot,
            _permit,
            device,
        } = *self;
        let setup = SetUp {
            listener,
            peer,
            generation,
            metrics: &metrics,
        };
        let Some(mut open) = Box::pin(setup.open(device, &mut slot)).await else {
            return;
        };
        open.copy(&metrics).await;
    }
}

impl<B: Broker> SetUp<'_, B> {
    /// Reads the CONNECT, picks the device, reaches the broker as that device and starts the session.
    /// `None` when the connection ended (refused, or closed) before that.
    async fn open<D>(self, mut device: D, slot: &mut SourceSlot) -> Option<Open<D, B::Stream>>
    where
        D: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let listen = &self.generation.listen;
        let peer = self.peer.ip();
        let (connect, first_bytes) = match read_connect(&mut device, listen).await {
            Ok(read) => read,
            Err(e) => {
                let (refusal, answer_as) = e.refusal(listen);
                refuse(self.metrics, device, peer, answer_as, refusal).await;
                return None;
            }
        };
        let entry = match self.generation.table.find(self.listener, peer, &connect.client_id) {
            Ok(entry) => entry,
            Err(unmatched) => {
                let (client_id, listener) = (connect.client_id.as_str(), self.listener);
                let refusal = match &unmatched {
                    Unmatched::Unknown => Refusal::UnknownDevice { client_id, listener },
                    Unmatched::Borrowed { owner } => Refusal::ClientIdSpoofed {
                        client_id,
                        owner,
                        listener,
                    },
                };
                refuse(self.metrics, device, peer, Some(connect.version), refusal).await;
                return None;
            }
        };
        slot.identified();
        Span::current().record("device", &*entry.name);
        let table = &self.generation.table;
        let presented = match table.present(&entry, &connect, first_bytes, peer) {
            Ok(presented) => presented,
            Err(e) => {
                refuse(
                    self.metrics,
                    device,
                    peer,
                    Some(connect.version),
                    not_presented(&e, &connect, self.listener),
                )
                .await;
                return None;
            }
        };
        let Presented {
            first_bytes,
            client_id: broker_client_id,
        } = presented;
        let started = Instant::now();
        let (broker, reply) = match self.reach(&entry, &first_bytes, connect.version).await {
            Ok(reached) => reached,
            Err(e) => {
                self.session_failed(e, device, connect.version).await;
                return None;
            }
        };
        let connack = reply.connack;
        // The broker's answer goes to the device unchanged, whatever it is.
        if let Err(e) = pass_on(&mut device, &reply.bytes).await {
            debug!(error = %e, "the device went away before the broker's answer reached it");
            return None;
        }
        if let Some(code) = connack.map(|c| c.code).filter(|&code| code != 0) {
            self.metrics.broker_refused(code);
            let refusal = Refusal::BrokerRefused {
                code,
                version: connect.version,
            };
            refuse(self.metrics, device, peer, None, refusal).await;
            return None;
        }
        let mut session = Session {
            keep_alive: connect.keep_alive,
            max_idle: self.generation.listen.max_idle,
            retire: self.generation.retire.map(|policy| {
                let renewal = self.generation.renewals.of(&entry.name);
                Box::new(Watch::new(policy, renewal, entry.identity.summary.not_after))
            }),
            first_in: first_bytes.len() as u64,
            first_out: reply.bytes.len() as u64,
        };
        if let Some(k) = connack.and_then(|c| c.server_keep_alive) {
            debug!(server_keep_alive = k, "the broker sets the keep-alive");
            session.keep_alive = k;
        }
        self.metrics.upstream_reached(started.elapsed());
        let stats = self.metrics.device(&entry.name);
        stats.add_to_broker(session.first_in);
        stats.add_to_device(session.first_out);
        info!(
            client_id = ?connect.client_id,
            broker_client_id = ?broker_client_id.as_deref().unwrap_or(&connect.client_id),
            mqtt = %connect.version,
            keep_alive = session.keep_alive,
            setup_ms = started.elapsed().as_millis() as u64,
            "connection opened"
        );
        Some(Open {
            device,
            broker,
            session,
            started,
            stats: stats.open(),
        })
    }

    /// Reaches the broker as `entry` and hands it the device's first bytes, until a broker answers them.
    /// A broker that says it cannot take sessions now ("server unavailable", "server busy", "use another
    /// server", "server moved") or that does not answer in time passes the device to the next address of
    /// `upstream.address`, if there is one, before the device is answered.
    async fn reach(
        &self,
        entry: &Device,
        first_bytes: &[u8],
        version: ProtocolVersion,
    ) -> Result<(B::Stream, Reply), SessionError> {
        let brokers = &self.generation.broker;
        let mut from = 0;
        loop {
            let connected = match brokers.connect(&entry.identity, from).await {
                Ok(c) => c,
                Err(e) => {
                    e.attempts.iter().for_each(|(f, _)| self.metrics.upstream_failure(*f));
                    return Err(SessionError::Unreachable(e));
                }
            };
            connected.failed.iter().for_each(|f| self.metrics.upstream_failure(*f));
            let mut stream = connected.stream;
            let answered = self.start_session(&mut stream, first_bytes, version).await;
            let next = connected.address + 1;
            let why = match &answered {
                Ok(reply) => match reply.connack.map(|c| c.code) {
                    Some(code) if asks_to_go_elsewhere(version, code) => connack_text(version, code),
                    _ => return answered.map(|reply| (stream, reply)),
                },
                Err(SessionError::TimedOut(what)) => (*what).to_string(),
                Err(_) => return answered.map(|reply| (stream, reply)),
            };
            if next >= brokers.addresses() {
                return answered.map(|reply| (stream, reply));
            }
            let failure = match answered {
                Ok(_) => Failure::Unavailable,
                Err(_) => Failure::HandshakeTimeout,
            };
            self.metrics.upstream_failure(failure);
            brokers.unavailable(connected.address, &why);
            debug!(why, "trying the next broker address");
            from = next;
        }
    }

    /// The broker was not reached, or was reached but did not answer the device's CONNECT. A broker that
    /// could not be reached, refused the TLS session (TLS 1.3 says so only after the handshake, at the
    /// first read) or did not answer in time counts, and is answered, as unreachable; one that closed the
    /// connection before its CONNACK (AWS IoT does this when a policy denies the client) is passed on
    /// what it said before closing, or answered "server unavailable" if it said nothing.
    async fn session_failed<D>(&self, e: SessionError, mut device: D, version: ProtocolVersion)
    where
        D: AsyncRead + AsyncWrite + Unpin,
    {
        let peer = self.peer.ip();
        let failure = match &e {
            SessionError::Unreachable(e) => {
                let refusal = Refusal::BrokerUnreachable {
                    failure: e.failure(),
                    error: e,
                };
                return refuse(self.metrics, device, peer, Some(version), refusal).await;
            }
            SessionError::Closed { said, error } => {
                let answered = !said.is_empty() && pass_on(&mut device, said).await.is_ok();
                let refusal = Refusal::BrokerClosed { error };
                let answer = (!answered).then_some(version);
                return refuse(self.metrics, device, peer, answer, refusal).await;
            }
            SessionError::Rejected(_) => Failure::Tls,
            SessionError::TimedOut(_) => Failure::HandshakeTimeout,
        };
        self.metrics.upstream_failure(failure);
        let error = format!("the broker did not accept the connection: {e}");
        let refusal = Refusal::BrokerUnreachable { failure, error: &error };
        refuse(self.metrics, device, peer, Some(version), refusal).await;
    }

    /// Delivers the device's first bytes (its CONNECT and anything after it) and reads the broker's
    /// answer up to its CONNACK, which proves the broker accepted the TLS session and says whether it
    /// accepts the device. Bounded by the broker's answer timeout: a broker that takes nothing, or says
    /// nothing, must not hold the connection for ever.
    async fn start_session<S: Duplex>(
        &self,
        broker: &mut S,
        first_bytes: &[u8],
        version: ProtocolVersion,
    ) -> Result<Reply, SessionError> {
        let limit = self.generation.broker.answer_timeout();
        let mut broker = broker.io();
        let forward = async {
            broker.write_all(first_bytes).await?;
            broker.flush().await
        };
        timeout(limit, forward)
            .await
            .map_err(|_| SessionError::TimedOut("the broker took no bytes in time"))?
            .map_err(|e| self.session_error(e, Vec::new()))?;
        let mut said = Vec::with_capacity(256);
        match timeout(limit, read_connack(&mut broker, &mut said, version)).await {
            Err(_) => Err(SessionError::TimedOut("no CONNACK from the broker in time")),
            Ok(Err(e)) => Err(self.session_error(e, said)),
            Ok(Ok(connack)) => Ok(Reply { bytes: said, connack }),
        }
    }

    fn session_error(&self, error: io::Error, said: Vec<u8>) -> SessionError {
        if self.generation.broker.refused_session(&error) {
            SessionError::Rejected(error)
        } else {
            SessionError::Closed { said, error }
        }
    }
}

/// What the broker answered the device's CONNECT with: the bytes it sent, up to its CONNACK (and whatever
/// came with it), and that CONNACK if it could be parsed.
struct Reply {
    bytes: Vec<u8>,
    connack: Option<mqtt::Connack>,
}

/// Whether the broker's CONNACK `code` says "not here, not now" (3.1.x "server unavailable"; 5.0 "server
/// unavailable", "server busy", "use another server", "server moved"): the next address may do.
fn asks_to_go_elsewhere(version: ProtocolVersion, code: u8) -> bool {
    match version {
        ProtocolVersion::V31 | ProtocolVersion::V311 => code == 0x03,
        ProtocolVersion::V5 => matches!(code, 0x88 | 0x89 | 0x9C | 0x9D),
    }
}

/// "CONNACK 0x88 (server unavailable)".
fn connack_text(version: ProtocolVersion, code: u8) -> String {
    format!("CONNACK {code:#04x} ({})", mqtt::connack_code_name(version, code))
}

async fn pass_on<D: AsyncWrite + Unpin>(device: &mut D, bytes: &[u8]) -> io::Result<()> {
    device.write_all(bytes).await?;
    device.flush().await
}

impl<D: AsyncRead + AsyncWrite + Unpin, S: Duplex> Open<D, S> {
    /// Copies both ways until the connection ends, counting the bytes as they pass. Borrows the
    /// connection rather than taking it: a future that owned it would hold a second copy of the TLS
    /// state (about a kilobyte) beside the caller's, for every idle connection.
    async fn copy(&mut self, metrics: &Metrics) {
        let mut device = Metered::new(&mut self.device, &self.stats);
        // Built in the call, not bound first: a binding would stay in this future beside the copy's own.
        let transfer = pipe::pipe(
            &mut device,
            &mut self.broker,
            Silence {
                device: keep_alive_limit(self.session.keep_alive),
                both: self.session.max_idle,
            },
            self.session
                .retire
                .as_deref()
                .map(|w| pipe::Retire::new(w.due(), w.quiet(), w.patience())),
        )
        .await;
        if let End::Retired(why) = transfer.end {
            metrics.retired(why);
            // Boxed: the close's timer would otherwise size every connection's task.
            Box::pin(self.close_both()).await;
        }
        metrics.connection_closed(self.started.elapsed());
        info!(
            bytes_in = transfer.device_to_broker + self.session.first_in,
            bytes_out = transfer.broker_to_device + self.session.first_out,
            duration_s = self.started.elapsed().as_secs_f64(),
            end = %transfer.end,
            "connection closed"
        );
    }
}

impl<D: AsyncRead + AsyncWrite + Unpin, S: Duplex> Open<D, S> {
    /// Closes both sides cleanly (a close_notify to the broker, a FIN to the device), so that the device
    /// reconnects as after a broker restart.
    async fn close_both(&mut self) {
        let closing = async {
            let _ = self.broker.io().shutdown().await;
            let _ = self.device.shutdown().await;
        };
        let _ = timeout(RETIRE_CLOSE, closing).await;
    }
}

/// A connection over one of the admission limits: its CONNECT is read so that it can be answered in its
/// own version ("server busy", "quota exceeded"); one that sends none is closed.
pub(crate) struct Refusing<B, D> {
    pub over: Over,
    pub peer: IpAddr,
    pub generation: Arc<Generation<B>>,
    pub metrics: Arc<Metrics>,
    /// Counts it among the refusals being answered.
    pub _answering: OwnedSemaphorePermit,
    /// Counts it against its address while it lasts.
    pub _slot: SourceSlot,
    /// The device's stream.
    pub device: D,
}

impl<B, D: AsyncRead + AsyncWrite + Unpin> Refusing<B, D> {
    pub(crate) async fn run(self: Box<Self>) {
        let Refusing {
            over,
            peer,
            generation,
            metrics,
            _answering,
            _slot,
            mut device,
        } = *self;
        let listen = &generation.listen;
        let (version, client_id) = match read_connect(&mut device, listen).await {
            Ok((connect, _)) => (Some(connect.version), Some(connect.client_id)),
            Err(_) => (None, None),
        };
        let refusal = over_limit(over, listen, client_id.as_deref());
        refuse(&metrics, device, peer, version, refusal).await;
    }
}

/// The refusal for a connection that cannot be presented to the broker: a device that sent another
/// device's client id is refused as such; a rewrite that cannot be made, or that gives another device's
/// client id, is a failed rewrite.
fn not_presented<'a>(e: &'a NotPresented, connect: &'a Connect, listener: SocketAddr) -> Refusal<'a> {
    let client_id = connect.client_id.as_str();
    match e {
        NotPresented::Rewrite(error) => Refusal::RewriteFailed { client_id, error },
        NotPresented::Taken {
            owner,
            rewritten: false,
            ..
        } => Refusal::ClientIdSpoofed {
            client_id,
            owner,
            listener,
        },
        NotPresented::Taken { .. } => Refusal::RewriteFailed { client_id, error: e },
    }
}

/// The refusal for a connection over `over`.
pub(crate) fn over_limit<'a>(over: Over, listen: &Listen, client_id: Option<&'a str>) -> Refusal<'a> {
    match over {
        Over::Connections => Refusal::Busy {
            client_id,
            limit: listen.max_connections,
        },
        Over::SourceConnections => Refusal::SourceConnections {
            client_id,
            limit: listen.max_connections_per_source,
        },
        Over::SourceRate => Refusal::SourceRate {
            client_id,
            limit: listen.max_connects_per_source_per_second,
        },
    }
}

/// Reads the device's CONNECT under the configured limits: its size, and the time it may take.
async fn read_connect<D>(device: &mut D, limits: &Listen) -> Result<(Connect, Vec<u8>), NoConnect>
where
    D: AsyncRead + Unpin,
{
    let mut buf = Vec::new();
    let read = async {
        let result = mqtt::read_connect(&mut *device, &mut buf, limits.max_connect_size).await;
        // The reader stops at a wrong first byte; when that byte came alone, the next one tells a TLS
        // record from any other bad packet, so that the verdict does not depend on how the bytes came.
        if result.is_err() && buf == TLS_RECORD_START[..1] {
            let mut next = [0u8; 1];
            if let Ok(1) = device.read(&mut next).await {
                buf.push(next[0]);
            }
        }
        result
    };
    match timeout(limits.connect_timeout, read).await {
        Ok(Ok(connect)) => Ok((connect, buf)),
        Ok(Err(_)) if buf.starts_with(&TLS_RECORD_START) => Err(NoConnect::Tls),
        Ok(Err(e)) => Err(NoConnect::Invalid(e)),
        Err(_) => Err(NoConnect::TimedOut { received: buf.len() }),
    }
}

/// Reads the broker's first bytes into `said` until they hold its whole CONNACK, and returns it parsed
/// (`None` if the bytes are not a CONNACK: they are passed on all the same, and the device's keep-alive
/// stays in force). The end of the stream before a CONNACK is an `UnexpectedEof` error, `said` holding
/// what came before.
async fn read_connack<B>(
    broker: &mut B,
    said: &mut Vec<u8>,
    version: ProtocolVersion,
) -> io::Result<Option<mqtt::Connack>>
where
    B: AsyncRead + Unpin,
{
    const MAX_CONNACK: usize = 4096;
    loop {
        let mut chunk = [0u8; 512];
        let n = broker.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the broker closed the connection before its CONNACK",
            ));
        }
        said.extend_from_slice(&chunk[..n]);
        let parsed = mqtt::parse_connack(said, version);
        if !matches!(parsed, Err(mqtt::ConnectError::Incomplete)) || said.len() >= MAX_CONNACK {
            return Ok(parsed.ok());
        }
    }
}

/// MQTT lets a server wait 1.5 x keep-alive before deciding a client is gone; mqtls does the same.
fn keep_alive_limit(keep_alive_secs: u16) -> Option<Duration> {
    (keep_alive_secs > 0).then(|| Duration::from_millis(u64::from(keep_alive_secs) * 1500))
}

/// The connection's logic over in-memory streams, with a stand-in broker: no socket, no TLS, no
/// Mosquitto (tests/ covers those). Time is paused where a timeout is the point.
#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::task::{Context, Poll};

    use tokio::io::{duplex, DuplexStream, ReadBuf};

    use super::*;
    use crate::device::{Device, DeviceTable, Rules};
    use crate::proxy::admission::{Admission, Admitted};
    use crate::rewrite::{Change, Rewrite, Template};
    use crate::tls::Identity;
    use crate::upstream::{ConnectError, Connected};

    const LISTENER: &str = "127.0.0.1:1883";
    const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    /// What the stand-in broker does for the next connection.
    enum Outcome {
        /// Reached: the test plays the broker on the other end.
        Reach { broker: DuplexStream, refuses: bool },
        /// Every address failed.
        Fail(Vec<(Failure, String)>),
    }

    /// A broker that does what the test scripted, and counts how often it was asked.
    struct StandIn {
        outcomes: Mutex<VecDeque<Outcome>>,
        connects: AtomicUsize,
        /// How many addresses it has.
        addresses: usize,
        /// The addresses it was told were unavailable, and where each connect started.
        passed_over: Mutex<Vec<usize>>,
        started_from: Mutex<Vec<usize>>,
    }

    /// The session side of a stand-in: an in-memory stream, or one whose first read says the broker
    /// refused the session (as a TLS 1.3 alert would).
    struct Session2 {
        stream: DuplexStream,
        refuses: bool,
    }

    fn refused() -> io::Error {
        io::Error::new(io::ErrorKind::PermissionDenied, "alert: bad certificate")
    }

    impl AsyncRead for Session2 {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            if self.refuses {
                return Poll::Ready(Err(refused()));
            }
            Pin::new(&mut self.stream).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Session2 {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.stream).poll_write(cx, data)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_shutdown(cx)
        }
    }

    impl Broker for StandIn {
        type Stream = Session2;

        async fn connect(&self, _identity: &Identity, from: usize) -> Result<Connected<Session2>, ConnectError> {
            self.connects.fetch_add(1, Ordering::SeqCst);
            self.started_from.lock().unwrap().push(from);
            match self.outcomes.lock().unwrap().pop_front().expect("a scripted outcome") {
                Outcome::Reach { broker, refuses } => Ok(Connected {
                    stream: Session2 {
                        stream: broker,
                        refuses,
                    },
                    failed: Vec::new(),
                    address: from,
                }),
                Outcome::Fail(attempts) => Err(ConnectError { attempts }),
            }
        }

        fn answer_timeout(&self) -> Duration {
            ANSWER_TIMEOUT
        }

        fn refused_session(&self, error: &io::Error) -> bool {
            error.kind() == io::ErrorKind::PermissionDenied
        }

        fn addresses(&self) -> usize {
            self.addresses
        }

        fn unavailable(&self, address: usize, _why: &str) {
            self.passed_over.lock().unwrap().push(address);
        }
    }

    /// One device, `boiler-1`, matched by its client id on the shared listener; a broker with one address.
    fn generation(outcomes: Vec<Outcome>) -> Arc<Generation<StandIn>> {
        generation_with(1, outcomes)
    }

    /// Like [`generation`], with a broker of `addresses` addresses.
    fn generation_with(addresses: usize, outcomes: Vec<Outcome>) -> Arc<Generation<StandIn>> {
        generation_of(addresses, None, outcomes)
    }

    /// Like [`generation`], `boiler-1` rewriting its CONNECT by `rewrite`.
    fn generation_rewriting(rewrite: Rewrite, outcomes: Vec<Outcome>) -> Arc<Generation<StandIn>> {
        generation_of(1, Some(rewrite), outcomes)
    }

    fn generation_of(addresses: usize, rewrite: Option<Rewrite>, outcomes: Vec<Outcome>) -> Arc<Generation<StandIn>> {
        let listener = LISTENER.parse().unwrap();
        let presents = rewrite
            .as_ref()
            .and_then(|r| r.client_id.as_ref())
            .map(|t| t.values("boiler-1", Some("boiler-1")));
        let boiler = Device {
            name: "boiler-1".into(),
            rules: Rules {
                client_id: Some("boiler-1".into()),
                client_id_patterns: Vec::new(),
                sources: Vec::new(),
                listeners: vec![listener],
            },
            identity: Identity::in_memory("boiler-1"),
            rewrite,
            presents,
        };
        let listen = Listen {
            addresses: vec![listener],
            connect_timeout: CONNECT_TIMEOUT,
            max_connections: 10,
            max_connect_size: 4096,
            max_pending_per_source: 10,
            max_connections_per_source: 10,
            max_connects_per_source_per_second: 10,
            max_idle: Duration::from_secs(3600),
            shutdown_grace: Duration::from_secs(1),
        };
        Arc::new(Generation {
            table: DeviceTable::of(vec![boiler], None),
            retire: None,
            renewals: Default::default(),
            broker: StandIn {
                outcomes: Mutex::new(outcomes.into()),
                connects: AtomicUsize::new(0),
                addresses,
                passed_over: Mutex::default(),
                started_from: Mutex::default(),
            },
            listen,
        })
    }

    /// Metrics with the generation's devices installed, as the proxy has them.
    fn metrics_for(generation: &Generation<StandIn>) -> Arc<Metrics> {
        let metrics = Arc::new(Metrics::new(true));
        metrics.install_devices(&generation.table);
        metrics
    }

    /// Serves one connection in a task; returns the device's end.
    fn serve(
        generation: &Arc<Generation<StandIn>>,
        metrics: &Arc<Metrics>,
    ) -> (DuplexStream, tokio::task::JoinHandle<()>) {
        let peer: SocketAddr = "192.168.10.21:40000".parse().unwrap();
        let admission = Admission::new(10);
        let Admitted::Serve(permit, slot) = admission.admit(peer.ip(), &generation.listen, Instant::now()) else {
            panic!("admitted")
        };
        let (device, ours) = duplex(64 * 1024);
        let conn = Box::new(Connection {
            listener: LISTENER.parse().unwrap(),
            peer,
            generation: generation.clone(),
            metrics: metrics.clone(),
            slot,
            _permit: permit,
            device: ours,
        });
        (device, tokio::spawn(conn.serve()))
    }

    /// A CONNECT in `version` with a clean session, `client_id` and `keep_alive` seconds.
    fn connect(version: ProtocolVersion, client_id: &str, keep_alive: u16) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', version.level(), 0x02];
        body.extend_from_slice(&keep_alive.to_be_bytes());
        if version == ProtocolVersion::V5 {
            body.push(0); // no properties
        }
        body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend_from_slice(&body);
        packet
    }

    const CONNACK_V311: [u8; 4] = [0x20, 0x02, 0x00, 0x00];
    const PUBLISH: [u8; 9] = [0x30, 0x07, 0x00, 0x01, b't', b'h', b'e', b'l', b'o'];

    async fn read_all(device: &mut DuplexStream) -> Vec<u8> {
        let mut got = Vec::new();
        device.read_to_end(&mut got).await.unwrap();
        got
    }

    /// The value of one series in the exposition, 0 when absent.
    fn value(metrics: &Metrics, series: &str) -> f64 {
        let text = metrics.render();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    fn reached() -> (DuplexStream, Outcome) {
        let (broker, ours) = duplex(64 * 1024);
        let outcome = Outcome::Reach {
            broker: ours,
            refuses: false,
        };
        (broker, outcome)
    }

    #[tokio::test]
    async fn a_device_is_served_byte_for_byte_once_the_broker_has_answered() {
        let (mut broker, outcome) = reached();
        let generation = generation(vec![outcome]);
        let metrics = metrics_for(&generation);
        let (mut device, task) = serve(&generation, &metrics);
        // The CONNECT and a PUBLISH in one write: both reach the broker, in order and unchanged.
        let mut first = connect(ProtocolVersion::V311, "boiler-1", 60);
        first.extend_from_slice(&PUBLISH);
        device.write_all(&first).await.unwrap();
        let mut got = vec![0u8; first.len()];
        broker.read_exact(&mut got).await.unwrap();
        assert_eq!(got, first);
        broker.write_all(&CONNACK_V311).await.unwrap();
        let mut connack = [0u8; 4];
        device.read_exact(&mut connack).await.unwrap();
        assert_eq!(connack, CONNACK_V311);
        assert_eq!(value(&metrics, "mqtls_connections_active{device=\"boiler-1\"}"), 1.0);

        broker.write_all(b"from the broker").await.unwrap();
        let mut down = [0u8; 15];
        device.read_exact(&mut down).await.unwrap();
        assert_eq!(&down, b"from the broker");
        // Half-close: the device's end reaches the broker, which may still answer.
        device.shutdown().await.unwrap();
        let mut rest = Vec::new();
        broker.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        broker.write_all(b"bye").await.unwrap();
        broker.shutdown().await.unwrap();
        assert_eq!(read_all(&mut device).await, b"bye");
        task.await.unwrap();
        assert_eq!(value(&metrics, "mqtls_connections_active{device=\"boiler-1\"}"), 0.0);
        let sent = (first.len() + CONNACK_V311.len() + 15 + 3) as f64;
        let to_broker = value(
            &metrics,
            "mqtls_bytes_total{device=\"boiler-1\",direction=\"to_broker\"}",
        );
        let to_device = value(
            &metrics,
            "mqtls_bytes_total{device=\"boiler-1\",direction=\"to_device\"}",
        );
        assert_eq!(to_broker + to_device, sent);
        assert_eq!(
            value(&metrics, "mqtls_upstream_handshake_seconds_count"),
            1.0,
            "reached once"
        );
    }

    /// A 3.1.1 CONNECT from `client_id` with a user name and password.
    fn connect_with_login(client_id: &str, username: &str, password: &[u8]) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60];
        for field in [client_id.as_bytes(), username.as_bytes(), password] {
            body.extend_from_slice(&(field.len() as u16).to_be_bytes());
            body.extend_from_slice(field);
        }
        let mut packet = vec![0x10, body.len() as u8];
        packet.extend_from_slice(&body);
        packet
    }

    #[tokio::test]
    async fn a_rewritten_connect_reaches_the_broker_and_what_followed_it_is_unchanged() {
        let (mut broker, outcome) = reached();
        let rewrite = Rewrite {
            client_id: Some(Template::parse("{name}-{source}").unwrap()),
            username: Change::Keep,
            password: Change::Drop,
        };
        let generation = generation_rewriting(rewrite, vec![outcome]);
        let metrics = metrics_for(&generation);
        let (captured, _guard) = crate::test_log::capture_here();
        {
            let (mut device, task) = serve(&generation, &metrics);
            let mut first = connect_with_login("boiler-1", "admin", b"legacy-secret");
            first.extend_from_slice(&PUBLISH);
            device.write_all(&first).await.unwrap();
            let mut want = connect_with_login("boiler-1-192.168.10.21", "admin", b"");
            want[9] = 0x82; // the user name flag, no password flag
            want.truncate(want.len() - 2); // no password field
            want[1] = (want.len() - 2) as u8;
            want.extend_from_slice(&PUBLISH);
            let mut got = vec![0u8; want.len()];
            broker.read_exact(&mut got).await.unwrap();
            assert_eq!(got, want, "the rewritten CONNECT, then the PUBLISH as sent");
            broker.write_all(&CONNACK_V311).await.unwrap();
            let mut connack = [0u8; 4];
            device.read_exact(&mut connack).await.unwrap();
            assert_eq!(connack, CONNACK_V311, "the CONNACK goes back unchanged");
            drop(broker);
            assert!(read_all(&mut device).await.is_empty());
            task.await.unwrap();
        }
        let lines = captured.lines();
        let opened = lines
            .iter()
            .find(|l| l.contains("connection opened"))
            .expect("opened line");
        assert!(
            opened.contains("client_id=\"boiler-1\"") && opened.contains("broker_client_id=\"boiler-1-192.168.10.21\""),
            "both ids in the log line: {opened}"
        );
        assert!(!lines.iter().any(|l| l.contains("legacy-secret")));
    }

    #[tokio::test]
    async fn a_rewrite_that_cannot_be_made_is_answered_identifier_rejected_and_never_reaches_the_broker() {
        for (version, answer) in [
            (ProtocolVersion::V311, vec![0x20, 0x02, 0x00, 0x02]),
            (ProtocolVersion::V5, vec![0x20, 0x03, 0x00, 0x85, 0x00]),
        ] {
            let rewrite = Rewrite {
                client_id: Some(Template::parse("{client_id}\u{1}").unwrap()),
                username: Change::Keep,
                password: Change::Keep,
            };
            let generation = generation_rewriting(rewrite, Vec::new());
            let metrics = metrics_for(&generation);
            let (mut device, task) = serve(&generation, &metrics);
            device.write_all(&connect(version, "boiler-1", 60)).await.unwrap();
            assert_eq!(read_all(&mut device).await, answer, "{version}");
            task.await.unwrap();
            assert_eq!(generation.broker.connects.load(Ordering::SeqCst), 0);
            assert_eq!(
                value(&metrics, "mqtls_connections_refused_total{reason=\"rewrite_failed\"}"),
                1.0
            );
        }
    }

    #[tokio::test]
    async fn an_unknown_client_id_is_answered_in_its_version_and_never_reaches_the_broker() {
        for (version, answer) in [
            (ProtocolVersion::V311, vec![0x20, 0x02, 0x00, 0x02]),
            (ProtocolVersion::V5, vec![0x20, 0x03, 0x00, 0x85, 0x00]),
        ] {
            let generation = generation(Vec::new());
            let metrics = metrics_for(&generation);
            let (mut device, task) = serve(&generation, &metrics);
            device.write_all(&connect(version, "stranger", 60)).await.unwrap();
            assert_eq!(read_all(&mut device).await, answer, "{version}");
            task.await.unwrap();
            assert_eq!(generation.broker.connects.load(Ordering::SeqCst), 0);
            assert_eq!(
                value(&metrics, "mqtls_connections_refused_total{reason=\"unknown_device\"}"),
                1.0
            );
        }
    }

    #[tokio::test]
    async fn an_unreachable_broker_is_answered_server_unavailable_and_every_attempt_is_counted() {
        for (version, answer) in [
            (ProtocolVersion::V311, vec![0x20, 0x02, 0x00, 0x03]),
            (ProtocolVersion::V5, vec![0x20, 0x03, 0x00, 0x88, 0x00]),
        ] {
            let attempts = vec![
                (Failure::Connect, "10.0.0.1:8883: refused".to_string()),
                (Failure::Tls, "10.0.0.2:8883: unknown CA".to_string()),
            ];
            let generation = generation(vec![Outcome::Fail(attempts)]);
            let metrics = metrics_for(&generation);
            let (mut device, task) = serve(&generation, &metrics);
            device.write_all(&connect(version, "boiler-1", 60)).await.unwrap();
            assert_eq!(read_all(&mut device).await, answer, "{version}");
            task.await.unwrap();
            let count = |s: &str| value(&metrics, s);
            assert_eq!(
                count("mqtls_connections_refused_total{reason=\"broker_unreachable\"}"),
                1.0
            );
            assert_eq!(count("mqtls_upstream_connect_failures_total{reason=\"connect\"}"), 1.0);
            assert_eq!(count("mqtls_upstream_connect_failures_total{reason=\"tls\"}"), 1.0);
        }
    }

    #[tokio::test]
    async fn a_first_packet_that_is_not_a_connect_is_closed_unanswered() {
        let generation = generation(Vec::new());
        let metrics = metrics_for(&generation);
        let (mut device, task) = serve(&generation, &metrics);
        device.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(read_all(&mut device).await.is_empty());
        task.await.unwrap();
        assert_eq!(
            value(&metrics, "mqtls_connections_refused_total{reason=\"bad_connect\"}"),
            1.0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connect_that_never_completes_is_closed_at_the_connect_timeout() {
        let generation = generation(Vec::new());
        let metrics = metrics_for(&generation);
        let (mut device, task) = serve(&generation, &metrics);
        let whole = connect(ProtocolVersion::V311, "boiler-1", 60);
        device.write_all(&whole[..whole.len() - 3]).await.unwrap();
        let started = tokio::time::Instant::now();
        assert!(read_all(&mut device).await.is_empty());
        assert_eq!(started.elapsed(), CONNECT_TIMEOUT);
        task.await.unwrap();
        assert_eq!(
            value(&metrics, "mqtls_connections_refused_total{reason=\"connect_timeout\"}"),
            1.0
        );
    }

    #[tokio::test]
    async fn a_broker_that_refuses_the_session_is_answered_server_unavailable() {
        let (_broker, ours) = duplex(1024);
        let outcome = Outcome::Reach {
            broker: ours,
            refuses: true,
        };
        let generation = generation(vec![outcome]);
        let metrics = metrics_for(&generation);
        let (mut device, task) = serve(&generation, &metrics);
        device
            .write_all(&connect(ProtocolVersion::V5, "boiler-1", 60))
            .await
            .unwrap();
        assert_eq!(read_all(&mut device).await, [0x20, 0x03, 0x00, 0x88, 0x00]);
        task.await.unwrap();
        assert_eq!(
            value(&metrics, "mqtls_upstream_connect_failures_total{reason=\"tls\"}"),
            1.0
        );
        assert_eq!(
            value(
                &metrics,
                "mqtls_connections_refused_total{reason=\"broker_unreachable\"}"
            ),
            1.0
        );
        assert_eq!(value(&metrics, "mqtls_connections_active{device=\"boiler-1\"}"), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_broker_that_never_answers_is_given_up_at_the_answer_timeout() {
        let (_broker, outcome) = reached();
        let generation = generation(vec![outcome]);
        let metrics = metrics_for(&generation);
        let (mut device, task) = serve(&generation, &metrics);
        device
            .write_all(&connect(ProtocolVersion::V311, "boiler-1", 60))
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(read_all(&mut device).await, [0x20, 0x02, 0x00, 0x03]);
        assert_eq!(started.elapsed(), ANSWER_TIMEOUT);
        task.await.unwrap();
        assert_eq!(
            value(
                &metrics,
                "mqtls_upstream_connect_failures_total{reason=\"handshake_timeout\"}"
            ),
            1.0
        );
    }

    #[tokio::test]
    async fn a_broker_that_closes_before_its_connack_has_its_say_and_is_counted() {
        let (mut broker, outcome) = reached();
        let generation = generation(vec![outcome]);
        let metrics = metrics_for(&generation);
        let (mut device, task) = serve(&generation, &metrics);
        let first = connect(ProtocolVersion::V311, "boiler-1", 60);
        device.write_all(&first).await.unwrap();
        let mut got = vec![0u8; first.len()];
        broker.read_exact(&mut got).await.unwrap();
        broker.write_all(&[0x20]).await.unwrap();
        drop(broker);
        assert_eq!(
            read_all(&mut device).await,
            [0x20],
            "what the broker said is passed on, nothing more"
        );
        task.await.unwrap();
        assert_eq!(
            value(&metrics, "mqtls_connections_refused_total{reason=\"broker_closed\"}"),
            1.0
        );
        assert_eq!(
            value(&metrics, "mqtls_upstream_handshake_seconds_count"),
            0.0,
            "no set-up counted"
        );
    }

    #[tokio::test]
    async fn a_broker_that_closes_without_a_word_is_answered_server_unavailable() {
        let (mut broker, outcome) = reached();
        let generation = generation(vec![outcome]);
        let metrics = metrics_for(&generation);
        let (mut device, task) = serve(&generation, &metrics);
        let first = connect(ProtocolVersion::V5, "boiler-1", 60);
        device.write_all(&first).await.unwrap();
        let mut got = vec![0u8; first.len()];
        broker.read_exact(&mut got).await.unwrap();
        drop(broker);
        assert_eq!(read_all(&mut device).await, [0x20, 0x03, 0x00, 0x88, 0x00]);
        task.await.unwrap();
        assert_eq!(
            value(&metrics, "mqtls_connections_refused_total{reason=\"broker_closed\"}"),
            1.0
        );
    }

    /// Serves one device through `generation`, plays each reached broker with `script` (the CONNACK to
    /// answer the device's CONNECT with, or `None` for silence), and returns what the device received.
    async fn through(
        generation: &Arc<Generation<StandIn>>,
        metrics: &Arc<Metrics>,
        brokers: Vec<(DuplexStream, Option<Vec<u8>>)>,
        version: ProtocolVersion,
    ) -> (Vec<u8>, Vec<Vec<u8>>, DuplexStream) {
        let (mut device, task) = serve(generation, metrics);
        let first = connect(version, "boiler-1", 60);
        device.write_all(&first).await.unwrap();
        let mut heard = Vec::new();
        let mut last = None;
        for (mut broker, answer) in brokers {
            let mut got = vec![0u8; first.len()];
            broker.read_exact(&mut got).await.unwrap();
            heard.push(got);
            if let Some(answer) = answer {
                broker.write_all(&answer).await.unwrap();
            }
            last = Some(broker);
        }
        let mut answer = vec![0u8; 1];
        device.read_exact(&mut answer).await.unwrap();
        let mut len = [0u8; 1];
        device.read_exact(&mut len).await.unwrap();
        answer.push(len[0]);
        let mut body = vec![0u8; len[0] as usize];
        device.read_exact(&mut body).await.unwrap();
        answer.extend(body);
        drop(task);
        (answer, heard, last.unwrap())
    }

    #[tokio::test]
    async fn a_broker_refusal_is_passed_on_and_counted_by_its_code_not_as_a_session() {
        let (broker, outcome) = reached();
        let generation = generation(vec![outcome]);
        let metrics = metrics_for(&generation);
        let not_authorized = vec![0x20, 0x02, 0x00, 0x05];
        let (answer, _, _) = through(
            &generation,
            &metrics,
            vec![(broker, Some(not_authorized.clone()))],
            ProtocolVersion::V311,
        )
        .await;
        assert_eq!(answer, not_authorized);
        let counted = |s: &str| value(&metrics, s);
        tokio::task::yield_now().await;
        assert!(
            wait_for(|| counted("mqtls_broker_refusals_total{code=\"0x05\"}") == 1.0).await,
            "counted by its code"
        );
        assert_eq!(
            counted("mqtls_connections_refused_total{reason=\"broker_refused\"}"),
            1.0
        );
        assert_eq!(counted("mqtls_upstream_handshake_seconds_count"), 0.0, "not a set-up");
        assert_eq!(counted("mqtls_connections_active{device=\"boiler-1\"}"), 0.0);
    }

    async fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
        for _ in 0..1000 {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        false
    }

    #[tokio::test]
    async fn server_unavailable_from_one_address_sends_the_device_to_the_next_before_it_is_answered() {
        let (first, first_outcome) = reached();
        let (second, second_outcome) = reached();
        let generation = generation_with(2, vec![first_outcome, second_outcome]);
        let metrics = metrics_for(&generation);
        let brokers = vec![
            (first, Some(vec![0x20, 0x02, 0x00, 0x03])),
            (second, Some(CONNACK_V311.to_vec())),
        ];
        let (answer, heard, _second) = through(&generation, &metrics, brokers, ProtocolVersion::V311).await;
        assert_eq!(
            answer, CONNACK_V311,
            "the device sees only the answer of the broker that took it"
        );
        assert_eq!(heard[0], heard[1], "both brokers got the same CONNECT");
        assert_eq!(*generation.broker.started_from.lock().unwrap(), [0, 1]);
        assert_eq!(*generation.broker.passed_over.lock().unwrap(), [0]);
        assert_eq!(
            value(
                &metrics,
                "mqtls_upstream_connect_failures_total{reason=\"unavailable\"}"
            ),
            1.0
        );
        assert_eq!(
            value(&metrics, "mqtls_connections_refused_total{reason=\"broker_refused\"}"),
            0.0
        );
    }

    #[tokio::test]
    async fn with_no_address_left_the_brokers_answer_stands() {
        for (version, code) in [
            (ProtocolVersion::V5, 0x9C),
            (ProtocolVersion::V5, 0x89),
            (ProtocolVersion::V311, 0x03),
        ] {
            let (broker, outcome) = reached();
            let generation = generation(vec![outcome]);
            let metrics = metrics_for(&generation);
            let refusal = match version {
                ProtocolVersion::V5 => vec![0x20, 0x03, 0x00, code, 0x00],
                _ => vec![0x20, 0x02, 0x00, code],
            };
            let (answer, _, _) = through(&generation, &metrics, vec![(broker, Some(refusal.clone()))], version).await;
            assert_eq!(answer, refusal, "{code:#04x}");
            assert!(generation.broker.passed_over.lock().unwrap().is_empty());
            let series = format!("mqtls_broker_refusals_total{{code=\"{code:#04x}\"}}");
            assert!(wait_for(|| value(&metrics, &series) == 1.0).await, "{series}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_broker_that_does_not_answer_in_time_sends_the_device_to_the_next_address() {
        let (first, first_outcome) = reached();
        let (second, second_outcome) = reached();
        let generation = generation_with(2, vec![first_outcome, second_outcome]);
        let metrics = metrics_for(&generation);
        let brokers = vec![(first, None), (second, Some(CONNACK_V311.to_vec()))];
        let (answer, _, _) = through(&generation, &metrics, brokers, ProtocolVersion::V311).await;
        assert_eq!(answer, CONNACK_V311);
        assert_eq!(*generation.broker.passed_over.lock().unwrap(), [0]);
        assert_eq!(
            value(
                &metrics,
                "mqtls_upstream_connect_failures_total{reason=\"handshake_timeout\"}"
            ),
            1.0
        );
    }

    /// Opens a session whose CONNECT asked for `keep_alive` and whose CONNACK is `connack`; returns the
    /// device's end, the broker's, and the task.
    async fn open_session(
        version: ProtocolVersion,
        keep_alive: u16,
        connack: &[u8],
    ) -> (DuplexStream, DuplexStream, tokio::task::JoinHandle<()>) {
        let (mut broker, outcome) = reached();
        let generation = generation(vec![outcome]);
        let metrics = metrics_for(&generation);
        let (mut device, task) = serve(&generation, &metrics);
        let first = connect(version, "boiler-1", keep_alive);
        device.write_all(&first).await.unwrap();
        let mut got = vec![0u8; first.len()];
        broker.read_exact(&mut got).await.unwrap();
        broker.write_all(connack).await.unwrap();
        let mut answer = vec![0u8; connack.len()];
        device.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer, connack);
        (device, broker, task)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_device_is_cut_after_one_and_a_half_keep_alives() {
        let (mut device, _broker, task) = open_session(ProtocolVersion::V311, 2, &CONNACK_V311).await;
        let started = tokio::time::Instant::now();
        assert!(read_all(&mut device).await.is_empty());
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_brokers_server_keep_alive_replaces_the_devices() {
        // MQTT 5 CONNACK: accepted, Server Keep Alive (0x13) = 4 s, where the device asked for 600.
        let connack = [0x20, 0x06, 0x00, 0x00, 0x03, 0x13, 0x00, 0x04];
        let (mut device, _broker, task) = open_session(ProtocolVersion::V5, 600, &connack).await;
        let started = tokio::time::Instant::now();
        assert!(read_all(&mut device).await.is_empty());
        assert_eq!(started.elapsed(), Duration::from_secs(6));
        task.await.unwrap();
    }

    #[tokio::test]
    async fn over_a_limit_a_device_is_answered_in_its_version() {
        use ProtocolVersion::{V31, V311, V5};
        let cases = [
            (Over::Connections, V31, vec![0x20, 0x02, 0x00, 0x03], "busy"),
            (Over::Connections, V5, vec![0x20, 0x03, 0x00, 0x89, 0x00], "busy"),
            (
                Over::SourceConnections,
                V311,
                vec![0x20, 0x02, 0x00, 0x03],
                "source_connections",
            ),
            (
                Over::SourceConnections,
                V5,
                vec![0x20, 0x03, 0x00, 0x97, 0x00],
                "source_connections",
            ),
            (Over::SourceRate, V5, vec![0x20, 0x03, 0x00, 0x97, 0x00], "source_rate"),
        ];
        for (over, version, answer, label) in cases {
            let generation = generation(Vec::new());
            let metrics = metrics_for(&generation);
            let admission = Admission::new(0);
            let peer: IpAddr = "10.0.0.9".parse().unwrap();
            let Admitted::Refuse(_, permit, slot) = admission.admit(peer, &generation.listen, Instant::now()) else {
                panic!("over the limit")
            };
            let (mut device, ours) = duplex(1024);
            let refusing = Box::new(Refusing {
                over,
                peer,
                generation: generation.clone(),
                metrics: metrics.clone(),
                _answering: permit,
                _slot: slot,
                device: ours,
            });
            let packet = match version {
                // 3.1 names its protocol MQIsdp.
                V31 => {
                    let mut p = vec![
                        0x10, 0x00, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 60, 0, 4,
                    ];
                    p.extend_from_slice(b"late");
                    p[1] = (p.len() - 2) as u8;
                    p
                }
                v => connect(v, "late", 60),
            };
            device.write_all(&packet).await.unwrap();
            refusing.run().await;
            assert_eq!(read_all(&mut device).await, answer, "{over:?} {version}");
            let series = format!("mqtls_connections_refused_total{{reason=\"{label}\"}}");
            assert_eq!(value(&metrics, &series), 1.0, "{over:?}");
        }
    }
}
