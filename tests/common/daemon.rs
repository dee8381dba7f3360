//! `mqtls run` as a child process, the way an operator or systemd runs it: stderr collected line by line,
//! signals sent with kill(1), the exit awaited under a deadline. Readiness and the bound address come from
//! the "mqtls ready" line.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// The binary under test. Cargo names it to integration tests only; the demo, which shares these helpers
/// and finds the binary itself, gets the bare name.
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
    /// `mqtls run --config <config>`, logging at info, with none of the [`INHERITED`] variables set.
    pub fn command(config: &Path) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("run").arg("--config").arg(config);
        scrub_env(&mut cmd);
        cmd
    }

    /// Starts [`Daemon::command`] as it stands.
    pub fn spawn(config: &Path) -> Daemon {
        Daemon::start(Daemon::command(config))
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

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every stderr line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Every stderr line so far, as one text.
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

    /// Sends a signal by name (`TERM`, `INT`, `HUP`).
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
