//! The proxy: its listeners, the configuration generation in force, and shutdown.
//!
//! Data flows one way: an accept loop per listener takes a connection, `admission` decides whether
//! it may be served, and a task of its own runs its whole life (`connection`): read the CONNECT, pick
//! the device, reach the broker, copy. A reload ([`ProxyHandle::replace`]) swaps the [`Generation`] that
//! new connections get and adds or closes listeners; open connections are never touched by it.
//!
//! Shutdown (`run` returning) stops every accept loop, lets open connections finish for the grace
//! period, then cuts the rest.
//!
//! Locks: every lock here is private to one type and held only inside one of its methods, never across
//! an `await` nor while another is taken, so there is no order to keep: the generation (a read-mostly
//! `RwLock` swapped by a reload), the listeners (one lock, so that a listener added by a reload as
//! serving starts is either left for `run` or served at once, never both nor neither), and the
//! admission limits (see `admission`).

mod admission;
mod connection;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
mod generation;
mod retire;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, info_span, warn, Instrument};

pub use generation::Generation;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::refusal::Refusal;
use crate::socket;
use crate::upstream::{Broker, Connector};
use admission::{Admission, Admitted};
use connection::Connection;

/// Longest pause after an accept error (e.g. out of file descriptors) before trying again.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// What the proxy's accept loops, its handle and its connections share.
struct Shared<B> {
    generation: RwLock<Arc<Generation<B>>>,
    admission: Admission,
    metrics: Arc<Metrics>,
    listeners: Mutex<Listeners>,
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

/// The listeners, served or waiting for `run`.
struct Listeners {
    /// Being served, by configured address, each with the token that stops its accept loop.
    served: Vec<Served>,
    /// Bound but not served yet, until `run` takes them (`None` from then on: a listener added later is
    /// served at once).
    unserved: Option<Vec<(SocketAddr, TcpListener)>>,
}

struct Served {
    configured: SocketAddr,
    local: SocketAddr,
    stop: CancellationToken,
}

impl<B: Broker> Shared<B> {
    fn new(generation: Generation<B>, metrics: Arc<Metrics>, bound: Vec<(SocketAddr, TcpListener)>) -> Self {
        Shared {
            admission: Admission::new(generation.listen.max_connections),
            generation: RwLock::new(Arc::new(generation)),
            metrics,
            listeners: Mutex::new(Listeners {
                served: Vec::new(),
                unserved: Some(bound),
            }),
            adopted: Vec::new(),
            accept_loops: TaskTracker::new(),
            connections_open: TaskTracker::new(),
            stop_accepting: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
        }
    }

    fn current(&self) -> Arc<Generation<B>> {
        self.generation.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Starts the accept loop of one listener and records it in `listeners` (whose lock the caller holds).
    fn serve(self: &Arc<Self>, listeners: &mut Listeners, configured: SocketAddr, listener: TcpListener) {
        let local = listener.local_addr().unwrap_or(configured);
        let stop = self.stop_accepting.child_token();
        listeners.served.push(Served {
            configured,
            local,
            stop: stop.clone(),
        });
        self.accept_loops
            .spawn(accept_loop(listener, configured, self.clone(), stop));
    }

    fn local_addrs(&self) -> Vec<SocketAddr> {
        let listeners = lock(&self.listeners);
        let unserved = listeners.unserved.iter().flatten();
        listeners
            .served
            .iter()
            .map(|s| s.local)
            .chain(unserved.filter_map(|(_, l)| l.local_addr().ok()))
            .collect()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets open connections finish for up to
    /// `grace`, and closes the rest.
    async fn run(self: Arc<Self>, shutdown: CancellationToken, grace: Duration) {
        {
            let mut listeners = lock(&self.listeners);
            for (configured, listener) in listeners.unserved.take().unwrap_or_default() {
                self.serve(&mut listeners, configured, listener);
            }
        }
        let upkeep = tokio::spawn(self.metrics.clone().keep_up());
        shutdown.cancelled().await;
        upkeep.abort();
        self.stop_accepting.cancel();
        self.accept_loops.close();
        self.accept_loops.wait().await;
        lock(&self.listeners).served.clear();
        self.drain(grace).await;
    }

    async fn drain(&self, grace: Duration) {
        let open = &self.connections_open;
        open.close();
        let open_at_stop = open.len();
        if open_at_stop > 0 {
            info!(open = open_at_stop, grace = ?grace, "stopped accepting; waiting for open connections");
        }
        let mut cut = 0;
        if timeout(grace, open.wait()).await.is_err() {
            cut = open.len();
            warn!(open = cut, "grace period over; closing the remaining connections");
            self.hard_stop.cancel();
            open.wait().await;
        }
        info!(
            open_at_stop,
            finished = open_at_stop.saturating_sub(cut),
            cut,
            "all connections closed"
        );
    }

    /// Puts `generation` in force for new connections, with the listeners `wanted`; see
    /// [`ProxyHandle::replace`].
    async fn replace(self: &Arc<Self>, wanted: Vec<SocketAddr>, generation: Generation<B>) -> Result<(), ReplaceError> {
        let held: Vec<SocketAddr> = {
            let listeners = lock(&self.listeners);
            let unserved = listeners.unserved.iter().flatten().map(|(a, _)| *a);
            listeners.served.iter().map(|s| s.configured).chain(unserved).collect()
        };
        let mut added = Vec::new();
        for addr in wanted.iter().filter(|a| !held.contains(a)) {
            added.push((*addr, bind(*addr, generation.listen.max_connections)?));
        }
        let max_connections = generation.listen.max_connections;
        self.metrics.install_devices(&generation.table);
        *self.generation.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(generation);
        self.admission.resize(max_connections);
        let keep = |addr: &SocketAddr| self.keeps_listener(addr, &wanted);
        let mut listeners = lock(&self.listeners);
        listeners.served.retain(|s| {
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
        match listeners.unserved.as_mut() {
            Some(unserved) => {
                unserved.retain(|(a, _)| keep(a));
                unserved.extend(added);
            }
            None => {
                for (addr, listener) in added {
                    self.serve(&mut listeners, addr, listener);
                }
            }
        }
        Ok(())
    }

    /// Whether a reload to the listen addresses `wanted` keeps the listener on `addr`: a socket systemd
    /// passed is kept whatever the configuration says.
    fn keeps_listener(&self, addr: &SocketAddr, wanted: &[SocketAddr]) -> bool {
        let passed = self.adopted.contains(addr);
        if passed && !wanted.contains(addr) {
            warn!(
                listener = %addr,
                "no longer configured, but systemd passed this socket (socket activation): it stays open, \
                 and devices arriving on it are matched against the new configuration; change the socket unit \
                 and restart mqtls to close it"
            );
        }
        passed || wanted.contains(addr)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A bound proxy, ready to run.
pub struct Proxy {
    shared: Arc<Shared<Connector>>,
}

/// Changes a running proxy's configuration: the handle [`crate::reload`] uses.
#[derive(Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared<Connector>>,
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
    /// Binds every listen address of `config` (shared and dedicated). `metrics` counts what the proxy
    /// does; its per-device series follow `generation`.
    pub async fn bind(config: &Config, generation: Generation, metrics: Arc<Metrics>) -> io::Result<Proxy> {
        Proxy::bind_adopting(config, generation, metrics, Vec::new()).await
    }

    /// Like [`Proxy::bind`], except that an address paired with a listener in `adopted` (bound and
    /// listening already, e.g. passed in by systemd socket activation) is served on that listener.
    pub async fn bind_adopting(
        config: &Config,
        generation: Generation,
        metrics: Arc<Metrics>,
        mut adopted: Vec<(SocketAddr, std::net::TcpListener)>,
    ) -> io::Result<Proxy> {
        let mut bound = Vec::new();
        let adopted_addresses: Vec<SocketAddr> = adopted.iter().map(|(a, _)| *a).collect();
        for addr in config.all_listen_addresses() {
            let l = match adopted.iter().position(|(a, _)| *a == addr) {
                Some(i) => adopt(adopted.swap_remove(i).1, addr)?,
                None => bind(addr, generation.listen.max_connections)
                    .map_err(|e| io::Error::new(e.source.kind(), e.to_string()))?,
            };
            bound.push((addr, l));
        }
        metrics.install_devices(&generation.table);
        metrics.mark_loaded();
        let mut shared = Shared::new(generation, metrics, bound);
        shared.adopted = adopted_addresses;
        Ok(Proxy {
            shared: Arc::new(shared),
        })
    }

    /// The addresses actually bound, in configuration order (useful when a port was 0); see
    /// [`ProxyHandle::local_addrs`] once reloads have changed them.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.shared.local_addrs()
    }

    /// The metrics this proxy updates.
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
        self.shared.run(shutdown, grace).await
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
        self.shared.local_addrs()
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
        self.shared.replace(config.all_listen_addresses(), generation).await
    }
}

/// Listens on `addr` with room in the accept queue for `backlog` connections (a reconnect storm).
fn bind(addr: SocketAddr, backlog: usize) -> Result<TcpListener, ReplaceError> {
    socket::listen(addr, backlog).map_err(|source| ReplaceError { address: addr, source })
}

async fn accept_loop<B: Broker>(
    listener: TcpListener,
    configured: SocketAddr,
    shared: Arc<Shared<B>>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                admit(&shared, configured, stream, peer);
            }
            Err(e) => {
                // Out of descriptors or memory: wait instead of spinning, and keep serving.
                error!(listener = %configured, error = %e, "accept failed; retrying in {backoff:?}");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
}

/// Decides what to do with an accepted connection and, unless it is closed at once, spawns its task.
fn admit<B: Broker>(shared: &Arc<Shared<B>>, listener: SocketAddr, stream: TcpStream, peer: SocketAddr) {
    let span = info_span!("conn", %peer, device = tracing::field::Empty);
    shared.metrics.accepted();
    let generation = shared.current();
    let listen = &generation.listen;
    let work = match shared.admission.admit(peer.ip(), listen, Instant::now()) {
        Admitted::Serve(permit, slot) => Work::Serve(Box::new(Connection {
            listener,
            peer,
            generation,
            metrics: shared.metrics.clone(),
            slot,
            _permit: permit,
            device: stream,
        })),
        Admitted::Refuse(over, permit, slot) => {
            let refusal = connection::Refusing {
                over,
                peer: peer.ip(),
                generation: generation.clone(),
                metrics: shared.metrics.clone(),
                _answering: permit,
                _slot: slot,
                device: stream,
            };
            Work::Refuse(Box::new(refusal))
        }
        Admitted::Flood(over) => {
            let refusal = connection::over_limit(over, listen, None);
            span.in_scope(|| refusal.record(&shared.metrics, peer.ip()));
            return;
        }
        Admitted::PendingLimit => {
            let refusal = Refusal::SourceLimit {
                limit: listen.max_pending_per_source,
            };
            span.in_scope(|| refusal.record(&shared.metrics, peer.ip()));
            return;
        }
    };
    let task = connection_task(work, shared.hard_stop.clone());
    shared.connections_open.spawn(task.instrument(span));
}

/// What an accepted connection's task does. Boxed either way: the task's future keeps its own copy of
/// what it was given for as long as it lives, so what it is given must be small; the box is emptied
/// as the work starts. A refusal's future is boxed too: it is rare, and its state (a drain buffer among
/// others) would otherwise size the task of every connection.
enum Work<B> {
    Serve(Box<Connection<B, TcpStream>>),
    Refuse(Box<connection::Refusing<B, TcpStream>>),
}

impl<B: Broker> Work<B> {
    /// Not an `async fn`: that would keep a second copy of `self` in the task for the connection's life.
    /// Called from within the task, so the socket options are set there, not in the accept loop.
    fn run(self) -> impl Future<Output = ()> {
        match self {
            Work::Serve(conn) => {
                socket::tune(&conn.device);
                Either::Left(conn.serve())
            }
            Work::Refuse(refusing) => Either::Right(Box::pin(refusing.run())),
        }
    }
}

/// The future a connection's task runs: its work, unless the grace period at shutdown ends first.
///
/// Not an `async fn`: its body would move `work` out of the argument into a local of its own, and the
/// task would keep both (8 bytes more for every connection, measured with the test below).
#[allow(clippy::manual_async_fn)]
fn connection_task<B: Broker>(work: Work<B>, hard_stop: CancellationToken) -> impl Future<Output = ()> {
    async move {
        // The work's future is made inside the select: made outside, the task would hold it twice
        // (once bound, once moved into the select), doubling every idle connection's task.
        tokio::select! {
            _ = work.run() => {}
            _ = hard_stop.cancelled() => info!(reason = "shutdown", "connection closed at shutdown"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HostPort, Listen, Upstream};
    use crate::device::DeviceTable;

    /// What the task of every connection weighs, idle ones included, measured on the real types (TCP,
    /// the TLS connector): 2,136 bytes when this guard was written (debug build), 1,864 once the work
    /// came boxed and the set-up's inputs left with the set-up, 1,920 with the retirement of long
    /// sessions (a pointer in the session and in the copy, one more in the copy's state). It grows by a
    /// kilobyte or more if the
    /// set-up future stops being boxed, if the copy takes the open connection instead of borrowing it, or
    /// if the work's future is made outside the select; by a few hundred bytes if the work is no longer
    /// boxed. Each of those was measured in `bench/` as idle memory per connection. If this fails after a
    /// change, measure with `bench/run` before raising the bound, and say why in the change.
    const TASK_BUDGET: usize = 1_950;

    #[tokio::test]
    async fn the_idle_connection_task_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _device = TcpStream::connect(addr).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let upstream = Upstream {
            addresses: vec![HostPort {
                host: "127.0.0.1".into(),
                port: 1,
            }],
            server_name: None,
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            max_connecting: 1,
            queue_timeout: Duration::from_secs(60),
            resolve_timeout: Duration::from_secs(5),
            failed_address_backoff: Duration::from_secs(30),
            alpn: Vec::new(),
            allow_readable_keys: false,
        };
        let listen = Listen {
            addresses: vec![addr],
            connect_timeout: Duration::from_secs(10),
            max_connections: 1,
            max_connect_size: 1024,
            max_pending_per_source: 1,
            max_connections_per_source: 1,
            max_connects_per_source_per_second: 1,
            max_idle: Duration::from_secs(3600),
            shutdown_grace: Duration::from_secs(1),
        };
        let generation = Generation {
            table: DeviceTable::of(Vec::new(), None),
            broker: Connector::new_after(&upstream, None),
            listen,
            retire: None,
            renewals: Default::default(),
        };
        let shared = Arc::new(Shared::new(generation, Arc::new(Metrics::new(true)), Vec::new()));
        let Admitted::Serve(permit, slot) = shared
            .admission
            .admit(peer.ip(), &shared.current().listen, Instant::now())
        else {
            panic!("admitted")
        };
        let conn = Box::new(Connection {
            listener: addr,
            peer,
            generation: shared.current(),
            metrics: shared.metrics.clone(),
            slot,
            _permit: permit,
            device: stream,
        });
        let task = connection_task(Work::Serve(conn), shared.hard_stop.clone()).instrument(info_span!("conn"));
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= TASK_BUDGET,
            "a connection's task takes {size} bytes, over {TASK_BUDGET}"
        );
    }
}
