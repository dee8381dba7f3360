//! Retiring long sessions: a connection opened under a certificate that has since been replaced, or that
//! is about to end, is closed at a safe point so that its device reconnects under the current one.
//!
//! A sensor stays connected for months, and the broker checks a certificate only at the handshake: without
//! this, a renewed (or revoked and replaced) certificate takes effect only when the device happens to
//! reconnect, and a connection runs on past its certificate's notAfter. With `[retire]` configured, a
//! connection is retired one grace period after its reason arises (a reload replaced its device's
//! certificate; its certificate's notAfter comes within `retire.expiring_within`), spreading a fleet's
//! reconnects, and then at a safe point: the copy sees bytes, not packets, so the cheapest sound rule is
//! that nothing has passed either way for `retire.quiet` and nothing waits in mqtls's buffers (a device
//! sends a packet in one go, so silence means none is on its way). A connection that is never that quiet
//! is retired one more grace period later anyway. Both sides are then closed cleanly (a FIN to the
//! device, a close_notify to the broker), and the device reconnects as after a broker restart.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::{sleep, sleep_until, Instant};

use crate::config::Retire;
use crate::pipe::Retirement;

/// Which devices' certificates reloads have replaced: one signal per device name, kept for the life of
/// the process (shared by every configuration generation).
#[derive(Debug, Default)]
pub(crate) struct Renewals {
    by_device: RwLock<HashMap<Arc<str>, Arc<Renewal>>>,
}

/// One device's renewals: a count, and a wake-up for the connections waiting on it.
#[derive(Debug, Default)]
pub(crate) struct Renewal {
    count: AtomicU64,
    notify: Notify,
}

impl Renewals {
    /// The signal of device `name`.
    pub(crate) fn of(&self, name: &Arc<str>) -> Arc<Renewal> {
        if let Some(r) = self.by_device.read().unwrap_or_else(|e| e.into_inner()).get(name) {
            return r.clone();
        }
        let mut map = self.by_device.write().unwrap_or_else(|e| e.into_inner());
        map.entry(name.clone()).or_default().clone()
    }

    /// A reload replaced the certificate of device `name`.
    pub(crate) fn renewed(&self, name: &Arc<str>) {
        let r = self.of(name);
        r.count.fetch_add(1, Ordering::SeqCst);
        r.notify.notify_waiters();
    }
}

/// What a connection keeps to know when to retire: boxed, and only when `[retire]` is configured, so that
/// the connections of a gateway without it carry one pointer.
#[derive(Debug)]
pub(crate) struct Watch {
    policy: Retire,
    renewal: Arc<Renewal>,
    /// The renewals counted when the connection opened.
    seen: u64,
    /// When its certificate ends.
    not_after: SystemTime,
}

impl Watch {
    pub(crate) fn new(policy: Retire, renewal: Arc<Renewal>, not_after: SystemTime) -> Watch {
        let seen = renewal.count.load(Ordering::SeqCst);
        Watch {
            policy,
            renewal,
            seen,
            not_after,
        }
    }

    /// Completes once the connection should be retired (after the grace period), saying why.
    pub(crate) fn due(&self) -> Pin<Box<dyn Future<Output = Retirement> + Send + '_>> {
        Box::pin(async move {
            let why = tokio::select! {
                _ = self.renewed(), if self.policy.renewed => Retirement::Renewed,
                _ = self.expiring() => Retirement::Expiring,
            };
            sleep(self.policy.grace).await;
            why
        })
    }

    /// The safe point: nothing passed either way for this long.
    pub(crate) fn quiet(&self) -> Duration {
        self.policy.quiet
    }

    /// How long a connection that is never quiet may still run once due.
    pub(crate) fn patience(&self) -> Duration {
        self.policy.grace
    }

    async fn renewed(&self) {
        loop {
            let notified = self.renewal.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.renewal.count.load(Ordering::SeqCst) != self.seen {
                return;
            }
            notified.await;
        }
    }

    /// When the certificate comes within the margin of its end; at its end for a connection opened
    /// within the margin already (retiring it earlier would only bring it back under the same one).
    async fn expiring(&self) {
        let Some(margin) = self.policy.expiring_within else {
            return std::future::pending().await;
        };
        let left = self.not_after.duration_since(SystemTime::now()).unwrap_or_default();
        let at = if left > margin { left - margin } else { left };
        sleep_until(Instant::now() + at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(renewed: bool, expiring_within: Option<Duration>) -> Retire {
        Retire {
            renewed,
            expiring_within,
            grace: Duration::from_secs(600),
            quiet: Duration::from_secs(2),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_after_the_connection_opened_makes_it_due_one_grace_later() {
        let renewals = Renewals::default();
        let name: Arc<str> = "boiler-1".into();
        renewals.renewed(&name);
        let far = SystemTime::now() + Duration::from_secs(365 * 86_400);
        let watch = Watch::new(policy(true, None), renewals.of(&name), far);
        let due = watch.due();
        tokio::pin!(due);
        let not_yet = tokio::time::timeout(Duration::from_secs(3600), due.as_mut()).await;
        assert!(not_yet.is_err(), "a renewal before it opened is not a reason");
        renewals.renewed(&"meter-2".into());
        renewals.renewed(&name);
        let started = Instant::now();
        assert_eq!(due.await, Retirement::Renewed);
        assert_eq!(started.elapsed(), Duration::from_secs(600));
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_are_ignored_unless_asked_for() {
        let renewals = Renewals::default();
        let name: Arc<str> = "boiler-1".into();
        let far = SystemTime::now() + Duration::from_secs(30 * 86_400);
        let watch = Watch::new(
            policy(false, Some(Duration::from_secs(7 * 86_400))),
            renewals.of(&name),
            far,
        );
        let due = watch.due();
        tokio::pin!(due);
        renewals.renewed(&name);
        let started = Instant::now();
        assert_eq!(due.await, Retirement::Expiring);
        let waited = started.elapsed();
        // 23 days to the margin, then the grace.
        assert!(
            waited >= Duration::from_secs(23 * 86_400) && waited < Duration::from_secs(23 * 86_400 + 700),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_opened_within_the_margin_runs_until_the_certificate_ends() {
        let renewals = Renewals::default();
        let soon = SystemTime::now() + Duration::from_secs(3 * 86_400);
        let watch = Watch::new(
            policy(true, Some(Duration::from_secs(7 * 86_400))),
            renewals.of(&"x".into()),
            soon,
        );
        let started = Instant::now();
        assert_eq!(watch.due().await, Retirement::Expiring);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(3 * 86_400 - 5), "{waited:?}");
    }
}
