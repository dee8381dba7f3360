//! The gateway's inventory of identities: which certificates and keys it holds, and which of them need
//! attention. These are the rows that `mqtls check` and `mqtls certs list` print.
//!
//! Rows come from a loaded [`DeviceTable`] (`mqtls check`: the identities the daemon would serve, each
//! with its match rules), from a [`Config`] whose identity files are read here without building the
//! table, or from a device directory alone (`mqtls certs list --dir`). Each row carries [`Flag`]s for
//! what an operator should act on: an expired or expiring certificate, a private key that others can
//! read, a file that cannot be read, a device still waiting for its certificate.
//!
//! Only the reporting commands use this module; the daemon's connection path never does, and
//! [`crate::device`] knows nothing of it.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use crate::config::{
    device_dir_entries, pending_device, Config, PendingDevice, DEVICE_DIR_CERT, DEVICE_DIR_KEY, DEVICE_DIR_SETTINGS,
    FALLBACK_NAME,
};
use crate::device::{presented_warnings, Device, DeviceTable};
use crate::rewrite::{Change, Values};
use crate::tls::{key_mode_exposure, key_mode_is_open, read_certs, CertSummary};

/// A certificate that expires within this many days is flagged EXPIRES SOON.
pub const DEFAULT_EXPIRY_WARNING_DAYS: u32 = 30;

/// Something about an identity that an operator should know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Flag {
    /// The certificate's notAfter has passed: the broker refuses it.
    Expired,
    /// The certificate expires within the warning threshold.
    ExpiresSoon,
    /// Group or others can read the private key (listed even when `upstream.allow_readable_keys` allows it).
    KeyReadableByOthers,
    /// A key and a CSR, no certificate yet: not served.
    Pending,
    /// The certificate or key cannot be read or parsed.
    Invalid,
}

impl Flag {
    /// The text printed in the FLAGS column.
    fn label(self) -> &'static str {
        match self {
            Flag::Expired => "EXPIRED",
            Flag::ExpiresSoon => "EXPIRES SOON",
            Flag::KeyReadableByOthers => "KEY READABLE BY OTHERS",
            Flag::Pending => "PENDING",
            Flag::Invalid => "INVALID",
        }
    }

    /// Whether the flag calls for action (`mqtls certs list` exits 3). A pending device is waiting for
    /// someone else's CA, which is normal.
    fn needs_attention(self) -> bool {
        self != Flag::Pending
    }
}

/// One identity as `mqtls certs list` and `mqtls check` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRow {
    /// The device's name (`fallback` for the fallback identity).
    pub name: String,
    /// The MQTT client id the device is matched by, if any.
    pub client_id: Option<String>,
    /// The certificate file (none for a pending device).
    pub cert: Option<PathBuf>,
    /// The private key file.
    pub key: Option<PathBuf>,
    /// The leaf certificate's details, when it could be read.
    pub summary: Option<CertSummary>,
    /// Whole days until notAfter (negative once expired).
    pub days_left: Option<i64>,
    /// The key file's permission bits.
    pub key_mode: Option<u32>,
    /// What needs attention.
    pub flags: Vec<Flag>,
    /// Why the identity is INVALID.
    pub problem: Option<String>,
    /// The match rules (for `mqtls check`).
    pub rules: Option<String>,
    /// What its CONNECT presents to the broker (for `mqtls check`): the client id, and the user name and
    /// password where a rewrite changes them.
    pub to_broker: Option<String>,
}

impl IdentityRow {
    /// A row for a certificate already parsed; flags EXPIRED/EXPIRES SOON against `now` and
    /// `soon_days`, and KEY READABLE BY OTHERS from `key_mode`.
    fn new(name: &str, summary: CertSummary, key_mode: Option<u32>, now: SystemTime, soon_days: u32) -> Self {
        let days_left = days_between(now, summary.not_after);
        let mut flags = Vec::new();
        if summary.not_after <= now {
            flags.push(Flag::Expired);
        } else if days_left < i64::from(soon_days) {
            flags.push(Flag::ExpiresSoon);
        }
        if key_mode.is_some_and(key_mode_is_open) {
            flags.push(Flag::KeyReadableByOthers);
        }
        IdentityRow {
            summary: Some(summary),
            days_left: Some(days_left),
            key_mode,
            flags,
            ..IdentityRow::empty(name)
        }
    }

    /// A device directory entry waiting for its certificate.
    fn pending(p: &PendingDevice) -> Self {
        let key_mode = file_mode(&p.key);
        let mut flags = vec![Flag::Pending];
        if key_mode.is_some_and(key_mode_is_open) {
            flags.push(Flag::KeyReadableByOthers);
        }
        IdentityRow {
            client_id: Some(dir_client_id(&p.dir, &p.name)),
            key: Some(p.key.clone()),
            key_mode,
            flags,
            ..IdentityRow::empty(&p.name)
        }
    }

    /// Reads `cert` and the permissions of `key` from disk.
    fn inspect(name: &str, cert: &Path, key: &Path, now: SystemTime, soon_days: u32) -> Self {
        let key_mode = file_mode(key);
        let mut row = match read_leaf(cert) {
            Ok(summary) => IdentityRow::new(name, summary, key_mode, now, soon_days),
            Err(problem) => IdentityRow {
                key_mode,
                flags: vec![Flag::Invalid],
                problem: Some(problem),
                ..IdentityRow::empty(name)
            },
        };
        if key_mode.is_none() && row.problem.is_none() {
            row.flags.push(Flag::Invalid);
            row.problem = Some(format!("{}: cannot read the private key", key.display()));
        }
        row.cert = Some(cert.to_path_buf());
        row.key = Some(key.to_path_buf());
        row
    }

    /// A row that knows only its name.
    fn empty(name: &str) -> Self {
        IdentityRow {
            name: name.to_string(),
            client_id: None,
            cert: None,
            key: None,
            summary: None,
            days_left: None,
            key_mode: None,
            flags: Vec::new(),
            problem: None,
            rules: None,
            to_broker: None,
        }
    }

    /// The same row with the client id the device is matched by.
    fn with_client_id(mut self, client_id: Option<String>) -> Self {
        self.client_id = client_id;
        self
    }

    /// The same row with the match rules set (for `mqtls check`).
    fn with_rules(mut self, rules: String) -> Self {
        self.rules = Some(rules);
        self
    }

    /// Whether any flag calls for action.
    pub fn needs_attention(&self) -> bool {
        self.flags.iter().any(|f| f.needs_attention())
    }

    fn cell(&self, column: Column) -> String {
        let dash = || "-".to_string();
        let summary = self.summary.as_ref();
        match column {
            Column::Name => self.name.clone(),
            Column::ClientId => self.client_id.clone().unwrap_or_else(dash),
            Column::NotAfter => summary.map_or_else(dash, |s| rfc3339(s.not_after)),
            Column::DaysLeft => self.days_left.map_or_else(dash, |d| d.to_string()),
            Column::Subject => summary.map_or_else(dash, |s| s.subject.clone()),
            Column::Issuer => summary.map_or_else(dash, |s| s.issuer.clone()),
            Column::Serial => summary.map_or_else(dash, |s| serial_hex(&s.serial)),
            Column::Flags => self.flags_cell().unwrap_or_else(dash),
            Column::Match => self.rules.clone().unwrap_or_else(dash),
            Column::ToBroker => self.to_broker.clone().unwrap_or_else(dash),
        }
    }

    /// The flags' labels, INVALID with its problem; `None` without flags.
    fn flags_cell(&self) -> Option<String> {
        let labels: Vec<String> = self
            .flags
            .iter()
            .map(|f| match (f, &self.problem) {
                (Flag::Invalid, Some(p)) => format!("INVALID: {p}"),
                _ => f.label().to_string(),
            })
            .collect();
        (!labels.is_empty()).then(|| labels.join(", "))
    }
}

// ---------------------------------------------------------------------------------------------------------
// Where rows come from

/// A device directory that cannot be listed.
#[derive(Debug, thiserror::Error)]
#[error("{}: cannot read the directory: {source}", path.display())]
pub struct UnreadableDir {
    /// The directory.
    pub path: PathBuf,
    /// Why it cannot be listed.
    pub source: std::io::Error,
}

/// Every identity a configuration names: its devices, the fallback, and pending directory entries.
pub fn rows_from_config(config: &Config, now: SystemTime, soon_days: u32) -> Vec<IdentityRow> {
    let devices = config.devices.iter().map(|d| {
        IdentityRow::inspect(&d.name, &d.identity.cert, &d.identity.key, now, soon_days)
            .with_client_id(d.client_id.clone())
    });
    let fallback = config
        .fallback
        .iter()
        .map(|f| IdentityRow::inspect(FALLBACK_NAME, &f.identity.cert, &f.identity.key, now, soon_days));
    let pending = config.pending.iter().map(IdentityRow::pending);
    devices.chain(fallback).chain(pending).collect()
}

/// Every entry of a device directory, read without a configuration.
pub fn rows_from_dir(dir: &Path, now: SystemTime, soon_days: u32) -> Result<Vec<IdentityRow>, UnreadableDir> {
    let paths = device_dir_entries(dir).map_err(|source| UnreadableDir {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(paths.iter().map(|p| dir_row(p, now, soon_days)).collect())
}

fn dir_row(entry: &Path, now: SystemTime, soon_days: u32) -> IdentityRow {
    if let Some(p) = pending_device(entry) {
        return IdentityRow::pending(&p);
    }
    let name = entry.file_name().unwrap_or_default().to_string_lossy();
    IdentityRow::inspect(
        &name,
        &entry.join(DEVICE_DIR_CERT),
        &entry.join(DEVICE_DIR_KEY),
        now,
        soon_days,
    )
    .with_client_id(Some(dir_client_id(entry, &name)))
}

/// The client id of a device directory entry: `client_id` in its `device.toml`, else the entry's name
/// (as the configuration reads it). An unreadable `device.toml` is the configuration's to report.
fn dir_client_id(entry: &Path, name: &str) -> String {
    fs::read_to_string(entry.join(DEVICE_DIR_SETTINGS))
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .and_then(|t| t.get("client_id")?.as_str().map(String::from))
        .unwrap_or_else(|| name.to_string())
}

/// One row per identity of a loaded table, with its match rules: the devices, the fallback, then the
/// pending device directory entries.
fn rows_from_table(table: &DeviceTable, now: SystemTime) -> Vec<IdentityRow> {
    let soon = DEFAULT_EXPIRY_WARNING_DAYS;
    let loaded = table.all().map(|d| {
        let id = &d.identity;
        let row = IdentityRow::new(&d.name, id.summary.clone(), Some(id.key_mode), now, soon);
        IdentityRow {
            to_broker: Some(to_broker(d)),
            ..row.with_rules(d.rules.to_string())
        }
    });
    loaded.chain(table.pending().iter().map(IdentityRow::pending)).collect()
}

/// What a device's CONNECT presents to the broker: `client_id=esp-a`, `client_id=(as sent)`,
/// `client_id=esp-{source} username=(dropped) password=(from file)`.
fn to_broker(d: &Device) -> String {
    let client_id = match (&d.presents, &d.rules.client_id) {
        (Some(Values::Fixed(id)), _) => id.clone(),
        (Some(Values::Pattern(p)), _) => p.to_string(),
        (None, Some(id)) => id.clone(),
        (None, None) => "(as sent)".to_string(),
    };
    let mut text = format!("client_id={client_id}");
    if let Some(r) = &d.rewrite {
        match &r.username {
            Change::Keep => {}
            Change::Drop => text.push_str(" username=(dropped)"),
            Change::Set(t) => text.push_str(&format!(" username={t}")),
        }
        match &r.password {
            Change::Keep => {}
            Change::Drop => text.push_str(" password=(dropped)"),
            Change::Set(_) => text.push_str(" password=(from file)"),
        }
    }
    text
}

fn read_leaf(path: &Path) -> Result<CertSummary, String> {
    let chain = read_certs("cert", path).map_err(|e| e.to_string())?;
    CertSummary::parse(&chain[0]).map_err(|e| format!("{}: {e}", path.display()))
}

fn file_mode(path: &Path) -> Option<u32> {
    fs::metadata(path).ok().map(|m| m.permissions().mode() & 0o777)
}

// ---------------------------------------------------------------------------------------------------------
// `mqtls check`

/// The table of a loaded configuration's devices, their certificates, flags and rules, as printed by
/// `mqtls check`.
pub fn describe(table: &DeviceTable, now: SystemTime) -> String {
    render_table(&rows_from_table(table, now), CHECK_COLUMNS)
}

/// Warnings about a loaded configuration whose entries are valid but weak (e.g. a device matched by
/// client id alone) or need attention soon, as printed by `mqtls check`.
pub fn warnings(table: &DeviceTable, now: SystemTime) -> Vec<String> {
    let devices = table.devices().iter().flat_map(|d| device_warnings(d, now));
    let rows = rows_from_table(table, now);
    let identities = rows.iter().flat_map(|r| row_warnings(r, now));
    let pending = table.pending().iter().map(PendingDevice::warning);
    let fallback = fallback_warnings(table);
    let presented = presented_warnings(table);
    devices
        .chain(identities)
        .chain(pending)
        .chain(fallback)
        .chain(presented)
        .collect()
}

/// Device names a warning lists before it says "and N more".
const NAMED_IN_WARNING: usize = 5;

/// What the fallback exposes: an identity for every client id no device names.
fn fallback_warnings(table: &DeviceTable) -> Vec<String> {
    let Some(fallback) = table.fallback() else {
        return Vec::new();
    };
    let mut w = Vec::new();
    if fallback.rules.sources.is_empty() && fallback.rules.client_id_patterns.is_empty() {
        w.push(
            "the [fallback] identity serves any client id that no device names, from any address: anyone on the \
             LAN can present the client id of a device that reaches the broker some other way and take its session \
             there; narrow it with fallback.source and fallback.client_id, and give the fallback identity a narrow \
             ACL at the broker"
                .to_string(),
        );
    }
    let open: Vec<&str> = table
        .devices()
        .iter()
        .filter(|d| d.rules.sources.is_empty())
        .map(|d| &*d.name)
        .collect();
    if !open.is_empty() {
        let mut names = open
            .iter()
            .take(NAMED_IN_WARNING)
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ");
        if open.len() > NAMED_IN_WARNING {
            names.push_str(&format!(" and {} more", open.len() - NAMED_IN_WARNING));
        }
        w.push(format!(
            "a [fallback] is configured beside {} device(s) without a `source` rule ({names}): whoever reaches them \
             from anywhere gets their identity (a device's client id is never served by the fallback), and the \
             fallback takes every other client id; add `source` to each device",
            open.len()
        ));
    }
    w
}

fn device_warnings(d: &Device, now: SystemTime) -> Vec<String> {
    let mut w = Vec::new();
    if d.rules.client_id.is_some() && d.rules.sources.is_empty() {
        w.push(format!(
            "device \"{}\" is matched by client id alone: anyone on the LAN who sends that client id gets its identity; add `source`",
            d.name
        ));
    }
    if let Some(r) = &d.rewrite {
        if r.username == Change::Drop && matches!(r.password, Change::Set(_)) {
            w.push(format!(
                "device \"{}\": connect.password_file without a user name (connect.username = false): MQTT 3.1 and \
                 3.1.1 allow no password without one, so such devices are refused (rewrite_failed); only MQTT 5 \
                 devices are served",
                d.name
            ));
        }
    }
    let not_after = d.identity.summary.not_after;
    if not_after <= now {
        w.push(format!(
            "device \"{}\": certificate expired ({})",
            d.name,
            expiry(not_after, now)
        ));
    }
    w
}

fn row_warnings(row: &IdentityRow, now: SystemTime) -> Vec<String> {
    let mut w = Vec::new();
    if row.flags.contains(&Flag::ExpiresSoon) {
        let date = row
            .summary
            .as_ref()
            .map(|s| expiry(s.not_after, now))
            .unwrap_or_default();
        w.push(format!("device \"{}\": certificate expires soon ({date})", row.name));
    }
    if row.flags.contains(&Flag::KeyReadableByOthers) {
        let allowed = match row.flags.contains(&Flag::Pending) {
            true => "it will be refused once the certificate arrives unless upstream.allow_readable_keys is set",
            false => "allowed by upstream.allow_readable_keys",
        };
        let mode = row.key_mode.unwrap_or_default();
        w.push(format!(
            "device \"{}\": its private key is {} (mode {mode:04o}; {allowed})",
            row.name,
            key_mode_exposure(mode),
        ));
    }
    w
}

/// "2027-03-01T12:00:00Z (96d left)" style text.
fn expiry(not_after: SystemTime, now: SystemTime) -> String {
    let date = rfc3339(not_after);
    match not_after.duration_since(now) {
        Ok(left) => format!("{date} ({}d left)", left.as_secs() / 86_400),
        Err(_) => format!("{date} (EXPIRED)"),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Rendering

/// A column of the identity table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// The device's name.
    Name,
    /// The MQTT client id it is matched by.
    ClientId,
    /// notAfter, RFC 3339 in UTC.
    NotAfter,
    /// Whole days until notAfter.
    DaysLeft,
    /// The subject DN.
    Subject,
    /// The issuer DN.
    Issuer,
    /// The serial number in hex, as `openssl x509 -serial` prints it.
    Serial,
    /// The flags.
    Flags,
    /// The match rules.
    Match,
    /// What the CONNECT presents to the broker.
    ToBroker,
}

impl Column {
    fn header(self) -> &'static str {
        match self {
            Column::Name => "NAME",
            Column::ClientId => "CLIENT ID",
            Column::NotAfter => "NOT AFTER",
            Column::DaysLeft => "DAYS LEFT",
            Column::Subject => "SUBJECT",
            Column::Issuer => "ISSUER",
            Column::Serial => "SERIAL",
            Column::Flags => "FLAGS",
            Column::Match => "MATCH",
            Column::ToBroker => "TO BROKER",
        }
    }
}

/// The columns of `mqtls certs list`.
pub const LIST_COLUMNS: &[Column] = &[
    Column::Name,
    Column::ClientId,
    Column::NotAfter,
    Column::DaysLeft,
    Column::Subject,
    Column::Issuer,
    Column::Serial,
    Column::Flags,
];

/// The columns of `mqtls check` (the serial gives way to the match rules and what the broker sees).
const CHECK_COLUMNS: &[Column] = &[
    Column::Name,
    Column::NotAfter,
    Column::DaysLeft,
    Column::Subject,
    Column::Issuer,
    Column::Flags,
    Column::Match,
    Column::ToBroker,
];

/// An aligned text table of `rows` (a header line first); the last column is not padded.
pub fn render_table(rows: &[IdentityRow], columns: &[Column]) -> String {
    let header: Vec<String> = columns.iter().map(|c| c.header().to_string()).collect();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|&c| r.cell(c)).collect())
        .collect();
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| {
            cells
                .iter()
                .chain([&header])
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in [&header].into_iter().chain(&cells) {
        push_line(&mut out, line, &widths);
    }
    out
}

/// One table line: every cell but the last padded to its column's width.
fn push_line(out: &mut String, line: &[String], widths: &[usize]) {
    let last = line.len() - 1;
    for (i, cell) in line.iter().enumerate() {
        if i == last {
            out.push_str(cell);
        } else {
            out.push_str(&format!("{cell:w$}  ", w = widths[i]));
        }
    }
    out.push('\n');
}

#[derive(Serialize)]
struct JsonRow<'a> {
    name: &'a str,
    client_id: Option<&'a str>,
    cert: Option<&'a Path>,
    key: Option<&'a Path>,
    subject: Option<&'a str>,
    issuer: Option<&'a str>,
    serial: Option<String>,
    not_before: Option<String>,
    not_after: Option<String>,
    days_left: Option<i64>,
    key_mode: Option<String>,
    flags: &'a [Flag],
    problem: Option<&'a str>,
}

impl<'a> JsonRow<'a> {
    fn of(r: &'a IdentityRow) -> Self {
        let s = r.summary.as_ref();
        JsonRow {
            name: &r.name,
            client_id: r.client_id.as_deref(),
            cert: r.cert.as_deref(),
            key: r.key.as_deref(),
            subject: s.map(|s| s.subject.as_str()),
            issuer: s.map(|s| s.issuer.as_str()),
            serial: s.map(|s| serial_hex(&s.serial)),
            not_before: s.map(|s| rfc3339(s.not_before)),
            not_after: s.map(|s| rfc3339(s.not_after)),
            days_left: r.days_left,
            key_mode: r.key_mode.map(|m| format!("{m:04o}")),
            flags: &r.flags,
            problem: r.problem.as_deref(),
        }
    }
}

/// `rows` as a JSON array, one object per identity (for scripts and monitoring).
pub fn render_json(rows: &[IdentityRow]) -> String {
    let json: Vec<JsonRow<'_>> = rows.iter().map(JsonRow::of).collect();
    let mut text = serde_json::to_string_pretty(&json).unwrap_or_else(|_| "[]".into());
    text.push('\n');
    text
}

// ---------------------------------------------------------------------------------------------------------
// Dates and serials

/// Whole days from `now` to `then`, rounded towards minus infinity (an hour past expiry is day -1).
fn days_between(now: SystemTime, then: SystemTime) -> i64 {
    match then.duration_since(now) {
        Ok(left) => (left.as_secs() / 86_400) as i64,
        Err(past) => -((past.duration().as_secs() / 86_400) as i64) - 1,
    }
}

/// `2027-03-01T12:00:00Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A serial from [`CertSummary::serial`] (`0a:1b:...`) as `openssl x509 -serial` prints it (`A1B...`):
/// upper case, no separators, no leading zero bytes.
pub fn serial_hex(colon_hex: &str) -> String {
    let hex: String = colon_hex.split(':').collect::<String>().to_ascii_uppercase();
    let trimmed = hex.trim_start_matches("00");
    if trimmed.is_empty() {
        "00".into()
    } else {
        trimmed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_is_printed_like_openssl() {
        assert_eq!(serial_hex("00:8a:0b"), "8A0B");
        assert_eq!(serial_hex("7f:01"), "7F01");
        assert_eq!(serial_hex("00"), "00");
    }

    #[test]
    fn days_left_round_down_and_go_negative_after_expiry() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
        let day = std::time::Duration::from_secs(86_400);
        assert_eq!(days_between(now, now + day * 3 + day / 2), 3);
        assert_eq!(days_between(now, now - day / 24), -1);
        assert_eq!(days_between(now, now - day * 2 - day / 2), -3);
    }
}
