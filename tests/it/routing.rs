//! Which identity a connection gets: device directories, dedicated listeners, source rules and the
//! fallback identity, each checked end to end through mqtls in-process against a real Mosquitto.
//!
//! The broker's ACL lets a client publish only under `sensors/<its certificate CN>/`, so a message that
//! reaches the observer on `sensors/<cn>/...` proves the connection was presented to the broker as `<cn>`;
//! the broker's log (`connected_usernames`) names the identity as well.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::common::mqtt_client::{device_v4, is_puback_v4, spawn_eventloop_v4, wait_connack_v4, Observer};
use crate::common::raw::{self, Version};
use crate::common::scenario::{Running, Scenario};
use crate::common::{observer, Mosquitto};
use rumqttc::{ConnectReturnCode, ConnectionError, QoS};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// Guard against hangs; nothing here is a performance threshold.
const WAIT: Duration = Duration::from_secs(10);

/// Connects a plain MQTT 3.1.1 device (rumqttc) to `addr` as `client_id`, publishes one QoS 1 message and
/// waits for its PUBACK. `Err` carries the CONNACK refusal or connection error.
async fn publish_via(addr: SocketAddr, client_id: &str, topic: &str, payload: &str) -> Result<(), ConnectionError> {
    let (client, mut el) = device_v4(client_id, addr, Duration::from_secs(30));
    wait_connack_v4(&mut el).await?;
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .expect("queue PUBLISH");
    let mut events = spawn_eventloop_v4(el);
    events
        .wait_for(is_puback_v4, WAIT)
        .await
        .unwrap_or_else(|e| panic!("no PUBACK for {topic}: {e}"));
    Ok(())
}

/// Asserts that the next message the observer sees is `topic`/`payload`.
async fn assert_delivered(watch: &mut Observer, broker: &Mosquitto, topic: &str, payload: &str) {
    match watch.next_message(WAIT).await {
        Some(m) => assert_eq!(m, (topic.to_string(), payload.as_bytes().to_vec())),
        None => panic!(
            "{topic} never reached the observer (wrong identity?)\n{}",
            broker.diagnostics()
        ),
    }
}

/// A port on 127.0.0.1 for a listener that must be named in the config before mqtls binds it, held until
/// the returned socket is dropped: it is bound (`SO_REUSEADDR`, not listening), so the kernel hands the port
/// to no other `bind(0)` or `connect()`, while mqtls's own listener (tokio sets `SO_REUSEADDR`) can still
/// bind and listen on it. Drop the socket once mqtls is listening.
fn reserve_local_port() -> (TcpSocket, SocketAddr) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
    let addr = socket.local_addr().expect("local addr");
    (socket, addr)
}

// ---------------------------------------------------------------------------------------------------------
// A raw MQTT 3.1.1 device (packets from `common::raw`), for what rumqttc cannot do: connect from a chosen
// local address.

const CONNACK_ACCEPTED: u8 = 0x00;
const CONNACK_IDENTIFIER_REJECTED: u8 = 0x02;

/// Connects from `from` (any port) to `to`, sends CONNECT (clean session, keep-alive 30 s) and returns the
/// socket and the CONNACK return code.
async fn connect_from(from: IpAddr, to: SocketAddr, client_id: &str) -> (TcpStream, u8) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind local address");
    let mut stream = socket.connect(to).await.expect("connect");
    assert_eq!(stream.local_addr().unwrap().ip(), from);
    stream
        .write_all(&raw::connect(Version::V311, client_id, 30))
        .await
        .expect("send CONNECT");
    let ack = raw::expect_connack(&mut stream, Version::V311, WAIT).await;
    (stream, ack.code)
}

/// QoS 1 PUBLISH (packet id 1), then waits for its PUBACK.
async fn publish_raw(stream: &mut TcpStream, topic: &str, payload: &str) {
    stream
        .write_all(&raw::publish(Version::V311, topic, 1, 1, payload.as_bytes()))
        .await
        .expect("send PUBLISH");
    let p = raw::read_packet(stream, Instant::now() + WAIT)
        .await
        .unwrap_or_else(|e| panic!("waiting for PUBACK: {e}"));
    assert_eq!(raw::parse_puback(&p), Ok(1));
}

// ---------------------------------------------------------------------------------------------------------
// Device directory

/// mqtls serving the device directory `fleet/`, with one entry for `cn` in it and, if `client_id` is
/// given, a `device.toml` that sets it.
async fn device_dir_setup(cn: &'static str, client_id: Option<&'static str>) -> Running {
    Scenario::new()
        .configure(move |pki, cfg| {
            let entry = pki.dir().join("fleet").join(cn);
            pki.client_in(&entry, cn);
            if let Some(id) = client_id {
                std::fs::write(entry.join("device.toml"), format!("client_id = {id:?}\n")).unwrap();
            }
            cfg.extra = "\n[device_dir]\npath = \"fleet\"\n".into();
        })
        .start()
        .await
}

#[tokio::test]
async fn device_dir_entry_is_served_under_its_own_identity() {
    let setup = device_dir_setup("dir-sensor-1", None).await;
    let mut watch = observer(&setup.pki, &setup.broker, "sensors/#").await;

    publish_via(setup.proxy.addr(), "dir-sensor-1", "sensors/dir-sensor-1/t", "19.0")
        .await
        .expect("directory device served");
    assert_delivered(&mut watch, &setup.broker, "sensors/dir-sensor-1/t", "19.0").await;
    assert!(setup.broker.connected_usernames().contains(&"dir-sensor-1".to_string()));
}

#[tokio::test]
async fn device_dir_entry_with_device_toml_is_matched_by_its_client_id() {
    let setup = device_dir_setup("dir-meter-2", Some("legacy-0042")).await;
    let mut watch = observer(&setup.pki, &setup.broker, "sensors/#").await;

    publish_via(setup.proxy.addr(), "legacy-0042", "sensors/dir-meter-2/kwh", "7")
        .await
        .expect("device.toml client id served");
    assert_delivered(&mut watch, &setup.broker, "sensors/dir-meter-2/kwh", "7").await;
}

#[tokio::test]
async fn device_dir_entry_with_device_toml_client_id_is_not_matched_by_its_directory_name() {
    let setup = device_dir_setup("dir-meter-3", Some("legacy-0043")).await;

    match publish_via(setup.proxy.addr(), "dir-meter-3", "sensors/dir-meter-3/kwh", "7").await {
        Err(ConnectionError::ConnectionRefused(ConnectReturnCode::BadClientId)) => {}
        other => panic!("expected CONNACK identifier rejected, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Dedicated listener

/// A device with no client id of its own, served on a listener of its own.
async fn dedicated_setup() -> (Running, SocketAddr) {
    let (reservation, dedicated) = reserve_local_port();
    let setup = Scenario::new()
        .device_with("old-meter", move |meter| meter.client_id(None).listen(dedicated))
        .start()
        .await;
    drop(reservation);
    assert!(setup.proxy.addrs.contains(&dedicated), "{:?}", setup.proxy.addrs);
    (setup, dedicated)
}

#[tokio::test]
async fn dedicated_listener_serves_its_device_with_an_empty_client_id() {
    let (setup, dedicated) = dedicated_setup().await;
    let mut watch = observer(&setup.pki, &setup.broker, "sensors/#").await;

    publish_via(dedicated, "", "sensors/old-meter/kwh", "1234")
        .await
        .expect("served on its own listener");
    assert_delivered(&mut watch, &setup.broker, "sensors/old-meter/kwh", "1234").await;
    assert!(setup.broker.connected_usernames().contains(&"old-meter".to_string()));
}

#[tokio::test]
async fn dedicated_device_is_refused_on_the_shared_listener() {
    let (setup, dedicated) = dedicated_setup().await;
    let shared = setup.proxy.addr();
    assert_ne!(shared, dedicated);

    match publish_via(shared, "", "sensors/old-meter/kwh", "1234").await {
        Err(ConnectionError::ConnectionRefused(ConnectReturnCode::BadClientId)) => {}
        other => panic!("expected CONNACK identifier rejected, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Source rules

/// Two devices that send the same client id, told apart by their source address.
async fn source_setup() -> Running {
    Scenario::new()
        .device_with("src-a", |a| a.client_id(Some("shared-sensor")).source("127.0.0.1"))
        .device_with("src-b", |b| b.client_id(Some("shared-sensor")).source("127.0.0.2/32"))
        .start()
        .await
}

#[tokio::test]
async fn same_client_id_from_127_0_0_2_gets_the_identity_with_that_source() {
    let setup = source_setup().await;
    let mut watch = observer(&setup.pki, &setup.broker, "sensors/#").await;

    let (mut dev, code) = connect_from([127, 0, 0, 2].into(), setup.proxy.addr(), "shared-sensor").await;
    assert_eq!(code, CONNACK_ACCEPTED);
    publish_raw(&mut dev, "sensors/src-b/t", "from .2").await;
    assert_delivered(&mut watch, &setup.broker, "sensors/src-b/t", "from .2").await;
    let users = setup.broker.connected_usernames();
    assert!(users.contains(&"src-b".to_string()), "{users:?}");
    assert!(!users.contains(&"src-a".to_string()), "{users:?}");
}

#[tokio::test]
async fn same_client_id_from_127_0_0_1_gets_the_identity_with_that_source() {
    let setup = source_setup().await;
    let mut watch = observer(&setup.pki, &setup.broker, "sensors/#").await;

    let (mut dev, code) = connect_from([127, 0, 0, 1].into(), setup.proxy.addr(), "shared-sensor").await;
    assert_eq!(code, CONNACK_ACCEPTED);
    publish_raw(&mut dev, "sensors/src-a/t", "from .1").await;
    assert_delivered(&mut watch, &setup.broker, "sensors/src-a/t", "from .1").await;
    let users = setup.broker.connected_usernames();
    assert!(users.contains(&"src-a".to_string()), "{users:?}");
    assert!(!users.contains(&"src-b".to_string()), "{users:?}");
}

#[tokio::test]
async fn client_id_from_an_address_outside_every_source_is_refused() {
    let setup = source_setup().await;

    let (_dev, code) = connect_from([127, 0, 0, 3].into(), setup.proxy.addr(), "shared-sensor").await;
    assert_eq!(code, CONNACK_IDENTIFIER_REJECTED);
}

// ---------------------------------------------------------------------------------------------------------
// Fallback

/// A known device "boiler-1" and, optionally, a fallback identity with CN "gateway-shared".
async fn fallback_setup(with_fallback: bool) -> Running {
    Scenario::new()
        .device("boiler-1")
        .configure(move |pki, cfg| {
            if with_fallback {
                let shared = pki.client_in(&pki.dir().join("fallback"), "gateway-shared");
                cfg.extra = format!("\n[fallback]\ncert = {:?}\nkey = {:?}\n", shared.cert, shared.key);
            }
        })
        .start()
        .await
}

#[tokio::test]
async fn fallback_identity_serves_an_unknown_client_id() {
    let setup = fallback_setup(true).await;
    let mut watch = observer(&setup.pki, &setup.broker, "sensors/#").await;

    publish_via(setup.proxy.addr(), "stranger-7", "sensors/gateway-shared/t", "hi")
        .await
        .expect("unknown client id served by the fallback");
    assert_delivered(&mut watch, &setup.broker, "sensors/gateway-shared/t", "hi").await;
    assert!(setup
        .broker
        .connected_usernames()
        .contains(&"gateway-shared".to_string()));
}

#[tokio::test]
async fn fallback_does_not_take_over_a_known_device() {
    let setup = fallback_setup(true).await;
    let mut watch = observer(&setup.pki, &setup.broker, "sensors/#").await;

    publish_via(setup.proxy.addr(), "boiler-1", "sensors/boiler-1/t", "60")
        .await
        .expect("known device served");
    assert_delivered(&mut watch, &setup.broker, "sensors/boiler-1/t", "60").await;
    assert!(!setup
        .broker
        .connected_usernames()
        .contains(&"gateway-shared".to_string()));
}

#[tokio::test]
async fn unknown_client_id_without_fallback_is_refused_identifier_rejected() {
    let setup = fallback_setup(false).await;

    match publish_via(setup.proxy.addr(), "stranger-7", "sensors/stranger-7/t", "hi").await {
        Err(ConnectionError::ConnectionRefused(ConnectReturnCode::BadClientId)) => {}
        other => panic!("expected CONNACK identifier rejected, got {other:?}"),
    }
}
