//! MQTT clients for tests: an operator "observer" connected directly to the
//! broker over mutual TLS, plain-TCP "devices" that talk to a proxy, and
//! helpers to drive rumqttc event loops with deadlines.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnAck, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{timeout_at, Instant};

use super::mosquitto::Mosquitto;
use super::pki::{ClientCert, Pki};

/// Outer bound on any CONNECT/CONNACK or SUBSCRIBE/SUBACK exchange. rumqttc's
/// own connection timeout (5 s by default) normally fires first.
pub const MQTT_DEADLINE: Duration = Duration::from_secs(15);

/// Common Name of the operator monitoring identity (see deploy/mosquitto/acl).
pub const OBSERVER_CN: &str = "observer";

static CLIENT_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A client id unique within this test process: `<prefix>-<pid>-<n>`.
pub fn unique_client_id(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        CLIENT_SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A received message: (topic, payload).
pub type Message = (String, Vec<u8>);

// ---------------------------------------------------------------------------
// Direct mutual-TLS clients (bypassing mqtls)
// ---------------------------------------------------------------------------

/// An MQTT 3.1.1 client that connects straight to `broker` over mutual TLS,
/// trusting `trust`'s CA and presenting `cert` (which may come from another,
/// untrusted CA). Keep-alive 30 s, clean session. Nothing is sent until the
/// event loop is polled.
pub fn mtls_client_v4(trust: &Pki, broker: &Mosquitto, cert: &ClientCert, client_id: &str) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", broker.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        trust.rustls_client_config(Some(cert)),
    )));
    AsyncClient::new(opts, 64)
}

/// A connected operator subscription, straight to the broker over mTLS with
/// the CN `observer` certificate. The event loop runs in a background task
/// (aborted on drop) that forwards every PUBLISH.
pub struct Observer {
    /// Held, not used: the event loop ends once every client handle is dropped.
    _client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Message>,
    task: JoinHandle<()>,
}

/// Connect as CN `observer` (certificate under `<tmp>/operators/observer/`,
/// so it is not mistaken for a device), subscribe to `topic_filter` with
/// QoS 1 and return once the SUBACK has granted it.
pub async fn observer(pki: &Pki, broker: &Mosquitto, topic_filter: &str) -> Observer {
    observer_as(pki, broker, &pki.operator(OBSERVER_CN), topic_filter).await
}

/// Like [`observer`], presenting `cert` (its CN must be `observer` for the shipped ACL) and trusting
/// `trust`'s CA for the broker's certificate.
pub async fn observer_as(trust: &Pki, broker: &Mosquitto, cert: &ClientCert, topic_filter: &str) -> Observer {
    let (client, mut el) = mtls_client_v4(trust, broker, cert, &unique_client_id("observer"));
    if let Err(e) = wait_connack_v4(&mut el).await {
        panic!("observer: connect to broker failed: {e:?}\n{}", broker.diagnostics());
    }
    client
        .subscribe(topic_filter, QoS::AtLeastOnce)
        .await
        .expect("observer: queue SUBSCRIBE");

    let deadline = Instant::now() + MQTT_DEADLINE;
    let mut early = Vec::new();
    loop {
        match timeout_at(deadline, el.poll()).await {
            Err(_) => panic!("observer: no SUBACK within {MQTT_DEADLINE:?}"),
            Ok(Err(e)) => panic!(
                "observer: connection error before SUBACK: {e:?}\n{}",
                broker.diagnostics()
            ),
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                assert!(
                    ack.return_codes
                        .iter()
                        .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
                    "observer: subscription to {topic_filter:?} refused: {ack:?}"
                );
                break;
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                early.push((p.topic.clone(), p.payload.to_vec()));
            }
            Ok(Ok(_)) => {}
        }
    }

    let (tx, rx) = mpsc::unbounded_channel();
    for m in early {
        let _ = tx.send(m);
    }
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((p.topic.clone(), p.payload.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                // Broker gone or connection broken: stop rather than spin on
                // reconnect attempts; the test sees no further messages.
                Err(_) => return,
            }
        }
    });
    Observer {
        _client: client,
        rx,
        task,
    }
}

impl Observer {
    /// The next message, or `None` if none arrives within `timeout`.
    pub async fn next_message(&mut self, timeout: Duration) -> Option<Message> {
        tokio::time::timeout(timeout, self.rx.recv()).await.ok().flatten()
    }

    /// Messages until (and including) the first one on `topic`; panics if it
    /// does not arrive within `timeout`. Handy as a barrier: publish a
    /// "canary" after the thing that must not be delivered, then check the
    /// messages before it.
    pub async fn until_topic(&mut self, topic: &str, timeout: Duration) -> Vec<Message> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            match timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) => {
                    let done = m.0 == topic;
                    out.push(m);
                    if done {
                        return out;
                    }
                }
                Ok(None) => panic!("observer connection ended before {topic:?}; got {out:?}"),
                Err(_) => panic!("no message on {topic:?} within {timeout:?}; got {out:?}"),
            }
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// Plain-TCP devices (what a legacy device sends to mqtls)
// ---------------------------------------------------------------------------

/// An MQTT 3.1.1 device speaking plain TCP to `addr` (e.g. the proxy's
/// listener). `keep_alive` must be zero or at least 1 s (rumqttc asserts).
/// Clean session; no username/password. Nothing is sent until polled.
pub fn device_v4(client_id: &str, addr: SocketAddr, keep_alive: Duration) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(keep_alive);
    AsyncClient::new(opts, 64)
}

/// An MQTT 5 device speaking plain TCP to `addr`. rumqttc v5 asserts
/// `keep_alive >= 5 s` (zero is NOT accepted, unlike v4).
pub fn device_v5(
    client_id: &str,
    addr: SocketAddr,
    keep_alive: Duration,
) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    let mut opts = rumqttc::v5::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(keep_alive);
    rumqttc::v5::AsyncClient::new(opts, 64)
}

/// Poll until the CONNACK arrives. `Ok` only for an accepted connection; a
/// refusal is `Err(ConnectionError::ConnectionRefused(code))`, a dropped or
/// failed connection another `ConnectionError` (`Io`, `Tls`,
/// `NetworkTimeout`, `MqttState(..)`). Panics after [`MQTT_DEADLINE`].
pub async fn wait_connack_v4(el: &mut EventLoop) -> Result<ConnAck, ConnectionError> {
    let deadline = Instant::now() + MQTT_DEADLINE;
    loop {
        match timeout_at(deadline, el.poll()).await {
            Err(_) => panic!("no CONNACK (or error) within {MQTT_DEADLINE:?}"),
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => return Ok(ack),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// MQTT 5 version of [`wait_connack_v4`].
pub async fn wait_connack_v5(
    el: &mut rumqttc::v5::EventLoop,
) -> Result<rumqttc::v5::mqttbytes::v5::ConnAck, rumqttc::v5::ConnectionError> {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    use rumqttc::v5::Event as E5;
    let deadline = Instant::now() + MQTT_DEADLINE;
    loop {
        match timeout_at(deadline, el.poll()).await {
            Err(_) => panic!("no CONNACK (or error) within {MQTT_DEADLINE:?}"),
            Ok(Ok(E5::Incoming(P5::ConnAck(ack)))) => return Ok(ack),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------------
// Background event loops
// ---------------------------------------------------------------------------

/// An event loop polled by a background task (aborted on drop). Every event
/// is forwarded; the first error is forwarded too and ends the task (no
/// automatic reconnect).
pub struct EventLoopTask<Ev, Er> {
    rx: mpsc::UnboundedReceiver<Result<Ev, Er>>,
    task: JoinHandle<()>,
}

/// Poll a v4 event loop in the background.
pub fn spawn_eventloop_v4(el: EventLoop) -> EventLoopTask<Event, ConnectionError> {
    spawn_polling(el, |el| Box::pin(el.poll()))
}

/// Poll a v5 event loop in the background.
pub fn spawn_eventloop_v5(
    el: rumqttc::v5::EventLoop,
) -> EventLoopTask<rumqttc::v5::Event, rumqttc::v5::ConnectionError> {
    spawn_polling(el, |el| Box::pin(el.poll()))
}

type PollFuture<'a, Ev, Er> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Ev, Er>> + Send + 'a>>;

fn spawn_polling<L, Ev, Er>(mut el: L, poll: for<'a> fn(&'a mut L) -> PollFuture<'a, Ev, Er>) -> EventLoopTask<Ev, Er>
where
    L: Send + 'static,
    Ev: Send + 'static,
    Er: Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let r = poll(&mut el).await;
            let stop = r.is_err();
            if tx.send(r).is_err() || stop {
                return;
            }
        }
    });
    EventLoopTask { rx, task }
}

impl<Ev: std::fmt::Debug, Er: std::fmt::Debug> EventLoopTask<Ev, Er> {
    /// The next event or error; `None` on timeout or after the task ended
    /// and everything was drained.
    pub async fn next(&mut self, timeout: Duration) -> Option<Result<Ev, Er>> {
        tokio::time::timeout(timeout, self.rx.recv()).await.ok().flatten()
    }

    /// Skip events until one satisfies `pred`; `Err` describes a connection
    /// error or timeout that came first.
    pub async fn wait_for(&mut self, mut pred: impl FnMut(&Ev) -> bool, timeout: Duration) -> Result<Ev, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return Err(format!("timed out after {timeout:?}")),
                Ok(None) => return Err("event loop task ended".into()),
                Ok(Some(Err(e))) => return Err(format!("connection error: {e:?}")),
                Ok(Some(Ok(ev))) if pred(&ev) => return Ok(ev),
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Skip events until the connection fails; returns that error, or `Err`
    /// with a description on timeout.
    pub async fn wait_error(&mut self, timeout: Duration) -> Result<Er, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return Err(format!("no connection error within {timeout:?}")),
                Ok(None) => return Err("event loop task ended without error".into()),
                Ok(Some(Err(e))) => return Ok(e),
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

impl<Ev, Er> Drop for EventLoopTask<Ev, Er> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Predicate for [`EventLoopTask::wait_for`]: an incoming v4 PUBACK.
pub fn is_puback_v4(ev: &Event) -> bool {
    matches!(ev, Event::Incoming(Packet::PubAck(_)))
}

/// Predicate: an incoming v4 SUBACK.
pub fn is_suback_v4(ev: &Event) -> bool {
    matches!(ev, Event::Incoming(Packet::SubAck(_)))
}

/// Predicate: an incoming v5 PUBACK.
pub fn is_puback_v5(ev: &rumqttc::v5::Event) -> bool {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    matches!(ev, rumqttc::v5::Event::Incoming(P5::PubAck(_)))
}

/// Predicate: an incoming v5 SUBACK.
pub fn is_suback_v5(ev: &rumqttc::v5::Event) -> bool {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    matches!(ev, rumqttc::v5::Event::Incoming(P5::SubAck(_)))
}
