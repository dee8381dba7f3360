//! Devices that are not allowed are answered in MQTT, in their own protocol version, and never reach the
//! broker.

use std::time::Duration;

use crate::common;
use crate::common::logs::Logs;
use crate::common::mqtt_client::{device_v4, device_v5, wait_connack_v4, wait_connack_v5, MQTT_DEADLINE};
use crate::common::proxy::{DeviceEntry, ProxyConfig, RunningProxy};
use crate::common::scenario::Scenario;
use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as V5Code;
use rumqttc::ConnectReturnCode as V4Code;

fn refused_v4(r: Result<rumqttc::ConnAck, rumqttc::ConnectionError>) -> V4Code {
    match r {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => code,
        other => panic!("expected a refusal CONNACK, got {other:?}"),
    }
}

fn refused_v5(r: Result<rumqttc::v5::mqttbytes::v5::ConnAck, rumqttc::v5::ConnectionError>) -> V5Code {
    match r {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => code,
        other => panic!("expected a refusal CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn unknown_client_id_gets_identifier_rejected_in_311_and_never_reaches_the_broker() {
    let (logs, _g) = Logs::capture();
    let s = Scenario::new().device("known-1").start().await;
    let (_c, mut el) = device_v4("stranger-311", s.proxy.addr(), Duration::from_secs(30));
    assert_eq!(refused_v4(wait_connack_v4(&mut el).await), V4Code::BadClientId);
    let line = logs
        .wait_line(&["stranger-311", "refused"], MQTT_DEADLINE)
        .await
        .unwrap();
    assert!(
        line.contains("unknown_device") && line.contains("peer=127.0.0.1:"),
        "{line}"
    );
    assert_eq!(s.broker.connections_from_log(), 0, "{}", s.broker.log());
}

#[tokio::test]
async fn unknown_client_id_gets_client_identifier_not_valid_in_mqtt5() {
    let s = Scenario::new().device("known-2").start().await;
    let (_c, mut el) = device_v5("stranger-5", s.proxy.addr(), Duration::from_secs(30));
    assert_eq!(
        refused_v5(wait_connack_v5(&mut el).await),
        V5Code::ClientIdentifierNotValid
    );
    assert_eq!(s.broker.connections_from_log(), 0, "{}", s.broker.log());
}

#[tokio::test]
async fn known_client_id_from_the_wrong_source_is_refused() {
    let (logs, _g) = Logs::capture();
    let s = Scenario::new()
        .device_with("gate-7", |d| d.source("192.0.2.0/24"))
        .start()
        .await;
    let (_c, mut el) = device_v4("gate-7", s.proxy.addr(), Duration::from_secs(30));
    assert_eq!(refused_v4(wait_connack_v4(&mut el).await), V4Code::BadClientId);
    // The client id belongs to a device: from elsewhere it is someone borrowing it.
    logs.wait_line(&["gate-7", "client_id_spoofed"], MQTT_DEADLINE)
        .await
        .unwrap();
    assert_eq!(s.broker.connections_from_log(), 0, "{}", s.broker.log());
    // The same entry from an allowed source is served: the refusal was about the source alone.
    drop(s.proxy);
    let proxy = RunningProxy::start(
        &ProxyConfig::new(&s.pki, s.broker.addr())
            .device(DeviceEntry::new(&s.pki.client("gate-7")).source("127.0.0.0/8")),
        s.pki.dir(),
    )
    .await;
    let (_c, mut el) = device_v4("gate-7", proxy.addr(), Duration::from_secs(30));
    wait_connack_v4(&mut el).await.expect("accepted from 127.0.0.1");
}

#[tokio::test]
async fn over_the_connection_limit_devices_are_told_server_busy() {
    let (logs, _g) = Logs::capture();
    let s = Scenario::new()
        .device("first-in")
        .device("late-4")
        .device("late-5")
        .configure(|_, c| c.max_connections = 1)
        .start()
        .await;
    let (_first, mut first_el) = device_v4("first-in", s.proxy.addr(), Duration::from_secs(30));
    wait_connack_v4(&mut first_el).await.expect("the first device fits");
    let keep_polling = tokio::spawn(async move { while first_el.poll().await.is_ok() {} });

    let (_c4, mut el4) = device_v4("late-4", s.proxy.addr(), Duration::from_secs(30));
    assert_eq!(refused_v4(wait_connack_v4(&mut el4).await), V4Code::ServiceUnavailable);
    let (_c5, mut el5) = device_v5("late-5", s.proxy.addr(), Duration::from_secs(30));
    assert_eq!(refused_v5(wait_connack_v5(&mut el5).await), V5Code::ServerBusy);
    logs.wait_line(&["late-5", "busy"], MQTT_DEADLINE).await.unwrap();
    assert_eq!(
        s.broker.connected_usernames(),
        vec!["first-in".to_string()],
        "{}",
        s.broker.log()
    );
    keep_polling.abort();
}

#[tokio::test]
async fn a_freed_slot_is_reused_after_a_device_leaves() {
    let s = Scenario::new()
        .device("slot-a")
        .device("slot-b")
        .configure(|_, c| c.max_connections = 1)
        .start()
        .await;
    let (a, mut el_a) = device_v4("slot-a", s.proxy.addr(), Duration::from_secs(30));
    wait_connack_v4(&mut el_a).await.expect("slot-a fits");
    a.disconnect().await.unwrap();
    // Drive the DISCONNECT out, then wait until the broker has seen slot-a go.
    while el_a.poll().await.is_ok() {}
    s.broker
        .wait_for_log("Client slot-a disconnected", 1, MQTT_DEADLINE)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + MQTT_DEADLINE;
    loop {
        let (_b, mut el_b) = device_v4("slot-b", s.proxy.addr(), Duration::from_secs(30));
        match wait_connack_v4(&mut el_b).await {
            Ok(_) => break,
            // The proxy may still be finishing slot-a's task for a moment after the broker saw it leave.
            Err(rumqttc::ConnectionError::ConnectionRefused(V4Code::ServiceUnavailable))
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("slot-b refused: {e:?}"),
        }
    }
}

#[tokio::test]
async fn one_address_cannot_hold_every_slot_with_unfinished_connects() {
    use common::raw::{connect, Version};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (logs, _g) = Logs::capture();
    let s = Scenario::new()
        .device_with("neighbour-1", |d| d.source("127.0.0.2"))
        .configure(|_, c| c.max_pending_per_source = Some(2))
        .start()
        .await;

    // Two stalled CONNECTs from 127.0.0.1 use up that address's allowance...
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut sock = tokio::net::TcpStream::connect(s.proxy.addr()).await.unwrap();
        sock.write_all(&[0x10]).await.unwrap();
        stalled.push(sock);
    }
    // ...so a third is closed at once, unanswered (connections are admitted in order)...
    let mut third = tokio::net::TcpStream::connect(s.proxy.addr()).await.unwrap();
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(MQTT_DEADLINE, third.read(&mut byte))
        .await
        .expect("closed, not left hanging")
        .unwrap_or(0);
    assert_eq!(n, 0, "no answer to a connection over the per-address allowance");
    let line = logs
        .wait_line(&["source_limit", "peer=127.0.0.1:"], MQTT_DEADLINE)
        .await
        .unwrap();
    assert!(line.contains("too many unidentified connections"), "{line}");

    // ...while a device from another address is served normally.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut dev = sock.connect(s.proxy.addr()).await.unwrap();
    dev.write_all(&connect(Version::V311, "neighbour-1", 30)).await.unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(MQTT_DEADLINE, dev.read_exact(&mut connack))
        .await
        .expect("CONNACK in time")
        .unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "accepted");
    drop(stalled);
}

#[tokio::test]
async fn a_client_id_cannot_forge_log_lines() {
    use common::raw::{connect, Version};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (logs, _g) = Logs::capture();
    let s = Scenario::new().device("honest-1").start().await;
    let mut sock = tokio::net::TcpStream::connect(s.proxy.addr()).await.unwrap();
    sock.write_all(&connect(Version::V311, "forger\nINFO mqtls: everything is fine", 30))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(MQTT_DEADLINE, sock.read_exact(&mut connack))
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x02], "identifier rejected");
    let line = logs
        .wait_line(&["unknown_device", "forger"], MQTT_DEADLINE)
        .await
        .unwrap();
    assert!(
        line.contains(r#"forger\nINFO mqtls: everything is fine"#),
        "escaped on one line: {line}"
    );
    assert!(!logs
        .text()
        .lines()
        .any(|l| l.starts_with("INFO mqtls: everything is fine")));
}
