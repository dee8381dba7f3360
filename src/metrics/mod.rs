//! Prometheus metrics: what an operator needs to watch a gateway for years.
//!
//! Process-wide series (accepted, refused, upstream failures, histograms, reloads) live in a
//! `metrics-exporter-prometheus` recorder that belongs to this [`Metrics`] value rather than to a global
//! recorder, so a test or an embedding program can run several proxies side by side. The handles are
//! registered once, here; the proxy only increments them.
//!
//! Per-device series (connections active, bytes, certificate expiry) follow the *current* configuration
//! generation: a device removed by a reload disappears from the output instead of exporting a stale
//! expiry date forever, which the exporter's registry cannot do (it never forgets a series). They are
//! kept in [`DeviceStats`] atomics, shared by a device's connections and carried over from one generation
//! to the next by name, and rendered here. `[metrics] device_labels = false` folds them into one series.

mod endpoint;
mod metered;
pub mod process;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::device::DeviceTable;
use crate::pipe::Retirement;
use crate::refusal::log_budget::LogBudget;
use crate::refusal::{self, Reason};
use crate::upstream::Failure;

pub use endpoint::serve;
pub use metered::Metered;

/// The refusal codes a broker may answer a CONNECT with: 3.1 and 3.1.1's return codes, then 5.0's
/// reason codes for a CONNACK. Each has its series from the start; another code counts as `other`.
pub const BROKER_REFUSAL_CODES: [(u8, &str); 26] = [
    (0x01, "0x01"),
    (0x02, "0x02"),
    (0x03, "0x03"),
    (0x04, "0x04"),
    (0x05, "0x05"),
    (0x80, "0x80"),
    (0x81, "0x81"),
    (0x82, "0x82"),
    (0x83, "0x83"),
    (0x84, "0x84"),
    (0x85, "0x85"),
    (0x86, "0x86"),
    (0x87, "0x87"),
    (0x88, "0x88"),
    (0x89, "0x89"),
    (0x8A, "0x8a"),
    (0x8C, "0x8c"),
    (0x90, "0x90"),
    (0x95, "0x95"),
    (0x97, "0x97"),
    (0x99, "0x99"),
    (0x9A, "0x9a"),
    (0x9B, "0x9b"),
    (0x9C, "0x9c"),
    (0x9D, "0x9d"),
    (0x9F, "0x9f"),
];

/// How often histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Seconds: a handshake on a LAN takes milliseconds; one over a satellite link or to a loaded cloud
/// broker can take seconds, and the default limit is 10 s.
const HANDSHAKE_BUCKETS: [f64; 12] = [0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Seconds: from reconnect loops (under a second) to sensors that stay connected for weeks.
const DURATION_BUCKETS: [f64; 11] = [
    1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0, 604800.0, 2592000.0, 31536000.0,
];

/// Live counters of one device, shared by its connections. Outlive a reload when the device keeps its
/// name, so its byte counters do not reset.
#[derive(Debug, Default)]
pub struct DeviceStats {
    active: AtomicI64,
    to_broker: AtomicU64,
    to_device: AtomicU64,
}

impl DeviceStats {
    /// Counts bytes passed from the device to the broker.
    pub fn add_to_broker(&self, n: u64) {
        self.to_broker.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts bytes passed from the broker to the device.
    pub fn add_to_device(&self, n: u64) {
        self.to_device.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a connection as proxied until the returned guard is dropped.
    pub fn open(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed) > 0
    }
}

/// Keeps a connection counted in `mqtls_connections_active` while it lives.
#[derive(Debug)]
pub struct ActiveGuard(Arc<DeviceStats>);

impl std::ops::Deref for ActiveGuard {
    type Target = DeviceStats;

    fn deref(&self) -> &DeviceStats {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The devices of the current generation, in configuration order, and every device's live counters.
#[derive(Default)]
struct DeviceSeries {
    current: Vec<(Arc<str>, SystemTime)>,
    stats: HashMap<Arc<str>, Arc<DeviceStats>>,
}

/// Every metric mqtls exports. Cheap to share: the proxy holds it in an `Arc`.
pub struct Metrics {
    handle: PrometheusHandle,
    accepted: Counter,
    refused: [Counter; Reason::ALL.len()],
    upstream_failures: [Counter; Failure::ALL.len()],
    /// Connections retired, by why (renewed, expiring).
    retired: [Counter; 2],
    /// By CONNACK code, in [`BROKER_REFUSAL_CODES`] order, then `other`.
    broker_refusals: Vec<Counter>,
    handshake: Histogram,
    duration: Histogram,
    reloads_success: Counter,
    reloads_failure: Counter,
    last_reload_success: Gauge,
    devices_configured: Gauge,
    /// How many lines refusals may still write to the log.
    refusal_logs: LogBudget,
    device_labels: bool,
    /// Used for every device when `device_labels` is off.
    aggregate: Arc<DeviceStats>,
    devices: RwLock<DeviceSeries>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("device_labels", &self.device_labels)
            .finish_non_exhaustive()
    }
}

/// The names of every series family mqtls exports, for documentation and for tests that check
/// dashboards and alert rules against them.
pub const NAMES: &[&str] = &[
    "mqtls_build_info",
    "mqtls_connections_accepted_total",
    "mqtls_connections_active",
    "mqtls_connections_refused_total",
    "mqtls_upstream_connect_failures_total",
    "mqtls_broker_refusals_total",
    "mqtls_connections_retired_total",
    "mqtls_upstream_handshake_seconds",
    "mqtls_connection_duration_seconds",
    "mqtls_bytes_total",
    "mqtls_device_cert_expiry_timestamp_seconds",
    "mqtls_config_reloads_total",
    "mqtls_config_last_reload_success_timestamp_seconds",
    "mqtls_devices",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_cpu_seconds_total",
    "process_start_time_seconds",
];

impl Metrics {
    /// Registers every series. `device_labels = false` gives one series for all devices instead of one
    /// per device (for very large fleets).
    pub fn new(device_labels: bool) -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("mqtls_upstream_handshake_seconds".into()),
                &HANDSHAKE_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("mqtls_connection_duration_seconds".into()),
                    &DURATION_BUCKETS,
                )
            })
            .expect("bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let r = Registrar(&recorder);

        r.gauge(
            "mqtls_build_info",
            "mqtls version (the value is always 1).",
            &[("version", env!("CARGO_PKG_VERSION"))],
        )
        .set(1.0);
        let accepted = r.counter(
            "mqtls_connections_accepted_total",
            "TCP connections accepted from devices.",
            &[],
        );
        let refused = Reason::ALL.map(|reason| {
            r.counter(
                "mqtls_connections_refused_total",
                "Connections refused before reaching the broker, by reason.",
                &[("reason", reason.label())],
            )
        });
        let upstream_failures = Failure::ALL.map(|failure| {
            r.counter(
                "mqtls_upstream_connect_failures_total",
                "Failed attempts to reach a broker address (a failover that then succeeds counts its failed attempts), by reason.",
                &[("reason", failure.label())],
            )
        });
        let broker_refusal_help = "Devices the broker refused with a CONNACK (passed on to the device), by its return code (3.1.x: 0x01-0x05) or reason code (5.0: 0x80 and up).";
        let broker_refusals = BROKER_REFUSAL_CODES
            .iter()
            .map(|(_, label)| *label)
            .chain(["other"])
            .map(|code| r.counter("mqtls_broker_refusals_total", broker_refusal_help, &[("code", code)]))
            .collect();
        let retired = [Retirement::Renewed, Retirement::Expiring].map(|why| {
            r.counter(
                "mqtls_connections_retired_total",
                "Connections closed at a safe point so that the device reconnects under its current certificate ([retire]), by why: renewed (a reload replaced the certificate) or expiring (its notAfter is near).",
                &[("reason", why.label())],
            )
        });
        let handshake = r.histogram(
            "mqtls_upstream_handshake_seconds",
            "Time to reach the broker (TCP connect and TLS handshake) for connections that succeeded.",
        );
        let duration = r.histogram(
            "mqtls_connection_duration_seconds",
            "Lifetime of proxied connections that have closed.",
        );
        let reload_help = "Configuration reloads (SIGHUP or a changed file), by result.";
        let reloads_success = r.counter("mqtls_config_reloads_total", reload_help, &[("result", "success")]);
        let reloads_failure = r.counter("mqtls_config_reloads_total", reload_help, &[("result", "failure")]);
        let last_reload_success = r.gauge(
            "mqtls_config_last_reload_success_timestamp_seconds",
            "When the configuration in force was loaded (start-up or the last successful reload).",
            &[],
        );
        let devices_configured = r.gauge("mqtls_devices", "Devices in the configuration in force.", &[]);
        Metrics {
            handle,
            accepted,
            refused,
            upstream_failures,
            broker_refusals,
            retired,
            handshake,
            duration,
            reloads_success,
            reloads_failure,
            last_reload_success,
            devices_configured,
            refusal_logs: LogBudget::new(std::time::Instant::now()),
            device_labels,
            aggregate: Arc::default(),
            devices: RwLock::default(),
        }
    }

    /// A connection was accepted.
    pub fn accepted(&self) {
        self.accepted.increment(1);
    }

    /// A connection was refused before its session started (see [`crate::refusal`], which calls this).
    pub(crate) fn refused(&self, reason: Reason) {
        self.refused[reason as usize].increment(1);
    }

    /// A connection was retired (`[retire]`).
    pub(crate) fn retired(&self, why: Retirement) {
        self.retired[why as usize].increment(1);
    }

    /// The broker refused a device with CONNACK `code`.
    pub(crate) fn broker_refused(&self, code: u8) {
        let at = BROKER_REFUSAL_CODES.iter().position(|&(c, _)| c == code);
        self.broker_refusals[at.unwrap_or(BROKER_REFUSAL_CODES.len())].increment(1);
    }

    /// The log budget refusals write within.
    pub(crate) fn refusal_logs(&self) -> &LogBudget {
        &self.refusal_logs
    }

    /// One attempt to reach a broker address failed.
    pub(crate) fn upstream_failure(&self, failure: Failure) {
        self.upstream_failures[failure as usize].increment(1);
    }

    /// The broker was reached in `took`.
    pub fn upstream_reached(&self, took: Duration) {
        self.handshake.record(took.as_secs_f64());
    }

    /// A proxied connection closed after `lasted`.
    pub fn connection_closed(&self, lasted: Duration) {
        self.duration.record(lasted.as_secs_f64());
    }

    /// A reload ended; on success the devices of the new generation are already installed.
    pub fn reloaded(&self, ok: bool) {
        if ok {
            self.reloads_success.increment(1);
            self.mark_loaded();
        } else {
            self.reloads_failure.increment(1);
        }
    }

    /// Records "now" as the time the configuration in force was loaded.
    pub fn mark_loaded(&self) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        self.last_reload_success.set(now.as_secs_f64());
    }

    /// Makes `table` the devices that per-device series are exported for. Counters of devices that keep
    /// their name carry over; a removed device's series go, once its last connection has closed.
    pub fn install_devices(&self, table: &DeviceTable) {
        let mut series = self.devices.write().unwrap_or_else(|e| e.into_inner());
        series.current = table
            .all()
            .map(|d| (d.name.clone(), d.identity.summary.not_after))
            .collect();
        let series = &mut *series;
        let current: std::collections::HashSet<&Arc<str>> = series.current.iter().map(|(n, _)| n).collect();
        series
            .stats
            .retain(|name, stats| current.contains(name) || stats.is_active());
        for (name, _) in &series.current {
            series.stats.entry(name.clone()).or_default();
        }
        self.devices_configured.set(table.devices().len() as f64);
    }

    /// The live counters a connection of device `name` updates.
    pub fn device(&self, name: &Arc<str>) -> Arc<DeviceStats> {
        if !self.device_labels {
            return self.aggregate.clone();
        }
        if let Some(s) = self.devices.read().unwrap_or_else(|e| e.into_inner()).stats.get(name) {
            return s.clone();
        }
        // A connection that picked its device just before a reload removed it.
        let mut series = self.devices.write().unwrap_or_else(|e| e.into_inner());
        series.stats.entry(name.clone()).or_default().clone()
    }

    /// Drains histogram samples into their buckets; must run regularly, or samples pile up (see
    /// [`Metrics::keep_up`], which the proxy runs).
    pub(crate) fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Runs `upkeep` every few seconds, forever: with or without a scrape endpoint, a
    /// daemon that records a sample per connection must not keep them all.
    pub async fn keep_up(self: Arc<Self>) {
        let mut every = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            every.tick().await;
            self.upkeep();
            // A window of refusal logs that ended in silence still owes its summary.
            refusal::write_summaries(self.refusal_logs.roll(std::time::Instant::now()));
        }
    }

    /// The whole exposition, in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = self.handle.render();
        self.render_devices(&mut out);
        process::render(&mut out);
        out
    }

    fn render_devices(&self, out: &mut String) {
        let series = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let active_help = "Connections currently proxied to the broker.";
        let bytes_help = "Bytes passed through, by direction (to_broker: from the device; to_device: from the broker).";
        let expiry_help = "When the device's certificate expires (notAfter), as a Unix timestamp.";
        if !self.device_labels {
            let s = &self.aggregate;
            family(out, "mqtls_connections_active", "gauge", active_help);
            sample(out, "mqtls_connections_active", &[], s.active.load(Ordering::Relaxed));
            family(out, "mqtls_bytes_total", "counter", bytes_help);
            sample(
                out,
                "mqtls_bytes_total",
                &[("direction", "to_broker")],
                s.to_broker.load(Ordering::Relaxed),
            );
            sample(
                out,
                "mqtls_bytes_total",
                &[("direction", "to_device")],
                s.to_device.load(Ordering::Relaxed),
            );
            if let Some(earliest) = series.current.iter().map(|(_, t)| *t).min() {
                family(
                    out,
                    "mqtls_device_cert_expiry_timestamp_seconds",
                    "gauge",
                    "When the first device certificate to expire expires (notAfter), as a Unix timestamp.",
                );
                sample(
                    out,
                    "mqtls_device_cert_expiry_timestamp_seconds",
                    &[],
                    unix_seconds(earliest),
                );
            }
            return;
        }
        // Configured devices in order, then removed ones that still have connections open.
        let mut names: Vec<&Arc<str>> = series.current.iter().map(|(n, _)| n).collect();
        let configured: std::collections::HashSet<&Arc<str>> = names.iter().copied().collect();
        let mut retired: Vec<&Arc<str>> = series
            .stats
            .iter()
            .filter(|(n, s)| s.is_active() && !configured.contains(n))
            .map(|(n, _)| n)
            .collect();
        retired.sort();
        names.extend(retired);
        let stats = |n: &Arc<str>| series.stats.get(n).cloned().unwrap_or_default();

        family(out, "mqtls_connections_active", "gauge", active_help);
        for n in &names {
            sample(
                out,
                "mqtls_connections_active",
                &[("device", n)],
                stats(n).active.load(Ordering::Relaxed),
            );
        }
        family(out, "mqtls_bytes_total", "counter", bytes_help);
        for n in &names {
            let s = stats(n);
            let to_broker = s.to_broker.load(Ordering::Relaxed);
            let to_device = s.to_device.load(Ordering::Relaxed);
            sample(
                out,
                "mqtls_bytes_total",
                &[("device", n), ("direction", "to_broker")],
                to_broker,
            );
            sample(
                out,
                "mqtls_bytes_total",
                &[("device", n), ("direction", "to_device")],
                to_device,
            );
        }
        family(out, "mqtls_device_cert_expiry_timestamp_seconds", "gauge", expiry_help);
        for (n, not_after) in &series.current {
            sample(
                out,
                "mqtls_device_cert_expiry_timestamp_seconds",
                &[("device", n)],
                unix_seconds(*not_after),
            );
        }
    }
}

/// Registers series on a recorder with their HELP text.
struct Registrar<'a>(&'a metrics_exporter_prometheus::PrometheusRecorder);

const METADATA: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

impl Registrar<'_> {
    fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
        Key::from_parts(name, labels.iter().map(|(k, v)| Label::new(*k, *v)).collect::<Vec<_>>())
    }

    fn counter(&self, name: &'static str, help: &'static str, labels: &[(&'static str, &'static str)]) -> Counter {
        self.0.describe_counter(name.into(), None, help.into());
        let c = self.0.register_counter(&Self::key(name, labels), &METADATA);
        // Registered series are exported from the start, at zero, so that rate() sees the first one.
        c.increment(0);
        c
    }

    fn gauge(&self, name: &'static str, help: &'static str, labels: &[(&'static str, &'static str)]) -> Gauge {
        self.0.describe_gauge(name.into(), None, help.into());
        self.0.register_gauge(&Self::key(name, labels), &METADATA)
    }

    fn histogram(&self, name: &'static str, help: &'static str) -> Histogram {
        self.0.describe_histogram(name.into(), None, help.into());
        self.0.register_histogram(&Self::key(name, &[]), &METADATA)
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Writes the HELP and TYPE lines of a family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Writes one sample line; label values are escaped as the text format requires.
fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"");
            for c in v.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '"' => out.push_str("\\\""),
                    '\n' => out.push_str("\\n"),
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_upstream_failure_has_its_own_counter() {
        for (i, failure) in Failure::ALL.into_iter().enumerate() {
            assert_eq!(failure as usize, i, "{failure:?} out of place in Failure::ALL");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        sample(&mut out, "m", &[("device", "a\"b\\c\nd")], 1);
        assert_eq!(out, "m{device=\"a\\\"b\\\\c\\nd\"} 1\n");
    }

    #[test]
    fn registered_series_show_at_zero_with_help() {
        let m = Metrics::new(true);
        m.refused(Reason::Busy);
        m.upstream_failure(Failure::Tls);
        m.upstream_reached(Duration::from_millis(3));
        let text = m.render();
        assert!(text.contains("# HELP mqtls_connections_accepted_total "), "{text}");
        assert!(text.contains("mqtls_connections_accepted_total 0"), "{text}");
        assert!(
            text.contains("mqtls_connections_refused_total{reason=\"busy\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mqtls_connections_refused_total{reason=\"unknown_device\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("mqtls_upstream_connect_failures_total{reason=\"tls\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mqtls_upstream_handshake_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(text.contains("mqtls_build_info{version=\""), "{text}");
        for name in NAMES {
            let shown = text.lines().any(|l| l.starts_with(&format!("# TYPE {name} ")));
            let device_family = name.starts_with("mqtls_connections_active")
                || name.starts_with("mqtls_bytes")
                || name.starts_with("mqtls_device_cert");
            assert!(shown || device_family, "{name} missing:\n{text}");
        }
    }

    #[test]
    fn device_counters_fold_into_one_series_without_labels() {
        let m = Metrics::new(false);
        let a = m.device(&Arc::from("a"));
        let b = m.device(&Arc::from("b"));
        a.add_to_broker(5);
        b.add_to_broker(7);
        let _open = b.open();
        let text = m.render();
        assert!(text.contains("mqtls_bytes_total{direction=\"to_broker\"} 12"), "{text}");
        assert!(text.contains("mqtls_connections_active 1"), "{text}");
        assert!(!text.contains("device="), "{text}");
    }
}
