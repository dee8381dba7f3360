//! A real Mosquitto 2 with mutual TLS, from the shipped recipe in deploy/mosquitto/ (only paths and the
//! port are rewritten, as the integration tests do; its logging stays as shipped, to a file).

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::process::{find_binary, free_port, Proc};

/// An OpenSSL configuration under which a TLS server issues no TLS 1.3 session tickets.
const NO_TICKETS: &str = "openssl_conf = mqtls_bench\n\n[mqtls_bench]\nssl_conf = mqtls_bench_ssl\n\n\
[mqtls_bench_ssl]\nsystem_default = mqtls_bench_tls\n\n[mqtls_bench_tls]\nNumTickets = 0\n";

pub struct Broker {
    pub proc: Proc,
    pub addr: SocketAddr,
}

/// Paths the recipe needs.
pub struct BrokerFiles<'a> {
    pub repo: &'a Path,
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
    /// Drop the recipe's `set_tcp_nodelay` line, to measure what the delayed ACK costs without it.
    pub without_nodelay: bool,
    /// Issue TLS session tickets (OpenSSL's default). Without them no client can resume a TLS 1.3 session.
    pub tickets: bool,
}

/// Whether the shipped recipe turns Nagle off (`set_tcp_nodelay true`), which the report states.
pub fn recipe_sets_nodelay(repo: &Path) -> bool {
    fs::read_to_string(repo.join("deploy/mosquitto/mosquitto.conf")).is_ok_and(|conf| {
        conf.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["set_tcp_nodelay", "true"])
    })
}

impl Broker {
    pub async fn start(files: &BrokerFiles<'_>, dir: &Path, tag: &str) -> Result<Broker> {
        let bin = find_binary(&["mosquitto"]).context("mosquitto not installed (bench/run installs it)")?;
        let recipe_dir = files.repo.join("deploy/mosquitto");
        let conf =
            fs::read_to_string(recipe_dir.join("mosquitto.conf")).context("read deploy/mosquitto/mosquitto.conf")?;
        let acl = recipe_dir.join("acl");
        let dir = dir.join(format!("mosquitto-{tag}"));
        fs::create_dir_all(&dir)?;
        let port = free_port();
        let log = dir.join("mosquitto.log");
        let mut out = String::new();
        for line in conf.lines() {
            let directive = line.split_whitespace().next().unwrap_or("");
            let replaced = match directive {
                "listener" => format!("listener {port} 127.0.0.1"),
                "cafile" => format!("cafile {}", files.ca.display()),
                "certfile" => format!("certfile {}", files.cert.display()),
                "keyfile" => format!("keyfile {}", files.key.display()),
                "acl_file" => format!("acl_file {}", acl.display()),
                "log_dest" | "persistence" | "persistence_location" | "pid_file" | "user" | "include_dir" => {
                    format!("# (dropped by the bench) {line}")
                }
                "set_tcp_nodelay" if files.without_nodelay => format!("# (dropped by the bench) {line}"),
                _ => line.to_owned(),
            };
            out.push_str(&replaced);
            out.push('\n');
        }
        out.push_str(&format!("persistence false\nlog_dest file {}\n", log.display()));
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Otherwise mosquitto drops to its own user and cannot read the 0600 keys.
            out.push_str("user root\n");
        }
        let conf_path = dir.join("mosquitto.conf");
        fs::write(&conf_path, out)?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&conf_path);
        if !files.tickets {
            // Mosquitto has no option for it; OpenSSL's own configuration does, for every SSL_CTX the
            // process makes.
            let ssl_conf = dir.join("openssl.cnf");
            fs::write(&ssl_conf, NO_TICKETS)?;
            cmd.env("OPENSSL_CONF", &ssl_conf);
        }
        let mut proc = Proc::spawn("mosquitto", cmd, &dir)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if !proc.alive() {
                bail!(
                    "mosquitto exited:\n{}\n{}",
                    proc.log_tail(),
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if fs::read_to_string(&log).unwrap_or_default().contains(" running") {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "mosquitto did not start:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Broker {
            proc,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        })
    }
}
