//! The set-up that most tests share, in one expression: a throwaway PKI, a real Mosquitto with mutual TLS
//! (the shipped recipe), and mqtls in front of it with some devices, each with its own certificate, run
//! in-process ([`Scenario::start`]) or as `mqtls run` ([`Scenario::spawn`]).
//!
//! ```ignore
//! let setup = Scenario::new().device("boiler-1").start().await;
//! device_v4("boiler-1", setup.proxy.addr(), keep_alive);
//! ```
//!
//! Keep the whole [`Running`] (or [`Spawned`]) while the test runs: taking one field out of it in a
//! `let` pattern drops the others at once, the broker and the PKI's files included.

use std::net::SocketAddr;

use super::daemon::Daemon;
use super::mosquitto::{deploy_acl, deploy_conf, Mosquitto};
use super::pki::{ClientCert, Pki};
use super::proxy::{DeviceEntry, ProxyConfig, RunningProxy};

type EntryFn = Box<dyn FnOnce(DeviceEntry) -> DeviceEntry>;
type ConfigFn = Box<dyn FnOnce(&Pki, &mut ProxyConfig)>;

/// What to set up; nothing runs until [`Scenario::start`] or [`Scenario::spawn`].
#[derive(Default)]
pub struct Scenario {
    broker_conf: String,
    devices: Vec<(String, EntryFn)>,
    configure: Vec<ConfigFn>,
}

/// A PKI, a broker and mqtls serving in the test's runtime.
pub struct Running {
    pub pki: Pki,
    pub broker: Mosquitto,
    pub proxy: RunningProxy,
}

/// A PKI, a broker and `mqtls run` as a subprocess, ready.
pub struct Spawned {
    pub pki: Pki,
    pub broker: Mosquitto,
    pub daemon: Daemon,
    /// The address of the first (shared) listener, from the "mqtls ready" line.
    pub addr: SocketAddr,
    /// The devices' certificates, in the order they were added.
    pub devices: Vec<ClientCert>,
}

impl Scenario {
    pub fn new() -> Scenario {
        Scenario::default()
    }

    /// A device with its own certificate (CN `cn`), matched by the client id `cn` alone.
    pub fn device(self, cn: &str) -> Scenario {
        self.device_with(cn, |entry| entry)
    }

    /// Like [`Scenario::device`], with its configuration entry changed by `entry` (a source rule, another
    /// client id, a listener of its own).
    pub fn device_with(mut self, cn: &str, entry: impl FnOnce(DeviceEntry) -> DeviceEntry + 'static) -> Scenario {
        self.devices.push((cn.to_string(), Box::new(entry)));
        self
    }

    /// Changes mqtls's configuration once the devices are in it; the PKI is there for the files it names.
    pub fn configure(mut self, change: impl FnOnce(&Pki, &mut ProxyConfig) + 'static) -> Scenario {
        self.configure.push(Box::new(change));
        self
    }

    /// Directives appended to the shipped Mosquitto recipe (e.g. `max_keepalive 10`).
    pub fn broker_conf(mut self, directives: &str) -> Scenario {
        self.broker_conf.push_str(directives);
        self.broker_conf.push('\n');
        self
    }

    /// Starts the broker and mqtls in-process.
    pub async fn start(self) -> Running {
        let (pki, broker, config, _) = self.prepare().await;
        let proxy = RunningProxy::start(&config, pki.dir()).await;
        Running { pki, broker, proxy }
    }

    /// Starts the broker and `mqtls run`, and waits until it is ready.
    pub async fn spawn(self) -> Spawned {
        let (pki, broker, config, devices) = self.prepare().await;
        let daemon = Daemon::spawn(&config.write(pki.dir()));
        let addr = daemon.ready().await;
        Spawned {
            pki,
            broker,
            daemon,
            addr,
            devices,
        }
    }

    async fn prepare(self) -> (Pki, Mosquitto, ProxyConfig, Vec<ClientCert>) {
        let pki = Pki::new();
        let broker = if self.broker_conf.is_empty() {
            Mosquitto::start(&pki).await
        } else {
            let server = pki.server("mosquitto", &["localhost", "127.0.0.1"]);
            let conf = format!("{}\n{}", deploy_conf(), self.broker_conf);
            Mosquitto::start_custom(&pki, &server, &conf, &deploy_acl()).await
        };
        let mut config = ProxyConfig::new(&pki, broker.addr());
        let mut devices = Vec::new();
        for (cn, entry) in self.devices {
            let cert = pki.client(&cn);
            config = config.device(entry(DeviceEntry::new(&cert)));
            devices.push(cert);
        }
        for change in self.configure {
            change(&pki, &mut config);
        }
        (pki, broker, config, devices)
    }
}
