//! Why a connection is refused, and everything that follows from it, in one place.
//!
//! A refusal is one thing to an operator: a reason label that is the same in the log line and in
//! `mqtls_connections_refused_total{reason}`, a sentence that says what happened, and the answer the
//! device gets. [`Reason`] holds that table; [`Refusal`] is one refusal with what the log line says about
//! it; [`refuse`] counts it, logs it and answers the device, so that no path can do one without the
//! others.
//!
//! Legacy devices handle a CONNACK far better than a TCP reset (they back off instead of hammering), so a
//! refusal is answered in the device's own protocol version wherever its CONNECT was read. Where nothing
//! sensible can be said (no CONNECT, or one that cannot be parsed) the connection is closed cleanly: what
//! the device already sent is read and dropped first, so that the close is a FIN, not a reset.
//!
//! Every refusal is counted; its log line is written within the proxy's [`log_budget`], which bounds
//! what a flood can write and sums up the rest.

pub(crate) mod log_budget;

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::timeout;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::mqtt::{self, ProtocolVersion};
use crate::upstream::Failure;

/// How long a refused device gets to take its CONNACK before the socket is closed.
const LINGER: Duration = Duration::from_secs(2);
/// Bytes a refused device may still send (and that are discarded) while it reads its CONNACK.
const DRAIN_LIMIT: usize = 64 * 1024;

/// Why a connection was refused before a session with the broker started: the `reason` label of
/// `mqtls_connections_refused_total` and of the refusal's log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// No device entry matches.
    UnknownDevice,
    /// The broker could not be reached as that device, or did not accept the session.
    BrokerUnreachable,
    /// The first packet was not a valid CONNECT, or too large.
    BadConnect,
    /// No complete CONNECT within `listen.connect_timeout`.
    ConnectTimeout,
    /// Over `listen.max_connections`.
    Busy,
    /// Over `listen.max_pending_per_source` for one address.
    SourceLimit,
    /// The client id belongs to a device whose other rules (source, listener) do not hold.
    ClientIdSpoofed,
    /// An MQTT CONNECT of a protocol level mqtls does not speak.
    UnsupportedProtocol,
    /// A TLS ClientHello on the plain MQTT port: a device set up for MQTTS.
    TlsOnPlainPort,
    /// Over `listen.max_connections_per_source` for one address.
    SourceConnections,
    /// Over `listen.max_connects_per_source_per_second` for one address.
    SourceRate,
    /// The broker answered the device's CONNECT with a refusal (passed on unchanged).
    BrokerRefused,
    /// The broker closed the connection before its CONNACK.
    BrokerClosed,
    /// The device's entry asks for its CONNECT to be rewritten, and that cannot be done (e.g. its template
    /// gives a client id that is not valid, or one that belongs to another device).
    RewriteFailed,
}

/// What the device is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// A CONNACK with this return code (3.1, 3.1.1) or reason code (5.0), then a gentle close.
    Connack { v3: u8, v5: u8 },
    /// Nothing: the connection is closed.
    Close,
}

impl Reason {
    /// Every reason, in declaration order (`reason as usize` indexes it).
    pub const ALL: [Reason; 14] = [
        Reason::UnknownDevice,
        Reason::BrokerUnreachable,
        Reason::BadConnect,
        Reason::ConnectTimeout,
        Reason::Busy,
        Reason::SourceLimit,
        Reason::ClientIdSpoofed,
        Reason::UnsupportedProtocol,
        Reason::TlsOnPlainPort,
        Reason::SourceConnections,
        Reason::SourceRate,
        Reason::BrokerRefused,
        Reason::BrokerClosed,
        Reason::RewriteFailed,
    ];

    /// The label value, in metrics and logs alike. Dashboards and alerts rely on these: keep them.
    pub fn label(self) -> &'static str {
        self.row().0
    }

    /// What the log line says happened.
    fn text(self) -> &'static str {
        self.row().1
    }

    fn answer(self) -> Answer {
        self.row().2
    }

    /// The table: label, log text, answer (3.1.x return code / 5.0 reason code). 3.1.x has no "busy" and
    /// no "quota exceeded", so a gateway over a limit says "server unavailable" there.
    fn row(self) -> (&'static str, &'static str, Answer) {
        use Answer::{Close, Connack};
        match self {
            Reason::UnknownDevice => (
                "unknown_device",
                "refused: no device matches",
                Connack { v3: 0x02, v5: 0x85 },
            ),
            Reason::BrokerUnreachable => (
                "broker_unreachable",
                "refused: broker unreachable",
                Connack { v3: 0x03, v5: 0x88 },
            ),
            Reason::BadConnect => ("bad_connect", "closed: first packet is not a valid CONNECT", Close),
            Reason::ConnectTimeout => ("connect_timeout", "closed: no complete CONNECT in time", Close),
            Reason::Busy => (
                "busy",
                "refused: connection limit reached",
                Connack { v3: 0x03, v5: 0x89 },
            ),
            Reason::SourceLimit => (
                "source_limit",
                "closed: too many unidentified connections from this address",
                Close,
            ),
            // 5.0 "not authorized": the client id is well formed and known, but this connection may not
            // use it. 3.1.1 has "not authorized" too (0x05), but a device told 0x05 looks at its
            // password; "identifier rejected" makes it (and its operator) look at its client id.
            Reason::ClientIdSpoofed => (
                "client_id_spoofed",
                "refused: the client id belongs to another device, whose source or listener rule this connection does not meet",
                Connack { v3: 0x02, v5: 0x87 },
            ),
            Reason::UnsupportedProtocol => (
                "unsupported_protocol",
                "refused: unsupported MQTT protocol level",
                Connack { v3: 0x01, v5: 0x84 },
            ),
            Reason::TlsOnPlainPort => (
                "tls_on_plain_port",
                "closed: the device sent a TLS ClientHello to the plain MQTT port; configure it for plain MQTT \
                 (no TLS) towards mqtls, which adds the TLS towards the broker",
                Close,
            ),
            Reason::SourceConnections => (
                "source_connections",
                "refused: too many connections from this address (listen.max_connections_per_source)",
                Connack { v3: 0x03, v5: 0x97 },
            ),
            Reason::SourceRate => (
                "source_rate",
                "refused: this address connects too often (listen.max_connects_per_source_per_second)",
                Connack { v3: 0x03, v5: 0x97 },
            ),
            // The device has the broker's own CONNACK already.
            Reason::BrokerRefused => (
                "broker_refused",
                "refused by the broker: its CONNACK was passed on to the device",
                Close,
            ),
            Reason::BrokerClosed => (
                "broker_closed",
                "refused: the broker closed the connection before its CONNACK (AWS IoT Core does so when a policy \
                 denies the client id or the connection)",
                Connack { v3: 0x03, v5: 0x88 },
            ),
            // The client id the broker would see is what cannot be made: "identifier rejected" / "client
            // identifier not valid" point the device's operator at it.
            Reason::RewriteFailed => (
                "rewrite_failed",
                "refused: the device's CONNECT cannot be rewritten as its entry asks (connect.*)",
                Connack { v3: 0x02, v5: 0x85 },
            ),
        }
    }

    /// The CONNACK code this reason is answered with in `version`; `None`: the connection is just closed.
    pub fn connack_code(self, version: ProtocolVersion) -> Option<u8> {
        match (self.answer(), version) {
            (Answer::Close, _) => None,
            (Answer::Connack { v3, .. }, ProtocolVersion::V31 | ProtocolVersion::V311) => Some(v3),
            (Answer::Connack { v5, .. }, ProtocolVersion::V5) => Some(v5),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// One refusal, with what its log line says beyond the reason. The peer address and, once known, the
/// device come from the connection's span.
pub enum Refusal<'a> {
    /// No device entry matches this client id on this listener from this address.
    UnknownDevice {
        /// The client id the device sent.
        client_id: &'a str,
        /// The listener it arrived on.
        listener: SocketAddr,
    },
    /// The client id belongs to `owner`, whose other rules this connection does not meet.
    ClientIdSpoofed {
        /// The client id the connection sent.
        client_id: &'a str,
        /// The device it belongs to.
        owner: &'a str,
        /// The listener it arrived on.
        listener: SocketAddr,
    },
    /// The broker was not reached, or did not take the session.
    BrokerUnreachable {
        /// The most telling failure, for the `failure` field (the label of
        /// `mqtls_upstream_connect_failures_total`).
        failure: Failure,
        /// Every attempt, or what went wrong once the broker was reached.
        error: &'a (dyn fmt::Display + Sync),
    },
    /// The first packet is not an acceptable CONNECT.
    BadConnect {
        /// What is wrong with it.
        error: &'a (dyn fmt::Display + Sync),
    },
    /// A CONNECT of a protocol level mqtls does not speak.
    UnsupportedProtocol {
        /// What was sent.
        error: &'a (dyn fmt::Display + Sync),
    },
    /// A TLS ClientHello on the plain port.
    TlsOnPlainPort,
    /// The CONNECT did not arrive whole in time.
    ConnectTimeout {
        /// Bytes received by then.
        received: usize,
        /// `listen.connect_timeout`.
        limit: Duration,
    },
    /// Over `listen.max_connections`.
    Busy {
        /// The client id, when the CONNECT could be read.
        client_id: Option<&'a str>,
        /// `listen.max_connections`.
        limit: usize,
    },
    /// Over `listen.max_pending_per_source`.
    SourceLimit {
        /// `listen.max_pending_per_source`.
        limit: usize,
    },
    /// Over `listen.max_connections_per_source`.
    SourceConnections {
        /// The client id, when the CONNECT could be read.
        client_id: Option<&'a str>,
        /// `listen.max_connections_per_source`.
        limit: usize,
    },
    /// Over `listen.max_connects_per_source_per_second`.
    SourceRate {
        /// The client id, when the CONNECT could be read.
        client_id: Option<&'a str>,
        /// `listen.max_connects_per_source_per_second`.
        limit: u32,
    },
    /// The broker refused the device with CONNACK `code`.
    BrokerRefused {
        /// The return code (3.1.x) or reason code (5.0).
        code: u8,
        /// The device's MQTT version, which says what the code means.
        version: ProtocolVersion,
    },
    /// The broker closed the connection before its CONNACK.
    BrokerClosed {
        /// How it ended.
        error: &'a (dyn fmt::Display + Sync),
    },
    /// The device's CONNECT cannot be rewritten as its entry asks.
    RewriteFailed {
        /// The client id the device sent.
        client_id: &'a str,
        /// Why.
        error: &'a (dyn fmt::Display + Sync),
    },
}

impl Refusal<'_> {
    /// Its reason.
    pub fn reason(&self) -> Reason {
        match self {
            Refusal::UnknownDevice { .. } => Reason::UnknownDevice,
            Refusal::ClientIdSpoofed { .. } => Reason::ClientIdSpoofed,
            Refusal::BrokerUnreachable { .. } => Reason::BrokerUnreachable,
            Refusal::BadConnect { .. } => Reason::BadConnect,
            Refusal::UnsupportedProtocol { .. } => Reason::UnsupportedProtocol,
            Refusal::TlsOnPlainPort => Reason::TlsOnPlainPort,
            Refusal::ConnectTimeout { .. } => Reason::ConnectTimeout,
            Refusal::Busy { .. } => Reason::Busy,
            Refusal::SourceLimit { .. } => Reason::SourceLimit,
            Refusal::SourceConnections { .. } => Reason::SourceConnections,
            Refusal::SourceRate { .. } => Reason::SourceRate,
            Refusal::BrokerRefused { .. } => Reason::BrokerRefused,
            Refusal::BrokerClosed { .. } => Reason::BrokerClosed,
            Refusal::RewriteFailed { .. } => Reason::RewriteFailed,
        }
    }

    /// Counts it and, within the proxy's log budget, writes its one log line, with the same label. `peer`
    /// is the device's address, whose network the budget is kept by.
    pub fn record(&self, metrics: &Metrics, peer: IpAddr) {
        let reason = self.reason();
        metrics.refused(reason);
        let (log, ended) = metrics.refusal_logs().admit(reason, peer, Instant::now());
        write_summaries(ended);
        if log {
            self.log();
        }
    }

    fn log(&self) {
        let reason = self.reason();
        let (label, text) = (reason.label(), reason.text());
        match self {
            Refusal::UnknownDevice { client_id, listener } => {
                warn!(reason = label, client_id = ?client_id, listener = %listener, "{text}")
            }
            Refusal::ClientIdSpoofed {
                client_id,
                owner,
                listener,
            } => warn!(reason = label, client_id = ?client_id, owner = %owner, listener = %listener, "{text}"),
            Refusal::BrokerUnreachable { failure, error } => {
                warn!(reason = label, failure = failure.label(), error = %error, "{text}")
            }
            Refusal::BadConnect { error } | Refusal::UnsupportedProtocol { error } => {
                warn!(reason = label, error = %error, "{text}")
            }
            Refusal::TlsOnPlainPort => warn!(reason = label, "{text}"),
            Refusal::ConnectTimeout { received, limit } => {
                warn!(reason = label, received, limit = ?limit, "{text}")
            }
            Refusal::Busy { client_id, limit } | Refusal::SourceConnections { client_id, limit } => {
                warn!(reason = label, client_id = ?client_id, limit, "{text}")
            }
            Refusal::SourceRate { client_id, limit } => warn!(reason = label, client_id = ?client_id, limit, "{text}"),
            Refusal::SourceLimit { limit } => warn!(reason = label, limit, "{text}"),
            Refusal::BrokerRefused { code, version } => {
                let meaning = mqtt::connack_code_name(*version, *code);
                warn!(reason = label, code = format_args!("{code:#04x}"), meaning, "{text}")
            }
            Refusal::BrokerClosed { error } => warn!(reason = label, error = %error, "{text}"),
            Refusal::RewriteFailed { client_id, error } => {
                warn!(reason = label, client_id = ?client_id, error = %error, "{text}")
            }
        }
    }
}

/// Writes what the log budget held back in a window that has ended, one line per reason.
pub(crate) fn write_summaries(ended: Vec<log_budget::Summary>) {
    for s in ended {
        warn!(
            reason = s.reason.label(),
            held_back = s.held_back,
            "{} more refusals reason={} from {} in the last {} s (each one counted in mqtls_connections_refused_total)",
            s.held_back,
            s.reason.label(),
            s.sources(),
            log_budget::WINDOW.as_secs()
        );
    }
}

/// Counts and logs `refusal`, then answers the device: a CONNACK in `version` where the reason has one
/// and the CONNECT was read, and a clean close in every case. `peer` is the device's address.
pub async fn refuse<D>(
    metrics: &Metrics,
    device: D,
    peer: IpAddr,
    version: Option<ProtocolVersion>,
    refusal: Refusal<'_>,
) where
    D: AsyncRead + AsyncWrite + Unpin,
{
    refusal.record(metrics, peer);
    let code = version.and_then(|v| Some((v, refusal.reason().connack_code(v)?)));
    match code {
        Some((version, code)) => answer(device, mqtt::connack(version, code).as_bytes()).await,
        None => close(device).await,
    }
}

/// Sends `connack`, then closes gently: the device's unread bytes are drained first, since closing a
/// socket with unread data sends a reset that can destroy the CONNACK before the device reads it.
async fn answer<D: AsyncRead + AsyncWrite + Unpin>(mut device: D, connack: &[u8]) {
    let answered = async {
        device.write_all(connack).await?;
        device.shutdown().await?;
        let mut sink = [0u8; 1024];
        let mut drained = 0;
        while drained < DRAIN_LIMIT {
            match device.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        io::Result::Ok(())
    };
    if let Ok(Err(e)) = timeout(LINGER, answered).await {
        debug!(error = %e, "device went away while being refused");
    }
}

/// Closes without an answer, and without waiting: what the device has already sent is read and dropped
/// (up to [`DRAIN_LIMIT`]), then the write side is shut, so that the close is a FIN rather than the reset
/// a socket closed with unread bytes sends.
async fn close<D: AsyncRead + AsyncWrite + Unpin>(mut device: D) {
    drain_ready(&mut device);
    let _ = timeout(LINGER, device.shutdown()).await;
}

/// Reads whatever `device` can give at once, without waiting for more.
fn drain_ready<D: AsyncRead + Unpin>(device: &mut D) {
    let mut cx = Context::from_waker(Waker::noop());
    let mut sink = [0u8; 1024];
    let mut drained = 0;
    while drained < DRAIN_LIMIT {
        let mut buf = ReadBuf::new(&mut sink);
        match Pin::new(&mut *device).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) if !buf.filled().is_empty() => drained += buf.filled().len(),
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 10, 21));

    #[test]
    fn labels_are_the_metric_contract() {
        let labels: Vec<_> = Reason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(
            labels,
            [
                "unknown_device",
                "broker_unreachable",
                "bad_connect",
                "connect_timeout",
                "busy",
                "source_limit",
                "client_id_spoofed",
                "unsupported_protocol",
                "tls_on_plain_port",
                "source_connections",
                "source_rate",
                "broker_refused",
                "broker_closed",
                "rewrite_failed",
            ]
        );
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "ALL is in declaration order");
        }
    }

    #[test]
    fn answers_follow_the_mqtt_versions() {
        use ProtocolVersion::{V31, V311, V5};
        let table: Vec<_> = Reason::ALL
            .iter()
            .map(|r| (r.connack_code(V31), r.connack_code(V311), r.connack_code(V5)))
            .collect();
        assert_eq!(
            table,
            [
                (Some(0x02), Some(0x02), Some(0x85)),
                (Some(0x03), Some(0x03), Some(0x88)),
                (None, None, None),
                (None, None, None),
                (Some(0x03), Some(0x03), Some(0x89)),
                (None, None, None),
                (Some(0x02), Some(0x02), Some(0x87)),
                (Some(0x01), Some(0x01), Some(0x84)),
                (None, None, None),
                (Some(0x03), Some(0x03), Some(0x97)),
                (Some(0x03), Some(0x03), Some(0x97)),
                (None, None, None),
                (Some(0x03), Some(0x03), Some(0x88)),
                (Some(0x02), Some(0x02), Some(0x85)),
            ]
        );
    }

    #[tokio::test]
    async fn a_refusal_is_counted_and_answered_in_the_devices_version() {
        let metrics = Metrics::new(true);
        let (mut device, ours) = duplex(256);
        let listener = "127.0.0.1:1883".parse().unwrap();
        let refusal = Refusal::UnknownDevice {
            client_id: "nobody",
            listener,
        };
        refuse(&metrics, ours, PEER, Some(ProtocolVersion::V5), refusal).await;
        let mut got = Vec::new();
        device.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, [0x20, 0x03, 0x00, 0x85, 0x00]);
        assert!(metrics
            .render()
            .contains("mqtls_connections_refused_total{reason=\"unknown_device\"} 1"));
    }

    #[tokio::test]
    async fn a_refusal_without_an_answer_just_closes() {
        let metrics = Metrics::new(true);
        let (mut device, ours) = duplex(256);
        let refusal = Refusal::BadConnect { error: &"not MQTT" };
        refuse(&metrics, ours, PEER, Some(ProtocolVersion::V311), refusal).await;
        let mut got = Vec::new();
        device.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty(), "nothing is said to a device whose CONNECT was not read");
    }

    #[tokio::test(start_paused = true)]
    async fn a_device_that_never_reads_its_answer_is_let_go_after_the_linger() {
        let metrics = Metrics::new(true);
        // A 1-byte pipe: the CONNACK cannot be written whole until the device reads.
        let (_device, ours) = duplex(1);
        let refused = refuse(
            &metrics,
            ours,
            PEER,
            Some(ProtocolVersion::V311),
            Refusal::Busy {
                client_id: Some("late"),
                limit: 1,
            },
        );
        assert!(
            timeout(LINGER * 2, refused).await.is_ok(),
            "the refusal must not wait for ever"
        );
    }

    #[tokio::test]
    async fn an_unanswered_close_takes_what_the_device_sent_and_ends_with_a_fin() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut device = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        // A TLS ClientHello's worth of bytes, most of them unread by mqtls when it decides to close.
        device.write_all(&[0x16; 1500]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let metrics = Metrics::new(true);
        refuse(&metrics, ours, PEER, None, Refusal::TlsOnPlainPort).await;
        let mut rest = Vec::new();
        let end = device.read_to_end(&mut rest).await;
        assert!(end.is_ok(), "a reset instead of a clean end: {end:?}");
        assert!(rest.is_empty());
    }

    #[test]
    fn a_flood_is_counted_whole_and_logged_within_the_budget() {
        let metrics = Metrics::new(true);
        let lines = crate::test_log::capture(|| {
            for i in 0..10_000u32 {
                let peer = IpAddr::from([10, 0, (i % 4) as u8, 7]);
                Refusal::BadConnect { error: &"not MQTT" }.record(&metrics, peer);
            }
        });
        let logged = lines.iter().filter(|l| l.contains("reason=\"bad_connect\"")).count();
        assert_eq!(logged, 4 * log_budget::PER_NETWORK as usize, "{lines:#?}");
        assert!(metrics
            .render()
            .contains("mqtls_connections_refused_total{reason=\"bad_connect\"} 10000"));
    }
}
