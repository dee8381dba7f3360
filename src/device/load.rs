//! Building the device table from a validated configuration: every certificate and key read, checked and
//! turned into a ready `ClientConfig`, keeping the identities of the previous generation whose files have
//! not changed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Device, DeviceTable, Routes, Rules};
use crate::config::{Config, ConfigError, ConfigErrors, DeviceSpec, Fallback, IdentityFiles};
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
        let mut devices = Vec::with_capacity(config.devices.len());
        for spec in &config.devices {
            match load(&spec.identity) {
                Ok(identity) => devices.push(Arc::new(device(spec, identity, &config.listen.addresses))),
                Err(e) => errors.push(identity_error(&spec.origin, Some(&spec.name), e)),
            }
        }
        let fallback = match &config.fallback {
            Some(f) => match load(&f.identity).map(|identity| fallback_device(f, identity, &config.listen.addresses)) {
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

fn device(spec: &DeviceSpec, identity: Identity, shared: &[SocketAddr]) -> Device {
    Device {
        name: spec.name.as_str().into(),
        rules: spec.rules(shared),
        identity,
    }
}

/// The fallback serves what arrives on the shared listeners, matches no device, and meets its own
/// `source` and `client_id` rules.
fn fallback_device(fallback: &Fallback, identity: Identity, shared: &[SocketAddr]) -> Device {
    Device {
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
