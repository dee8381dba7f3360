//! Admission: whether an accepted connection may be served, decided before a byte of it is read.
//!
//! Every limit here is driven by strangers on the LAN, so every one is bounded:
//! - `listen.max_connections`: connections served at once. Over it a device is still answered ("server
//!   busy", in its own MQTT version), but only [`MAX_ANSWERS`] refusals are answered at a time; beyond
//!   that a flood is closed unanswered, so that it cannot grow memory.
//! - Per source address: `listen.max_connections_per_source` connections open at once (identified or
//!   not), `listen.max_connects_per_source_per_second` new connections (a token bucket that holds the
//!   address's whole connection share, so a host may connect all its devices at once and then that many
//!   per second), and `listen.max_pending_per_source` connections that have not been identified yet. One
//!   host on the LAN can then neither hold every slot nor keep the gateway busy with reconnects, while
//!   every other address connects at once.
//!
//! Each lock is private to its type and held only inside one method, never across an `await` nor with
//! another lock taken: there is no lock order to keep.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Listen;

/// Refusals being answered at once (each reads the device's CONNECT first, to answer in its version).
pub(crate) const MAX_ANSWERS: usize = 64;

/// The limits of one proxy, shared by its accept loops.
pub(crate) struct Admission {
    connections: ConnectionLimit,
    answers: Arc<Semaphore>,
    sources: Arc<Sources>,
}

/// Which limit a connection is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Over {
    /// `listen.max_connections`.
    Connections,
    /// `listen.max_connections_per_source`.
    SourceConnections,
    /// `listen.max_connects_per_source_per_second`.
    SourceRate,
}

/// What to do with a connection just accepted.
pub(crate) enum Admitted {
    /// Serve it; the permit holds its place under `max_connections` while it lives.
    Serve(OwnedSemaphorePermit, SourceSlot),
    /// Over a limit: read its CONNECT and answer it (the permit counts the refusals being answered).
    Refuse(Over, OwnedSemaphorePermit, SourceSlot),
    /// Over a limit while [`MAX_ANSWERS`] refusals are being answered: close it unanswered.
    Flood(Over),
    /// Its address has `max_pending_per_source` unidentified connections already: close it.
    PendingLimit,
}

impl Admission {
    pub(crate) fn new(max_connections: usize) -> Admission {
        Admission {
            connections: ConnectionLimit::new(max_connections),
            answers: Arc::new(Semaphore::new(MAX_ANSWERS)),
            sources: Arc::default(),
        }
    }

    /// Decides for a connection from `peer` under the limits of `listen`.
    pub(crate) fn admit(&self, peer: IpAddr, listen: &Listen, now: Instant) -> Admitted {
        let taken = self.sources.take(peer.to_canonical(), listen, now);
        let (over, slot) = match taken {
            Taken::PendingLimit => return Admitted::PendingLimit,
            Taken::Over(over, slot) => (over, slot),
            Taken::Slot(slot) => match self.connections.permits.clone().try_acquire_owned() {
                Ok(permit) => return Admitted::Serve(permit, slot),
                Err(_) => (Over::Connections, slot),
            },
        };
        match self.answers.clone().try_acquire_owned() {
            Ok(permit) => Admitted::Refuse(over, permit, slot),
            Err(_) => Admitted::Flood(over),
        }
    }

    /// Sizes `max_connections`; lowering it takes effect as open connections close.
    pub(crate) fn resize(&self, max: usize) {
        self.connections.resize(max);
    }
}

/// `max_connections`: a semaphore, and the number it was last sized for.
struct ConnectionLimit {
    permits: Arc<Semaphore>,
    max: Mutex<usize>,
}

impl ConnectionLimit {
    fn new(max: usize) -> ConnectionLimit {
        ConnectionLimit {
            permits: Arc::new(Semaphore::new(max)),
            max: Mutex::new(max),
        }
    }

    fn resize(&self, max: usize) {
        let mut current = lock(&self.max);
        if max > *current {
            self.permits.add_permits(max - *current);
        } else if max < *current {
            // Taken back as connections close: open connections are never cut by a reload.
            let excess = (*current - max) as u32;
            let permits = self.permits.clone();
            tokio::spawn(async move {
                if let Ok(p) = permits.acquire_many_owned(excess).await {
                    p.forget();
                }
            });
        }
        *current = max;
    }
}

/// What each source address holds.
pub(crate) struct Sources {
    state: Mutex<SourceMap>,
}

impl Default for Sources {
    fn default() -> Self {
        Sources {
            state: Mutex::new(SourceMap {
                by_address: HashMap::new(),
                sweep_at: 0,
                epoch: Instant::now(),
            }),
        }
    }
}

struct SourceMap {
    by_address: HashMap<IpAddr, Source>,
    /// The map is swept of addresses that hold nothing when it grows past this.
    sweep_at: usize,
    /// What `Source::refilled` counts from.
    epoch: Instant,
}

/// One address: its connections, and its bucket of connects. Kept small (an entry per address with an
/// open connection is part of what every idle connection costs).
struct Source {
    /// Connections open (identified or not), refusals being answered included.
    open: u32,
    /// Of those, the ones not identified yet.
    pending: u32,
    /// Connects it may make now; refilled at `max_connects_per_source_per_second`, up to
    /// `max_connections_per_source`.
    tokens: f32,
    /// When the tokens were last counted, in milliseconds since the map's epoch.
    refilled: u64,
}

impl Source {
    /// The tokens at `now_ms`.
    fn tokens_at(&self, now_ms: u64, listen: &Listen) -> f32 {
        let elapsed = now_ms.saturating_sub(self.refilled) as f32 / 1000.0;
        let rate = listen.max_connects_per_source_per_second as f32;
        (self.tokens + elapsed * rate).min(listen.max_connections_per_source as f32)
    }
}

enum Taken {
    Slot(SourceSlot),
    Over(Over, SourceSlot),
    PendingLimit,
}

/// Addresses tracked before a sweep is worth its cost.
const MIN_SWEEP: usize = 1024;

impl Sources {
    fn take(self: &Arc<Self>, ip: IpAddr, listen: &Listen, now: Instant) -> Taken {
        let mut map = lock(&self.state);
        let now_ms = now.saturating_duration_since(map.epoch).as_millis() as u64;
        map.sweep(listen, now_ms);
        let source = map.by_address.entry(ip).or_insert(Source {
            open: 0,
            pending: 0,
            tokens: listen.max_connections_per_source as f32,
            refilled: now_ms,
        });
        source.tokens = source.tokens_at(now_ms, listen);
        source.refilled = now_ms;
        if source.pending as usize >= listen.max_pending_per_source {
            return Taken::PendingLimit;
        }
        let over = if source.tokens < 1.0 {
            Some(Over::SourceRate)
        } else if source.open as usize >= listen.max_connections_per_source {
            Some(Over::SourceConnections)
        } else {
            None
        };
        source.tokens = (source.tokens - 1.0).max(0.0);
        source.open += 1;
        source.pending += 1;
        let slot = SourceSlot {
            sources: self.clone(),
            ip,
            identified: false,
        };
        match over {
            Some(over) => Taken::Over(over, slot),
            None => Taken::Slot(slot),
        }
    }

    fn give_back(&self, ip: IpAddr, identified: bool) {
        let mut map = lock(&self.state);
        if let Some(source) = map.by_address.get_mut(&ip) {
            source.open -= 1;
            if !identified {
                source.pending -= 1;
            }
        }
    }

    fn identified(&self, ip: IpAddr) {
        if let Some(source) = lock(&self.state).by_address.get_mut(&ip) {
            source.pending -= 1;
        }
    }

    #[cfg(test)]
    fn counts(&self, ip: IpAddr) -> Option<(u32, u32)> {
        lock(&self.state).by_address.get(&ip).map(|s| (s.open, s.pending))
    }
}

impl SourceMap {
    /// Forgets the addresses that hold no connection and whose bucket has filled up again (they are as
    /// if never seen), once the map has grown past `sweep_at`: amortised, the map costs O(1) per connect,
    /// and holds at most about twice the addresses that are active.
    fn sweep(&mut self, listen: &Listen, now_ms: u64) {
        if self.by_address.len() < self.sweep_at.max(MIN_SWEEP) {
            return;
        }
        let capacity = listen.max_connections_per_source as f32;
        self.by_address
            .retain(|_, s| s.open > 0 || s.tokens_at(now_ms, listen) < capacity);
        self.sweep_at = 2 * self.by_address.len();
    }
}

/// One connection, counted against its source address while it lives (and as not yet identified until
/// [`SourceSlot::identified`]).
pub(crate) struct SourceSlot {
    sources: Arc<Sources>,
    ip: IpAddr,
    identified: bool,
}

impl SourceSlot {
    /// The device is known: the connection no longer counts as pending for its address.
    pub(crate) fn identified(&mut self) {
        if !self.identified {
            self.identified = true;
            self.sources.identified(self.ip);
        }
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        self.sources.give_back(self.ip, self.identified);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Limits for the tests: 100 connections in all; per address 4 open, 2 pending, 1 connect per second.
    fn listen() -> Listen {
        Listen {
            addresses: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            max_connections: 100,
            max_connect_size: 1024,
            max_pending_per_source: 2,
            max_connections_per_source: 4,
            max_connects_per_source_per_second: 1,
            max_idle: Duration::from_secs(3600),
            shutdown_grace: Duration::from_secs(1),
        }
    }

    fn served(a: Admitted) -> SourceSlot {
        match a {
            Admitted::Serve(_, slot) => slot,
            _ => panic!("not served"),
        }
    }

    fn over(a: &Admitted) -> Option<Over> {
        match a {
            Admitted::Refuse(over, ..) | Admitted::Flood(over) => Some(*over),
            _ => None,
        }
    }

    #[test]
    fn an_address_gets_its_pending_share_and_no_more_while_others_go_on() {
        let (a, l, t0) = (Admission::new(100), listen(), Instant::now());
        let first = served(a.admit(ip("10.0.0.1"), &l, t0));
        let _second = served(a.admit(ip("10.0.0.1"), &l, t0));
        assert!(matches!(a.admit(ip("10.0.0.1"), &l, t0), Admitted::PendingLimit));
        assert!(matches!(a.admit(ip("10.0.0.2"), &l, t0), Admitted::Serve(..)));
        let mut first = first;
        first.identified();
        assert!(
            matches!(a.admit(ip("10.0.0.1"), &l, t0), Admitted::Serve(..)),
            "an identified connection no longer counts as pending"
        );
    }

    #[test]
    fn identified_connections_count_against_the_address_until_they_close() {
        let (a, l, t0) = (Admission::new(100), listen(), Instant::now());
        let mut held = Vec::new();
        for i in 0..4 {
            let mut slot = served(a.admit(ip("10.0.0.1"), &l, t0 + Duration::from_secs(i)));
            slot.identified();
            held.push(slot);
        }
        assert_eq!(a.sources.counts(ip("10.0.0.1")), Some((4, 0)));
        let t = t0 + Duration::from_secs(10);
        assert_eq!(over(&a.admit(ip("10.0.0.1"), &l, t)), Some(Over::SourceConnections));
        assert!(matches!(a.admit(ip("10.0.0.2"), &l, t), Admitted::Serve(..)));
        held.pop();
        let t = t + Duration::from_secs(10);
        assert!(
            matches!(a.admit(ip("10.0.0.1"), &l, t), Admitted::Serve(..)),
            "a slot came free"
        );
    }

    #[test]
    fn an_address_may_connect_its_share_at_once_then_at_the_rate() {
        let (a, l, t0) = (Admission::new(100), listen(), Instant::now());
        for _ in 0..4 {
            drop(served(a.admit(ip("10.0.0.1"), &l, t0)));
        }
        assert_eq!(over(&a.admit(ip("10.0.0.1"), &l, t0)), Some(Over::SourceRate));
        assert!(
            matches!(a.admit(ip("10.0.0.2"), &l, t0), Admitted::Serve(..)),
            "others are not slowed"
        );
        let later = t0 + Duration::from_millis(1500);
        assert!(
            matches!(a.admit(ip("10.0.0.1"), &l, later), Admitted::Serve(..)),
            "one token came back"
        );
        assert_eq!(over(&a.admit(ip("10.0.0.1"), &l, later)), Some(Over::SourceRate));
    }

    #[test]
    fn over_max_connections_a_few_are_answered_and_a_flood_is_closed() {
        let (a, t0) = (Admission::new(1), Instant::now());
        let l = Listen {
            max_pending_per_source: 1000,
            max_connections_per_source: 1000,
            max_connects_per_source_per_second: 1000,
            ..listen()
        };
        let _served = a.admit(ip("10.0.0.1"), &l, t0);
        let answered: Vec<_> = (0..MAX_ANSWERS).map(|_| a.admit(ip("10.0.0.1"), &l, t0)).collect();
        assert!(answered
            .iter()
            .all(|b| matches!(b, Admitted::Refuse(Over::Connections, ..))));
        assert!(matches!(
            a.admit(ip("10.0.0.1"), &l, t0),
            Admitted::Flood(Over::Connections)
        ));
        drop(answered);
        assert!(matches!(a.admit(ip("10.0.0.1"), &l, t0), Admitted::Refuse(..)));
    }

    #[test]
    fn addresses_that_hold_nothing_are_forgotten_and_the_map_stays_bounded() {
        let (a, l, t0) = (Admission::new(100_000), listen(), Instant::now());
        for i in 0..10_000u32 {
            let t = t0 + Duration::from_millis(u64::from(i));
            drop(a.admit(IpAddr::from(i.to_be_bytes()), &l, t));
        }
        let tracked = lock(&a.sources.state).by_address.len();

        // plus what accumulated since the last sweep.
        assert!(tracked < 4 * MIN_SWEEP, "{tracked} addresses tracked");
        let mut held = served(a.admit(ip("10.9.9.9"), &l, t0 + Duration::from_secs(100)));
        held.identified();
        for i in 0..5_000u32 {
            let t = t0 + Duration::from_secs(200) + Duration::from_millis(u64::from(i));
            drop(a.admit(IpAddr::from((i + 20_000).to_be_bytes()), &l, t));
        }
        assert_eq!(
            a.sources.counts(ip("10.9.9.9")),
            Some((1, 0)),
            "an open connection is never forgotten"
        );
    }

    #[tokio::test]
    async fn resizing_adds_room_at_once_and_takes_it_back_as_connections_close() {
        let (a, t0) = (Admission::new(1), Instant::now());
        let l = Listen {
            max_connects_per_source_per_second: 1000,
            max_pending_per_source: 100,
            max_connections_per_source: 100,
            ..listen()
        };
        let first = a.admit(ip("10.0.0.1"), &l, t0);
        assert!(matches!(a.admit(ip("10.0.0.1"), &l, t0), Admitted::Refuse(..)));
        a.resize(2);
        let second = a.admit(ip("10.0.0.1"), &l, t0);
        assert!(matches!(second, Admitted::Serve(..)));
        a.resize(1);
        drop(first);
        // The permit given back goes to the shrink, not to a new connection.
        for _ in 0..100 {
            if a.connections.permits.available_permits() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(matches!(a.admit(ip("10.0.0.1"), &l, t0), Admitted::Refuse(..)));
        drop(second);
        assert!(matches!(a.admit(ip("10.0.0.1"), &l, t0), Admitted::Serve(..)));
    }
}
