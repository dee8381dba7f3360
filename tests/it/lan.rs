//! mqtls on a LAN where anything can connect: no device's identity can be borrowed, no host can hold the
//! gateway, a flood cannot flood the log, and every malformed first packet has its defined answer. mqtls
//! runs in-process in front of a real Mosquitto; the hostile hosts are raw sockets bound to other loopback
//! addresses (127.0.0.2 and up), the real devices are raw sockets or rumqttc from 127.0.0.1.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::common::codec::{self, Version};
use crate::common::logs::Logs;
use crate::common::proxy::{DeviceEntry, RunningProxy};
use crate::common::raw::{self, Closed};
use crate::common::scenario::{Running, Scenario};
use crate::common::wait_until;

/// Guard against hangs; nothing here is a performance threshold.
const WAIT: Duration = Duration::from_secs(10);

const DEVICE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
const STRANGER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// A raw device connected from `from` to `to` that sent `connect` and read its CONNACK.
async fn connect_from(from: IpAddr, to: SocketAddr, connect: &codec::Connect) -> (TcpStream, u8) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind local address");
    let mut stream = socket.connect(to).await.expect("connect");
    stream.set_nodelay(true).unwrap();
    stream.write_all(&connect.encode()).await.expect("send CONNECT");
    let ack = raw::expect_connack(&mut stream, connect.version, WAIT).await;
    (stream, ack.code)
}

/// QoS 1 PUBLISH (packet id `id`), then its PUBACK: the session at the broker is alive.
async fn still_served(stream: &mut TcpStream, topic: &str, id: u16) {
    stream
        .write_all(&codec::publish(Version::V311, topic, 1, id, b"still here"))
        .await
        .expect("send PUBLISH");
    let p = raw::read_packet(stream, Instant::now() + WAIT)
        .await
        .unwrap_or_else(|e| panic!("the device's session is gone: {e}"));
    assert_eq!(codec::parse_puback(&p), Ok(id));
}

/// The value of one series in the proxy's exposition, 0 when absent.
fn counter(proxy: &RunningProxy, series: &str) -> f64 {
    let text = proxy.handle.metrics().render();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn refused(proxy: &RunningProxy, reason: &str) -> f64 {
    counter(
        proxy,
        &format!("mqtls_connections_refused_total{{reason=\"{reason}\"}}"),
    )
}

// ---------------------------------------------------------------------------------------------------------
// No identity borrowed

/// How the real device is matched.
#[derive(Debug, Clone, Copy)]
enum Way {
    /// Client id + source 127.0.0.1.
    ClientIdAndSource,
    /// Client id + a listener of its own.
    ClientIdAndListener,
    /// A device-directory entry (client id = its name) whose device.toml gives source 127.0.0.1.
    DeviceDirectory,
}

/// mqtls with the real device `owner` matched as `way`, and a fallback if asked. Returns the setup and
/// the address the real device connects to.
async fn owner_setup(way: Way, fallback: bool) -> (Running, SocketAddr) {
    let (held, own) = reserve_port();
    let setup = Scenario::new()
        .configure(move |pki, cfg| {
            match way {
                Way::ClientIdAndSource => {
                    *cfg = cfg
                        .clone()
                        .device(DeviceEntry::new(&pki.client("owner")).source("127.0.0.1"));
                }
                Way::ClientIdAndListener => {
                    *cfg = cfg.clone().device(DeviceEntry::new(&pki.client("owner")).listen(own));
                }
                Way::DeviceDirectory => {
                    let entry = pki.dir().join("fleet").join("owner");
                    pki.client_in(&entry, "owner");
                    std::fs::write(entry.join("device.toml"), "source = \"127.0.0.1\"\n").unwrap();
                    cfg.extra.push_str("\n[device_dir]\npath = \"fleet\"\n");
                }
            }
            if fallback {
                let shared = pki.client_in(&pki.dir().join("fallback"), "gateway-shared");
                cfg.extra.push_str(&format!(
                    "\n[fallback]\ncert = {:?}\nkey = {:?}\n",
                    shared.cert, shared.key
                ));
            }
        })
        .start()
        .await;
    drop(held);
    let addr = match way {
        Way::ClientIdAndListener => own,
        _ => setup.proxy.addr(),
    };
    (setup, addr)
}

/// A port on 127.0.0.1 held (bound, not listening) until mqtls has bound its own listener on it.
fn reserve_port() -> (TcpSocket, SocketAddr) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
    let addr = socket.local_addr().expect("local addr");
    (socket, addr)
}

#[tokio::test]
async fn a_forged_client_id_never_takes_a_devices_session_however_the_device_is_matched() {
    for way in [Way::ClientIdAndSource, Way::ClientIdAndListener, Way::DeviceDirectory] {
        for fallback in [false, true] {
            let (logs, _g) = Logs::capture();
            let (setup, owner_addr) = owner_setup(way, fallback).await;
            let case = format!("{way:?}, fallback: {fallback}");
            let (mut owner, code) =
                connect_from(DEVICE, owner_addr, &codec::Connect::new(Version::V311, "owner", 60)).await;
            assert_eq!(code, 0, "the real device is served ({case})");
            still_served(&mut owner, "sensors/owner/t", 1).await;

            // From another address (or the shared listener, where the device has a listener of its own).
            let forge_from = match way {
                Way::ClientIdAndListener => DEVICE,
                _ => STRANGER,
            };
            let shared = setup.proxy.addr();
            let (_f, v4) = connect_from(forge_from, shared, &codec::Connect::new(Version::V311, "owner", 60)).await;
            assert_eq!(v4, 0x02, "3.1.1: identifier rejected ({case})");
            let (_f, v5) = connect_from(forge_from, shared, &codec::Connect::new(Version::V5, "owner", 60)).await;
            assert_eq!(v5, 0x87, "5.0: not authorized ({case})");

            // The real device's session was never touched: it still publishes, and the broker never saw the
            // client id twice.
            still_served(&mut owner, "sensors/owner/t", 2).await;
            let log = setup.broker.log();
            assert!(
                !log.contains("already connected"),
                "{case}: a session was taken over:\n{log}"
            );
            assert_eq!(refused(&setup.proxy, "client_id_spoofed"), 2.0, "{case}");
            let line = logs
                .wait_line(&["client_id_spoofed", "owner=owner", "127.0.0."], WAIT)
                .await
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            assert!(line.contains("peer="), "the source address is logged: {line}");
        }
    }
}

#[tokio::test]
async fn the_fallback_serves_only_the_sources_and_client_ids_it_is_given() {
    let setup = Scenario::new()
        .configure(|pki, cfg| {
            let shared = pki.client_in(&pki.dir().join("fallback"), "gateway-shared");
            cfg.extra = format!(
                "\n[fallback]\ncert = {:?}\nkey = {:?}\nsource = \"127.0.0.2\"\nclient_id = [\"lab-*\"]\n",
                shared.cert, shared.key
            );
        })
        .start()
        .await;
    let addr = setup.proxy.addr();
    let (_ok, code) = connect_from(STRANGER, addr, &codec::Connect::new(Version::V311, "lab-7", 60)).await;
    assert_eq!(code, 0, "an allowed address and client id get the fallback");
    let (_a, code) = connect_from(DEVICE, addr, &codec::Connect::new(Version::V311, "lab-8", 60)).await;
    assert_eq!(code, 0x02, "another address does not");
    let (_b, code) = connect_from(STRANGER, addr, &codec::Connect::new(Version::V311, "pump-1", 60)).await;
    assert_eq!(code, 0x02, "another client id does not");
    assert_eq!(refused(&setup.proxy, "unknown_device"), 2.0);
}

// ---------------------------------------------------------------------------------------------------------
// No host holds the gateway

/// A real device from 127.0.0.1 (client id + source), and whatever 127.0.0.2 sends served by a device
/// matched by that source alone; per-source limits as given.
async fn crowded_setup(max_per_source: usize, per_second: u32) -> Running {
    Scenario::new()
        .device_with("real-1", |d| d.source("127.0.0.1"))
        .configure(move |pki, cfg| {
            let any = pki.client("noisy-host");
            *cfg = cfg
                .clone()
                .device(DeviceEntry::new(&any).client_id(None).source("127.0.0.2"));
            cfg.max_connections_per_source = Some(max_per_source);
            cfg.max_connects_per_source_per_second = Some(per_second);
        })
        .start()
        .await
}

#[tokio::test]
async fn a_host_at_its_connection_share_is_told_busy_while_another_address_connects_at_once() {
    let setup = crowded_setup(3, 1000).await;
    let addr = setup.proxy.addr();
    let mut held = Vec::new();
    for i in 0..3 {
        let (s, code) = connect_from(
            STRANGER,
            addr,
            &codec::Connect::new(Version::V311, &format!("n-{i}"), 0),
        )
        .await;
        assert_eq!(code, 0, "within the share");
        held.push(s);
    }
    // The refused sockets close at once: a refusal counts against its address until it has ended.
    let (_, code) = connect_from(STRANGER, addr, &codec::Connect::new(Version::V5, "n-3", 0)).await;
    assert_eq!(code, 0x97, "5.0: quota exceeded");
    let (_, code) = connect_from(STRANGER, addr, &codec::Connect::new(Version::V311, "n-4", 0)).await;
    assert_eq!(code, 0x03, "3.1.1: server unavailable");
    let (mut real, code) = connect_from(DEVICE, addr, &codec::Connect::new(Version::V311, "real-1", 60)).await;
    assert_eq!(code, 0, "another address is not held back");
    still_served(&mut real, "sensors/real-1/t", 1).await;
    assert_eq!(refused(&setup.proxy, "source_connections"), 2.0);
    drop(held.pop());
    let freed = wait_until(WAIT, || {
        counter(&setup.proxy, "mqtls_connections_active{device=\"noisy-host\"}") == 2.0
    })
    .await;
    assert!(freed, "the closed connection was not given back");
    let (_s, code) = connect_from(STRANGER, addr, &codec::Connect::new(Version::V311, "n-5", 0)).await;
    assert_eq!(code, 0, "a share that came free is served again");
}

#[tokio::test]
async fn a_host_that_connects_too_often_is_told_quota_exceeded_and_others_are_not() {
    // A bucket of 2 connects, refilled at 1 a second: of 6 connects in a row, some must be refused
    // however slow this machine is, unless 6 connects take more than 4 s.
    let setup = crowded_setup(2, 1).await;
    let addr = setup.proxy.addr();
    let started = Instant::now();
    let mut codes = Vec::new();
    for i in 0..6 {
        let (_s, code) = connect_from(STRANGER, addr, &codec::Connect::new(Version::V5, &format!("r-{i}"), 0)).await;
        codes.push(code);
    }
    if started.elapsed() < Duration::from_secs(4) {
        assert!(codes.contains(&0x97), "nothing refused: {codes:?}");
        assert!(refused(&setup.proxy, "source_rate") >= 1.0);
    }
    assert_eq!(&codes[..2], &[0, 0], "the bucket's share at once");
    let (mut real, code) = connect_from(DEVICE, addr, &codec::Connect::new(Version::V311, "real-1", 60)).await;
    assert_eq!(code, 0, "another address is not slowed");
    still_served(&mut real, "sensors/real-1/t", 1).await;
}

#[tokio::test]
async fn a_keep_alive_0_connection_is_cut_at_max_idle() {
    let (logs, _g) = Logs::capture();
    let setup = Scenario::new()
        .device_with("sleepy-1", |d| d.source("127.0.0.1"))
        .configure(|_, cfg| cfg.max_idle = Some("2s".into()))
        .start()
        .await;
    let (mut s, code) = connect_from(
        DEVICE,
        setup.proxy.addr(),
        &codec::Connect::new(Version::V311, "sleepy-1", 0),
    )
    .await;
    assert_eq!(code, 0);
    let (rest, closed) = raw::read_until_closed(&mut s, Instant::now() + WAIT)
        .await
        .expect("keep-alive 0 is not for ever");
    assert!(rest.is_empty());
    assert!(matches!(closed, Closed::Eof), "{closed:?}");
    let line = logs
        .wait_line(&["connection closed", "listen.max_idle"], WAIT)
        .await
        .unwrap();
    assert!(line.contains("sleepy-1"), "{line}");
}

// ---------------------------------------------------------------------------------------------------------
// A flood does not flood the log

#[tokio::test]
async fn a_flood_of_malformed_first_packets_is_counted_whole_and_logged_within_its_budget() {
    const FLOOD: usize = 10_000;
    let (logs, _g) = Logs::capture();
    // Hundreds at once from each address: this is about the log, not the per-address limits.
    let setup = Scenario::new()
        .device("flood-victim")
        .configure(|_, cfg| {
            cfg.max_pending_per_source = Some(100_000);
            cfg.max_connections = 10_000;
        })
        .start()
        .await;
    let addr = setup.proxy.addr();
    let started = Instant::now();
    let mut sent = 0;
    while sent < FLOOD {
        let batch: Vec<_> = (sent..(sent + 250).min(FLOOD))
            .map(|i| {
                let from = IpAddr::from([127, 0, 1, (i % 4) as u8 + 1]);
                tokio::spawn(async move {
                    let socket = TcpSocket::new_v4().unwrap();
                    socket.bind(SocketAddr::new(from, 0)).unwrap();
                    let mut s = socket.connect(addr).await.unwrap();
                    s.write_all(b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n").await.unwrap();
                    let mut sink = Vec::new();
                    let _ = s.read_to_end(&mut sink).await;
                })
            })
            .collect();
        sent += batch.len();
        for b in batch {
            b.await.unwrap();
        }
    }
    let counted = wait_until(WAIT, || refused(&setup.proxy, "bad_connect") == FLOOD as f64).await;
    assert!(counted, "counted {} of {FLOOD}", refused(&setup.proxy, "bad_connect"));
    let summary = logs
        .wait_line(
            &["more refusals reason=bad_connect", "127.0.1.0/24"],
            Duration::from_secs(30),
        )
        .await
        .expect("what the log held back is summed up");
    assert!(summary.contains("mqtls_connections_refused_total"), "{summary}");
    // The budget allows 5 lines per source network and window (all four sources share 127.0.1.0/24): the
    // bound follows from how many windows the flood spanned, whatever this machine's speed.
    let windows = started.elapsed().as_secs() / 10 + 2;
    let lines = logs
        .text()
        .lines()
        .filter(|l| l.contains("reason=\"bad_connect\"") && l.contains("closed: first packet"))
        .count();
    assert!(lines as u64 <= 5 * windows, "{lines} lines over {windows} windows");
    assert!(lines >= 1, "the first refusals are logged");
}

// ---------------------------------------------------------------------------------------------------------
// Protocol answers per the spec

/// A CONNECT for `version`'s layout with its protocol level byte replaced by `level`.
fn with_level(version: Version, level: u8) -> Vec<u8> {
    let mut bytes = codec::connect(version, "future-1", 60);
    // Fixed header (2 bytes for a short packet), then 00 04 'M' 'Q' 'T' 'T', then the level.
    assert_eq!(&bytes[2..8], b"\x00\x04MQTT");
    bytes[8] = level;
    bytes
}

async fn answer_to(addr: SocketAddr, bytes: &[u8]) -> (Vec<u8>, Closed) {
    let mut s = raw::device(addr).await;
    s.write_all(bytes).await.unwrap();
    raw::read_until_closed(&mut s, Instant::now() + WAIT).await.unwrap()
}

#[tokio::test]
async fn an_unsupported_protocol_level_is_answered_in_the_layout_it_came_in() {
    let setup = Scenario::new().device("future-1").start().await;
    let addr = setup.proxy.addr();
    let (answer, closed) = answer_to(addr, &with_level(Version::V311, 9)).await;
    assert_eq!(
        answer,
        [0x20, 0x02, 0x00, 0x01],
        "3.1.1 layout: unacceptable protocol version"
    );
    assert!(matches!(closed, Closed::Eof), "{closed:?}");
    let (answer, _) = answer_to(addr, &with_level(Version::V5, 9)).await;
    assert_eq!(
        answer,
        [0x20, 0x03, 0x00, 0x84, 0x00],
        "5.0 layout: unsupported protocol version"
    );
    assert_eq!(refused(&setup.proxy, "unsupported_protocol"), 2.0);
    assert!(
        setup.broker.connected_usernames().is_empty(),
        "nothing reached the broker"
    );
}

#[tokio::test]
async fn a_nul_in_the_client_id_is_closed_and_named_as_such() {
    let (logs, _g) = Logs::capture();
    let setup = Scenario::new().device("nul-1").start().await;
    let (answer, _) = answer_to(setup.proxy.addr(), &codec::connect(Version::V311, "nul\0-1", 60)).await;
    assert!(answer.is_empty(), "MQTT says: close the connection");
    let line = logs.wait_line(&["bad_connect", "U+0000"], WAIT).await.unwrap();
    assert!(!line.contains("invalid UTF-8"), "{line}");
}

#[tokio::test]
async fn a_tls_client_hello_is_closed_cleanly_and_the_operator_told_what_to_change() {
    let (logs, _g) = Logs::capture();
    let setup = Scenario::new().device("mqtts-1").start().await;
    // A device set up for MQTTS: a real TLS client, pointed at the plain port.
    let config = rustls::ClientConfig::builder_with_provider(crate::common::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let tcp = raw::device(setup.proxy.addr()).await;
    let name = rustls::pki_types::ServerName::try_from("gateway").unwrap();
    let err = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .expect_err("there is no TLS server here");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::UnexpectedEof,
        "a clean close, not a reset: {err}"
    );
    let line = logs.wait_line(&["tls_on_plain_port"], WAIT).await.unwrap();
    assert!(line.contains("configure it for plain MQTT"), "{line}");
    assert_eq!(refused(&setup.proxy, "tls_on_plain_port"), 1.0);
}
