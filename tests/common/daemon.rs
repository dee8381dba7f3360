//! `mqtls run` as a subprocess, the way an operator runs it: stderr collected line by line, signals sent
//! with `kill`, exit status awaited, and the addresses it logs when ready.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// The binary under test (Cargo names it for integration tests; the demo example finds its own).
pub const BIN: &str = match option_env!("CARGO_BIN_EXE_mqtls") {
    Some(path) => path,
    None => "mqtls",
};
/// Upper bound for anything the daemon must do (start, relay, exit). Only a guard against hangs.
pub const GUARD: Duration = Duration::from_secs(20);

/// Variables through which systemd (or a user's shell) would change how mqtls runs; a test sets the
/// ones it is about.
const INHERITED: [&str; 9] = [
    "JOURNAL_STREAM",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "MQTLS_LOG_FORMAT",
    "MQTLS_LOG",
];

/// Removes the [`INHERITED`] variables from `cmd` and sets the log level to info.
pub fn scrub_env(cmd: &mut Command) {
    for v in INHERITED {
        cmd.env_remove(v);
    }
    cmd.env("MQTLS_LOG", "info");
}

/// `mqtls run` in the background, its stderr collected line by line (ANSI colours removed).
pub struct Daemon {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn spawn(config: &Path) -> Daemon {
        Self::spawn_with(config, std::iter::empty::<(&str, &str)>())
    }

    /// Like [`Daemon::spawn`], with extra environment variables.
    pub fn spawn_with<K: AsRef<OsStr>, V: AsRef<OsStr>>(
        config: &Path,
        env: impl IntoIterator<Item = (K, V)>,
    ) -> Daemon {
        let mut cmd = Daemon::command(config);
        cmd.envs(env);
        Daemon::start(cmd)
    }

    /// `mqtls run --config <config>`, logging at info, with none of the [`INHERITED`] variables set.
    pub fn command(config: &Path) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("run").arg("--config").arg(config);
        scrub_env(&mut cmd);
        cmd
    }

    /// Starts `cmd` with stderr captured.
    pub fn start(mut cmd: Command) -> Daemon {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mqtls run");
        let stderr = child.stderr.take().expect("stderr pipe");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(strip_ansi(&line));
            }
        });
        Daemon { child, lines }
    }

    /// Every stderr line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The first stderr line containing every needle, waiting up to [`GUARD`].
    pub async fn wait_line(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + GUARD;
        loop {
            let found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .cloned();
            if let Some(line) = found {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no stderr line with {needles:?} within {GUARD:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for "mqtls ready" and returns the first address on it.
    pub async fn ready(&self) -> SocketAddr {
        let line = self.wait_line(&["mqtls ready"]).await;
        let list = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("listen="))
            .unwrap_or_else(|| panic!("no listen= in {line:?}"));
        let first = list.trim_matches('"').split(',').next().unwrap();
        first
            .parse()
            .unwrap_or_else(|e| panic!("bad address {first:?} in {line:?}: {e}"))
    }

    /// Waits until the process catches SIGINT and SIGTERM (`SigCgt` in /proc/<pid>/status). mqtls installs
    /// them before it logs "mqtls ready" (`sigterm_right_after_ready_exits_0` holds it to that); the other
    /// tests wait anyway so that each stays about one behaviour.
    pub async fn wait_signal_handlers(&self) {
        const WANTED: u64 = (1 << (2 - 1)) | (1 << (15 - 1));
        let status = format!("/proc/{}/status", self.child.id());
        let deadline = Instant::now() + GUARD;
        loop {
            let text = std::fs::read_to_string(&status).unwrap_or_default();
            let caught = text
                .lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
                .unwrap_or(0);
            if caught & WANTED == WANTED {
                return;
            }
            assert!(Instant::now() < deadline, "SIGINT/SIGTERM handlers never installed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// The exit status, or `None` if the process is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Daemon {
    /// Waits for the metrics endpoint's log line and returns its address.
    pub async fn metrics_addr(&self) -> SocketAddr {
        let line = self.wait_line(&["metrics endpoint"]).await;
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("address="))
            .unwrap_or_else(|| panic!("no address= in {line:?}"));
        addr.trim_matches('"')
            .parse()
            .unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"))
    }

    /// How many stderr lines contain every needle.
    pub fn count_lines(&self, needles: &[&str]) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }
}

/// Starts `mqtls run` with a metrics endpoint (no broker needed), takes one scrape of `/metrics` with a
/// plain blocking client, and stops it: for tests that only need to know what mqtls exports.
pub fn scrape_once() -> String {
    use std::io::{Read, Write};
    let pki = super::Pki::new();
    let mut config = super::proxy::ProxyConfig::new(&pki, "127.0.0.1:1".parse().unwrap())
        .device(super::proxy::DeviceEntry::new(&pki.client("boiler-1")));
    config.extra.push_str("\n[metrics]\naddress = \"127.0.0.1:0\"\n");
    let mut child = Daemon::command(&config.write(pki.dir()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mqtls run");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut seen = Vec::new();
    let mut addr = None;
    for line in stderr.by_ref().map_while(Result::ok) {
        let line = strip_ansi(&line);
        if line.contains("metrics endpoint") {
            addr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("address="))
                .and_then(|a| a.trim_matches('"').parse::<SocketAddr>().ok());
            break;
        }
        seen.push(line);
    }
    // Keep reading: a daemon whose stderr pipe is closed fails at its next log line.
    std::thread::spawn(move || stderr.for_each(drop));
    let addr = addr.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("no metrics endpoint line; stderr:\n{}", seen.join("\n"))
    });
    let mut s = std::net::TcpStream::connect(addr).expect("connect to /metrics");
    s.set_read_timeout(Some(GUARD)).expect("read timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: mqtls\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("response");
    let _ = child.kill();
    let _ = child.wait();
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}
