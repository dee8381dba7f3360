//! The byte stream through mqtls: bytes pass unchanged and in order, half-close travels both ways, the
//! CONNECT is read however it is split, and a first packet that is slow, garbage or too large is cut off
//! without an answer and without reaching the broker, while other devices keep being served.
//!
//! Each test reads mqtls's log lines for its devices by their names (or by the device socket's own `peer=`
//! address).

use std::time::Duration;

use crate::common;
use crate::common::logs::Logs;
use crate::common::mqtt_client::{device_v4, is_puback_v4, spawn_eventloop_v4, wait_connack_v4};
use crate::common::proxy::{DeviceEntry, ProxyConfig, RunningProxy};
use crate::common::raw::{self, Closed, PeekState, Version};
use crate::common::scenario::Scenario;
use crate::common::tls_echo::{expected_echo_reply, Ending};
use crate::common::{observer, EchoMode, Observer, Pki, TlsEcho};
use rumqttc::{ConnectReturnCode, QoS};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Guard against hanging; never a performance expectation.
const WAIT: Duration = Duration::from_secs(15);

/// `peer=<addr>`: how mqtls's log lines name the connection from this device socket.
fn peer_tag(s: &TcpStream) -> String {
    format!("peer={}", s.local_addr().expect("local addr"))
}

/// A device played by rumqttc (MQTT 3.1.1) connects through mqtls, publishes one QoS 1 message under its
/// own subtree, gets the PUBACK, and the observer receives it.
async fn rumqttc_device_publishes(proxy: &RunningProxy, obs: &mut Observer, cn: &str) {
    let (client, mut el) = device_v4(cn, proxy.addr(), Duration::from_secs(30));
    let ack = wait_connack_v4(&mut el)
        .await
        .unwrap_or_else(|e| panic!("{cn} through mqtls: {e:?}"));
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let mut events = spawn_eventloop_v4(el);
    let topic = format!("sensors/{cn}/ok");
    client
        .publish(topic.as_str(), QoS::AtLeastOnce, false, b"still served".to_vec())
        .await
        .unwrap();
    events.wait_for(is_puback_v4, WAIT).await.unwrap();
    let msg = obs.next_message(WAIT).await.expect("observer got nothing");
    assert_eq!(msg, (topic, b"still served".to_vec()));
}

#[tokio::test]
async fn large_payload_passes_unchanged_and_device_half_close_becomes_close_notify() {
    let (logs, _guard) = Logs::capture();
    let pki = Pki::new();
    let echo = TlsEcho::start(&pki, EchoMode::ConnackThenDigest).await;
    let dev = pki.client("dev-bulk");
    let proxy = RunningProxy::start(
        &ProxyConfig::new(&pki, echo.addr()).device(DeviceEntry::new(&dev)),
        pki.dir(),
    )
    .await;

    let connect = raw::connect(Version::V311, "dev-bulk", 60);
    let payload = common::pki::random_bytes(8 << 20);
    let mut s = raw::device(proxy.addr()).await;
    s.write_all(&connect).await.unwrap();
    assert_eq!(raw::expect_connack(&mut s, Version::V311, WAIT).await.code, 0);
    s.write_all(&payload).await.unwrap();
    // The echo answers only after our end of stream: nothing more has come back yet.
    assert_eq!(raw::peek_state(&s), PeekState::OpenQuiet);
    s.shutdown().await.unwrap();

    // Our sending direction is closed; the answer still arrives on the receiving one, then the end.
    let (reply, closed) = raw::read_until_closed(&mut s, Instant::now() + WAIT).await.unwrap();
    assert_eq!(closed, Closed::Eof);
    let sent = [connect.as_slice(), payload.as_slice()].concat();
    assert_eq!(reply.len(), 40, "sha256 + length, got {reply:02x?}");
    assert_eq!(
        &reply[32..],
        &(sent.len() as u64).to_be_bytes(),
        "byte count seen by the broker"
    );
    assert_eq!(reply, expected_echo_reply(&sent), "bytes changed or reordered");

    let done = echo.wait_finished(1, WAIT).await.unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(
        done[0].ending,
        Ending::CloseNotify,
        "the device's FIN must become a close_notify"
    );
    assert_eq!(
        done[0].serial, dev.serial,
        "mqtls must present the device's own certificate"
    );
    assert_eq!(done[0].write_error, None);

    let line = logs
        .wait_line(&["connection closed", "device=\"dev-bulk\""], WAIT)
        .await
        .unwrap();
    assert!(line.contains(&format!("bytes_in={}", sent.len())), "{line}");
    assert!(line.contains("bytes_out=44"), "CONNACK and the digest: {line}");
    assert!(line.contains("end=device closed"), "{line}");
}

#[tokio::test]
async fn broker_half_close_reaches_device_which_can_still_send() {
    let (logs, _guard) = Logs::capture();
    let pki = Pki::new();
    let from_broker = b"broker done talking".to_vec();
    let echo = TlsEcho::start(
        &pki,
        EchoMode::SendThenRead {
            send: from_broker.clone(),
        },
    )
    .await;
    let dev = pki.client("dev-half");
    let proxy = RunningProxy::start(
        &ProxyConfig::new(&pki, echo.addr()).device(DeviceEntry::new(&dev)),
        pki.dir(),
    )
    .await;

    let connect = raw::connect(Version::V311, "dev-half", 60);
    let mut s = raw::device(proxy.addr()).await;
    s.write_all(&connect).await.unwrap();
    // The broker's close_notify arrives as a FIN, after its bytes.
    let (got, closed) = raw::read_until_closed(&mut s, Instant::now() + WAIT).await.unwrap();
    assert_eq!((got, closed), (from_broker, Closed::Eof));

    // Our direction is still open: later bytes reach the broker.
    s.write_all(b"late reading 1").await.unwrap();
    s.write_all(b"late reading 2").await.unwrap();
    s.shutdown().await.unwrap();

    let done = echo.wait_finished(1, WAIT).await.unwrap();
    let expected = [connect.as_slice(), b"late reading 1late reading 2"].concat();
    assert_eq!(echo.received(), vec![expected]);
    assert_eq!(done[0].ending, Ending::CloseNotify);
    assert_eq!(done[0].serial, dev.serial);
    let line = logs
        .wait_line(&["connection closed", "device=\"dev-half\""], WAIT)
        .await
        .unwrap();
    assert!(line.contains("end=broker closed"), "{line}");
}

#[tokio::test]
async fn connect_sent_one_byte_at_a_time_is_accepted_by_mosquitto() {
    let (logs, _guard) = Logs::capture();
    let setup = Scenario::new().device("dev-slow").start().await;

    let connect = raw::connect(Version::V311, "dev-slow", 60);
    let mut s = raw::device(setup.proxy.addr()).await;
    raw::write_bytewise(&mut s, &connect, Duration::from_millis(5))
        .await
        .unwrap();
    let ack = raw::expect_connack(&mut s, Version::V311, WAIT).await;
    assert_eq!(ack.code, 0, "{ack:?}\n{}", setup.broker.diagnostics());
    logs.wait_line(&["connection opened", "client_id=\"dev-slow\""], WAIT)
        .await
        .unwrap();
    assert_eq!(setup.broker.connected_usernames(), vec!["dev-slow"]);
}

#[tokio::test]
async fn connect_and_publish_in_one_write_both_reach_mosquitto() {
    let setup = Scenario::new().device("dev-eager").start().await;
    let mut obs = observer(&setup.pki, &setup.broker, "sensors/#").await;

    let mut bytes = raw::connect(Version::V311, "dev-eager", 60);
    bytes.extend(raw::publish(Version::V311, "sensors/dev-eager/t", 1, 7, b"23.5"));
    let mut s = raw::device(setup.proxy.addr()).await;
    s.write_all(&bytes).await.unwrap();

    let ack = raw::expect_connack(&mut s, Version::V311, WAIT).await;
    assert_eq!(ack.code, 0, "{ack:?}");
    let p = raw::read_packet(&mut s, Instant::now() + WAIT).await.unwrap();
    assert_eq!(raw::parse_puback(&p), Ok(7));
    let msg = obs.next_message(WAIT).await.expect("observer got nothing");
    assert_eq!(msg, ("sensors/dev-eager/t".to_string(), b"23.5".to_vec()));
}

#[tokio::test]
async fn mqtt31_connect_passes_through_to_mosquitto() {
    let (logs, _guard) = Logs::capture();
    let setup = Scenario::new().device("dev-31").start().await;
    let mut obs = observer(&setup.pki, &setup.broker, "sensors/#").await;

    let mut s = raw::device(setup.proxy.addr()).await;
    s.write_all(&raw::connect(Version::V31, "dev-31", 60)).await.unwrap();
    let ack = raw::expect_connack(&mut s, Version::V31, WAIT).await;
    assert_eq!(ack.code, 0, "{ack:?}\n{}", setup.broker.diagnostics());
    s.write_all(&raw::publish(Version::V31, "sensors/dev-31/t", 1, 1, b"old but gold"))
        .await
        .unwrap();
    let p = raw::read_packet(&mut s, Instant::now() + WAIT).await.unwrap();
    assert_eq!(raw::parse_puback(&p), Ok(1));
    let msg = obs.next_message(WAIT).await.expect("observer got nothing");
    assert_eq!(msg, ("sensors/dev-31/t".to_string(), b"old but gold".to_vec()));

    let line = logs
        .wait_line(&["connection opened", "client_id=\"dev-31\""], WAIT)
        .await
        .unwrap();
    assert!(line.contains("mqtt=3.1 "), "{line}");
    // Mosquitto logs the protocol of the session it accepted: p1 is MQTT 3.1.
    setup.broker.wait_for_log("as dev-31 (p1,", 1, WAIT).await.unwrap();
}

#[tokio::test]
async fn stalled_connect_is_cut_off_after_connect_timeout_while_others_are_served() {
    let (logs, _guard) = Logs::capture();
    let setup = Scenario::new()
        .device("dev-stall")
        .device("dev-patient")
        .configure(|_, cfg| cfg.connect_timeout = "1s".into())
        .start()
        .await;
    let mut obs = observer(&setup.pki, &setup.broker, "sensors/#").await;

    let started = Instant::now();
    let mut s = raw::device(setup.proxy.addr()).await;
    let peer = peer_tag(&s);
    let connect = raw::connect(Version::V311, "dev-stall", 60);
    s.write_all(&connect[..3]).await.unwrap();

    // While that CONNECT is stuck, another device is served normally.
    rumqttc_device_publishes(&setup.proxy, &mut obs, "dev-patient").await;
    assert_eq!(
        raw::peek_state(&s),
        PeekState::OpenQuiet,
        "the stalled device must still be waiting while the other one is served"
    );
    assert!(
        !logs
            .text()
            .lines()
            .any(|l| l.contains(&peer) && l.contains("connect_timeout")),
        "{}",
        logs.text()
    );

    let (got, closed) = raw::read_until_closed(&mut s, Instant::now() + WAIT).await.unwrap();
    let elapsed = started.elapsed();
    assert!(got.is_empty(), "a stalled device gets no answer, got {got:02x?}");
    assert_eq!(closed, Closed::Eof);
    assert!(elapsed >= Duration::from_secs(1), "closed after {elapsed:?}");
    let line = logs.wait_line(&["connect_timeout", &peer], WAIT).await.unwrap();
    assert!(line.contains("received=3"), "{line}");
    // The observer and dev-patient only: the stalled device never reached the broker.
    assert_eq!(setup.broker.connected_usernames(), vec!["observer", "dev-patient"]);
    assert_eq!(setup.broker.connections_from_log(), 2, "{}", setup.broker.diagnostics());
}

#[tokio::test]
async fn garbage_first_packet_is_closed_unanswered_and_never_reaches_the_broker() {
    let (logs, _guard) = Logs::capture();
    let setup = Scenario::new().device("dev-sane").start().await;
    let mut obs = observer(&setup.pki, &setup.broker, "sensors/#").await;
    let before = setup.broker.connections_from_log();
    assert_eq!(before, 1, "the observer");

    let mut s = raw::device(setup.proxy.addr()).await;
    let peer = peer_tag(&s);
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let (got, _closed) = raw::read_until_closed(&mut s, Instant::now() + WAIT).await.unwrap();
    assert!(got.is_empty(), "garbage gets no answer, got {got:02x?}");
    let line = logs.wait_line(&["bad_connect", &peer], WAIT).await.unwrap();
    assert!(line.contains("not a CONNECT"), "{line}");

    rumqttc_device_publishes(&setup.proxy, &mut obs, "dev-sane").await;
    assert_eq!(
        setup.broker.connections_from_log(),
        before + 1,
        "only dev-sane may have reached the broker\n{}",
        setup.broker.diagnostics()
    );
    assert_eq!(setup.broker.failed_accepts_from_log(), 0);
    assert_eq!(setup.broker.connected_usernames(), vec!["observer", "dev-sane"]);
    assert!(
        !logs
            .text()
            .lines()
            .any(|l| l.contains(&peer) && l.contains("connection opened")),
        "{}",
        logs.text()
    );
}

#[tokio::test]
async fn oversize_connect_is_closed_unanswered_and_not_forwarded() {
    let (logs, _guard) = Logs::capture();
    let setup = Scenario::new()
        .device("dev-huge")
        .configure(|_, cfg| cfg.max_connect_size = 1024)
        .start()
        .await;

    // A well-formed CONNECT from a configured device, only too large.
    let connect = raw::Connect::new(Version::V311, "dev-huge", 60)
        .login("dev-huge", &[b'p'; 3000])
        .encode();
    assert!(connect.len() > 1024);
    let mut s = raw::device(setup.proxy.addr()).await;
    let peer = peer_tag(&s);
    // mqtls may close before it has read everything, so the write itself may fail.
    let _ = s.write_all(&connect).await;
    let (got, _closed) = raw::read_until_closed(&mut s, Instant::now() + WAIT).await.unwrap();
    assert!(got.is_empty(), "an oversize CONNECT gets no answer, got {got:02x?}");
    let line = logs.wait_line(&["bad_connect", &peer], WAIT).await.unwrap();
    assert!(line.contains("exceeds the limit of 1024 bytes"), "{line}");

    // The same device with a CONNECT of normal size is served, and only that one reaches the broker.
    let mut ok = raw::device(setup.proxy.addr()).await;
    ok.write_all(&raw::connect(Version::V311, "dev-huge", 60))
        .await
        .unwrap();
    let ack = raw::expect_connack(&mut ok, Version::V311, WAIT).await;
    assert_eq!(ack.code, 0);
    assert_eq!(setup.broker.connections_from_log(), 1, "{}", setup.broker.diagnostics());
    assert_eq!(setup.broker.failed_accepts_from_log(), 0);
}

#[tokio::test]
async fn connect_of_exactly_max_connect_size_is_served() {
    let setup = Scenario::new()
        .device("dev-edge")
        .configure(|_, cfg| cfg.max_connect_size = 1024)
        .start()
        .await;

    // Pad the password until the whole packet is exactly the limit.
    let mut pad = 0;
    let connect = loop {
        let c = raw::Connect::new(Version::V311, "dev-edge", 60)
            .login("dev-edge", &vec![b'p'; pad])
            .encode();
        if c.len() >= 1024 {
            break c;
        }
        pad += 1;
    };
    assert_eq!(connect.len(), 1024);
    let mut s = raw::device(setup.proxy.addr()).await;
    s.write_all(&connect).await.unwrap();
    let ack = raw::expect_connack(&mut s, Version::V311, WAIT).await;
    assert_eq!(ack.code, 0, "{ack:?}\n{}", setup.broker.diagnostics());
    assert_eq!(setup.broker.connected_usernames(), vec!["dev-edge"]);
}

#[tokio::test]
async fn burst_of_packets_gets_every_answer_in_order_while_the_device_keeps_writing() {
    // 200 QoS 1 publishes each followed by a PINGREQ, written in one go while the answers are read
    // concurrently: exactly PUBACK n, PINGRESP, PUBACK n+1... must come back, and the observer gets the
    // messages in order.
    let setup = Scenario::new().device("dev-burst").start().await;
    let mut obs = observer(&setup.pki, &setup.broker, "sensors/#").await;

    let mut s = raw::device(setup.proxy.addr()).await;
    s.write_all(&raw::connect(Version::V311, "dev-burst", 60))
        .await
        .unwrap();
    assert_eq!(raw::expect_connack(&mut s, Version::V311, WAIT).await.code, 0);
    let mut burst = Vec::new();
    for id in 1..=200u16 {
        let payload = id.to_string();
        burst.extend(raw::publish(
            Version::V311,
            "sensors/dev-burst/seq",
            1,
            id,
            payload.as_bytes(),
        ));
        burst.extend(raw::pingreq());
    }
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        wr.write_all(&burst).await.unwrap();
        wr
    });
    let deadline = Instant::now() + WAIT;
    for id in 1..=200u16 {
        let p = raw::read_packet(&mut rd, deadline).await.unwrap();
        assert_eq!(raw::parse_puback(&p), Ok(id));
        let p = raw::read_packet(&mut rd, deadline).await.unwrap();
        assert_eq!(p.to_bytes(), [0xD0, 0x00], "PINGRESP after PUBACK {id}");
    }
    let _wr = writer.await.unwrap();
    for id in 1..=200u16 {
        let msg = obs.next_message(WAIT).await.expect("observer missed a message");
        assert_eq!(msg, ("sensors/dev-burst/seq".to_string(), id.to_string().into_bytes()));
    }
}
