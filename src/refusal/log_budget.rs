//! How many lines refusals may write to the log, so that a scanner, a flood or one broken device can
//! neither fill a gateway's disk nor bury the one line that matters.
//!
//! Time runs in windows of [`WINDOW`]. In each, a reason may write [`PER_NETWORK`] lines for refusals from
//! one source network (a /24 for IPv4, a /64 for IPv6: one LAN segment, one host's privacy addresses) and
//! [`PER_REASON`] lines in all. What is held back is counted, and when the window ends each reason that
//! held lines back writes one summary: "312 more refusals reason=bad_connect from 10.0.0.0/24 in the last
//! 10 s". The counters in `/metrics` count every refusal; only the log is bounded. The bookkeeping is
//! bounded too: at most [`MAX_NETWORKS`] networks are told apart in a window, the rest share one tally.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::Reason;

/// The length of one window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Lines one reason may write for one source network in a window.
pub const PER_NETWORK: u32 = 5;
/// Lines one reason may write in a window, all networks together.
pub const PER_REASON: u32 = 20;
/// Networks told apart in one window; refusals from further ones are tallied together.
const MAX_NETWORKS: usize = 1024;
/// Networks a summary line names before it says "and N more".
const NAMED_IN_SUMMARY: usize = 3;

/// The log budget of one proxy.
#[derive(Debug)]
pub(crate) struct LogBudget {
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    lines: [u32; Reason::ALL.len()],
    by_network: HashMap<(Reason, Option<IpNet>), Tally>,
}

#[derive(Debug, Default)]
struct Tally {
    logged: u32,
    held_back: u64,
}

/// What was held back for one reason in a window that has ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Summary {
    pub reason: Reason,
    pub held_back: u64,
    /// The networks that were held back most, most first ("other" for the shared tally).
    pub networks: Vec<String>,
    /// How many more networks were held back.
    pub more_networks: usize,
}

impl LogBudget {
    pub(crate) fn new(now: Instant) -> LogBudget {
        LogBudget {
            window: Mutex::new(Window::new(now)),
        }
    }

    /// Whether a refusal for `reason` from `peer` may write its line now. The summaries of a window that
    /// has ended come back too, to be written first.
    pub(crate) fn admit(&self, reason: Reason, peer: IpAddr, now: Instant) -> (bool, Vec<Summary>) {
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let ended = window.roll(now);
        let network = (window.by_network.len() < MAX_NETWORKS
            || window.by_network.contains_key(&(reason, Some(network_of(peer)))))
        .then(|| network_of(peer));
        let reason_lines = window.lines[reason as usize];
        let tally = window.by_network.entry((reason, network)).or_default();
        let log = reason_lines < PER_REASON && tally.logged < PER_NETWORK;
        if log {
            tally.logged += 1;
            window.lines[reason as usize] += 1;
        } else {
            tally.held_back += 1;
        }
        (log, ended)
    }

    /// The summaries of the window, if it has ended by `now` (then a new one starts).
    pub(crate) fn roll(&self, now: Instant) -> Vec<Summary> {
        self.window.lock().unwrap_or_else(|e| e.into_inner()).roll(now)
    }
}

impl Window {
    fn new(started: Instant) -> Window {
        Window {
            started,
            lines: [0; Reason::ALL.len()],
            by_network: HashMap::new(),
        }
    }

    fn roll(&mut self, now: Instant) -> Vec<Summary> {
        if now.duration_since(self.started) < WINDOW {
            return Vec::new();
        }
        let ended = std::mem::replace(self, Window::new(now));
        ended.summaries()
    }

    fn summaries(self) -> Vec<Summary> {
        let mut out: Vec<Summary> = Vec::new();
        for reason in Reason::ALL {
            let mut held: Vec<(Option<IpNet>, u64)> = self
                .by_network
                .iter()
                .filter(|((r, _), t)| *r == reason && t.held_back > 0)
                .map(|((_, n), t)| (*n, t.held_back))
                .collect();
            if held.is_empty() {
                continue;
            }
            held.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let name = |n: &Option<IpNet>| n.map_or_else(|| "other networks".to_string(), |n| n.to_string());
            out.push(Summary {
                reason,
                held_back: held.iter().map(|(_, n)| n).sum(),
                networks: held.iter().take(NAMED_IN_SUMMARY).map(|(n, _)| name(n)).collect(),
                more_networks: held.len().saturating_sub(NAMED_IN_SUMMARY),
            });
        }
        out
    }
}

/// The network a source address is grouped in.
fn network_of(peer: IpAddr) -> IpNet {
    let len = match peer.to_canonical() {
        IpAddr::V4(_) => 24,
        IpAddr::V6(_) => 64,
    };
    IpNet::new(peer.to_canonical(), len)
        .expect("a valid prefix length")
        .trunc()
}

impl Summary {
    /// "10.0.0.0/24, 10.0.1.0/24 and 3 more networks".
    pub(crate) fn sources(&self) -> String {
        let named = self.networks.join(", ");
        match self.more_networks {
            0 => named,
            n => format!("{named} and {n} more networks"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_network_gets_its_share_and_the_rest_is_summed_up_when_the_window_ends() {
        let t0 = Instant::now();
        let budget = LogBudget::new(t0);
        let logged = (0..1000)
            .filter(|i| {
                budget
                    .admit(Reason::BadConnect, ip(&format!("10.0.0.{}", i % 250)), t0)
                    .0
            })
            .count();
        assert_eq!(logged, PER_NETWORK as usize);
        assert!(budget.roll(t0 + WINDOW / 2).is_empty(), "the window is not over");
        let summaries = budget.roll(t0 + WINDOW);
        assert_eq!(
            summaries,
            [Summary {
                reason: Reason::BadConnect,
                held_back: 1000 - PER_NETWORK as u64,
                networks: vec!["10.0.0.0/24".into()],
                more_networks: 0,
            }]
        );
        assert!(budget.roll(t0 + WINDOW * 2).is_empty(), "nothing was held back since");
    }

    #[test]
    fn many_networks_share_the_reasons_budget_and_other_reasons_keep_theirs() {
        let t0 = Instant::now();
        let budget = LogBudget::new(t0);
        let logged = (0..200u32)
            .filter(|i| budget.admit(Reason::UnknownDevice, ip(&format!("10.{}.0.1", i)), t0).0)
            .count();
        assert_eq!(logged, PER_REASON as usize);
        assert!(
            budget.admit(Reason::BrokerUnreachable, ip("10.0.0.1"), t0).0,
            "another reason still has its lines"
        );
        let summary = &budget.roll(t0 + WINDOW)[0];
        assert_eq!(summary.held_back, 200 - u64::from(PER_REASON));
        assert_eq!(summary.networks.len(), NAMED_IN_SUMMARY);
        assert_eq!(summary.more_networks, 180 - NAMED_IN_SUMMARY);
    }

    #[test]
    fn the_bookkeeping_is_bounded_however_many_networks_send() {
        let t0 = Instant::now();
        let budget = LogBudget::new(t0);
        for i in 0..(MAX_NETWORKS as u32 * 3) {
            let a = std::net::Ipv6Addr::from((0x2001_0db8_u128 << 96) | (u128::from(i) << 64));
            budget.admit(Reason::BadConnect, IpAddr::V6(a), t0);
        }
        let tracked = budget.window.lock().unwrap().by_network.len();
        assert!(tracked <= MAX_NETWORKS + 1, "{tracked} networks tracked");
        let summary = &budget.roll(t0 + WINDOW)[0];
        assert_eq!(summary.held_back, MAX_NETWORKS as u64 * 3 - u64::from(PER_REASON));
        assert!(summary.sources().contains("other networks"), "{}", summary.sources());
    }

    #[test]
    fn addresses_group_by_lan_segment() {
        assert_eq!(network_of(ip("192.168.10.21")).to_string(), "192.168.10.0/24");
        assert_eq!(network_of(ip("::ffff:192.168.10.21")).to_string(), "192.168.10.0/24");
        assert_eq!(network_of(ip("2001:db8:1:2:3:4:5:6")).to_string(), "2001:db8:1:2::/64");
    }
}
