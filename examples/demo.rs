//! A working mqtls setup on this machine, from nothing: a private CA and certificates (rcgen), a real
//! Mosquitto 2 with mutual TLS and one ACL per device identity (the recipe in `deploy/mosquitto/`), the
//! `mqtls` binary in front of it, and devices that speak plain MQTT to mqtls. An observer subscribed at
//! the broker prints what arrives, and under which identity. Part-way through, one device's certificate
//! is rotated on disk while it is connected, and the metrics endpoint is scraped at the end.
//!
//! Run it with `./scripts/demo.sh` (which installs Mosquitto if needed and builds mqtls). Ctrl-C stops
//! everything. `--seconds N` stops after N seconds and exits non-zero if something did not happen as
//! it should (used by CI).
//!
//! Ctrl-C reaches every process in the terminal's foreground process group. mqtls therefore runs in a
//! process group of its own: the demo must still read its metrics after Ctrl-C, then stop it with SIGTERM
//! as systemd would. (Mosquitto, started by the test harness, does take the Ctrl-C and stops; everything
//! the summary needs from it is in its log file.)

// The integration tests' harness, included whole; the demo uses a small part of it (its broker, PKI and
// clients), so what the tests alone use is allowed to go unused here.
#[allow(dead_code, unused_imports)]
#[path = "../tests/it/common/mod.rs"]
mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::metrics::Scrape;
use common::mqtt_client::{device_v4, device_v5, observer, wait_connack_v4, wait_connack_v5};
use common::{Mosquitto, Pki};
use rumqttc::QoS;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;

const READING_EVERY: Duration = Duration::from_secs(2);

struct Outcome {
    readings: [usize; 2],
    /// boiler-2's readings that arrived after its certificate was rotated.
    readings_after_rotation: usize,
    spoofs_delivered: usize,
    denied_in_broker_log: usize,
    intruder_refused: bool,
    /// mqtls logged a reload that renewed boiler-2.
    rotation_reloaded: bool,
    /// From the metrics endpoint: refusals of unknown devices, and bytes boiler-1 sent.
    scraped: Option<(f64, f64)>,
}

/// When boiler-2's certificate is replaced on disk while it is connected.
const ROTATE_AFTER: Duration = Duration::from_millis(1500);

#[tokio::main]
async fn main() {
    let seconds = parse_seconds();
    match run(seconds).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("demo failed: {e}");
            std::process::exit(1);
        }
    }
}

fn parse_seconds() -> Option<u64> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => None,
        [flag, n] if flag == "--seconds" => Some(n.parse().expect("--seconds takes a number")),
        _ => {
            eprintln!("usage: demo [--seconds N]");
            std::process::exit(2);
        }
    }
}

async fn run(seconds: Option<u64>) -> Result<bool, String> {
    // Before any child starts: from here on a signal stops the demo in order instead of killing it and
    // leaving mqtls (in its own process group) running.
    let mut stop_signals = StopSignals::install().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    println!("== mqtls demo ==");
    let pki = Pki::new();
    // "visitor" is there for you: publish as it with mosquitto_pub while the demo runs.
    let devices = ["boiler-1", "boiler-2", "visitor"].map(|name| pki.client(name));
    println!(
        "[1/4] private CA and device certificates (rcgen) in {}",
        pki.dir().display()
    );
    for d in &devices {
        println!(
            "      {}: {} (key {}, mode 0600)",
            d.cn,
            d.cert.display(),
            d.key.display()
        );
    }

    let broker = Mosquitto::start(&pki).await;
    println!(
        "[2/4] Mosquitto with mutual TLS on {} (require_certificate, use_identity_as_username, ACL: each device only under sensors/<its CN>/)",
        broker.addr()
    );

    let listen = pick_listen_address();
    let config_path = write_config(&pki, &broker, listen, &devices);
    println!(
        "[3/4] mqtls on {listen} -> broker {}; config {}",
        broker.addr(),
        config_path.display()
    );
    let (mut mqtls, log, metrics) = start_mqtls(&config_path).await?;

    println!("[4/4] devices speak plain MQTT to mqtls; an observer subscribed at the broker shows what arrives");
    let mut watch = observer(&pki, &broker, "sensors/#").await;
    let intruder_refused = intruder(listen).await;

    let (tx, mut rx) = mpsc::unbounded_channel();
    let boiler1 = tokio::spawn(device_311("boiler-1", listen, tx.clone()));
    let boiler2 = tokio::spawn(device_5("boiler-2", listen, tx));

    let mut outcome = Outcome {
        readings: [0, 0],
        readings_after_rotation: 0,
        spoofs_delivered: 0,
        denied_in_broker_log: 0,
        intruder_refused,
        rotation_reloaded: false,
        scraped: None,
    };
    let rotate = tokio::time::sleep(ROTATE_AFTER);
    tokio::pin!(rotate);
    let mut rotated = false;
    if seconds.is_none() {
        println!(
            "      try it yourself: mosquitto_pub -h {} -p {} -i visitor -t sensors/visitor/hello -m hi",
            listen.ip(),
            listen.port()
        );
        println!("      and watch it:    curl -s http://{metrics}/metrics | grep ^mqtls_");
        println!("      (Ctrl-C stops the demo)");
    }
    let stop = async {
        let timer = async {
            match seconds {
                Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = timer => {}
            name = stop_signals.next() => println!("{name}: stopping the demo"),
        }
    };
    tokio::pin!(stop);
    let mut shown_identities = 0;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = &mut rotate, if !rotated => {
                rotated = true;
                pki.client("boiler-2");
                println!("[ops] boiler-2's certificate and key replaced on disk (a rotation): mqtls notices, reloads, and boiler-2 stays connected");
            }
            Some(line) = rx.recv() => println!("{line}"),
            Some((topic, payload)) = watch.next_message(Duration::from_secs(3600)) => {
                let text = String::from_utf8_lossy(&payload);
                println!("   observer <- {topic} = {text}");
                match topic.as_str() {
                    t if t.starts_with("sensors/boiler-1/") => outcome.readings[0] += 1,
                    t if t.starts_with("sensors/boiler-2/") && text.starts_with("spoof") => outcome.spoofs_delivered += 1,
                    t if t.starts_with("sensors/boiler-2/") => {
                        outcome.readings[1] += 1;
                        outcome.readings_after_rotation += usize::from(rotated);
                    }
                    _ => {}
                }
                let identities = broker.connected_usernames();
                if identities.len() > shown_identities {
                    for who in &identities[shown_identities..] {
                        println!("   broker: a session authenticated by certificate as {who:?}");
                    }
                    shown_identities = identities.len();
                }
            }
        }
    }

    boiler1.abort();
    boiler2.abort();
    let _ = tokio::join!(boiler1, boiler2);
    outcome.denied_in_broker_log = broker.count_in_log("Denied PUBLISH from boiler-1");
    outcome.rotation_reloaded = log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("configuration reloaded") && l.contains("renewed=boiler-2"));
    match scrape(metrics).await {
        Ok(scrape) => {
            outcome.scraped = scrape
                .value(r#"mqtls_connections_refused_total{reason="unknown_device"}"#)
                .zip(scrape.value(r#"mqtls_bytes_total{device="boiler-1",direction="to_broker"}"#));
        }
        Err(e) => println!("   metrics endpoint: {e}"),
    }
    println!("stopping: SIGTERM to mqtls, then the broker");
    let status = stop_mqtls(&mut mqtls).await?;
    drop(broker);
    let ok = report(&outcome, status.success());
    println!("nothing left running; temporary files removed");
    Ok(ok)
}

fn report(o: &Outcome, mqtls_exit_ok: bool) -> bool {
    let checks = [
        (
            o.readings[0] > 0,
            format!(
                "boiler-1 (MQTT 3.1.1) readings arrived under its own identity: {}",
                o.readings[0]
            ),
        ),
        (
            o.readings[1] > 0,
            format!(
                "boiler-2 (MQTT 5.0) readings arrived under its own identity: {}",
                o.readings[1]
            ),
        ),
        (
            o.spoofs_delivered == 0,
            format!(
                "boiler-1's publishes into boiler-2's topics delivered: {} (the broker's ACL drops them)",
                o.spoofs_delivered
            ),
        ),
        (
            o.denied_in_broker_log > 0,
            format!(
                "broker log: \"Denied PUBLISH from boiler-1\" x {}",
                o.denied_in_broker_log
            ),
        ),
        (
            o.intruder_refused,
            "an unknown device was refused with CONNACK 'identifier rejected'".to_string(),
        ),
        (
            o.rotation_reloaded && o.readings_after_rotation > 0,
            format!(
                "boiler-2's certificate was rotated on disk: mqtls reloaded on its own, boiler-2 kept publishing ({} readings after)",
                o.readings_after_rotation
            ),
        ),
        (
            o.scraped.is_some_and(|(refused, bytes)| refused >= 1.0 && bytes > 0.0),
            match o.scraped {
                Some((refused, bytes)) => format!(
                    "metrics endpoint: refused unknown devices {refused}, bytes boiler-1 sent to the broker {bytes}"
                ),
                None => "metrics endpoint: series missing".to_string(),
            },
        ),
        (mqtls_exit_ok, "mqtls stopped cleanly (exit 0)".to_string()),
    ];
    println!("== summary ==");
    for (ok, what) in &checks {
        println!("  [{}] {what}", if *ok { "ok" } else { "FAILED" });
    }
    checks.iter().all(|(ok, _)| *ok)
}

/// SIGINT (Ctrl-C), SIGTERM, SIGHUP (the terminal closed) and SIGQUIT (Ctrl-\) all stop the demo in order.
struct StopSignals([(Signal, &'static str); 4]);

impl StopSignals {
    fn install() -> std::io::Result<StopSignals> {
        Ok(StopSignals([
            (signal(SignalKind::interrupt())?, "Ctrl-C"),
            (signal(SignalKind::terminate())?, "SIGTERM"),
            (signal(SignalKind::hangup())?, "SIGHUP"),
            (signal(SignalKind::quit())?, "SIGQUIT"),
        ]))
    }

    /// Waits for the next one and names it.
    async fn next(&mut self) -> &'static str {
        let [(int, a), (term, b), (hup, c), (quit, d)] = &mut self.0;
        tokio::select! {
            _ = int.recv() => a,
            _ = term.recv() => b,
            _ = hup.recv() => c,
            _ = quit.recv() => d,
        }
    }
}

/// One scrape of mqtls's `/metrics`; an error (rather than a panic) when it cannot be had, so that the
/// summary is printed whatever happened.
async fn scrape(addr: SocketAddr) -> Result<Scrape, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        s.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .map_err(|_| format!("no answer from {addr} within 5 s"))?
        .map_err(|e| format!("cannot scrape {addr}: {e}"))?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(Scrape(body.to_string())),
        _ => Err(format!(
            "unexpected answer from {addr}: {}",
            text.lines().next().unwrap_or("")
        )),
    }
}

/// 127.0.0.1:1883 like a real gateway, unless something already listens there.
fn pick_listen_address() -> SocketAddr {
    let preferred: SocketAddr = "127.0.0.1:1883".parse().unwrap();
    if TcpListener::bind(preferred).is_ok() {
        return preferred;
    }
    let any = TcpListener::bind("127.0.0.1:0").unwrap();
    any.local_addr().unwrap()
}

fn write_config(pki: &Pki, broker: &Mosquitto, listen: SocketAddr, devices: &[common::ClientCert]) -> PathBuf {
    let mut text = format!(
        "# Written by the mqtls demo.\n[listen]\naddress = \"{listen}\"\nconnect_timeout = \"10s\"\nmax_connections = 1000\n\n\
         [upstream]\naddress = \"127.0.0.1:{}\"\nserver_name = \"localhost\"\nca_file = {:?}\n\n\
         [metrics]\naddress = \"127.0.0.1:0\"\n\n[reload]\nwatch_interval = \"500ms\"\n",
        broker.port(),
        pki.ca_pem_path()
    );
    for d in devices {
        text.push_str(&format!(
            "\n[[device]]\nname = {:?}\nclient_id = {:?}\nsource = \"127.0.0.1\"\ncert = {:?}\nkey = {:?}\n",
            d.cn, d.cn, d.cert, d.key
        ));
    }
    let path = pki.dir().join("mqtls.toml");
    std::fs::write(&path, text).expect("write mqtls.toml");
    path
}

fn mqtls_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MQTLS_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/examples/demo -> target/<profile>/mqtls
    exe.parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("mqtls"))
        .expect("binary path")
}

/// Everything mqtls logged so far.
type Log = Arc<Mutex<Vec<String>>>;

/// Starts `mqtls run`, echoes its log, and waits until it is ready; returns the process, its log and the
/// metrics endpoint's address.
async fn start_mqtls(config: &std::path::Path) -> Result<(Child, Log, SocketAddr), String> {
    let bin = mqtls_binary();
    let mut child = Command::new(&bin)
        .args(["run", "--config"])
        .arg(config)
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start {} (build it with `cargo build --bin mqtls`): {e}",
                bin.display()
            )
        })?;
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let log: Log = Arc::default();
    let keep = log.clone();
    tokio::spawn(async move {
        let mut ready_tx = Some(ready_tx);
        let mut metrics = None;
        while let Ok(Some(line)) = lines.next_line().await {
            println!("   mqtls | {line}");
            let plain = common::daemon::strip_ansi(&line);
            if plain.contains("metrics endpoint") {
                metrics = common::daemon::logged_addr(&plain, "address");
            }
            if plain.contains("mqtls ready") {
                if let (Some(tx), Some(addr)) = (ready_tx.take(), metrics) {
                    let _ = tx.send(addr);
                }
            }
            keep.lock().unwrap().push(plain);
        }
    });
    let metrics = tokio::time::timeout(Duration::from_secs(15), ready_rx)
        .await
        .map_err(|_| "mqtls did not become ready within 15 s".to_string())?
        .map_err(|_| "mqtls exited during start-up (see its log above)".to_string())?;
    Ok((child, log, metrics))
}

async fn stop_mqtls(child: &mut Child) -> Result<std::process::ExitStatus, String> {
    let pid = child.id().ok_or("mqtls already exited")?;
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .map_err(|e| format!("kill: {e}"))?;
    tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .map_err(|_| "mqtls did not stop within 15 s of SIGTERM".to_string())?
        .map_err(|e| e.to_string())
}

async fn intruder(listen: SocketAddr) -> bool {
    let (_c, mut el) = device_v4("intruder-9", listen, Duration::from_secs(30));
    let refused = matches!(
        wait_connack_v4(&mut el).await,
        Err(rumqttc::ConnectionError::ConnectionRefused(
            rumqttc::ConnectReturnCode::BadClientId
        ))
    );
    println!(
        "   intruder-9 (no device entry) -> mqtls: {}",
        if refused {
            "refused with CONNACK 0x02 identifier rejected"
        } else {
            "NOT refused"
        }
    );
    refused
}

async fn device_311(name: &'static str, listen: SocketAddr, say: mpsc::UnboundedSender<String>) {
    let (client, mut el) = device_v4(name, listen, Duration::from_secs(30));
    if let Err(e) = wait_connack_v4(&mut el).await {
        let _ = say.send(format!("   {name}: connection failed: {e:?}"));
        return;
    }
    let _ = say.send(format!("   {name} (MQTT 3.1.1, plain TCP) connected through mqtls"));
    let publish = async {
        let spoof = format!("spoof from {name}");
        let _ = say.send(format!(
            "   {name} -> sensors/boiler-2/temperature = {spoof} (not its own topic)"
        ));
        let _ = client
            .publish("sensors/boiler-2/temperature", QoS::AtLeastOnce, false, spoof)
            .await;
        for n in 0u32.. {
            let reading = format!("{:.1}", 60.0 + f64::from(n % 10) / 2.0);
            let _ = say.send(format!("   {name} -> sensors/{name}/temperature = {reading}"));
            let _ = client
                .publish(format!("sensors/{name}/temperature"), QoS::AtLeastOnce, false, reading)
                .await;
            tokio::time::sleep(READING_EVERY).await;
        }
    };
    // Dropping this task (the demo ending) closes the device's connection.
    tokio::select! {
        _ = publish => {}
        _ = async { while el.poll().await.is_ok() {} } => {}
    }
}

async fn device_5(name: &'static str, listen: SocketAddr, say: mpsc::UnboundedSender<String>) {
    let (client, mut el) = device_v5(name, listen, Duration::from_secs(30));
    if let Err(e) = wait_connack_v5(&mut el).await {
        let _ = say.send(format!("   {name}: connection failed: {e:?}"));
        return;
    }
    let _ = say.send(format!("   {name} (MQTT 5.0, plain TCP) connected through mqtls"));
    let publish = async {
        for n in 0u32.. {
            let reading = format!("{:.1}", 55.0 + f64::from(n % 7) / 2.0);
            let _ = say.send(format!("   {name} -> sensors/{name}/temperature = {reading}"));
            let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
            let _ = client
                .publish(format!("sensors/{name}/temperature"), qos, false, reading)
                .await;
            tokio::time::sleep(READING_EVERY).await;
        }
    };
    tokio::select! {
        _ = publish => {}
        _ = async { while el.poll().await.is_ok() {} } => {}
    }
}
