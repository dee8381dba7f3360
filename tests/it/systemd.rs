//! mqtls under systemd, with the test playing the service manager: it binds the `NOTIFY_SOCKET` datagram
//! socket and reads what the binary reports (READY=1, RELOADING=1, STOPPING=1, WATCHDOG=1), hands it a
//! listening socket the way socket activation does (fd 3, `LISTEN_FDS`, `LISTEN_PID`), and gives it a
//! journal stream. The shipped unit is held to `systemd-analyze security` (2.0 or better) and `verify`.
//! JSON logs are checked here too, as what a log shipper reading the journal would parse.

use std::ffi::OsString;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common;
use crate::common::daemon::{scrub_env, Daemon, BIN, GUARD};
use crate::common::mqtt_client::{device_v4, is_puback_v4, spawn_eventloop_v4, wait_connack_v4};
use crate::common::proxy::{DeviceEntry, ProxyConfig};
use crate::common::{observer, wait_until, Mosquitto, Pki};
use mqtls::systemd::monotonic_usec;
use rumqttc::QoS;
use tokio::time::{timeout_at, Instant};

// ---------------------------------------------------------------------------------------------------------
// The service manager's side of NOTIFY_SOCKET

/// A datagram socket bound by the test, named in the child's `NOTIFY_SOCKET`. Every datagram read is kept.
struct NotifySocket {
    socket: tokio::net::UnixDatagram,
    /// The value for `NOTIFY_SOCKET`.
    env: OsString,
    seen: Vec<String>,
    _dir: Option<tempfile::TempDir>,
}

impl NotifySocket {
    /// A socket file in a temporary directory (what systemd uses: /run/systemd/notify).
    fn path() -> NotifySocket {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let socket = tokio::net::UnixDatagram::bind(&path).expect("bind notify socket");
        NotifySocket {
            socket,
            env: path.into_os_string(),
            seen: Vec::new(),
            _dir: Some(dir),
        }
    }

    /// An abstract socket (`@name` in `NOTIFY_SOCKET`), unique to this test.
    fn abstract_name() -> NotifySocket {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "mqtls-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        let std_socket = std::os::unix::net::UnixDatagram::bind_addr(&addr).expect("bind abstract socket");
        std_socket.set_nonblocking(true).unwrap();
        NotifySocket {
            socket: tokio::net::UnixDatagram::from_std(std_socket).expect("tokio socket"),
            env: format!("@{name}").into(),
            seen: Vec::new(),
            _dir: None,
        }
    }

    /// The next datagram that holds the line `line` (e.g. `READY=1`); panics after [`GUARD`].
    async fn wait_for(&mut self, line: &str) -> String {
        let deadline = Instant::now() + GUARD;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match timeout_at(deadline, self.socket.recv(&mut buf)).await {
                Ok(r) => r.expect("recv on the notify socket"),
                Err(_) => panic!("no {line:?} within {GUARD:?}; received: {:?}", self.seen),
            };
            let text = String::from_utf8(buf[..n].to_vec()).expect("notifications are text");
            self.seen.push(text.clone());
            if text.lines().any(|l| l == line) {
                return text;
            }
        }
    }

    /// Reads whatever is queued without waiting (once the child has exited: everything it sent).
    fn drain(&mut self) -> &[String] {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = self.socket.try_recv(&mut buf) {
            self.seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        &self.seen
    }
}

/// The value of `KEY=` in a notification.
fn field<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

fn count(messages: &[String], line: &str) -> usize {
    messages.iter().filter(|m| m.lines().any(|l| l == line)).count()
}

/// A configuration that starts and listens; nothing in these tests reaches the broker it names.
fn idle_config(pki: &Pki, grace: &str) -> PathBuf {
    let broker: SocketAddr = "127.0.0.1:1".parse().unwrap();
    ProxyConfig::new(pki, broker)
        .shutdown_grace(grace)
        .device(DeviceEntry::new(&pki.client("idle-1")))
        .write(pki.dir())
}

fn notified(config: &Path, notify: &NotifySocket) -> Command {
    let mut cmd = Daemon::command(config);
    cmd.env("NOTIFY_SOCKET", &notify.env);
    cmd
}

// ---------------------------------------------------------------------------------------------------------
// sd_notify

#[tokio::test]
async fn ready_is_sent_once_the_listener_accepts_and_names_it_in_status() {
    let pki = Pki::new();
    let mut notify = NotifySocket::path();
    let _daemon = Daemon::start(notified(&idle_config(&pki, "10s"), &notify));
    let ready = notify.wait_for("READY=1").await;
    let status = field(&ready, "STATUS").unwrap_or_else(|| panic!("no STATUS in {ready:?}"));
    let addr: SocketAddr = status
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address at the end of STATUS={status:?}"));
    assert!(status.starts_with("serving 1 device(s) on "), "{status:?}");
    // Nothing else has happened since READY=1: connecting now must already work.
    std::net::TcpStream::connect(addr).expect("READY=1 came before the listener accepted");
    assert_eq!(count(&notify.seen, "READY=1"), 1, "{:?}", notify.seen);
}

#[tokio::test]
async fn sighup_is_framed_by_reloading_with_monotonic_usec_then_ready() {
    let pki = Pki::new();
    let mut notify = NotifySocket::path();
    let daemon = Daemon::start(notified(&idle_config(&pki, "10s"), &notify));
    notify.wait_for("READY=1").await;

    let before = monotonic_usec();
    daemon.signal("HUP");
    let reloading = notify.wait_for("RELOADING=1").await;
    let after = monotonic_usec();
    let stamp: u64 = field(&reloading, "MONOTONIC_USEC")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(
        before <= stamp && stamp <= after,
        "MONOTONIC_USEC={stamp} is not CLOCK_MONOTONIC between the signal ({before}) and its receipt ({after})"
    );
    notify.wait_for("READY=1").await;
    let order: Vec<&str> = notify.seen.iter().filter_map(|m| m.lines().next()).collect();
    assert_eq!(order, ["READY=1", "RELOADING=1", "READY=1"], "{:?}", notify.seen);
}

#[tokio::test]
async fn a_reload_on_a_file_change_is_framed_by_reloading_and_ready_too() {
    let pki = Pki::new();
    let mut notify = NotifySocket::path();
    let mut config =
        ProxyConfig::new(&pki, "127.0.0.1:1".parse().unwrap()).device(DeviceEntry::new(&pki.client("watched-1")));
    config.extra.push_str("\n[reload]\nwatch_interval = \"100ms\"\n");
    let path = config.write(pki.dir());
    let _daemon = Daemon::start(notified(&path, &notify));
    notify.wait_for("READY=1").await;
    let edited = std::fs::read_to_string(&path).unwrap() + "\n# edited\n";
    std::fs::write(&path, edited).unwrap();
    notify.wait_for("RELOADING=1").await;
    notify.wait_for("READY=1").await;
}

#[tokio::test]
async fn sigterm_sends_stopping_with_the_grace_then_exits_0_and_no_watchdog_without_watchdog_usec() {
    let pki = Pki::new();
    let mut notify = NotifySocket::path();
    let mut daemon = Daemon::start(notified(&idle_config(&pki, "7s"), &notify));
    notify.wait_for("READY=1").await;
    daemon.wait_signal_handlers().await;
    daemon.signal("TERM");
    let stopping = notify.wait_for("STOPPING=1").await;
    // The grace plus mqtls's margin of 5 s, in microseconds.
    assert_eq!(
        field(&stopping, "EXTEND_TIMEOUT_USEC"),
        Some("12000000"),
        "{stopping:?}"
    );
    let status = daemon.wait_exit(GUARD).await.expect("still running after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status:?}; stderr:\n{}", daemon.stderr());
    let all = notify.drain();
    assert_eq!(count(all, "WATCHDOG=1"), 0, "{all:?}");
}

#[tokio::test]
async fn watchdog_pings_follow_ready_when_watchdog_usec_is_set() {
    let pki = Pki::new();
    let mut notify = NotifySocket::path();
    let mut cmd = notified(&idle_config(&pki, "10s"), &notify);
    cmd.env("WATCHDOG_USEC", "100000");
    let _daemon = Daemon::start(cmd);
    for _ in 0..3 {
        notify.wait_for("WATCHDOG=1").await;
    }
    let first_ready = notify.seen.iter().position(|m| m.starts_with("READY=1"));
    let first_ping = notify.seen.iter().position(|m| m == "WATCHDOG=1");
    assert!(first_ready.is_some() && first_ready < first_ping, "{:?}", notify.seen);
}

#[tokio::test]
async fn no_watchdog_pings_when_watchdog_pid_names_another_process() {
    let pki = Pki::new();
    let mut notify = NotifySocket::path();
    let mut cmd = notified(&idle_config(&pki, "10s"), &notify);
    // Every millisecond, were it for mqtls; the whole run below would see many.
    cmd.env("WATCHDOG_USEC", "2000").env("WATCHDOG_PID", "1");
    let mut daemon = Daemon::start(cmd);
    notify.wait_for("READY=1").await;
    daemon.signal("HUP");
    notify.wait_for("RELOADING=1").await;
    notify.wait_for("READY=1").await;
    daemon.signal("TERM");
    notify.wait_for("STOPPING=1").await;
    let status = daemon.wait_exit(GUARD).await.expect("still running after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status:?}");
    let all = notify.drain();
    assert_eq!(count(all, "WATCHDOG=1"), 0, "{all:?}");
}

#[tokio::test]
async fn an_abstract_notify_socket_is_used_too() {
    let pki = Pki::new();
    let mut notify = NotifySocket::abstract_name();
    assert!(notify.env.to_string_lossy().starts_with('@'));
    let daemon = Daemon::start(notified(&idle_config(&pki, "10s"), &notify));
    notify.wait_for("READY=1").await;
    daemon.signal("HUP");
    notify.wait_for("RELOADING=1").await;
}

// ---------------------------------------------------------------------------------------------------------
// Socket activation

/// Runs between fork and exec, so only async-signal-safe calls: puts `fd` at descriptor 3, where systemd
/// passes the first socket, without close-on-exec.
fn pass_as_fd3(fd: RawFd) -> io::Result<()> {
    // SAFETY: dup2 and fcntl are async-signal-safe and touch only the child's descriptor table.
    let r = unsafe {
        if fd == 3 {
            // dup2 onto itself would keep FD_CLOEXEC.
            libc::fcntl(3, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, 3)
        }
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `mqtls run` handed `listener` as systemd would: fd 3, `LISTEN_FDS=1` and `LISTEN_PID` set to the
/// daemon's pid, which only the child knows; a shell sets it to its own pid (`$$`) and `exec` keeps it.
fn activated(config: &Path, listener: &impl AsRawFd) -> Command {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"export LISTEN_PID=$$; exec "$0" "$@""#)
        .arg(BIN)
        .arg("run")
        .arg("--config")
        .arg(config);
    scrub_env(&mut cmd);
    cmd.env("LISTEN_FDS", "1");
    let fd = listener.as_raw_fd();
    // SAFETY: the closure only calls async-signal-safe functions (see pass_as_fd3).
    unsafe { cmd.pre_exec(move || pass_as_fd3(fd)) };
    cmd
}

/// A test configuration whose shared listener is `addr`.
fn listening_on(config: &ProxyConfig, addr: SocketAddr, dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, config.clone().listen(addr).toml()).expect("write config");
    path
}

#[tokio::test]
async fn a_socket_passed_by_systemd_is_served_instead_of_binding() {
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki).await;
    let mut watch = observer(&pki, &broker, "sensors/#").await;
    // The test keeps its own copy open throughout: had mqtls tried to bind the address itself, that would
    // have failed (address in use) and mqtls would have exited 1.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ProxyConfig::new(&pki, broker.addr()).device(DeviceEntry::new(&pki.client("activated-1")));
    let path = listening_on(&config, addr, pki.dir(), "activated.toml");
    let mut notify = NotifySocket::path();
    let mut cmd = activated(&path, &listener);
    cmd.env("NOTIFY_SOCKET", &notify.env);
    let mut daemon = Daemon::start(cmd);
    notify.wait_for("READY=1").await;
    assert_eq!(daemon.ready().await, addr);
    daemon
        .wait_line(&["serving on the socket passed by systemd", &addr.to_string()])
        .await;

    let (client, mut el) = device_v4("activated-1", addr, Duration::from_secs(30));
    if let Err(e) = wait_connack_v4(&mut el).await {
        panic!("device refused: {e:?}\nmqtls:\n{}", daemon.stderr());
    }
    client
        .publish("sensors/activated-1/temp", QoS::AtLeastOnce, false, "19.0")
        .await
        .unwrap();
    let mut events = spawn_eventloop_v4(el);
    events.wait_for(is_puback_v4, GUARD).await.expect("PUBACK");
    let got = watch.next_message(GUARD).await.expect("observer got nothing");
    assert_eq!(got, ("sensors/activated-1/temp".to_string(), b"19.0".to_vec()));

    client.disconnect().await.unwrap();
    daemon.signal("TERM");
    let status = daemon.wait_exit(GUARD).await.expect("still running after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status:?}; stderr:\n{}", daemon.stderr());
}

#[tokio::test]
async fn a_passed_socket_that_matches_no_configured_address_stops_start_up_naming_both() {
    let pki = Pki::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let config = idle_config(&pki, "10s");
    let mut daemon = Daemon::start(activated(&config, &listener));
    let status = daemon.wait_exit(GUARD).await.expect("mqtls kept running");
    assert_eq!(status.code(), Some(1), "{status:?}; stderr:\n{}", daemon.stderr());
    daemon
        .wait_line(&[
            &format!("{}: socket activation", config.display()),
            &format!("listening on {addr} (descriptor 3)"),
            "`listen.address`",
        ])
        .await;
    assert!(!daemon.stderr().contains("mqtls ready"), "{}", daemon.stderr());
}

#[tokio::test]
async fn a_passed_descriptor_that_is_not_a_tcp_socket_stops_start_up() {
    let pki = Pki::new();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut daemon = Daemon::start(activated(&idle_config(&pki, "10s"), &udp));
    let status = daemon.wait_exit(GUARD).await.expect("mqtls kept running");
    assert_eq!(status.code(), Some(1), "{status:?}; stderr:\n{}", daemon.stderr());
    daemon
        .wait_line(&["socket activation: descriptor 3", "is not a TCP socket"])
        .await;
    assert!(!daemon.stderr().contains("mqtls ready"), "{}", daemon.stderr());
}

#[tokio::test]
async fn passed_sockets_meant_for_another_process_are_left_alone() {
    let pki = Pki::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cmd = Daemon::command(&idle_config(&pki, "10s"));
    cmd.env("LISTEN_FDS", "1").env("LISTEN_PID", "1");
    let fd = listener.as_raw_fd();
    // SAFETY: the closure only calls async-signal-safe functions (see pass_as_fd3).
    unsafe { cmd.pre_exec(move || pass_as_fd3(fd)) };
    let daemon = Daemon::start(cmd);
    let addr = daemon.ready().await;
    assert_ne!(addr, listener.local_addr().unwrap());
    assert!(
        !daemon.stderr().contains("socket passed by systemd"),
        "{}",
        daemon.stderr()
    );
}

// ---------------------------------------------------------------------------------------------------------
// The shipped units

fn unit(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd").join(name)
}

fn systemd_analyze(args: &[&str], files: &[&Path]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .args(files)
        .output()
        .expect("run systemd-analyze (Debian package `systemd`; scripts/install-deps.sh installs it)")
}

#[test]
fn the_service_unit_scores_2_0_or_better_in_systemd_analyze_security() {
    let out = systemd_analyze(&["security", "--offline=true"], &[&unit("mqtls.service")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let overall = stdout
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for mqtls.service:"))
        .map(|(_, rest)| rest.trim())
        .unwrap_or_else(|| {
            panic!(
                "no overall exposure in:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let score: f64 = overall
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no number in {overall:?}"));
    assert!(score <= 2.0, "exposure {score} is above 2.0:\n{stdout}");
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    // verify checks that ExecStart= is executable; the installed path is replaced by the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let service = std::fs::read_to_string(unit("mqtls.service"))
        .unwrap()
        .replace("/usr/local/bin/mqtls", BIN);
    std::fs::write(dir.path().join("mqtls.service"), service).unwrap();
    std::fs::copy(unit("mqtls.socket"), dir.path().join("mqtls.socket")).unwrap();
    let files = [dir.path().join("mqtls.service"), dir.path().join("mqtls.socket")];
    let out = systemd_analyze(&["verify"], &[&files[0], &files[1]]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.lines().any(|l| l.contains("mqtls")),
        "systemd-analyze verify complains:\n{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Logs

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_level_message_and_the_connections_span() {
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki).await;
    let config = ProxyConfig::new(&pki, broker.addr())
        .device(DeviceEntry::new(&pki.client("json-dev")))
        .write(pki.dir());
    let mut cmd = Daemon::command(&config);
    cmd.arg("--log-format").arg("json");
    let daemon = Daemon::start(cmd);
    let ready_line = daemon.wait_line(&["mqtls ready"]).await;
    let ready: serde_json::Value = serde_json::from_str(&ready_line).expect("the ready line is JSON");
    let addr: SocketAddr = ready["listen"].as_str().unwrap().parse().unwrap();

    let (client, mut el) = device_v4("json-dev", addr, Duration::from_secs(30));
    wait_connack_v4(&mut el).await.expect("device connected");
    let opened_line = daemon.wait_line(&["connection opened"]).await;
    client.disconnect().await.unwrap();
    drop(el);

    let opened: serde_json::Value = serde_json::from_str(&opened_line).expect("JSON");
    assert_eq!(opened["level"], "INFO", "{opened}");
    assert_eq!(opened["message"], "connection opened", "{opened}");
    assert!(
        opened["timestamp"].as_str().is_some_and(|t| t.starts_with("20")),
        "{opened}"
    );
    assert_eq!(opened["client_id"], "\"json-dev\"", "{opened}");
    assert_eq!(opened["span"]["device"], "json-dev", "{opened}");
    let peer: SocketAddr = opened["span"]["peer"].as_str().unwrap().parse().expect("peer address");
    assert!(peer.ip().is_loopback(), "{opened}");
    for line in daemon.lines() {
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not one JSON object: {line:?}: {e}"));
        assert!(
            v.is_object() && v["level"].is_string() && v["message"].is_string(),
            "{line}"
        );
    }
}

#[tokio::test]
async fn the_log_format_can_come_from_mqtls_log_format() {
    let pki = Pki::new();
    let mut cmd = Daemon::command(&idle_config(&pki, "10s"));
    cmd.env("MQTLS_LOG_FORMAT", "json");
    let daemon = Daemon::start(cmd);
    let line = daemon.wait_line(&["mqtls ready"]).await;
    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    assert_eq!(v["message"], "mqtls ready");
}

/// Runs `mqtls run` with stderr going to a file and `JOURNAL_STREAM` set to `journal_stream(file)`, until
/// it is ready and stopped; returns what it wrote.
async fn run_with_stderr_file(pki: &Pki, journal_stream: impl Fn(&Path) -> String) -> String {
    let stderr_path = pki.dir().join(format!("stderr-{}.log", std::process::id()));
    let file = std::fs::File::create(&stderr_path).unwrap();
    // Over the open-files limit on purpose: the warning shows a second priority.
    let config = ProxyConfig {
        max_connections: 1_000_000,
        ..ProxyConfig::new(pki, "127.0.0.1:1".parse().unwrap())
    }
    .device(DeviceEntry::new(&pki.client("journal-1")))
    .write(pki.dir());
    let mut cmd = Daemon::command(&config);
    cmd.env("JOURNAL_STREAM", journal_stream(&stderr_path))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file);
    let mut child = cmd.spawn().expect("spawn mqtls run");
    let read = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let ready = wait_until(GUARD, || read().contains("mqtls ready")).await;
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let exited = wait_until(GUARD, || child.try_wait().unwrap().is_some()).await;
    if !exited {
        let _ = child.kill();
    }
    assert!(ready && exited, "ready: {ready}, exited: {exited}; stderr:\n{}", read());
    read()
}

fn has_timestamp(line: &str) -> bool {
    // 2026-12-01T13:15:22.566749Z
    line.split_whitespace().any(|w| {
        let b = w.as_bytes();
        b.len() > 19 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[..4].iter().all(u8::is_ascii_digit)
    })
}

#[tokio::test]
async fn on_the_journal_stream_lines_carry_their_priority_and_no_timestamp() {
    let pki = Pki::new();
    let text = run_with_stderr_file(&pki, |p| {
        let m = std::fs::metadata(p).unwrap();
        format!("{}:{}", m.dev(), m.ino())
    })
    .await;
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in:\n{text}"))
    };
    assert!(line("mqtls ready").starts_with("<6>"), "{text}");
    assert!(line("needs about").starts_with("<4>"), "{text}");
    for l in text.lines() {
        assert!(l.starts_with('<'), "no priority on {l:?}");
        assert!(!has_timestamp(l), "journald stamps lines itself: {l:?}");
    }
}

#[tokio::test]
async fn journal_stream_naming_another_file_is_ignored() {
    let pki = Pki::new();
    let other = pki.dir().join("not-stderr");
    std::fs::write(&other, "").unwrap();
    let text = run_with_stderr_file(&pki, |_| {
        let m = std::fs::metadata(&other).unwrap();
        format!("{}:{}", m.dev(), m.ino())
    })
    .await;
    for l in text.lines() {
        assert!(!l.starts_with('<'), "priority prefix outside the journal: {l:?}");
        assert!(has_timestamp(l), "no timestamp outside the journal: {l:?}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// Credentials

/// Where systemd puts `LoadCredential=` files, with a key of mode 0440 (what an ACL granting the service
/// user read access looks like) and the configuration naming it relatively; and the same key outside.
struct Credentials {
    _pki: Pki,
    dir: PathBuf,
}

impl Credentials {
    fn new(key_path: &str) -> Credentials {
        let pki = Pki::new();
        let cert = pki.client("cred-1");
        let dir = pki.dir().join("credentials");
        std::fs::create_dir(&dir).unwrap();
        for copy in [dir.join("cred-1.key"), pki.dir().join("outside.key")] {
            std::fs::copy(&cert.key, &copy).unwrap();
            std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o440)).unwrap();
        }
        let config = format!(
            "[listen]\naddress = \"127.0.0.1:0\"\n\n[upstream]\naddress = \"broker.example.com:8883\"\nca_file = {:?}\n\n\
             [[device]]\nname = \"cred-1\"\nclient_id = \"cred-1\"\ncert = {:?}\nkey = {key_path:?}\n",
            pki.ca_pem_path(),
            cert.cert
        );
        std::fs::write(dir.join("mqtls.toml"), config).unwrap();
        Credentials { _pki: pki, dir }
    }

    fn check(&self, credentials_directory: Option<&Path>) -> std::process::Output {
        let mut cmd = Command::new(BIN);
        cmd.arg("check").arg("--config").arg(self.dir.join("mqtls.toml"));
        scrub_env(&mut cmd);
        cmd.env_remove("CREDENTIALS_DIRECTORY");
        if let Some(d) = credentials_directory {
            cmd.env("CREDENTIALS_DIRECTORY", d);
        }
        cmd.output().expect("run mqtls check")
    }
}

#[test]
fn a_key_passed_as_a_systemd_credential_is_accepted_despite_its_acl_mode() {
    let creds = Credentials::new("cred-1.key");
    let out = creds.check(Some(&creds.dir));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_same_key_outside_the_credentials_directory_is_refused() {
    let creds = Credentials::new("cred-1.key");
    let out = creds.check(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("readable by group or others (mode 0440)"), "{stderr}");

    let escaping = Credentials::new("../outside.key");
    let out = escaping.check(Some(&escaping.dir));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "`..` led out of the credentials directory:\n{stderr}"
    );
    assert!(
        stderr.contains("outside.key: private key is readable by group"),
        "{stderr}"
    );
}

#[test]
fn the_sysusers_file_creates_the_mqtls_user_and_group() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(unit("mqtls.sysusers.conf"))
        .output()
        .expect("run systemd-sysusers (Debian package `systemd`)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    assert!(passwd.lines().any(|l| l.starts_with("mqtls:")), "{passwd}");
    assert!(group.lines().any(|l| l.starts_with("mqtls:")), "{group}");
}

#[tokio::test]
async fn a_reload_never_closes_a_socket_that_systemd_passed() {
    use tokio::io::AsyncWriteExt;
    let pki = Pki::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ProxyConfig::new(&pki, "127.0.0.1:1".parse().unwrap()).device(DeviceEntry::new(&pki.client("kept")));
    let path = listening_on(&config, addr, pki.dir(), "kept.toml");
    let mut daemon = Daemon::start(activated(&path, &listener));
    assert_eq!(daemon.ready().await, addr);
    daemon.wait_signal_handlers().await;
    // systemd still holds its copy of the socket; so does this test, as systemd would.

    std::fs::write(&path, config.toml()).unwrap(); // the shared listener moves to 127.0.0.1:0
    daemon.signal("HUP");
    daemon.wait_line(&["configuration reloaded"]).await;
    daemon
        .wait_line(&["systemd passed this socket", &addr.to_string()])
        .await;

    // Still accepted and answered (no device listens there any more: identifier rejected), not left
    // unanswered in a backlog that nobody accepts from.
    let mut dev = common::raw::device(addr).await;
    dev.write_all(&common::raw::connect(common::raw::Version::V311, "kept", 0))
        .await
        .unwrap();
    let connack = common::raw::expect_connack(&mut dev, common::raw::Version::V311, GUARD).await;
    assert_eq!(connack.code, 2);
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(GUARD).await.and_then(|s| s.code()), Some(0));
}
