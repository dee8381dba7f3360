//! The `mqtls` binary as an operator runs it: `--help`, `--version`, `check` and `run` as subprocesses.
//! `run` is driven against a real Mosquitto; its readiness and bound address come from the
//! "mqtls ready" line on stderr.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::common;
use crate::common::daemon::{Daemon, BIN, GUARD};
use crate::common::mqtt_client::{device_v4, is_puback_v4, spawn_eventloop_v4, wait_connack_v4};
use crate::common::pki::write_file;
use crate::common::proxy::{DeviceEntry, ProxyConfig};
use crate::common::scenario::Scenario;
use crate::common::{observer, Pki};
use rumqttc::QoS;

fn mqtls(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("MQTLS_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("run mqtls")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A self-signed device certificate for `cn`, valid until `not_after` (year, month, day), written to
/// `<dir>/<cn>/cert.pem` and `key.pem` (0600). `check` loads identities but never contacts the broker,
/// so the issuer does not matter; a chosen expiry date makes the printed date checkable.
fn device_cert(dir: &Path, cn: &str, not_after: (i32, u8, u8)) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, cn);
    params.not_before = rcgen::date_time_ymd(2019, 1, 1);
    params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
    let cert = params.self_signed(&key).expect("self-sign");
    let d = dir.join(cn);
    std::fs::create_dir_all(&d).expect("mkdir");
    write_file(&d.join("cert.pem"), cert.pem().as_bytes(), 0o644);
    write_file(&d.join("key.pem"), key.serialize_pem().as_bytes(), 0o600);
}

/// A config for `check`: "boiler-1" matched by client id alone, "meter-2" by client id and source.
fn check_config(pki: &Pki) -> PathBuf {
    device_cert(pki.dir(), "boiler-1", (2031, 5, 17));
    device_cert(pki.dir(), "meter-2", (2032, 8, 9));
    let path = pki.dir().join("check.toml");
    let text = r#"[listen]
address = "127.0.0.1:1883"

[upstream]
address = "broker.example.com:8883"
ca_file = "ca.pem"

[[device]]
name = "boiler-1"
client_id = "boiler-1"
cert = "boiler-1/cert.pem"
key = "boiler-1/key.pem"

[[device]]
name = "meter-2"
client_id = "meter-2"
source = "192.168.10.22"
cert = "meter-2/cert.pem"
key = "meter-2/key.pem"
"#;
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn help_lists_run_and_check() {
    let out = mqtls(&["--help"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = text(&out.stdout);
    let commands: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(commands.contains(&"run"), "no `run` command in:\n{stdout}");
    assert!(commands.contains(&"check"), "no `check` command in:\n{stdout}");
}

#[test]
fn check_good_config_exits_0_and_prints_each_device_with_subject_and_expiry() {
    let pki = Pki::new();
    let config = check_config(&pki);
    let out = mqtls(&["check", "--config", config.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    for (name, subject, expires) in [
        ("boiler-1", "CN=boiler-1", "2031-05-17"),
        ("meter-2", "CN=meter-2", "2032-08-09"),
    ] {
        let row = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name} in:\n{stdout}"));
        assert!(row.contains(subject), "no {subject} in {row:?}");
        assert!(row.contains(expires), "no expiry date {expires} in {row:?}");
    }
    assert!(
        stdout.contains(&format!("{}: OK: 2 device(s)", config.display())),
        "{stdout}"
    );
}

#[test]
fn check_prints_the_limits_in_force() {
    let pki = Pki::new();
    let config = check_config(&pki);
    let out = mqtls(&["check", "--config", config.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("limits: 10000 connections in all; per address 16 open, 5 new per second, 64 still sending"),
        "{stdout}"
    );
    assert!(stdout.contains("closed after 1h"), "{stdout}");
}

#[test]
fn check_says_what_an_open_fallback_exposes_and_when_it_is_narrowed() {
    let pki = Pki::new();
    let config = check_config(&pki);
    device_cert(pki.dir(), "shared", (2033, 1, 1));
    let fallback = "\n[fallback]\ncert = \"shared/cert.pem\"\nkey = \"shared/key.pem\"\n";
    let base = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{base}{fallback}")).unwrap();
    let out = mqtls(&["check", "--config", config.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: the [fallback] identity serves any client id"),
        "{stderr}"
    );
    assert!(
        stderr.contains(r#"a [fallback] is configured beside 1 device(s) without a `source` rule ("boiler-1")"#),
        "{stderr}"
    );

    let narrowed = format!("{base}{fallback}source = \"192.168.50.0/24\"\nclient_id = [\"guest-*\"]\n");
    std::fs::write(&config, narrowed).unwrap();
    let out = mqtls(&["check", "--config", config.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("serves any client id"), "{stderr}");
    let row = text(&out.stdout)
        .lines()
        .find(|l| l.starts_with("fallback"))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(row.contains("client_id=guest-* source=192.168.50.0/24"), "{row}");
}

#[test]
fn check_warns_about_a_device_matched_by_client_id_alone() {
    let pki = Pki::new();
    let config = check_config(&pki);
    let out = mqtls(&["check", "--config", config.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains(r#"device "boiler-1" is matched by client id alone"#)),
        "{stderr}"
    );
    assert!(
        !warnings.iter().any(|w| w.contains(r#""meter-2""#)),
        "meter-2 has a source rule and must not be warned about:\n{stderr}"
    );
}

#[test]
fn check_warns_about_an_expired_certificate() {
    let pki = Pki::new();
    let config = check_config(&pki);
    device_cert(pki.dir(), "meter-2", (2020, 1, 1));
    let out = mqtls(&["check", "--config", config.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with(r#"warning: device "meter-2": certificate expired"#)),
        "{stderr}"
    );
}

#[test]
fn check_bad_config_exits_1_and_prints_every_problem_naming_file_and_key() {
    let pki = Pki::new();
    let config = check_config(&pki);
    let bad = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            r#"ca_file = "ca.pem""#,
            "ca_file = \"ca.pem\"\nconnect_timeout = \"10 parsecs\"",
        )
        .replace("192.168.10.22", "192.168.10.300");
    std::fs::write(&config, bad).unwrap();
    let out = mqtls(&["check", "--config", config.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let path = config.display();
    for expected in [
        format!("error: {path}: `upstream.connect_timeout`: `10 parsecs` is not a duration"),
        format!(r#"error: {path}: device "meter-2": `source`: `192.168.10.300` is not an IP address"#),
        format!("{path}: 2 problem(s) found"),
    ] {
        assert!(stderr.contains(&expected), "no {expected:?} in:\n{stderr}");
    }
    assert_eq!(text(&out.stdout), "", "no device table for a bad config");
}

#[test]
fn check_missing_file_exits_1_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let out = mqtls(&["check", "--config", missing.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("error: {}: cannot read the file", missing.display())),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// `mqtls run`

/// A config with no broker behind it (nothing connects in the tests that use it).
fn idle_config(pki: &Pki) -> PathBuf {
    idle(pki).write(pki.dir())
}

/// [`idle_config`] before it is written.
fn idle(pki: &Pki) -> ProxyConfig {
    let broker: SocketAddr = "127.0.0.1:1".parse().unwrap();
    ProxyConfig::new(pki, broker).device(DeviceEntry::new(&pki.client("idle-1")))
}

#[tokio::test]
async fn run_relays_a_device_publish_to_the_broker() {
    let setup = Scenario::new().device("cli-sensor").spawn().await;
    let mut watch = observer(&setup.pki, &setup.broker, "sensors/#").await;

    let (client, mut el) = device_v4("cli-sensor", setup.addr, Duration::from_secs(30));
    if let Err(e) = wait_connack_v4(&mut el).await {
        panic!(
            "device refused: {e:?}\nmqtls:\n{}\n{}",
            setup.daemon.stderr(),
            setup.broker.diagnostics()
        );
    }
    client
        .publish("sensors/cli-sensor/temp", QoS::AtLeastOnce, false, "21.5")
        .await
        .unwrap();
    let mut events = spawn_eventloop_v4(el);
    events.wait_for(is_puback_v4, GUARD).await.expect("PUBACK");

    let got = watch.next_message(GUARD).await.expect("observer got nothing");
    assert_eq!(got, ("sensors/cli-sensor/temp".to_string(), b"21.5".to_vec()));
}

#[tokio::test]
async fn run_exits_0_on_sigterm() {
    let pki = Pki::new();
    let mut daemon = Daemon::spawn(&idle_config(&pki));
    daemon.ready().await;
    daemon.wait_signal_handlers().await;
    daemon.signal("TERM");
    let status = daemon.wait_exit(GUARD).await.expect("still running after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status:?}; stderr:\n{}", daemon.stderr());
    daemon.wait_line(&["shutting down", "SIGTERM"]).await;
}

#[tokio::test]
async fn sigterm_right_after_ready_exits_0() {
    let pki = Pki::new();
    let mut daemon = Daemon::spawn(&idle_config(&pki));
    daemon.ready().await;
    daemon.signal("TERM");
    let status = daemon.wait_exit(GUARD).await.expect("still running after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status:?}; stderr:\n{}", daemon.stderr());
}

#[tokio::test]
async fn sighup_does_not_stop_the_daemon() {
    let mut setup = Scenario::new().device("cli-hup").spawn().await;
    let (daemon, addr) = (&mut setup.daemon, setup.addr);
    daemon.signal("HUP");
    daemon.wait_line(&["SIGHUP"]).await;
    let (_client, mut el) = device_v4("cli-hup", addr, Duration::from_secs(30));
    wait_connack_v4(&mut el).await.expect("still serving after SIGHUP");
    drop(el); // the device leaves, so that SIGTERM below has nothing to wait for
    assert!(daemon.child.try_wait().unwrap().is_none(), "SIGHUP stopped mqtls");
    daemon.signal("TERM");
    let status = daemon.wait_exit(GUARD).await.expect("still running after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status:?}; stderr:\n{}", daemon.stderr());
}

#[tokio::test]
async fn run_exits_0_on_sigint() {
    let pki = Pki::new();
    let mut daemon = Daemon::spawn(&idle_config(&pki));
    daemon.ready().await;
    daemon.wait_signal_handlers().await;
    daemon.signal("INT");
    let status = daemon.wait_exit(GUARD).await.expect("still running after SIGINT");
    assert_eq!(status.code(), Some(0), "{status:?}; stderr:\n{}", daemon.stderr());
    daemon.wait_line(&["shutting down", "SIGINT"]).await;
}

#[tokio::test]
async fn run_with_invalid_config_exits_1_and_prints_the_problem() {
    let pki = Pki::new();
    let config = check_config(&pki);
    let bad = std::fs::read_to_string(&config)
        .unwrap()
        .replace("192.168.10.22", "192.168.10.300");
    std::fs::write(&config, bad).unwrap();
    let mut daemon = Daemon::spawn(&config);
    let status = daemon.wait_exit(GUARD).await.expect("mqtls kept running");
    assert_eq!(status.code(), Some(1), "{status:?}");
    let problem = format!(
        r#"{}: device "meter-2": `source`: `192.168.10.300` is not an IP address"#,
        config.display()
    );
    daemon.wait_line(&[&problem]).await;
    assert!(!daemon.stderr().contains("mqtls ready"), "{}", daemon.stderr());
}

#[tokio::test]
async fn run_on_a_taken_port_exits_1_naming_the_address() {
    let pki = Pki::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = idle(&pki).listen(addr).write(pki.dir());
    let mut daemon = Daemon::spawn(&config);
    let status = daemon.wait_exit(GUARD).await.expect("mqtls kept running");
    assert_eq!(status.code(), Some(1), "{status:?}");
    daemon.wait_line(&[&format!("cannot listen on {addr}")]).await;
    drop(taken);
}

#[tokio::test]
async fn a_closed_stderr_does_not_stop_the_daemon() {
    use tokio::io::AsyncWriteExt;

    let pki = Pki::new();
    let port = common::mosquitto::free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = idle(&pki).listen(addr).write(pki.dir());
    let mut child = Daemon::command(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Nobody reads the logs (journald restarted, the pipe's reader died): every log line mqtls writes
    // from its first one on fails.
    drop(child.stderr.take());
    let deadline = tokio::time::Instant::now() + GUARD;
    let mut dev = loop {
        if let Ok(s) = tokio::net::TcpStream::connect(addr).await {
            break s;
        }
        assert!(child.try_wait().unwrap().is_none(), "mqtls exited: {:?}", child.wait());
        assert!(tokio::time::Instant::now() < deadline, "mqtls never listened on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    dev.write_all(&common::raw::connect(common::raw::Version::V311, "nobody", 0))
        .await
        .unwrap();
    let connack = common::raw::expect_connack(&mut dev, common::raw::Version::V311, GUARD).await;
    assert_eq!(connack.code, 2, "the refusal is logged (into the void), then answered");
    assert!(child.try_wait().unwrap().is_none(), "mqtls died when its stderr closed");
    let _ = child.kill();
    let _ = child.wait();
}
