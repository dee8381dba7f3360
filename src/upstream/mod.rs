//! Reaching the broker as a device: the seam between one connection's logic and the network.
//!
//! A connection needs three things from the broker side, and [`Broker`] is exactly those: open a
//! session presenting a device's identity (or say, by [`Failure`], why every address failed), the time
//! the broker gets to answer, and whether an error read from an open session means the broker refused it.
//! [`Connector`] is the real one (DNS, TCP, TLS, and the pacing of connects); the connection logic is
//! generic over the trait, so that its unit tests drive it over in-memory streams. The connection never
//! inspects TLS types: telling a TLS refusal from a closed socket is the seam's job.

mod connector;
mod health;
mod pacing;
mod resolve;
mod turn;

use std::future::Future;
use std::io;
use std::time::Duration;

pub use connector::Connector;
pub(crate) use turn::BrokerStream;

use crate::duplex::Duplex;
use crate::tls::Identity;

/// What kind of failure stopped an attempt to reach the broker; the `reason` label of
/// `mqtls_upstream_connect_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// No turn to connect came within the handshake timeout: `upstream.max_connecting` connections were
    /// being opened all that time.
    QueueTimeout,
    /// The name did not resolve.
    Resolve,
    /// TCP connect refused, unreachable or timed out.
    Connect,
    /// The TLS handshake (or the broker's first answer) did not come in time.
    HandshakeTimeout,
    /// The TLS handshake failed, or the broker refused the TLS session after it (untrusted chain, wrong
    /// name, client certificate rejected...).
    Tls,
    /// The broker answered the CONNECT "server unavailable", "server busy", "use another server" or
    /// "server moved", and the next address was tried.
    Unavailable,
}

impl Failure {
    /// Every failure, in declaration order (`failure as usize` indexes it).
    pub const ALL: [Failure; 6] = [
        Failure::QueueTimeout,
        Failure::Resolve,
        Failure::Connect,
        Failure::HandshakeTimeout,
        Failure::Tls,
        Failure::Unavailable,
    ];

    /// A short, stable label.
    pub fn label(self) -> &'static str {
        match self {
            Failure::QueueTimeout => "queue_timeout",
            Failure::Resolve => "resolve",
            Failure::Connect => "connect",
            Failure::HandshakeTimeout => "handshake_timeout",
            Failure::Tls => "tls",
            Failure::Unavailable => "unavailable",
        }
    }
}

/// Why the broker could not be reached: every attempt, in order.
#[derive(Debug, thiserror::Error)]
#[error("{}", .attempts.iter().map(|(_, text)| text.as_str()).collect::<Vec<_>>().join("; "))]
pub struct ConnectError {
    /// Each attempt's failure and its description (address and cause).
    pub attempts: Vec<(Failure, String)>,
}

impl ConnectError {
    /// The most telling failure: a broker that answered but could not be trusted says more than one
    /// that did not answer, which says more than a name that did not resolve.
    pub fn failure(&self) -> Failure {
        self.attempts.iter().map(|(f, _)| *f).max().unwrap_or(Failure::Connect)
    }
}

/// An open session with the broker, and the attempts that failed before it (failover).
#[derive(Debug)]
pub(crate) struct Connected<S> {
    /// The session.
    pub stream: S,
    /// Each earlier address's failure, in order.
    pub failed: Vec<Failure>,
    /// Which of the configured addresses serves it (an index into `upstream.address`).
    pub address: usize,
}

/// What a connection needs from the broker side.
pub(crate) trait Broker: Send + Sync + 'static {
    /// An open session: bytes to and from the broker.
    type Stream: Duplex + Send + 'static;

    /// Opens a session presenting `identity`, trying the broker's addresses in order from the one at
    /// index `from` (0: all of them).
    fn connect(
        &self,
        identity: &Identity,
        from: usize,
    ) -> impl Future<Output = Result<Connected<Self::Stream>, ConnectError>> + Send;

    /// How long the broker gets to take the device's CONNECT and to answer it.
    fn answer_timeout(&self) -> Duration;

    /// Whether `error`, read from an open session before the broker's first answer, means the broker
    /// refused the session (TLS 1.3 reports a rejected client certificate only then) rather than that the
    /// connection closed or failed.
    fn refused_session(&self, error: &io::Error) -> bool;

    /// How many addresses the broker has (`upstream.address`).
    fn addresses(&self) -> usize;

    /// The broker at `address` said it cannot take sessions now (`why`): pass it over for a while.
    fn unavailable(&self, address: usize, why: &str);
}
