//! The recipes in `deploy/`, each checked by the tool that owns its format:
//! - the Mosquitto recipe is the very file the test harness starts a real Mosquitto from, and nothing else
//!   in the repository is a copy of it;
//! - every mqtls configuration there loads with mqtls's own loader, certificates and keys included;
//! - broker-side files for brokers that cannot run here (EMQX, HiveMQ, AWS IoT Core) are well-formed and
//!   say what their README says;
//! - the Prometheus files pass `promtool check` and the alert rules' unit tests (`promtool test rules`);
//! - the Grafana dashboard is a well-formed dashboard whose queries parse as PromQL;
//! - the alert rules and the dashboard use only metrics, labels and label values mqtls exports.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common;
use crate::common::codec::{self, Version};
use crate::common::metrics_contract::{self, Exposition, CONTRACT};
use crate::common::{Mosquitto, Pki};
use mqtls::Config;
use serde_json::Value as Json;

/// The mqtls configurations shipped in `deploy/`, relative to it.
const MQTLS_CONFIGS: [&str; 5] = [
    "aws-iot-core/mqtls.toml",
    "azure-iot-hub/mqtls.toml",
    "emqx/mqtls.toml",
    "hivemq/mqtls.toml",
    "mqtls.example.toml",
];
/// The roots the Azure recipe's bundle is built from (Debian's ca-certificates), with their subjects' CNs.
const AZURE_ROOTS: [(&str, &str); 2] = [
    ("/etc/ssl/certs/DigiCert_Global_Root_G2.pem", "DigiCert Global Root G2"),
    (
        "/etc/ssl/certs/Microsoft_RSA_Root_Certificate_Authority_2017.pem",
        "Microsoft RSA Root Certificate Authority 2017",
    ),
];
/// Grafana's own variables, which dashboards may use without defining them.
const GRAFANA_BUILTINS: [&str; 3] = ["__rate_interval", "__interval", "__range"];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// What a running `mqtls` exports: one live scrape of `/metrics`, shared by the tests of this file.
fn exposition() -> Exposition {
    static SCRAPED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    Exposition::parse(SCRAPED.get_or_init(common::daemon::scrape_once))
}

// ---------------------------------------------------------------------------------------------------------
// Mosquitto

#[tokio::test]
async fn harness_runs_the_shipped_mosquitto_recipe() {
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki).await;
    let shipped = read(&deploy("mosquitto/mosquitto.conf"));
    let running = read(broker.conf_path());
    let expected = common::mosquitto::rewrite_conf(
        &shipped,
        broker.port(),
        pki.ca_pem_path(),
        broker.server_cert(),
        &broker.dir().join("acl"),
        broker.log_path(),
    );
    assert_eq!(
        running, expected,
        "the running broker's configuration is not the shipped recipe's"
    );
    // Independently of the rewriting: every directive the harness keeps is there, word for word.
    let kept: Vec<&str> = shipped
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter(|l| !running.contains(&format!("# (dropped by test harness) {l}")))
        .filter(|l| {
            let directive = l.split_whitespace().next().unwrap_or("");
            !["listener", "cafile", "certfile", "keyfile", "acl_file"].contains(&directive)
        })
        .collect();
    assert!(kept.len() >= 6, "{kept:?}");
    for line in &kept {
        assert!(
            running.lines().any(|l| l == *line),
            "{line:?} missing from {}",
            broker.conf_path().display()
        );
    }
    assert_eq!(read(&broker.dir().join("acl")), read(&deploy("mosquitto/acl")));
}

#[test]
fn no_second_copy_of_the_mosquitto_recipe() {
    let conf = read(&deploy("mosquitto/mosquitto.conf"));
    let directives: BTreeSet<&str> = conf
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(directives.contains("require_certificate"), "{directives:?}");
    let mut copies = Vec::new();
    for path in files_under(repo()) {
        let rel = path.strip_prefix(repo()).unwrap();
        if rel.starts_with("deploy/mosquitto") {
            continue;
        }
        let Ok(bytes) = fs::read(&path) else { continue };
        let text = String::from_utf8_lossy(&bytes);
        // A configuration file, or one pasted into a string literal, has its directives at column 0.
        let lines = text
            .lines()
            .filter(|l| {
                let word = l.split(' ').next().unwrap_or("");
                l.len() > word.len() && directives.contains(word) || l.starts_with("pattern readwrite ")
            })
            .count();
        if lines >= 2 {
            copies.push(format!("{} ({lines} directive lines)", rel.display()));
        }
    }
    assert!(copies.is_empty(), "copies of deploy/mosquitto outside it: {copies:?}");
}

/// Every file in the repository, skipping version control and build output.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            if path.is_dir() {
                if !matches!(name.as_str(), ".git" | "target") {
                    stack.push(path);
                }
            } else if path.is_file() {
                out.push(path);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// mqtls configurations

#[test]
fn every_mqtls_config_in_deploy_is_tested() {
    let found: BTreeSet<String> = files_under(&repo().join("deploy"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| p.strip_prefix(repo().join("deploy")).unwrap().display().to_string())
        .collect();
    let listed: BTreeSet<String> = MQTLS_CONFIGS.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        found, listed,
        "a TOML file in deploy/ that this test does not load (or the reverse)"
    );
}

#[test]
fn example_config_loads() {
    let loaded = load_recipe("mqtls.example.toml");
    let names: Vec<&str> = loaded.config.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["boiler-1", "old-meter"]);
}

#[test]
fn aws_iot_core_recipe_loads_with_alpn_and_amazon_root() {
    let loaded = load_recipe("aws-iot-core/mqtls.toml");
    let up = &loaded.config.upstream;
    assert_eq!(up.addresses.len(), 1);
    let host = &up.addresses[0].host;
    assert!(host.contains("-ats.iot.") && host.ends_with(".amazonaws.com"), "{host}");
    // 443 needs the ALPN name; 8883 works without it.
    assert_eq!(up.addresses[0].port, 443);
    assert_eq!(up.alpn, ["x-amzn-mqtt-ca"]);
    let ca = up.ca_file.as_deref().expect("ca_file");
    assert_eq!(root_names(ca), ["Amazon Root CA 1"]);
    // One device directory entry per thing; the thing name is the client id AWS IoT sees, whatever the
    // firmware sends, and its login stays on the gateway.
    assert_eq!(loaded.config.devices.len(), 2);
    for d in &loaded.config.devices {
        assert_eq!(d.client_id.as_deref(), Some(d.name.as_str()));
        assert_eq!(presented(d, "ESP8266Client"), (d.name.clone(), None, false));
    }
}

/// What `d`'s rewrite makes of a 3.1.1 CONNECT with client id `sent`, a user name and a password, for a
/// device whose certificate's CN is its name (as `load_recipe` makes them): (client id, user name,
/// whether a password is sent).
fn presented(d: &mqtls::config::DeviceSpec, sent: &str) -> (String, Option<String>, bool) {
    use mqtls::mqtt::{parse_connect, ConnectView};
    use mqtls::rewrite::{rewrite, Context};
    let rules = d.connect.load(false).unwrap().expect("the recipe rewrites the CONNECT");
    let bytes = codec::Connect::new(Version::V311, sent, 60)
        .login("legacy", b"pw")
        .encode();
    let connect = parse_connect(&bytes, 4096).unwrap();
    let ctx = Context {
        name: &d.name,
        cn: Some(&d.name),
        source: "192.168.10.21".parse().unwrap(),
    };
    let out = rewrite(bytes, &connect, &rules, &ctx).unwrap();
    let (v, _) = ConnectView::parse(&out.bytes, usize::MAX).unwrap();
    (
        v.client_id.to_string(),
        v.username.map(str::to_string),
        v.password.is_some(),
    )
}

#[test]
fn azure_iot_hub_recipe_loads_with_its_roots() {
    let loaded = load_recipe("azure-iot-hub/mqtls.toml");
    let up = &loaded.config.upstream;
    assert!(
        up.addresses[0].host.ends_with(".azure-devices.net"),
        "{:?}",
        up.addresses
    );
    assert_eq!(up.addresses[0].port, 8883);
    assert!(up.alpn.is_empty());
    let names = root_names(up.ca_file.as_deref().expect("ca_file"));
    assert_eq!(names, AZURE_ROOTS.map(|(_, cn)| cn));
    // IoT Hub wants client id = device id = the certificate's CN, and a user name of its own form; the
    // firmware's shared client id and its password stay on the gateway.
    for d in &loaded.config.devices {
        assert_eq!(d.client_id.as_deref(), Some("ESP8266Client"));
        let username = format!("my-hub.azure-devices.net/{}/?api-version=2021-04-12", d.name);
        assert_eq!(presented(d, "ESP8266Client"), (d.name.clone(), Some(username), false));
    }
}

#[test]
fn emqx_recipe_loads() {
    let loaded = load_recipe("emqx/mqtls.toml");
    assert_eq!(loaded.config.upstream.addresses[0].port, 8883);
    assert_eq!(loaded.config.devices.len(), 2);
}

#[test]
fn hivemq_recipe_loads_with_failover() {
    let loaded = load_recipe("hivemq/mqtls.toml");
    let up = &loaded.config.upstream;
    assert_eq!(up.addresses.len(), 2);
    assert!(up.server_name.is_some(), "two nodes behind one certificate name");
    assert_eq!(loaded.config.devices.len(), 2);
}

/// A shipped configuration, loaded and checked.
struct Loaded {
    config: Config,
    _pki: Pki,
}

/// Loads a shipped mqtls configuration the way `mqtls check` does (configuration, then every certificate
/// and key), in a temporary directory: `/etc/mqtls/` becomes `<tmp>/etc/mqtls/`, and each certificate and
/// key named there is generated (a device directory gets two devices). A CA bundle named
/// `azure-iot-roots.pem` is built from the system's roots, as the Azure README says. Files outside
/// `/etc/mqtls/` (the system's CA certificates) are used as they are.
fn load_recipe(rel: &str) -> Loaded {
    let pki = Pki::new();
    let root = pki.dir().join("etc/mqtls");
    let text = read(&deploy(rel)).replace("/etc/mqtls/", &format!("{}/", root.display()));
    let value: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"));
    provide_files(&pki, &root, &value);
    let path = root.join("mqtls.toml");
    std::fs::write(&path, &text).unwrap();
    let config = mqtls::load(&path).unwrap_or_else(|e| panic!("{rel}:\n{e}")).config;
    assert!(config.metrics.is_some(), "{rel}: every recipe serves metrics");
    Loaded { config, _pki: pki }
}

fn provide_files(pki: &Pki, root: &Path, config: &toml::Value) {
    let text = |v: Option<&toml::Value>| v.and_then(toml::Value::as_str).map(PathBuf::from);
    if let Some(ca) = text(config.get("upstream").and_then(|u| u.get("ca_file"))) {
        provide_ca(pki, root, &ca);
    }
    let identities = config
        .get("device")
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
        .chain(config.get("fallback"));
    for entry in identities {
        let (cert, key) = (text(entry.get("cert")), text(entry.get("key")));
        let (cert, key) = (cert.expect("cert"), key.expect("key"));
        let dir = cert.parent().expect("cert in a directory");
        assert_eq!((cert.file_name(), key.parent()), (Some("cert.pem".as_ref()), Some(dir)));
        assert_eq!(key.file_name(), Some("key.pem".as_ref()));
        let name = entry.get("name").and_then(toml::Value::as_str).unwrap_or("fallback");
        pki.client_in(dir, name);
    }
    if let Some(dir) = text(config.get("device_dir").and_then(|d| d.get("path"))) {
        for name in ["boiler-7", "meter-8"] {
            pki.client_in(&dir.join(name), name);
        }
    }
}

/// A CA file under the temporary `/etc/mqtls/` is written (the Azure bundle from the system's roots, any
/// other from the test CA); one elsewhere must be on this system already.
fn provide_ca(pki: &Pki, root: &Path, ca: &Path) {
    if !ca.starts_with(root) {
        assert!(
            ca.is_file(),
            "{} is not on this system (install ca-certificates)",
            ca.display()
        );
        return;
    }
    fs::create_dir_all(ca.parent().expect("ca_file in a directory")).expect("create directory");
    if ca.file_name().is_some_and(|n| n == "azure-iot-roots.pem") {
        let bundle: String = AZURE_ROOTS.iter().map(|(p, _)| read(Path::new(p))).collect();
        common::pki::write_file(ca, bundle.as_bytes(), 0o644);
    } else {
        common::pki::write_file(ca, read(pki.ca_pem_path()).as_bytes(), 0o644);
    }
}

/// Subject CNs of the certificates in a PEM bundle, in order.
fn root_names(path: &Path) -> Vec<String> {
    common::pki::load_certs(path)
        .iter()
        .map(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse certificate");
            let cn = cert.subject().iter_common_name().next().expect("subject CN");
            cn.as_str().expect("CN text").to_string()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------
// Broker-side files that cannot be run here

#[test]
fn aws_iot_policy_ties_each_connection_to_its_thing() {
    let policy: Json = serde_json::from_str(&read(&deploy("aws-iot-core/policy.json"))).expect("policy.json is JSON");
    assert_eq!(policy["Version"], "2012-10-17");
    let statements = policy["Statement"].as_array().expect("Statement list");
    let mut by_action: BTreeMap<String, Vec<&Json>> = BTreeMap::new();
    for s in statements {
        assert_eq!(s["Effect"], "Allow", "{s}");
        let actions = match &s["Action"] {
            Json::String(a) => vec![a.clone()],
            Json::Array(a) => a.iter().map(|x| x.as_str().expect("action").to_string()).collect(),
            other => panic!("Action {other}"),
        };
        for a in actions {
            by_action.entry(a).or_default().push(s);
        }
    }
    let thing = "${iot:Connection.Thing.ThingName}";
    let resource = |action: &str| -> String {
        let s = by_action
            .get(action)
            .unwrap_or_else(|| panic!("no statement for {action}"));
        s[0]["Resource"].as_str().expect("one resource").to_string()
    };
    let connect = &by_action["iot:Connect"][0];
    assert!(resource("iot:Connect").ends_with(&format!(":client/{thing}")));
    assert_eq!(connect["Condition"]["Bool"]["iot:Connection.Thing.IsAttached"], "true");
    for action in ["iot:Publish", "iot:Receive", "iot:RetainPublish"] {
        assert!(
            resource(action).ends_with(&format!(":topic/sensors/{thing}/*")),
            "{action}"
        );
    }
    assert!(resource("iot:Subscribe").ends_with(&format!(":topicfilter/sensors/{thing}/*")));
    for action in by_action.keys() {
        assert!(
            resource(action).starts_with("arn:aws:iot:REGION:ACCOUNT_ID:"),
            "{action}"
        );
    }
}

#[test]
fn emqx_files_require_certificates_and_authorize_by_cn() {
    let conf = read(&deploy("emqx/emqx.conf"));
    assert_balanced("emqx.conf", &strip_comments(&conf, "#"));
    let settings: Vec<String> = conf
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    for s in [
        "listeners.ssl.default {",
        "verify = verify_peer",
        "fail_if_no_peer_cert = true",
        "enable_authn = false",
        "peer_cert_as_username = cn",
        "no_match = deny",
        "type = file",
    ] {
        assert!(settings.iter().any(|l| l == s), "emqx.conf lacks `{s}`");
    }
    let acl = read(&deploy("emqx/acl.conf"));
    let rules = strip_comments(&acl, "%");
    assert_balanced("acl.conf", &rules);
    let rules: Vec<&str> = rules
        .split_inclusive("}.")
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .collect();
    assert!(
        rules.iter().all(|r| r.starts_with('{') && r.ends_with("}.")),
        "{rules:?}"
    );
    assert!(
        rules.iter().any(|r| r.contains(r#""sensors/${username}/#""#)),
        "{rules:?}"
    );
    assert_eq!(rules.last(), Some(&"{deny, all}."));
}

#[test]
fn hivemq_listener_requires_client_certificates() {
    let elements = xml_elements(&read(&deploy("hivemq/config.xml")));
    let value = |path: &str| {
        elements
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("config.xml has no <{path}>"))
    };
    let listener = "hivemq/listeners/tls-tcp-listener";
    assert_eq!(value(&format!("{listener}/tls/client-authentication-mode")), "REQUIRED");
    assert_eq!(value(&format!("{listener}/port")), "8883");
    assert!(!value(&format!("{listener}/tls/truststore/path")).is_empty());
    assert!(!value(&format!("{listener}/tls/keystore/path")).is_empty());
    assert!(
        !elements
            .iter()
            .any(|(p, _)| p.starts_with("hivemq/listeners/tcp-listener")),
        "a plain listener would let devices around mqtls"
    );
}

fn strip_comments(text: &str, marker: &str) -> String {
    text.lines()
        .map(|l| l.split(marker).next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Brackets and braces open and close in order, outside double-quoted strings.
fn assert_balanced(what: &str, text: &str) {
    let mut stack = Vec::new();
    let mut in_string = false;
    for c in text.chars() {
        match c {
            '"' => in_string = !in_string,
            '{' | '[' | '(' if !in_string => stack.push(c),
            '}' | ']' | ')' if !in_string => {
                let open = stack.pop().unwrap_or_else(|| panic!("{what}: `{c}` closes nothing"));
                assert_eq!(open, matching(c), "{what}: `{open}` closed by `{c}`");
            }
            _ => {}
        }
    }
    assert!(stack.is_empty() && !in_string, "{what}: unclosed {stack:?}");
}

fn matching(close: char) -> char {
    match close {
        '}' => '{',
        ']' => '[',
        _ => '(',
    }
}

/// The leaf elements of a well-formed XML document as (slash-separated path, text); panics on a
/// document that is not well-formed (unclosed or mismatched tags, text outside the root).
fn xml_elements(xml: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack: Vec<String> = Vec::new();
    let mut text = String::new();
    let mut rest = xml.trim_start();
    let mut seen_root = false;
    while !rest.is_empty() {
        let Some(open) = rest.find('<') else {
            assert!(
                rest.trim().is_empty() || !stack.is_empty(),
                "text outside the root: {rest:?}"
            );
            break;
        };
        text.push_str(&rest[..open]);
        rest = &rest[open..];
        let (end_marker, skip) = if rest.starts_with("<!--") {
            ("-->", true)
        } else if rest.starts_with("<?") {
            ("?>", true)
        } else {
            (">", false)
        };
        let end = rest
            .find(end_marker)
            .unwrap_or_else(|| panic!("unclosed {:?}", &rest[..rest.len().min(40)]));
        let tag = &rest[1..end];
        rest = &rest[end + end_marker.len()..];
        if skip {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            let open = stack.pop().unwrap_or_else(|| panic!("</{name}> closes nothing"));
            assert_eq!(open, name.trim(), "<{open}> closed by </{name}>");
            let value = std::mem::take(&mut text);
            if !value.trim().is_empty() {
                out.push((
                    format!("{}/{open}", stack.join("/"))
                        .trim_start_matches('/')
                        .to_string(),
                    value.trim().to_string(),
                ));
            }
        } else {
            let name = tag
                .split_whitespace()
                .next()
                .unwrap_or("")
                .trim_end_matches('/')
                .to_string();
            assert!(!name.is_empty(), "empty tag");
            assert!(!(stack.is_empty() && seen_root), "a second root element <{name}>");
            seen_root = true;
            text.clear();
            if !tag.ends_with('/') {
                stack.push(name);
            }
        }
    }
    assert!(stack.is_empty(), "unclosed elements {stack:?}");
    assert!(seen_root, "no root element");
    out
}

// ---------------------------------------------------------------------------------------------------------
// Prometheus

/// Runs promtool (Debian package `prometheus`, installed by scripts/install-deps.sh) in `dir`; panics
/// with its output unless it succeeds.
fn promtool(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run promtool (apt-get install prometheus, or scripts/install-deps.sh): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// Values of `key:` in a YAML file as written in our files: inline (quotes removed) or a block scalar.
fn yaml_values(text: &str, key: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start().trim_start_matches("- ");
        let Some(value) = trimmed.strip_prefix(&format!("{key}:")) else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let indent = line.len() - line.trim_start().len();
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            out.push(block.join("\n"));
        } else {
            out.push(value.trim_matches(|c| c == '\'' || c == '"').to_string());
        }
    }
    out
}

fn rules_dir() -> PathBuf {
    deploy("prometheus")
}

fn alert_names(text: &str, key: &str) -> BTreeSet<String> {
    yaml_values(text, key).into_iter().collect()
}

#[test]
fn alert_rules_pass_promtool_check() {
    let rules = read(&rules_dir().join("mqtls.rules.yml"));
    let count = alert_names(&rules, "alert").len() + alert_names(&rules, "record").len();
    let out = promtool(&rules_dir(), &["check", "rules", "mqtls.rules.yml"]);
    assert!(out.contains(&format!("SUCCESS: {count} rules found")), "{out}");
}

#[test]
fn alert_rules_cover_what_the_issue_asks_and_say_why() {
    let rules = read(&rules_dir().join("mqtls.rules.yml"));
    let names = alert_names(&rules, "alert");
    for wanted in [
        "MqtlsDeviceCertificateExpiringSoon",
        "MqtlsUpstreamConnectFailuresRising",
        "MqtlsConnectionRefusalsRising",
        "MqtlsDeviceNotConnected",
    ] {
        assert!(names.contains(wanted), "{wanted} missing from {names:?}");
    }
    for block in rules.split("- alert: ").skip(1) {
        let name = block.lines().next().unwrap_or("");
        for field in ["expr:", "for:", "severity:", "summary:", "description:"] {
            assert!(block.contains(field), "{name} has no {field}");
        }
    }
    assert!(rules.contains("< 14"), "certificate alert threshold is 14 days");
}

#[test]
fn alert_rules_unit_tests_pass_and_cover_every_alert() {
    let rules = read(&rules_dir().join("mqtls.rules.yml"));
    let tests = read(&rules_dir().join("mqtls.rules.test.yml"));
    assert_eq!(
        alert_names(&tests, "alertname"),
        alert_names(&rules, "alert"),
        "alerts without a unit test"
    );
    let out = promtool(&rules_dir(), &["test", "rules", "mqtls.rules.test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn scrape_config_passes_promtool_check() {
    let out = promtool(&rules_dir(), &["check", "config", "prometheus.yml"]);
    assert!(out.contains("SUCCESS: 1 rule files found"), "{out}");
    let config = read(&rules_dir().join("prometheus.yml"));
    assert!(config.contains("job_name: mqtls"), "the rules select job=\"mqtls\"");
}

#[test]
fn alert_rules_use_only_exported_metrics() {
    let e = exposition();
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (file, key) in [("mqtls.rules.yml", "expr"), ("mqtls.rules.test.yml", "series")] {
        for promql in yaml_values(&read(&rules_dir().join(file)), key) {
            problems.extend(e.check(file, &promql));
            used.extend(metrics_contract::references(&promql).into_iter().map(|r| r.metric));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    for metric in [
        "mqtls_device_cert_expiry_timestamp_seconds",
        "mqtls_upstream_connect_failures_total",
        "mqtls_connections_refused_total",
        "mqtls_connections_active",
    ] {
        assert!(used.contains(metric), "{metric} is not used: {used:?}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// Grafana

fn dashboard() -> Json {
    serde_json::from_str(&read(&deploy("grafana/mqtls-dashboard.json"))).expect("the dashboard is valid JSON")
}

/// PromQL of every panel target, with the panel's title.
fn dashboard_exprs(d: &Json) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            out.push((title, t["expr"].as_str().unwrap_or("").to_string()));
        }
    }
    out
}

fn dashboard_variables(d: &Json) -> Vec<&Json> {
    d["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .collect()
}

#[test]
fn grafana_dashboard_is_well_formed() {
    let d = dashboard();
    for key in ["title", "uid"] {
        assert!(!d[key].as_str().unwrap_or("").is_empty(), "no {key}");
    }
    assert!(d["schemaVersion"].is_u64());
    let vars: BTreeMap<&str, &Json> = dashboard_variables(&d)
        .into_iter()
        .map(|v| (v["name"].as_str().expect("variable name"), v))
        .collect();
    assert_eq!(vars["datasource"]["type"], "datasource");
    assert_eq!(vars["datasource"]["query"], "prometheus");
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    let mut with_queries = 0;
    for p in panels {
        let title = p["title"].as_str().expect("panel title");
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "{title}: duplicate id");
        let kind = p["type"].as_str().expect("panel type");
        assert!(
            ["row", "stat", "timeseries", "table"].contains(&kind),
            "{title}: type {kind}"
        );
        let g = |k: &str| {
            p["gridPos"][k]
                .as_u64()
                .unwrap_or_else(|| panic!("{title}: gridPos.{k}"))
        };
        assert!(
            g("w") > 0 && g("h") > 0 && g("x") + g("w") <= 24,
            "{title}: {}",
            p["gridPos"]
        );
        for x in g("x")..g("x") + g("w") {
            for y in g("y")..g("y") + g("h") {
                assert!(cells.insert((x, y)), "{title} overlaps another panel at ({x}, {y})");
            }
        }
        if kind == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        let refs: BTreeSet<&str> = targets.iter().map(|t| t["refId"].as_str().expect("refId")).collect();
        assert_eq!(refs.len(), targets.len(), "{title}: duplicate refId");
        for t in targets {
            assert!(
                !t["expr"].as_str().unwrap_or("").trim().is_empty(),
                "{title}: empty query"
            );
        }
        with_queries += 1;
    }
    assert!(with_queries >= 10, "{with_queries} panels with queries");
    for (title, expr) in dashboard_exprs(&d) {
        for var in grafana_variables(&expr) {
            assert!(
                vars.contains_key(var.as_str()) || GRAFANA_BUILTINS.contains(&var.as_str()),
                "{title}: ${var} is not a dashboard variable"
            );
        }
    }
}

/// Names of the `$name` and `${name}` variables in a query.
fn grafana_variables(expr: &str) -> Vec<String> {
    expr.split('$')
        .skip(1)
        .map(|rest| {
            let rest = rest.trim_start_matches('{');
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn grafana_queries_parse_as_promql() {
    let d = dashboard();
    let exprs = dashboard_exprs(&d);
    // promtool parses PromQL in rule files: one recording rule per query, variables filled in.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in exprs.iter().enumerate() {
        let concrete = expr
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*")
            .replace("$device", ".*");
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(&concrete).expect("quote")
        ));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    fs::write(dir.path().join("dashboard.rules.yml"), rules).expect("write rules");
    let out = promtool(dir.path(), &["check", "rules", "dashboard.rules.yml"]);
    assert!(out.contains(&format!("SUCCESS: {} rules found", exprs.len())), "{out}");
}

#[test]
fn grafana_queries_use_only_exported_metrics() {
    let d = dashboard();
    let e = exposition();
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (title, expr) in dashboard_exprs(&d) {
        problems.extend(e.check(&title, &expr));
        for r in metrics_contract::references(&expr) {
            used.insert(e.family_name(&r.metric).unwrap_or(&r.metric).to_string());
        }
    }
    for v in dashboard_variables(&d) {
        if let Some(query) = v["query"]["query"].as_str() {
            problems.extend(e.check(&format!("variable {}", v["name"]), query));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    // Every metric of mqtls's own is on the dashboard (the standard process_* series are left to the
    // dashboards people already have for them).
    let exported: BTreeSet<String> = e.families.keys().filter(|n| n.starts_with("mqtls_")).cloned().collect();
    assert_eq!(used, exported);
}

// ---------------------------------------------------------------------------------------------------------
// The reference check itself

#[test]
fn contract_parses_into_families() {
    let e = Exposition::parse(CONTRACT);
    assert_eq!(e.families.len(), 14);
    assert_eq!(e.families["mqtls_upstream_handshake_seconds"].kind, "histogram");
    assert_eq!(
        e.family_name("mqtls_connection_duration_seconds_bucket"),
        Some("mqtls_connection_duration_seconds")
    );
    assert_eq!(e.family_name("mqtls_bytes_total_bucket"), None);
    assert_eq!(e.families["mqtls_connections_refused_total"].labels["reason"].len(), 14);
}

#[test]
fn the_live_scrape_holds_the_contract() {
    let live = exposition();
    for (name, family) in &Exposition::parse(CONTRACT).families {
        let got = live
            .families
            .get(name)
            .unwrap_or_else(|| panic!("{name} is in the contract but not exported"));
        assert_eq!(got.kind, family.kind, "{name}");
        for (label, values) in &family.labels {
            let exported = got
                .labels
                .get(label)
                .unwrap_or_else(|| panic!("{name} has no label {label}"));
            if !["device", "version", "le"].contains(&label.as_str()) {
                assert_eq!(exported, values, "{name}{{{label}}}");
            }
        }
    }
}

#[test]
fn reference_check_finds_each_kind_of_mistake() {
    let e = Exposition::parse(CONTRACT);
    let good = [
        r#"sum by (reason) (rate(mqtls_connections_refused_total{reason!="busy", instance=~"$instance"}[5m]))"#,
        r#"histogram_quantile(0.9, sum by (le) (rate(mqtls_upstream_handshake_seconds_bucket[5m])))"#,
        r#"mqtls_bytes_total{direction=~"to_broker|to_device"}"#,
    ];
    for q in good {
        assert!(e.check("ok", q).is_empty(), "{q}: {:?}", e.check("ok", q));
    }
    let bad = e.check(
        "x",
        r#"mqtls_connections_open + mqtls_bytes_total{dir="in"} + mqtls_connections_refused_total{reason="unknown"} + sum by (port) (mqtls_devices)"#,
    );
    assert_eq!(bad.len(), 4, "{bad:#?}");
    assert!(bad[0].contains("`mqtls_connections_open` is not a metric"), "{bad:#?}");
    assert!(bad[1].contains("has no label `dir`"), "{bad:#?}");
    assert!(bad[2].contains("[\"unknown\"]"), "{bad:#?}");
    assert!(bad[3].contains("groups by `port`"), "{bad:#?}");
    assert_eq!(e.check("x", "label_values(mqtls_build_info, device)").len(), 1);
    assert_eq!(
        e.check("x", r#"mqtls_bytes_total{direction=~"to_broker|upstream"}"#)
            .len(),
        1
    );
}
