//! Which broker addresses to try first: one that just failed is passed over for a while.
//!
//! During an outage of the first address in `upstream.address`, every new connection would otherwise
//! pay the full connect timeout (or handshake timeout, for a broker that takes TCP and never answers TLS)
//! before failing over. An address that fails is passed over for 1 s, then 2, 4... up to
//! `upstream.failed_address_backoff` while it keeps failing, and tried again in order once its time is up;
//! one success clears it. When every address left is being passed over, all of them are tried anyway:
//! nothing is refused on the strength of an old failure. The log says when an address is passed over and
//! when it answers again, not at every connection.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::HostPort;

/// The first time an address is passed over for.
const FIRST_HOLD: Duration = Duration::from_secs(1);

/// The state of each configured address (by index), shared across reloads while the list is unchanged.
#[derive(Debug)]
pub(crate) struct Health {
    addresses: Vec<HostPort>,
    states: Mutex<Vec<State>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct State {
    /// Failures in a row.
    failures: u32,
    /// Passed over until then.
    held_until: Option<Instant>,
}

impl Health {
    pub(crate) fn new(addresses: &[HostPort]) -> Health {
        Health {
            addresses: addresses.to_vec(),
            states: Mutex::new(vec![State::default(); addresses.len()]),
        }
    }

    /// Whether these are the addresses this state is about.
    pub(crate) fn is_for(&self, addresses: &[HostPort]) -> bool {
        self.addresses == addresses
    }

    /// The indexes to try, from `from` on, in order: those not being passed over, or all of them if
    /// every one is.
    pub(crate) fn order(&self, from: usize, now: Instant) -> Vec<usize> {
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let all: Vec<usize> = (from..self.addresses.len()).collect();
        let up: Vec<usize> = all
            .iter()
            .copied()
            .filter(|&i| states[i].held_until.is_none_or(|t| t <= now))
            .collect();
        if up.is_empty() {
            all
        } else {
            up
        }
    }

    /// The address at `index` failed (`why`); it is passed over for a while, longer while it keeps
    /// failing, at most `longest`.
    pub(crate) fn failed(&self, index: usize, why: &str, longest: Duration, now: Instant) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut states[index];
        let was_held = state.held_until.is_some();
        state.failures = state.failures.saturating_add(1);
        let hold = FIRST_HOLD
            .saturating_mul(1 << state.failures.saturating_sub(1).min(16))
            .min(longest);
        state.held_until = Some(now + hold);
        if !was_held && self.addresses.len() > 1 {
            warn!(
                broker = %self.addresses[index],
                why,
                "broker address failed; passing it over for {hold:?}, longer while it keeps failing"
            );
        }
    }

    /// The address at `index` served a connection.
    pub(crate) fn succeeded(&self, index: usize) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        if states[index].held_until.is_some() && self.addresses.len() > 1 {
            info!(broker = %self.addresses[index], "broker address answers again");
        }
        states[index] = State::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(n: usize) -> Health {
        let addresses: Vec<HostPort> = (0..n)
            .map(|i| HostPort {
                host: format!("broker-{i}.example"),
                port: 8883,
            })
            .collect();
        Health::new(&addresses)
    }

    #[test]
    fn a_failed_address_is_passed_over_for_longer_each_time_until_it_answers() {
        let h = health(2);
        let t0 = Instant::now();
        let longest = Duration::from_secs(30);
        assert_eq!(h.order(0, t0), [0, 1]);
        h.failed(0, "connect", longest, t0);
        assert_eq!(h.order(0, t0), [1]);
        assert_eq!(h.order(0, t0 + Duration::from_secs(1)), [0, 1], "tried again after 1 s");
        h.failed(0, "connect", longest, t0 + Duration::from_secs(1));
        assert_eq!(h.order(0, t0 + Duration::from_secs(2)), [1], "then after 2 s more");
        for _ in 0..10 {
            h.failed(0, "connect", longest, t0);
        }
        assert_eq!(h.order(0, t0 + Duration::from_secs(29)), [1]);
        assert_eq!(h.order(0, t0 + longest), [0, 1], "never longer than the backoff");
        h.succeeded(0);
        assert_eq!(h.order(0, t0), [0, 1]);
    }

    #[test]
    fn when_every_address_is_passed_over_all_are_tried() {
        let h = health(2);
        let t0 = Instant::now();
        h.failed(0, "connect", Duration::from_secs(30), t0);
        h.failed(1, "connect", Duration::from_secs(30), t0);
        assert_eq!(h.order(0, t0), [0, 1]);
        assert_eq!(h.order(1, t0), [1], "from the next address on");
    }
}
