//! Each device reaches the broker under its own certificate: the broker's per-identity ACL decides what
//! each may publish, and a subscriber at the broker sees exactly the allowed messages.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::logs::Logs;
use crate::common::mqtt_client::{
    device_v4, device_v5, is_puback_v4, is_puback_v5, is_suback_v4, is_suback_v5, spawn_eventloop_v4,
    spawn_eventloop_v5, wait_connack_v4, wait_connack_v5, MQTT_DEADLINE,
};
use crate::common::observer;
use crate::common::scenario::Scenario;
use rumqttc::QoS;

const MESSAGES_PER_DEVICE: usize = 20;

async fn publish_run_v4(client_id: &str, proxy: std::net::SocketAddr, other: &str) {
    let (client, mut el) = device_v4(client_id, proxy, Duration::from_secs(30));
    wait_connack_v4(&mut el).await.expect("device accepted");
    let mut events = spawn_eventloop_v4(el);
    for n in 0..MESSAGES_PER_DEVICE {
        client
            .publish(
                format!("sensors/{client_id}/reading"),
                QoS::AtLeastOnce,
                false,
                format!("{n}"),
            )
            .await
            .unwrap();
        // The broker's ACL must drop this one: it is in the other device's tree.
        if n == MESSAGES_PER_DEVICE / 2 {
            client
                .publish(
                    format!("sensors/{other}/reading"),
                    QoS::AtLeastOnce,
                    false,
                    format!("spoof from {client_id}"),
                )
                .await
                .unwrap();
        }
    }
    // MESSAGES_PER_DEVICE + 1 PUBACKs (a denied QoS 1 publish is still acknowledged in 3.1.1).
    for _ in 0..=MESSAGES_PER_DEVICE {
        events.wait_for(is_puback_v4, MQTT_DEADLINE).await.expect("PUBACK");
    }
    client
        .publish(format!("sensors/{client_id}/done"), QoS::AtLeastOnce, false, "")
        .await
        .unwrap();
    events
        .wait_for(is_puback_v4, MQTT_DEADLINE)
        .await
        .expect("PUBACK for done");
}

#[tokio::test]
async fn two_devices_publish_concurrently_each_under_its_own_identity() {
    let setup = Scenario::new()
        .device_with("boiler-a", |d| d.source("127.0.0.1"))
        .device_with("boiler-b", |d| d.source("127.0.0.1"))
        .start()
        .await;
    let mut watch = observer(&setup.pki, &setup.broker, "sensors/#").await;

    tokio::join!(
        publish_run_v4("boiler-a", setup.proxy.addr(), "boiler-b"),
        publish_run_v4("boiler-b", setup.proxy.addr(), "boiler-a"),
    );

    let mut got = Vec::new();
    let mut done = BTreeSet::new();
    while done.len() < 2 {
        let (topic, payload) = watch
            .next_message(MQTT_DEADLINE)
            .await
            .expect("observer got everything");
        if topic.ends_with("/done") {
            done.insert(topic);
        } else {
            got.push((topic, String::from_utf8(payload).unwrap()));
        }
    }
    let expected: BTreeSet<(String, String)> = ["boiler-a", "boiler-b"]
        .iter()
        .flat_map(|d| (0..MESSAGES_PER_DEVICE).map(move |n| (format!("sensors/{d}/reading"), n.to_string())))
        .collect();
    let got_set: BTreeSet<(String, String)> = got.iter().cloned().collect();
    assert_eq!(got.len(), got_set.len(), "no duplicates");
    assert_eq!(got_set, expected, "exactly the allowed messages, none of the spoofs");

    let users = setup.broker.connected_usernames();
    assert!(
        users.contains(&"boiler-a".to_string()) && users.contains(&"boiler-b".to_string()),
        "{users:?}"
    );
    assert_eq!(setup.broker.count_in_log("Denied PUBLISH"), 2, "{}", setup.broker.log());
}

#[tokio::test]
async fn mqtt5_device_publishes_and_receives_through_mqtls() {
    let setup = Scenario::new().device("meter-5").start().await;
    let mut watch = observer(&setup.pki, &setup.broker, "sensors/#").await;

    let (client, mut el) = device_v5("meter-5", setup.proxy.addr(), Duration::from_secs(30));
    let ack = wait_connack_v5(&mut el).await.expect("accepted");
    assert_eq!(ack.code, rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success);
    let mut events = spawn_eventloop_v5(el);
    client
        .subscribe("sensors/meter-5/cmd", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    events.wait_for(is_suback_v5, MQTT_DEADLINE).await.expect("SUBACK");
    client
        .publish(
            "sensors/meter-5/cmd",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "v5 hello",
        )
        .await
        .unwrap();
    // Broker -> device direction: the device receives its own message back (the broker may send it before
    // or after the PUBACK).
    let (mut puback, mut payload) = (false, None);
    while !puback || payload.is_none() {
        match events
            .next(MQTT_DEADLINE)
            .await
            .expect("PUBACK and PUBLISH")
            .expect("no connection error")
        {
            rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::Publish(p)) => payload = Some(p.payload),
            e if is_puback_v5(&e) => puback = true,
            _ => {}
        }
    }
    assert_eq!(payload.as_deref(), Some(&b"v5 hello"[..]));
    assert_eq!(
        watch.next_message(MQTT_DEADLINE).await,
        Some(("sensors/meter-5/cmd".into(), b"v5 hello".to_vec()))
    );
    assert!(setup.broker.connected_usernames().contains(&"meter-5".to_string()));
}

#[tokio::test]
async fn mqtt311_device_receives_what_it_subscribed_to() {
    let setup = Scenario::new().device("valve-4").start().await;
    let (client, mut el) = device_v4("valve-4", setup.proxy.addr(), Duration::from_secs(30));
    wait_connack_v4(&mut el).await.expect("accepted");
    let mut events = spawn_eventloop_v4(el);
    client.subscribe("sensors/valve-4/#", QoS::AtLeastOnce).await.unwrap();
    events.wait_for(is_suback_v4, MQTT_DEADLINE).await.expect("SUBACK");
    client
        .publish("sensors/valve-4/state", QoS::AtLeastOnce, false, "open")
        .await
        .unwrap();
    let (mut puback, mut received) = (false, None);
    while !puback || received.is_none() {
        match events
            .next(MQTT_DEADLINE)
            .await
            .expect("PUBACK and PUBLISH")
            .expect("no connection error")
        {
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => received = Some((p.topic, p.payload)),
            e if is_puback_v4(&e) => puback = true,
            _ => {}
        }
    }
    let (topic, payload) = received.unwrap();
    assert_eq!((topic.as_str(), &payload[..]), ("sensors/valve-4/state", &b"open"[..]));
}

#[tokio::test]
async fn open_and_close_are_logged_once_with_device_and_bytes() {
    let (logs, _guard) = Logs::capture();
    let setup = Scenario::new().device("pump-9").start().await;
    let (client, mut el) = device_v4("pump-9", setup.proxy.addr(), Duration::from_secs(30));
    wait_connack_v4(&mut el).await.expect("accepted");
    let mut events = spawn_eventloop_v4(el);
    client
        .publish("sensors/pump-9/x", QoS::AtLeastOnce, false, "1")
        .await
        .unwrap();
    events.wait_for(is_puback_v4, MQTT_DEADLINE).await.expect("PUBACK");
    client.disconnect().await.unwrap();
    let closed = logs
        .wait_line(&["connection closed", "pump-9"], MQTT_DEADLINE)
        .await
        .unwrap();
    let opened = logs
        .wait_line(&["connection opened", "pump-9"], MQTT_DEADLINE)
        .await
        .unwrap();
    assert!(
        opened.contains("peer=127.0.0.1:") && opened.contains("mqtt=3.1.1"),
        "{opened}"
    );
    assert!(
        closed.contains("bytes_in=") && closed.contains("bytes_out=") && closed.contains("duration_s="),
        "{closed}"
    );
    // After DISCONNECT either side may close first.
    assert!(closed.contains(" closed") && closed.contains("end="), "{closed}");
    assert!(!logs.text().contains("PRIVATE KEY"), "no key material in logs");
    let opened_lines = logs
        .text()
        .lines()
        .filter(|l| l.contains("connection opened") && l.contains("pump-9"))
        .count();
    assert_eq!(opened_lines, 1);
}
