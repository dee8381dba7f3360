//! The configuration file: TOML in, a validated [`Config`] out.
//!
//! Loading happens in two steps, as in most daemons that must not start half-configured: serde reads the
//! file into `Raw*` structs that reject unknown keys, then one validation pass turns strings into typed
//! values and checks every cross-field rule (unique names, no two devices that can match the same
//! connection). Every problem found is collected, not just the first, and each names the file, the key
//! and, where there is one, the device. Certificates and keys are loaded afterwards by
//! [`crate::device::DeviceTable::build`], which reports its problems the same way.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use rustls::pki_types::ServerName;
use serde::Deserialize;

use crate::rewrite::spec::RawConnect;
use crate::rewrite::RewriteSpec;
use crate::rules::{Pattern, Rules};

/// MQTT's standard port for TLS, used when an upstream address gives no port.
pub const DEFAULT_UPSTREAM_PORT: u16 = 8883;
/// Name of the certificate file inside a device directory entry.
pub const DEVICE_DIR_CERT: &str = "cert.pem";
/// Name of the private key file inside a device directory entry.
pub const DEVICE_DIR_KEY: &str = "key.pem";
/// The name the `[fallback]` identity goes by in logs and metrics.
pub const FALLBACK_NAME: &str = "fallback";
/// Optional per-device settings inside a device directory entry.
pub const DEVICE_DIR_SETTINGS: &str = "device.toml";
/// A certificate signing request inside a device directory entry: with `key.pem` and no `cert.pem`, the
/// entry is [pending](PendingDevice).
pub const DEVICE_DIR_CSR: &str = "csr.pem";

/// One problem with the configuration, located precisely enough for an operator to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file that holds the problem (the config file, or a file in the device directory).
    pub file: PathBuf,
    /// The key, e.g. `upstream.connect_timeout`, or `cert` inside a device.
    pub key: String,
    /// The device the key belongs to, if any.
    pub device: Option<String>,
    /// What is wrong, in words.
    pub reason: String,
}

impl ConfigError {
    fn new(file: &Path, key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            key: key.into(),
            device: None,
            reason: reason.into(),
        }
    }

    fn for_device(mut self, device: &str) -> Self {
        self.device = Some(device.to_string());
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        if let Some(device) = &self.device {
            write!(f, "device \"{device}\": ")?;
        }
        if !self.key.is_empty() {
            write!(f, "`{}`: ", self.key)?;
        }
        f.write_str(&self.reason)
    }
}

/// Every problem found in one configuration generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration was read from.
    pub path: PathBuf,
    /// Where devices connect.
    pub listen: Listen,
    /// The broker.
    pub upstream: Upstream,
    /// Device entries from `[[device]]` and from the device directory, in that order.
    pub devices: Vec<DeviceSpec>,
    /// Device directory entries still waiting for their certificate; not served.
    pub pending: Vec<PendingDevice>,
    /// Identity for connections that match no device; `None` (the default) refuses them.
    pub fallback: Option<Fallback>,
    /// The device directory (`device_dir.path`), if one is configured.
    pub device_dir: Option<PathBuf>,
    /// The Prometheus endpoint; `None` (no `[metrics]` table): not served.
    pub metrics: Option<Metrics>,
    /// When a changed file triggers a reload.
    pub reload: Reload,
    /// When open connections are retired so that their device reconnects under its current certificate;
    /// `None` (no `[retire]` table, the default): never.
    pub retire: Option<Retire>,
}

/// The `[retire]` table: retiring long sessions whose certificate was replaced or is about to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retire {
    /// Retire a connection once a reload has replaced its device's certificate.
    pub renewed: bool,
    /// Retire a connection this long before its certificate's notAfter (at notAfter for one opened
    /// closer to it than that); `None`: not for expiry.
    pub expiring_within: Option<Duration>,
    /// How long after the reason arises a connection is retired (spreads a fleet's reconnects).
    pub grace: Duration,
    /// The safe point: nothing passed either way for this long.
    pub quiet: Duration,
}

/// The `[metrics]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metrics {
    /// Where `GET /metrics` is served.
    pub address: SocketAddr,
    /// Label per-device series with the device's name; `false`: one series for all devices.
    pub device_labels: bool,
}

/// The `[reload]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reload {
    /// Reload on its own when the config file or a file it names changes.
    pub watch: bool,
    /// How often those files are looked at.
    pub watch_interval: Duration,
}

/// The `[listen]` table.
#[derive(Debug, Clone)]
pub struct Listen {
    /// Addresses shared by every device without a `listen` rule of its own.
    pub addresses: Vec<SocketAddr>,
    /// How long a device may take to send its whole CONNECT packet.
    pub connect_timeout: Duration,
    /// Connections served at once; more are answered "server busy".
    pub max_connections: usize,
    /// The largest CONNECT packet accepted, in bytes.
    pub max_connect_size: usize,
    /// Connections from one address that may be unidentified (CONNECT not yet read) at once.
    pub max_pending_per_source: usize,
    /// Connections from one address that may be open at once, identified or not.
    pub max_connections_per_source: usize,
    /// New connections one address may make per second, once it has used its share
    /// (`max_connections_per_source` at once).
    pub max_connects_per_source_per_second: u32,
    /// How long a connection may stay silent in both directions, whatever keep-alive the device asked
    /// for (keep-alive 0 included).
    pub max_idle: Duration,
    /// How long open connections may run on after SIGTERM/SIGINT before they are closed.
    pub shutdown_grace: Duration,
}

/// The `[upstream]` table.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Broker addresses, tried in order; names are resolved at each connection.
    pub addresses: Vec<HostPort>,
    /// Name sent as SNI and verified in the broker's certificate. `None`: the host of each address.
    pub server_name: Option<ServerName<'static>>,
    /// CA bundle for the broker's chain. `None`: the system's trusted roots.
    pub ca_file: Option<PathBuf>,
    /// Limit for each TCP connect.
    pub connect_timeout: Duration,
    /// Limit for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Connections to the broker being opened at once, at most (TCP connect to the broker's first answer);
    /// fewer while the broker slows down; more wait in line.
    pub max_connecting: usize,
    /// How long a connection may wait in line for its turn to connect.
    pub queue_timeout: Duration,
    /// Limit for resolving a broker's name.
    pub resolve_timeout: Duration,
    /// The longest an address that keeps failing is passed over before it is tried again.
    pub failed_address_backoff: Duration,
    /// ALPN protocols to offer (e.g. `x-amzn-mqtt-ca` for AWS IoT Core on 443).
    pub alpn: Vec<String>,
    /// Accept private keys that group or others can read.
    pub allow_readable_keys: bool,
}

/// A broker address as written: a host name or IP literal and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// Host name or IP address (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl HostPort {
    /// The TLS server name implied by the host.
    pub fn server_name(&self) -> Result<ServerName<'static>, String> {
        ServerName::try_from(self.host.clone()).map_err(|e| format!("`{}` is not a valid server name: {e}", self.host))
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A certificate chain file and its private key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The `[fallback]` table: an identity for connections that match no device, and who may have it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// The identity presented to the broker.
    pub identity: IdentityFiles,
    /// Networks a connection must come from (`fallback.source`); empty: any address.
    pub sources: Vec<IpNet>,
    /// Client id patterns one of which must match (`fallback.client_id`); empty: any client id that no
    /// device owns.
    pub client_ids: Vec<Pattern>,
    /// How its connections' CONNECT is rewritten (`fallback.connect.*`).
    pub connect: RewriteSpec,
}

/// One device: its match rules and its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Unique name, used in logs and metrics.
    pub name: String,
    /// MQTT client identifier that must match exactly.
    pub client_id: Option<String>,
    /// Source networks, one of which must contain the device's address; empty: any address.
    pub sources: Vec<IpNet>,
    /// A listener dedicated to this device; `None`: the shared `[listen]` addresses.
    pub listen: Option<SocketAddr>,
    /// The identity presented to the broker.
    pub identity: IdentityFiles,
    /// How its CONNECT is rewritten (`connect.*`, with the `[device_dir]` defaults for a directory entry).
    pub connect: RewriteSpec,
    /// Where this entry was defined (config file or `device.toml`/directory), for error messages.
    pub origin: PathBuf,
    /// How to name this entry's keys in messages: `device[3]` or a directory path.
    pub key_prefix: String,
}

/// A device directory entry with a private key and a CSR but no certificate yet (see `mqtls certs csr`).
///
/// It is skipped with a warning rather than failing the whole configuration: the CSR is out at a CA, and
/// the device is served once the signed certificate is saved as `cert.pem` next to the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDevice {
    /// The entry's directory name.
    pub name: String,
    /// The entry's directory.
    pub dir: PathBuf,
    /// The private key waiting for its certificate.
    pub key: PathBuf,
}

impl PendingDevice {
    /// What an operator is told: why the device is not served and how to complete it.
    pub fn warning(&self) -> String {
        format!(
            "device \"{}\" is pending: {} has {DEVICE_DIR_KEY} and {DEVICE_DIR_CSR} but no {DEVICE_DIR_CERT}; \
             it is skipped until the signed certificate is saved as {}",
            self.name,
            self.dir.display(),
            self.dir.join(DEVICE_DIR_CERT).display()
        )
    }
}

impl DeviceSpec {
    /// The listeners this device can arrive on.
    pub fn listeners<'a>(&'a self, shared: &'a [SocketAddr]) -> &'a [SocketAddr] {
        match &self.listen {
            Some(l) => std::slice::from_ref(l),
            None => shared,
        }
    }

    /// Its match rules, with `shared` the listen addresses of devices without a `listen` of their own.
    pub fn rules(&self, shared: &[SocketAddr]) -> Rules {
        Rules {
            client_id: self.client_id.clone(),
            client_id_patterns: Vec::new(),
            sources: self.sources.clone(),
            listeners: self.listeners(shared).to_vec(),
        }
    }
}

impl Config {
    /// Reads and validates a configuration file. Certificates are not loaded here.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![ConfigError::new(path, "", format!("cannot read the file: {e}"))]))?;
        Config::from_toml(&text, path)
    }

    /// Validates configuration text as if it had been read from `path` (relative paths resolve against
    /// the directory of `path`).
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigErrors(vec![toml_error(path, text, &e)]))?;
        Validator::new(path).run(raw)
    }

    /// Every address the proxy listens on: the shared ones, then each dedicated one.
    pub fn all_listen_addresses(&self) -> Vec<SocketAddr> {
        let mut all = self.listen.addresses.clone();
        for d in &self.devices {
            if let Some(l) = d.listen {
                if !all.contains(&l) {
                    all.push(l);
                }
            }
        }
        all
    }
}

fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let Some(span) = e.span() else {
        return ConfigError::new(path, "", e.message().trim().to_string());
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    let key = key_at(text, start).unwrap_or_default();
    ConfigError::new(path, key, format!("line {line}, column {col}: {}", e.message().trim()))
}

/// The dotted key (`listen.max_connections`) written on the line holding `offset`, if that line is a
/// `key = value` line; the table comes from the nearest `[table]` or `[[table]]` header above it.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let line_start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[line_start..].lines().next()?.trim();
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    if line.starts_with('[') {
        return Some(line.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    }
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------------------
// What serde reads. Everything that needs a typed value is kept as text until validation so that the
// error can name the key.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<RawListen>,
    upstream: Option<RawUpstream>,
    #[serde(default)]
    device: Vec<RawDevice>,
    device_dir: Option<RawDeviceDir>,
    fallback: Option<RawFallback>,
    metrics: Option<RawMetrics>,
    reload: Option<RawReload>,
    retire: Option<RawRetire>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    address: Option<String>,
    device_labels: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetire {
    renewed: Option<bool>,
    expiring_within: Option<String>,
    grace: Option<String>,
    quiet: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReload {
    watch: Option<bool>,
    watch_interval: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawListen {
    address: Option<OneOrMany>,
    connect_timeout: Option<String>,
    max_connections: Option<i64>,
    max_connect_size: Option<i64>,
    max_pending_per_source: Option<i64>,
    max_connections_per_source: Option<i64>,
    max_connects_per_source_per_second: Option<i64>,
    max_idle: Option<String>,
    shutdown_grace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    address: Option<OneOrMany>,
    server_name: Option<String>,
    ca_file: Option<String>,
    connect_timeout: Option<String>,
    handshake_timeout: Option<String>,
    max_connecting: Option<i64>,
    queue_timeout: Option<String>,
    resolve_timeout: Option<String>,
    failed_address_backoff: Option<String>,
    #[serde(default)]
    alpn: Vec<String>,
    #[serde(default)]
    allow_readable_keys: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    name: Option<String>,
    client_id: Option<String>,
    source: Option<OneOrMany>,
    listen: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    connect: Option<RawConnect>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeviceDir {
    path: String,
    source: Option<OneOrMany>,
    connect: Option<RawConnect>,
}

/// `device.toml` inside a device directory entry.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDirDevice {
    client_id: Option<String>,
    source: Option<OneOrMany>,
    listen: Option<String>,
    connect: Option<RawConnect>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFallback {
    cert: Option<String>,
    key: Option<String>,
    source: Option<OneOrMany>,
    client_id: Option<OneOrMany>,
    connect: Option<RawConnect>,
}

#[derive(Deserialize, Clone)]
#[serde(untagged, expecting = "a string or a list of strings")]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------

const DEFAULT_LISTEN: &str = "0.0.0.0:1883";
const DEFAULT_DEVICE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
// Legacy devices send CONNECTs of tens to hundreds of bytes; a will message or a long password can make
// it a few KiB. 16 KiB leaves room while keeping what a flood of slow CONNECTs can pin small.
const DEFAULT_MAX_CONNECT_SIZE: usize = 16 * 1024;
const MAX_CONNECT_SIZE_RANGE: (i64, i64) = (64, 1024 * 1024);
const DEFAULT_MAX_PENDING_PER_SOURCE: usize = 64;
/// A LAN of sensors has one device per address; a router that puts many behind one address needs more.
const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 16;
/// After its share at once: a sensor reconnects a few times a minute at the worst, a loop far more.
const DEFAULT_MAX_CONNECTS_PER_SOURCE_PER_SECOND: usize = 5;
/// Keep-alive 0 means "never time out" to a device; no connection may stay silent longer than this.
const DEFAULT_MAX_IDLE: Duration = Duration::from_secs(3600);
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Loopback: the endpoint tells anyone who can reach it which devices exist.
const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:9883";
const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_secs(2);
/// Below Mosquitto's listen backlog (100): a reconnect storm then queues in mqtls instead of overflowing the
/// broker's accept queue, whose dropped SYNs are retried only after 1 s, 3 s, 7 s.
const DEFAULT_MAX_CONNECTING: usize = 64;
/// Long enough for 10,000 devices to connect through a broker that sets up a few hundred sessions a
/// second; a device waiting in line is not refused for the line's length.
const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(60);
/// Resolvers answer in milliseconds or not at all.
const DEFAULT_RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Long enough that a renewed fleet does not reconnect all at once; short enough that an old certificate
/// does not live on for long.
const DEFAULT_RETIRE_GRACE: Duration = Duration::from_secs(600);
/// Devices send a packet in one go; two seconds of nothing either way means none is on its way.
const DEFAULT_RETIRE_QUIET: Duration = Duration::from_secs(2);
/// Certificates are renewed weeks ahead, at most.
const MAX_EXPIRY_MARGIN: Duration = Duration::from_secs(90 * 86_400);
/// An address that keeps failing is tried again at least this often.
const DEFAULT_FAILED_ADDRESS_BACKOFF: Duration = Duration::from_secs(30);

struct Validator {
    path: PathBuf,
    base: PathBuf,
    errors: Vec<ConfigError>,
    pending: Vec<PendingDevice>,
}

impl Validator {
    fn new(path: &Path) -> Self {
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Validator {
            path: path.to_path_buf(),
            base,
            errors: Vec::new(),
            pending: Vec::new(),
        }
    }

    fn error(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        let e = ConfigError::new(&self.path, key, reason);
        self.errors.push(e);
    }

    fn run(mut self, raw: RawConfig) -> Result<Config, ConfigErrors> {
        let listen = self.listen(raw.listen.unwrap_or_default());
        let upstream = match raw.upstream {
            Some(u) => self.upstream(u),
            None => {
                self.error("upstream", "the [upstream] table is required (where is the broker?)");
                None
            }
        };
        let declared = !raw.device.is_empty() || raw.device_dir.is_some() || raw.fallback.is_some();
        let errors_before_devices = self.errors.len();
        let mut devices = Vec::new();
        for (i, d) in raw.device.into_iter().enumerate() {
            if let Some(spec) = self.device(i, d) {
                devices.push(spec);
            }
        }
        let device_dir = raw.device_dir.map(|dir| {
            let path = self.resolve(&dir.path);
            devices.extend(self.device_dir(dir));
            path
        });
        let fallback = raw.fallback.and_then(|f| self.fallback(f));
        let device_errors = self.errors.len() > errors_before_devices;
        let metrics = raw.metrics.and_then(|m| self.metrics(m));
        let reload = self.reload(raw.reload.unwrap_or_default());
        let retire = raw.retire.map(|r| self.retire(r));

        self.unique_names(&devices);
        if fallback.is_some() {
            for d in devices.iter().filter(|d| d.name == FALLBACK_NAME) {
                let reason =
                    format!("`{FALLBACK_NAME}` names the [fallback] identity in logs and metrics; choose another name");
                self.errors
                    .push(ConfigError::new(&d.origin, "name", reason).for_device(&d.name));
            }
        }
        if let Some(listen) = &listen {
            self.no_ambiguous_devices(&devices, &listen.addresses);
            self.listeners_can_bind(&devices, &listen.addresses);
            if let Some(m) = &metrics {
                self.metrics_apart(m.address, &devices, &listen.addresses);
            }
        }
        if devices.is_empty() && fallback.is_none() && !device_errors {
            self.nothing_to_serve(declared, device_dir.as_deref());
        }

        match (listen, upstream) {
            (Some(listen), Some(upstream)) if self.errors.is_empty() => Ok(Config {
                path: self.path,
                listen,
                upstream,
                devices,
                pending: self.pending,
                fallback,
                device_dir,
                metrics,
                reload,
                retire,
            }),
            _ => Err(ConfigErrors(self.errors)),
        }
    }

    /// Says why no identity can be served, when no device entry had an error of its own to say it: none is
    /// configured, every directory entry is pending, or the device directory is empty.
    fn nothing_to_serve(&mut self, declared: bool, device_dir: Option<&Path>) {
        if !declared {
            self.error(
                "device",
                "no devices are configured: add a [[device]], a [device_dir] or a [fallback]",
            );
        } else if !self.pending.is_empty() {
            let n = self.pending.len();
            self.error(
                "device",
                format!("no device is ready: {n} device(s) in the device directory are pending (a key and a CSR, no {DEVICE_DIR_CERT} yet)"),
            );
        } else if let Some(dir) = device_dir {
            self.error(
                "device_dir.path",
                format!(
                    "{} holds no device yet: add one, e.g. `mqtls certs issue --ca CA_DIR --out {} NAME`",
                    dir.display(),
                    dir.display()
                ),
            );
        }
    }

    fn listen(&mut self, raw: RawListen) -> Option<Listen> {
        let texts = raw
            .address
            .map(OneOrMany::into_vec)
            .unwrap_or_else(|| vec![DEFAULT_LISTEN.into()]);
        let mut addresses = Vec::new();
        if texts.is_empty() {
            self.error("listen.address", "at least one address is needed");
        }
        for t in texts {
            match t.parse::<SocketAddr>() {
                Ok(a) if addresses.contains(&a) => self.error("listen.address", format!("`{t}` is listed twice")),
                Ok(a) => addresses.push(a),
                Err(_) => self.error(
                    "listen.address",
                    format!("`{t}` is not an IP:port address (e.g. 0.0.0.0:1883)"),
                ),
            }
        }
        let connect_timeout = self.duration(
            "listen.connect_timeout",
            raw.connect_timeout,
            DEFAULT_DEVICE_CONNECT_TIMEOUT,
        );
        let max_connections = self.count(
            "listen.max_connections",
            raw.max_connections,
            DEFAULT_MAX_CONNECTIONS,
            (1, 1_000_000),
        );
        let max_connect_size = self.count(
            "listen.max_connect_size",
            raw.max_connect_size,
            DEFAULT_MAX_CONNECT_SIZE,
            MAX_CONNECT_SIZE_RANGE,
        );
        let max_pending_per_source = self.count(
            "listen.max_pending_per_source",
            raw.max_pending_per_source,
            DEFAULT_MAX_PENDING_PER_SOURCE,
            (1, 1_000_000),
        );
        let max_connections_per_source = self.count(
            "listen.max_connections_per_source",
            raw.max_connections_per_source,
            DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            (1, 1_000_000),
        );
        let max_connects_per_source_per_second = self.count(
            "listen.max_connects_per_source_per_second",
            raw.max_connects_per_source_per_second,
            DEFAULT_MAX_CONNECTS_PER_SOURCE_PER_SECOND,
            (1, 1_000_000),
        ) as u32;
        let max_idle = self.duration("listen.max_idle", raw.max_idle, DEFAULT_MAX_IDLE);
        let shutdown_grace = self.duration("listen.shutdown_grace", raw.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        Some(Listen {
            addresses,
            connect_timeout,
            max_connections,
            max_connect_size,
            max_pending_per_source,
            max_connections_per_source,
            max_connects_per_source_per_second,
            max_idle,
            shutdown_grace,
        })
    }

    /// A whole number within `range` (inclusive); on error the problem is recorded and the default stands in.
    fn count(&mut self, key: &str, value: Option<i64>, default: usize, range: (i64, i64)) -> usize {
        match value {
            None => default,
            Some(n) if (range.0..=range.1).contains(&n) => n as usize,
            Some(n) => {
                self.error(key, format!("{n} is out of range ({} to {})", range.0, range.1));
                default
            }
        }
    }

    fn upstream(&mut self, raw: RawUpstream) -> Option<Upstream> {
        let mut addresses = Vec::new();
        let texts = raw.address.map(OneOrMany::into_vec).unwrap_or_default();
        if texts.is_empty() {
            self.error(
                "upstream.address",
                "the broker's address is required (e.g. \"broker.example.com:8883\")",
            );
        }
        for t in texts {
            match parse_host_port(&t) {
                Ok(hp) => addresses.push(hp),
                Err(reason) => self.error("upstream.address", reason),
            }
        }
        let server_name = match raw.server_name {
            Some(s) => match ServerName::try_from(s.clone()) {
                Ok(n) => Some(n),
                Err(_) => {
                    self.error("upstream.server_name", format!("`{s}` is not a DNS name or IP address"));
                    None
                }
            },
            None => {
                for a in &addresses {
                    if let Err(reason) = a.server_name() {
                        self.error("upstream.address", format!("{reason}; set upstream.server_name"));
                    }
                }
                None
            }
        };
        let ca_file = raw.ca_file.map(|p| self.resolve(&p));
        let connect_timeout = self.duration(
            "upstream.connect_timeout",
            raw.connect_timeout,
            DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
        );
        let handshake_timeout = self.duration(
            "upstream.handshake_timeout",
            raw.handshake_timeout,
            DEFAULT_HANDSHAKE_TIMEOUT,
        );
        let max_connecting = self.count(
            "upstream.max_connecting",
            raw.max_connecting,
            DEFAULT_MAX_CONNECTING,
            (1, 1_000_000),
        );
        let queue_timeout = self.duration("upstream.queue_timeout", raw.queue_timeout, DEFAULT_QUEUE_TIMEOUT);
        let resolve_timeout = self.duration("upstream.resolve_timeout", raw.resolve_timeout, DEFAULT_RESOLVE_TIMEOUT);
        let failed_address_backoff = self.duration(
            "upstream.failed_address_backoff",
            raw.failed_address_backoff,
            DEFAULT_FAILED_ADDRESS_BACKOFF,
        );
        for p in &raw.alpn {
            if p.is_empty() || p.len() > 255 {
                self.error("upstream.alpn", format!("`{p}` must be 1 to 255 bytes long"));
            }
        }
        Some(Upstream {
            addresses,
            server_name,
            ca_file,
            connect_timeout,
            handshake_timeout,
            max_connecting,
            queue_timeout,
            resolve_timeout,
            failed_address_backoff,
            alpn: raw.alpn,
            allow_readable_keys: raw.allow_readable_keys,
        })
    }

    fn metrics(&mut self, raw: RawMetrics) -> Option<Metrics> {
        let text = raw.address.unwrap_or_else(|| DEFAULT_METRICS_ADDRESS.into());
        let Ok(address) = text.parse::<SocketAddr>() else {
            self.error(
                "metrics.address",
                format!("`{text}` is not an IP:port address (e.g. {DEFAULT_METRICS_ADDRESS})"),
            );
            return None;
        };
        Some(Metrics {
            address,
            device_labels: raw.device_labels.unwrap_or(true),
        })
    }

    fn retire(&mut self, raw: RawRetire) -> Retire {
        let expiring_within = raw.expiring_within.map(|t| match humantime::parse_duration(&t) {
            Ok(d) if d <= MAX_EXPIRY_MARGIN => d,
            Ok(_) => {
                self.error("retire.expiring_within", format!("`{t}` is longer than 90 days"));
                Duration::ZERO
            }
            Err(e) => {
                let reason = format!("`{t}` is not a duration ({e}); write e.g. \"7d\", \"48h\", \"0s\" (at notAfter)");
                self.error("retire.expiring_within", reason);
                Duration::ZERO
            }
        });
        let quiet = self.duration("retire.quiet", raw.quiet, DEFAULT_RETIRE_QUIET);
        let grace = self.duration("retire.grace", raw.grace, DEFAULT_RETIRE_GRACE);
        let renewed = raw.renewed.unwrap_or(true);
        if !renewed && expiring_within.is_none() {
            self.error(
                "retire",
                "retires nothing: set renewed = true or expiring_within (or remove the [retire] table)",
            );
        }
        Retire {
            renewed,
            expiring_within,
            grace,
            quiet,
        }
    }

    fn reload(&mut self, raw: RawReload) -> Reload {
        let watch_interval = self.duration("reload.watch_interval", raw.watch_interval, DEFAULT_WATCH_INTERVAL);
        if watch_interval < Duration::from_millis(100) {
            self.error("reload.watch_interval", "must be at least 100ms");
        }
        Reload {
            watch: raw.watch.unwrap_or(true),
            watch_interval,
        }
    }

    /// A duration from text; on error the problem is recorded and the default stands in, so that the
    /// checks that depend on this table still run and report their own problems.
    fn duration(&mut self, key: &str, text: Option<String>, default: Duration) -> Duration {
        let Some(text) = text else { return default };
        match humantime::parse_duration(&text) {
            Ok(d) if d.is_zero() => self.error(key, "must be longer than zero"),
            Ok(d) if d > Duration::from_secs(24 * 3600) => self.error(key, format!("`{text}` is longer than a day")),
            Ok(d) => return d,
            Err(e) => self.error(
                key,
                format!("`{text}` is not a duration ({e}); write e.g. \"10s\", \"500ms\", \"2m\""),
            ),
        }
        default
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn device(&mut self, index: usize, raw: RawDevice) -> Option<DeviceSpec> {
        // Operators count entries from 1.
        let prefix = format!("device #{}", index + 1);
        let Some(name) = raw.name.filter(|n| !n.trim().is_empty()) else {
            self.error(
                format!("name (in the {} [[device]])", ordinal(index + 1)),
                "every device needs a non-empty name",
            );
            return None;
        };
        let before = self.errors.len();
        let has_rule = raw.client_id.is_some() || raw.source.is_some() || raw.listen.is_some();
        let sources = self.sources("source", Some(&name), raw.source);
        let listen = self.device_listen(&name, raw.listen);
        let identity = self.identity("", raw.cert, raw.key, Some(&name));
        let base = self.base.clone();
        let connect = self.connect("connect", raw.connect, Some(&name), &base);
        if !has_rule {
            self.errors.push(
                ConfigError::new(&self.path, "client_id", "give at least one of client_id, source, listen (a device that matches every connection is [fallback])")
                    .for_device(&name),
            );
        }
        if self.errors.len() > before {
            return None;
        }
        Some(DeviceSpec {
            name,
            client_id: raw.client_id,
            sources,
            listen,
            identity: identity?,
            connect,
            origin: self.path.clone(),
            key_prefix: prefix,
        })
    }

    /// Source rules of a device, or (`device` = None) of the whole device directory.
    fn fallback(&mut self, raw: RawFallback) -> Option<Fallback> {
        let sources = self.sources("fallback.source", None, raw.source);
        let mut client_ids = Vec::new();
        for t in raw.client_id.map(OneOrMany::into_vec).unwrap_or_default() {
            match Pattern::new(&t) {
                Ok(p) => client_ids.push(p),
                Err(reason) => self.error("fallback.client_id", format!("`{t}`: {reason}")),
            }
        }
        let base = self.base.clone();
        let connect = self.connect("fallback.connect", raw.connect, None, &base);
        let identity = self.identity("fallback", raw.cert, raw.key, None)?;
        Some(Fallback {
            identity,
            sources,
            client_ids,
            connect,
        })
    }

    fn sources(&mut self, key: &str, device: Option<&str>, raw: Option<OneOrMany>) -> Vec<IpNet> {
        let mut nets = Vec::new();
        for t in raw.map(OneOrMany::into_vec).unwrap_or_default() {
            match parse_net(&t) {
                Some(n) => nets.push(n),
                None => {
                    let reason = format!("`{t}` is not an IP address or CIDR (e.g. 192.168.10.21 or 192.168.10.0/24)");
                    let e = match device {
                        Some(d) => ConfigError::new(&self.path, key, reason).for_device(d),
                        None => ConfigError::new(&self.path, key, reason),
                    };
                    self.errors.push(e);
                }
            }
        }
        nets
    }

    fn device_listen(&mut self, device: &str, raw: Option<String>) -> Option<SocketAddr> {
        let t = raw?;
        match t.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.errors.push(
                    ConfigError::new(&self.path, "listen", format!("`{t}` is not an IP:port address"))
                        .for_device(device),
                );
                None
            }
        }
    }

    /// A `connect` table (`key` names it in messages); a relative password file is found in `base`.
    fn connect(&mut self, key: &str, raw: Option<RawConnect>, device: Option<&str>, base: &Path) -> RewriteSpec {
        let (spec, errors) = raw.unwrap_or_default().check(base);
        for e in errors {
            let mut error = ConfigError::new(&self.path, format!("{key}.{}", e.key), e.reason);
            if let Some(d) = device {
                error = error.for_device(d);
            }
            self.errors.push(error);
        }
        spec
    }

    fn identity(
        &mut self,
        table: &str,
        cert: Option<String>,
        key: Option<String>,
        device: Option<&str>,
    ) -> Option<IdentityFiles> {
        let key_name = |k: &str| {
            if table.is_empty() {
                k.to_string()
            } else {
                format!("{table}.{k}")
            }
        };
        let missing = |this: &mut Self, k: &str| {
            let mut e = ConfigError::new(&this.path, key_name(k), "is required (a PEM file path)");
            if let Some(d) = device {
                e = e.for_device(d);
            }
            this.errors.push(e);
        };
        match (cert, key) {
            (Some(c), Some(k)) => Some(IdentityFiles {
                cert: self.resolve(&c),
                key: self.resolve(&k),
            }),
            (c, k) => {
                if c.is_none() {
                    missing(self, "cert");
                }
                if k.is_none() {
                    missing(self, "key");
                }
                None
            }
        }
    }

    fn device_dir(&mut self, raw: RawDeviceDir) -> Vec<DeviceSpec> {
        let dir = self.resolve(&raw.path);
        let shared_sources = self.sources("device_dir.source", None, raw.source.clone());
        let base = self.base.clone();
        let shared_connect = self.connect("device_dir.connect", raw.connect, None, &base);
        let entries = match device_dir_entries(&dir) {
            Ok(e) => e,
            Err(e) => {
                self.error("device_dir.path", format!("cannot read {}: {e}", dir.display()));
                return Vec::new();
            }
        };
        entries
            .into_iter()
            .filter_map(|p| self.dir_device(&p, &shared_sources, &shared_connect))
            .collect()
    }

    fn dir_device(
        &mut self,
        entry: &Path,
        shared_sources: &[IpNet],
        shared_connect: &RewriteSpec,
    ) -> Option<DeviceSpec> {
        let name = entry.file_name()?.to_string_lossy().into_owned();
        let settings_path = entry.join(DEVICE_DIR_SETTINGS);
        let settings = if settings_path.exists() {
            let parsed = std::fs::read_to_string(&settings_path)
                .map_err(|e| ConfigError::new(&settings_path, "", format!("cannot read the file: {e}")))
                .and_then(|t| toml::from_str::<RawDirDevice>(&t).map_err(|e| toml_error(&settings_path, &t, &e)));
            match parsed {
                Ok(s) => s,
                Err(e) => {
                    self.errors.push(e.for_device(&name));
                    return None;
                }
            }
        } else {
            RawDirDevice::default()
        };
        let cert = entry.join(DEVICE_DIR_CERT);
        let key = entry.join(DEVICE_DIR_KEY);
        // A key and a CSR without a certificate: the CSR is out at a CA. Skipped, not an error.
        let pending = pending_device(entry);
        let mut ok = true;
        for (file, what) in [(&cert, "certificate"), (&key, "private key")] {
            if pending.is_none() && !file.is_file() {
                self.errors
                    .push(ConfigError::new(file, "", format!("the device's {what} is missing")).for_device(&name));
                ok = false;
            }
        }
        // Errors about device.toml keys point at device.toml.
        let saved = std::mem::replace(&mut self.path, settings_path.clone());
        let sources = match settings.source {
            Some(s) => self.sources("source", Some(&name), Some(s)),
            None => shared_sources.to_vec(),
        };
        let listen = self.device_listen(&name, settings.listen);
        // A password file named in device.toml is found beside it.
        let connect = self
            .connect("connect", settings.connect, Some(&name), entry)
            .or(shared_connect);
        self.path = saved;
        if let Some(p) = pending {
            self.pending.push(p);
            return None;
        }
        if !ok {
            return None;
        }
        Some(DeviceSpec {
            client_id: Some(settings.client_id.unwrap_or_else(|| name.clone())),
            name,
            sources,
            listen,
            identity: IdentityFiles { cert, key },
            connect,
            origin: entry.to_path_buf(),
            key_prefix: entry.display().to_string(),
        })
    }

    fn unique_names(&mut self, devices: &[DeviceSpec]) {
        let mut seen: HashMap<&str, &DeviceSpec> = HashMap::new();
        for d in devices {
            if let Some(first) = seen.insert(&d.name, d) {
                let e = ConfigError::new(
                    &d.origin,
                    "name",
                    format!(
                        "{} uses a name already taken by {} in {}",
                        d.key_prefix,
                        first.key_prefix,
                        first.origin.display()
                    ),
                )
                .for_device(&d.name);
                self.errors.push(e);
            }
        }
    }

    /// Two devices are ambiguous when one connection could satisfy every rule of both.
    fn no_ambiguous_devices(&mut self, devices: &[DeviceSpec], shared: &[SocketAddr]) {
        let mut by_id: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut without_id = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            match &d.client_id {
                Some(id) => by_id.entry(id).or_default().push(i),
                None => without_id.push(i),
            }
        }
        let mut pairs = Vec::new();
        for group in by_id.values() {
            for (n, &a) in group.iter().enumerate() {
                pairs.extend(group[n + 1..].iter().map(|&b| (a, b)));
            }
        }
        for (n, &a) in without_id.iter().enumerate() {
            pairs.extend(without_id[n + 1..].iter().map(|&b| (a, b)));
            pairs.extend(by_id.values().flatten().map(|&b| (a, b)));
        }
        pairs.sort_unstable();
        let rules: Vec<Rules> = devices.iter().map(|d| d.rules(shared)).collect();
        for (a, b) in pairs {
            let (da, db) = (&devices[a], &devices[b]);
            if rules[a].can_overlap(&rules[b]) {
                let e = ConfigError::new(
                    &db.origin,
                    "client_id/source/listen",
                    format!(
                        "can match the same connections as device \"{}\" ({}); narrow one of them with client_id, source or listen",
                        da.name,
                        da.origin.display()
                    ),
                )
                .for_device(&db.name);
                self.errors.push(e);
            }
        }
    }

    /// A listener on 0.0.0.0:P (or [::]:P) takes port P on every address, so no other listener can
    /// have P; `mqtls run` would otherwise fail to bind after `mqtls check` said OK.
    fn listeners_can_bind(&mut self, devices: &[DeviceSpec], shared: &[SocketAddr]) {
        let wanted = shared
            .iter()
            .map(|a| (*a, None))
            .chain(devices.iter().filter_map(|d| d.listen.map(|l| (l, Some(d)))));
        let mut taken: Vec<(SocketAddr, String)> = Vec::new();
        for (l, device) in wanted {
            if taken.iter().any(|(a, _)| *a == l) {
                continue;
            }
            let clash = taken.iter().find(|(other, _)| binds_clash(*other, l));
            let Some((other, other_owner)) = clash else {
                let owner = match device {
                    Some(d) => format!("device \"{}\"", d.name),
                    None => "listen.address".to_string(),
                };
                taken.push((l, owner));
                continue;
            };
            let reason =
                format!("{l} overlaps the listener {other} of {other_owner} (same port; one of them is every address)");
            match device {
                Some(d) => self
                    .errors
                    .push(ConfigError::new(&d.origin, "listen", reason).for_device(&d.name)),
                None => self.error("listen.address", reason),
            }
        }
    }

    /// The metrics endpoint cannot share a port with a device listener.
    fn metrics_apart(&mut self, metrics: SocketAddr, devices: &[DeviceSpec], shared: &[SocketAddr]) {
        let mut listeners = shared.iter().chain(devices.iter().filter_map(|d| d.listen.as_ref()));
        let clash = listeners.find(|l| binds_clash(**l, metrics));
        if let Some(l) = clash {
            self.error(
                "metrics.address",
                format!("{metrics} overlaps the device listener {l}; give the metrics endpoint a port of its own"),
            );
        }
    }
}

/// Whether two sockets cannot both be bound: the same fixed port, on the same address or with one of them
/// on every address.
fn binds_clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.port() != 0 && (a == b || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn is_hidden(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

/// The entries of a device directory that can be devices: its subdirectories, hidden ones left out,
/// sorted by path.
pub(crate) fn device_dir_entries(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !is_hidden(p))
        .collect();
    entries.sort();
    Ok(entries)
}

/// The device directory entry `entry` as a [`PendingDevice`] when it holds a private key and a CSR but no
/// certificate (the CSR is out at a CA).
pub(crate) fn pending_device(entry: &Path) -> Option<PendingDevice> {
    let key = entry.join(DEVICE_DIR_KEY);
    let pending = !entry.join(DEVICE_DIR_CERT).exists() && key.is_file() && entry.join(DEVICE_DIR_CSR).is_file();
    pending.then(|| PendingDevice {
        name: entry.file_name().unwrap_or_default().to_string_lossy().into_owned(),
        dir: entry.to_path_buf(),
        key,
    })
}

/// Parses `192.168.1.5` or `192.168.1.0/24` (or IPv6 forms) into a network.
pub fn parse_net(t: &str) -> Option<IpNet> {
    let t = t.trim();
    let net = match t.parse::<IpNet>() {
        Ok(net) => net.trunc(),
        Err(_) => IpNet::from(t.parse::<IpAddr>().ok()?),
    };
    // Peers arriving on a dual-stack socket are compared as IPv4, so `::ffff:a.b.c.d` rules must be too.
    Some(match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).ok()?),
            None => net,
        },
        other => other,
    })
}

fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (1, 11) | (2, 12) | (3, 13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// Parses `host:port`, `[v6]:port`, or a bare host (port 8883).
pub fn parse_host_port(t: &str) -> Result<HostPort, String> {
    let bad = || format!("`{t}` is not host:port (e.g. \"broker.example.com:8883\" or \"[2001:db8::1]:8883\")");
    if let Ok(sa) = t.parse::<SocketAddr>() {
        return Ok(HostPort {
            host: sa.ip().to_string(),
            port: sa.port(),
        });
    }
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok(HostPort {
            host: ip.to_string(),
            port: DEFAULT_UPSTREAM_PORT,
        });
    }
    let (host, port) = match t.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
        None => (t, DEFAULT_UPSTREAM_PORT),
    };
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !valid || port == 0 {
        return Err(bad());
    }
    Ok(HostPort {
        host: host.to_ascii_lowercase(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_toml(text, Path::new("/etc/mqtls/mqtls.toml"))
    }

    const BASE: &str = r#"
[upstream]
address = "broker.example.com:8883"

[[device]]
name = "boiler-1"
client_id = "boiler-1"
cert = "devices/boiler-1/cert.pem"
key = "devices/boiler-1/key.pem"
"#;

    #[test]
    fn baseline_is_valid_with_defaults() {
        let c = load(BASE).unwrap();
        assert_eq!(c.listen.addresses, vec!["0.0.0.0:1883".parse().unwrap()]);
        assert_eq!(c.listen.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.listen.shutdown_grace, Duration::from_secs(10));
        assert_eq!(c.upstream.addresses[0].host, "broker.example.com");
        assert_eq!(
            c.devices[0].identity.cert,
            Path::new("/etc/mqtls/devices/boiler-1/cert.pem")
        );
    }

    #[test]
    fn metrics_and_reload_defaults() {
        let c = load(BASE).unwrap();
        assert_eq!(c.metrics, None, "no [metrics] table: no endpoint");
        assert!(c.reload.watch);
        assert_eq!(c.reload.watch_interval, Duration::from_secs(2));
        let c = load(&format!("{BASE}\n[metrics]\n[reload]\nwatch = false\n")).unwrap();
        let m = c.metrics.unwrap();
        assert_eq!(m.address, "127.0.0.1:9883".parse().unwrap());
        assert!(m.device_labels);
        assert!(!c.reload.watch);
    }

    #[test]
    fn shipped_example_is_valid() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/mqtls.example.toml"));
        let c = Config::load(path).unwrap();
        assert_eq!(c.devices.len(), 2);
        assert_eq!(c.all_listen_addresses().len(), 2, "old-meter has a dedicated listener");
    }

    #[test]
    fn ipv4_mapped_sources_compare_as_ipv4() {
        assert_eq!(parse_net("::ffff:192.168.10.21"), parse_net("192.168.10.21"));
        assert_eq!(parse_net("::ffff:192.168.10.0/120"), parse_net("192.168.10.0/24"));
        assert_eq!(parse_net("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert!(parse_net("192.168.10.300").is_none());
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(parse_host_port("b.example:1").unwrap().port, 1);
        assert_eq!(parse_host_port("b.example").unwrap().port, 8883);
        assert_eq!(parse_host_port("[::1]:9").unwrap().host, "::1");
        assert!(parse_host_port("b.example:x").is_err());
        assert!(parse_host_port("bad host:1").is_err());
    }

    fn problems(text: &str) -> Vec<String> {
        load(text).unwrap_err().0.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn toml_errors_name_the_key_then_the_line_and_column() {
        let bad_value = "[listen]\nmax_connections = \"ten\"\n";
        assert_eq!(
            problems(bad_value),
            ["/etc/mqtls/mqtls.toml: `listen.max_connections`: line 2, column 19: invalid type: string \"ten\", expected i64"]
        );
        let unknown = problems("colour = \"blue\"\n");
        assert!(
            unknown[0].starts_with("/etc/mqtls/mqtls.toml: `colour`: line 1, column 1: unknown field `colour`"),
            "{unknown:?}"
        );
        let unparsable = problems("not toml at all\n");
        assert!(
            unparsable[0].starts_with("/etc/mqtls/mqtls.toml: line 1, column "),
            "{unparsable:?}"
        );
    }

    #[test]
    fn unreadable_device_dir_is_the_only_problem_reported() {
        let text = "[upstream]\naddress = \"b.example\"\n[device_dir]\npath = \"/nonexistent/devices.d\"\n";
        let found = problems(text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("/etc/mqtls/mqtls.toml: `device_dir.path`: cannot read /nonexistent/devices.d: "),
            "{found:?}"
        );
    }

    #[test]
    fn empty_device_dir_says_how_to_add_a_device() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[upstream]\naddress = \"b.example\"\n[device_dir]\npath = {:?}\n",
            dir.path()
        );
        let found = problems(&text);
        let expected = format!(
            "/etc/mqtls/mqtls.toml: `device_dir.path`: {0} holds no device yet: add one, e.g. `mqtls certs issue --ca CA_DIR --out {0} NAME`",
            dir.path().display()
        );
        assert_eq!(found, [expected]);
    }

    #[test]
    fn no_device_at_all_says_what_to_add() {
        assert_eq!(
            problems("[upstream]\naddress = \"b.example\"\n"),
            ["/etc/mqtls/mqtls.toml: `device`: no devices are configured: add a [[device]], a [device_dir] or a [fallback]"]
        );
    }

    #[test]
    fn overlapping_sources_are_ambiguous_and_disjoint_are_not() {
        let two = |a: &str, b: &str| {
            format!(
                "[upstream]\naddress = \"b:8883\"\n[[device]]\nname = \"a\"\nclient_id = \"x\"\nsource = \"{a}\"\ncert = \"c\"\nkey = \"k\"\n[[device]]\nname = \"b\"\nclient_id = \"x\"\nsource = \"{b}\"\ncert = \"c\"\nkey = \"k\"\n"
            )
        };
        assert!(load(&two("10.0.0.0/24", "10.0.0.7")).is_err());
        assert!(load(&two("10.0.0.0/24", "10.0.1.7")).is_ok());
    }
}
