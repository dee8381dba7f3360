//! Graceful stop of the `mqtls` binary (`systemctl stop` sends SIGTERM): the listener closes at once, the
//! connections already open keep working until they end or `listen.shutdown_grace` runs out, then the
//! rest are closed and mqtls exits 0. Driven through a real Mosquitto; every assertion is about order and
//! outcome, never about how long something took.

use std::io::ErrorKind;
use std::time::Duration;

use crate::common::daemon::GUARD;
use crate::common::mqtt_client::{device_v4, is_puback_v4, spawn_eventloop_v4, wait_connack_v4};
use crate::common::observer;
use crate::common::scenario::Scenario;
use rumqttc::QoS;

/// Longer than any test here runs: a connection that ends within it ends because its device left.
const LONG_GRACE: &str = "10m";

/// The index of the first line holding `needle`, panicking with the whole log when there is none.
fn position(lines: &[String], needle: &str) -> usize {
    lines
        .iter()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{}", lines.join("\n")))
}

#[tokio::test]
async fn sigterm_refuses_new_connections_while_a_live_one_keeps_relaying_until_it_leaves_then_exits_0() {
    let mut setup = Scenario::new()
        .device("drain-live")
        .configure(|_, c| c.shutdown_grace = Some(LONG_GRACE.into()))
        .spawn()
        .await;
    let (daemon, addr) = (&mut setup.daemon, setup.addr);
    let mut watch = observer(&setup.pki, &setup.broker, "sensors/#").await;
    let (client, mut el) = device_v4("drain-live", addr, Duration::from_secs(30));
    wait_connack_v4(&mut el).await.expect("device connected");
    let mut events = spawn_eventloop_v4(el);

    daemon.wait_signal_handlers().await;
    daemon.signal("TERM");
    daemon.wait_line(&["waiting for open connections", "open=1"]).await;

    let refused = tokio::net::TcpStream::connect(addr).await;
    match refused {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!("a new connection was accepted after SIGTERM"),
    }

    client
        .publish("sensors/drain-live/during-stop", QoS::AtLeastOnce, false, "still here")
        .await
        .unwrap();
    events
        .wait_for(is_puback_v4, GUARD)
        .await
        .expect("the broker's PUBACK reached the device during the grace");
    let got = watch.next_message(GUARD).await.expect("observer got nothing");
    assert_eq!(
        got,
        ("sensors/drain-live/during-stop".to_string(), b"still here".to_vec())
    );
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "mqtls exited while the device was connected"
    );

    client.disconnect().await.unwrap();
    let status = daemon
        .wait_exit(GUARD)
        .await
        .expect("still running after the device left");
    assert_eq!(status.code(), Some(0), "{status:?}; stderr:\n{}", daemon.stderr());
    let summary = daemon.wait_line(&["all connections closed"]).await;
    for field in ["open_at_stop=1", "finished=1", "cut=0"] {
        assert!(summary.contains(field), "no {field} in {summary:?}");
    }
    assert!(!daemon.stderr().contains("grace period over"), "{}", daemon.stderr());
}

#[tokio::test]
async fn a_connection_that_outlives_the_grace_is_closed_at_its_end_and_mqtls_exits_0() {
    let mut setup = Scenario::new()
        .device("drain-stays")
        .configure(|_, c| c.shutdown_grace = Some("1s".into()))
        .spawn()
        .await;
    let (daemon, addr) = (&mut setup.daemon, setup.addr);
    // Keep-alive far beyond the grace: only the stop can end this connection.
    let (_client, mut el) = device_v4("drain-stays", addr, Duration::from_secs(600));
    wait_connack_v4(&mut el).await.expect("device connected");
    let mut events = spawn_eventloop_v4(el);

    daemon.wait_signal_handlers().await;
    daemon.signal("TERM");
    let status = daemon
        .wait_exit(GUARD)
        .await
        .expect("still running long after the grace");
    assert_eq!(status.code(), Some(0), "{status:?}; stderr:\n{}", daemon.stderr());
    events
        .wait_error(GUARD)
        .await
        .expect("the device's connection was closed");

    let lines = daemon.lines();
    let waiting = position(&lines, "waiting for open connections");
    let over = position(&lines, "grace period over");
    let closed = position(&lines, "connection closed at shutdown");
    let summary = position(&lines, "all connections closed");
    assert!(
        waiting < over && over < closed && closed < summary,
        "{}",
        lines.join("\n")
    );
    assert!(lines[waiting].contains("open=1"), "{}", lines[waiting]);
    assert!(lines[closed].contains("drain-stays"), "{}", lines[closed]);
    for field in ["open_at_stop=1", "finished=0", "cut=1"] {
        assert!(lines[summary].contains(field), "no {field} in {:?}", lines[summary]);
    }
}

#[tokio::test]
async fn a_second_signal_during_the_grace_stops_at_once_with_exit_0() {
    let mut setup = Scenario::new()
        .device("drain-twice")
        .configure(|_, c| c.shutdown_grace = Some(LONG_GRACE.into()))
        .spawn()
        .await;
    let (daemon, addr) = (&mut setup.daemon, setup.addr);
    let (_client, mut el) = device_v4("drain-twice", addr, Duration::from_secs(600));
    wait_connack_v4(&mut el).await.expect("device connected");
    let mut events = spawn_eventloop_v4(el);

    daemon.wait_signal_handlers().await;
    daemon.signal("TERM");
    daemon.wait_line(&["waiting for open connections", "open=1"]).await;
    daemon.signal("INT");
    let status = daemon
        .wait_exit(GUARD)
        .await
        .expect("still running after the second signal");
    assert_eq!(status.code(), Some(0), "{status:?}; stderr:\n{}", daemon.stderr());
    daemon.wait_line(&["second signal", "SIGINT"]).await;
    assert!(
        !daemon.stderr().contains("grace period over"),
        "the grace ran out instead:\n{}",
        daemon.stderr()
    );
    events
        .wait_error(GUARD)
        .await
        .expect("the device's connection ended with the process");
}
