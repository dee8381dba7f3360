//! systemd integration: readiness, reload and stop notifications, the watchdog, socket activation, and
//! whether stderr goes to the journal.
//!
//! Each piece keys off a variable that systemd sets (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `LISTEN_FDS`,
//! `JOURNAL_STREAM`) and does nothing without it, so the same binary runs unchanged from a shell, a container
//! or another supervisor. The notification protocol (sd_notify(3)) is one datagram of `KEY=value` lines to a
//! Unix socket, simple enough for std; adopting passed descriptors is left to the `listenfd` crate, which
//! keeps the `unsafe` of turning a raw descriptor into a listener out of this crate.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{self, UnixDatagram};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

/// Systemd passes socket-activated descriptors from this number on (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;
/// Time systemd should allow beyond the shutdown grace for the last connections to close and the process to
/// exit.
const STOP_MARGIN: Duration = Duration::from_secs(5);

/// Sends state changes to the service manager over `NOTIFY_SOCKET`. Cheap to clone; every method is a
/// no-op when mqtls was not started by systemd with `Type=notify`.
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    target: Option<Arc<Target>>,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: net::SocketAddr,
}

/// Why `NOTIFY_SOCKET` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// Neither a path (`/run/...`) nor an abstract name (`@name`); e.g. a `vsock:` address.
    #[error("NOTIFY_SOCKET={0:?}: only a socket path or an abstract name (@name) is supported")]
    Unsupported(String),
    /// The address or the sending socket could not be made.
    #[error("NOTIFY_SOCKET={0:?}: {1}")]
    Socket(String, io::Error),
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`. Without it the notifier is disabled; with a value it cannot use, it warns once
    /// and is disabled (systemd will then report a start-up timeout, which the warning explains).
    pub fn from_env() -> Notifier {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Notifier::default(),
            Some(v) if v.is_empty() => Notifier::default(),
            Some(v) => Notifier::new(&v).unwrap_or_else(|e| {
                warn!("{e}; systemd will not hear from mqtls");
                Notifier::default()
            }),
        }
    }

    /// A notifier for the socket named as in `NOTIFY_SOCKET`: an absolute path, or `@` and an abstract name.
    pub fn new(notify_socket: &OsStr) -> Result<Notifier, NotifyError> {
        let shown = notify_socket.to_string_lossy().into_owned();
        let bytes = notify_socket.as_bytes();
        let addr = match bytes.first() {
            Some(b'/') => net::SocketAddr::from_pathname(Path::new(notify_socket)),
            Some(b'@') => net::SocketAddr::from_abstract_name(&bytes[1..]),
            _ => return Err(NotifyError::Unsupported(shown)),
        }
        .map_err(|e| NotifyError::Socket(shown.clone(), e))?;
        let socket = UnixDatagram::unbound().map_err(|e| NotifyError::Socket(shown, e))?;
        Ok(Notifier {
            target: Some(Arc::new(Target { socket, addr })),
        })
    }

    /// Whether notifications go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// `READY=1`: every listener is bound and serving (again, after a reload). `status` is shown by
    /// `systemctl status`.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// `RELOADING=1` with the `MONOTONIC_USEC` timestamp that lets systemd match it to the reload it asked
    /// for; send [`Notifier::ready`] when the reload is done, whatever its outcome.
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    /// `STOPPING=1`, and asks systemd to allow `grace` (plus a margin) for the stop, so that a grace longer
    /// than the unit's `TimeoutStopSec=` is not cut short.
    pub fn stopping(&self, grace: Duration) {
        let extend = (grace + STOP_MARGIN).as_micros();
        self.send(&format!(
            "STOPPING=1\nEXTEND_TIMEOUT_USEC={extend}\nSTATUS=stopping: no new connections; open ones may finish"
        ));
    }

    /// `WATCHDOG=1`: still alive.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    fn send(&self, state: &str) {
        let Some(t) = &self.target else { return };
        match t.socket.send_to_addr(state.as_bytes(), &t.addr) {
            Ok(_) => debug!(state = %state.replace('\n', " "), "notified systemd"),
            Err(e) => warn!(error = %e, state = %state.replace('\n', " "), "cannot notify systemd"),
        }
    }
}

/// A status is one `KEY=value` line: line breaks would start keys of their own.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// `CLOCK_MONOTONIC` in microseconds, the clock of `MONOTONIC_USEC`. std's `Instant` reads the same clock but
/// never reveals its value, and differences between `Instant`s have no fixed origin.
pub fn monotonic_usec() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(t.tv_nsec).unwrap_or(0);
    secs * 1_000_000 + nanos / 1_000
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3) advises, when systemd
/// set one for this process (`WATCHDOG_PID`, if present, must be ours). `None`: no watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(me) {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// Pings the watchdog every `interval`, for ever. Spawn it on the runtime that serves connections: a
/// ping then proves that the runtime still schedules tasks, and a wedged runtime gets mqtls restarted.
pub async fn feed_watchdog(notifier: Notifier, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        notifier.watchdog();
    }
}

/// Why the sockets systemd passed cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// A passed descriptor is not a TCP socket (or not IPv4/IPv6).
    #[error("socket activation: descriptor {fd} from systemd (LISTEN_FDS) is not a TCP socket: {source}")]
    NotTcp {
        /// The descriptor number.
        fd: i32,
        /// What was wrong with it.
        source: io::Error,
    },
    /// A passed socket is not listening: systemd's `Accept=yes` passes one connection per process, which
    /// mqtls does not support.
    #[error("socket activation: descriptor {fd} from systemd is not a listening socket (use Accept=no)")]
    NotListening {
        /// The descriptor number.
        fd: i32,
    },
    /// The address a passed socket is bound to could not be read.
    #[error("socket activation: cannot read the address of descriptor {fd} from systemd: {source}")]
    Address {
        /// The descriptor number.
        fd: i32,
        /// Why.
        source: io::Error,
    },
    /// A passed socket listens on an address the configuration does not list.
    #[error(
        "{}: socket activation: systemd passed a socket listening on {addr} (descriptor {fd}), but no \
         `listen.address` (nor any device's `listen`) is {addr}; make ListenStream= in the .socket unit and \
         the configuration name the same addresses",
        config.display()
    )]
    Unmatched {
        /// The configuration file.
        config: PathBuf,
        /// Where the passed socket listens.
        addr: SocketAddr,
        /// The descriptor number.
        fd: i32,
    },
}

/// A listening socket passed by systemd, with the descriptor number it arrived as (for messages).
#[derive(Debug)]
pub struct Passed {
    /// `3` for the first, and so on.
    pub fd: i32,
    /// The socket, now owned by mqtls.
    pub listener: TcpListener,
}

/// Takes the listening sockets passed by systemd socket activation (`LISTEN_FDS`, for this process by
/// `LISTEN_PID`), in order; empty when mqtls was not socket-activated. The variables are then removed, so
/// that the descriptors are taken once. Call it before any thread starts (it changes the environment).
pub fn take_passed_listeners() -> Result<Vec<Passed>, ActivationError> {
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    if !for_us {
        return Ok(Vec::new());
    }
    let mut fds = listenfd::ListenFd::from_env();
    let mut passed = Vec::with_capacity(fds.len());
    for i in 0..fds.len() {
        let fd = LISTEN_FDS_START + i as i32;
        match fds.take_tcp_listener(i) {
            Ok(Some(listener)) => passed.push(Passed { fd, listener }),
            Ok(None) => {}
            Err(source) => return Err(ActivationError::NotTcp { fd, source }),
        }
    }
    Ok(passed)
}

/// Pairs each passed socket with the configured address it stands for (the same address, written the
/// same way). A passed socket that matches none is an error: serving it would route devices by rules
/// the configuration never gave, and ignoring it would leave its connections queued unanswered.
pub fn match_passed(
    passed: Vec<Passed>,
    configured: &[SocketAddr],
    config: &Path,
) -> Result<Vec<(SocketAddr, TcpListener)>, ActivationError> {
    let mut matched = Vec::with_capacity(passed.len());
    for p in passed {
        if !socket2::SockRef::from(&p.listener).is_listener().unwrap_or(false) {
            return Err(ActivationError::NotListening { fd: p.fd });
        }
        let addr = p
            .listener
            .local_addr()
            .map_err(|source| ActivationError::Address { fd: p.fd, source })?;
        if !configured.contains(&addr) {
            return Err(ActivationError::Unmatched {
                config: config.to_path_buf(),
                addr,
                fd: p.fd,
            });
        }
        matched.push((addr, p.listener));
    }
    Ok(matched)
}

/// Whether stderr is the journal stream systemd set up for this service. `JOURNAL_STREAM` names that
/// stream's device and inode; comparing them with stderr's own keeps a process whose stderr was redirected
/// (while the variable was inherited) from writing journal-style lines into a file.
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let Ok(fd) = io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    File::from(fd)
        .metadata()
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// Whether `path` is one of the credentials systemd passed to this service (`LoadCredential=`), that is, lies
/// in `$CREDENTIALS_DIRECTORY`. systemd makes those readable by the service's user alone, but where the file
/// system supports ACLs it grants that with an ACL, whose mask shows in the group bits (mode 0440): the mode
/// then overstates who can read the file. Both paths are resolved first, so `..` cannot lead out.
pub fn is_credential(path: &Path) -> bool {
    let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty()) else {
        return false;
    };
    match (std::fs::canonicalize(dir), std::fs::canonicalize(path)) {
        (Ok(dir), Ok(path)) => path.starts_with(dir),
        _ => false,
    }
}

/// The sd-daemon(3) priority prefix for a log level (`<3>` error ... `<7>` debug), which journald reads
/// from the start of each line of a service's output.
pub fn journal_priority(level: tracing::Level) -> &'static str {
    match level {
        tracing::Level::ERROR => "<3>",
        tracing::Level::WARN => "<4>",
        tracing::Level::INFO => "<6>",
        _ => "<7>",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_is_half_of_watchdog_usec() {
        assert_eq!(
            watchdog_interval_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
    }

    #[test]
    fn watchdog_is_off_without_usec_for_another_pid_or_for_nonsense() {
        assert_eq!(watchdog_interval_from(None, None, 7), None);
        assert_eq!(watchdog_interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("soon"), None, 7), None);
    }

    #[test]
    fn notify_socket_forms() {
        assert!(Notifier::new(OsStr::new("/run/systemd/notify")).unwrap().is_enabled());
        assert!(Notifier::new(OsStr::new("@/org/freedesktop/systemd1/notify/1"))
            .unwrap()
            .is_enabled());
        assert!(matches!(
            Notifier::new(OsStr::new("vsock:2:1234")),
            Err(NotifyError::Unsupported(_))
        ));
        assert!(!Notifier::default().is_enabled());
    }

    #[test]
    fn notifications_reach_a_path_socket_as_one_datagram() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.as_os_str()).unwrap();
        n.ready("serving\n2 devices");
        let mut buf = [0u8; 512];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving 2 devices");
    }

    #[test]
    fn monotonic_usec_advances_with_the_monotonic_clock() {
        let a = monotonic_usec();
        std::thread::sleep(Duration::from_millis(2));
        let b = monotonic_usec();
        assert!(a > 0 && b > a, "{a} then {b}");
    }

    #[test]
    fn a_passed_socket_is_paired_with_its_configured_address() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let passed = vec![Passed { fd: 3, listener: l }];
        let m = match_passed(passed, &[other, addr], Path::new("/etc/mqtls/mqtls.toml")).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].0, addr);
    }

    #[test]
    fn a_passed_socket_on_an_unlisted_address_names_the_address_and_the_key() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let passed = vec![Passed { fd: 3, listener: l }];
        let configured: SocketAddr = "0.0.0.0:1883".parse().unwrap();
        let e = match_passed(passed, &[configured], Path::new("/etc/mqtls/mqtls.toml")).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("/etc/mqtls/mqtls.toml: socket activation"), "{text}");
        assert!(text.contains(&format!("listening on {addr}")), "{text}");
        assert!(text.contains("`listen.address`"), "{text}");
    }

    #[test]
    fn a_passed_socket_that_is_not_listening_is_refused() {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        let passed = vec![Passed {
            fd: 3,
            listener: TcpListener::from(s),
        }];
        let e = match_passed(passed, &[], Path::new("/etc/mqtls/mqtls.toml")).unwrap_err();
        assert!(matches!(e, ActivationError::NotListening { fd: 3 }), "{e}");
    }

    #[test]
    fn priorities_follow_sd_daemon() {
        assert_eq!(journal_priority(tracing::Level::ERROR), "<3>");
        assert_eq!(journal_priority(tracing::Level::WARN), "<4>");
        assert_eq!(journal_priority(tracing::Level::INFO), "<6>");
        assert_eq!(journal_priority(tracing::Level::DEBUG), "<7>");
        assert_eq!(journal_priority(tracing::Level::TRACE), "<7>");
    }
}
