//! Socket options applied to both sides of every proxied connection, and the listening sockets.
//!
//! MQTT packets are small and latency-sensitive, so Nagle's algorithm is off. TCP keep-alive finds peers
//! that vanished without a FIN (a sensor unplugged, a broker behind a dead NAT) when MQTT's own keep-alive
//! is 0 or the broker side goes quiet. Listeners queue as many connections as may be served at once: when
//! a whole fleet reconnects together, a short accept queue makes the kernel drop SYNs, which devices resend
//! only a second later (then 3 s, 7 s).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

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

/// Binds a listener whose accept queue holds `backlog` connections (the kernel caps it at
/// `net.core.somaxconn`).
pub fn listen(addr: SocketAddr, backlog: usize) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As std and tokio do: a restarted mqtls can bind again while old connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(u32::try_from(backlog).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A number from a /proc file, e.g. `net.core.somaxconn`.
    fn proc_number(path: &str, field: impl Fn(&str) -> Option<&str>) -> Option<usize> {
        let text = std::fs::read_to_string(path).ok()?;
        text.lines().find_map(|l| field(l)?.trim().parse().ok())
    }

    #[tokio::test]
    async fn the_accept_queue_holds_more_than_tokios_default_of_1024() {
        let somaxconn = proc_number("/proc/sys/net/core/somaxconn", |l| Some(l)).unwrap_or(0);
        let open_files = crate::metrics::process::open_files_limit().unwrap_or(0) as usize;
        // Where the kernel or the open-files limit allows no more, there is nothing to tell apart.
        let n = 1100.min(somaxconn).min(open_files.saturating_sub(100));
        let listener = listen("127.0.0.1:0".parse().unwrap(), 4096).unwrap();
        let addr = listener.local_addr().unwrap();
        // Nothing accepts: a connection completes only if the queue has room for it, and the SYNs of one
        // that does not fit are dropped again at every resend, until the deadline.
        let connects: Vec<_> = (0..n)
            .map(|_| tokio::spawn(tokio::time::timeout(Duration::from_secs(20), TcpStream::connect(addr))))
            .collect();
        let mut queued = Vec::new();
        for c in connects {
            if let Ok(Ok(stream)) = c.await.unwrap() {
                queued.push(stream);
            }
        }
        assert_eq!(queued.len(), n, "connections queued before any accept");
    }
}
