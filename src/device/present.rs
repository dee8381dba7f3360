//! What a connection presents to the broker once its device is known: the device's first bytes, rewritten
//! when its entry asks for it ([`crate::rewrite`]), under a client id that is the entry's to present
//! ([`super::claims`]). And, for loading and `mqtls check`, which entries would present the same client id:
//! a certain clash where a rewrite is involved refuses the configuration, a possible one is a warning.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use super::{Device, DeviceTable};
use crate::config::ConfigError;
use crate::mqtt::Connect;
use crate::rewrite::{self, Context, IdPattern, RewriteError, Values};

/// The bytes to forward for a connection, and the client id the broker sees when it is not the device's.
#[derive(Debug)]
pub(crate) struct Presented {
    pub first_bytes: Vec<u8>,
    pub client_id: Option<String>,
}

/// Why a connection cannot be presented to the broker.
#[derive(Debug)]
pub(crate) enum NotPresented {
    /// The entry's rewrite could not be applied.
    Rewrite(RewriteError),
    /// The client id it would present belongs to another entry.
    Taken {
        /// The client id.
        client_id: String,
        /// The entry it belongs to.
        owner: Arc<str>,
        /// Whether it is the rewritten client id (else the device sent it).
        rewritten: bool,
    },
}

impl std::fmt::Display for NotPresented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotPresented::Rewrite(e) => write!(f, "{e}"),
            NotPresented::Taken {
                client_id,
                owner,
                rewritten: true,
            } => write!(
                f,
                "connect.client_id gives the client id {client_id:?}, which belongs to device \"{owner}\""
            ),
            NotPresented::Taken { client_id, owner, .. } => {
                write!(f, "the client id {client_id:?} belongs to device \"{owner}\"")
            }
        }
    }
}

impl DeviceTable {
    /// The bytes to forward for a connection from `peer` served by `entry`, whose CONNECT `connect` was
    /// parsed from the start of `first_bytes`. Without a rewrite in `entry` and without any client id
    /// rewrite in the table, `first_bytes` comes back untouched and nothing else is done.
    pub(crate) fn present(
        &self,
        entry: &Device,
        connect: &Connect,
        first_bytes: Vec<u8>,
        peer: IpAddr,
    ) -> Result<Presented, NotPresented> {
        let presented = match &entry.rewrite {
            None => Presented {
                first_bytes,
                client_id: None,
            },
            Some(rules) => {
                let ctx = Context {
                    name: &entry.name,
                    cn: entry.identity.summary.common_name.as_deref(),
                    source: peer,
                };
                let out = rewrite::rewrite(first_bytes, connect, rules, &ctx).map_err(NotPresented::Rewrite)?;
                Presented {
                    first_bytes: out.bytes,
                    client_id: out.client_id,
                }
            }
        };
        if let Some(claims) = &self.routes.claims {
            let id = presented.client_id.as_deref().unwrap_or(&connect.client_id);
            if let Some(owner) = claims.owner_other_than(&entry.name, id) {
                return Err(NotPresented::Taken {
                    client_id: id.to_string(),
                    owner: owner.clone(),
                    rewritten: presented.client_id.is_some(),
                });
            }
        }
        Ok(presented)
    }
}

/// One entry as the clash checks see it.
pub(super) struct Entry<'a> {
    /// Where it was defined.
    pub origin: &'a Path,
    pub device: &'a Device,
}

/// Entries that would certainly present the same client id, where at least one of them rewrites it: two
/// that rewrite to the same fixed client id, or one that rewrites to a client id another entry names
/// (unless both name it) or passes on as it is. The broker keeps one session per client id, so each
/// connection of one would close the other's session: a configuration that asks for that is refused.
pub(super) fn clashes(entries: &[Entry<'_>]) -> Vec<ConfigError> {
    let mut named: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut fixed: HashMap<&str, usize> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        if let Some(id) = &e.device.rules.client_id {
            named.entry(id).or_default().push(i);
        }
    }
    let mut errors = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let Some(Values::Fixed(id)) = &e.device.presents else {
            continue;
        };
        let error = |reason: String| ConfigError {
            file: e.origin.to_path_buf(),
            key: "connect.client_id".into(),
            device: Some(e.device.name.to_string()),
            reason,
        };
        if let Some(&first) = fixed.get(id.as_str()) {
            errors.push(error(format!(
                "presents the client id {id:?} to the broker, as device \"{}\" does: the broker keeps one session \
                 per client id, so each would close the other's; give each its own (e.g. \"{{name}}\")",
                entries[first].device.name
            )));
            continue;
        }
        fixed.insert(id, i);
        let own_rule = e.device.rules.client_id.as_deref() == Some(id.as_str());
        let owner = named
            .get(id.as_str())
            .into_iter()
            .flatten()
            .map(|&j| &entries[j])
            .find(|o| !std::ptr::eq(o.device, e.device) && (o.device.presents.is_none() || !own_rule));
        if let Some(o) = owner {
            let how = match o.device.presents {
                None => "names and presents",
                Some(_) => "names",
            };
            errors.push(error(format!(
                "presents the client id {id:?} to the broker, which device \"{}\" {how}: a client id belongs to its \
                 device; choose another",
                o.device.name
            )));
        }
    }
    errors
}

/// Warnings for `mqtls check` about client ids that entries may present alike (see README, "Devices that
/// share a client id"): devices that pass on a shared client id, a fixed client id for an entry that
/// matches many devices, and templates whose values may meet another entry's client id.
pub fn warnings(table: &DeviceTable) -> Vec<String> {
    let devices = table.devices();
    let all: Vec<Arc<Device>> = table.all().cloned().collect();
    let mut w = Vec::new();
    shared_without_rewrite(devices, &mut w);
    passed_on(devices, &mut w);
    fixed_for_many(&all, &mut w);
    templates_meet(&all, &mut w);
    w
}

/// Warnings of one kind beyond this many are summed up.
const LISTED: usize = 5;

fn names(list: &[&str]) -> String {
    let mut text = list
        .iter()
        .take(LISTED)
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ");
    if list.len() > LISTED {
        text.push_str(&format!(" and {} more", list.len() - LISTED));
    }
    text
}

/// Keeps at most [`LISTED`] of `found` in `out`, and says how many more there were.
fn listed(found: Vec<String>, out: &mut Vec<String>) {
    let more = found.len().saturating_sub(LISTED);
    out.extend(found.into_iter().take(LISTED));
    if more > 0 {
        out.push(format!("... and {more} more warnings like the one above"));
    }
}

/// Entries that name the same client id and pass it on: the takeover this feature exists to prevent.
fn shared_without_rewrite(devices: &[Arc<Device>], out: &mut Vec<String>) {
    let mut by_id: HashMap<&str, Vec<&str>> = HashMap::new();
    for d in devices.iter().filter(|d| d.presents.is_none()) {
        if let Some(id) = &d.rules.client_id {
            by_id.entry(id).or_default().push(&d.name);
        }
    }
    let mut found: Vec<String> = by_id
        .into_iter()
        .filter(|(_, n)| n.len() > 1)
        .map(|(id, n)| {
            format!(
                "devices {} all present the client id {id:?} to the broker: told apart by source or listen at mqtls, \
                 they are one client id at the broker, where each connection closes the other's session; give each \
                 its own with connect.client_id (e.g. \"{{name}}\")",
                names(&n)
            )
        })
        .collect();
    found.sort();
    listed(found, out);
}

/// Entries without a client id rule that pass on whatever client id their devices send.
fn passed_on(devices: &[Arc<Device>], out: &mut Vec<String>) {
    let open: Vec<&str> = devices
        .iter()
        .filter(|d| d.rules.client_id.is_none() && d.presents.is_none())
        .map(|d| &*d.name)
        .collect();
    if !open.is_empty() {
        out.push(format!(
            "{} device(s) matched by source or listen alone pass on the client id their device sends ({}): devices \
             that send the same one (a firmware default such as \"ESP8266Client\") take each other's session at the \
             broker; give each its own with connect.client_id (e.g. \"{{name}}\" or \"{{name}}-{{source}}\")",
            open.len(),
            names(&open)
        ));
    }
}

/// An entry that presents one fixed client id but can match more than one device.
fn fixed_for_many(devices: &[Arc<Device>], out: &mut Vec<String>) {
    let found = devices
        .iter()
        .filter(|d| d.rules.client_id.is_none())
        .filter(|d| d.rules.sources.is_empty() || d.rules.sources.iter().any(|n| n.prefix_len() < n.max_prefix_len()))
        .filter_map(|d| match &d.presents {
            Some(Values::Fixed(id)) => Some(format!(
                "device \"{}\" presents the one client id {id:?} for every device its rules match ({}): they would \
                 close each other's sessions at the broker; use {{source}} or {{client_id}} in connect.client_id, or \
                 one entry per device",
                d.name, d.rules
            )),
            _ => None,
        })
        .collect();
    listed(found, out);
}

/// Templates whose values may be another entry's client id, or another template's value.
fn templates_meet(devices: &[Arc<Device>], out: &mut Vec<String>) {
    let patterns: Vec<(&str, &IdPattern)> = devices
        .iter()
        .filter_map(|d| match &d.presents {
            Some(Values::Pattern(p)) => Some((&*d.name, p)),
            _ => None,
        })
        .collect();
    if patterns.is_empty() {
        return;
    }
    let mut found = Vec::new();
    let exact = devices.iter().flat_map(|d| {
        let fixed = match &d.presents {
            Some(Values::Fixed(id)) => Some(id.as_str()),
            _ => None,
        };
        d.rules
            .client_id
            .as_deref()
            .into_iter()
            .chain(fixed)
            .map(move |id| (&*d.name, id))
    });
    for (owner, id) in exact {
        for (name, p) in patterns.iter().filter(|(n, p)| *n != owner && p.matches(id)) {
            found.push(format!(
                "device \"{name}\"'s connect.client_id ({p}) can give {id:?}, the client id of device \"{owner}\": such \
                 a connection is refused (rewrite_failed); make the template's fixed text tell them apart"
            ));
        }
    }
    // Entries with the very same values: they meet unless the device's address sets them apart.
    let mut same: HashMap<&IdPattern, Vec<&str>> = HashMap::new();
    for (name, p) in &patterns {
        same.entry(p).or_default().push(name);
    }
    let mut distinct: Vec<(&IdPattern, &Vec<&str>)> = same.iter().map(|(p, n)| (*p, n)).collect();
    distinct.sort_by_key(|(_, n)| n[0]);
    for (i, (p, group)) in distinct.iter().enumerate() {
        if group.len() > 1 && !p.has_source() {
            found.push(format!(
                "devices {} present client ids from the same template ({p}) without {{source}}: two of their devices \
                 that send the same client id present the same one to the broker",
                names(group)
            ));
        }
        for (q, other) in &distinct[i + 1..] {
            if p.may_overlap(q) {
                found.push(format!(
                    "device \"{}\"'s connect.client_id ({p}) and device \"{}\"'s ({q}) may give the same client id, and \
                     each such connection would close the other's session at the broker; make their fixed text tell \
                     them apart",
                    group[0], other[0]
                ));
            }
        }
    }
    listed(found, out);
}
