//! Running mqtls in-process for a test: write a config, load it with the library, bind 127.0.0.1:0, serve
//! until the test ends.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mqtls::Proxy;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::pki::{ClientCert, Pki};

/// One `[[device]]` entry.
#[derive(Clone, Debug)]
pub struct DeviceEntry {
    pub name: String,
    pub client_id: Option<String>,
    pub source: Option<String>,
    pub listen: Option<SocketAddr>,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `connect.*` lines, e.g. `connect.client_id = "{name}"`.
    pub connect: Vec<String>,
}

impl DeviceEntry {
    /// A device matched by client id (= its certificate's CN) alone.
    pub fn new(cert: &ClientCert) -> DeviceEntry {
        DeviceEntry {
            name: cert.cn.clone(),
            client_id: Some(cert.cn.clone()),
            source: None,
            listen: None,
            cert: cert.cert.clone(),
            key: cert.key.clone(),
            connect: Vec::new(),
        }
    }

    /// `connect.<key> = <value>`, the value written as TOML (`"\"{name}\""`, `"false"`).
    pub fn connect(mut self, key: &str, value: &str) -> Self {
        self.connect.push(format!("connect.{key} = {value}"));
        self
    }

    pub fn source(mut self, s: &str) -> Self {
        self.source = Some(s.to_string());
        self
    }

    pub fn client_id(mut self, id: Option<&str>) -> Self {
        self.client_id = id.map(str::to_string);
        self
    }

    pub fn listen(mut self, l: SocketAddr) -> Self {
        self.listen = Some(l);
        self
    }

    fn toml(&self) -> String {
        let mut s = format!("\n[[device]]\nname = {:?}\n", self.name);
        if let Some(id) = &self.client_id {
            let _ = writeln!(s, "client_id = {id:?}");
        }
        if let Some(src) = &self.source {
            let _ = writeln!(s, "source = {src:?}");
        }
        if let Some(l) = &self.listen {
            let _ = writeln!(s, "listen = \"{l}\"");
        }
        let _ = writeln!(s, "cert = {:?}\nkey = {:?}", self.cert, self.key);
        for line in &self.connect {
            let _ = writeln!(s, "{line}");
        }
        s
    }
}

/// Builder for a test configuration.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// `listen.address`, the shared listener (`127.0.0.1:0` unless set).
    pub listen: SocketAddr,
    pub upstream: Vec<String>,
    pub server_name: Option<String>,
    pub ca_file: PathBuf,
    pub connect_timeout: String,
    pub upstream_connect_timeout: String,
    pub handshake_timeout: String,
    pub max_connections: usize,
    pub max_connect_size: usize,
    pub max_pending_per_source: Option<usize>,
    /// `listen.max_connections_per_source`; unset, far above what a test opens from 127.0.0.1.
    pub max_connections_per_source: Option<usize>,
    /// `listen.max_connects_per_source_per_second`; unset, far above what a test opens from 127.0.0.1.
    pub max_connects_per_source_per_second: Option<u32>,
    /// `listen.max_idle`, e.g. `"2s"`.
    pub max_idle: Option<String>,
    pub shutdown_grace: Option<String>,
    pub devices: Vec<DeviceEntry>,
    pub extra: String,
}

impl ProxyConfig {
    /// Upstream at `broker`, trusting `pki`'s CA, verifying the name `localhost`.
    pub fn new(pki: &Pki, broker: SocketAddr) -> ProxyConfig {
        ProxyConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            upstream: vec![broker.to_string()],
            server_name: Some("localhost".into()),
            ca_file: pki.ca_pem_path().to_path_buf(),
            connect_timeout: "5s".into(),
            upstream_connect_timeout: "2s".into(),
            handshake_timeout: "5s".into(),
            max_connections: 100,
            max_connect_size: 65536,
            max_pending_per_source: None,
            max_connections_per_source: None,
            max_connects_per_source_per_second: None,
            max_idle: None,
            shutdown_grace: None,
            devices: Vec::new(),
            extra: String::new(),
        }
    }

    /// `listen.address`.
    pub fn listen(mut self, address: SocketAddr) -> Self {
        self.listen = address;
        self
    }

    /// `listen.shutdown_grace`, e.g. `"60s"`.
    pub fn shutdown_grace(mut self, grace: &str) -> Self {
        self.shutdown_grace = Some(grace.to_string());
        self
    }

    pub fn device(mut self, d: DeviceEntry) -> Self {
        self.devices.push(d);
        self
    }

    pub fn toml(&self) -> String {
        let upstream: Vec<String> = self.upstream.iter().map(|a| format!("{a:?}")).collect();
        // Every test's devices come from 127.0.0.1: the per-source limits are the tests' own to set.
        let mut s = format!(
            "[listen]\naddress = \"{}\"\nconnect_timeout = {:?}\nmax_connections = {}\nmax_connect_size = {}\n\
             max_connections_per_source = {}\nmax_connects_per_source_per_second = {}\n\n\
             [upstream]\naddress = [{}]\nca_file = {:?}\nconnect_timeout = {:?}\nhandshake_timeout = {:?}\n",
            self.listen,
            self.connect_timeout,
            self.max_connections,
            self.max_connect_size,
            self.max_connections_per_source.unwrap_or(100_000),
            self.max_connects_per_source_per_second.unwrap_or(100_000),
            upstream.join(", "),
            self.ca_file,
            self.upstream_connect_timeout,
            self.handshake_timeout,
        );
        if let Some(n) = self.max_pending_per_source {
            s = s.replacen("[upstream]", &format!("max_pending_per_source = {n}\n\n[upstream]"), 1);
        }
        if let Some(i) = &self.max_idle {
            s = s.replacen("[upstream]", &format!("max_idle = {i:?}\n\n[upstream]"), 1);
        }
        if let Some(g) = &self.shutdown_grace {
            s = s.replacen("[upstream]", &format!("shutdown_grace = {g:?}\n\n[upstream]"), 1);
        }
        if let Some(n) = &self.server_name {
            let _ = writeln!(s, "server_name = {n:?}");
        }
        s.push_str(&self.extra);
        for d in &self.devices {
            s.push_str(&d.toml());
        }
        s
    }

    /// Writes the config to `dir/mqtls.toml` and returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("mqtls-{}.toml", std::process::id() ^ rand_suffix()));
        std::fs::write(&path, self.toml()).expect("write config");
        path
    }
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(1);
    N.fetch_add(1, Ordering::Relaxed) << 20
}

/// mqtls serving in the test's runtime.
pub struct RunningProxy {
    pub addrs: Vec<SocketAddr>,
    pub config_path: PathBuf,
    /// Puts new configuration generations in force, as a reload does.
    pub handle: mqtls::proxy::ProxyHandle,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl RunningProxy {
    /// Loads `config` with the library (as `mqtls run` does), binds, and serves in a task.
    pub async fn start(config: &ProxyConfig, dir: &Path) -> RunningProxy {
        let path = config.write(dir);
        let loaded = mqtls::load(&path).unwrap_or_else(|e| panic!("config rejected:\n{e}\n---\n{}", config.toml()));
        let metrics = std::sync::Arc::new(mqtls::metrics::Metrics::new(true));
        let proxy = Proxy::bind(&loaded.config, loaded.generation, metrics)
            .await
            .expect("bind");
        let addrs = proxy.local_addrs();
        let handle = proxy.handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(proxy.run(shutdown.clone(), Duration::from_secs(5)));
        RunningProxy {
            addrs,
            config_path: path,
            handle,
            shutdown,
            task: Some(task),
        }
    }

    /// The first (shared) listener.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Stops accepting and waits for open connections (up to the grace period).
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.await.expect("proxy task panicked");
        }
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}
