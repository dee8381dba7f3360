//! Resolving the broker's name: under a timeout of its own, a bounded number of lookups at once, and the
//! answers remembered for a short time.
//!
//! Names are resolved at connect time rather than once at start-up (gateways often boot before their DNS
//! works, and brokers move), but not for every connection: during a reconnect storm thousands of devices
//! would ask the same question at once. The system resolver (`getaddrinfo`) blocks a thread and cannot be
//! cancelled, so a lookup that outlives its timeout still holds its place among the [`MAX_LOOKUPS`]; a
//! resolver that hangs therefore costs that many threads, not one per connection. When a lookup fails or
//! times out, the last answer is used while it is not too old: a DNS hiccup does not take the broker away.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::{timeout, Instant};

use crate::config::HostPort;

/// Lookups running at once.
pub(crate) const MAX_LOOKUPS: usize = 4;
/// How long an answer is used without asking again.
const FRESH: Duration = Duration::from_secs(30);
/// How long an answer may still stand in when the resolver fails.
const STALE_AT_MOST: Duration = Duration::from_secs(600);

/// A name's last answer, and when it came.
type Answer = (Vec<SocketAddr>, Instant);

/// The resolver of one process: shared by every configuration generation.
#[derive(Debug)]
pub(crate) struct Resolver {
    lookups: Arc<Semaphore>,
    answers: Mutex<HashMap<(String, u16), Answer>>,
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver {
            lookups: Arc::new(Semaphore::new(MAX_LOOKUPS)),
            answers: Mutex::default(),
        }
    }
}

impl Resolver {
    /// The addresses of `hp`, or why there are none.
    pub(crate) async fn resolve(&self, hp: &HostPort, limit: Duration) -> Result<Vec<SocketAddr>, String> {
        if let Ok(ip) = hp.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, hp.port)]);
        }
        let key = (hp.host.clone(), hp.port);
        let now = Instant::now();
        let known = self
            .answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        if let Some((addrs, at)) = &known {
            if now.duration_since(*at) < FRESH {
                return Ok(addrs.clone());
            }
        }
        let problem = match timeout(limit, self.lookup(key.clone())).await {
            Ok(Ok(addrs)) if !addrs.is_empty() => {
                let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
                answers.insert(key, (addrs.clone(), Instant::now()));
                return Ok(addrs);
            }
            Ok(Ok(_)) => format!("{hp}: the name has no address"),
            Ok(Err(e)) => format!("{hp}: cannot resolve: {e}"),
            Err(_) => format!("{hp}: no answer from the resolver within {limit:?}"),
        };
        match known {
            Some((addrs, at)) if now.duration_since(at) < STALE_AT_MOST => {
                tracing::debug!(broker = %hp, problem, "using the last answer for the broker's name");
                Ok(addrs)
            }
            _ => Err(problem),
        }
    }

    /// One lookup on a blocking thread, holding its place among the [`MAX_LOOKUPS`] until the thread is
    /// done, even if the caller stops waiting.
    async fn lookup(&self, (host, port): (String, u16)) -> std::io::Result<Vec<SocketAddr>> {
        let place = self
            .lookups
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let looked_up = tokio::task::spawn_blocking(move || {
            let _place = place;
            (host.as_str(), port).to_socket_addrs().map(Iterator::collect)
        });
        looked_up.await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }

    #[cfg(test)]
    pub(crate) fn remember(&self, hp: &HostPort, addrs: Vec<SocketAddr>, at: Instant) {
        let key = (hp.host.clone(), hp.port);
        self.answers.lock().unwrap().insert(key, (addrs, at));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(host: &str) -> HostPort {
        HostPort {
            host: host.into(),
            port: 8883,
        }
    }

    #[tokio::test]
    async fn an_address_needs_no_lookup() {
        let r = Resolver::default();
        let addrs = r.resolve(&hp("192.0.2.7"), Duration::from_secs(1)).await.unwrap();
        assert_eq!(addrs, ["192.0.2.7:8883".parse().unwrap()]);
    }

    #[tokio::test]
    async fn a_fresh_answer_is_used_without_asking() {
        let r = Resolver::default();
        let known = vec!["192.0.2.8:8883".parse().unwrap()];
        // A name no resolver knows: only the remembered answer can serve it.
        let name = hp("broker.invalid");
        r.remember(&name, known.clone(), Instant::now());
        assert_eq!(r.resolve(&name, Duration::from_secs(5)).await.unwrap(), known);
    }

    #[tokio::test]
    async fn a_failed_lookup_falls_back_on_an_answer_not_too_old() {
        let r = Resolver::default();
        let name = hp("broker.invalid");
        let known = vec!["192.0.2.9:8883".parse().unwrap()];
        r.remember(&name, known.clone(), Instant::now() - FRESH - Duration::from_secs(1));
        assert_eq!(r.resolve(&name, Duration::from_secs(5)).await.unwrap(), known);
        r.remember(&name, known, Instant::now() - STALE_AT_MOST - Duration::from_secs(1));
        let e = r.resolve(&name, Duration::from_secs(5)).await.unwrap_err();
        assert!(e.starts_with("broker.invalid:8883: "), "{e}");
    }
}
