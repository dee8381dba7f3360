//! Match rules: which connections a device entry is for, and whether two entries could both claim one.
//!
//! Every identity at the broker rests on these two functions. [`Rules::matches`] is what the device
//! table asks for each connection; [`Rules::can_overlap`] is what configuration validation asks of
//! every pair of entries, so that at most one entry can ever match a connection and the table's first
//! match is the only one. They live together, and are tested against each other, so that the check can
//! never be weaker than the lookup it protects.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// The rules of one entry; every rule it gives must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// The MQTT client identifier, exactly; `None`: any.
    pub client_id: Option<String>,
    /// Client id patterns one of which must match; empty: any. Only the fallback has them.
    pub client_id_patterns: Vec<Pattern>,
    /// Networks one of which must hold the device's address; empty: any address.
    pub sources: Vec<IpNet>,
    /// The listeners the device may arrive on (configured addresses).
    pub listeners: Vec<SocketAddr>,
}

impl Rules {
    /// Whether a connection that arrived on `listener` from `peer` with `client_id` satisfies every rule.
    /// `peer` must be canonical (an IPv4-mapped IPv6 address as IPv4), as source rules are.
    pub fn matches(&self, listener: SocketAddr, peer: IpAddr, client_id: &str) -> bool {
        self.listeners.contains(&listener)
            && self.client_id.as_deref().is_none_or(|id| id == client_id)
            && (self.client_id_patterns.is_empty() || self.client_id_patterns.iter().any(|p| p.matches(client_id)))
            && (self.sources.is_empty() || self.sources.iter().any(|n| n.contains(&peer)))
    }

    /// Whether one connection could satisfy both `self` and `other`: the same client id (or either
    /// takes any), a listener in common, and an address both allow. Client id patterns are taken to
    /// match anything: the answer may be "yes" where no connection could in fact meet both, never "no"
    /// where one could.
    pub fn can_overlap(&self, other: &Rules) -> bool {
        let ids = match (&self.client_id, &other.client_id) {
            (Some(x), Some(y)) => x == y,
            _ => true,
        };
        let listeners = self.listeners.iter().any(|l| other.listeners.contains(l));
        let sources = self.sources.is_empty()
            || other.sources.is_empty()
            || self.sources.iter().any(|x| {
                other
                    .sources
                    .iter()
                    .any(|y| x.contains(&y.network()) || y.contains(&x.network()))
            });
        ids && listeners && sources
    }
}

/// The rules as an operator would write them: `client_id=boiler-1 source=192.168.10.21/32
/// listen=0.0.0.0:1883`.
impl fmt::Display for Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(id) = &self.client_id {
            write!(f, "client_id={id} ")?;
        }
        if !self.client_id_patterns.is_empty() {
            write!(f, "client_id={} ", join(&self.client_id_patterns))?;
        }
        if !self.sources.is_empty() {
            write!(f, "source={} ", join(&self.sources))?;
        }
        write!(f, "listen={}", join(&self.listeners))
    }
}

/// A client id pattern: `*` stands for any run of characters (none included), `?` for one character,
/// anything else for itself. `sensor-*` matches `sensor-12` and `sensor-`; `lab-??` matches `lab-07`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    /// The pattern `text`; an empty one matches nothing useful and is refused, as is one longer than a
    /// client id can be.
    pub fn new(text: &str) -> Result<Pattern, String> {
        if text.is_empty() {
            return Err(
                "an empty pattern matches only the empty client id; write \"\" as a device's client_id instead".into(),
            );
        }
        if text.len() > usize::from(u16::MAX) {
            return Err("longer than any MQTT client id".into());
        }
        Ok(Pattern(text.to_string()))
    }

    /// Whether `id` matches, character by character.
    pub fn matches(&self, id: &str) -> bool {
        let (p, s): (Vec<char>, Vec<char>) = (self.0.chars().collect(), id.chars().collect());
        // The classic greedy match with one backtrack point: linear in practice, O(p * s) at worst.
        let (mut pi, mut si) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while si < s.len() {
            match p.get(pi) {
                Some('*') => {
                    star = Some((pi, si));
                    pi += 1;
                }
                Some('?') => (pi, si) = (pi + 1, si + 1),
                Some(c) if *c == s[si] => (pi, si) = (pi + 1, si + 1),
                _ => match star {
                    Some((sp, ss)) => {
                        star = Some((sp, ss + 1));
                        (pi, si) = (sp + 1, ss + 1);
                    }
                    None => return false,
                },
            }
        }
        p[pi..].iter().all(|c| *c == '*')
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SHARED: &str = "0.0.0.0:1883";
    const OWN: &str = "0.0.0.0:1884";

    fn rules(client_id: Option<&str>, sources: &[&str], listeners: &[&str]) -> Rules {
        Rules {
            client_id: client_id.map(str::to_string),
            client_id_patterns: Vec::new(),
            sources: sources.iter().map(|s| s.parse().unwrap()).collect(),
            listeners: listeners.iter().map(|l| l.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn patterns_match_as_documented() {
        let cases = [
            ("sensor-*", "sensor-12", true),
            ("sensor-*", "sensor-", true),
            ("sensor-*", "sensor", false),
            ("lab-??", "lab-07", true),
            ("lab-??", "lab-7", false),
            ("*-temp-*", "hall-temp-3", true),
            ("*-temp-*", "hall-hum-3", false),
            ("a*b*c", "abbbc", true),
            ("a*b*c", "acb", false),
            ("*", "", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("ü?", "üß", true),
        ];
        for (pattern, id, expected) in cases {
            assert_eq!(Pattern::new(pattern).unwrap().matches(id), expected, "{pattern} / {id}");
        }
        assert!(Pattern::new("").is_err());
    }

    #[test]
    fn a_pattern_rule_narrows_the_entry() {
        let mut r = rules(None, &[], &[SHARED]);
        r.client_id_patterns = vec![Pattern::new("guest-*").unwrap()];
        assert!(r.matches(SHARED.parse().unwrap(), "10.0.0.1".parse().unwrap(), "guest-7"));
        assert!(!r.matches(SHARED.parse().unwrap(), "10.0.0.1".parse().unwrap(), "boiler-1"));
        assert_eq!(r.to_string(), "client_id=guest-* listen=0.0.0.0:1883");
    }

    #[test]
    fn every_rule_given_must_hold() {
        let boiler = rules(Some("boiler-1"), &["192.168.10.0/24"], &[SHARED]);
        let cases = [
            (SHARED, "192.168.10.21", "boiler-1", true),
            (SHARED, "192.168.10.21", "boiler-2", false),
            (SHARED, "192.168.20.21", "boiler-1", false),
            (OWN, "192.168.10.21", "boiler-1", false),
        ];
        for (listener, peer, id, expected) in cases {
            let got = boiler.matches(listener.parse().unwrap(), peer.parse().unwrap(), id);
            assert_eq!(got, expected, "{listener} {peer} {id:?}");
        }
    }

    #[test]
    fn a_rule_not_given_takes_anything() {
        let by_listener = rules(None, &[], &[OWN]);
        assert!(by_listener.matches(OWN.parse().unwrap(), "10.1.2.3".parse().unwrap(), ""));
        assert!(by_listener.matches(OWN.parse().unwrap(), "::1".parse().unwrap(), "anything"));
        assert!(!by_listener.matches(SHARED.parse().unwrap(), "10.1.2.3".parse().unwrap(), ""));
        let by_source = rules(None, &["10.0.0.7/32"], &[SHARED]);
        assert!(by_source.matches(SHARED.parse().unwrap(), "10.0.0.7".parse().unwrap(), "ESP8266Client"));
        assert!(!by_source.matches(SHARED.parse().unwrap(), "10.0.0.8".parse().unwrap(), "ESP8266Client"));
    }

    #[test]
    fn entries_overlap_only_when_one_connection_could_meet_both() {
        let table = [
            // Same client id, sources that share addresses or not.
            (
                rules(Some("x"), &["10.0.0.0/24"], &[SHARED]),
                rules(Some("x"), &["10.0.0.5/32"], &[SHARED]),
                true,
            ),
            (
                rules(Some("x"), &["10.0.0.0/24"], &[SHARED]),
                rules(Some("x"), &["10.0.1.0/24"], &[SHARED]),
                false,
            ),
            (
                rules(Some("x"), &[], &[SHARED]),
                rules(Some("x"), &["10.0.1.0/24"], &[SHARED]),
                true,
            ),
            // Different client ids never overlap; no client id overlaps any.
            (
                rules(Some("x"), &[], &[SHARED]),
                rules(Some("y"), &[], &[SHARED]),
                false,
            ),
            (
                rules(None, &["10.0.0.5/32"], &[SHARED]),
                rules(Some("y"), &[], &[SHARED]),
                true,
            ),
            // Different listeners never overlap.
            (rules(None, &[], &[OWN]), rules(Some("y"), &[], &[SHARED]), false),
            (
                rules(None, &[], &[OWN]),
                rules(None, &["10.0.0.5/32"], &[OWN, SHARED]),
                true,
            ),
        ];
        for (a, b, expected) in table {
            assert_eq!(a.can_overlap(&b), expected, "{a} / {b}");
            assert_eq!(b.can_overlap(&a), expected, "symmetric: {b} / {a}");
        }
    }

    #[test]
    fn rules_read_as_written() {
        let r = rules(Some("boiler-1"), &["192.168.10.21/32"], &[SHARED]);
        assert_eq!(
            r.to_string(),
            "client_id=boiler-1 source=192.168.10.21/32 listen=0.0.0.0:1883"
        );
        assert_eq!(
            rules(None, &[], &[OWN, SHARED]).to_string(),
            "listen=0.0.0.0:1884,0.0.0.0:1883"
        );
    }

    /// Small worlds, so that random rules and connections meet often.
    fn any_rules() -> impl Strategy<Value = Rules> {
        let id = prop::option::of(prop::sample::select(vec!["a", "b"]));
        let net = (0u8..4, prop::sample::select(vec![30u8, 31, 32]))
            .prop_map(|(host, len)| IpNet::new(IpAddr::from([10, 0, 0, host]), len).unwrap().trunc());
        let sources = prop::collection::vec(net, 0..3);
        let listeners = prop::sample::subsequence(vec![1883u16, 1884], 1..=2);
        let patterns = prop::collection::vec(prop::sample::select(vec!["a*", "?", "*c", "b"]), 0..2);
        (id, patterns, sources, listeners).prop_map(|(id, patterns, sources, ports)| Rules {
            client_id: id.map(str::to_string),
            client_id_patterns: patterns.into_iter().map(|p| Pattern::new(p).unwrap()).collect(),
            sources,
            listeners: ports.into_iter().map(|p| SocketAddr::from(([0, 0, 0, 0], p))).collect(),
        })
    }

    proptest! {
        /// The validation check is never weaker than the lookup: two entries that one connection can
        /// match are always reported as overlapping.
        #[test]
        fn entries_one_connection_matches_are_reported_as_overlapping(
            a in any_rules(),
            b in any_rules(),
            host in 0u8..4,
            port in prop::sample::select(vec![1883u16, 1884]),
            id in prop::sample::select(vec!["a", "b", "c"]),
        ) {
            let listener = SocketAddr::from(([0, 0, 0, 0], port));
            let peer = IpAddr::from([10, 0, 0, host]);
            if a.matches(listener, peer, id) && b.matches(listener, peer, id) {
                prop_assert!(a.can_overlap(&b), "{a} / {b} both match {listener} {peer} {id}");
            }
        }
    }
}
