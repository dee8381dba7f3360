//! Tests of the test harness itself (no mqtls involved): the shipped
//! Mosquitto recipe works as documented, and the TLS echo server behaves.

use std::time::Duration;

use crate::common;
use crate::common::mqtt_client::{
    device_v4, device_v5, is_puback_v4, mtls_client_v4, spawn_eventloop_v4, unique_client_id, wait_connack_v4,
    wait_connack_v5,
};
use crate::common::tls_echo::{expected_echo_reply, Ending};
use crate::common::{observer, EchoMode, Mosquitto, Pki, TlsEcho};
use rumqttc::{ConnectReturnCode, ConnectionError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

async fn tls_connect(
    pki: &Pki,
    client: Option<&common::ClientCert>,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(pki.rustls_client_config(client));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

#[test]
fn shipped_recipe_keeps_security_directives() {
    let pki = Pki::new();
    let server = pki.server("x", &["localhost"]);
    let conf = common::mosquitto::rewrite_conf(
        &common::mosquitto::deploy_conf(),
        12345,
        pki.ca_pem_path(),
        &server,
        &pki.dir().join("acl"),
        &pki.dir().join("log"),
    );
    let directives: Vec<&str> = conf
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for d in [
        "per_listener_settings false",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        "tls_version tlsv1.2",
        "listener 12345 127.0.0.1",
        "persistence false",
    ] {
        assert!(directives.contains(&d), "missing {d:?} in:\n{conf}");
    }
    assert!(
        !directives.iter().any(|d| d.contains("/etc/mosquitto")),
        "system path left in:\n{conf}"
    );
    let acl = common::mosquitto::deploy_acl();
    assert!(acl.contains("pattern readwrite sensors/%u/#"));
    assert!(acl.contains("user observer"));
}

#[test]
fn pki_files_and_serials() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new();
    let c = pki.client("dev-a");
    assert_eq!(c.cert, pki.dir().join("devices/dev-a/cert.pem"));
    assert_eq!(c.key, pki.dir().join("devices/dev-a/key.pem"));
    let mode = std::fs::metadata(&c.key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let certs = common::pki::load_certs(&c.cert);
    assert_eq!(certs.len(), 1, "cert.pem must hold the leaf only");
    assert_eq!(common::pki::raw_serial(&certs[0]), c.serial);
    let (_, parsed) = x509_parser::parse_x509_certificate(&certs[0]).unwrap();
    let cn = parsed.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), "dev-a");
    assert_ne!(pki.client("dev-b").serial, c.serial);
    assert!(pki.ca_pem_path().is_file());
}

#[tokio::test]
async fn mosquitto_starts_with_shipped_recipe() {
    let pki = Pki::new();
    let mut broker = Mosquitto::start(&pki).await;
    assert!(broker.is_running());
    assert_eq!(broker.addr().port(), broker.port());
    assert!(broker.log().contains("running"), "{}", broker.diagnostics());
    assert_eq!(broker.connections_from_log(), 0, "readiness probe must not be counted");
    assert_eq!(broker.failed_accepts_from_log(), 0);
    broker.stop();
    assert!(!broker.is_running());
}

#[tokio::test]
async fn observer_sees_device_publish_under_its_cn() {
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki).await;
    let mut obs = observer(&pki, &broker, "sensors/#").await;

    let dev = pki.client("dev-a");
    let (client, mut el) = mtls_client_v4(&pki, &broker, &dev, &unique_client_id("dev-a"));
    let ack = wait_connack_v4(&mut el)
        .await
        .unwrap_or_else(|e| panic!("dev-a connect: {e:?}\n{}", broker.diagnostics()));
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let mut events = spawn_eventloop_v4(el);
    client
        .publish("sensors/dev-a/x", QoS::AtLeastOnce, false, b"21.5".to_vec())
        .await
        .unwrap();
    events.wait_for(is_puback_v4, WAIT).await.unwrap();

    let msg = obs.next_message(WAIT).await.expect("observer got nothing");
    assert_eq!(msg, ("sensors/dev-a/x".to_string(), b"21.5".to_vec()));
    // use_identity_as_username: the broker logs the CN as the username.
    broker
        .wait_for_log("u'dev-a'", 1, WAIT)
        .await
        .expect("CN used as username");
    // Observer + dev-a.
    assert_eq!(broker.connections_from_log(), 2);
    assert_eq!(broker.connected_usernames(), vec!["observer", "dev-a"]);
}

#[tokio::test]
async fn acl_drops_publish_outside_own_subtree() {
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki).await;
    let mut obs = observer(&pki, &broker, "sensors/#").await;

    let dev = pki.client("dev-a");
    let (client, mut el) = mtls_client_v4(&pki, &broker, &dev, &unique_client_id("dev-a"));
    wait_connack_v4(&mut el).await.expect("dev-a connect");
    let mut events = spawn_eventloop_v4(el);
    client
        .publish("sensors/dev-b/x", QoS::AtLeastOnce, false, b"forged".to_vec())
        .await
        .unwrap();
    // MQTT 3.1.1: the broker still PUBACKs a denied QoS 1 publish.
    events.wait_for(is_puback_v4, WAIT).await.unwrap();
    broker.wait_for_log("Denied PUBLISH from", 1, WAIT).await.unwrap();
    // Barrier: messages from one client are delivered in order, so once the
    // canary arrives the forged message can no longer show up before it.
    client
        .publish("sensors/dev-a/canary", QoS::AtLeastOnce, false, b"ok".to_vec())
        .await
        .unwrap();
    let got = obs.until_topic("sensors/dev-a/canary", WAIT).await;
    assert_eq!(got, vec![("sensors/dev-a/canary".to_string(), b"ok".to_vec())]);
}

#[tokio::test]
async fn client_cert_from_untrusted_ca_is_refused() {
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki).await;
    let rogue_ca = Pki::other_ca();
    let rogue = rogue_ca.client("dev-a");
    let (_client, mut el) = mtls_client_v4(&pki, &broker, &rogue, &unique_client_id("rogue"));
    let err = wait_connack_v4(&mut el)
        .await
        .expect_err("broker accepted a certificate from an untrusted CA");
    // TLS 1.3: the client's handshake completes; the broker's alert arrives
    // while rumqttc reads the CONNACK.
    assert_eq!(
        common::rustls_error(&err),
        Some(rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA)),
        "{err:?}"
    );
    // The broker's refusal proves the connection reached it. (Mosquitto logs "New connection from" only
    // when the handshake did not fail within the accept itself, which depends on timing.)
    broker.wait_for_log("certificate verify failed", 1, WAIT).await.unwrap();
    assert!(broker.connected_usernames().is_empty());
}

#[tokio::test]
async fn client_without_cert_is_refused() {
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki).await;
    let mut opts = rumqttc::MqttOptions::new(unique_client_id("anon"), "127.0.0.1", broker.port());
    opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
        pki.rustls_client_config(None),
    )));
    let (_client, mut el) = rumqttc::AsyncClient::new(opts, 8);
    let err = wait_connack_v4(&mut el)
        .await
        .expect_err("broker accepted a client without certificate");
    assert_eq!(
        common::rustls_error(&err),
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired
        )),
        "{err:?}"
    );
    assert!(broker.connected_usernames().is_empty());
}

#[tokio::test]
async fn broker_accepts_tls12_and_tls13() {
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki).await;
    let dev = pki.client("dev-a");
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let cfg = pki.rustls_client_config_versions(Some(&dev), &[version]);
        let mut opts = rumqttc::MqttOptions::new(unique_client_id("dev-a"), "127.0.0.1", broker.port());
        opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
            cfg,
        )));
        let (_client, mut el) = rumqttc::AsyncClient::new(opts, 8);
        let ack = wait_connack_v4(&mut el)
            .await
            .unwrap_or_else(|e| panic!("{version:?}: {e:?}\n{}", broker.diagnostics()));
        assert_eq!(ack.code, ConnectReturnCode::Success);
    }
    assert_eq!(broker.connected_usernames(), vec!["dev-a", "dev-a"]);
}

#[tokio::test]
async fn broker_with_untrusted_server_cert_is_rejected_by_client() {
    let pki = Pki::new();
    let rogue_ca = Pki::other_ca();
    let rogue_server = rogue_ca.server("mosquitto", &["localhost", "127.0.0.1"]);
    let broker = Mosquitto::start_with(&pki, &rogue_server).await;
    let dev = pki.client("dev-a");
    let (_client, mut el) = mtls_client_v4(&pki, &broker, &dev, &unique_client_id("dev-a"));
    let err = wait_connack_v4(&mut el)
        .await
        .expect_err("client accepted a broker certificate from an untrusted CA");
    assert!(matches!(err, ConnectionError::Tls(_)), "{err:?}");
    assert_eq!(
        common::rustls_error(&err),
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer
        )),
        "{err:?}"
    );
}

#[tokio::test]
async fn tls_echo_digests_one_mib_and_records_serial() {
    let pki = Pki::new();
    let echo = TlsEcho::start(&pki, EchoMode::EchoUntilEof).await;
    let dev = pki.client("dev-a");
    let payload = common::pki::random_bytes(1 << 20);

    let mut tls = tls_connect(&pki, Some(&dev), echo.addr()).await.unwrap();
    tls.write_all(&payload).await.unwrap();
    tls.shutdown().await.unwrap(); // close_notify + FIN
    let mut reply = Vec::new();
    tls.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply.len(), 40);
    assert_eq!(reply, expected_echo_reply(&payload));
    assert_eq!(&reply[32..], &(1u64 << 20).to_be_bytes());

    let done = echo.wait_finished(1, WAIT).await.unwrap();
    assert_eq!(done[0].ending, Ending::CloseNotify);
    assert_eq!(done[0].serial, dev.serial);
    assert_eq!(echo.serials(), vec![dev.serial.clone()]);
    assert_eq!(echo.received()[0].len(), payload.len());
}

#[tokio::test]
async fn tls_echo_send_then_read_sees_bytes_after_server_half_close() {
    let pki = Pki::new();
    let echo = TlsEcho::start(
        &pki,
        EchoMode::SendThenRead {
            send: b"from-server".to_vec(),
        },
    )
    .await;
    let dev = pki.client("dev-b");
    let mut tls = tls_connect(&pki, Some(&dev), echo.addr()).await.unwrap();
    let mut got = Vec::new();
    tls.read_to_end(&mut got).await.unwrap(); // ends at the server's close_notify
    assert_eq!(got, b"from-server");
    tls.write_all(b"after-half-close").await.unwrap();
    tls.shutdown().await.unwrap();

    let done = echo.wait_finished(1, WAIT).await.unwrap();
    assert_eq!(done[0].received, b"after-half-close");
    assert_eq!(done[0].ending, Ending::CloseNotify);
    assert_eq!(done[0].write_error, None);
    assert_eq!(done[0].serial, dev.serial);
}

#[tokio::test]
async fn tls_echo_refuses_client_without_cert() {
    let pki = Pki::new();
    let echo = TlsEcho::start(&pki, EchoMode::EchoUntilEof).await;
    // With TLS 1.3 the client's handshake can complete before the server
    // rejects it, so the failure may surface on the first read instead.
    let outcome = async {
        let mut tls = tls_connect(&pki, None, echo.addr()).await?;
        tls.write_all(b"hello").await?;
        tls.shutdown().await?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    }
    .await;
    assert!(outcome.is_err(), "got a reply without a client cert: {outcome:?}");
    let failures = echo.wait_handshake_failures(1, WAIT).await.unwrap();
    assert!(failures[0].contains("no certificates"), "{failures:?}");
    assert!(echo.serials().is_empty());
    assert!(echo.finished().is_empty());
}

/// A one-shot plain-TCP "broker" that reads the CONNECT and answers `reply`.
async fn canned_connack(reply: &'static [u8]) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf).await.unwrap();
        s.write_all(reply).await.unwrap();
        // Keep the socket open until the client goes away.
        let _ = s.read(&mut buf).await;
    });
    addr
}

#[tokio::test]
async fn device_helpers_report_connack_refusals() {
    // MQTT 3.1.1 CONNACK, return code 5 (not authorized).
    let addr = canned_connack(&[0x20, 0x02, 0x00, 0x05]).await;
    let (_c, mut el) = device_v4("dev-a", addr, Duration::from_secs(30));
    match wait_connack_v4(&mut el).await {
        Err(ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, ConnectReturnCode::NotAuthorized)
        }
        other => panic!("{other:?}"),
    }
    // MQTT 5 CONNACK, reason 0x87 (not authorized), no properties.
    let addr = canned_connack(&[0x20, 0x03, 0x00, 0x87, 0x00]).await;
    let (_c, mut el) = device_v5("dev-a", addr, Duration::from_secs(30));
    match wait_connack_v5(&mut el).await {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::v5::mqttbytes::v5::ConnectReturnCode::NotAuthorized)
        }
        other => panic!("{other:?}"),
    }
    // Accepted.
    let addr = canned_connack(&[0x20, 0x02, 0x00, 0x00]).await;
    let (_c, mut el) = device_v4("dev-a", addr, Duration::ZERO);
    assert_eq!(wait_connack_v4(&mut el).await.unwrap().code, ConnectReturnCode::Success);
}
