//! Building the device table from a validated configuration: every certificate and key read, checked and
//! turned into a ready `ClientConfig`, keeping the identities of the previous generation whose files have
//! not changed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::present::{clashes, Entry};
use super::{Device, DeviceTable, Routes, Rules};
use crate::config::{Config, ConfigError, ConfigErrors, DeviceSpec, Fallback, IdentityFiles};
use crate::rewrite::{self, Change, Rewrite, RewriteSpec, Values};
use crate::stamp::Stamp;
use crate::tls::{self, Identity, TlsFileError, TlsSettings};

/// The settings and CA file every identity's `ClientConfig` depends on. Identities can be kept from one
/// generation to the next only while these are the same.
#[derive(Debug, Clone)]
pub(super) struct TlsInputs {
    ca_file: Option<PathBuf>,
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
        let previous = previous.filter(|p| p.built_with.as_ref().is_some_and(|b| b.same_as(&inputs)));
        inputs.roots = match previous.and_then(|p| p.built_with.as_ref()) {
            Some(b) => b.roots.clone(),
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
        let kept: HashMap<(&Path, &Path), &Identity> = previous
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
        let allow_readable = config.upstream.allow_readable_keys;
        let mut devices = Vec::with_capacity(config.devices.len());
        let mut origins = Vec::with_capacity(config.devices.len());
        for spec in &config.devices {
            let loaded = load(&spec.identity)
                .map_err(|e| identity_error(&spec.origin, Some(&spec.name), e))
                .and_then(|identity| {
                    let rewrite = device_rewrite(&spec.connect, &spec.name, &identity, allow_readable)
                        .map_err(|(key, reason)| connect_error(&spec.origin, &key, Some(&spec.name), reason))?;
                    Ok(device(spec, identity, rewrite, &config.listen.addresses))
                });
            match loaded {
                Ok(d) => {
                    devices.push(Arc::new(d));
                    origins.push(spec.origin.as_path());
                }
                Err(e) => errors.push(e),
            }
        }
        let fallback = config.fallback.as_ref().and_then(|f| {
            let loaded = load(&f.identity)
                .map_err(|e| identity_error(&config.path, None, e))
                .and_then(|identity| {
                    let name = crate::config::FALLBACK_NAME;
                    let rewrite =
                        device_rewrite(&f.connect, name, &identity, allow_readable).map_err(|(key, reason)| {
                            connect_error(&config.path, &format!("fallback.{key}"), None, reason)
                        })?;
                    Ok(fallback_device(f, identity, rewrite, &config.listen.addresses))
                });
            loaded.map(Arc::new).map_err(|e| errors.push(e)).ok()
        });
        let entries: Vec<Entry<'_>> = origins
            .iter()
            .zip(&devices)
            .map(|(origin, d)| Entry { origin, device: d })
            .chain(fallback.iter().map(|d| Entry {
                origin: &config.path,
                device: d,
            }))
            .collect();
        errors.extend(clashes(&entries));
        drop(entries);
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        for p in &config.pending {
            tracing::warn!("{}", p.warning());
        }
        Ok(DeviceTable {
            routes: Routes::new(devices, fallback),
            pending: config.pending.clone(),
            built_with: Some(inputs),
        })
    }
}

fn device(spec: &DeviceSpec, identity: Identity, rewrite: DeviceRewrite, shared: &[SocketAddr]) -> Device {
    Device {
        name: spec.name.as_str().into(),
        rules: spec.rules(shared),
        identity,
        rewrite: rewrite.0,
        presents: rewrite.1,
    }
}

/// A device's rewrite rules, and the client id it presents when it rewrites its client id.
type DeviceRewrite = (Option<Rewrite>, Option<Values>);

/// The rewrite of the entry named `name` with `identity`, its password file read, and what it presents;
/// what can be known now is checked now: `{cn}` for a certificate without a Common Name, a fixed client id or
/// user name that cannot be sent. Errors are (key, reason).
fn device_rewrite(
    spec: &RewriteSpec,
    name: &str,
    identity: &Identity,
    allow_readable: bool,
) -> Result<DeviceRewrite, (String, String)> {
    let rules = spec
        .load(allow_readable)
        .map_err(|e| ("connect.password_file".to_string(), e.to_string()))?;
    let Some(rules) = rules else {
        return Ok((None, None));
    };
    let cn = identity.summary.common_name.as_deref();
    let no_cn = |key: &str| {
        (
            key.to_string(),
            format!(
                "uses {{cn}}, but the certificate's subject ({}) has no Common Name",
                identity.summary.subject
            ),
        )
    };
    let presents = match &rules.client_id {
        Some(t) if t.uses_cn() && cn.is_none() => return Err(no_cn("connect.client_id")),
        Some(t) => Some(t.values(name, cn)),
        None => None,
    };
    if let Some(Values::Fixed(id)) = &presents {
        rewrite::check_client_id(id, None).map_err(|e| {
            (
                "connect.client_id".to_string(),
                format!("gives the client id {id:?}, which {e}"),
            )
        })?;
    }
    if let Change::Set(t) = &rules.username {
        if t.uses_cn() && cn.is_none() {
            return Err(no_cn("connect.username"));
        }
        if let Values::Fixed(u) = t.values(name, cn) {
            rewrite::check_username(&u)
                .map_err(|e| ("connect.username".to_string(), format!("gives a user name that {e}")))?;
        }
    }
    Ok((Some(rules), presents))
}

fn connect_error(origin: &Path, key: &str, device: Option<&str>, reason: String) -> ConfigError {
    ConfigError {
        file: origin.to_path_buf(),
        key: key.to_string(),
        device: device.map(str::to_string),
        reason,
    }
}

/// The fallback serves what arrives on the shared listeners, matches no device, and meets its own
/// `source` and `client_id` rules.
fn fallback_device(fallback: &Fallback, identity: Identity, rewrite: DeviceRewrite, shared: &[SocketAddr]) -> Device {
    Device {
        rewrite: rewrite.0,
        presents: rewrite.1,
        name: crate::config::FALLBACK_NAME.into(),
        rules: Rules {
            client_id: None,
            client_id_patterns: fallback.client_ids.clone(),
            sources: fallback.sources.clone(),
            listeners: shared.to_vec(),
        },
        identity,
    }
}

fn identity_error(origin: &Path, device: Option<&str>, e: TlsFileError) -> ConfigError {
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
