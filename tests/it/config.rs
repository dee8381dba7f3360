//! Configuration validation, "valid baseline, one change per case": a baseline configuration that loads
//! (with real certificates and keys from a throwaway PKI, so identity loading succeeds too) is changed in
//! exactly one place per case, and the error an operator reads must name the file, the key and the
//! reason. Every case loads the way `mqtls run` and `mqtls check` do: `mqtls::load` (the configuration,
//! then every certificate and key it names).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::common::pki::write_file;
use crate::common::Pki;
use mqtls::config::ConfigErrors;
use mqtls::{Config, Generation};

/// Valid as it stands. Relative paths resolve against the directory the file is written to, which holds
/// `ca.pem` and `devices/<name>/{cert,key}.pem` (see [`Fixture::new`]).
const BASELINE: &str = r#"[listen]
address = "127.0.0.1:1883"
connect_timeout = "10s"
max_connections = 100

[upstream]
address = "broker.example.com:8883"
ca_file = "ca.pem"
connect_timeout = "5s"

[[device]]
name = "boiler-1"
client_id = "boiler-1"
source = "192.168.10.21"
cert = "devices/boiler-1/cert.pem"
key = "devices/boiler-1/key.pem"

[[device]]
name = "boiler-2"
client_id = "boiler-2"
source = "192.168.10.0/24"
cert = "devices/boiler-2/cert.pem"
key = "devices/boiler-2/key.pem"

[[device]]
name = "meter-3"
client_id = "meter-3"
cert = "devices/meter-3/cert.pem"
key = "devices/meter-3/key.pem"
"#;

/// A temporary directory with the PKI files the baseline names, plus a few broken files for the cases.
struct Fixture {
    pki: Pki,
}

impl Fixture {
    fn new() -> Fixture {
        let pki = Pki::new();
        for name in ["boiler-1", "boiler-2", "meter-3"] {
            pki.client(name);
        }
        let dir = pki.dir();
        let key2 = std::fs::read(dir.join("devices/boiler-2/key.pem")).expect("read key");
        write_file(&dir.join("devices/boiler-2/key-0644.pem"), &key2, 0o644);
        write_file(&dir.join("devices/boiler-2/key-0640.pem"), &key2, 0o640);
        write_file(&dir.join("devices/boiler-2/key-0620.pem"), &key2, 0o620);
        write_file(&dir.join("not-pem.txt"), b"this is not a certificate\n", 0o644);
        write_file(&dir.join("not-a-key.pem"), b"this is not a key\n", 0o600);
        // A device directory whose only entry lacks its key.
        pki.client_in(&dir.join("fleet-broken/meter-9"), "meter-9");
        std::fs::remove_file(dir.join("fleet-broken/meter-9/key.pem")).expect("remove key");
        Fixture { pki }
    }

    fn dir(&self) -> &Path {
        self.pki.dir()
    }

    /// Writes `text` as `<dir>/mqtls.toml` and loads it as `mqtls run` does.
    fn load(&self, text: &str) -> (PathBuf, Result<(Config, Generation), ConfigErrors>) {
        let path = self.dir().join("mqtls.toml");
        std::fs::write(&path, text).expect("write config");
        (path.clone(), load(&path))
    }

    /// `{config}` -> the config file's path, `{dir}` -> the fixture directory.
    fn expand(&self, needle: &str, config: &Path, line: Option<usize>) -> String {
        let mut s = needle
            .replace("{config}", &config.display().to_string())
            .replace("{dir}", &self.dir().display().to_string());
        if let Some(line) = line {
            s = s.replace("{line}", &line.to_string());
        }
        s
    }
}

fn load(path: &Path) -> Result<(Config, Generation), ConfigErrors> {
    mqtls::load(path).map(|loaded| (loaded.config, loaded.generation))
}

fn refused(result: Result<(Config, Generation), ConfigErrors>) -> ConfigErrors {
    match result {
        Ok(_) => panic!("accepted, but should have been refused"),
        Err(e) => e,
    }
}

/// One edit of the baseline. Lines are matched whole, and must occur exactly once, so a case can never
/// silently stop changing anything.
enum Change {
    /// Replace a line with another.
    Set(&'static str, &'static str),
    /// Delete a line.
    Remove(&'static str),
    /// Insert a line after a line (`""`: at the very top).
    InsertAfter(&'static str, &'static str),
    /// Delete a table header and its keys (up to the next blank line).
    RemoveTable(&'static str),
    /// Add text at the end of the file.
    Append(&'static str),
}

impl Change {
    /// The changed text, and the 1-based line an inserted line landed on.
    fn apply(&self, base: &str) -> (String, Option<usize>) {
        let mut lines: Vec<&str> = base.lines().collect();
        let find = |lines: &[&str], wanted: &str| {
            let at: Vec<usize> = (0..lines.len()).filter(|&i| lines[i] == wanted).collect();
            assert_eq!(at.len(), 1, "the baseline must hold {wanted:?} exactly once");
            at[0]
        };
        let mut inserted = None;
        match *self {
            Change::Set(old, new) => {
                let i = find(&lines, old);
                lines[i] = new;
            }
            Change::Remove(old) => {
                let i = find(&lines, old);
                lines.remove(i);
            }
            Change::InsertAfter("", new) => {
                lines.insert(0, new);
                inserted = Some(1);
            }
            Change::InsertAfter(anchor, new) => {
                let i = find(&lines, anchor) + 1;
                lines.insert(i, new);
                inserted = Some(i + 1);
            }
            Change::RemoveTable(header) => {
                let start = find(&lines, header);
                let end = (start..lines.len())
                    .find(|&i| lines[i].is_empty())
                    .unwrap_or(lines.len());
                lines.drain(start..end);
            }
            Change::Append(text) => {
                let mut s = lines.join("\n");
                s.push('\n');
                s.push_str(text);
                return (s, None);
            }
        }
        let mut s = lines.join("\n");
        s.push('\n');
        (s, inserted)
    }
}

/// Applies `changes` to the baseline and asserts that loading fails with one problem whose text holds
/// every needle (after `{config}`, `{dir}` and `{line}` are expanded).
fn assert_rejected(changes: &[Change], needles: &[&str]) {
    let fx = Fixture::new();
    let mut text = BASELINE.to_string();
    let mut line = None;
    for c in changes {
        let (t, l) = c.apply(&text);
        text = t;
        line = line.or(l);
    }
    let (path, result) = fx.load(&text);
    let errors = match result {
        Ok(_) => panic!("accepted, but should have been refused:\n{text}"),
        Err(e) => e,
    };
    let needles: Vec<String> = needles.iter().map(|n| fx.expand(n, &path, line)).collect();
    let messages: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    assert!(
        messages.iter().any(|m| needles.iter().all(|n| m.contains(n.as_str()))),
        "no single problem mentions all of {needles:#?}\nproblems:\n{errors}\nconfig:\n{text}"
    );
}

/// Applies `changes` to the baseline and asserts that it loads, identities included.
fn assert_accepted(changes: &[Change]) -> (Config, Generation) {
    let fx = Fixture::new();
    let mut text = BASELINE.to_string();
    for c in changes {
        text = c.apply(&text).0;
    }
    match fx.load(&text).1 {
        Ok(loaded) => loaded,
        Err(e) => panic!("refused:\n{e}\nconfig:\n{text}"),
    }
}

/// One `#[test]` per row: name, change(s), and what the operator must read.
macro_rules! rejected {
    ($($name:ident: [$($change:expr),+ $(,)?] => [$($needle:expr),+ $(,)?];)+) => {
        $(
            #[test]
            fn $name() {
                assert_rejected(&[$($change),+], &[$($needle),+]);
            }
        )+
    };
}

use Change::*;

rejected! {
    value_of_the_wrong_type_names_its_key_and_line:
        [Set("max_connections = 100", r#"max_connections = "ten""#)]
        => ["{config}: `listen.max_connections`: line 4, column 19: invalid type: string \"ten\""];
    source_of_the_wrong_type_says_what_is_expected:
        [Set(r#"source = "192.168.10.21""#, "source = 42")]
        => ["{config}: `device.source`: line ", "a string or a list of strings"];
    two_shared_listeners_on_one_port_one_of_them_wildcard_are_refused:
        [Set(r#"address = "127.0.0.1:1883""#, r#"address = ["127.0.0.1:1883", "0.0.0.0:1883"]"#)]
        => ["{config}: `listen.address`: 0.0.0.0:1883 overlaps the listener 127.0.0.1:1883"];
    retire_table_that_retires_nothing_is_refused:
        [Append("\n[retire]\nrenewed = false\n")]
        => ["{config}: `retire`: retires nothing"];
    retire_margin_beyond_90_days_is_refused:
        [Append("\n[retire]\nexpiring_within = \"120d\"\n")]
        => ["{config}: `retire.expiring_within`: `120d` is longer than 90 days"];
    fallback_pattern_that_is_empty_is_refused:
        [Append("\n[fallback]\ncert = \"devices/boiler-2/cert.pem\"\nkey = \"devices/boiler-2/key.pem\"\nclient_id = \"\"\n")]
        => ["{config}: `fallback.client_id`: ``: an empty pattern"];
    fallback_source_that_is_not_a_net_names_its_key:
        [Append("\n[fallback]\ncert = \"devices/boiler-2/cert.pem\"\nkey = \"devices/boiler-2/key.pem\"\nsource = \"lab\"\n")]
        => ["{config}: `fallback.source`: `lab` is not an IP address or CIDR"];
    zero_max_connections_per_source_is_refused:
        [InsertAfter("[listen]", "max_connections_per_source = 0")]
        => ["{config}: `listen.max_connections_per_source`: 0 is out of range"];
    max_idle_beyond_a_day_is_refused:
        [InsertAfter("[listen]", r#"max_idle = "2d""#)]
        => ["{config}: `listen.max_idle`: `2d` is longer than a day"];
    zero_queue_timeout_is_refused:
        [InsertAfter("[upstream]", r#"queue_timeout = "0s""#)]
        => ["{config}: `upstream.queue_timeout`: must be longer than zero"];
    bad_device_dir_source_names_its_key:
        [Append("\n[device_dir]\npath = \"devices\"\nsource = \"not-a-net\"\n")]
        => ["{config}: `device_dir.source`: `not-a-net` is not an IP address or CIDR"];
    key_that_holds_a_certificate_says_so:
        [Set(r#"key = "devices/boiler-2/key.pem""#, r#"key = "devices/boiler-2/cert.pem""#)]
        => [r#"{config}: device "boiler-2": `key`: "#, "holds a certificate, not a private key"];
    unknown_top_level_key_is_named_with_its_line:
        [InsertAfter("", r#"colour = "blue""#)]
        => ["{config}: ", "line {line}, column 1", "unknown field `colour`"];
    unknown_key_in_listen_is_named_with_its_line:
        [InsertAfter("[listen]", r#"adress = "127.0.0.1:1883""#)]
        => ["{config}: ", "line {line}, column 1", "unknown field `adress`", "expected one of `address`"];
    unknown_key_in_upstream_is_named_with_its_line:
        [InsertAfter("[upstream]", r#"servername = "broker.example.com""#)]
        => ["{config}: ", "line {line}, column 1", "unknown field `servername`", "`server_name`"];
    unknown_key_in_device_is_named_with_its_line:
        [InsertAfter(r#"name = "boiler-2""#, r#"clientid = "boiler-2""#)]
        => ["{config}: ", "line {line}, column 1", "unknown field `clientid`", "`client_id`"];
    unparsable_duration_is_refused:
        [Set(r#"connect_timeout = "5s""#, r#"connect_timeout = "10 parsecs""#)]
        => ["{config}: `upstream.connect_timeout`: `10 parsecs` is not a duration", r#"e.g. "10s""#];
    zero_duration_is_refused:
        [Set(r#"connect_timeout = "10s""#, r#"connect_timeout = "0s""#)]
        => ["{config}: `listen.connect_timeout`: must be longer than zero"];
    unparsable_shutdown_grace_names_its_key:
        [InsertAfter("[listen]", r#"shutdown_grace = "a while""#)]
        => ["{config}: `listen.shutdown_grace`: `a while` is not a duration", r#"e.g. "10s""#];
    zero_shutdown_grace_is_refused:
        [InsertAfter("[listen]", r#"shutdown_grace = "0s""#)]
        => ["{config}: `listen.shutdown_grace`: must be longer than zero"];
    missing_upstream_table_is_refused:
        [RemoveTable("[upstream]")]
        => ["{config}: `upstream`: the [upstream] table is required"];
    missing_upstream_address_is_refused:
        [Remove(r#"address = "broker.example.com:8883""#)]
        => ["{config}: `upstream.address`: the broker's address is required"];
    upstream_address_with_bad_port_is_refused:
        [Set(r#"address = "broker.example.com:8883""#, r#"address = "broker.example.com:88830""#)]
        => ["{config}: `upstream.address`: `broker.example.com:88830` is not host:port"];
    upstream_address_with_space_in_host_is_refused:
        [Set(r#"address = "broker.example.com:8883""#, r#"address = "broker example.com:8883""#)]
        => ["{config}: `upstream.address`: `broker example.com:8883` is not host:port"];
    listen_address_without_port_is_refused:
        [Set(r#"address = "127.0.0.1:1883""#, r#"address = "127.0.0.1""#)]
        => ["{config}: `listen.address`: `127.0.0.1` is not an IP:port address"];
    duplicate_listen_address_is_refused:
        [Set(r#"address = "127.0.0.1:1883""#, r#"address = ["127.0.0.1:1883", "127.0.0.1:1883"]"#)]
        => ["{config}: `listen.address`: `127.0.0.1:1883` is listed twice"];
    zero_max_connections_is_refused:
        [Set("max_connections = 100", "max_connections = 0")]
        => ["{config}: `listen.max_connections`: 0 is out of range"];
    zero_max_connecting_is_refused:
        [InsertAfter("[upstream]", "max_connecting = 0")]
        => ["{config}: `upstream.max_connecting`: 0 is out of range (1 to 1000000)"];
    device_without_name_is_refused:
        [Remove(r#"name = "boiler-2""#)]
        => ["{config}: `name (in the 2nd [[device]])`: every device needs a non-empty name"];
    device_without_cert_is_refused:
        [Remove(r#"cert = "devices/boiler-2/cert.pem""#)]
        => [r#"{config}: device "boiler-2": `cert`: is required"#];
    device_without_key_is_refused:
        [Remove(r#"key = "devices/boiler-2/key.pem""#)]
        => [r#"{config}: device "boiler-2": `key`: is required"#];
    duplicate_device_name_is_refused:
        [Set(r#"name = "boiler-2""#, r#"name = "boiler-1""#)]
        => [r#"{config}: device "boiler-1": `name`: device #2 uses a name already taken by device #1 in {config}"#];
    source_that_is_not_an_address_is_refused:
        [Set(r#"source = "192.168.10.21""#, r#"source = "192.168.10.300""#)]
        => [r#"{config}: device "boiler-1": `source`: `192.168.10.300` is not an IP address or CIDR"#];
    source_with_impossible_prefix_length_is_refused:
        [Set(r#"source = "192.168.10.0/24""#, r#"source = "192.168.10.0/33""#)]
        => [r#"{config}: device "boiler-2": `source`: `192.168.10.0/33` is not an IP address or CIDR"#];
    device_without_any_rule_is_refused:
        [Remove(r#"client_id = "meter-3""#)]
        => [r#"{config}: device "meter-3": `client_id`: give at least one of client_id, source, listen"#];
    same_client_id_without_source_is_ambiguous_naming_both_devices:
        [Append("\n[[device]]\nname = \"meter-3b\"\nclient_id = \"meter-3\"\ncert = \"devices/meter-3/cert.pem\"\nkey = \"devices/meter-3/key.pem\"\n")]
        => [r#"{config}: device "meter-3b": `client_id/source/listen`: can match the same connections as device "meter-3""#];
    same_client_id_with_overlapping_sources_is_ambiguous:
        [Set(r#"client_id = "boiler-2""#, r#"client_id = "boiler-1""#)]
        => [r#"{config}: device "boiler-2": `client_id/source/listen`: can match the same connections as device "boiler-1""#];
    missing_cert_file_is_named:
        [Set(r#"cert = "devices/boiler-2/cert.pem""#, r#"cert = "devices/boiler-2/missing.pem""#)]
        => [r#"{config}: device "boiler-2": `cert`: {dir}/devices/boiler-2/missing.pem: cannot read"#];
    cert_file_that_is_not_pem_is_named:
        [Set(r#"cert = "devices/boiler-2/cert.pem""#, r#"cert = "not-pem.txt""#)]
        => [r#"{config}: device "boiler-2": `cert`: {dir}/not-pem.txt: holds no PEM certificate"#];
    key_file_that_is_not_pem_is_named:
        [Set(r#"key = "devices/boiler-2/key.pem""#, r#"key = "not-a-key.pem""#)]
        => [r#"{config}: device "boiler-2": `key`: {dir}/not-a-key.pem: no usable PEM private key"#];
    key_that_does_not_match_its_cert_is_refused:
        [Set(r#"key = "devices/boiler-2/key.pem""#, r#"key = "devices/boiler-1/key.pem""#)]
        => [r#"{config}: device "boiler-2": `key`: {dir}/devices/boiler-1/key.pem: does not match the certificate in {dir}/devices/boiler-2/cert.pem"#];
    key_readable_by_others_is_refused_with_chmod_advice:
        [Set(r#"key = "devices/boiler-2/key.pem""#, r#"key = "devices/boiler-2/key-0644.pem""#)]
        => [
            r#"{config}: device "boiler-2": `key`: {dir}/devices/boiler-2/key-0644.pem: private key is readable by group or others (mode 0644)"#,
            "run `chmod 600 {dir}/devices/boiler-2/key-0644.pem`",
            "upstream.allow_readable_keys = true",
        ];
    key_readable_by_group_is_refused:
        [Set(r#"key = "devices/boiler-2/key.pem""#, r#"key = "devices/boiler-2/key-0640.pem""#)]
        => [r#"{config}: device "boiler-2": `key`: {dir}/devices/boiler-2/key-0640.pem: private key is readable by group or others (mode 0640)"#];
    key_writable_by_group_is_refused_as_writable:
        [Set(r#"key = "devices/boiler-2/key.pem""#, r#"key = "devices/boiler-2/key-0620.pem""#)]
        => [r#"{config}: device "boiler-2": `key`: {dir}/devices/boiler-2/key-0620.pem: private key is writable by group or others (mode 0620)"#];
    missing_ca_file_is_named:
        [Set(r#"ca_file = "ca.pem""#, r#"ca_file = "missing-ca.pem""#)]
        => ["{config}: `upstream.ca_file`: {dir}/missing-ca.pem: cannot read"];
    ca_file_that_is_not_pem_is_named:
        [Set(r#"ca_file = "ca.pem""#, r#"ca_file = "not-pem.txt""#)]
        => ["{config}: `upstream.ca_file`: {dir}/not-pem.txt: holds no PEM certificate"];
    missing_device_dir_is_named:
        [Append("\n[device_dir]\npath = \"no-such-dir\"\n")]
        => ["{config}: `device_dir.path`: cannot read {dir}/no-such-dir"];
    a_device_named_fallback_beside_a_fallback_identity_is_refused:
        [
            Set(r#"name = "boiler-2""#, r#"name = "fallback""#),
            Append("\n[fallback]\ncert = \"devices/meter-3/cert.pem\"\nkey = \"devices/meter-3/key.pem\"\n"),
        ]
        => [r#"{config}: device "fallback": `name`: `fallback` names the [fallback] identity"#];
    metrics_address_that_is_not_an_address_is_refused:
        [Append("\n[metrics]\naddress = \"localhost:9883\"\n")]
        => ["{config}: `metrics.address`: `localhost:9883` is not an IP:port address"];
    metrics_address_on_a_device_port_is_refused:
        [Append("\n[metrics]\naddress = \"0.0.0.0:1883\"\n")]
        => ["{config}: `metrics.address`: 0.0.0.0:1883 overlaps the device listener 127.0.0.1:1883"];
    unknown_key_in_metrics_is_named:
        [Append("\n[metrics]\nadress = \"127.0.0.1:9883\"\n")]
        => ["{config}: ", "unknown field `adress`", "`address`"];
    reload_interval_too_short_is_refused:
        [Append("\n[reload]\nwatch_interval = \"10ms\"\n")]
        => ["{config}: `reload.watch_interval`: must be at least 100ms"];
    reload_interval_that_is_not_a_duration_is_refused:
        [Append("\n[reload]\nwatch_interval = \"often\"\n")]
        => ["{config}: `reload.watch_interval`: `often` is not a duration"];
    device_dir_entry_without_key_names_the_missing_file:
        [Append("\n[device_dir]\npath = \"fleet-broken\"\n")]
        => [r#"{dir}/fleet-broken/meter-9/key.pem: device "meter-9": the device's private key is missing"#];
}

#[test]
fn baseline_loads_with_every_identity() {
    let (config, generation) = assert_accepted(&[]);
    let names: Vec<&str> = generation.table.devices().iter().map(|d| &*d.name).collect();
    assert_eq!(names, ["boiler-1", "boiler-2", "meter-3"]);
    assert_eq!(config.devices.len(), 3);
}

#[test]
fn shutdown_grace_is_read_from_listen() {
    let (config, _) = assert_accepted(&[InsertAfter("[listen]", r#"shutdown_grace = "90s""#)]);
    assert_eq!(config.listen.shutdown_grace, std::time::Duration::from_secs(90));
}

#[test]
fn upstream_connects_are_paced_by_default_and_as_configured() {
    let (config, _) = assert_accepted(&[]);
    assert_eq!(config.upstream.max_connecting, 64);
    let (config, _) = assert_accepted(&[InsertAfter("[upstream]", "max_connecting = 500")]);
    assert_eq!(config.upstream.max_connecting, 500);
}

#[test]
fn relative_paths_resolve_against_the_config_files_directory() {
    let fx = Fixture::new();
    let cwd = std::env::current_dir().expect("cwd");
    assert_ne!(
        cwd,
        fx.dir(),
        "the test must run from another directory than the config's"
    );
    let (_, result) = fx.load(BASELINE);
    let (config, _) = result.unwrap_or_else(|e| panic!("refused:\n{e}"));
    let boiler = &config.devices[0];
    assert_eq!(boiler.identity.cert, fx.dir().join("devices/boiler-1/cert.pem"));
    assert_eq!(boiler.identity.key, fx.dir().join("devices/boiler-1/key.pem"));
    assert_eq!(
        config.upstream.ca_file.as_deref(),
        Some(fx.dir().join("ca.pem").as_path())
    );
}

#[test]
fn same_client_id_with_disjoint_sources_is_valid() {
    let (_, generation) = assert_accepted(&[Append(
        "\n[[device]]\nname = \"boiler-1-lab\"\nclient_id = \"boiler-1\"\nsource = \"192.168.20.0/24\"\n\
         cert = \"devices/boiler-2/cert.pem\"\nkey = \"devices/boiler-2/key.pem\"\n",
    )]);
    assert_eq!(generation.table.devices().len(), 4);
}

#[test]
fn readable_key_is_accepted_with_allow_readable_keys() {
    let fx = Fixture::new();
    let mode = std::fs::metadata(fx.dir().join("devices/boiler-2/key-0644.pem"))
        .expect("stat key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644, "precondition: the key is world-readable");
    assert_accepted(&[
        Set(
            r#"key = "devices/boiler-2/key.pem""#,
            r#"key = "devices/boiler-2/key-0644.pem""#,
        ),
        InsertAfter("[upstream]", "allow_readable_keys = true"),
    ]);
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let fx = Fixture::new();
    let mut text = BASELINE.to_string();
    for c in [
        Set(r#"connect_timeout = "5s""#, r#"connect_timeout = "10 parsecs""#),
        Set(r#"source = "192.168.10.21""#, r#"source = "192.168.10.300""#),
        Remove(r#"key = "devices/meter-3/key.pem""#),
    ] {
        text = c.apply(&text).0;
    }
    let (_, result) = fx.load(&text);
    let errors = refused(result);
    let text = errors.to_string();
    assert_eq!(errors.0.len(), 3, "{text}");
    for needle in [
        "`upstream.connect_timeout`: `10 parsecs`",
        r#"device "boiler-1": `source`: `192.168.10.300`"#,
        r#"device "meter-3": `key`: is required"#,
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn identity_problems_of_several_devices_are_all_reported() {
    let fx = Fixture::new();
    let mut text = BASELINE.to_string();
    for c in [
        Set(
            r#"key = "devices/boiler-1/key.pem""#,
            r#"key = "devices/boiler-2/key.pem""#,
        ),
        Set(r#"cert = "devices/meter-3/cert.pem""#, r#"cert = "missing.pem""#),
    ] {
        text = c.apply(&text).0;
    }
    let (_, result) = fx.load(&text);
    let errors = refused(result);
    let text = errors.to_string();
    assert_eq!(errors.0.len(), 2, "{text}");
    assert!(text.contains(r#"device "boiler-1": `key`"#), "{text}");
    assert!(text.contains("does not match the certificate"), "{text}");
    assert!(text.contains(r#"device "meter-3": `cert`"#), "{text}");
}

#[test]
fn shipped_example_config_passes_config_load() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/mqtls.example.toml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = config.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["boiler-1", "old-meter"]);
    assert_eq!(
        config.all_listen_addresses().len(),
        2,
        "old-meter has a listener of its own"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Known bugs: these describe the behaviour the README promises and fail today. Run with `--ignored`.

#[test]
fn missing_ca_file_does_not_hide_device_identity_problems() {
    let fx = Fixture::new();
    let mut text = BASELINE.to_string();
    for c in [
        Set(r#"ca_file = "ca.pem""#, r#"ca_file = "missing-ca.pem""#),
        Set(r#"cert = "devices/meter-3/cert.pem""#, r#"cert = "missing.pem""#),
    ] {
        text = c.apply(&text).0;
    }
    let errors = refused(fx.load(&text).1);
    let text = errors.to_string();
    assert!(text.contains("`upstream.ca_file`"), "{text}");
    assert!(text.contains(r#"device "meter-3": `cert`"#), "{text}");
}

#[test]
fn dedicated_wildcard_listener_on_a_shared_port_is_refused() {
    assert_rejected(
        &[InsertAfter(r#"name = "meter-3""#, r#"listen = "0.0.0.0:1883""#)],
        &[r#"{config}: device "meter-3": `listen`"#],
    );
}

/// The `ClientConfig` a device of `g` presents.
fn client_config(g: &Generation, name: &str) -> std::sync::Arc<rustls::ClientConfig> {
    let d = g
        .table
        .all()
        .find(|d| &*d.name == name)
        .unwrap_or_else(|| panic!("no device {name}"));
    d.identity.client_config.clone()
}

#[test]
fn a_reload_keeps_unchanged_identities_and_rebuilds_changed_ones() {
    use std::sync::Arc;
    let fx = Fixture::new();
    let (path, first) = fx.load(BASELINE);
    let (config, before) = first.expect("baseline loads");

    fx.pki.client("boiler-2");
    let after = Generation::load_after(&config, Some(&before)).expect("reload");
    assert!(Arc::ptr_eq(
        &client_config(&before, "boiler-1"),
        &client_config(&after, "boiler-1")
    ));
    assert!(Arc::ptr_eq(
        &client_config(&before, "meter-3"),
        &client_config(&after, "meter-3")
    ));
    assert!(
        !Arc::ptr_eq(&client_config(&before, "boiler-2"), &client_config(&after, "boiler-2")),
        "the renewed device is built again"
    );
    let renewed = |g: &Generation| {
        g.table
            .all()
            .find(|d| &*d.name == "boiler-2")
            .unwrap()
            .identity
            .summary
            .serial
            .clone()
    };
    assert_ne!(renewed(&before), renewed(&after));

    // A CA file written again (same content, new file) rebuilds every identity.
    let ca = fx.dir().join("ca.pem");
    let text = std::fs::read(&ca).unwrap();
    std::fs::remove_file(&ca).unwrap();
    std::fs::write(&ca, text).unwrap();
    let config = Config::load(&path).unwrap();
    let rebuilt = Generation::load_after(&config, Some(&after)).expect("reload");
    for name in ["boiler-1", "boiler-2", "meter-3"] {
        assert!(
            !Arc::ptr_eq(&client_config(&after, name), &client_config(&rebuilt, name)),
            "{name}"
        );
    }

    // A key made readable is not kept: the permission check runs again.
    let key = fx.dir().join("devices/boiler-1/key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = Generation::load_after(&config, Some(&rebuilt)).expect_err("a readable key");
    assert!(refused.to_string().contains("readable by group or others"), "{refused}");
}
