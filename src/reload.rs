//! Hot reload: a new configuration generation is built whole from the files on disk and put in force
//! atomically, or not at all.
//!
//! Two things start a reload: SIGHUP (`systemctl reload mqtls`) and, unless `reload.watch = false`, a
//! change to the configuration file or to any file it names (CA bundle, device certificates and keys,
//! the device directory and everything in it). Files are polled rather than watched with inotify: a
//! poll sees renames, replaced symlinks (the `..data` swap of secret mounts) and editors that write in
//! place alike, and costs one `stat` per file per interval. A change is acted on once it has held still
//! for one interval, so a certificate and its key copied one after the other give one reload, not a
//! failed one in between.
//!
//! Whatever is wrong with a new generation is logged (file, key, device) and counted in
//! `mqtls_config_reloads_total{result="failure"}`; the old generation keeps serving. Open connections
//! are never touched: they keep the generation they started with.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigErrors};
use crate::device::Device;
use crate::proxy::{Generation, ProxyHandle};

/// What started a reload, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP (`systemctl reload`).
    Signal,
    /// A watched file changed.
    FileChange,
}

impl Trigger {
    fn label(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::FileChange => "file change",
        }
    }
}

/// Why a reload did not take effect.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The configuration or a file it names is invalid.
    #[error("{0}")]
    Invalid(ConfigErrors),
    /// The new configuration could not be put in force (e.g. a new listen address cannot be bound).
    #[error("{0}")]
    Apply(#[from] crate::proxy::ReplaceError),
}

/// What a successful reload changed, for the log and for tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Devices that are new.
    pub added: Vec<String>,
    /// Devices that are gone.
    pub removed: Vec<String>,
    /// Devices whose certificate is a different one (by serial or expiry).
    pub renewed: Vec<String>,
}

/// Called when a reload starts (`true`) and when it has ended either way (`false`): the hook for
/// systemd's RELOADING=1 / READY=1.
pub type Notify = Box<dyn Fn(bool) + Send + Sync>;

/// Reloads the configuration of one running proxy.
pub struct Reloader {
    path: PathBuf,
    config: Config,
    proxy: ProxyHandle,
    notify: Notify,
    /// The watched files' state taken by [`Reloader::watch_from_now`], if it was called.
    watch: Option<Watch>,
}

impl Reloader {
    /// A reloader for the proxy serving `config`, read from `path`.
    pub fn new(path: &Path, config: Config, proxy: ProxyHandle) -> Reloader {
        Reloader {
            path: path.to_path_buf(),
            config,
            proxy,
            notify: Box::new(|_| {}),
            watch: None,
        }
    }

    /// Takes the watched files' present state as the baseline now rather than when [`Reloader::run`]
    /// first runs, so that a file changed once mqtls has reported ready is sure to be noticed.
    pub async fn watch_from_now(mut self) -> Reloader {
        self.watch = Some(Watch::new(&self.config).await);
        self
    }

    /// Sets the hook called around every reload.
    pub fn on_reload(mut self, notify: Notify) -> Reloader {
        self.notify = notify;
        self
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Reads the configuration again and puts it in force if every part of it is valid. Errors are
    /// logged and counted here; the old configuration then stays in force.
    pub async fn reload(&mut self, trigger: Trigger) -> Result<Changes, ReloadError> {
        (self.notify)(true);
        let result = self.try_reload().await;
        let metrics = self.proxy.metrics();
        match &result {
            Ok(changes) => {
                metrics.reloaded(true);
                info!(
                    trigger = trigger.label(),
                    devices = self.config.devices.len(),
                    added = %changes.added.join(","),
                    removed = %changes.removed.join(","),
                    renewed = %changes.renewed.join(","),
                    "configuration reloaded"
                );
            }
            Err(e) => {
                metrics.reloaded(false);
                if let ReloadError::Invalid(errors) = e {
                    for problem in &errors.0 {
                        error!(trigger = trigger.label(), "{problem}");
                    }
                }
                error!(
                    trigger = trigger.label(),
                    error = %e,
                    "configuration NOT reloaded; the previous configuration stays in force"
                );
            }
        }
        (self.notify)(false);
        result
    }

    async fn try_reload(&mut self) -> Result<Changes, ReloadError> {
        let path = self.path.clone();
        // Reading thousands of certificates and keys is blocking work.
        let loaded = tokio::task::spawn_blocking(move || {
            let config = Config::load(&path)?;
            let generation = Generation::load(&config)?;
            Ok::<_, ConfigErrors>((config, generation))
        })
        .await
        .expect("loading a configuration does not panic");
        let (config, generation) = loaded.map_err(ReloadError::Invalid)?;
        self.warn_fixed_settings(&config);
        let changes = changes(&self.proxy.generation(), &generation);
        self.proxy.replace(&config, generation).await?;
        self.config = config;
        Ok(changes)
    }

    /// Settings that are read once at start-up.
    fn warn_fixed_settings(&self, new: &Config) {
        if new.metrics != self.config.metrics {
            warn!("[metrics] changed: the metrics endpoint keeps its settings until mqtls restarts");
        }
        if new.listen.shutdown_grace != self.config.listen.shutdown_grace {
            warn!("listen.shutdown_grace changed: the grace read at start applies until mqtls restarts");
        }
    }

    /// Reloads on every message from `signals` and, if the configuration asks for it, when a watched
    /// file changes; returns when `shutdown` is cancelled.
    pub async fn run(mut self, mut signals: mpsc::Receiver<()>, shutdown: CancellationToken) {
        let mut watch = match self.watch.take() {
            Some(w) => w,
            None => Watch::new(&self.config).await,
        };
        loop {
            let interval = self.config.reload.watch_interval;
            let trigger = tokio::select! {
                _ = shutdown.cancelled() => return,
                s = signals.recv() => match s {
                    Some(()) => Trigger::Signal,
                    None => return,
                },
                _ = tokio::time::sleep(interval), if self.config.reload.watch => {
                    if !watch.settled_change().await {
                        continue;
                    }
                    Trigger::FileChange
                }
            };
            if trigger == Trigger::FileChange {
                info!("a watched file changed; reloading");
            }
            let result = self.reload(trigger).await;
            // After a failure, watch what the rejected configuration names too, so that adding the file it
            // missed is noticed.
            let named = match &result {
                Ok(_) => watched_paths(&self.config),
                Err(_) => Config::load(&self.path)
                    .map(|c| watched_paths(&c))
                    .unwrap_or_else(|_| watched_paths(&self.config)),
            };
            watch.rebase(named).await;
        }
    }
}

fn changes(old: &Generation, new: &Generation) -> Changes {
    let by_name = |g: &Generation| -> HashMap<Arc<str>, Arc<Device>> {
        g.table.all().map(|d| (d.name.clone(), d.clone())).collect()
    };
    let (before, after) = (by_name(old), by_name(new));
    let mut c = Changes::default();
    for d in new.table.all() {
        match before.get(&d.name) {
            None => c.added.push(d.name.to_string()),
            Some(o) => {
                let (a, b) = (&o.identity.summary, &d.identity.summary);
                if a.serial != b.serial || a.not_after != b.not_after || a.issuer != b.issuer {
                    c.renewed.push(d.name.to_string());
                }
            }
        }
    }
    for o in old.table.all() {
        if !after.contains_key(&o.name) {
            c.removed.push(o.name.to_string());
        }
    }
    c
}

/// The state of one watched path: enough to see a rewrite, a rename over it, or a replaced symlink.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
    changed: i64,
    changed_ns: i64,
}

type Fingerprint = Vec<(PathBuf, Option<Stamp>)>;

/// Every path whose change should trigger a reload: the file itself, the files it names, and the
/// device directory with each entry and the files in it.
fn watched_paths(config: &Config) -> Vec<PathBuf> {
    let mut paths = vec![config.path.clone()];
    paths.extend(config.upstream.ca_file.clone());
    for d in &config.devices {
        paths.push(d.identity.cert.clone());
        paths.push(d.identity.key.clone());
    }
    if let Some(f) = &config.fallback {
        paths.push(f.cert.clone());
        paths.push(f.key.clone());
    }
    paths.extend(config.device_dir.clone());
    paths
}

/// Stats every path; a directory is listed two levels deep (the device directory's entries and their
/// files), so that a new device, a removed one, or a certificate dropped next to a pending key are seen.
fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    let mut out = Vec::with_capacity(paths.len());
    for p in paths {
        stamp_tree(p, 2, &mut out);
    }
    out
}

fn stamp_tree(path: &Path, depth: u8, out: &mut Fingerprint) {
    let meta = std::fs::metadata(path).ok();
    let is_dir = meta.as_ref().is_some_and(|m| m.is_dir());
    out.push((path.to_path_buf(), meta.as_ref().map(stamp)));
    if !is_dir || depth == 0 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(path) else { return };
    let mut children: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    children.sort();
    for c in children {
        stamp_tree(&c, depth - 1, out);
    }
}

fn stamp(m: &std::fs::Metadata) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    Stamp {
        len: m.len(),
        modified: m.modified().ok(),
        inode: m.ino(),
        changed: m.ctime(),
        changed_ns: m.ctime_nsec(),
    }
}

/// Polls the watched paths and reports a change once it has held still for one poll.
struct Watch {
    paths: Vec<PathBuf>,
    in_force: Fingerprint,
    candidate: Option<Fingerprint>,
}

impl Watch {
    async fn new(config: &Config) -> Watch {
        let paths = watched_paths(config);
        let in_force = take(paths.clone()).await;
        Watch {
            paths,
            in_force,
            candidate: None,
        }
    }

    /// True when the files differ from the last reload and have not changed since the previous poll.
    async fn settled_change(&mut self) -> bool {
        let now = take(self.paths.clone()).await;
        if now == self.in_force {
            self.candidate = None;
            return false;
        }
        if self.candidate.as_ref() == Some(&now) {
            return true;
        }
        self.candidate = Some(now);
        false
    }

    /// After a reload (either way): watch `paths` and take their present state as the baseline.
    async fn rebase(&mut self, paths: Vec<PathBuf>) {
        self.in_force = take(paths.clone()).await;
        self.paths = paths;
        self.candidate = None;
    }
}

async fn take(paths: Vec<PathBuf>) -> Fingerprint {
    tokio::task::spawn_blocking(move || fingerprint(&paths))
        .await
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewritten_file_changes_the_fingerprint_and_a_new_entry_shows() {
        let dir = tempfile::tempdir().unwrap();
        let devices = dir.path().join("devices.d");
        std::fs::create_dir_all(devices.join("a")).unwrap();
        std::fs::write(devices.join("a/cert.pem"), "one").unwrap();
        let paths = vec![devices.clone()];
        let before = fingerprint(&paths);
        assert_eq!(before, fingerprint(&paths), "nothing changed");

        std::fs::write(devices.join("a/cert.pem"), "two!").unwrap();
        let rewritten = fingerprint(&paths);
        assert_ne!(before, rewritten);

        std::fs::create_dir_all(devices.join("b")).unwrap();
        std::fs::write(devices.join("b/key.pem"), "k").unwrap();
        let added = fingerprint(&paths);
        assert!(added.iter().any(|(p, _)| p.ends_with("b/key.pem")));
    }

    #[test]
    fn a_missing_file_is_part_of_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cert.pem");
        let paths = vec![f.clone()];
        let missing = fingerprint(&paths);
        assert_eq!(missing[0].1, None);
        std::fs::write(&f, "x").unwrap();
        assert_ne!(missing, fingerprint(&paths));
    }
}
