//! The whole daemon, run in the test's own process as `mqtls run` runs it (`mqtls::daemon`): the proxy,
//! the metrics endpoint and the reloader together, driven through the same plain values the binary hands
//! it (a shutdown token, a channel of reload requests), in front of a real Mosquitto.

use std::time::Duration;

use mqtls::daemon::{Control, Daemon};
use mqtls::systemd::Notifier;
use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::common::daemon::GUARD;
use crate::common::metrics::scrape_until;
use crate::common::mqtt_client::{device_v4, is_puback_v4, spawn_eventloop_v4, wait_connack_v4};
use crate::common::proxy::{DeviceEntry, ProxyConfig};
use crate::common::{observer, wait_until, Mosquitto, Pki};

#[tokio::test]
async fn the_daemon_runs_in_process_serves_metrics_reloads_on_request_and_stops_on_its_token() {
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki).await;
    let mut config = ProxyConfig::new(&pki, broker.addr())
        .shutdown_grace("1s")
        .device(DeviceEntry::new(&pki.client("inproc-1")));
    // Reloads come from the channel alone, so that the count below is exact.
    config.extra = "\n[metrics]\naddress = \"127.0.0.1:0\"\n\n[reload]\nwatch = false\n".into();
    let path = config.write(pki.dir());
    let shutdown = CancellationToken::new();
    let (reload, requests) = mpsc::channel(1);
    let control = Control {
        shutdown: shutdown.clone(),
        reload: requests,
        notifier: Notifier::from_env(),
        adopted: Vec::new(),
    };
    let daemon = Daemon::start(mqtls::load(&path).unwrap(), control).await.unwrap();
    let addr = daemon.local_addrs()[0];
    let metrics = daemon.metrics_address().expect("a metrics endpoint was configured");
    let handle = daemon.handle();
    let running = tokio::spawn(daemon.run());

    let mut watch = observer(&pki, &broker, "sensors/#").await;
    let (client, mut el) = device_v4("inproc-1", addr, Duration::from_secs(30));
    wait_connack_v4(&mut el).await.expect("device connected");
    let mut events = spawn_eventloop_v4(el);
    client
        .publish("sensors/inproc-1/t", QoS::AtLeastOnce, false, "21.5")
        .await
        .unwrap();
    events.wait_for(is_puback_v4, GUARD).await.expect("PUBACK");
    let got = watch.next_message(GUARD).await.expect("the observer got nothing");
    assert_eq!(got, ("sensors/inproc-1/t".to_string(), b"21.5".to_vec()));
    scrape_until(metrics, "the device counted as connected", |s| {
        s.value("mqtls_connections_active{device=\"inproc-1\"}") == Some(1.0)
    })
    .await;

    config.devices.push(DeviceEntry::new(&pki.client("inproc-2")));
    std::fs::write(&path, config.toml()).unwrap();
    reload.send(()).await.unwrap();
    let reloaded = wait_until(GUARD, || handle.generation().table.devices().len() == 2).await;
    assert!(reloaded, "the reload request was not acted on");
    scrape_until(metrics, "one successful reload", |s| {
        s.value("mqtls_config_reloads_total{result=\"success\"}") == Some(1.0)
    })
    .await;

    shutdown.cancel();
    tokio::time::timeout(GUARD, running)
        .await
        .expect("the daemon did not stop on its token")
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still listening after it stopped"
    );
}
