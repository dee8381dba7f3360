//! The `mqtls` command: parses the CLI, sets up logging and signals, and hands a validated configuration
//! to the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use mqtls::daemon::{Control, Daemon};
use mqtls::systemd::{self, Notifier};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

mod certs_cli;
mod cli_docs;

/// Gives each legacy plain-MQTT device its own mutual-TLS identity at the broker.
///
/// Devices connect to mqtls with plain MQTT (usually on port 1883). mqtls reads the CONNECT packet, picks
/// the device's certificate from the config (by client id, source address and listener), opens a TLS
/// connection to the broker presenting that certificate, and then copies bytes both ways unchanged (the
/// CONNECT's client id, user name or password rewritten first where the device's entry asks for it).
#[derive(Parser)]
#[command(name = "mqtls", version = env!("MQTLS_VERSION"), about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// Configuration file (TOML).
        #[arg(short, long, value_name = "FILE", default_value = "/etc/mqtls/mqtls.toml")]
        config: PathBuf,
        /// Log line format on stderr: text for people and journald, json (one object per line) for log
        /// shippers.
        #[arg(long, value_enum, env = "MQTLS_LOG_FORMAT", default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate the configuration, load every certificate and key, and print the device table.
    ///
    /// Prints one row per device (certificate expiry, flags, match rules, and what it presents to the
    /// broker: its client id, and the user name and password its connect.* rewrite changes) and the
    /// limits in force, and warns about what is risky: a device matched by client id alone, a fallback
    /// that is not narrowed by address and client id, devices without a source rule beside a fallback,
    /// devices that present the same client id to the broker (and so close each other's sessions),
    /// certificates that expire soon, keys others can read. Exits 0 if everything is usable, 1 (after
    /// listing every problem, e.g. an unknown placeholder in a connect.client_id template, or two
    /// devices rewritten to the same client id) if not.
    Check {
        /// Configuration file (TOML).
        #[arg(short, long, value_name = "FILE", default_value = "/etc/mqtls/mqtls.toml")]
        config: PathBuf,
    },
    /// Make and inspect device identities: a private CA, device certificates, CSRs for another CA.
    Certs {
        #[command(subcommand)]
        command: certs_cli::CertsCommand,
    },
    /// Print a completion script for a shell, made from this command's own definitions.
    ///
    /// Example: mqtls completions bash > /etc/bash_completion.d/mqtls
    Completions {
        /// The shell the script is for.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the manual page mqtls(1), or write it and one page per subcommand into a directory.
    ///
    /// Example: mqtls man | man -l -
    Man {
        /// Write mqtls.1, mqtls-run.1, mqtls-certs-issue.1... into DIR (created if missing).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Certs { command } => certs_cli::run(command),
        Command::Completions { shell } => cli_docs::completions(Cli::command(), shell),
        Command::Man { out } => cli_docs::man(Cli::command(), out.as_deref()),
        Command::Run { config, log_format } => {
            init_logging(log_format);
            match run(&config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Text or JSON lines on stderr. When stderr is the journal, each line starts with its sd-daemon priority
/// (`<4>` for a warning...), which journald turns into the entry's priority, and text lines carry no
/// timestamp (journald stamps every entry). JSON keeps its `timestamp` field: it is data for the shipper.
fn init_logging(format: LogFormat) {
    use tracing_subscriber::fmt::format::JsonFields;
    use tracing_subscriber::fmt::{format as event_format, layer};
    use tracing_subscriber::prelude::*;
    type Boxed = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

    let filter = tracing_subscriber::EnvFilter::try_from_env("MQTLS_LOG").unwrap_or_else(|_| "info".into());
    let journal = systemd::stderr_is_journal();
    let colour = !journal && std::io::stderr().is_terminal();
    // A log write that fails (journald restarted, the pipe closed) must cost the line, not the daemon:
    // reporting it would go to the same broken stderr with eprintln!, which panics.
    let base = layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .log_internal_errors(false);
    let json = || {
        event_format()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
    };
    let layer: Boxed = match (format, journal) {
        (LogFormat::Text, false) => Box::new(base),
        (LogFormat::Text, true) => Box::new(base.event_format(JournalPriority(event_format().without_time()))),
        (LogFormat::Json, false) => Box::new(base.event_format(json()).fmt_fields(JsonFields::new())),
        (LogFormat::Json, true) => Box::new(base.event_format(JournalPriority(json())).fmt_fields(JsonFields::new())),
    };
    tracing_subscriber::registry().with(layer).with(filter).init();
}

/// Puts the journald priority prefix in front of another event format.
struct JournalPriority<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for JournalPriority<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        writer.write_str(systemd::journal_priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match mqtls::load(path) {
        Ok(mqtls::Loaded { config, generation, .. }) => {
            let now = SystemTime::now();
            print!("{}", mqtls::inventory::describe(&generation.table, now));
            let warnings = mqtls::inventory::warnings(&generation.table, now).into_iter();
            for w in warnings.chain(mqtls::daemon::descriptor_warning(config.listen.max_connections)) {
                eprintln!("warning: {w}");
            }
            let n = generation.table.devices().len();
            let listeners: Vec<String> = config.all_listen_addresses().iter().map(ToString::to_string).collect();
            let upstream: Vec<String> = config.upstream.addresses.iter().map(ToString::to_string).collect();
            println!(
                "{}: OK: {n} device(s), listening on {}, broker {}",
                path.display(),
                listeners.join(", "),
                upstream.join(", ")
            );
            let l = &config.listen;
            println!(
                "limits: {} connections in all; per address {} open, {} new per second, {} still sending their \
                 CONNECT; a connection silent both ways is closed after {}",
                l.max_connections,
                l.max_connections_per_source,
                l.max_connects_per_source_per_second,
                l.max_pending_per_source,
                humantime::format_duration(l.max_idle)
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            eprintln!("{}: {} problem(s) found", path.display(), errors.0.len());
            ExitCode::FAILURE
        }
    }
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let loaded = match mqtls::load(path) {
        Ok(loaded) => loaded,
        Err(errors) => {
            for e in &errors.0 {
                error!("{e}");
            }
            anyhow::bail!(
                "{}: invalid configuration ({} problem(s)); nothing started",
                path.display(),
                errors.0.len()
            );
        }
    };
    // Before any thread starts: taking the passed sockets clears LISTEN_FDS from the environment.
    let passed = systemd::take_passed_listeners()?;
    let adopted = systemd::match_passed(passed, &loaded.config.all_listen_addresses(), &loaded.config.path)?;
    let grace = loaded.config.listen.shutdown_grace;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let notifier = Notifier::from_env();
        // Handlers first: a signal that arrives once "ready" is logged must stop us cleanly.
        let signals = Signals::install(notifier.clone(), grace).context("cannot install signal handlers")?;
        let shutdown = CancellationToken::new();
        let (reload_requests, reload) = mpsc::channel(1);
        let control = Control {
            shutdown: shutdown.clone(),
            reload,
            notifier,
            adopted,
        };
        let daemon = Daemon::start(loaded, control).await?;
        tokio::spawn(signals.dispatch(shutdown, reload_requests));
        daemon.run().await;
        Ok(())
    })
}

/// SIGTERM (systemd stop) and SIGINT (Ctrl-C) both mean: stop accepting, drain, exit 0. A second one
/// means: stop now. SIGHUP (systemd reload) asks for a reload.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    notifier: Notifier,
    grace: Duration,
}

impl Signals {
    fn install(notifier: Notifier, grace: Duration) -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            notifier,
            grace,
        })
    }

    async fn next_stop(&mut self, reload: &mpsc::Sender<()>) -> &'static str {
        loop {
            tokio::select! {
                _ = self.term.recv() => return "SIGTERM",
                _ = self.int.recv() => return "SIGINT",
                _ = self.hup.recv() => {
                    // A reload already queued will read the files as they are now: one is enough.
                    let _ = reload.try_send(());
                }
            }
        }
    }

    async fn dispatch(mut self, shutdown: CancellationToken, reload: mpsc::Sender<()>) {
        let name = self.next_stop(&reload).await;
        info!(signal = name, grace = ?self.grace, "shutting down: no new connections; open ones may finish");
        self.notifier.stopping(self.grace);
        shutdown.cancel();
        let name = self.next_stop(&reload).await;
        warn!(signal = name, "second signal: stopping now");
        std::process::exit(0);
    }
}
