//! The device table: who a connection is, and which identity it presents to the broker.
//!
//! Built once per configuration generation ([`load`] reads every certificate and key and turns each
//! into a ready `ClientConfig`), so a connection only does a lookup. The lookup is [`Routes::find`]:
//! an index by client id over the entries' [`Rules`], generic over the identity each entry holds, so that
//! the routing decision is tested on its own without a certificate in sight. Validation has already
//! proved that no two entries can match the same connection ([`Rules::can_overlap`]), so the first match
//! is the only one.
//!
//! Once the entry is known, [`DeviceTable::present`] (in `present`) gives the bytes to forward: rewritten
//! when the entry asks for it, under a client id that no other entry claims (`claims`).

mod claims;
mod load;
mod present;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::config::PendingDevice;
use crate::rewrite::{Rewrite, Values};
pub use crate::rules::Rules;
use crate::tls::Identity;

use claims::Claims;
pub use present::warnings as presented_warnings;
pub(crate) use present::{NotPresented, Presented};

/// One device entry, ready to serve: its name, its rules, and the identity it presents (a handle the
/// table holds; [`Identity`] in the running proxy).
#[derive(Debug)]
pub struct Device<I = Identity> {
    /// The device's name from the config (or its directory); the fallback is `fallback`.
    pub name: Arc<str>,
    /// Which connections it is for.
    pub rules: Rules,
    /// The identity presented upstream.
    pub identity: I,
    /// How its CONNECT is rewritten, if its entry asks for it (`connect.*`).
    pub rewrite: Option<Rewrite>,
    /// The client id it presents when it rewrites its client id (one fixed, or every value a template can
    /// take for it); `None`: the client id the device sent.
    pub presents: Option<Values>,
}

/// The entries of one generation indexed for lookup: devices by client id, devices without one, and
/// the fallback.
#[derive(Debug)]
pub(crate) struct Routes<I> {
    devices: Vec<Arc<Device<I>>>,
    by_client_id: HashMap<String, Vec<usize>>,
    without_client_id: Vec<usize>,
    fallback: Option<Arc<Device<I>>>,
    /// Who may present which client id; `None` when no entry rewrites its client id.
    claims: Option<Claims>,
}

impl<I> Routes<I> {
    /// Indexes `devices` (in configuration order) and the fallback, whose rules name only its listeners.
    pub(crate) fn new(devices: Vec<Arc<Device<I>>>, fallback: Option<Arc<Device<I>>>) -> Routes<I> {
        let mut by_client_id: HashMap<String, Vec<usize>> = HashMap::new();
        let mut without_client_id = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            match &d.rules.client_id {
                Some(id) => by_client_id.entry(id.clone()).or_default().push(i),
                None => without_client_id.push(i),
            }
        }
        let claims = Claims::of(devices.iter().chain(&fallback));
        Routes {
            devices,
            by_client_id,
            without_client_id,
            fallback,
            claims,
        }
    }

    /// The entry for a connection that arrived on `listener` from `peer` with `client_id`.
    ///
    /// A client id that a device's rules name belongs to that device (or those devices): only they may
    /// serve it, and when none of them matches, nothing else does ([`Unmatched::Borrowed`]). Presenting it
    /// under another identity would make the broker close the real device's session (one session per
    /// client id). Any other client id goes to the device without a client id rule whose rules hold, else
    /// to the fallback if it takes the connection.
    pub(crate) fn find(
        &self,
        listener: SocketAddr,
        peer: IpAddr,
        client_id: &str,
    ) -> Result<&Arc<Device<I>>, Unmatched> {
        let peer = peer.to_canonical();
        let matching = |d: &&Arc<Device<I>>| d.rules.matches(listener, peer, client_id);
        if let Some(owners) = self.by_client_id.get(client_id) {
            let mut owners = owners.iter().map(|&i| &self.devices[i]);
            return owners.find(matching).ok_or_else(|| Unmatched::Borrowed {
                owner: self.devices[self.by_client_id[client_id][0]].name.clone(),
            });
        }
        self.without_client_id
            .iter()
            .map(|&i| &self.devices[i])
            .chain(&self.fallback)
            .find(matching)
            .ok_or(Unmatched::Unknown)
    }

    fn all(&self) -> impl Iterator<Item = &Arc<Device<I>>> {
        self.devices.iter().chain(&self.fallback)
    }
}

/// All devices of one configuration generation.
#[derive(Debug)]
pub struct DeviceTable {
    routes: Routes<Identity>,
    pending: Vec<PendingDevice>,
    /// What every identity of this table was built with; `None` for a table made in memory.
    built_with: Option<load::TlsInputs>,
}

/// Why no entry serves a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmatched {
    /// No entry's rules hold.
    Unknown,
    /// The client id belongs to a device (`owner`, the first of them if several share it) whose other
    /// rules do not hold: someone else is presenting it.
    Borrowed {
        /// The device the client id belongs to.
        owner: Arc<str>,
    },
}

impl DeviceTable {
    /// The device for a connection that arrived on `listener` from `peer` with `client_id` (see
    /// [`Routes::find`] for the rule).
    pub fn find(&self, listener: SocketAddr, peer: IpAddr, client_id: &str) -> Result<Arc<Device>, Unmatched> {
        self.routes.find(listener, peer, client_id).cloned()
    }

    /// Every device, in configuration order.
    pub fn devices(&self) -> &[Arc<Device>] {
        &self.routes.devices
    }

    /// Every identity: the devices, then the fallback if there is one.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Device>> {
        self.routes.all()
    }

    /// The fallback identity, if one is configured.
    pub fn fallback(&self) -> Option<&Arc<Device>> {
        self.routes.fallback.as_ref()
    }

    /// The device directory entries still waiting for their certificate (not served).
    pub fn pending(&self) -> &[PendingDevice] {
        &self.pending
    }
}

#[cfg(any(test, feature = "fuzzing"))]
impl DeviceTable {
    /// A table of `devices` and `fallback` whose identities were made in memory, for tests of what
    /// happens around a lookup.
    pub(crate) fn of(devices: Vec<Device>, fallback: Option<Device>) -> DeviceTable {
        let devices = devices.into_iter().map(Arc::new).collect();
        DeviceTable {
            routes: Routes::new(devices, fallback.map(Arc::new)),
            pending: Vec::new(),
            built_with: None,
        }
    }
}

#[cfg(test)]
mod tests {
    //! The routing decision, table-driven: each way an entry can be matched, and their combinations.
    use super::*;

    const SHARED: &str = "0.0.0.0:1883";
    const OWN: &str = "0.0.0.0:1884";
    const LAB: &str = "0.0.0.0:1885";

    fn device(
        name: &'static str,
        client_id: Option<&str>,
        sources: &[&str],
        listeners: &[&str],
    ) -> Arc<Device<&'static str>> {
        Arc::new(Device {
            name: name.into(),
            rules: Rules {
                client_id: client_id.map(str::to_string),
                client_id_patterns: Vec::new(),
                sources: sources.iter().map(|s| crate::config::parse_net(s).unwrap()).collect(),
                listeners: listeners.iter().map(|l| l.parse().unwrap()).collect(),
            },
            identity: name,
            rewrite: None,
            presents: None,
        })
    }

    /// A site with every kind of entry: client id alone, client id + source, a dedicated listener, a
    /// shared client id told apart by source, a device-directory entry (client id = its name, a source
    /// for the whole directory), a source on a listener of its own, and, when asked, the fallback on the
    /// shared listener.
    fn site(with_fallback: bool) -> Routes<&'static str> {
        let devices = vec![
            device("meter-1", Some("meter-1"), &[], &[SHARED]),
            device("boiler-1", Some("boiler-1"), &["192.168.10.21"], &[SHARED]),
            device("pump-9", None, &[], &[OWN]),
            device("esp-a", Some("ESP8266Client"), &["192.168.10.31"], &[SHARED]),
            device("esp-b", Some("ESP8266Client"), &["192.168.10.32"], &[SHARED]),
            device("lab-7", Some("lab-7"), &["10.7.0.0/16"], &[SHARED]),
            device("by-source", None, &["192.168.30.5"], &[LAB]),
        ];
        let fallback = with_fallback.then(|| device("fallback", None, &[], &[SHARED]));
        Routes::new(devices, fallback)
    }

    /// (listener, peer, client id, what serves it without a fallback, with one): a device's name,
    /// `fallback`, `unknown`, or `borrowed by <owner>`.
    type Case = (&'static str, &'static str, &'static str, &'static str, &'static str);

    const CASES: &[Case] = &[
        (SHARED, "10.9.9.9", "meter-1", "meter-1", "meter-1"),
        (SHARED, "192.168.10.21", "boiler-1", "boiler-1", "boiler-1"),
        (SHARED, "::ffff:192.168.10.21", "boiler-1", "boiler-1", "boiler-1"),
        // A client id a device owns is never served from elsewhere: not by the fallback, not by a
        // device without a client id rule.
        (
            SHARED,
            "192.168.10.99",
            "boiler-1",
            "borrowed by boiler-1",
            "borrowed by boiler-1",
        ),
        (
            OWN,
            "192.168.10.21",
            "boiler-1",
            "borrowed by boiler-1",
            "borrowed by boiler-1",
        ),
        (LAB, "192.168.30.5", "lab-7", "borrowed by lab-7", "borrowed by lab-7"),
        (OWN, "10.1.1.1", "", "pump-9", "pump-9"),
        (OWN, "10.1.1.1", "ESP32-abc", "pump-9", "pump-9"),
        (SHARED, "10.1.1.1", "", "unknown", "fallback"),
        // A shared client id is owned by every device that names it.
        (SHARED, "192.168.10.31", "ESP8266Client", "esp-a", "esp-a"),
        (SHARED, "192.168.10.32", "ESP8266Client", "esp-b", "esp-b"),
        (
            SHARED,
            "192.168.10.33",
            "ESP8266Client",
            "borrowed by esp-a",
            "borrowed by esp-a",
        ),
        (SHARED, "10.7.3.4", "lab-7", "lab-7", "lab-7"),
        (LAB, "192.168.30.5", "whatever", "by-source", "by-source"),
        (LAB, "192.168.30.6", "whatever", "unknown", "unknown"),
        (SHARED, "192.168.30.5", "meter-1", "meter-1", "meter-1"),
        (SHARED, "10.9.9.9", "stranger", "unknown", "fallback"),
    ];

    fn outcome(found: Result<&Arc<Device<&'static str>>, Unmatched>) -> String {
        match found {
            Ok(d) => d.identity.to_string(),
            Err(Unmatched::Unknown) => "unknown".into(),
            Err(Unmatched::Borrowed { owner }) => format!("borrowed by {owner}"),
        }
    }

    #[test]
    fn each_connection_is_served_by_the_entry_whose_rules_all_hold() {
        for with_fallback in [false, true] {
            let routes = site(with_fallback);
            for &(listener, peer, id, without, with) in CASES {
                let expected = if with_fallback { with } else { without };
                let found = routes.find(listener.parse().unwrap(), peer.parse().unwrap(), id);
                assert_eq!(
                    outcome(found),
                    expected,
                    "{listener} {peer} {id:?} (fallback: {with_fallback})"
                );
            }
        }
    }

    #[test]
    fn the_fallback_serves_only_its_listeners() {
        let routes = site(true);
        let found = routes.find(OWN.parse().unwrap(), "10.0.0.1".parse().unwrap(), "stranger");
        assert_eq!(outcome(found), "pump-9", "the dedicated listener's device");
        let routes = Routes::new(Vec::new(), Some(device("fallback", None, &[], &[SHARED])));
        let found = routes.find(OWN.parse().unwrap(), "10.0.0.1".parse().unwrap(), "x");
        assert_eq!(outcome(found), "unknown");
    }

    #[test]
    fn the_site_passes_the_ambiguity_check_that_validation_runs() {
        let routes = site(false);
        for (i, a) in routes.devices.iter().enumerate() {
            for b in &routes.devices[i + 1..] {
                assert!(!a.rules.can_overlap(&b.rules), "{} / {}", a.name, b.name);
            }
        }
    }
}
