//! When the broker cannot be reached, or cannot be trusted, the device is told "server unavailable"
//! promptly, the log says why, and the daemon keeps serving.

use std::time::Duration;

use crate::common;
use crate::common::logs::Logs;
use crate::common::mosquitto::free_port;
use crate::common::mqtt_client::{
    device_v4, device_v5, is_puback_v4, spawn_eventloop_v4, wait_connack_v4, wait_connack_v5, MQTT_DEADLINE,
};
use crate::common::proxy::{DeviceEntry, ProxyConfig, RunningProxy};
use crate::common::scenario::Scenario;
use crate::common::{Mosquitto, Pki};
use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as V5Code;
use rumqttc::{ConnectReturnCode as V4Code, QoS};

async fn refusal_v4(proxy: &RunningProxy, client_id: &str) -> V4Code {
    let (_c, mut el) = device_v4(client_id, proxy.addr(), Duration::from_secs(30));
    match wait_connack_v4(&mut el).await {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => code,
        other => panic!("expected a refusal CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn broker_down_gives_server_unavailable_and_logs_the_connect_failure() {
    let (logs, _g) = Logs::capture();
    let pki = Pki::new();
    let dead = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = ProxyConfig::new(&pki, dead).device(DeviceEntry::new(&pki.client("down-1")));
    let proxy = RunningProxy::start(&config, pki.dir()).await;

    assert_eq!(refusal_v4(&proxy, "down-1").await, V4Code::ServiceUnavailable);
    let line = logs
        .wait_line(&["down-1", "broker unreachable"], MQTT_DEADLINE)
        .await
        .unwrap();
    // The log line carries the counter's label, and the failure's.
    assert!(line.contains("reason=\"broker_unreachable\""), "{line}");
    assert!(line.contains("failure=\"connect\""), "{line}");
    assert!(line.contains("Connection refused"), "{line}");

    // MQTT 5 devices get their own code.
    let (_c, mut el) = device_v5("down-1", proxy.addr(), Duration::from_secs(30));
    match wait_connack_v5(&mut el).await {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => assert_eq!(code, V5Code::ServerUnavailable),
        other => panic!("expected a refusal CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn broker_with_an_untrusted_certificate_is_refused_and_logged() {
    let (logs, _g) = Logs::capture();
    let pki = Pki::new();
    let stranger_ca = Pki::other_ca();
    let broker = Mosquitto::start_with(&pki, &stranger_ca.server("impostor", &["localhost", "127.0.0.1"])).await;
    let config = ProxyConfig::new(&pki, broker.addr()).device(DeviceEntry::new(&pki.client("trusting-1")));
    let proxy = RunningProxy::start(&config, pki.dir()).await;

    assert_eq!(refusal_v4(&proxy, "trusting-1").await, V4Code::ServiceUnavailable);
    let line = logs
        .wait_line(&["trusting-1", "broker unreachable"], MQTT_DEADLINE)
        .await
        .unwrap();
    assert!(line.contains("tls") && line.contains("UnknownIssuer"), "{line}");
    assert!(
        broker.connected_usernames().is_empty(),
        "no MQTT session at an untrusted broker"
    );
}

#[tokio::test]
async fn broker_with_the_wrong_name_is_refused_and_logged() {
    let (logs, _g) = Logs::capture();
    let pki = Pki::new();
    let broker = Mosquitto::start_with(&pki, &pki.server("elsewhere", &["broker.elsewhere.example"])).await;
    let config = ProxyConfig::new(&pki, broker.addr()).device(DeviceEntry::new(&pki.client("named-1")));
    let proxy = RunningProxy::start(&config, pki.dir()).await;

    assert_eq!(refusal_v4(&proxy, "named-1").await, V4Code::ServiceUnavailable);
    let line = logs
        .wait_line(&["named-1", "broker unreachable"], MQTT_DEADLINE)
        .await
        .unwrap();
    assert!(line.contains("not valid for name \"localhost\""), "{line}");
    assert!(broker.connected_usernames().is_empty());
}

#[tokio::test]
async fn addresses_are_tried_in_order_until_one_answers() {
    let (logs, _g) = Logs::capture();
    let setup = Scenario::new()
        .device("failover-1")
        .configure(|_, config| config.upstream.insert(0, format!("127.0.0.1:{}", free_port())))
        .start()
        .await;

    let (_c, mut el) = device_v4("failover-1", setup.proxy.addr(), Duration::from_secs(30));
    wait_connack_v4(&mut el).await.expect("the second address serves");
    logs.wait_line(&["failover-1", "connection opened"], MQTT_DEADLINE)
        .await
        .unwrap();
    assert_eq!(setup.broker.connected_usernames(), vec!["failover-1".to_string()]);
}

#[tokio::test]
async fn a_broker_that_fails_the_tls_handshake_passes_the_turn_to_the_next_address() {
    let (logs, _g) = Logs::capture();
    let pki = Pki::new();
    let impostor = Mosquitto::start_with(&pki, &Pki::other_ca().server("impostor", &["localhost"])).await;
    let broker = Mosquitto::start(&pki).await;
    let mut config = ProxyConfig::new(&pki, broker.addr()).device(DeviceEntry::new(&pki.client("failover-2")));
    config.upstream.insert(0, impostor.addr().to_string());
    let proxy = RunningProxy::start(&config, pki.dir()).await;

    let (_c, mut el) = device_v4("failover-2", proxy.addr(), Duration::from_secs(30));
    wait_connack_v4(&mut el)
        .await
        .expect("the trusted second broker serves");
    logs.wait_line(&["failover-2", "connection opened"], MQTT_DEADLINE)
        .await
        .unwrap();
    assert_eq!(broker.connected_usernames(), vec!["failover-2".to_string()]);
    assert!(impostor.connected_usernames().is_empty());
}

#[tokio::test]
async fn upstream_names_are_resolved_at_connection_time() {
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki).await;
    let mut config = ProxyConfig::new(&pki, broker.addr()).device(DeviceEntry::new(&pki.client("dns-1")));
    config.upstream = vec![format!("localhost:{}", broker.port())];
    config.server_name = None; // the name is taken from the address: localhost
    let proxy = RunningProxy::start(&config, pki.dir()).await;
    let (_c, mut el) = device_v4("dns-1", proxy.addr(), Duration::from_secs(30));
    wait_connack_v4(&mut el).await.expect("served via a name");
}

#[tokio::test]
async fn a_broker_that_goes_away_closes_its_devices_but_not_the_daemon() {
    let (logs, _g) = Logs::capture();
    let mut setup = Scenario::new().device("survivor-1").device("survivor-2").start().await;

    let (client, mut el) = device_v4("survivor-1", setup.proxy.addr(), Duration::from_secs(30));
    wait_connack_v4(&mut el).await.expect("accepted");
    let mut events = spawn_eventloop_v4(el);
    client
        .publish("sensors/survivor-1/x", QoS::AtLeastOnce, false, "before")
        .await
        .unwrap();
    events.wait_for(is_puback_v4, MQTT_DEADLINE).await.expect("PUBACK");

    setup.broker.stop();
    events
        .wait_error(MQTT_DEADLINE)
        .await
        .expect("the device sees its connection end");
    logs.wait_line(&["survivor-1", "connection closed"], MQTT_DEADLINE)
        .await
        .unwrap();

    // The daemon is still there and still answers, now with "server unavailable".
    assert_eq!(refusal_v4(&setup.proxy, "survivor-2").await, V4Code::ServiceUnavailable);
}

#[tokio::test]
async fn alpn_is_offered_as_configured() {
    use common::{EchoMode, TlsEcho};
    let pki = Pki::new();
    let echo = TlsEcho::start_with_alpn(&pki, EchoMode::ConnackThenDigest, &["x-amzn-mqtt-ca"]).await;
    let mut config = ProxyConfig::new(&pki, echo.addr()).device(DeviceEntry::new(&pki.client("alpn-1")));
    config.extra = "alpn = [\"x-amzn-mqtt-ca\"]\n".into();
    let proxy = RunningProxy::start(&config, pki.dir()).await;
    let mut dev = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    let hello = common::raw::connect(common::raw::Version::V311, "alpn-1", 30);
    tokio::io::AsyncWriteExt::write_all(&mut dev, &hello).await.unwrap();
    tokio::io::AsyncWriteExt::shutdown(&mut dev).await.unwrap();
    echo.wait_finished(1, MQTT_DEADLINE).await.unwrap();
    assert_eq!(echo.alpn(), vec![Some(b"x-amzn-mqtt-ca".to_vec())]);
}

#[tokio::test]
async fn a_broker_that_wants_another_alpn_protocol_is_a_tls_failure() {
    use common::{EchoMode, TlsEcho};
    let (logs, _g) = Logs::capture();
    let pki = Pki::new();
    let echo = TlsEcho::start_with_alpn(&pki, EchoMode::EchoUntilEof, &["x-amzn-mqtt-ca"]).await;
    let mut config = ProxyConfig::new(&pki, echo.addr()).device(DeviceEntry::new(&pki.client("alpn-2")));
    config.extra = "alpn = [\"mqtt\"]\n".into();
    let proxy = RunningProxy::start(&config, pki.dir()).await;
    assert_eq!(refusal_v4(&proxy, "alpn-2").await, V4Code::ServiceUnavailable);
    let line = logs
        .wait_line(&["alpn-2", "broker unreachable"], MQTT_DEADLINE)
        .await
        .unwrap();
    assert!(line.contains("reason=\"broker_unreachable\""), "{line}");
    assert!(line.contains("failure=\"tls\""), "{line}");
}

/// What the broker itself refuses reaches the device unchanged, and is counted by its code and logged
/// with the device: not counted as a session set up.
#[tokio::test]
async fn a_refusal_by_the_broker_is_passed_on_counted_by_code_and_logged_with_the_device() {
    use crate::common::codec::{self, Version};
    use crate::common::raw;
    use tokio::io::AsyncWriteExt;

    let (logs, _g) = Logs::capture();
    // Matched by its address alone, so that it can send an empty client id.
    let s = Scenario::new()
        .device_with("anonymous-1", |d| d.client_id(None).source("127.0.0.1"))
        .start()
        .await;
    // MQTT 3.1.1: an empty client id with clean session 0 must be refused (Mosquitto: 0x02).
    let mut connect = codec::connect(Version::V311, "", 30);
    assert_eq!(connect[9], 0x02, "the connect flags byte");
    connect[9] = 0x00;
    let mut device = raw::device(s.proxy.addr()).await;
    device.write_all(&connect).await.unwrap();
    let ack = raw::expect_connack(&mut device, Version::V311, MQTT_DEADLINE).await;
    assert_eq!(ack.code, 0x02, "the broker's own answer");
    let line = logs
        .wait_line(&["broker_refused", "anonymous-1"], MQTT_DEADLINE)
        .await
        .unwrap();
    assert!(
        line.contains("code=0x02") && line.contains("identifier rejected"),
        "{line}"
    );
    let metrics = s.proxy.handle.metrics().render();
    let has = |series: &str| metrics.lines().any(|l| l == series);
    assert!(has("mqtls_broker_refusals_total{code=\"0x02\"} 1"), "{metrics}");
    assert!(
        has("mqtls_connections_refused_total{reason=\"broker_refused\"} 1"),
        "{metrics}"
    );
    assert!(
        has("mqtls_upstream_handshake_seconds_count 0"),
        "no session was set up:\n{metrics}"
    );
    assert!(
        !logs.text().contains("connection opened"),
        "a refused device is not logged as connected"
    );
}
