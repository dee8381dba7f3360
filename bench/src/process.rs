//! A subprocess started as the leader of its own process group, killed with its whole group on drop.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct Proc {
    pub name: String,
    /// Whether drop sends SIGTERM to the process first and waits for it to exit (mqtls under a profiler,
    /// which must write its data), before the SIGKILL to the group.
    pub term_first: bool,
    child: Child,
    stderr: PathBuf,
}

impl Proc {
    /// Spawns `cmd` in a new process group, stdout and stderr to `<dir>/<name>.log`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let out = fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        let child = cmd.spawn().with_context(|| format!("start {name}: {cmd:?}"))?;
        Ok(Proc {
            name: name.to_owned(),
            term_first: false,
            child,
            stderr: log,
        })
    }

    /// The process id, which is also the process group id.
    pub fn pgid(&self) -> i32 {
        self.child.id() as i32
    }

    /// What the process wrote so far (its last 2,000 characters).
    pub fn log_tail(&self) -> String {
        let s = fs::read_to_string(&self.stderr).unwrap_or_default();
        let cut = s.len().saturating_sub(2000);
        let cut = (cut..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(s.len());
        s[cut..].to_owned()
    }

    /// Waits until `addr` accepts TCP connections, failing early if the process exits.
    pub async fn wait_listening(&mut self, addr: SocketAddr, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited with {status} before listening on {addr}:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not listening on {addr} after {within:?}:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Under a profiler (MQTLS_BENCH_WRAP), mqtls gets SIGTERM first so that the profiler can write its
        // data; mqtls closes its connections and exits within its 10 s grace period.
        if self.term_first {
            let pgid = self.child.id() as i32;
            for pid in crate::procfs::group(pgid) {
                if fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim().starts_with("mqtls")) {
                    // SAFETY: kill(2) signals a process of our own child's group.
                    unsafe {
                        libc::kill(pid, libc::SIGTERM);
                    }
                }
            }
            let deadline = Instant::now() + Duration::from_secs(120);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // SAFETY: kill(2) with a negative pid signals our own child's process group.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
        // Forked children (socat) are reaped by init once their parent is gone; wait until they are.
        let pgid = self.child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !crate::procfs::group(pgid).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A free port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// The first of `names` found in PATH or /usr/sbin, /usr/bin.
pub fn find_binary(names: &[&str]) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"].map(PathBuf::from));
    for n in names {
        for d in &dirs {
            let c = d.join(n);
            if c.is_file() {
                return Some(c);
            }
        }
    }
    None
}
