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
use crate::metrics::{ActiveGuard, Metered, Metrics, Refused};
use crate::mqtt::{self, Connect, ProtocolVersion, Refusal};
use crate::pipe;
use crate::socket;
use crate::upstream::{BrokerStream, Connector, Failure};

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
        Generation::load_after(config, None)
    }

    /// Like [`Generation::load`], keeping the identities of `previous` whose files have not changed.
    pub fn load_after(
        config: &Config,
        previous: Option<&Generation>,
    ) -> Result<Generation, crate::config::ConfigErrors> {
        Ok(Generation {
            table: DeviceTable::build_after(config, previous.map(|g| &g.table))?,
            connector: Connector::new_after(&config.upstream, previous.map(|g| &g.connector)),
            listen: config.listen.clone(),
        })
    }
}

struct Shared {
    generation: RwLock<Arc<Generation>>,
    connections: Arc<Semaphore>,
    /// The `max_connections` the semaphore was last sized for.
    max_connections: Mutex<usize>,
    busy_refusals: Arc<Semaphore>,
    /// Connections per source address that have not yet been identified (CONNECT not read or refused).
    unidentified: Mutex<HashMap<IpAddr, usize>>,
    metrics: Arc<Metrics>,
    /// Listeners being served, by configured address, each with the token that stops its accept loop.
    listeners: Mutex<Vec<Served>>,
    /// Listeners bound but not yet served, until [`Proxy::run`] takes them (`None` from then on: a
    /// listener added later is served at once).
    unserved: Mutex<Option<Vec<(SocketAddr, TcpListener)>>>,
    /// Listen addresses whose sockets systemd passed (socket activation): mqtls cannot give them back,
    /// so a reload never closes them.
    adopted: Vec<SocketAddr>,
    accept_loops: TaskTracker,
    connections_open: TaskTracker,
    /// Cancelled when the proxy stops accepting (shutdown).
    stop_accepting: CancellationToken,
    /// Cancelled when the grace period is over: every connection still open is closed.
    hard_stop: CancellationToken,
}

struct Served {
    configured: SocketAddr,
    local: SocketAddr,
    stop: CancellationToken,
}

impl Shared {
    fn current(&self) -> Arc<Generation> {
        self.generation.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Starts the accept loop of one listener.
    fn serve(self: &Arc<Self>, configured: SocketAddr, listener: TcpListener) {
        let local = listener.local_addr().unwrap_or(configured);
        let stop = self.stop_accepting.child_token();
        lock(&self.listeners).push(Served {
            configured,
            local,
            stop: stop.clone(),
        });
        let ctx = AcceptContext {
            configured,
            shared: self.clone(),
        };
        self.accept_loops.spawn(accept_loop(listener, ctx, stop));
    }

    /// Sizes the connection limit to `max`. Lowering it takes effect as open connections close.
    fn resize(&self, max: usize) {
        let mut current = lock(&self.max_connections);
        if max > *current {
            self.connections.add_permits(max - *current);
        } else if max < *current {
            let excess = (*current - max) as u32;
            let connections = self.connections.clone();
            tokio::spawn(async move {
                if let Ok(p) = connections.acquire_many_owned(excess).await {
                    p.forget();
                }
            });
        }
        *current = max;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A bound proxy, ready to run.
pub struct Proxy {
    shared: Arc<Shared>,
}

/// Changes a running proxy's configuration: the handle [`crate::reload`] uses.
#[derive(Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
}

/// Why a new configuration could not be put in force; the old one stays.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address}: {source}")]
pub struct ReplaceError {
    /// The listen address that could not be bound.
    pub address: SocketAddr,
    /// Why.
    pub source: io::Error,
}

impl Proxy {
    /// Binds every listen address of `config` (shared and dedicated).
    pub async fn bind(config: &Config, generation: Generation) -> io::Result<Proxy> {
        Proxy::bind_adopting(config, generation, Vec::new()).await
    }

    /// Like [`Proxy::bind`], except that an address paired with a listener in `adopted` (bound and
    /// listening already, e.g. passed in by systemd socket activation) is served on that listener.
    pub async fn bind_adopting(
        config: &Config,
        generation: Generation,
        mut adopted: Vec<(SocketAddr, std::net::TcpListener)>,
    ) -> io::Result<Proxy> {
        let mut listeners = Vec::new();
        let adopted_addresses: Vec<SocketAddr> = adopted.iter().map(|(a, _)| *a).collect();
        for addr in config.all_listen_addresses() {
            let l = match adopted.iter().position(|(a, _)| *a == addr) {
                Some(i) => adopt(adopted.swap_remove(i).1, addr)?,
                None => bind(addr, generation.listen.max_connections)
                    .map_err(|e| io::Error::new(e.source.kind(), e.to_string()))?,
            };
            listeners.push((addr, l));
        }
        let device_labels = config.metrics.as_ref().is_none_or(|m| m.device_labels);
        let metrics = Arc::new(Metrics::new(device_labels));
        metrics.install_devices(&generation.table);
        metrics.mark_loaded();
        let shared = Shared {
            connections: Arc::new(Semaphore::new(generation.listen.max_connections)),
            max_connections: Mutex::new(generation.listen.max_connections),
            busy_refusals: Arc::new(Semaphore::new(MAX_BUSY_REFUSALS)),
            unidentified: Mutex::new(HashMap::new()),
            generation: RwLock::new(Arc::new(generation)),
            metrics,
            listeners: Mutex::new(Vec::new()),
            unserved: Mutex::new(Some(listeners)),
            adopted: adopted_addresses,
            accept_loops: TaskTracker::new(),
            connections_open: TaskTracker::new(),
            stop_accepting: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
        };
        Ok(Proxy {
            shared: Arc::new(shared),
        })
    }

    /// The addresses actually bound, in configuration order (useful when a port was 0); see
    /// [`ProxyHandle::local_addrs`] once reloads have changed them.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.handle().local_addrs()
    }

    /// The metrics this proxy updates, for the scrape endpoint.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// A handle that can put a new configuration generation in force while the proxy runs.
    pub fn handle(&self) -> ProxyHandle {
        ProxyHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets open connections finish for up to
    /// `grace`, and closes the rest.
    pub async fn run(self, shutdown: CancellationToken, grace: Duration) {
        let shared = self.shared;
        let unserved = lock(&shared.unserved).take().unwrap_or_default();
        for (configured, listener) in unserved {
            shared.serve(configured, listener);
        }
        let upkeep = tokio::spawn(shared.metrics.clone().keep_up());
        shutdown.cancelled().await;
        upkeep.abort();
        shared.stop_accepting.cancel();
        shared.accept_loops.close();
        shared.accept_loops.wait().await;
        lock(&shared.listeners).clear();
        let open = &shared.connections_open;
        open.close();
        let open_at_stop = open.len();
        if open_at_stop > 0 {
            info!(open = open_at_stop, grace = ?grace, "stopped accepting; waiting for open connections");
        }
        let mut cut = 0;
        if timeout(grace, open.wait()).await.is_err() {
            cut = open.len();
            warn!(open = cut, "grace period over; closing the remaining connections");
            shared.hard_stop.cancel();
            open.wait().await;
        }
        info!(
            open_at_stop,
            finished = open_at_stop.saturating_sub(cut),
            cut,
            "all connections closed"
        );
    }
}

fn adopt(listener: std::net::TcpListener, addr: SocketAddr) -> io::Result<TcpListener> {
    info!(listen = %addr, "serving on the socket passed by systemd");
    listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
        .map_err(|e| io::Error::new(e.kind(), format!("cannot serve on the socket passed for {addr}: {e}")))
}

impl ProxyHandle {
    /// The addresses being listened on: those of the start-up configuration in its order, then those
    /// that reloads added.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        let served = lock(&self.shared.listeners);
        let unserved = lock(&self.shared.unserved);
        served
            .iter()
            .map(|s| s.local)
            .chain(unserved.iter().flatten().filter_map(|(_, l)| l.local_addr().ok()))
            .collect()
    }

    /// The metrics the proxy updates.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// The generation new connections get.
    pub fn generation(&self) -> Arc<Generation> {
        self.shared.current()
    }

    /// Puts `generation` (loaded from `config`) in force for new connections. Listeners the new
    /// configuration adds are bound first: if one cannot be, nothing changes. Then the generation is
    /// swapped, the connection limit resized, and listeners it no longer names are closed. Open
    /// connections keep the generation they started with.
    pub async fn replace(&self, config: &Config, generation: Generation) -> Result<(), ReplaceError> {
        let wanted = config.all_listen_addresses();
        let held: Vec<SocketAddr> = {
            let served = lock(&self.shared.listeners);
            let unserved = lock(&self.shared.unserved);
            served
                .iter()
                .map(|s| s.configured)
                .chain(unserved.iter().flatten().map(|(a, _)| *a))
                .collect()
        };
        let mut added = Vec::new();
        for addr in wanted.iter().filter(|a| !held.contains(a)) {
            added.push((*addr, bind(*addr, generation.listen.max_connections)?));
        }
        let max_connections = generation.listen.max_connections;
        self.shared.metrics.install_devices(&generation.table);
        *self.shared.generation.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(generation);
        self.shared.resize(max_connections);
        let adopted = &self.shared.adopted;
        let keep = |addr: &SocketAddr| {
            let passed = adopted.contains(addr);
            if passed && !wanted.contains(addr) {
                warn!(
                    listener = %addr,
                    "no longer configured, but systemd passed this socket (socket activation): it stays open, \
                     and devices arriving on it are matched against the new configuration; change the socket unit \
                     and restart mqtls to close it"
                );
            }
            passed || wanted.contains(addr)
        };
        lock(&self.shared.listeners).retain(|s| {
            let kept = keep(&s.configured);
            if !kept {
                info!(listener = %s.configured, "listener removed by the new configuration; closing it");
                s.stop.cancel();
            }
            kept
        });
        for (addr, _) in &added {
            info!(listener = %addr, "listening (added by the new configuration)");
        }
        // Decided under the lock that `run` takes the list under: a listener is either in the list `run`
        // serves or served here, never left behind.
        let to_serve = match lock(&self.shared.unserved).as_mut() {
            Some(unserved) => {
                unserved.retain(|(a, _)| keep(a));
                unserved.extend(added);
                Vec::new()
            }
            None => added,
        };
        for (addr, listener) in to_serve {
            self.shared.serve(addr, listener);
        }
        Ok(())
    }
}

/// Listens on `addr` with room in the accept queue for `backlog` connections (a reconnect storm).
fn bind(addr: SocketAddr, backlog: usize) -> Result<TcpListener, ReplaceError> {
    socket::listen(addr, backlog).map_err(|source| ReplaceError { address: addr, source })
}

#[derive(Clone)]
struct AcceptContext {
    configured: SocketAddr,
    shared: Arc<Shared>,
}

async fn accept_loop(listener: TcpListener, ctx: AcceptContext, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
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
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
}

fn admit(stream: TcpStream, peer: SocketAddr, ctx: &AcceptContext) {
    let span = info_span!("conn", %peer, device = tracing::field::Empty);
    let shared = &ctx.shared;
    shared.metrics.accepted();
    let generation = shared.current();
    let Some(slot) = UnidentifiedSlot::take(shared, peer.ip(), generation.listen.max_pending_per_source) else {
        shared.metrics.refused(Refused::SourceLimit);
        span.in_scope(|| {
            warn!(
                reason = "source_limit",
                "refused: too many unidentified connections from this address"
            )
        });
        return;
    };
    let work = match shared.connections.clone().try_acquire_owned() {
        Ok(permit) => {
            let conn = Connection {
                listener: ctx.configured,
                peer,
                generation,
                metrics: shared.metrics.clone(),
                slot: Some(slot),
                _permit: permit,
            };
            Work::Serve(conn, stream)
        }
        Err(_) => {
            shared.metrics.refused(Refused::Busy);
            match shared.busy_refusals.clone().try_acquire_owned() {
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
            }
        }
    };
    let hard_stop = shared.hard_stop.clone();
    shared.connections_open.spawn(
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
        Ok((connect, _)) => {
            warn!(reason = "busy", client_id = ?connect.client_id, limit, "refused: connection limit reached");
            refuse(stream, connect.version, Refusal::ServerBusy).await;
        }
        Err(_) => debug!("over the connection limit and no valid CONNECT; closed"),
    }
}

/// One device connection, from its first byte to its last.
struct Connection {
    listener: SocketAddr,
    peer: SocketAddr,
    generation: Arc<Generation>,
    metrics: Arc<Metrics>,
    slot: Option<UnidentifiedSlot>,
    _permit: OwnedSemaphorePermit,
}

/// A connection ready for the copy: both sockets, what set-up learnt, and the device's counters.
struct Open {
    device: TcpStream,
    broker: BrokerStream,
    session: Session,
    started: Instant,
    /// The device's counters; counts the connection in `mqtls_connections_active` until it ends.
    stats: ActiveGuard,
}

impl Open {
    /// Copies both ways until the connection ends, counting the bytes as they pass. Borrows the
    /// connection rather than taking it: a future that owned it would hold a second copy of the TLS
    /// state (about a kilobyte) beside the caller's, for every idle connection.
    async fn copy(&mut self, metrics: &Metrics) {
        let limit = silence_limit(self.session.keep_alive);
        let mut device = Metered::new(&mut self.device, &self.stats);
        let transfer = pipe::pipe(&mut device, &mut self.broker, limit).await;
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

/// Why the session did not start once the broker was reached.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// The broker refused the TLS session after the handshake (TLS 1.3 reports a rejected client
    /// certificate with an alert at the first read).
    #[error("the broker rejected the TLS session: {0}")]
    Rejected(io::Error),
    /// The broker did not take the CONNECT, or did not answer it, within the handshake timeout.
    #[error("{0}")]
    TimedOut(&'static str),
    /// The broker closed the connection, or it failed, before its CONNACK.
    #[error("{0}")]
    Closed(io::Error),
}

impl From<io::Error> for SessionError {
    fn from(e: io::Error) -> Self {
        let tls_alert = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .is_some();
        if tls_alert {
            SessionError::Rejected(e)
        } else {
            SessionError::Closed(e)
        }
    }
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
    /// copy needs. Nor does the copy keep the configuration generation: a sensor connected for months
    /// must not hold an old generation (thousands of identities) alive after reloads.
    async fn serve(mut self, stream: TcpStream) {
        let Some(mut open) = Box::pin(self.open(stream)).await else {
            return;
        };
        drop(self.generation);
        open.copy(&self.metrics).await;
    }

    /// Reads the CONNECT, picks the device, reaches the broker as that device and starts the session.
    /// `None` when the connection ended (refused, or closed) before that.
    async fn open(&mut self, mut stream: TcpStream) -> Option<Open> {
        socket::tune(&stream);
        let (connect, first_bytes) = match read_connect(&mut stream, &self.generation.listen).await {
            Ok(read) => read,
            Err(reason) => {
                self.metrics.refused(reason);
                return None;
            }
        };
        let Some(device) = self.identify(&connect) else {
            self.metrics.refused(Refused::UnknownDevice);
            refuse(stream, connect.version, Refusal::IdentifierRejected).await;
            return None;
        };
        self.slot = None;
        Span::current().record("device", &*device.name);
        let started = Instant::now();
        let connected = self
            .generation
            .connector
            .connect(device.identity.client_config.clone())
            .await;
        let mut broker = match connected {
            Ok(c) => {
                c.failed.iter().for_each(|f| self.metrics.upstream_failure(*f));
                c.stream
            }
            Err(e) => {
                e.attempts.iter().for_each(|(f, _)| self.metrics.upstream_failure(*f));
                self.metrics.refused(Refused::BrokerUnreachable);
                warn!(reason = e.reason(), error = %e, "refused: broker unreachable");
                refuse(stream, connect.version, Refusal::ServerUnavailable).await;
                return None;
            }
        };
        let session = match self
            .start_session(&mut broker, &mut stream, &connect, first_bytes)
            .await
        {
            Ok(session) => session,
            Err(e) => return self.session_failed(e, stream, connect.version).await,
        };
        self.metrics.upstream_reached(started.elapsed());
        let stats = self.metrics.device(&device.name);
        stats.add_to_broker(session.first_in);
        stats.add_to_device(session.first_out);
        info!(
            client_id = ?connect.client_id,
            mqtt = %connect.version,
            keep_alive = session.keep_alive,
            setup_ms = started.elapsed().as_millis() as u64,
            "connection opened"
        );
        Some(Open {
            device: stream,
            broker,
            session,
            started,
            stats: stats.open(),
        })
    }

    /// The broker was reached but no session started. A broker that rejected the device's certificate
    /// (TLS 1.3 says so only after the handshake, at the first read) or that did not answer in time
    /// counts, and is answered, as unreachable; one that closed the connection has had its say.
    async fn session_failed(&self, e: SessionError, stream: TcpStream, version: ProtocolVersion) -> Option<Open> {
        let failure = match &e {
            SessionError::Rejected(_) => Failure::Tls,
            SessionError::TimedOut(_) => Failure::HandshakeTimeout,
            SessionError::Closed(_) => {
                info!(end = %e, "connection closed before the session started");
                return None;
            }
        };
        self.metrics.upstream_failure(failure);
        self.metrics.refused(Refused::BrokerUnreachable);
        warn!(reason = failure.label(), error = %e, "refused: the broker did not accept the connection");
        refuse(stream, version, Refusal::ServerUnavailable).await;
        None
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

    /// Delivers the device's first bytes (its CONNECT and anything after it) and relays the broker's
    /// answer up to its CONNACK, which proves the broker accepted the TLS session and, for MQTT 5, may set
    /// the keep-alive. Bounded by the handshake timeout: a broker that takes nothing, or says nothing,
    /// must not hold the connection forever.
    async fn start_session(
        &self,
        broker: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin),
        device: &mut (impl AsyncWriteExt + Unpin),
        connect: &Connect,
        first_bytes: Vec<u8>,
    ) -> Result<Session, SessionError> {
        let limit = self.generation.connector.handshake_timeout();
        let forward = async {
            broker.write_all(&first_bytes).await?;
            broker.flush().await
        };
        timeout(limit, forward)
            .await
            .map_err(|_| SessionError::TimedOut("the broker took no bytes in time"))??;
        let (relayed, server_keep_alive) = timeout(limit, relay_connack(broker, device, connect.version))
            .await
            .map_err(|_| SessionError::TimedOut("no CONNACK from the broker in time"))??;
        let mut session = Session {
            keep_alive: connect.keep_alive,
            first_in: first_bytes.len() as u64,
            first_out: relayed as u64,
        };
        if let Some(k) = server_keep_alive {
            debug!(server_keep_alive = k, "the broker sets the keep-alive");
            session.keep_alive = k;
        }
        Ok(session)
    }
}

/// Reads the device's CONNECT under the configured limits. An error (logged here) means the connection
/// should just be closed: nothing sensible can be answered to a non-CONNECT.
async fn read_connect(stream: &mut TcpStream, limits: &Listen) -> Result<(Connect, Vec<u8>), Refused> {
    let mut buf = Vec::new();
    match timeout(
        limits.connect_timeout,
        mqtt::read_connect(stream, &mut buf, limits.max_connect_size),
    )
    .await
    {
        Ok(Ok(connect)) => Ok((connect, buf)),
        Ok(Err(e)) => {
            warn!(reason = "bad_connect", error = %e, "closed: first packet is not a valid CONNECT");
            Err(Refused::BadConnect)
        }
        Err(_) => {
            warn!(reason = "connect_timeout", received = buf.len(), limit = ?limits.connect_timeout, "closed: no complete CONNECT in time");
            Err(Refused::ConnectTimeout)
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
) -> io::Result<(usize, Option<u16>)>
where
    B: AsyncReadExt + Unpin,
    D: AsyncWriteExt + Unpin,
{
    const MAX_CONNACK: usize = 4096;
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
