//! The proxy: accept loop, then one task per connection that reads the CONNECT, picks the device, reaches
//! the broker as that device, and hands both sockets to [`crate::pipe`].
//!
//! Every slow step happens inside the connection's own task, under a named timeout, so one slow or
//! hostile device never delays another. When something goes wrong before the broker is reached, the device
//! gets a CONNACK in its own protocol version ([`crate::mqtt::connack`]) rather than a bare reset.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument, Span};

use crate::config::{Config, Listen};
use crate::device::DeviceTable;
use crate::mqtt::{self, Connect, ProtocolVersion, Refusal};
use crate::pipe;
use crate::socket;
use crate::upstream::{BrokerStream, Connector};

/// Refusals ("server busy") being answered at once when over `max_connections`; beyond this, new
/// connections are closed without an answer so that a flood cannot grow memory.
const MAX_BUSY_REFUSALS: usize = 64;
/// How long a refused device gets to take its CONNACK before the socket is closed.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// Bytes a refused device may still send (and that are discarded) while it reads its CONNACK.
const REFUSAL_DRAIN_LIMIT: usize = 64 * 1024;
/// Longest pause after an accept error (e.g. out of file descriptors) before trying again.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Everything a connection needs from one configuration generation. Connections keep the generation
/// they started with; a reload (which swaps it) never touches a connection already open.
#[derive(Debug)]
pub struct Generation {
    /// Who the devices are.
    pub table: DeviceTable,
    /// How to reach the broker.
    pub connector: Connector,
    /// Limits for the device side.
    pub listen: Listen,
}

impl Generation {
    /// Loads every identity the configuration names and prepares the connector.
    pub fn load(config: &Config) -> Result<Generation, crate::config::ConfigErrors> {
        Ok(Generation {
            table: DeviceTable::build(config)?,
            connector: Connector::new(&config.upstream),
            listen: config.listen.clone(),
        })
    }
}

struct Shared {
    generation: RwLock<Arc<Generation>>,
    connections: Arc<Semaphore>,
    busy_refusals: Arc<Semaphore>,
    /// Connections per source address that have not yet been identified (CONNECT not read or refused).
    unidentified: Mutex<HashMap<IpAddr, usize>>,
}

impl Shared {
    fn current(&self) -> Arc<Generation> {
        self.generation.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A bound proxy, ready to run.
pub struct Proxy {
    listeners: Vec<(SocketAddr, TcpListener)>,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Binds every listen address of `config` (shared and dedicated).
    pub async fn bind(config: &Config, generation: Generation) -> io::Result<Proxy> {
        let mut listeners = Vec::new();
        for addr in config.all_listen_addresses() {
            let l = socket::listen(addr, generation.listen.max_connections)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
            listeners.push((addr, l));
        }
        let shared = Shared {
            connections: Arc::new(Semaphore::new(generation.listen.max_connections)),
            busy_refusals: Arc::new(Semaphore::new(MAX_BUSY_REFUSALS)),
            unidentified: Mutex::new(HashMap::new()),
            generation: RwLock::new(Arc::new(generation)),
        };
        Ok(Proxy {
            listeners,
            shared: Arc::new(shared),
        })
    }

    /// The addresses actually bound, in configuration order (useful when a port was 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|(_, l)| l.local_addr().ok()).collect()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets open connections finish for up to
    /// `grace`, and closes the rest.
    pub async fn run(self, shutdown: CancellationToken, grace: Duration) {
        let tracker = TaskTracker::new();
        let hard_stop = CancellationToken::new();
        let mut accept_loops = Vec::new();
        for (configured, listener) in self.listeners {
            let ctx = AcceptContext {
                configured,
                shared: self.shared.clone(),
                tracker: tracker.clone(),
                hard_stop: hard_stop.clone(),
            };
            accept_loops.push(tokio::spawn(accept_loop(listener, ctx, shutdown.clone())));
        }
        for l in accept_loops {
            let _ = l.await;
        }
        tracker.close();
        if !tracker.is_empty() {
            info!(open = tracker.len(), grace = ?grace, "stopped accepting; waiting for open connections");
        }
        if timeout(grace, tracker.wait()).await.is_err() {
            warn!(
                open = tracker.len(),
                "grace period over; closing the remaining connections"
            );
            hard_stop.cancel();
            tracker.wait().await;
        }
    }
}

#[derive(Clone)]
struct AcceptContext {
    configured: SocketAddr,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    hard_stop: CancellationToken,
}

async fn accept_loop(listener: TcpListener, ctx: AcceptContext, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                admit(stream, peer, &ctx);
            }
            Err(e) => {
                // Out of descriptors or memory: wait instead of spinning, and keep serving.
                error!(listener = %ctx.configured, error = %e, "accept failed; retrying in {backoff:?}");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
}

fn admit(stream: TcpStream, peer: SocketAddr, ctx: &AcceptContext) {
    let span = info_span!("conn", %peer, device = tracing::field::Empty);
    let generation = ctx.shared.current();
    let Some(slot) = UnidentifiedSlot::take(&ctx.shared, peer.ip(), generation.listen.max_pending_per_source) else {
        span.in_scope(|| {
            warn!(
                reason = "source_limit",
                "refused: too many unidentified connections from this address"
            )
        });
        return;
    };
    let work = match ctx.shared.connections.clone().try_acquire_owned() {
        Ok(permit) => {
            let conn = Connection {
                listener: ctx.configured,
                peer,
                generation,
                slot: Some(slot),
                _permit: permit,
            };
            Work::Serve(conn, stream)
        }
        Err(_) => match ctx.shared.busy_refusals.clone().try_acquire_owned() {
            Ok(permit) => Work::RefuseBusy(stream, generation, permit, slot),
            Err(_) => {
                span.in_scope(|| {
                    warn!(
                        reason = "busy",
                        "refused: connection limit reached; closed without answer"
                    )
                });
                return;
            }
        },
    };
    let hard_stop = ctx.hard_stop.clone();
    ctx.tracker.spawn(
        async move {
            // The work's future is made inside the select: made outside, the task would hold it twice
            // (once captured, once moved into the select), doubling every idle connection's task.
            tokio::select! {
                _ = work.run() => {}
                _ = hard_stop.cancelled() => info!(reason = "shutdown", "connection closed at shutdown"),
            }
        }
        .instrument(span),
    );
}

/// What an accepted connection's task does.
enum Work {
    Serve(Connection, TcpStream),
    RefuseBusy(TcpStream, Arc<Generation>, OwnedSemaphorePermit, UnidentifiedSlot),
}

impl Work {
    /// Not an `async fn`: that would keep a second copy of `self` in the task for the connection's life.
    fn run(self) -> impl std::future::Future<Output = ()> {
        match self {
            Work::Serve(conn, stream) => Either::Left(conn.serve(stream)),
            Work::RefuseBusy(stream, generation, permit, slot) => {
                Either::Right(refuse_busy(stream, generation, permit, slot))
            }
        }
    }
}

/// Counts a connection against its source address until it is identified, so that one host on the LAN
/// cannot hold every connection slot with CONNECTs that never finish or never match.
struct UnidentifiedSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl UnidentifiedSlot {
    fn take(shared: &Arc<Shared>, ip: IpAddr, limit: usize) -> Option<UnidentifiedSlot> {
        let mut map = shared.unidentified.lock().unwrap_or_else(|e| e.into_inner());
        let count = map.entry(ip).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(UnidentifiedSlot {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for UnidentifiedSlot {
    fn drop(&mut self) {
        let mut map = self.shared.unidentified.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = map.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

async fn refuse_busy(
    mut stream: TcpStream,
    generation: Arc<Generation>,
    _permit: OwnedSemaphorePermit,
    _slot: UnidentifiedSlot,
) {
    let limit = generation.listen.max_connections;
    match read_connect(&mut stream, &generation.listen).await {
        Some((connect, _)) => {
            warn!(reason = "busy", client_id = ?connect.client_id, limit, "refused: connection limit reached");
            refuse(stream, connect.version, Refusal::ServerBusy).await;
        }
        None => debug!("over the connection limit and no valid CONNECT; closed"),
    }
}

/// One device connection, from its first byte to its last.
struct Connection {
    listener: SocketAddr,
    peer: SocketAddr,
    generation: Arc<Generation>,
    slot: Option<UnidentifiedSlot>,
    _permit: OwnedSemaphorePermit,
}

/// A connection ready for the copy: both sockets and what set-up learnt.
struct Open {
    device: TcpStream,
    broker: BrokerStream,
    session: Session,
    started: Instant,
}

/// Bytes mqtls passed on itself before the copy loop started: the device's first bytes and the broker's
/// CONNACK.
struct Session {
    keep_alive: u16,
    first_in: u64,
    first_out: u64,
}

impl Connection {
    /// The set-up runs boxed, and its future is freed before the copy starts: set-up futures (the TLS
    /// handshake's above all) are large, and the task of a long-lived connection should keep only what the
    /// copy needs.
    async fn serve(mut self, stream: TcpStream) {
        let Some(mut open) = Box::pin(self.open(stream)).await else {
            return;
        };
        let limit = silence_limit(open.session.keep_alive);
        let transfer = pipe::pipe(&mut open.device, &mut open.broker, limit).await;
        info!(
            bytes_in = transfer.device_to_broker + open.session.first_in,
            bytes_out = transfer.broker_to_device + open.session.first_out,
            duration_s = open.started.elapsed().as_secs_f64(),
            end = %transfer.end,
            "connection closed"
        );
    }

    /// Reads the CONNECT, picks the device, reaches the broker as that device and starts the session.
    /// `None` when the connection ended (refused, or closed) before that.
    async fn open(&mut self, mut stream: TcpStream) -> Option<Open> {
        socket::tune(&stream);
        let (connect, first_bytes) = read_connect(&mut stream, &self.generation.listen).await?;
        let Some(device) = self.identify(&connect) else {
            refuse(stream, connect.version, Refusal::IdentifierRejected).await;
            return None;
        };
        self.slot = None;
        Span::current().record("device", &*device.name);
        let started = Instant::now();
        let mut broker = match self
            .generation
            .connector
            .connect(device.identity.client_config.clone())
            .await
        {
            Ok(b) => b,
            Err(e) => {
                warn!(reason = e.reason(), error = %e, "refused: broker unreachable");
                refuse(stream, connect.version, Refusal::ServerUnavailable).await;
                return None;
            }
        };
        info!(
            client_id = ?connect.client_id,
            mqtt = %connect.version,
            keep_alive = connect.keep_alive,
            setup_ms = started.elapsed().as_millis() as u64,
            "connection opened"
        );
        match self
            .start_session(&mut broker, &mut stream, &connect, first_bytes)
            .await
        {
            Ok(session) => Some(Open {
                device: stream,
                broker,
                session,
                started,
            }),
            Err(e) => {
                info!(end = %e, "connection closed before the session started");
                None
            }
        }
    }

    fn identify(&self, connect: &Connect) -> Option<Arc<crate::device::Device>> {
        let found = self
            .generation
            .table
            .find(self.listener, self.peer.ip(), &connect.client_id);
        if found.is_err() {
            warn!(
                reason = "unknown_device",
                client_id = ?connect.client_id,
                listener = %self.listener,
                "refused: no device matches"
            );
        }
        found.ok()
    }

    /// Delivers the device's first bytes (its CONNECT and anything after it) and, for MQTT 5, relays
    /// the broker's CONNACK to learn a Server Keep Alive. Bounded by the handshake timeout: a broker
    /// that takes nothing must not hold the connection forever.
    async fn start_session(
        &self,
        broker: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin),
        device: &mut (impl AsyncWriteExt + Unpin),
        connect: &Connect,
        first_bytes: Vec<u8>,
    ) -> io::Result<Session> {
        let limit = self.generation.connector.handshake_timeout();
        let forward = async {
            broker.write_all(&first_bytes).await?;
            broker.flush().await
        };
        timeout(limit, forward).await.unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the broker took no bytes in time",
            ))
        })?;
        let mut session = Session {
            keep_alive: connect.keep_alive,
            first_in: first_bytes.len() as u64,
            first_out: 0,
        };
        if connect.version == ProtocolVersion::V5 {
            let (relayed, server_keep_alive) = relay_connack(broker, device, connect.version, limit).await?;
            session.first_out = relayed as u64;
            if let Some(k) = server_keep_alive {
                debug!(server_keep_alive = k, "the broker sets the keep-alive");
                session.keep_alive = k;
            }
        }
        Ok(session)
    }
}

/// Reads the device's CONNECT under the configured limits. `None` (after logging why) means the
/// connection should just be closed: nothing sensible can be answered to a non-CONNECT.
async fn read_connect(stream: &mut TcpStream, limits: &Listen) -> Option<(Connect, Vec<u8>)> {
    let mut buf = Vec::new();
    match timeout(
        limits.connect_timeout,
        mqtt::read_connect(stream, &mut buf, limits.max_connect_size),
    )
    .await
    {
        Ok(Ok(connect)) => Some((connect, buf)),
        Ok(Err(e)) => {
            warn!(reason = "bad_connect", error = %e, "closed: first packet is not a valid CONNECT");
            None
        }
        Err(_) => {
            warn!(reason = "connect_timeout", received = buf.len(), limit = ?limits.connect_timeout, "closed: no complete CONNECT in time");
            None
        }
    }
}

/// Copies the broker's first bytes to the device until they hold its whole CONNACK, and returns how many
/// bytes were copied and the MQTT 5 Server Keep Alive, which replaces the device's own keep-alive. Bytes
/// pass unchanged; if the CONNACK cannot be parsed they are still passed on and the device's keep-alive
/// stays in force.
async fn relay_connack<B, D>(
    broker: &mut B,
    device: &mut D,
    version: ProtocolVersion,
    limit: Duration,
) -> io::Result<(usize, Option<u16>)>
where
    B: AsyncReadExt + Unpin,
    D: AsyncWriteExt + Unpin,
{
    const MAX_CONNACK: usize = 4096;
    let relay = async {
        let mut buf = Vec::with_capacity(256);
        loop {
            let mut chunk = [0u8; 512];
            let n = broker.read(&mut chunk).await?;
            if n == 0 {
                // Whatever the broker said before closing is the device's to read.
                device.write_all(&buf).await?;
                device.flush().await?;
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the broker closed before its CONNACK",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            let parsed = mqtt::parse_connack(&buf, version);
            if !matches!(parsed, Err(mqtt::ConnectError::Incomplete)) || buf.len() >= MAX_CONNACK {
                device.write_all(&buf).await?;
                device.flush().await?;
                return Ok((buf.len(), parsed.ok().and_then(|c| c.server_keep_alive)));
            }
        }
    };
    timeout(limit, relay).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no CONNACK from the broker in time",
        ))
    })
}

/// MQTT lets a server wait 1.5 x keep-alive before deciding a client is gone; mqtls does the same.
pub fn silence_limit(keep_alive_secs: u16) -> Option<Duration> {
    (keep_alive_secs > 0).then(|| Duration::from_millis(u64::from(keep_alive_secs) * 1500))
}

/// Answers with a refusal CONNACK, then closes gently: the device's unread bytes are drained first, since
/// closing a socket with unread data sends a reset that can destroy the CONNACK before the device reads it.
async fn refuse(mut stream: TcpStream, version: ProtocolVersion, refusal: Refusal) {
    let answer = async {
        stream.write_all(mqtt::connack(version, refusal)).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        let mut drained = 0;
        while drained < REFUSAL_DRAIN_LIMIT {
            match stream.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        io::Result::Ok(())
    };
    if let Ok(Err(e)) = timeout(REFUSAL_LINGER, answer).await {
        debug!(error = %e, "device went away while being refused");
    }
}
