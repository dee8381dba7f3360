//! Hot reload of `mqtls run`: certificates rotated with SIGHUP or just by replacing the files, an invalid
//! configuration refused while the old one keeps serving, devices and listeners added and removed. The
//! broker is a mutual-TLS echo server that records the serial of every client certificate presented, so
//! a test can tell which certificate each connection used; open connections must keep passing bytes
//! through every reload.

use std::net::SocketAddr;
use std::path::Path;

use crate::common;
use crate::common::daemon::{Daemon, GUARD};
use crate::common::metrics::{scrape_until, Scrape};
use crate::common::proxy::{DeviceEntry, ProxyConfig};
use crate::common::raw::{self, Version};
use crate::common::{EchoMode, Pki, TlsEcho};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const NO_WATCH: &str = "\n[reload]\nwatch = false\n\n[metrics]\naddress = \"127.0.0.1:0\"\n";
const FAST_WATCH: &str = "\n[reload]\nwatch_interval = \"100ms\"\n\n[metrics]\naddress = \"127.0.0.1:0\"\n";

/// A device connection through mqtls to the echo server: its CONNECT comes back as it was sent.
struct Session(TcpStream);

impl Session {
    async fn open(addr: SocketAddr, client_id: &str) -> Session {
        let mut s = raw::device(addr).await;
        let connect = raw::connect(Version::V311, client_id, 0);
        s.write_all(&connect).await.unwrap();
        let mut back = vec![0u8; connect.len()];
        timeout(GUARD, s.read_exact(&mut back))
            .await
            .expect("no echo of the CONNECT in time")
            .unwrap_or_else(|e| panic!("{client_id}: connection ended before the echo: {e}"));
        assert_eq!(back, connect);
        Session(s)
    }

    /// Sends `text` and expects it back: the connection still carries bytes both ways.
    async fn roundtrip(&mut self, text: &str) {
        self.0.write_all(text.as_bytes()).await.unwrap();
        let mut back = vec![0u8; text.len()];
        timeout(GUARD, self.0.read_exact(&mut back))
            .await
            .expect("no echo in time")
            .expect("the connection was closed");
        assert_eq!(back, text.as_bytes());
    }
}

/// The config file, rewritten in place (a reload reads the same path again).
fn write(path: &Path, config: &ProxyConfig) {
    std::fs::write(path, config.toml()).unwrap();
}

fn echo_config(pki: &Pki, echo: &TlsEcho, extra: &str) -> ProxyConfig {
    let mut c = ProxyConfig::new(pki, echo.addr());
    c.extra.push_str(extra);
    c
}

async fn reloads(daemon: &Daemon, result: &str) -> f64 {
    let s = Scrape::take(daemon.metrics_addr().await).await;
    s.get(&format!("mqtls_config_reloads_total{{result=\"{result}\"}}"))
}

#[tokio::test]
async fn sighup_rotates_a_certificate_and_open_connections_keep_theirs() {
    let pki = Pki::new();
    let echo = TlsEcho::start(&pki, EchoMode::Echo).await;
    let old = pki.client("rotor");
    let config = echo_config(&pki, &echo, NO_WATCH).device(DeviceEntry::new(&old));
    let daemon = Daemon::spawn(&config.write(pki.dir()));
    let addr = daemon.ready().await;

    let mut open = Session::open(addr, "rotor").await;
    open.roundtrip("before").await;

    let new = pki.client("rotor");
    assert_ne!(new.serial, old.serial);
    daemon.wait_signal_handlers().await;
    daemon.signal("HUP");
    let line = daemon.wait_line(&["configuration reloaded"]).await;
    assert!(line.contains("renewed=rotor"), "{line}");

    open.roundtrip("after the reload").await;
    let mut fresh = Session::open(addr, "rotor").await;
    fresh.roundtrip("new").await;
    assert_eq!(
        echo.serials(),
        vec![old.serial.clone(), new.serial.clone()],
        "the open connection kept the old certificate; the new one presented the new certificate"
    );
    assert_eq!(reloads(&daemon, "success").await, 1.0);
    assert_eq!(reloads(&daemon, "failure").await, 0.0);
}

#[tokio::test]
async fn an_invalid_configuration_is_refused_and_the_old_one_keeps_serving() {
    let pki = Pki::new();
    let echo = TlsEcho::start(&pki, EchoMode::Echo).await;
    let device = pki.client("steady");
    let config = echo_config(&pki, &echo, NO_WATCH).device(DeviceEntry::new(&device));
    let path = config.write(pki.dir());
    let daemon = Daemon::spawn(&path);
    let addr = daemon.ready().await;
    daemon.wait_signal_handlers().await;
    let mut open = Session::open(addr, "steady").await;

    // A key that does not belong to the certificate.
    let stranger = pki.operator("stranger");
    let good_key = std::fs::read(&device.key).unwrap();
    common::pki::write_file(&device.key, &std::fs::read(&stranger.key).unwrap(), 0o600);
    daemon.signal("HUP");
    let problem = daemon.wait_line(&["does not match the certificate"]).await;
    assert!(
        problem.contains(&device.key.display().to_string()) && problem.contains("`key`"),
        "the error names the file and the key: {problem}"
    );
    daemon.wait_line(&["configuration NOT reloaded"]).await;
    assert_eq!(reloads(&daemon, "failure").await, 1.0);

    // A typo in the configuration text.
    common::pki::write_file(&device.key, &good_key, 0o600);
    std::fs::write(&path, config.toml().replace("connect_timeout", "conect_timeout")).unwrap();
    daemon.signal("HUP");
    daemon.wait_nth_line(&["configuration NOT reloaded"], 2).await;
    let problem = daemon.wait_line(&["conect_timeout"]).await;
    assert!(problem.contains(&path.display().to_string()), "{problem}");
    assert_eq!(reloads(&daemon, "failure").await, 2.0);
    assert_eq!(reloads(&daemon, "success").await, 0.0);

    open.roundtrip("still here").await;
    let mut fresh = Session::open(addr, "steady").await;
    fresh.roundtrip("served by the old configuration").await;
    assert_eq!(echo.serials(), vec![device.serial.clone(), device.serial.clone()]);
}

#[tokio::test]
async fn a_replaced_certificate_is_picked_up_without_a_signal() {
    let pki = Pki::new();
    let echo = TlsEcho::start(&pki, EchoMode::Echo).await;
    let old = pki.client("watched");
    let config = echo_config(&pki, &echo, FAST_WATCH).device(DeviceEntry::new(&old));
    let daemon = Daemon::spawn(&config.write(pki.dir()));
    let addr = daemon.ready().await;
    let mut open = Session::open(addr, "watched").await;

    let new = pki.client("watched");
    daemon.wait_line(&["a watched file changed"]).await;
    daemon.wait_line(&["configuration reloaded", "renewed=watched"]).await;
    let mut fresh = Session::open(addr, "watched").await;
    fresh.roundtrip("x").await;
    open.roundtrip("y").await;
    assert_eq!(echo.serials().last(), Some(&new.serial));
    assert_eq!(echo.serials()[0], old.serial);
    assert!(reloads(&daemon, "success").await >= 1.0);
}

#[tokio::test]
async fn a_device_directory_entry_added_later_is_served() {
    let pki = Pki::new();
    let echo = TlsEcho::start(&pki, EchoMode::Echo).await;
    pki.client("dir-a");
    let mut config = echo_config(&pki, &echo, FAST_WATCH);
    config
        .extra
        .push_str(&format!("\n[device_dir]\npath = {:?}\n", pki.devices_dir()));
    let daemon = Daemon::spawn(&config.write(pki.dir()));
    let addr = daemon.ready().await;
    Session::open(addr, "dir-a").await;

    let mut refused = raw::device(addr).await;
    refused
        .write_all(&raw::connect(Version::V311, "dir-b", 0))
        .await
        .unwrap();
    assert_eq!(raw::expect_connack(&mut refused, Version::V311, GUARD).await.code, 2);

    let b = pki.client("dir-b");
    daemon.wait_line(&["configuration reloaded", "added=dir-b"]).await;
    Session::open(addr, "dir-b").await.roundtrip("hello").await;
    assert_eq!(echo.serials().last(), Some(&b.serial));
}

#[tokio::test]
async fn a_pending_device_is_served_once_its_signed_certificate_is_dropped_in() {
    let pki = Pki::new();
    let echo = TlsEcho::start(&pki, EchoMode::Echo).await;
    pki.client("ready-1");
    let out = std::process::Command::new(common::daemon::BIN)
        .args(["certs", "csr", "late-2", "--out"])
        .arg(pki.devices_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut config = echo_config(&pki, &echo, FAST_WATCH);
    config
        .extra
        .push_str(&format!("\n[device_dir]\npath = {:?}\n", pki.devices_dir()));
    let daemon = Daemon::spawn(&config.write(pki.dir()));
    let addr = daemon.ready().await;
    daemon.wait_line(&["late-2", "pending"]).await;

    let csr = std::fs::read_to_string(pki.device_dir("late-2").join("csr.pem")).unwrap();
    let (cert, serial) = pki.sign_csr(&csr);
    std::fs::write(pki.device_dir("late-2").join("cert.pem"), cert).unwrap();
    daemon.wait_line(&["configuration reloaded", "added=late-2"]).await;
    Session::open(addr, "late-2").await.roundtrip("signed at last").await;
    assert_eq!(echo.serials().last(), Some(&serial));
}

#[tokio::test]
async fn a_removed_device_is_refused_while_its_open_connection_goes_on() {
    let pki = Pki::new();
    let echo = TlsEcho::start(&pki, EchoMode::Echo).await;
    let (leaving, staying) = (pki.client("leaving"), pki.client("staying"));
    let config = echo_config(&pki, &echo, NO_WATCH)
        .device(DeviceEntry::new(&leaving))
        .device(DeviceEntry::new(&staying));
    let path = config.write(pki.dir());
    let daemon = Daemon::spawn(&path);
    let addr = daemon.ready().await;
    let metrics = daemon.metrics_addr().await;
    daemon.wait_signal_handlers().await;
    let mut open = Session::open(addr, "leaving").await;
    let mut kept = Session::open(addr, "staying").await;
    kept.roundtrip("counted before the reload").await;
    let staying_bytes = |s: &Scrape| {
        ["to_broker", "to_device"]
            .map(|d| s.value(&format!("mqtls_bytes_total{{device=\"staying\",direction=\"{d}\"}}")))
    };
    let before = scrape_until(metrics, "staying's bytes counted both ways", |s| {
        staying_bytes(s).iter().all(|v| v.is_some_and(|v| v > 0.0))
    })
    .await;

    let mut smaller = config.clone();
    smaller.devices.retain(|d| d.name != "leaving");
    write(&path, &smaller);
    daemon.signal("HUP");
    daemon.wait_line(&["configuration reloaded", "removed=leaving"]).await;

    let after = Scrape::take(metrics).await;
    for (b, a) in staying_bytes(&before).into_iter().zip(staying_bytes(&after)) {
        let (b, a) = (
            b.unwrap(),
            a.unwrap_or_else(|| panic!("staying's bytes are gone:\n{}", after.0)),
        );
        assert!(
            a >= b,
            "a device kept across the reload has its bytes counter reset: {b} -> {a}"
        );
    }
    kept.roundtrip("after the reload").await;

    open.roundtrip("the open connection is not dropped").await;
    let mut again = raw::device(addr).await;
    again
        .write_all(&raw::connect(Version::V311, "leaving", 0))
        .await
        .unwrap();
    assert_eq!(raw::expect_connack(&mut again, Version::V311, GUARD).await.code, 2);
    Session::open(addr, "staying").await;
    let s = Scrape::take(metrics).await;
    assert_eq!(
        s.value("mqtls_device_cert_expiry_timestamp_seconds{device=\"leaving\"}"),
        None
    );
    assert_eq!(s.get("mqtls_connections_active{device=\"leaving\"}"), 1.0, "still open");
    assert!(s.get("mqtls_bytes_total{device=\"leaving\",direction=\"to_broker\"}") > 0.0);
    assert_eq!(s.get("mqtls_devices"), 1.0);

    // Once its last connection has closed, the removed device's series go.
    drop(open);
    let gone = scrape_until(metrics, "the removed device's series gone", |s| {
        !s.0.lines()
            .any(|l| !l.starts_with('#') && l.contains("device=\"leaving\""))
    })
    .await;
    assert_eq!(gone.value("mqtls_connections_active{device=\"leaving\"}"), None);
    assert_eq!(
        gone.value("mqtls_bytes_total{device=\"leaving\",direction=\"to_broker\"}"),
        None
    );
    assert!(gone
        .value("mqtls_device_cert_expiry_timestamp_seconds{device=\"staying\"}")
        .is_some());
    assert_eq!(gone.get("mqtls_connections_active{device=\"staying\"}"), 1.0, "kept");
    assert_eq!(gone.get("mqtls_devices"), 1.0);
}

#[tokio::test]
async fn a_reload_that_cannot_listen_is_refused_and_the_old_configuration_keeps_serving() {
    let pki = Pki::new();
    let echo = TlsEcho::start(&pki, EchoMode::Echo).await;
    let served = pki.client("served");
    let config = echo_config(&pki, &echo, NO_WATCH).device(DeviceEntry::new(&served));
    let path = config.write(pki.dir());
    let daemon = Daemon::spawn(&path);
    let addr = daemon.ready().await;
    let metrics = daemon.metrics_addr().await;
    daemon.wait_signal_handlers().await;
    let mut open = Session::open(addr, "served").await;
    let devices = Scrape::take(metrics).await.get("mqtls_devices");

    // Another program holds the port the new device is to get.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    let blocked = pki.client("blocked");
    let with_blocked = config
        .clone()
        .device(DeviceEntry::new(&blocked).client_id(None).listen(taken));
    write(&path, &with_blocked);
    daemon.signal("HUP");
    let line = daemon.wait_line(&["configuration NOT reloaded"]).await;
    assert!(
        line.contains(&format!("cannot listen on {taken}")),
        "the address is named: {line}"
    );
    assert_eq!(
        daemon.count_lines(&["configuration reloaded"]),
        0,
        "{}",
        daemon.stderr()
    );

    let s = Scrape::take(metrics).await;
    assert_eq!(s.get("mqtls_config_reloads_total{result=\"failure\"}"), 1.0);
    assert_eq!(s.get("mqtls_config_reloads_total{result=\"success\"}"), 0.0);
    assert_eq!(
        s.get("mqtls_devices"),
        devices,
        "the device count is that of the old configuration"
    );
    assert_eq!(
        s.value("mqtls_device_cert_expiry_timestamp_seconds{device=\"blocked\"}"),
        None
    );

    open.roundtrip("still here").await;
    Session::open(addr, "served")
        .await
        .roundtrip("served by the old configuration")
        .await;
    // The device of the refused configuration is not served, on the shared listener either.
    let mut refused = raw::device(addr).await;
    refused
        .write_all(&raw::connect(Version::V311, "blocked", 0))
        .await
        .unwrap();
    assert_eq!(raw::expect_connack(&mut refused, Version::V311, GUARD).await.code, 2);
    assert_eq!(echo.serials(), vec![served.serial.clone(), served.serial.clone()]);
    drop(holder);
}

#[tokio::test]
async fn a_reload_opens_and_closes_dedicated_listeners() {
    let pki = Pki::new();
    let echo = TlsEcho::start(&pki, EchoMode::Echo).await;
    let base = pki.client("base");
    let meter = pki.client("meter");
    let config = echo_config(&pki, &echo, NO_WATCH).device(DeviceEntry::new(&base));
    let path = config.write(pki.dir());
    let daemon = Daemon::spawn(&path);
    daemon.ready().await;
    daemon.wait_signal_handlers().await;

    let port = common::mosquitto::free_port();
    let dedicated: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let with_meter = config
        .clone()
        .device(DeviceEntry::new(&meter).client_id(None).listen(dedicated));
    write(&path, &with_meter);
    daemon.signal("HUP");
    daemon.wait_line(&["configuration reloaded", "added=meter"]).await;
    let mut s = Session::open(dedicated, "").await;
    s.roundtrip("on its own port").await;

    write(&path, &config);
    daemon.signal("HUP");
    daemon.wait_line(&["configuration reloaded", "removed=meter"]).await;
    daemon.wait_line(&["listener removed", &dedicated.to_string()]).await;
    // The accept loop ends just after the log line; then the port is closed.
    let closed = common::wait_until_async(GUARD, || async { TcpStream::connect(dedicated).await.is_err() }).await;
    assert!(closed, "the removed listener still accepts");
    s.roundtrip("its open connection goes on").await;
}

#[tokio::test]
async fn a_reload_resizes_the_connection_limit() {
    let pki = Pki::new();
    let echo = TlsEcho::start(&pki, EchoMode::Echo).await;
    let device = pki.client("limited");
    let mut config = echo_config(&pki, &echo, NO_WATCH).device(DeviceEntry::new(&device));
    config.max_connections = 2;
    let path = config.write(pki.dir());
    let daemon = Daemon::spawn(&path);
    let addr = daemon.ready().await;
    daemon.wait_signal_handlers().await;
    let _first = Session::open(addr, "limited").await;

    config.max_connections = 1;
    write(&path, &config);
    daemon.signal("HUP");
    daemon.wait_line(&["configuration reloaded"]).await;
    let mut busy = raw::device(addr).await;
    busy.write_all(&raw::connect(Version::V311, "limited", 0))
        .await
        .unwrap();
    assert_eq!(raw::expect_connack(&mut busy, Version::V311, GUARD).await.code, 3);

    config.max_connections = 3;
    write(&path, &config);
    daemon.signal("HUP");
    daemon.wait_nth_line(&["configuration reloaded"], 2).await;
    Session::open(addr, "limited").await.roundtrip("room again").await;
}

#[tokio::test]
async fn an_open_connection_does_not_keep_the_old_configuration_alive() {
    let pki = Pki::new();
    let echo = TlsEcho::start(&pki, EchoMode::Echo).await;
    let config = ProxyConfig::new(&pki, echo.addr()).device(DeviceEntry::new(&pki.client("long-lived")));
    let proxy = common::proxy::RunningProxy::start(&config, pki.dir()).await;
    let old = std::sync::Arc::downgrade(&proxy.handle.generation());
    let mut open = Session::open(proxy.addr(), "long-lived").await;

    let reread = mqtls::load(&proxy.config_path).unwrap();
    proxy.handle.replace(&reread.config, reread.generation).await.unwrap();
    open.roundtrip("months later").await;
    assert!(
        old.upgrade().is_none(),
        "the open connection still holds the replaced generation (all its identities)"
    );
}

/// With `[retire]`, a connection opened under a certificate that a reload replaced is closed at a quiet
/// moment once its grace has passed, cleanly on both sides; the device's next connection presents the new
/// certificate. Without `[retire]` (the test above) it would run on under the old one.
#[tokio::test]
async fn a_connection_under_a_replaced_certificate_is_retired_and_comes_back_under_the_new_one() {
    let pki = Pki::new();
    let echo = TlsEcho::start(&pki, EchoMode::Echo).await;
    let old = pki.client("retiree");
    let retire = "\n[retire]\nrenewed = true\ngrace = \"1s\"\nquiet = \"200ms\"\n";
    let config = echo_config(&pki, &echo, &format!("{NO_WATCH}{retire}")).device(DeviceEntry::new(&old));
    let daemon = Daemon::spawn(&config.write(pki.dir()));
    let addr = daemon.ready().await;
    let mut open = Session::open(addr, "retiree").await;
    open.roundtrip("before").await;

    let new = pki.client("retiree");
    daemon.wait_signal_handlers().await;
    daemon.signal("HUP");
    daemon.wait_line(&["configuration reloaded", "renewed=retiree"]).await;
    open.roundtrip("still open during the grace").await;

    // Retired: a clean end of stream (a FIN, not a reset), no bytes lost.
    let mut rest = Vec::new();
    timeout(GUARD, open.0.read_to_end(&mut rest))
        .await
        .expect("the connection was not retired")
        .expect("a clean close");
    assert!(rest.is_empty());
    let line = daemon
        .wait_line(&["connection closed", "certificate was replaced"])
        .await;
    assert!(line.contains("retiree"), "{line}");
    let mut back = Session::open(addr, "retiree").await;
    back.roundtrip("under the new certificate").await;
    assert_eq!(echo.serials(), vec![old.serial.clone(), new.serial.clone()]);
    let s = Scrape::take(daemon.metrics_addr().await).await;
    assert_eq!(s.get("mqtls_connections_retired_total{reason=\"renewed\"}"), 1.0);
}
