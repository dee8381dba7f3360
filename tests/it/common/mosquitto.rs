//! Runs a real Mosquitto 2 broker configured from `deploy/mosquitto/`.
//!
//! The production recipe (`deploy/mosquitto/mosquitto.conf` and `acl`) is read
//! from the crate root; only the path and port directives are rewritten, so
//! the tests exercise the exact TLS/ACL settings that are shipped.

use std::collections::HashSet;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::pki::{Pki, ServerCert};

/// How long a broker may take to come up.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// Attempts with a fresh ephemeral port when the chosen one was taken.
const BIND_ATTEMPTS: usize = 5;
/// Directives whose values the harness replaces.
const REWRITTEN: [&str; 5] = ["listener", "cafile", "certfile", "keyfile", "acl_file"];
/// Directives dropped from the recipe because the harness sets its own
/// (or because they point at system paths).
const DROPPED: [&str; 8] = [
    "log_dest",
    "log_type",
    "persistence",
    "persistence_location",
    "pid_file",
    "user",
    "include_dir",
    "connection_messages",
];

static INSTANCE: AtomicUsize = AtomicUsize::new(0);

/// Path of the crate's `deploy/mosquitto/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/mosquitto")
}

/// The shipped `mosquitto.conf`.
pub fn deploy_conf() -> String {
    let p = deploy_dir().join("mosquitto.conf");
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// The shipped `acl`.
pub fn deploy_acl() -> String {
    let p = deploy_dir().join("acl");
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Locate the mosquitto binary (PATH, then /usr/sbin/mosquitto).
pub fn mosquitto_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("mosquitto");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let fallback = PathBuf::from("/usr/sbin/mosquitto");
    if fallback.is_file() {
        return fallback;
    }
    panic!("install mosquitto: apt-get install -y mosquitto");
}

fn running_as_root() -> bool {
    // The owner of /proc/self is the process's effective uid.
    fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// A free ephemeral port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Rewrite the recipe for a test run: the five path/port directives get the
/// test's values, system-specific directives are dropped and the test's
/// logging/persistence settings are appended. Panics if a directive the
/// harness must rewrite is missing from the recipe.
pub fn rewrite_conf(conf: &str, port: u16, ca: &Path, server: &ServerCert, acl: &Path, log: &Path) -> String {
    let mut out = String::new();
    let mut seen = HashSet::new();
    for line in conf.lines() {
        let directive = line.split_whitespace().next().unwrap_or("");
        if directive.starts_with('#') || directive.is_empty() {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let replacement = match directive {
            "listener" => Some(format!("listener {port} 127.0.0.1")),
            "cafile" => Some(format!("cafile {}", ca.display())),
            "certfile" => Some(format!("certfile {}", server.cert.display())),
            "keyfile" => Some(format!("keyfile {}", server.key.display())),
            "acl_file" => Some(format!("acl_file {}", acl.display())),
            d if DROPPED.contains(&d) => {
                out.push_str("# (dropped by test harness) ");
                out.push_str(line);
                out.push('\n');
                continue;
            }
            _ => None,
        };
        match replacement {
            Some(r) => {
                assert!(
                    seen.insert(directive.to_owned()),
                    "deploy/mosquitto/mosquitto.conf: `{directive}` appears more than once; \
                     the test harness supports a single listener"
                );
                out.push_str(&r);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    for d in REWRITTEN {
        assert!(
            seen.contains(d),
            "deploy/mosquitto/mosquitto.conf has no `{d}` directive"
        );
    }
    out.push_str("\n# --- appended by the test harness ---\n");
    out.push_str("persistence false\n");
    out.push_str(&format!("log_dest file {}\n", log.display()));
    out.push_str("log_type all\n");
    out.push_str("connection_messages true\n");
    if running_as_root() {
        // Otherwise mosquitto drops to the `mosquitto` user and cannot read
        // the 0600 keys (nor write the log) in the root-owned temp dir.
        out.push_str("user root\n");
    }
    out
}

/// A running broker. Killed (and reaped) on drop.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    conf_path: PathBuf,
    log_path: PathBuf,
    stderr_path: PathBuf,
    server_cert: ServerCert,
    /// Local addresses of the harness's own readiness probes, excluded from
    /// [`Mosquitto::connections_from_log`].
    probes: Vec<SocketAddr>,
}

impl Mosquitto {
    /// Start with the shipped recipe and a server certificate from `pki` for
    /// `localhost` and `127.0.0.1`.
    pub async fn start(pki: &Pki) -> Mosquitto {
        let cert = pki.server("mosquitto", &["localhost", "127.0.0.1"]);
        Self::start_with(pki, &cert).await
    }

    /// Start with the shipped recipe and a caller-chosen server certificate
    /// (e.g. one from an untrusted CA, or with the wrong name). Client
    /// certificates are still verified against `pki`'s CA.
    pub async fn start_with(pki: &Pki, server_cert: &ServerCert) -> Mosquitto {
        Self::start_custom(pki, server_cert, &deploy_conf(), &deploy_acl()).await
    }

    /// Start from an arbitrary recipe and ACL text (same rewriting rules).
    pub async fn start_custom(pki: &Pki, server_cert: &ServerCert, conf: &str, acl: &str) -> Mosquitto {
        Self::start_full(pki, server_cert, pki.ca_pem_path(), conf, acl).await
    }

    /// Start with the shipped recipe, presenting `server_cert`, and accepting only client certificates
    /// that chain to the CA in `client_ca` (the recipe's `cafile`), e.g. a CA made by `mqtls certs init-ca`.
    pub async fn start_with_client_ca(pki: &Pki, server_cert: &ServerCert, client_ca: &Path) -> Mosquitto {
        Self::start_full(pki, server_cert, client_ca, &deploy_conf(), &deploy_acl()).await
    }

    async fn start_full(pki: &Pki, server_cert: &ServerCert, client_ca: &Path, conf: &str, acl: &str) -> Mosquitto {
        let bin = mosquitto_binary();
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let dir = pki.dir().join(format!("mosquitto-{n}"));
        fs::create_dir_all(&dir).expect("create mosquitto dir");
        let acl_path = dir.join("acl");
        fs::write(&acl_path, acl).expect("write acl");

        let mut last_log = String::new();
        for attempt in 1..=BIND_ATTEMPTS {
            let port = free_port();
            let log_path = dir.join(format!("mosquitto-{attempt}.log"));
            let stderr_path = dir.join(format!("stderr-{attempt}.txt"));
            let conf_path = dir.join(format!("mosquitto-{attempt}.conf"));
            let text = rewrite_conf(conf, port, client_ca, server_cert, &acl_path, &log_path);
            fs::write(&conf_path, text).expect("write mosquitto.conf");
            let child = Command::new(&bin)
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(Stdio::from(
                    fs::File::create(dir.join(format!("stdout-{attempt}.txt"))).expect("stdout file"),
                ))
                .stderr(Stdio::from(fs::File::create(&stderr_path).expect("stderr file")))
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
            let mut m = Mosquitto {
                child: Some(child),
                port,
                dir: dir.clone(),
                conf_path,
                log_path,
                stderr_path,
                server_cert: server_cert.clone(),
                probes: Vec::new(),
            };
            match m.wait_ready().await {
                Ok(()) => return m,
                Err(Failure::PortTaken) if attempt < BIND_ATTEMPTS => {
                    last_log = m.diagnostics();
                    continue;
                }
                Err(Failure::PortTaken) => {
                    panic!(
                        "mosquitto could not bind a free port in {BIND_ATTEMPTS} attempts:\n{}",
                        m.diagnostics()
                    )
                }
                Err(Failure::Other(why)) => {
                    panic!("mosquitto failed to start: {why}\n{}", m.diagnostics())
                }
            }
        }
        panic!("mosquitto failed to start:\n{last_log}");
    }

    /// Poll (no fixed sleeps) until the log says the broker is running and the
    /// port accepts a TCP connection.
    async fn wait_ready(&mut self) -> Result<(), Failure> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let diag = self.diagnostics();
                if diag.contains("Address already in use") {
                    return Err(Failure::PortTaken);
                }
                return Err(Failure::Other(format!("exited with {status}")));
            }
            // "running" is logged only once every listener is bound, so the
            // probe below cannot reach some other process that owns the port.
            if self.log().contains(" running") {
                if let Ok(s) = tokio::net::TcpStream::connect(self.addr()).await {
                    let local = s.local_addr().expect("probe local addr");
                    self.probes.push(local);
                    // Hold the probe open until the broker has logged it, so
                    // it is logged as "New connection from <probe>" (and
                    // excluded from the counts) rather than as an anonymous
                    // "Client connection from 127.0.0.1 failed" line.
                    let needle = format!("New connection from {local} ");
                    while !self.log().contains(&needle) {
                        if Instant::now() >= deadline {
                            return Err(Failure::Other(format!("probe {local} accepted but never logged")));
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    drop(s);
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(Failure::Other(format!(
                    "not accepting on {} after {START_DEADLINE:?}",
                    self.addr()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The listening port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server certificate the broker presents.
    pub fn server_cert(&self) -> &ServerCert {
        &self.server_cert
    }

    /// The rewritten configuration file in use.
    pub fn conf_path(&self) -> &Path {
        &self.conf_path
    }

    /// The broker log file in use.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// This instance's working directory (config, ACL, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The broker log so far (empty if not yet written).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Log plus stderr, for failure messages.
    pub fn diagnostics(&self) -> String {
        let stderr = fs::read_to_string(&self.stderr_path).unwrap_or_default();
        format!(
            "--- mosquitto log ({}) ---\n{}\n--- mosquitto stderr ---\n{}",
            self.log_path.display(),
            self.log(),
            stderr
        )
    }

    /// Number of TCP connections the broker accepted ("New connection from"
    /// lines), not counting the harness's own readiness probe.
    pub fn connections_from_log(&self) -> usize {
        self.connection_sources().len()
    }

    /// Peer addresses of the accepted TCP connections, in order, not counting
    /// the harness's readiness probe.
    pub fn connection_sources(&self) -> Vec<SocketAddr> {
        self.log()
            .lines()
            .filter_map(|l| {
                let rest = l.split("New connection from ").nth(1)?;
                let addr = rest.split_whitespace().next()?;
                addr.parse::<SocketAddr>().ok()
            })
            .filter(|a| !self.probes.contains(a))
            .collect()
    }

    /// Number of "Client connection from <ip> failed: ..." lines: TCP
    /// connections that mosquitto 2.0.11 accepted but whose TLS handshake
    /// failed at once (typically: the peer had already closed). Those are NOT
    /// logged as "New connection from" and carry no peer port.
    pub fn failed_accepts_from_log(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("Client connection from ") && l.contains(" failed"))
            .count()
    }

    /// Usernames (certificate CNs) of the MQTT sessions the broker accepted,
    /// in order, from "New client connected from ... u'<name>')" lines.
    pub fn connected_usernames(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("New client connected from "))
            .filter_map(|l| {
                let rest = l.split(" u'").nth(1)?;
                Some(rest.split('\'').next()?.to_owned())
            })
            .collect()
    }

    /// Number of log lines containing `needle`.
    pub fn count_in_log(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Wait until at least `n` log lines contain `needle`; on timeout returns
    /// the log as the error.
    pub async fn wait_for_log(&self, needle: &str, n: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count_in_log(needle) >= n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "timed out after {timeout:?} waiting for {n} x {needle:?}\n{}",
                    self.diagnostics()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether the broker process is still alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Kill the broker and reap it. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

enum Failure {
    PortTaken,
    Other(String),
}
