//! `mqtls run` as a subprocess, the way an operator runs it: stderr collected line by line, signals sent
//! with `kill`, exit status awaited, and the addresses it logs when ready.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Set once stderr has ended (the process exited), after its last line was stored.
    stderr_closed: Arc<AtomicBool>,
}

impl Daemon {
    pub fn spawn(config: &Path) -> Daemon {
        Daemon::start(Daemon::command(config))
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
        let stderr_closed = Arc::new(AtomicBool::new(false));
        let (sink, closed) = (lines.clone(), stderr_closed.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(strip_ansi(&line));
            }
            closed.store(true, Ordering::Release);
        });
        Daemon {
            child,
            lines,
            stderr_closed,
        }
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
        self.wait_nth_line(needles, 1).await
    }

    /// The `n`th stderr line (counting from 1) containing every needle, waiting up to [`GUARD`]. Fails
    /// at once if the daemon exits (its stderr ends) without having logged it.
    pub async fn wait_nth_line(&self, needles: &[&str], n: usize) -> String {
        assert!(n >= 1, "lines are counted from 1");
        let deadline = Instant::now() + GUARD;
        loop {
            // Read before the lines: once set, every line the daemon wrote is stored.
            let closed = self.stderr_closed.load(Ordering::Acquire);
            let found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| needles.iter().all(|needle| l.contains(needle)))
                .nth(n - 1)
                .cloned();
            if let Some(line) = found {
                return line;
            }
            assert!(
                !closed,
                "mqtls exited (stderr closed) with fewer than {n} lines with {needles:?}; stderr:\n{}",
                self.stderr()
            );
            assert!(
                Instant::now() < deadline,
                "fewer than {n} stderr lines with {needles:?} within {GUARD:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for the metrics endpoint's log line and returns its address.
    pub async fn metrics_addr(&self) -> SocketAddr {
        let line = self.wait_line(&["metrics endpoint"]).await;
        logged_addr(&line, "address").unwrap_or_else(|| panic!("no address=<socket address> in {line:?}"))
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

    /// Waits for "mqtls ready" and returns the first address on it.
    pub async fn ready(&self) -> SocketAddr {
        let line = self.wait_line(&["mqtls ready"]).await;
        let list = logged_value(&line, "listen").unwrap_or_else(|| panic!("no listen= in {line:?}"));
        let first = list.split(',').next().unwrap();
        first
            .parse()
            .unwrap_or_else(|e| panic!("bad address {first:?} in {line:?}: {e}"))
    }

    /// Waits until the process catches SIGHUP, SIGINT and SIGTERM (`SigCgt` in /proc/<pid>/status; bit
    /// `signo - 1`). mqtls installs the three together before it logs "mqtls ready"
    /// (`sigterm_right_after_ready_exits_0` holds it to that); the other tests wait anyway so that each
    /// stays about one behaviour.
    pub async fn wait_signal_handlers(&self) {
        const fn bit(signo: u32) -> u64 {
            1 << (signo - 1)
        }
        const WANTED: u64 = bit(1) | bit(2) | bit(15); // SIGHUP, SIGINT, SIGTERM
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
            assert!(
                !self.stderr_closed.load(Ordering::Acquire),
                "mqtls exited before catching SIGHUP/SIGINT/SIGTERM; stderr:\n{}",
                self.stderr()
            );
            assert!(
                Instant::now() < deadline,
                "SIGHUP/SIGINT/SIGTERM handlers never installed (SigCgt {caught:#x}); stderr:\n{}",
                self.stderr()
            );
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

/// The value of `key=` in a log line (logfmt as mqtls writes it), without quotes.
pub fn logged_value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .map(|v| v.trim_matches('"'))
}

/// The socket address logged as `key=` in a log line (e.g. `address=` on "metrics endpoint").
pub fn logged_addr(line: &str, key: &str) -> Option<SocketAddr> {
    logged_value(line, key)?.parse().ok()
}

/// Starts `mqtls run` with a metrics endpoint (no broker needed), takes one scrape of `/metrics` and
/// stops it: for tests that only need to know what mqtls exports. For plain `#[test]`s: it runs its own
/// runtime.
pub fn scrape_once() -> String {
    let pki = super::Pki::new();
    let mut config = super::proxy::ProxyConfig::new(&pki, "127.0.0.1:1".parse().unwrap())
        .device(super::proxy::DeviceEntry::new(&pki.client("boiler-1")));
    config.extra.push_str("\n[metrics]\naddress = \"127.0.0.1:0\"\n");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    // Dropped (killed) on the way out, also when a step panics.
    let daemon = Daemon::spawn(&config.write(pki.dir()));
    runtime.block_on(async {
        let addr = daemon.metrics_addr().await;
        tokio::time::timeout(GUARD, super::metrics::Scrape::take(addr))
            .await
            .expect("no /metrics answer in time")
            .0
    })
}
