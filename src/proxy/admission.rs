//! Admission: whether an accepted connection may be served, decided before a byte of it is read.
//!
//! Two limits hold, both driven by strangers on the LAN and so both bounded:
//! - `listen.max_connections`: connections served at once. Over it a device is still answered ("server
//!   busy", in its own MQTT version), but only [`MAX_BUSY_REFUSALS`] at a time; beyond that a flood is
//!   closed unanswered, so that it cannot grow memory.
//! - `listen.max_pending_per_source`: connections from one address that have not been identified yet
//!   (CONNECT not read or not matched), so that one host cannot hold every slot with CONNECTs that never
//!   finish.
//!
//! Each limit's lock is private to its type and held only inside one method, never across an `await`
//! nor with another lock taken: there is no lock order to keep.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Refusals ("server busy") being answered at once when over `max_connections`.
pub(crate) const MAX_BUSY_REFUSALS: usize = 64;

/// The limits of one proxy, shared by its accept loops.
pub(crate) struct Admission {
    connections: ConnectionLimit,
    busy_refusals: Arc<Semaphore>,
    sources: Arc<SourceLimits>,
}

/// What to do with a connection just accepted.
pub(crate) enum Admitted {
    /// Serve it; the permit holds its place under `max_connections` while it lives.
    Serve(OwnedSemaphorePermit, PendingSlot),
    /// Over `max_connections`: answer "server busy" (the permit counts the refusals being answered).
    RefuseBusy(OwnedSemaphorePermit, PendingSlot),
    /// Over `max_connections` in a flood: close it unanswered.
    Flood,
    /// Its address has `max_pending_per_source` unidentified connections already: close it.
    SourceLimit,
}

impl Admission {
    pub(crate) fn new(max_connections: usize) -> Admission {
        Admission {
            connections: ConnectionLimit::new(max_connections),
            busy_refusals: Arc::new(Semaphore::new(MAX_BUSY_REFUSALS)),
            sources: Arc::default(),
        }
    }

    /// Decides for a connection from `peer`.
    pub(crate) fn admit(&self, peer: IpAddr, max_pending_per_source: usize) -> Admitted {
        let Some(slot) = self.sources.take(peer, max_pending_per_source) else {
            return Admitted::SourceLimit;
        };
        if let Ok(permit) = self.connections.permits.clone().try_acquire_owned() {
            return Admitted::Serve(permit, slot);
        }
        match self.busy_refusals.clone().try_acquire_owned() {
            Ok(permit) => Admitted::RefuseBusy(permit, slot),
            Err(_) => Admitted::Flood,
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

/// Unidentified connections per source address. The map holds only addresses with at least one, so it
/// shrinks back as they are identified or closed.
#[derive(Default)]
pub(crate) struct SourceLimits {
    pending: Mutex<HashMap<IpAddr, usize>>,
}

impl SourceLimits {
    fn take(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<PendingSlot> {
        let mut map = lock(&self.pending);
        let count = map.entry(ip).or_insert(0);
        if *count >= limit {
            if *count == 0 {
                map.remove(&ip);
            }
            return None;
        }
        *count += 1;
        Some(PendingSlot {
            limits: self.clone(),
            ip,
        })
    }

    fn give_back(&self, ip: IpAddr) {
        let mut map = lock(&self.pending);
        if let Some(count) = map.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                map.remove(&ip);
            }
        }
    }

    #[cfg(test)]
    fn pending(&self, ip: IpAddr) -> usize {
        lock(&self.pending).get(&ip).copied().unwrap_or(0)
    }
}

/// Counts one connection against its source address until it is identified (dropped).
pub(crate) struct PendingSlot {
    limits: Arc<SourceLimits>,
    ip: IpAddr,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.limits.give_back(self.ip);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_gets_its_pending_share_and_no_more() {
        let a = Admission::new(100);
        let held: Vec<_> = (0..3).map(|_| a.admit(ip("10.0.0.1"), 3)).collect();
        assert!(held.iter().all(|h| matches!(h, Admitted::Serve(..))));
        assert!(matches!(a.admit(ip("10.0.0.1"), 3), Admitted::SourceLimit));
        assert!(
            matches!(a.admit(ip("10.0.0.2"), 3), Admitted::Serve(..)),
            "another address is not held back"
        );
        drop(held);
        assert_eq!(a.sources.pending(ip("10.0.0.1")), 0);
        assert!(
            lock(&a.sources.pending).get(&ip("10.0.0.1")).is_none(),
            "the map shrinks back"
        );
    }

    #[test]
    fn over_the_limit_a_few_are_answered_busy_and_a_flood_is_closed() {
        let a = Admission::new(1);
        let _served = a.admit(ip("10.0.0.1"), 1000);
        let busy: Vec<_> = (0..MAX_BUSY_REFUSALS).map(|_| a.admit(ip("10.0.0.1"), 1000)).collect();
        assert!(busy.iter().all(|b| matches!(b, Admitted::RefuseBusy(..))));
        assert!(matches!(a.admit(ip("10.0.0.1"), 1000), Admitted::Flood));
        drop(busy);
        assert!(matches!(a.admit(ip("10.0.0.1"), 1000), Admitted::RefuseBusy(..)));
    }

    #[test]
    fn a_zero_pending_limit_leaves_nothing_behind() {
        let a = Admission::new(1);
        assert!(matches!(a.admit(ip("10.0.0.1"), 0), Admitted::SourceLimit));
        assert!(lock(&a.sources.pending).is_empty());
    }

    #[tokio::test]
    async fn resizing_adds_room_at_once_and_takes_it_back_as_connections_close() {
        let a = Admission::new(1);
        let first = a.admit(ip("10.0.0.1"), 100);
        assert!(matches!(a.admit(ip("10.0.0.1"), 100), Admitted::RefuseBusy(..)));
        a.resize(2);
        let second = a.admit(ip("10.0.0.1"), 100);
        assert!(matches!(second, Admitted::Serve(..)));
        a.resize(1);
        drop(first);
        // The permit given back goes to the shrink, not to a new connection.
        tokio::task::yield_now().await;
        for _ in 0..100 {
            if a.connections.permits.available_permits() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(matches!(a.admit(ip("10.0.0.1"), 100), Admitted::RefuseBusy(..)));
        drop(second);
        assert!(matches!(a.admit(ip("10.0.0.1"), 100), Admitted::Serve(..)));
    }
}
