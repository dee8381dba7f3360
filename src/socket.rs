//! Socket options applied to both sides of every proxied connection.
//!
//! MQTT packets are small and latency-sensitive, so Nagle's algorithm is off. TCP keep-alive finds peers
//! that vanished without a FIN (a sensor unplugged, a broker behind a dead NAT) when MQTT's own keep-alive
//! is 0 or the broker side goes quiet.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Idle time before the first TCP keep-alive probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Time between probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// Unanswered probes before the kernel gives up.
pub const KEEPALIVE_RETRIES: u32 = 4;

/// Sets TCP_NODELAY and TCP keep-alive. Failures are logged, never fatal: the connection still works.
pub fn tune(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    if let Err(e) = SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot set TCP keep-alive");
    }
}
