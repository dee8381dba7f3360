//! The Prometheus endpoint of `mqtls run`, scraped over HTTP after real traffic through a real Mosquitto:
//! the values an operator's dashboards and alerts rely on must follow what happened.

use std::path::Path;

use crate::common;
use crate::common::daemon::{Daemon, GUARD};
use crate::common::metrics::{http_get, scrape_until, Scrape};
use crate::common::proxy::{DeviceEntry, ProxyConfig};
use crate::common::raw::{self, Version};
use crate::common::scenario::Scenario;
use crate::common::{Mosquitto, Pki};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

const METRICS: &str = "\n[metrics]\naddress = \"127.0.0.1:0\"\n";

/// The certificate's notAfter as a Unix timestamp, read independently of mqtls.
fn not_after(cert: &Path) -> i64 {
    let pem = std::fs::read(cert).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    cert.validity().not_after.timestamp()
}

#[tokio::test]
async fn scrape_follows_real_traffic() {
    let setup = Scenario::new()
        .device("metrics-sensor")
        .configure(|_, config| config.extra.push_str(METRICS))
        .spawn()
        .await;
    let sensor = &setup.devices[0];
    let metrics = setup.daemon.metrics_addr().await;

    let before = Scrape::take(metrics).await;
    let active = "mqtls_connections_active{device=\"metrics-sensor\"}";
    assert_eq!(before.get("mqtls_connections_accepted_total"), 0.0);
    assert_eq!(
        before.get(active),
        0.0,
        "every configured device has a series from the start"
    );
    assert_eq!(before.get("mqtls_devices"), 1.0);
    assert_eq!(
        before.get(&format!(
            "mqtls_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    assert_eq!(
        before.get("mqtls_device_cert_expiry_timestamp_seconds{device=\"metrics-sensor\"}") as i64,
        not_after(&sensor.cert)
    );

    // A device with a known byte count each way: CONNECT + PUBLISH in, CONNACK + PUBACK out.
    let connect = raw::connect(Version::V311, "metrics-sensor", 60);
    let publish = raw::publish(Version::V311, "sensors/metrics-sensor/t", 1, 7, b"21.5");
    let mut dev = raw::device(setup.addr).await;
    dev.write_all(&connect).await.unwrap();
    assert_eq!(raw::expect_connack(&mut dev, Version::V311, GUARD).await.code, 0);
    dev.write_all(&publish).await.unwrap();
    let puback = raw::read_packet(&mut dev, Instant::now() + GUARD).await.unwrap();
    assert_eq!(raw::parse_puback(&puback), Ok(7));

    let during = scrape_until(metrics, "the device counted as active", |s| {
        s.value(active) == Some(1.0)
    })
    .await;
    assert_eq!(during.get("mqtls_connections_accepted_total"), 1.0);
    assert_eq!(during.get("mqtls_upstream_handshake_seconds_count"), 1.0);
    assert_eq!(
        during.get("mqtls_bytes_total{device=\"metrics-sensor\",direction=\"to_broker\"}"),
        (connect.len() + publish.len()) as f64
    );
    assert_eq!(
        during.get("mqtls_bytes_total{device=\"metrics-sensor\",direction=\"to_device\"}"),
        8.0,
        "CONNACK (4 bytes) and PUBACK (4 bytes)"
    );

    dev.write_all(&raw::disconnect()).await.unwrap();
    dev.shutdown().await.unwrap();
    drop(dev);
    let after = scrape_until(metrics, "the device no longer active", |s| s.value(active) == Some(0.0)).await;
    assert_eq!(after.get("mqtls_connection_duration_seconds_count"), 1.0);
    assert!(after.get("mqtls_connection_duration_seconds_sum") > 0.0);

    // Refusals, each counted under its own reason.
    let mut stranger = raw::device(setup.addr).await;
    stranger
        .write_all(&raw::connect(Version::V311, "stranger", 60))
        .await
        .unwrap();
    assert_eq!(raw::expect_connack(&mut stranger, Version::V311, GUARD).await.code, 2);
    let mut garbage = raw::device(setup.addr).await;
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let refused = scrape_until(metrics, "both refusals counted", |s| {
        s.value("mqtls_connections_refused_total{reason=\"bad_connect\"}") == Some(1.0)
            && s.value("mqtls_connections_refused_total{reason=\"unknown_device\"}") == Some(1.0)
    })
    .await;
    assert_eq!(refused.get("mqtls_connections_accepted_total"), 3.0);
    assert_eq!(refused.get("mqtls_connections_refused_total{reason=\"busy\"}"), 0.0);
    assert_eq!(
        refused.get("mqtls_upstream_connect_failures_total{reason=\"connect\"}"),
        0.0
    );
}

#[tokio::test]
async fn every_family_has_help_and_a_conventional_name() {
    let pki = Pki::new();
    let mut config =
        ProxyConfig::new(&pki, "127.0.0.1:1".parse().unwrap()).device(DeviceEntry::new(&pki.client("named")));
    config.extra.push_str(METRICS);
    let daemon = Daemon::spawn(&config.write(pki.dir()));
    daemon.ready().await;
    let scrape = Scrape::take(daemon.metrics_addr().await).await;
    let families = scrape.families();
    for name in mqtls::metrics::NAMES {
        let (_, kind) = families
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} is not exported:\n{}", scrape.0));
        assert!(scrape.help(name).is_some_and(|h| !h.is_empty()), "{name} has no HELP");
        assert_eq!(kind == "counter", name.ends_with("_total"), "{name} is a {kind}");
    }
    for (name, _) in &families {
        assert!(
            mqtls::metrics::NAMES.contains(&name.as_str()),
            "{name} is exported but not listed in NAMES"
        );
    }
    let (status, _) = http_get(daemon.metrics_addr().await, "/nothing-here").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, body) = http_get(daemon.metrics_addr().await, "/health").await;
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "ok\n"));
}

#[tokio::test]
async fn an_unreachable_broker_counts_a_refusal_and_a_connect_failure() {
    let pki = Pki::new();
    let dead = common::mosquitto::free_port();
    let mut config = ProxyConfig::new(&pki, format!("127.0.0.1:{dead}").parse().unwrap())
        .device(DeviceEntry::new(&pki.client("lonely")));
    config.extra.push_str(METRICS);
    let daemon = Daemon::spawn(&config.write(pki.dir()));
    let addr = daemon.ready().await;
    let metrics = daemon.metrics_addr().await;

    let mut dev = raw::device(addr).await;
    dev.write_all(&raw::connect(Version::V5, "lonely", 60)).await.unwrap();
    assert_eq!(raw::expect_connack(&mut dev, Version::V5, GUARD).await.code, 0x88);
    let s = scrape_until(metrics, "the refusal counted", |s| {
        s.value("mqtls_connections_refused_total{reason=\"broker_unreachable\"}") == Some(1.0)
    })
    .await;
    assert_eq!(s.get("mqtls_upstream_connect_failures_total{reason=\"connect\"}"), 1.0);
    assert_eq!(s.get("mqtls_upstream_handshake_seconds_count"), 0.0);
    assert_eq!(s.get("mqtls_connections_active{device=\"lonely\"}"), 0.0);
}

#[tokio::test]
async fn device_labels_can_be_switched_off() {
    let setup = Scenario::new()
        .device("quiet-a")
        .device("quiet-b")
        .configure(|_, config| {
            config
                .extra
                .push_str("\n[metrics]\naddress = \"127.0.0.1:0\"\ndevice_labels = false\n")
        })
        .spawn()
        .await;
    let metrics = setup.daemon.metrics_addr().await;

    let mut devs = Vec::new();
    for id in ["quiet-a", "quiet-b"] {
        let mut d = raw::device(setup.addr).await;
        d.write_all(&raw::connect(Version::V311, id, 60)).await.unwrap();
        assert_eq!(raw::expect_connack(&mut d, Version::V311, GUARD).await.code, 0);
        devs.push(d);
    }
    let s = scrape_until(metrics, "both devices in one series", |s| {
        s.value("mqtls_connections_active") == Some(2.0)
    })
    .await;
    assert!(!s.0.contains("device=\""), "a device label is still exported:\n{}", s.0);
    assert_eq!(s.get("mqtls_bytes_total{direction=\"to_device\"}"), 8.0, "two CONNACKs");
    assert!(s.value("mqtls_device_cert_expiry_timestamp_seconds").is_some());
}

#[tokio::test]
async fn a_metrics_address_on_a_device_port_is_a_config_error() {
    let pki = Pki::new();
    let mut config = ProxyConfig::new(&pki, "127.0.0.1:1".parse().unwrap())
        .listen("127.0.0.1:1883".parse().unwrap())
        .device(DeviceEntry::new(&pki.client("x")));
    config.extra.push_str("\n[metrics]\naddress = \"0.0.0.0:1883\"\n");
    let path = config.write(pki.dir());
    let out = std::process::Command::new(common::daemon::BIN)
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("`metrics.address`") && stderr.contains(path.to_str().unwrap()),
        "{stderr}"
    );
}

/// A device socket from another loopback address (Linux routes all of 127.0.0.0/8 to lo).
async fn device_from(source: &str, addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

#[tokio::test]
async fn limits_are_counted_under_their_own_reasons() {
    let pki = Pki::new();
    let mut config =
        ProxyConfig::new(&pki, "127.0.0.1:1".parse().unwrap()).device(DeviceEntry::new(&pki.client("limited")));
    config.max_connections = 1;
    config.max_pending_per_source = Some(1);
    config.connect_timeout = "2s".into();
    config.extra.push_str(METRICS);
    let daemon = Daemon::spawn(&config.write(pki.dir()));
    let addr = daemon.ready().await;
    let metrics = daemon.metrics_addr().await;

    // A sends nothing: it holds the only connection slot and 127.0.0.1's only unidentified slot.
    let _silent = raw::device(addr).await;
    scrape_until(metrics, "the first connection accepted", |s| {
        s.value("mqtls_connections_accepted_total") == Some(1.0)
    })
    .await;
    // Another from 127.0.0.1 is over the per-source limit.
    let _crowd = raw::device(addr).await;
    // One from elsewhere is over the connection limit, and told so.
    let mut busy = device_from("127.0.0.2", addr).await;
    busy.write_all(&raw::connect(Version::V311, "limited", 60))
        .await
        .unwrap();
    assert_eq!(raw::expect_connack(&mut busy, Version::V311, GUARD).await.code, 3);
    // The silent one runs out of time.
    let s = scrape_until(metrics, "each limit counted", |s| {
        s.value("mqtls_connections_refused_total{reason=\"connect_timeout\"}") == Some(1.0)
    })
    .await;
    assert_eq!(s.get("mqtls_connections_refused_total{reason=\"source_limit\"}"), 1.0);
    assert_eq!(s.get("mqtls_connections_refused_total{reason=\"busy\"}"), 1.0);
    assert_eq!(s.get("mqtls_connections_refused_total{reason=\"bad_connect\"}"), 0.0);
    assert_eq!(s.get("mqtls_connections_accepted_total"), 3.0);
}

#[tokio::test]
async fn the_endpoint_outlasts_idle_and_oversized_clients() {
    use tokio::io::AsyncReadExt;

    let pki = Pki::new();
    let mut config = ProxyConfig::new(&pki, "127.0.0.1:1".parse().unwrap()).device(DeviceEntry::new(&pki.client("e")));
    config.extra.push_str(METRICS);
    let daemon = Daemon::spawn(&config.write(pki.dir()));
    daemon.ready().await;
    let metrics = daemon.metrics_addr().await;

    // More idle clients than the endpoint serves at once: they are dropped after a short wait.
    let mut idle = Vec::new();
    for _ in 0..12 {
        idle.push(tokio::net::TcpStream::connect(metrics).await.unwrap());
    }
    let scrape = tokio::time::timeout(GUARD, Scrape::take(metrics))
        .await
        .expect("a scrape behind idle clients");
    assert!(scrape.value("mqtls_devices").is_some());

    // A request head that never ends is cut off once it is too large.
    let mut big = tokio::net::TcpStream::connect(metrics).await.unwrap();
    let mut header = b"GET /metrics HTTP/1.1\r\n".to_vec();
    header.extend(std::iter::repeat_n(b'x', 16 * 1024));
    let _ = big.write_all(&header).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(GUARD, big.read_to_end(&mut rest))
        .await
        .expect("the server closes it");
    assert!(
        read.is_err() || rest.is_empty(),
        "an answer to an oversized head: {rest:?}"
    );
    assert!(Scrape::take(metrics).await.value("mqtls_devices").is_some());
}

#[tokio::test]
async fn a_broker_that_rejects_the_device_certificate_is_counted_and_the_device_answered() {
    let pki = Pki::new();
    // The broker trusts client certificates of another CA only: with TLS 1.3 mqtls's handshake completes,
    // and the rejection arrives as an alert once mqtls waits for the CONNACK.
    let other = Pki::other_ca();
    let server = pki.server("localhost", &["localhost", "127.0.0.1"]);
    let broker = Mosquitto::start_with_client_ca(&pki, &server, other.ca_pem_path()).await;
    let mut config = ProxyConfig::new(&pki, broker.addr()).device(DeviceEntry::new(&pki.client("stranger-cert")));
    config.extra.push_str(METRICS);
    let daemon = Daemon::spawn(&config.write(pki.dir()));
    let addr = daemon.ready().await;
    let metrics = daemon.metrics_addr().await;

    for (version, code) in [(Version::V311, 0x03), (Version::V5, 0x88)] {
        let mut dev = raw::device(addr).await;
        dev.write_all(&raw::connect(version, "stranger-cert", 60))
            .await
            .unwrap();
        assert_eq!(
            raw::expect_connack(&mut dev, version, GUARD).await.code,
            code,
            "{version:?}"
        );
    }
    let s = scrape_until(metrics, "both rejections counted", |s| {
        s.value("mqtls_upstream_connect_failures_total{reason=\"tls\"}") == Some(2.0)
    })
    .await;
    assert_eq!(
        s.get("mqtls_connections_refused_total{reason=\"broker_unreachable\"}"),
        2.0
    );
    assert_eq!(
        s.get("mqtls_upstream_handshake_seconds_count"),
        0.0,
        "never counted as reached"
    );
    assert_eq!(s.get("mqtls_connections_active{device=\"stranger-cert\"}"), 0.0);
    let line = daemon.wait_line(&["the broker did not accept the connection"]).await;
    assert!(line.contains("reason=\"broker_unreachable\""), "{line}");
    assert!(line.contains("failure=\"tls\""), "{line}");
}

#[tokio::test]
async fn a_failover_counts_the_attempt_that_failed_before_it() {
    let dead = common::mosquitto::free_port();
    let setup = Scenario::new()
        .device("second-try")
        .configure(move |_, config| {
            config.upstream.insert(0, format!("127.0.0.1:{dead}"));
            config.extra.push_str(METRICS);
        })
        .spawn()
        .await;
    let metrics = setup.daemon.metrics_addr().await;

    let mut dev = raw::device(setup.addr).await;
    dev.write_all(&raw::connect(Version::V311, "second-try", 60))
        .await
        .unwrap();
    assert_eq!(raw::expect_connack(&mut dev, Version::V311, GUARD).await.code, 0);
    let s = scrape_until(metrics, "the connection active", |s| {
        s.value("mqtls_connections_active{device=\"second-try\"}") == Some(1.0)
    })
    .await;
    assert_eq!(s.get("mqtls_upstream_connect_failures_total{reason=\"connect\"}"), 1.0);
    assert_eq!(
        s.get("mqtls_connections_refused_total{reason=\"broker_unreachable\"}"),
        0.0
    );
    assert_eq!(s.get("mqtls_upstream_handshake_seconds_count"), 1.0);
}
