//! The contenders: how each is configured and started. Every proxy presents the same single client
//! certificate (the peers cannot pick one per device), verifies the upstream's chain against the CA and
//! its name ("localhost"), and turns Nagle off on both sides.

use std::fmt;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::process::{find_binary, free_port, Proc};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Mqtls,
    Stunnel,
    Haproxy,
    Socat,
    /// No proxy: the device speaks mutual TLS itself.
    Direct,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Mqtls, Kind::Stunnel, Kind::Haproxy, Kind::Socat, Kind::Direct];
    pub const PEERS: [Kind; 3] = [Kind::Stunnel, Kind::Haproxy, Kind::Socat];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Mqtls => "mqtls",
            Kind::Stunnel => "stunnel",
            Kind::Haproxy => "haproxy",
            Kind::Socat => "socat",
            Kind::Direct => "direct",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    pub fn is_proxy(self) -> bool {
        self != Kind::Direct
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Files and limits every contender is configured from.
pub struct Setup {
    pub repo: PathBuf,
    pub dir: PathBuf,
    pub mqtls_bin: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate and key in one file (HAProxy's `crt`).
    pub combined: PathBuf,
    /// Connections each proxy must be able to hold at once.
    pub max_connections: usize,
}

pub struct Running {
    pub proc: Proc,
    pub listen: SocketAddr,
}

/// Starts `kind` in front of `upstream` and waits until it listens.
pub async fn start(kind: Kind, upstream: SocketAddr, s: &Setup, tag: &str) -> Result<Running> {
    let port = free_port();
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let dir = s.dir.join(format!("{kind}-{tag}"));
    fs::create_dir_all(&dir)?;
    let (cmd, term_first) = match kind {
        Kind::Mqtls => mqtls(s, &dir, listen, upstream)?,
        Kind::Stunnel => (stunnel(s, &dir, listen, upstream)?, false),
        Kind::Haproxy => (haproxy(s, &dir, listen, upstream)?, false),
        Kind::Socat => (socat(s, listen, upstream)?, false),
        Kind::Direct => anyhow::bail!("direct has no process"),
    };
    let mut proc = Proc::spawn(kind.name(), cmd, &dir)?;
    proc.term_first = term_first;
    proc.wait_listening(listen, Duration::from_secs(60)).await?;
    Ok(Running { proc, listen })
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

/// The command, and whether it runs under a profiler (MQTLS_BENCH_WRAP), which needs a SIGTERM first.
fn mqtls(s: &Setup, dir: &Path, listen: SocketAddr, upstream: SocketAddr) -> Result<(Command, bool)> {
    // One device entry for every source address and no client id: every device gets the same identity,
    // which is what the peers do.
    let conf = format!(
        r#"[listen]
address = "{listen}"
max_connections = {max}
max_pending_per_source = 100000

[upstream]
address = "{upstream}"
server_name = "localhost"
ca_file = "{ca}"
{extra}

[[device]]
name = "bench"
source = "127.0.0.0/8"
cert = "{cert}"
key = "{key}"
"#,
        max = s.max_connections,
        // For trying settings: MQTLS_BENCH_UPSTREAM="max_connecting = 32" adds lines to [upstream].
        extra = std::env::var("MQTLS_BENCH_UPSTREAM").unwrap_or_default(),
        ca = s.ca.display(),
        cert = s.cert.display(),
        key = s.key.display(),
    );
    let path = dir.join("mqtls.toml");
    write(&path, &conf)?;
    // MQTLS_BENCH_WRAP runs mqtls under a profiler, e.g. "heaptrack -o /tmp/mqtls" or
    // "valgrind --tool=callgrind": for diagnosis only, since the figures then include the profiler.
    let wrap = std::env::var("MQTLS_BENCH_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let wrapped = !wrap.trim().is_empty();
    let mut cmd = match words.next() {
        Some(tool) => {
            let mut c = Command::new(tool);
            c.args(words).arg(&s.mqtls_bin);
            c
        }
        None => Command::new(&s.mqtls_bin),
    };
    cmd.arg("run").arg("--config").arg(&path);
    // One line per connection opened and closed at info; the peers are configured not to log per
    // connection either.
    cmd.env("MQTLS_LOG", "warn");
    Ok((cmd, wrapped))
}

fn stunnel(s: &Setup, dir: &Path, listen: SocketAddr, upstream: SocketAddr) -> Result<Command> {
    let bin = find_binary(&["stunnel4", "stunnel"]).context("stunnel not installed (apt-get install stunnel4)")?;
    let conf = format!(
        r#"foreground = yes
pid =
syslog = no
debug = 3

[mqtt]
client = yes
accept = {listen}
connect = {upstream}
cert = {cert}
key = {key}
CAfile = {ca}
verifyChain = yes
checkHost = localhost
sni = localhost
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
"#,
        cert = s.cert.display(),
        key = s.key.display(),
        ca = s.ca.display(),
    );
    let path = dir.join("stunnel.conf");
    write(&path, &conf)?;
    let mut cmd = Command::new(bin);
    cmd.arg(&path);
    Ok(cmd)
}

fn haproxy(s: &Setup, dir: &Path, listen: SocketAddr, upstream: SocketAddr) -> Result<Command> {
    let bin = find_binary(&["haproxy"]).context("haproxy not installed (apt-get install haproxy)")?;
    let conf = format!(
        r#"global
    maxconn {max}
    ssl-server-verify required

defaults
    mode tcp
    maxconn {max}
    timeout connect 5s
    timeout client 1h
    timeout server 1h

frontend devices
    bind {listen}
    default_backend broker

backend broker
    server broker {upstream} ssl crt {crt} ca-file {ca} verify required verifyhost localhost sni str(localhost)
"#,
        max = s.max_connections,
        crt = s.combined.display(),
        ca = s.ca.display(),
    );
    let path = dir.join("haproxy.cfg");
    write(&path, &conf)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-db").arg("-f").arg(&path);
    Ok(cmd)
}

fn socat(s: &Setup, listen: SocketAddr, upstream: SocketAddr) -> Result<Command> {
    let bin = find_binary(&["socat"]).context("socat not installed (apt-get install socat)")?;
    let mut cmd = Command::new(bin);
    // backlog=1024 instead of socat's default of 5, which would only measure the kernel's SYN retries.
    cmd.arg(format!(
        "TCP-LISTEN:{},bind={},fork,reuseaddr,backlog=1024,nodelay",
        listen.port(),
        listen.ip()
    ))
    .arg(format!(
        "OPENSSL:{}:{},cert={},key={},cafile={},verify=1,commonname=localhost,nodelay",
        upstream.ip(),
        upstream.port(),
        s.cert.display(),
        s.key.display(),
        s.ca.display()
    ));
    Ok(cmd)
}
