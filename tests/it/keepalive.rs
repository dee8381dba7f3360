//! mqtls enforces each device's MQTT keep-alive: a device that sends nothing for 1.5 times its keep-alive
//! is cut off (on both sides), any byte from it resets the clock, keep-alive 0 means no limit, and in
//! MQTT 5 the broker's Server Keep Alive replaces the device's value.
//!
//! Mosquitto enforces the same keep-alive on the same bytes, so a test that wants to see *mqtls* close a
//! silent device must make sure Mosquitto cannot get there first. Mosquitto 2.0 keeps time in whole
//! seconds of CLOCK_MONOTONIC: it records the second in which it read the device's last packet and
//! disconnects once `now_s - last_s > keep_alive * 3 / 2` (integer arithmetic), i.e. never before the
//! start of second `last_s + keep_alive * 3 / 2 + 1`. mqtls's timer runs 1.5 x keep-alive from the moment
//! it started copying, which is between our CONNECT write and the CONNACK's arrival. So when both of
//! those fall early in the same monotonic second `S` (CONNACK no later than S + 0.35 s), mqtls fires by
//! S + 0.35 s + 1.5 x keep-alive, which for keep-alive 1 s and for 10 s is at least 0.15 s before
//! Mosquitto could. [`connect_early_in_a_second`] arranges that, and the tests then also check that
//! Mosquitto never logged a keep-alive timeout of its own.

use std::time::Duration;

use crate::common;
use crate::common::logs::Logs;
use crate::common::raw::{self, Closed, Connack, PeekState, Version};
use crate::common::scenario::{Running, Scenario};
use crate::common::Mosquitto;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Guard against hanging; never a performance expectation.
const WAIT: Duration = Duration::from_secs(15);

/// Mosquitto's line when it drops a client for its keep-alive.
const MOSQUITTO_KEEPALIVE_KICK: &str = "has exceeded timeout";

/// The current CLOCK_MONOTONIC reading as (whole seconds, nanoseconds into that second): the clock
/// Mosquitto's `mosquitto_time()` reads. On Linux `std::time::Instant` is that clock, and its `Debug`
/// output is the only stable-enough window onto the raw value without an FFI dependency.
fn monotonic_now() -> (u64, u32) {
    let text = format!("{:?}", std::time::Instant::now());
    let field = |name: &str| -> Option<u64> {
        let rest = text.split(&format!("{name}: ")).nth(1)?;
        rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    match (field("tv_sec"), field("tv_nsec")) {
        (Some(s), Some(ns)) => (s, ns as u32),
        _ => panic!("cannot read CLOCK_MONOTONIC from {text:?}"),
    }
}

/// A device connection whose CONNECT was written at `sent` and whose CONNACK arrived while Mosquitto's
/// keep-alive clock was still in the second the CONNECT was sent in, early enough that mqtls's cut-off
/// must come first (see the module documentation).
struct EarlyConnection {
    stream: TcpStream,
    sent: Instant,
    connack: Connack,
    /// The client id of the attempt that made it (each attempt uses its own).
    client_id: String,
    /// `peer=<addr>`, as mqtls's log lines name this connection.
    peer: String,
}

/// Connects through mqtls with `connect(client_id)`, writing it 120-220 ms into a monotonic second, and
/// retries (after a clean DISCONNECT, with a new client id `<prefix>-<n>`) until the CONNACK also arrives
/// by 350 ms into that same second. On an idle machine the first attempt makes it.
async fn connect_early_in_a_second(
    addr: std::net::SocketAddr,
    prefix: &str,
    version: Version,
    connect: impl Fn(&str) -> Vec<u8>,
) -> EarlyConnection {
    const SEND_FROM: u32 = 120_000_000;
    const SEND_UNTIL: u32 = 220_000_000;
    const CONNACK_BY: u32 = 350_000_000;
    const ATTEMPTS: usize = 5;
    for attempt in 0..ATTEMPTS {
        let client_id = format!("{prefix}-{attempt}");
        let bytes = connect(&client_id);
        let mut stream = raw::device(addr).await;
        loop {
            let (_, ns) = monotonic_now();
            if (SEND_FROM..SEND_UNTIL).contains(&ns) {
                break;
            }
            let wait = (1_000_000_000 + SEND_FROM - ns) % 1_000_000_000;
            tokio::time::sleep(Duration::from_nanos(u64::from(wait) + 5_000_000)).await;
        }
        let (sent_s, sent_ns) = monotonic_now();
        let sent = Instant::now();
        stream.write_all(&bytes).await.unwrap();
        let connack = raw::expect_connack(&mut stream, version, WAIT).await;
        let (ack_s, ack_ns) = monotonic_now();
        if ack_s == sent_s && sent_ns >= SEND_FROM && ack_ns <= CONNACK_BY {
            let peer = format!("peer={}", stream.local_addr().unwrap());
            return EarlyConnection {
                stream,
                sent,
                connack,
                client_id,
                peer,
            };
        }
        let _ = stream.write_all(&raw::disconnect()).await;
    }
    panic!("could not place a CONNECT and its CONNACK early in one second in {ATTEMPTS} attempts");
}

/// Waits until Mosquitto logs that the session of `client_id` ended (for any reason).
async fn wait_broker_session_end(broker: &Mosquitto, client_id: &str) -> String {
    let ended = [
        format!("Client {client_id} closed its connection"),
        format!("Socket error on client {client_id},"),
        format!("Client {client_id} disconnected"),
        format!("Client {client_id} {MOSQUITTO_KEEPALIVE_KICK}"),
    ];
    let found = common::wait_until(WAIT, || {
        let log = broker.log();
        ended.iter().any(|e| log.contains(e.as_str()))
    })
    .await;
    assert!(
        found,
        "the broker never saw {client_id}'s session end\n{}",
        broker.diagnostics()
    );
    broker
        .log()
        .lines()
        .find(|l| ended.iter().any(|e| l.contains(e.as_str())))
        .unwrap()
        .to_string()
}

/// Waits for mqtls to close a silent device and asserts that it was mqtls, no earlier than `at_least`
/// after the CONNECT, that did it (not Mosquitto's own keep-alive check), and that it closed the broker side
/// too and logged `silent for <logged>`.
async fn assert_cut_off_by_mqtls(
    conn: &mut EarlyConnection,
    broker: &Mosquitto,
    logs: &Logs,
    at_least: Duration,
    logged: &str,
) {
    let (got, closed) = raw::read_until_closed(&mut conn.stream, Instant::now() + WAIT + at_least)
        .await
        .unwrap();
    let silent_for = conn.sent.elapsed();
    assert_eq!((got, closed), (Vec::new(), Closed::Eof), "nothing but the end");
    assert!(
        silent_for >= at_least,
        "cut off after {silent_for:?}, before {at_least:?}"
    );
    let ended = wait_broker_session_end(broker, &conn.client_id).await;
    assert!(
        !ended.contains(MOSQUITTO_KEEPALIVE_KICK),
        "Mosquitto got there first: {ended}"
    );
    let line = logs.wait_line(&["connection closed", &conn.peer], WAIT).await.unwrap();
    assert!(line.contains(&format!("silent for {logged}")), "{line}");
    assert_eq!(
        broker.count_in_log(MOSQUITTO_KEEPALIVE_KICK),
        0,
        "{}",
        broker.diagnostics()
    );
}

/// Mosquitto with `conf_extra` added to its recipe, and mqtls in front of it with the one device `cn`.
async fn mosquitto_and_proxy(conf_extra: &str, cn: &str) -> Running {
    Scenario::new()
        .broker_conf(conf_extra)
        // Matched by address, so that any client id is this device (see `connect_early_in_a_second`).
        .device_with(cn, |dev| dev.client_id(None).source("127.0.0.1"))
        .start()
        .await
}

#[tokio::test]
async fn silent_device_is_cut_off_after_one_and_a_half_keep_alives() {
    let (logs, _guard) = Logs::capture();
    let setup = mosquitto_and_proxy("", "dev-mute").await;

    let mut conn = connect_early_in_a_second(setup.proxy.addr(), "dev-mute", Version::V311, |id| {
        raw::connect(Version::V311, id, 1)
    })
    .await;
    assert_eq!(
        conn.connack.code,
        0,
        "{:?}\n{}",
        conn.connack,
        setup.broker.diagnostics()
    );

    assert_cut_off_by_mqtls(&mut conn, &setup.broker, &logs, Duration::from_millis(1500), "1.5s").await;
}

#[tokio::test]
async fn pingreq_every_400ms_keeps_a_one_second_keep_alive_device_connected() {
    let (logs, _guard) = Logs::capture();
    let setup = mosquitto_and_proxy("", "dev-chatty").await;

    let mut s = raw::device(setup.proxy.addr()).await;
    s.write_all(&raw::connect(Version::V311, "dev-chatty", 1))
        .await
        .unwrap();
    let ack = raw::expect_connack(&mut s, Version::V311, WAIT).await;
    assert_eq!(ack.code, 0, "{ack:?}\n{}", setup.broker.diagnostics());

    // 3.2 s is more than twice the 1.5 s limit: only the pings can keep the connection alive.
    let connected = Instant::now();
    let mut pings = 0;
    while connected.elapsed() < Duration::from_millis(3200) {
        tokio::time::sleep(Duration::from_millis(400)).await;
        raw::ping(&mut s, WAIT)
            .await
            .unwrap_or_else(|e| panic!("ping {pings} after {:?}: {e}", connected.elapsed()));
        pings += 1;
    }
    assert!(pings >= 8, "{pings}");
    assert_eq!(raw::peek_state(&s), PeekState::OpenQuiet);
    assert!(
        !logs
            .text()
            .lines()
            .any(|l| l.contains("device=\"dev-chatty\"") && l.contains("connection closed")),
        "{}",
        logs.text()
    );
}

#[tokio::test]
async fn keep_alive_zero_is_never_cut_off() {
    let (logs, _guard) = Logs::capture();
    let setup = mosquitto_and_proxy("", "dev-quiet").await;

    let mut s = raw::device(setup.proxy.addr()).await;
    s.write_all(&raw::connect(Version::V311, "dev-quiet", 0)).await.unwrap();
    let ack = raw::expect_connack(&mut s, Version::V311, WAIT).await;
    assert_eq!(ack.code, 0, "{ack:?}\n{}", setup.broker.diagnostics());

    // An observation window, not a wait for something to happen: the device stays silent through it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(raw::peek_state(&s), PeekState::OpenQuiet);
    raw::ping(&mut s, WAIT).await.unwrap();
    assert!(
        !logs
            .text()
            .lines()
            .any(|l| l.contains("device=\"dev-quiet\"") && l.contains("connection closed")),
        "{}",
        logs.text()
    );
}

#[tokio::test]
async fn mqtt5_device_keep_alive_applies_when_the_connack_has_no_server_keep_alive() {
    let (logs, _guard) = Logs::capture();
    let setup = mosquitto_and_proxy("", "dev-five-own").await;

    let mut conn = connect_early_in_a_second(setup.proxy.addr(), "dev-five-own", Version::V5, |id| {
        raw::connect(Version::V5, id, 1)
    })
    .await;
    assert_eq!(
        conn.connack.code,
        0,
        "{:?}\n{}",
        conn.connack,
        setup.broker.diagnostics()
    );
    // Mosquitto sends other properties (e.g. Topic Alias Maximum), but no Server Keep Alive.
    assert!(!conn.connack.properties.is_empty(), "{:?}", conn.connack);
    assert_eq!(conn.connack.server_keep_alive(), None, "{:?}", conn.connack);

    assert_cut_off_by_mqtls(&mut conn, &setup.broker, &logs, Duration::from_millis(1500), "1.5s").await;
}

#[tokio::test]
async fn mqtt5_server_keep_alive_replaces_the_device_keep_alive() {
    let (logs, _guard) = Logs::capture();
    // Mosquitto 2.0.11 refuses max_keepalive below 10. A v5 device asking for more gets CONNACK Server
    // Keep Alive 10 (and Mosquitto then enforces 10 itself).
    let setup = mosquitto_and_proxy("max_keepalive 10", "dev-five").await;

    let mut conn = connect_early_in_a_second(setup.proxy.addr(), "dev-five", Version::V5, |id| {
        raw::connect(Version::V5, id, 60)
    })
    .await;
    assert_eq!(
        conn.connack.code,
        0,
        "{:?}\n{}",
        conn.connack,
        setup.broker.diagnostics()
    );
    assert_eq!(conn.connack.server_keep_alive(), Some(10), "{:?}", conn.connack);

    // With the device's own 60 s mqtls would wait 90 s; the broker's 10 s means 15 s.
    assert_cut_off_by_mqtls(&mut conn, &setup.broker, &logs, Duration::from_secs(15), "15s").await;
    logs.wait_line(&["server_keep_alive=10", &conn.peer], WAIT)
        .await
        .unwrap();
}
