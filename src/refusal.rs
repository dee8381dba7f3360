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
//! sensible can be said (no CONNECT, or one that cannot be parsed) the connection is just closed.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    pub const ALL: [Reason; 6] = [
        Reason::UnknownDevice,
        Reason::BrokerUnreachable,
        Reason::BadConnect,
        Reason::ConnectTimeout,
        Reason::Busy,
        Reason::SourceLimit,
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

    /// The table: label, log text, answer (3.1.x return code / 5.0 reason code). 3.1.x has no "busy",
    /// so a busy gateway says "server unavailable" there.
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
}

impl Refusal<'_> {
    /// Its reason.
    pub fn reason(&self) -> Reason {
        match self {
            Refusal::UnknownDevice { .. } => Reason::UnknownDevice,
            Refusal::BrokerUnreachable { .. } => Reason::BrokerUnreachable,
            Refusal::BadConnect { .. } => Reason::BadConnect,
            Refusal::ConnectTimeout { .. } => Reason::ConnectTimeout,
            Refusal::Busy { .. } => Reason::Busy,
            Refusal::SourceLimit { .. } => Reason::SourceLimit,
        }
    }

    /// Counts it and writes its one log line, with the same label.
    pub fn record(&self, metrics: &Metrics) {
        let reason = self.reason();
        metrics.refused(reason);
        let (label, text) = (reason.label(), reason.text());
        match self {
            Refusal::UnknownDevice { client_id, listener } => {
                warn!(reason = label, client_id = ?client_id, listener = %listener, "{text}")
            }
            Refusal::BrokerUnreachable { failure, error } => {
                warn!(reason = label, failure = failure.label(), error = %error, "{text}")
            }
            Refusal::BadConnect { error } => warn!(reason = label, error = %error, "{text}"),
            Refusal::ConnectTimeout { received, limit } => {
                warn!(reason = label, received, limit = ?limit, "{text}")
            }
            Refusal::Busy { client_id, limit } => warn!(reason = label, client_id = ?client_id, limit, "{text}"),
            Refusal::SourceLimit { limit } => warn!(reason = label, limit, "{text}"),
        }
    }
}

/// Counts and logs `refusal`, then answers the device: a CONNACK in `version` where the reason has one
/// and the CONNECT was read, and a gentle close in every case.
pub async fn refuse<D>(metrics: &Metrics, device: D, version: Option<ProtocolVersion>, refusal: Refusal<'_>)
where
    D: AsyncRead + AsyncWrite + Unpin,
{
    refusal.record(metrics);
    let code = version.and_then(|v| Some((v, refusal.reason().connack_code(v)?)));
    if let Some((version, code)) = code {
        answer(device, mqtt::connack(version, code).as_bytes()).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

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
                "source_limit"
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
        refuse(&metrics, ours, Some(ProtocolVersion::V5), refusal).await;
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
        refuse(&metrics, ours, Some(ProtocolVersion::V311), refusal).await;
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
}
