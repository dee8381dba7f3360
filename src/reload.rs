//! Hot reload: a new configuration generation is built whole from the files on disk and put in force
//! atomically, or not at all.
//!
//! Two things start a reload: SIGHUP (`systemctl reload mqtls`) and, unless `reload.watch = false`, a
//! change to the configuration file or to any file it names (CA bundle, device certificates and keys,
//! the device directory and everything in it). Files are polled rather than watched with inotify: a
//! poll sees renames, replaced symlinks (the `..data` swap of secret mounts) and editors that write in
//! place alike, and costs one `stat` per file per interval. For very large fleets the interval stretches
//! so that polling never takes more than about 1% of a core. A change is acted on once it has held still
//! for one interval, so a certificate and its key copied one after the other give one reload, not a
//! failed one in between.
//!
//! The state of the watched files is taken *before* a configuration is read, never after: a file that
//! changes while thousands of identities load is then still different from that baseline at the next
//! poll, and is reloaded, instead of being taken for already in force.
//!
//! Whatever is wrong with a new generation is logged (file, key, device) and counted in
//! `mqtls_config_reloads_total{result="failure"}`; the old generation keeps serving. Open connections
//! are never touched: they keep the generation they started with.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigErrors};
use crate::device::Device;
use crate::proxy::{Generation, ProxyHandle};
use crate::stamp::Stamp;

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

/// The watched paths and their state, taken just before the files were read.
#[derive(Debug, Clone)]
pub struct Baseline {
    paths: Vec<PathBuf>,
    stamps: Fingerprint,
    /// How long taking the stamps took: what one poll costs.
    cost: Duration,
}

impl Baseline {
    fn take(paths: Vec<PathBuf>) -> Baseline {
        let started = Instant::now();
        let stamps = fingerprint(&paths);
        Baseline {
            paths,
            stamps,
            cost: started.elapsed(),
        }
    }
}

/// A configuration read from disk with every identity it names, and the state its files were in just
/// before they were read.
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// Its identities, ready to serve.
    pub generation: Generation,
    /// What the file watcher compares against.
    pub baseline: Baseline,
}

/// Loads the configuration at `path` as `mqtls run` does at start-up, noting the watched files' state
/// first (blocking: call it before the runtime starts, or from a blocking thread).
pub fn load(path: &Path) -> Result<Loaded, ConfigErrors> {
    let (baseline, loaded) = load_watched(path, &[], None);
    loaded.map(|(config, generation)| Loaded {
        config,
        generation,
        baseline,
    })
}

/// Notes the state of every file the configuration at `path` names, then reads them all, keeping the
/// identities of `previous` whose files have not changed. If the configuration cannot be parsed,
/// `fallback` (the paths watched so far) and `path` are watched.
fn load_watched(
    path: &Path,
    fallback: &[PathBuf],
    previous: Option<&Generation>,
) -> (Baseline, Result<(Config, Generation), ConfigErrors>) {
    with_baseline(
        || match Config::load(path) {
            Ok(c) => watched_paths(&c),
            Err(_) => std::iter::once(path.to_path_buf())
                .chain(fallback.iter().cloned())
                .collect(),
        },
        || {
            let config = Config::load(path)?;
            let generation = Generation::load_after(&config, previous)?;
            Ok((config, generation))
        },
    )
}

/// Stamps the paths `watched` names, then runs `load`: whatever `load` reads is at least as new as the
/// stamps, so a change made during the load shows at the next poll.
fn with_baseline<T>(watched: impl FnOnce() -> Vec<PathBuf>, load: impl FnOnce() -> T) -> (Baseline, T) {
    let baseline = Baseline::take(watched());
    (baseline, load())
}

/// Reloads the configuration of one running proxy.
pub struct Reloader {
    path: PathBuf,
    config: Config,
    proxy: ProxyHandle,
    notify: Notify,
    /// The state the files of the configuration in force (or of the last one tried) were in when read.
    baseline: Baseline,
}

impl Reloader {
    /// A reloader for the proxy serving `config`, read from `path` when its files were as `baseline` says.
    pub fn new(path: &Path, config: Config, baseline: Baseline, proxy: ProxyHandle) -> Reloader {
        Reloader {
            path: path.to_path_buf(),
            config,
            proxy,
            notify: Box::new(|_| {}),
            baseline,
        }
    }

    /// Sets the hook called around every reload.
    pub fn on_reload(mut self, notify: Notify) -> Reloader {
        self.notify = notify;
        self
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
        let watched = self.baseline.paths.clone();
        let in_force = self.proxy.generation();
        // Reading thousands of certificates and keys is blocking work.
        let (baseline, loaded) = tokio::task::spawn_blocking(move || load_watched(&path, &watched, Some(&in_force)))
            .await
            .expect("loading a configuration does not panic");
        // Whatever the outcome: a failed configuration's files are watched too, so that the file it
        // missed is noticed when it arrives.
        self.baseline = baseline;
        let (config, generation) = loaded.map_err(ReloadError::Invalid)?;
        self.warn_fixed_settings(&config);
        let changes = changes(&self.proxy.generation(), &generation);
        let renewed = changes.renewed.clone();
        self.proxy.replace(&config, generation).await?;
        self.proxy.generation().renewed(renewed.iter().map(String::as_str));
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
        let mut watch = Watch::new(self.baseline.clone());
        let mut stretched = Duration::ZERO;
        loop {
            let interval = watch.interval(self.config.reload.watch_interval);
            if interval > self.config.reload.watch_interval && interval > stretched * 2 {
                info!(
                    files = watch.baseline.stamps.len(),
                    poll_ms = watch.baseline.cost.as_millis() as u64,
                    interval = ?interval,
                    "watching this many files: polling less often, to stay under 1% of a core"
                );
                stretched = interval;
            }
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
            let _ = self.reload(trigger).await;
            watch = Watch::new(self.baseline.clone());
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

type Fingerprint = Vec<(PathBuf, Option<Stamp>)>;

/// Every path whose change should trigger a reload: the file itself, the files it names (certificates,
/// keys, password files), and the device directory (whose walk covers the files of its entries).
fn watched_paths(config: &Config) -> Vec<PathBuf> {
    let in_device_dir = |p: &Path| config.device_dir.as_deref().is_some_and(|d| p.starts_with(d));
    let mut paths = vec![config.path.clone()];
    paths.extend(config.upstream.ca_file.clone());
    let fallback = config.fallback.iter().map(|f| &f.identity);
    let identities = config.devices.iter().map(|d| &d.identity).chain(fallback);
    for files in identities {
        paths.extend(
            [&files.cert, &files.key]
                .into_iter()
                .filter(|p| !in_device_dir(p))
                .cloned(),
        );
    }
    let fallback = config.fallback.iter().map(|f| &f.connect);
    let passwords = config.devices.iter().map(|d| &d.connect).chain(fallback);
    for file in passwords.filter_map(|c| c.password_file()) {
        if !in_device_dir(file) && !paths.iter().any(|p| p == file) {
            paths.push(file.to_path_buf());
        }
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
    out.push((path.to_path_buf(), meta.as_ref().map(Stamp::from)));
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

/// Polls the watched paths and reports a change once it has held still for one poll.
struct Watch {
    baseline: Baseline,
    candidate: Option<Fingerprint>,
}

/// Polling may take this share of the time at most: the interval stretches beyond
/// `reload.watch_interval` when one poll takes longer than 1/100 of it.
const MAX_POLL_SHARE: u32 = 100;

impl Watch {
    fn new(baseline: Baseline) -> Watch {
        Watch {
            baseline,
            candidate: None,
        }
    }

    /// The configured interval, or longer if a poll is costly.
    fn interval(&self, configured: Duration) -> Duration {
        configured.max(self.baseline.cost * MAX_POLL_SHARE)
    }

    /// True when the files differ from the baseline and have not changed since the previous poll.
    async fn settled_change(&mut self) -> bool {
        let paths = self.baseline.paths.clone();
        let now = tokio::task::spawn_blocking(move || Baseline::take(paths))
            .await
            .expect("stat does not panic");
        self.baseline.cost = now.cost;
        if now.stamps == self.baseline.stamps {
            self.candidate = None;
            return false;
        }
        if self.candidate.as_ref() == Some(&now.stamps) {
            return true;
        }
        self.candidate = Some(now.stamps);
        false
    }
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

    #[tokio::test]
    async fn a_change_made_while_loading_is_seen_at_the_next_poll() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, "old").unwrap();
        // The load reads the file, then the file changes before the load ends.
        let (baseline, read) = with_baseline(
            || vec![cert.clone()],
            || {
                let read = std::fs::read_to_string(&cert).unwrap();
                std::fs::write(&cert, "new, written during the load").unwrap();
                read
            },
        );
        assert_eq!(read, "old");
        let mut watch = Watch::new(baseline);
        assert!(
            !watch.settled_change().await,
            "first poll: a candidate, not yet settled"
        );
        assert!(
            watch.settled_change().await,
            "the change made during the load is reloaded"
        );
    }

    #[test]
    fn a_costly_poll_stretches_the_interval() {
        let mut b = Baseline::take(Vec::new());
        b.cost = Duration::from_millis(50);
        let w = Watch::new(b);
        assert_eq!(w.interval(Duration::from_secs(2)), Duration::from_secs(5));
        assert_eq!(w.interval(Duration::from_secs(10)), Duration::from_secs(10));
    }

    #[test]
    fn device_directory_files_are_walked_not_listed_twice() {
        let dir = tempfile::tempdir().unwrap();
        let devices = dir.path().join("devices.d");
        std::fs::create_dir_all(devices.join("a")).unwrap();
        let text = format!(
            "[upstream]\naddress = \"b.example:8883\"\n[device_dir]\npath = {:?}\n",
            devices
        );
        for f in ["cert.pem", "key.pem"] {
            std::fs::write(devices.join("a").join(f), "x").unwrap();
        }
        let config = Config::from_toml(&text, &dir.path().join("mqtls.toml")).unwrap();
        let paths = watched_paths(&config);
        assert_eq!(paths, vec![dir.path().join("mqtls.toml"), devices]);
    }

    #[test]
    fn a_password_file_is_watched_once() {
        let dir = tempfile::tempdir().unwrap();
        let text = "[upstream]\naddress = \"b.example:8883\"\n\
                    [[device]]\nname = \"a\"\nclient_id = \"a\"\ncert = \"a.pem\"\nkey = \"a.key\"\n\
                    connect.password_file = \"secret\"\n\
                    [[device]]\nname = \"b\"\nclient_id = \"b\"\ncert = \"b.pem\"\nkey = \"b.key\"\n\
                    connect.password_file = \"secret\"\n";
        let config = Config::from_toml(text, &dir.path().join("mqtls.toml")).unwrap();
        let paths = watched_paths(&config);
        let secret = dir.path().join("secret");
        assert_eq!(paths.iter().filter(|p| **p == secret).count(), 1, "{paths:?}");
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
