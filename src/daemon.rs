//! The whole daemon, as `mqtls run` runs it once its configuration is loaded: the proxy on its listeners,
//! the metrics endpoint, the reloader, systemd's notifications and watchdog.
//!
//! The binary keeps what belongs to a process (the CLI, logging, signals, the runtime) and hands this
//! module plain values: a [`Loaded`] configuration, the sockets systemd passed, a shutdown token and a
//! channel of reload requests. Tests run the same code in-process.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::proxy::{Proxy, ProxyHandle};
use crate::reload::{Loaded, Reloader};
use crate::systemd::{self, Notifier};

/// How a running daemon is told to reload and to stop, and how it reports to systemd.
pub struct Control {
    /// Cancelled to stop: no new connections; open ones get `listen.shutdown_grace` to finish.
    pub shutdown: CancellationToken,
    /// One message per reload request (SIGHUP).
    pub reload: mpsc::Receiver<()>,
    /// READY/RELOADING/STOPPING and the watchdog; [`Notifier::from_env`] outside systemd does nothing.
    pub notifier: Notifier,
    /// Listening sockets systemd passed (socket activation), each with the configured address it serves.
    pub adopted: Vec<(SocketAddr, std::net::TcpListener)>,
}

/// A daemon whose sockets are bound and whose helpers run; [`Daemon::run`] serves.
pub struct Daemon {
    proxy: Proxy,
    metrics_address: Option<SocketAddr>,
    metrics_stop: CancellationToken,
    shutdown: CancellationToken,
    grace: std::time::Duration,
    notifier: Notifier,
}

impl Daemon {
    /// Binds the device listeners and the metrics endpoint, and starts the reloader. Call from within a
    /// tokio runtime.
    pub async fn start(loaded: Loaded, control: Control) -> anyhow::Result<Daemon> {
        let Loaded {
            config,
            generation,
            baseline,
        } = loaded;
        let path = config.path.clone();
        let metrics = Arc::new(Metrics::new(config.metrics.as_ref().is_none_or(|m| m.device_labels)));
        let proxy = Proxy::bind_adopting(&config, generation, metrics.clone(), control.adopted).await?;
        let metrics_stop = CancellationToken::new();
        let mut metrics_address = None;
        if let Some(m) = &config.metrics {
            let listener = TcpListener::bind(m.address)
                .await
                .with_context(|| format!("{}: `metrics.address`: cannot listen on {}", path.display(), m.address))?;
            let local = listener.local_addr()?;
            info!(address = %local, "metrics endpoint: GET http://{local}/metrics");
            tokio::spawn(crate::metrics::serve(listener, metrics, metrics_stop.clone()));
            metrics_address = Some(local);
        }
        let hook = reload_hook(control.notifier.clone(), proxy.handle(), control.shutdown.clone());
        let grace = config.listen.shutdown_grace;
        if let Some(w) = descriptor_warning(config.listen.max_connections) {
            warn!("{w}");
        }
        let reloader = Reloader::new(&path, config, baseline, proxy.handle()).on_reload(hook);
        tokio::spawn(reloader.run(control.reload, control.shutdown.clone()));
        Ok(Daemon {
            proxy,
            metrics_address,
            metrics_stop,
            shutdown: control.shutdown,
            grace,
            notifier: control.notifier,
        })
    }

    /// The device listeners' addresses (a port 0 in the configuration shows its real port here).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.proxy.local_addrs()
    }

    /// The metrics endpoint's address, if one is configured.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics_address
    }

    /// A handle to the running proxy (its generation, its metrics; reloads).
    pub fn handle(&self) -> ProxyHandle {
        self.proxy.handle()
    }

    /// Says READY to systemd (and feeds its watchdog, when it asks for one) and serves until the shutdown
    /// token is cancelled, then drains.
    pub async fn run(self) {
        let handle = self.proxy.handle();
        let addrs: Vec<String> = handle.local_addrs().iter().map(ToString::to_string).collect();
        let devices = handle.generation().table.devices().len();
        info!(listen = %addrs.join(","), devices, version = env!("CARGO_PKG_VERSION"), "mqtls ready");
        self.notifier.ready(&serving_status(&handle));
        // After READY: systemd only watches a service that has said it is ready.
        if let Some(interval) = systemd::watchdog_interval() {
            tokio::spawn(systemd::feed_watchdog(self.notifier.clone(), interval));
        }
        self.proxy.run(self.shutdown, self.grace).await;
        self.metrics_stop.cancel();
        info!("stopped");
    }
}

/// What `systemctl status` shows while mqtls serves.
fn serving_status(proxy: &ProxyHandle) -> String {
    let addrs: Vec<String> = proxy.local_addrs().iter().map(ToString::to_string).collect();
    let devices = proxy.generation().table.devices().len();
    format!("serving {devices} device(s) on {}", addrs.join(","))
}

/// RELOADING=1 when a reload starts (SIGHUP or a file change), READY=1 when it has ended, whatever the
/// outcome. Once stopping, a reload that ends must not say READY=1 again after STOPPING=1.
fn reload_hook(notifier: Notifier, proxy: ProxyHandle, shutdown: CancellationToken) -> crate::reload::Notify {
    Box::new(move |starting| {
        if shutdown.is_cancelled() {
            return;
        }
        if starting {
            notifier.reloading();
        } else {
            notifier.ready(&serving_status(&proxy));
        }
    })
}

/// Each proxied connection holds two file descriptors; warns when the process limit cannot cover
/// `max_connections` (the accept loop would then fail with EMFILE instead of answering "busy").
pub fn descriptor_warning(max_connections: usize) -> Option<String> {
    let soft = crate::metrics::process::open_files_limit()? as usize;
    let needed = 2 * max_connections + 64;
    (soft < needed).then(|| {
        format!(
            "listen.max_connections = {max_connections} needs about {needed} open files, but the limit is {soft}; \
             raise it (systemd: LimitNOFILE={needed}; shell: ulimit -n {needed}) or lower max_connections"
        )
    })
}
