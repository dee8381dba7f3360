//! The device table: who a connection is, and which identity it presents to the broker.
//!
//! Built once per configuration generation from a validated [`Config`]: every certificate and key is
//! loaded and turned into a ready `ClientConfig` here, so a connection only does a lookup. Validation has
//! already proved that no two entries can match the same connection, so the first match is the only one.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::config::{Config, ConfigError, ConfigErrors, DeviceSpec, IdentityFiles, PendingDevice};
use crate::stamp::Stamp;
use crate::tls::{self, Identity, TlsFileError, TlsSettings};

/// One device, ready to serve.
#[derive(Debug)]
pub struct Device {
    /// The device's name from the config (or its directory).
    pub name: Arc<str>,
    /// Required client identifier, if any.
    pub client_id: Option<String>,
    /// Allowed source networks; empty means any.
    pub sources: Vec<IpNet>,
    /// The listeners the device may arrive on.
    pub listeners: Vec<SocketAddr>,
    /// The identity presented upstream.
    pub identity: Identity,
}

impl Device {
    fn matches(&self, listener: SocketAddr, peer: IpAddr, client_id: &str) -> bool {
        self.listeners.contains(&listener)
            && self.client_id.as_deref().is_none_or(|id| id == client_id)
            && (self.sources.is_empty() || self.sources.iter().any(|n| n.contains(&peer)))
    }

    /// The rules, as an operator would write them.
    pub fn rules(&self) -> String {
        let mut out = Vec::new();
        if let Some(id) = &self.client_id {
            out.push(format!("client_id={id}"));
        }
        if !self.sources.is_empty() {
            let s: Vec<String> = self.sources.iter().map(ToString::to_string).collect();
            out.push(format!("source={}", s.join(",")));
        }
        out.push(format!("listen={}", join(&self.listeners)));
        out.join(" ")
    }
}

fn join(addrs: &[SocketAddr]) -> String {
    addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// All devices of one configuration generation.
#[derive(Debug)]
pub struct DeviceTable {
    devices: Vec<Arc<Device>>,
    by_client_id: HashMap<String, Vec<usize>>,
    without_client_id: Vec<usize>,
    fallback: Option<Arc<Device>>,
    pending: Vec<PendingDevice>,
    /// What every identity of this table was built with.
    tls: TlsInputs,
}

/// The settings and CA file every identity's `ClientConfig` depends on. Identities can be kept from one
/// generation to the next only while these are the same.
#[derive(Debug, Clone)]
struct TlsInputs {
    ca_file: Option<std::path::PathBuf>,
    ca_stamp: Option<Stamp>,
    alpn: Vec<String>,
    allow_readable_keys: bool,
    roots: Arc<rustls::RootCertStore>,
}

impl TlsInputs {
    /// Whether identities built with `self` serve for `next`. The system's roots carry no stamp, so
    /// with them nothing is kept: a reload then picks up an updated ca-certificates.
    fn same_as(&self, next: &TlsInputs) -> bool {
        self.ca_file.is_some()
            && self.ca_file == next.ca_file
            && self.ca_stamp == next.ca_stamp
            && self.alpn == next.alpn
            && self.allow_readable_keys == next.allow_readable_keys
    }
}

/// Why an identity could not be chosen for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownDevice;

impl DeviceTable {
    /// Loads every identity the configuration names. Every problem is reported, not just the first.
    pub fn build(config: &Config) -> Result<DeviceTable, ConfigErrors> {
        DeviceTable::build_after(config, None)
    }

    /// Like [`DeviceTable::build`], keeping the identities of `previous` whose certificate and key files
    /// (and CA file and TLS settings) have not changed since they were read: a reload after one device's
    /// certificate was renewed builds one identity, not thousands.
    pub fn build_after(config: &Config, previous: Option<&DeviceTable>) -> Result<DeviceTable, ConfigErrors> {
        let mut errors = Vec::new();
        let ca_stamp = config.upstream.ca_file.as_deref().and_then(Stamp::of);
        let mut inputs = TlsInputs {
            ca_file: config.upstream.ca_file.clone(),
            ca_stamp,
            alpn: config.upstream.alpn.clone(),
            allow_readable_keys: config.upstream.allow_readable_keys,
            roots: Arc::new(rustls::RootCertStore::empty()),
        };
        let previous = previous.filter(|p| p.tls.same_as(&inputs));
        inputs.roots = match previous {
            Some(p) => p.tls.roots.clone(),
            // A bad CA file is reported, and the identities are still checked so that every problem shows.
            None => tls::load_roots(config.upstream.ca_file.as_deref()).unwrap_or_else(|e| {
                errors.push(ConfigError {
                    file: config.path.clone(),
                    key: e.key.into(),
                    device: None,
                    reason: e.to_string(),
                });
                Arc::new(rustls::RootCertStore::empty())
            }),
        };
        let settings = TlsSettings {
            roots: inputs.roots.clone(),
            alpn: config.upstream.alpn.iter().map(|p| p.as_bytes().to_vec()).collect(),
            allow_readable_keys: config.upstream.allow_readable_keys,
        };
        let kept: HashMap<(&std::path::Path, &std::path::Path), &Identity> = previous
            .into_iter()
            .flat_map(DeviceTable::all)
            .map(|d| {
                (
                    (d.identity.files.cert.as_path(), d.identity.files.key.as_path()),
                    &d.identity,
                )
            })
            .collect();
        let load = |files: &IdentityFiles| match kept.get(&(files.cert.as_path(), files.key.as_path())) {
            Some(identity) if identity.files.unchanged(&files.cert, &files.key) => Ok((*identity).clone()),
            _ => tls::load_identity(&files.cert, &files.key, &settings),
        };
        let mut devices = Vec::with_capacity(config.devices.len());
        for spec in &config.devices {
            match load(&spec.identity) {
                Ok(identity) => devices.push(Arc::new(device(spec, identity, &config.listen.addresses))),
                Err(e) => errors.push(identity_error(&spec.origin, Some(&spec.name), e)),
            }
        }
        let fallback = match &config.fallback {
            Some(files) => match load(files).map(|identity| fallback_device(identity, &config.listen.addresses)) {
                Ok(d) => Some(Arc::new(d)),
                Err(e) => {
                    errors.push(identity_error(&config.path, None, e));
                    None
                }
            },
            None => None,
        };
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let mut by_client_id: HashMap<String, Vec<usize>> = HashMap::new();
        let mut without_client_id = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            match &d.client_id {
                Some(id) => by_client_id.entry(id.clone()).or_default().push(i),
                None => without_client_id.push(i),
            }
        }
        for p in &config.pending {
            tracing::warn!("{}", p.warning());
        }
        Ok(DeviceTable {
            devices,
            by_client_id,
            without_client_id,
            fallback,
            pending: config.pending.clone(),
            tls: inputs,
        })
    }

    /// The device for a connection that arrived on `listener` from `peer` with `client_id`.
    pub fn find(&self, listener: SocketAddr, peer: IpAddr, client_id: &str) -> Result<Arc<Device>, UnknownDevice> {
        let peer = peer.to_canonical();
        let with_id = self.by_client_id.get(client_id).into_iter().flatten();
        with_id
            .chain(&self.without_client_id)
            .map(|&i| &self.devices[i])
            .find(|d| d.matches(listener, peer, client_id))
            .or(self.fallback.as_ref().filter(|f| f.listeners.contains(&listener)))
            .cloned()
            .ok_or(UnknownDevice)
    }

    /// Every device, in configuration order.
    pub fn devices(&self) -> &[Arc<Device>] {
        &self.devices
    }

    /// Every identity: the devices, then the fallback if there is one.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Device>> {
        self.devices.iter().chain(&self.fallback)
    }

    /// The device directory entries still waiting for their certificate (not served).
    pub fn pending(&self) -> &[PendingDevice] {
        &self.pending
    }
}

fn device(spec: &DeviceSpec, identity: Identity, shared: &[SocketAddr]) -> Device {
    Device {
        name: spec.name.as_str().into(),
        client_id: spec.client_id.clone(),
        sources: spec.sources.clone(),
        listeners: spec.listeners(shared).to_vec(),
        identity,
    }
}

fn fallback_device(identity: Identity, shared: &[SocketAddr]) -> Device {
    Device {
        name: crate::config::FALLBACK_NAME.into(),
        client_id: None,
        sources: Vec::new(),
        listeners: shared.to_vec(),
        identity,
    }
}

fn identity_error(origin: &std::path::Path, device: Option<&str>, e: TlsFileError) -> ConfigError {
    let key = match device {
        Some(_) => e.key.to_string(),
        None => format!("fallback.{}", e.key),
    };
    // A device directory entry is named by the file itself; a config entry by the config file, with the
    // certificate or key file in the reason.
    let (file, reason) = if origin.is_dir() {
        (e.path.clone(), e.reason.clone())
    } else {
        (origin.to_path_buf(), e.to_string())
    };
    ConfigError {
        file,
        key,
        device: device.map(str::to_string),
        reason,
    }
}

#[cfg(test)]
impl DeviceTable {
    /// A table of `devices` and `fallback` whose identities were made in memory, for tests of what
    /// happens around a lookup.
    pub(crate) fn of(devices: Vec<Device>, fallback: Option<Device>) -> DeviceTable {
        let mut by_client_id: HashMap<String, Vec<usize>> = HashMap::new();
        let mut without_client_id = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            match &d.client_id {
                Some(id) => by_client_id.entry(id.clone()).or_default().push(i),
                None => without_client_id.push(i),
            }
        }
        DeviceTable {
            devices: devices.into_iter().map(Arc::new).collect(),
            by_client_id,
            without_client_id,
            fallback: fallback.map(Arc::new),
            pending: Vec::new(),
            tls: TlsInputs {
                ca_file: None,
                ca_stamp: None,
                alpn: Vec::new(),
                allow_readable_keys: false,
                roots: Arc::new(rustls::RootCertStore::empty()),
            },
        }
    }
}
