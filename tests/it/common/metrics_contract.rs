//! What mqtls exports on `/metrics`, and a check that PromQL written elsewhere (alert rules, the Grafana
//! dashboard) uses only those metrics, labels and label values.
//!
//! The exports are held as a Prometheus text exposition, the format `/metrics` answers in, so the same
//! check can run against [`CONTRACT`] (written by hand from the design notes) or against a live scrape:
//! `Exposition::parse(&scraped_text)`. A live scrape lists a labelled series only once it exists, so every
//! known `reason`, `direction` and `result` must be exported from the start (at 0) for it to pass.

use std::collections::{BTreeMap, BTreeSet};

/// The metrics mqtls exports, with every label and every value of each closed label set.
pub const CONTRACT: &str = r#"
# TYPE mqtls_build_info gauge
mqtls_build_info{version="0.1.0"} 1
# TYPE mqtls_connections_accepted_total counter
mqtls_connections_accepted_total 0
# TYPE mqtls_connections_active gauge
mqtls_connections_active{device="boiler-1"} 0
# TYPE mqtls_connections_refused_total counter
mqtls_connections_refused_total{reason="unknown_device"} 0
mqtls_connections_refused_total{reason="broker_unreachable"} 0
mqtls_connections_refused_total{reason="bad_connect"} 0
mqtls_connections_refused_total{reason="connect_timeout"} 0
mqtls_connections_refused_total{reason="busy"} 0
mqtls_connections_refused_total{reason="source_limit"} 0
mqtls_connections_refused_total{reason="client_id_spoofed"} 0
mqtls_connections_refused_total{reason="unsupported_protocol"} 0
mqtls_connections_refused_total{reason="tls_on_plain_port"} 0
mqtls_connections_refused_total{reason="source_connections"} 0
mqtls_connections_refused_total{reason="source_rate"} 0
mqtls_connections_refused_total{reason="broker_refused"} 0
mqtls_connections_refused_total{reason="broker_closed"} 0
mqtls_connections_refused_total{reason="rewrite_failed"} 0
# TYPE mqtls_upstream_connect_failures_total counter
mqtls_upstream_connect_failures_total{reason="resolve"} 0
mqtls_upstream_connect_failures_total{reason="connect"} 0
mqtls_upstream_connect_failures_total{reason="tls"} 0
mqtls_upstream_connect_failures_total{reason="handshake_timeout"} 0
mqtls_upstream_connect_failures_total{reason="queue_timeout"} 0
mqtls_upstream_connect_failures_total{reason="unavailable"} 0
# TYPE mqtls_connections_retired_total counter
mqtls_connections_retired_total{reason="renewed"} 0
mqtls_connections_retired_total{reason="expiring"} 0
# TYPE mqtls_broker_refusals_total counter
mqtls_broker_refusals_total{code="0x01"} 0
mqtls_broker_refusals_total{code="0x02"} 0
mqtls_broker_refusals_total{code="0x03"} 0
mqtls_broker_refusals_total{code="0x04"} 0
mqtls_broker_refusals_total{code="0x05"} 0
mqtls_broker_refusals_total{code="0x80"} 0
mqtls_broker_refusals_total{code="0x81"} 0
mqtls_broker_refusals_total{code="0x82"} 0
mqtls_broker_refusals_total{code="0x83"} 0
mqtls_broker_refusals_total{code="0x84"} 0
mqtls_broker_refusals_total{code="0x85"} 0
mqtls_broker_refusals_total{code="0x86"} 0
mqtls_broker_refusals_total{code="0x87"} 0
mqtls_broker_refusals_total{code="0x88"} 0
mqtls_broker_refusals_total{code="0x89"} 0
mqtls_broker_refusals_total{code="0x8a"} 0
mqtls_broker_refusals_total{code="0x8c"} 0
mqtls_broker_refusals_total{code="0x90"} 0
mqtls_broker_refusals_total{code="0x95"} 0
mqtls_broker_refusals_total{code="0x97"} 0
mqtls_broker_refusals_total{code="0x99"} 0
mqtls_broker_refusals_total{code="0x9a"} 0
mqtls_broker_refusals_total{code="0x9b"} 0
mqtls_broker_refusals_total{code="0x9c"} 0
mqtls_broker_refusals_total{code="0x9d"} 0
mqtls_broker_refusals_total{code="0x9f"} 0
mqtls_broker_refusals_total{code="other"} 0
# TYPE mqtls_upstream_handshake_seconds histogram
mqtls_upstream_handshake_seconds_bucket{le="0.01"} 0
mqtls_upstream_handshake_seconds_bucket{le="+Inf"} 0
mqtls_upstream_handshake_seconds_sum 0
mqtls_upstream_handshake_seconds_count 0
# TYPE mqtls_connection_duration_seconds histogram
mqtls_connection_duration_seconds_bucket{le="1"} 0
mqtls_connection_duration_seconds_bucket{le="+Inf"} 0
mqtls_connection_duration_seconds_sum 0
mqtls_connection_duration_seconds_count 0
# TYPE mqtls_bytes_total counter
mqtls_bytes_total{device="boiler-1",direction="to_broker"} 0
mqtls_bytes_total{device="boiler-1",direction="to_device"} 0
# TYPE mqtls_device_cert_expiry_timestamp_seconds gauge
mqtls_device_cert_expiry_timestamp_seconds{device="boiler-1"} 1900000000
# TYPE mqtls_config_reloads_total counter
mqtls_config_reloads_total{result="success"} 0
mqtls_config_reloads_total{result="failure"} 0
# TYPE mqtls_config_last_reload_success_timestamp_seconds gauge
mqtls_config_last_reload_success_timestamp_seconds 1700000000
# TYPE mqtls_devices gauge
mqtls_devices 1
"#;

/// Labels whose values are names chosen by the operator (devices, versions) rather than a fixed set.
const OPEN_LABELS: [&str; 2] = ["device", "version"];
/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];
/// Suffixes of the series a histogram is exposed as.
const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

/// One metric family: its type and, per label, the values seen.
#[derive(Debug, Default, Clone)]
pub struct Family {
    pub kind: String,
    pub labels: BTreeMap<String, BTreeSet<String>>,
}

/// A parsed text exposition: metric families by name.
#[derive(Debug, Default)]
pub struct Exposition {
    pub families: BTreeMap<String, Family>,
}

/// A metric name written in PromQL, with the label matchers that follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub metric: String,
    pub matchers: Vec<Matcher>,
}

/// `label op "value"` inside `{...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher {
    pub label: String,
    pub op: String,
    pub value: String,
}

impl Exposition {
    /// Parses `# TYPE` lines and sample lines (`name{label="value",...} number`).
    pub fn parse(text: &str) -> Exposition {
        let mut e = Exposition::default();
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    e.families.entry(name.to_string()).or_default().kind = kind.to_string();
                }
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let name_end = line.find(|c: char| c == '{' || c.is_whitespace()).unwrap_or(line.len());
            let sample = &line[..name_end];
            let family = e.family_name(sample).unwrap_or(sample).to_string();
            let matchers = parse_matchers(&line[name_end..]).unwrap_or_default();
            let f = e.families.entry(family).or_default();
            for m in matchers {
                f.labels.entry(m.label).or_default().insert(m.value);
            }
        }
        e
    }

    /// The family a series name belongs to: itself, or a histogram's `_bucket`, `_sum`, `_count`.
    pub fn family_name<'a>(&self, series: &'a str) -> Option<&'a str> {
        if self.families.contains_key(series) {
            return Some(series);
        }
        HISTOGRAM_SUFFIXES.iter().find_map(|suffix| {
            let base = series.strip_suffix(suffix)?;
            (self.families.get(base)?.kind == "histogram").then_some(base)
        })
    }

    /// Every problem with the `mqtls_*` references in `promql`, each starting with `what` (where it was
    /// found): unknown metrics, labels a metric does not have, values outside a closed label set, and
    /// grouping labels none of the referenced metrics has.
    pub fn check(&self, what: &str, promql: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let mut known_labels: BTreeSet<String> = TARGET_LABELS.iter().map(|l| l.to_string()).collect();
        for r in references(promql) {
            let Some(family_name) = self.family_name(&r.metric) else {
                problems.push(format!("{what}: `{}` is not a metric mqtls exports", r.metric));
                continue;
            };
            let family = &self.families[family_name];
            known_labels.extend(family.labels.keys().cloned());
            for m in &r.matchers {
                problems.extend(self.matcher_problem(what, &r.metric, family, m));
            }
        }
        for label in grouping_labels(promql) {
            if !known_labels.contains(&label) {
                problems.push(format!(
                    "{what}: groups by `{label}`, which none of its mqtls metrics has"
                ));
            }
        }
        problems
    }

    fn matcher_problem(&self, what: &str, metric: &str, family: &Family, m: &Matcher) -> Option<String> {
        let is_bucket = metric.ends_with("_bucket") && family.kind == "histogram";
        if m.label == "le" && is_bucket || TARGET_LABELS.contains(&m.label.as_str()) {
            return None;
        }
        let Some(values) = family.labels.get(&m.label) else {
            return Some(format!("{what}: `{metric}` has no label `{}`", m.label));
        };
        if OPEN_LABELS.contains(&m.label.as_str()) || m.value.contains('$') {
            return None;
        }
        let literals: Vec<&str> = match m.op.as_str() {
            "=" | "!=" => vec![m.value.as_str()],
            // A regex: check the alternatives that are plain words.
            _ => m
                .value
                .split('|')
                .filter(|a| a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                .collect(),
        };
        let unknown: Vec<&str> = literals.into_iter().filter(|v| !values.contains(*v)).collect();
        (!unknown.is_empty()).then(|| {
            format!(
                "{what}: `{metric}` {}{}{:?}: mqtls exports no such value (known: {values:?})",
                m.label, m.op, unknown
            )
        })
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Every `mqtls_*` metric name in `promql` with its label matchers.
pub fn references(promql: &str) -> Vec<Reference> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(found) = promql[i..].find("mqtls_") {
        let start = i + found;
        let boundary = promql[..start]
            .chars()
            .next_back()
            .is_none_or(|c| !is_ident(c) && c != '$' && c != '.');
        let end = promql[start..]
            .find(|c: char| !is_ident(c))
            .map_or(promql.len(), |n| start + n);
        i = end;
        if !boundary {
            continue;
        }
        let metric = promql[start..end].to_string();
        let after = promql[end..].trim_start();
        let matchers = if after.starts_with('{') {
            parse_matchers(after).unwrap_or_default()
        } else {
            Vec::new()
        };
        out.push(Reference { metric, matchers });
    }
    out
}

/// Parses `{label op "value", ...}` at the start of `text`.
fn parse_matchers(text: &str) -> Option<Vec<Matcher>> {
    let mut rest = text.trim_start().strip_prefix('{')?;
    let mut out = Vec::new();
    loop {
        rest = rest.trim_start().trim_start_matches(',').trim_start();
        if rest.starts_with('}') {
            return Some(out);
        }
        let label_end = rest.find(|c: char| !is_ident(c))?;
        let label = rest[..label_end].to_string();
        rest = rest[label_end..].trim_start();
        let op = ["=~", "!~", "!=", "="].into_iter().find(|op| rest.starts_with(op))?;
        rest = rest[op.len()..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let close = loop {
            match chars.next()? {
                (_, '\\') => value.push(chars.next()?.1),
                (n, '"') => break n,
                (_, c) => value.push(c),
            }
        };
        rest = &rest[close + 1..];
        out.push(Matcher {
            label,
            op: op.to_string(),
            value,
        });
    }
}

/// Labels named in `by (...)`, `without (...)`, `on (...)`, `ignoring (...)`, `group_left (...)`,
/// `group_right (...)`, and the label argument of Grafana's `label_values(metric, label)`.
pub fn grouping_labels(promql: &str) -> Vec<String> {
    let mut out = Vec::new();
    for keyword in ["by", "without", "on", "ignoring", "group_left", "group_right"] {
        let mut i = 0;
        while let Some(found) = promql[i..].find(keyword) {
            let start = i + found;
            i = start + keyword.len();
            let before_ok = promql[..start].chars().next_back().is_none_or(|c| !is_ident(c));
            let after = promql[i..].trim_start();
            if !before_ok || !after.starts_with('(') || promql[i..].starts_with(|c: char| is_ident(c)) {
                continue;
            }
            let inner = &after[1..after.find(')').unwrap_or(after.len())];
            out.extend(
                inner
                    .split(',')
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string),
            );
        }
    }
    if let Some(args) = promql.trim().strip_prefix("label_values(") {
        if let Some((_, label)) = args.trim_end().trim_end_matches(')').rsplit_once(',') {
            out.push(label.trim().to_string());
        }
    }
    out
}
