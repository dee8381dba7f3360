//! Per-device CONNECT rewriting (`connect.client_id`, `connect.username`, `connect.password`,
//! `connect.password_file`) against a real Mosquitto, and against a TLS upstream that records the very
//! bytes it received: devices that share a client id keep a session each, an old password never leaves
//! the gateway, a client id another device presents is never presented twice, and `mqtls check` shows
//! and judges what each device presents.
//!
//! Devices are raw sockets (the exact CONNECT matters) bound to 127.0.0.1 and 127.0.0.2, so that `source`
//! rules can tell them apart.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use mqtls::mqtt::ConnectView;
use mqtls::rewrite::{Change, RewriteSpec};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::common::codec::{self, Connack, Version};
use crate::common::daemon::BIN;
use crate::common::logs::Logs;
use crate::common::pki::write_file;
use crate::common::proxy::{DeviceEntry, ProxyConfig, RunningProxy};
use crate::common::raw::{self, peek_state, PeekState};
use crate::common::scenario::{Running, Scenario};
use crate::common::{observer, EchoMode, Pki, TlsEcho};

/// Guard against hangs; nothing here is a performance threshold.
const WAIT: Duration = Duration::from_secs(15);
/// Publishes each device makes while the other one publishes too.
const ROUNDS: u16 = 10;

const HOST_A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const HOST_B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A raw device on `from` connected to `to` that sent `connect`; returns the socket and the CONNACK.
async fn connect_from(from: IpAddr, to: SocketAddr, connect: &codec::Connect) -> (TcpStream, Connack) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind local address");
    let mut stream = socket.connect(to).await.expect("connect");
    stream.set_nodelay(true).unwrap();
    stream.write_all(&connect.encode()).await.expect("send CONNECT");
    let ack = raw::expect_connack(&mut stream, connect.version, WAIT).await;
    (stream, ack)
}

/// A QoS 1 PUBLISH to `topic` and its PUBACK: proof that the device's session at the broker is alive.
async fn publish(stream: &mut TcpStream, version: Version, topic: &str, id: u16) -> Result<(), String> {
    stream
        .write_all(&codec::publish(version, topic, 1, id, b"reading"))
        .await
        .map_err(|e| format!("send PUBLISH: {e}"))?;
    let p = raw::read_packet(stream, Instant::now() + WAIT).await?;
    match codec::parse_puback(&p) {
        Ok(got) if got == id => Ok(()),
        other => Err(format!("expected PUBACK {id}, got {other:?}")),
    }
}

/// A port on 127.0.0.1 held (bound, not listening) until mqtls has bound its own listener on it.
fn reserve_port() -> (TcpSocket, SocketAddr) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
    let addr = socket.local_addr().expect("local addr");
    (socket, addr)
}

/// Two devices, `esp-a` from 127.0.0.1 and `esp-b` from 127.0.0.2, both sending the client id
/// `ESP8266Client`, each with its own certificate; `rewrite` gives each `connect.client_id = "{name}"`.
async fn shared_client_id(rewrite: bool) -> Running {
    let entry = move |source: &'static str| {
        move |d: DeviceEntry| {
            let d = d.client_id(Some("ESP8266Client")).source(source);
            match rewrite {
                true => d.connect("client_id", "\"{name}\""),
                false => d,
            }
        }
    };
    Scenario::new()
        .device_with("esp-a", entry("127.0.0.1"))
        .device_with("esp-b", entry("127.0.0.2"))
        .start()
        .await
}

#[tokio::test]
async fn two_devices_sharing_a_client_id_told_apart_by_source_each_keep_a_session_when_rewritten() {
    let (logs, _g) = Logs::capture();
    let setup = shared_client_id(true).await;
    let mut observer = observer(&setup.pki, &setup.broker, "sensors/#").await;
    let addr = setup.proxy.addr();
    let shared = codec::Connect::new(Version::V311, "ESP8266Client", 60);
    let (mut a, ack_a) = connect_from(HOST_A, addr, &shared).await;
    let (mut b, ack_b) = connect_from(HOST_B, addr, &shared).await;
    assert_eq!((ack_a.code, ack_b.code), (0, 0));

    // Both publish, turn about, for the whole test; every PUBACK proves the session is still there.
    for id in 1..=ROUNDS {
        publish(&mut a, Version::V311, "sensors/esp-a/t", id)
            .await
            .unwrap_or_else(|e| panic!("esp-a, round {id}: {e}\n{}", setup.broker.log()));
        publish(&mut b, Version::V311, "sensors/esp-b/t", id)
            .await
            .unwrap_or_else(|e| panic!("esp-b, round {id}: {e}\n{}", setup.broker.log()));
    }
    let mut topics = Vec::new();
    while topics.len() < 2 * usize::from(ROUNDS) {
        let (topic, _) = observer
            .next_message(WAIT)
            .await
            .expect("every reading reaches the broker");
        topics.push(topic);
    }
    assert_eq!(
        topics.iter().filter(|t| *t == "sensors/esp-a/t").count(),
        usize::from(ROUNDS)
    );
    assert_eq!(peek_state(&a), PeekState::OpenQuiet, "esp-a is still connected");
    assert_eq!(peek_state(&b), PeekState::OpenQuiet, "esp-b is still connected");

    let log = setup.broker.log();
    assert!(!log.contains("already connected"), "a session was taken over:\n{log}");
    assert!(log.contains(" as esp-a ") && log.contains(" as esp-b "), "{log}");
    assert!(!log.contains(" as ESP8266Client "), "{log}");
    let opened = logs
        .wait_line(&["connection opened", "broker_client_id=\"esp-b\""], WAIT)
        .await
        .unwrap();
    assert!(
        opened.contains("client_id=\"ESP8266Client\""),
        "both ids logged: {opened}"
    );
}

#[tokio::test]
async fn without_a_rewrite_two_devices_sharing_a_client_id_knock_each_other_off() {
    let setup = shared_client_id(false).await;
    let addr = setup.proxy.addr();
    let shared = codec::Connect::new(Version::V311, "ESP8266Client", 60);
    let (mut a, ack) = connect_from(HOST_A, addr, &shared).await;
    assert_eq!(ack.code, 0);
    publish(&mut a, Version::V311, "sensors/esp-a/t", 1).await.unwrap();

    // esp-b connects: the broker closes esp-a's session, and mqtls passes the close on.
    let (mut b, ack) = connect_from(HOST_B, addr, &shared).await;
    assert_eq!(ack.code, 0);
    raw::read_until_closed(&mut a, Instant::now() + WAIT)
        .await
        .unwrap_or_else(|e| panic!("esp-a should have been knocked off: {e}"));
    // esp-a comes back, as a legacy device does: now esp-b is knocked off.
    let (_a, ack) = connect_from(HOST_A, addr, &shared).await;
    assert_eq!(ack.code, 0);
    raw::read_until_closed(&mut b, Instant::now() + WAIT)
        .await
        .unwrap_or_else(|e| panic!("esp-b should have been knocked off: {e}"));
    setup
        .broker
        .wait_for_log(
            "Client ESP8266Client already connected, closing old connection",
            2,
            WAIT,
        )
        .await
        .unwrap();
}

/// Two meters on listeners of their own that send an empty client id, each rewritten to its name;
/// `clean` is the clean session flag they send.
async fn empty_client_ids(rewrite: bool) -> (Running, SocketAddr, SocketAddr) {
    let (held_a, own_a) = reserve_port();
    let (held_b, own_b) = reserve_port();
    let entry = move |listen: SocketAddr| {
        move |d: DeviceEntry| {
            let d = d.client_id(None).listen(listen);
            match rewrite {
                true => d.connect("client_id", "\"{name}\""),
                false => d,
            }
        }
    };
    let setup = Scenario::new()
        .device_with("meter-a", entry(own_a))
        .device_with("meter-b", entry(own_b))
        .start()
        .await;
    drop((held_a, held_b));
    (setup, own_a, own_b)
}

#[tokio::test]
async fn two_devices_with_an_empty_client_id_on_listeners_of_their_own_each_keep_a_session_when_rewritten() {
    let (setup, own_a, own_b) = empty_client_ids(true).await;
    let empty = codec::Connect::new(Version::V311, "", 60);
    let (mut a, ack_a) = connect_from(HOST_A, own_a, &empty).await;
    let (mut b, ack_b) = connect_from(HOST_A, own_b, &empty).await;
    assert_eq!((ack_a.code, ack_b.code), (0, 0));
    for id in 1..=ROUNDS {
        publish(&mut a, Version::V311, "sensors/meter-a/t", id).await.unwrap();
        publish(&mut b, Version::V311, "sensors/meter-b/t", id).await.unwrap();
    }
    assert_eq!(peek_state(&a), PeekState::OpenQuiet);
    assert_eq!(peek_state(&b), PeekState::OpenQuiet);
    let log = setup.broker.log();
    assert!(log.contains(" as meter-a ") && log.contains(" as meter-b "), "{log}");
    assert!(!log.contains("already connected"), "{log}");
}

#[tokio::test]
async fn an_empty_client_id_without_a_clean_session_is_refused_by_the_broker_unless_rewritten() {
    // MQTT 3.1.1 (3.1.3-8): a server refuses an empty client id that asks for a lasting session.
    let mut lasting = codec::Connect::new(Version::V311, "", 60);
    lasting.properties.clear();
    let mut bytes = lasting.encode();
    bytes[9] &= !0x02; // clean session off

    let (_setup, own_a, _) = empty_client_ids(false).await;
    let mut s = raw::device(own_a).await;
    s.write_all(&bytes).await.unwrap();
    let ack = raw::expect_connack(&mut s, Version::V311, WAIT).await;
    assert_eq!(ack.code, 0x02, "identifier rejected, by the broker");

    let (setup, own_a, _) = empty_client_ids(true).await;
    for (round, session_present) in [(1, false), (2, true)] {
        let mut s = raw::device(own_a).await;
        s.write_all(&bytes).await.unwrap();
        let ack = raw::expect_connack(&mut s, Version::V311, WAIT).await;
        assert_eq!(ack.code, 0, "round {round}");
        assert_eq!(
            ack.session_present, session_present,
            "round {round}: the broker kept the session"
        );
        s.write_all(&codec::disconnect()).await.unwrap();
        raw::read_until_closed(&mut s, Instant::now() + WAIT).await.unwrap();
    }
    assert!(setup.broker.log().contains(" as meter-a "));
}

#[tokio::test]
async fn an_mqtt5_device_with_an_empty_client_id_gets_the_brokers_connack_unchanged() {
    let (held, own) = reserve_port();
    let setup = Scenario::new()
        .device_with("meter-5", move |d| {
            d.client_id(None).listen(own).connect("client_id", "\"{name}\"")
        })
        .device_with("meter-6", |d| d.client_id(None).source("127.0.0.2"))
        .start()
        .await;
    drop(held);
    let empty = codec::Connect::new(Version::V5, "", 60);
    // Rewritten: the broker sees "meter-5", assigns nothing, and the device is told nothing more.
    let (_a, ack) = connect_from(HOST_A, own, &empty).await;
    assert_eq!(ack.code, 0);
    assert!(
        !ack.properties.iter().any(|(id, _)| *id == 0x12),
        "no Assigned Client Identifier: {ack:?}"
    );
    // Not rewritten: the broker's own Assigned Client Identifier passes through as it came.
    let (_b, ack) = connect_from(HOST_B, setup.proxy.addr(), &empty).await;
    assert_eq!(ack.code, 0);
    assert!(ack.properties.iter().any(|(id, _)| *id == 0x12), "{ack:?}");
}

#[tokio::test]
async fn a_device_sending_the_client_id_another_device_presents_is_refused() {
    let setup = Scenario::new()
        .device_with("esp-a", |d| {
            d.client_id(Some("ESP8266Client"))
                .source("127.0.0.1")
                .connect("client_id", "\"{name}\"")
        })
        .device_with("lab", |d| d.client_id(None).source("127.0.0.2"))
        .start()
        .await;
    let addr = setup.proxy.addr();
    let (mut a, ack) = connect_from(HOST_A, addr, &codec::Connect::new(Version::V311, "ESP8266Client", 60)).await;
    assert_eq!(ack.code, 0);
    // "lab" passes on whatever its devices send, except a client id that esp-a presents at the broker.
    let (_f, ack) = connect_from(HOST_B, addr, &codec::Connect::new(Version::V311, "esp-a", 60)).await;
    assert_eq!(ack.code, 0x02, "identifier rejected");
    let (_f, ack) = connect_from(HOST_B, addr, &codec::Connect::new(Version::V5, "esp-a", 60)).await;
    assert_eq!(ack.code, 0x87, "not authorized");
    let (_l, ack) = connect_from(HOST_B, addr, &codec::Connect::new(Version::V311, "bench-1", 60)).await;
    assert_eq!(ack.code, 0, "any other client id");
    publish(&mut a, Version::V311, "sensors/esp-a/t", 1).await.unwrap();
    assert!(!setup.broker.log().contains("already connected"));
    let refused = setup.proxy.handle.metrics().render();
    assert!(
        refused.contains("mqtls_connections_refused_total{reason=\"client_id_spoofed\"} 2"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_rewrite_that_cannot_be_made_is_refused_identifier_rejected() {
    let (logs, _g) = Logs::capture();
    let setup = Scenario::new()
        .device_with("tag", |d| {
            d.client_id(None)
                .source("127.0.0.1")
                .connect("client_id", "\"t-{client_id}\"")
        })
        .start()
        .await;
    let addr = setup.proxy.addr();
    let (_s, ack) = connect_from(HOST_A, addr, &codec::Connect::new(Version::V5, "bell\u{7}", 60)).await;
    assert_eq!(ack.code, 0x85, "client identifier not valid");
    let (_s, ack) = connect_from(HOST_A, addr, &codec::Connect::new(Version::V31, &"x".repeat(30), 60)).await;
    assert_eq!(ack.code, 0x02, "3.1 client ids are at most 23 characters");
    logs.wait_line(&["rewrite_failed", "holds the character '\\u{7}'"], WAIT)
        .await
        .unwrap();
    assert_eq!(setup.broker.connections_from_log(), 0, "the broker was never reached");
}

// ---------------------------------------------------------------------------------------------------------
// Passwords

#[tokio::test]
async fn a_password_dropped_by_the_rewrite_never_reaches_the_broker_and_one_from_a_file_does() {
    let pki = Pki::new();
    let upstream = TlsEcho::start(&pki, EchoMode::ConnackThenDigest).await;
    let secrets = pki.dir().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    write_file(&secrets.join("boiler-2"), b"cert-and-password\n", 0o600);
    let config = ProxyConfig::new(&pki, upstream.addr())
        .device(DeviceEntry::new(&pki.client("boiler-1")).connect("password", "false"))
        .device(
            DeviceEntry::new(&pki.client("boiler-2"))
                .connect("username", "\"svc-{name}\"")
                .connect("password_file", "\"secrets/boiler-2\""),
        );
    let proxy = RunningProxy::start(&config, pki.dir()).await;
    let mut devices = Vec::new();
    for id in ["boiler-1", "boiler-2"] {
        let login = codec::Connect::new(Version::V311, id, 60).login("admin", b"legacy-secret");
        let (mut s, ack) = connect_from(HOST_A, proxy.addr(), &login).await;
        assert_eq!(ack.code, 0, "{id}");
        s.write_all(&codec::disconnect()).await.unwrap();
        s.shutdown().await.unwrap();
        devices.push(s);
    }
    let finished = upstream.wait_finished(2, WAIT).await.unwrap();
    for record in &finished {
        let got = &record.received;
        assert!(
            !got.windows(13).any(|w| w == b"legacy-secret"),
            "the device's password reached the broker: {got:02x?}"
        );
        let (connect, len) = ConnectView::parse(got, got.len()).expect("a CONNECT arrived");
        assert_eq!(&got[len..], codec::disconnect(), "then the DISCONNECT, as sent");
        match connect.client_id {
            "boiler-1" => assert_eq!((connect.username, connect.password), (Some("admin"), None)),
            "boiler-2" => assert_eq!(
                (connect.username, connect.password),
                (Some("svc-boiler-2"), Some(&b"cert-and-password"[..]))
            ),
            other => panic!("unexpected client id {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Configuration and `mqtls check`

/// A config with `body` (device entries) after a minimal `[listen]` and `[upstream]`, in `dir`.
fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("mqtls.toml");
    let text = format!(
        "[listen]\naddress = \"127.0.0.1:0\"\n\n[upstream]\naddress = \"broker.example.com:8883\"\nca_file = {:?}\n\n{body}",
        dir.join("ca.pem")
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A `[[device]]` entry for the certificate `pki` makes for `name`, with `extra` lines.
fn device(pki: &Pki, name: &str, extra: &str) -> String {
    let cert = pki.client(name);
    format!(
        "[[device]]\nname = {name:?}\ncert = {:?}\nkey = {:?}\n{extra}\n",
        cert.cert, cert.key
    )
}

fn check(path: &Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["check", "--config", path.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .expect("run mqtls check");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[test]
fn connect_keys_are_read_wherever_a_device_is_configured() {
    let pki = Pki::new();
    std::fs::write(pki.dir().join("ca.pem"), std::fs::read(pki.ca_pem_path()).unwrap()).unwrap();
    let fleet = pki.dir().join("fleet");
    pki.client_in(&fleet.join("meter-7"), "meter-7");
    pki.client_in(&fleet.join("meter-8"), "meter-8");
    write_file(&fleet.join("meter-8/password"), b"pw\n", 0o600);
    std::fs::write(
        fleet.join("meter-8/device.toml"),
        "client_id = \"ESP8266Client\"\nsource = \"10.0.0.8\"\n[connect]\nusername = true\npassword_file = \"password\"\n",
    )
    .unwrap();
    let fallback = pki.client_in(&pki.dir().join("fallback"), "guest");
    let body = format!(
        "{}{}{}[device_dir]\npath = \"fleet\"\nsource = \"10.0.0.0/24\"\nconnect.client_id = \"{{name}}\"\nconnect.username = false\n\n\
         [fallback]\ncert = {:?}\nkey = {:?}\nclient_id = \"guest-*\"\nconnect.password = false\n",
        device(&pki, "boiler-1", "client_id = \"boiler-1\"\nsource = \"10.2.0.1\"\nconnect.client_id = \"b-{source}\""),
        device(&pki, "pump-2", "source = \"10.1.0.2\"\n[device.connect]\nclient_id = \"{cn}\"\npassword = false"),
        device(&pki, "gate-3", "client_id = \"gate-3\"\nsource = \"10.3.0.3\""),
        fallback.cert,
        fallback.key,
    );
    let path = write_config(pki.dir(), &body);
    let loaded = mqtls::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let spec = |name: &str| -> RewriteSpec {
        let d = loaded.config.devices.iter().find(|d| d.name == name).unwrap();
        d.connect.clone()
    };
    let template = |s: &RewriteSpec| s.client_id.as_ref().map(ToString::to_string);
    assert_eq!(template(&spec("boiler-1")).as_deref(), Some("b-{source}"));
    assert_eq!(template(&spec("pump-2")).as_deref(), Some("{cn}"));
    assert_eq!(spec("pump-2").password, Some(Change::Drop));
    assert_eq!(spec("gate-3"), RewriteSpec::default(), "no connect keys, no rewrite");
    assert_eq!(
        template(&spec("meter-7")).as_deref(),
        Some("{name}"),
        "the directory's default"
    );
    assert_eq!(spec("meter-7").username, Some(Change::Drop));
    assert_eq!(
        spec("meter-8").username,
        Some(Change::Keep),
        "device.toml wins over the default"
    );
    assert_eq!(
        spec("meter-8").password_file(),
        Some(fleet.join("meter-8/password").as_path()),
        "found beside device.toml"
    );
    let fallback = loaded.config.fallback.as_ref().unwrap();
    assert_eq!(fallback.connect.password, Some(Change::Drop));

    // `check` prints what each one presents to the broker.
    let (code, stdout, stderr) = check(&path);
    assert_eq!(code, 0, "{stderr}");
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{stdout}"))
            .to_string()
    };
    assert!(stdout.lines().next().unwrap().contains("TO BROKER"), "{stdout}");
    assert!(row("boiler-1").ends_with("client_id=b-{source}"), "{}", row("boiler-1"));
    assert!(
        row("pump-2").ends_with("client_id=pump-2 password=(dropped)"),
        "{}",
        row("pump-2")
    );
    assert!(row("gate-3").ends_with("client_id=gate-3"), "{}", row("gate-3"));
    assert!(row("meter-7").ends_with("client_id=meter-7 username=(dropped)"));
    assert!(row("meter-8").ends_with("client_id=meter-8 password=(from file)"));
    assert!(row("fallback").ends_with("client_id=(as sent) password=(dropped)"));
}

#[test]
fn check_warns_about_devices_that_present_the_same_client_id() {
    let pki = Pki::new();
    std::fs::write(pki.dir().join("ca.pem"), std::fs::read(pki.ca_pem_path()).unwrap()).unwrap();
    let body = [
        device(&pki, "esp-a", "client_id = \"ESP8266Client\"\nsource = \"10.0.0.1\""),
        device(&pki, "esp-b", "client_id = \"ESP8266Client\"\nsource = \"10.0.0.2\""),
        device(&pki, "open", "source = \"10.0.1.1\""),
        device(&pki, "batch", "source = \"10.0.2.0/24\"\nconnect.client_id = \"batch\""),
        device(
            &pki,
            "tags",
            "source = \"10.0.3.0/24\"\nconnect.client_id = \"{client_id}-x\"",
        ),
        device(&pki, "boiler-x", "client_id = \"boiler-x\"\nsource = \"10.0.4.1\""),
    ]
    .concat();
    let (code, _, stderr) = check(&write_config(pki.dir(), &body));
    assert_eq!(code, 0, "warnings, not errors: {stderr}");
    let warned = |needles: &[&str]| {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("warning: ") && needles.iter().all(|n| l.contains(n))),
            "no warning with {needles:?}:\n{stderr}"
        )
    };
    warned(&[
        "\"esp-a\", \"esp-b\"",
        "\"ESP8266Client\"",
        "each connection closes the other's session",
    ]);
    warned(&["matched by source or listen alone", "\"open\""]);
    warned(&["device \"batch\" presents the one client id \"batch\""]);
    warned(&["device \"tags\"'s connect.client_id ({client_id}-x) can give \"boiler-x\""]);
}

#[test]
fn check_refuses_two_devices_that_would_present_the_same_client_id_and_names_each() {
    let pki = Pki::new();
    std::fs::write(pki.dir().join("ca.pem"), std::fs::read(pki.ca_pem_path()).unwrap()).unwrap();
    let body = [
        device(&pki, "esp-a", "source = \"10.0.0.1\"\nconnect.client_id = \"sensor\""),
        device(&pki, "esp-b", "source = \"10.0.0.2\"\nconnect.client_id = \"sensor\""),
        device(&pki, "pump-1", "client_id = \"pump-1\"\nsource = \"10.0.9.1\""),
        device(&pki, "pump-x", "source = \"10.0.0.3\"\nconnect.client_id = \"pump-1\""),
    ]
    .concat();
    let path = write_config(pki.dir(), &body);
    let (code, _, stderr) = check(&path);
    assert_eq!(code, 1, "{stderr}");
    let file = path.display().to_string();
    assert!(
        stderr.contains(&format!(
            "error: {file}: device \"esp-b\": `connect.client_id`: presents the client id \"sensor\" to the broker, as device \"esp-a\" does"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "error: {file}: device \"pump-x\": `connect.client_id`: presents the client id \"pump-1\" to the broker, which device \"pump-1\" names and presents"
        )),
        "{stderr}"
    );
}

#[test]
fn check_names_the_file_key_and_device_of_a_template_it_cannot_use() {
    let pki = Pki::new();
    std::fs::write(pki.dir().join("ca.pem"), std::fs::read(pki.ca_pem_path()).unwrap()).unwrap();
    let fleet = pki.dir().join("fleet");
    pki.client_in(&fleet.join("meter-7"), "meter-7");
    std::fs::write(fleet.join("meter-7/device.toml"), "connect.username = \"{user}\"\n").unwrap();
    write_file(&pki.dir().join("open-password"), b"pw", 0o644);
    let body = [
        device(
            &pki,
            "boiler-1",
            "client_id = \"boiler-1\"\nconnect.client_id = \"b-{host}\"",
        ),
        device(
            &pki,
            "boiler-2",
            "client_id = \"boiler-2\"\nconnect.password = \"hunter2\"",
        ),
        device(&pki, "boiler-3", "client_id = \"boiler-3\"\nconnect.client_id = \"\""),
        device(
            &pki,
            "boiler-4",
            "client_id = \"boiler-4\"\nconnect.password_file = \"open-password\"",
        ),
        "[device_dir]\npath = \"fleet\"\n".to_string(),
    ]
    .concat();
    let path = write_config(pki.dir(), &body);
    let (code, _, stderr) = check(&path);
    assert_eq!(code, 1, "{stderr}");
    let file = path.display().to_string();
    let expected = [
        format!("error: {file}: device \"boiler-1\": `connect.client_id`: `b-{{host}}`: unknown placeholder {{host}}; the placeholders are {{name}}, {{cn}}, {{client_id}}, {{source}}"),
        format!("error: {file}: device \"boiler-2\": `connect.password`: a password is never written in the configuration"),
        format!("error: {}: device \"meter-7\": `connect.username`: `{{user}}`: unknown placeholder {{user}}", fleet.join("meter-7/device.toml").display()),
    ];
    for e in &expected {
        assert!(
            stderr.lines().any(|l| l.starts_with(e.as_str())),
            "missing {e:?} in:\n{stderr}"
        );
    }
    assert!(!stderr.contains("hunter2"), "the password is never repeated:\n{stderr}");

    // Once the text is valid, what can only be known with the files: an empty client id, an open file.
    let body = body
        .replace("b-{host}", "b-{name}")
        .replace("connect.password = \"hunter2\"", "connect.password = false");
    std::fs::write(fleet.join("meter-7/device.toml"), "connect.username = \"{cn}\"\n").unwrap();
    let path = write_config(pki.dir(), &body);
    let (code, _, stderr) = check(&path);
    assert_eq!(code, 1, "{stderr}");
    for e in [
        format!("error: {file}: device \"boiler-3\": `connect.client_id`: gives the client id \"\", which is empty"),
        format!("error: {file}: device \"boiler-4\": `connect.password_file`: {}: the password file is readable by group or others (mode 0644)", pki.dir().join("open-password").display()),
    ] {
        assert!(stderr.lines().any(|l| l.starts_with(e.as_str())), "missing {e:?} in:\n{stderr}");
    }
}
