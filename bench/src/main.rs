//! mqtls-bench: runs mqtls, stunnel, HAProxy, socat and direct TLS in turn in front of the same kind of
//! upstream (a real Mosquitto 2 with mutual TLS, fresh for each contender), measures, and reports figures
//! and ratios. See bench/README.md.

mod broker;
mod common;
mod contender;
mod measure;
mod net;
mod process;
mod procfs;
mod report;
mod sink;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use broker::{Broker, BrokerFiles};
use common::pki::Pki;
use contender::{Kind, Running, Setup};
use net::Target;
use sink::Sinks;

/// The measurements, in priority order.
pub const MEASUREMENTS: [&str; 6] = ["memory", "latency", "setup", "storm", "throughput", "cpu"];

/// How big each measurement is.
#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: &'static str,
    pub mem_ns: Vec<usize>,
    pub settle: Duration,
    pub lat_warmup: usize,
    pub lat_count: usize,
    pub lat_sizes: Vec<usize>,
    /// Round trips through one target before the next target's turn.
    pub lat_block: usize,
    pub setup_in_flight: usize,
    /// Set-ups through one target before the next target's turn, and how many turns each gets.
    pub setup_window: Duration,
    pub setup_rounds: usize,
    pub storm_devices: usize,
    pub storm_limit: Duration,
    /// Storms per contender (each with a fresh broker and contender); the median is reported.
    pub storm_rounds: usize,
    pub bulk_bytes: u64,
    pub bulk_runs: usize,
    pub cpu_devices: usize,
    pub cpu_rate: f64,
    pub cpu_messages: u64,
    /// The time limit of each storm, memory and CPU step.
    pub step_limit: Duration,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            mode: "full",
            mem_ns: vec![1000, 9000],
            settle: Duration::from_secs(3),
            lat_warmup: 500,
            lat_count: 10_000,
            lat_sizes: vec![32, 1024],
            lat_block: 50,
            setup_in_flight: 16,
            setup_window: Duration::from_secs(1),
            setup_rounds: 8,
            storm_devices: 5000,
            storm_limit: Duration::from_secs(120),
            storm_rounds: 3,
            bulk_bytes: 256 << 20,
            bulk_runs: 5,
            cpu_devices: 100,
            cpu_rate: 20_000.0,
            cpu_messages: 400_000,
            step_limit: Duration::from_secs(300),
        }
    }

    fn smoke() -> Plan {
        Plan {
            mode: "smoke",
            mem_ns: vec![20, 50],
            settle: Duration::from_millis(300),
            lat_warmup: 20,
            lat_count: 200,
            lat_sizes: vec![32, 1024],
            lat_block: 20,
            setup_in_flight: 4,
            setup_window: Duration::from_millis(300),
            setup_rounds: 2,
            storm_devices: 50,
            storm_limit: Duration::from_secs(30),
            storm_rounds: 1,
            bulk_bytes: 4 << 20,
            bulk_runs: 1,
            cpu_devices: 5,
            cpu_rate: 5_000.0,
            cpu_messages: 2_000,
            step_limit: Duration::from_secs(60),
        }
    }
}

struct Args {
    plan: Plan,
    only: Vec<Kind>,
    measurements: Vec<&'static str>,
    json: PathBuf,
    markdown: Option<PathBuf>,
    repo: PathBuf,
    broker_without_nodelay: bool,
    from_json: Option<PathBuf>,
}

const USAGE: &str = "usage: mqtls-bench [--mode full|smoke] [--only mqtls,stunnel,haproxy,socat,direct]
                   [--skip memory,latency,setup,storm,throughput,cpu] [--json PATH] [--markdown PATH|-] [--broker-without-nodelay]
                   [--memory-n 1000,9000]
                   [--from-json PATH]   (no measuring: the report of an earlier run's JSON)";

fn parse_args() -> Result<Args> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ has a parent")
        .to_path_buf();
    let mut mode = "full".to_string();
    let mut only = Kind::ALL.to_vec();
    let mut skip: Vec<String> = Vec::new();
    let mut json_path = None;
    let mut markdown = None;
    let mut broker_without_nodelay = false;
    let mut from_json = None;
    let mut memory_n: Option<Vec<usize>> = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value\n{USAGE}"));
        match a.as_str() {
            "--mode" => mode = value()?,
            "--only" => {
                only = value()?
                    .split(',')
                    .map(|s| Kind::parse(s.trim()).with_context(|| format!("unknown contender {s:?}")))
                    .collect::<Result<_>>()?
            }
            "--skip" => skip = value()?.split(',').map(|s| s.trim().to_owned()).collect(),
            "--json" => json_path = Some(PathBuf::from(value()?)),
            "--markdown" => markdown = Some(value()?),
            "--broker-without-nodelay" => broker_without_nodelay = true,
            // Once "add set_tcp_nodelay unless told not to"; the recipe now sets it, so the broker always
            // runs as shipped. Still accepted for scripts that pass it.
            "--broker-as-shipped" => {}
            "--from-json" => from_json = Some(PathBuf::from(value()?)),
            "--memory-n" => {
                memory_n = Some(
                    value()?
                        .split(',')
                        .map(|s| {
                            s.trim()
                                .parse()
                                .with_context(|| format!("--memory-n: {s:?} is not a count"))
                        })
                        .collect::<Result<_>>()?,
                )
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    for s in &skip {
        if !MEASUREMENTS.contains(&s.as_str()) {
            bail!("unknown measurement {s:?} (one of {MEASUREMENTS:?})");
        }
    }
    let mut plan = match mode.as_str() {
        "full" => Plan::full(),
        "smoke" => Plan::smoke(),
        m => bail!("unknown mode {m:?}\n{USAGE}"),
    };
    if let Some(ns) = memory_n {
        plan.mem_ns = ns;
    }
    let smoke = plan.mode == "smoke";
    let json = json_path.unwrap_or_else(|| {
        if smoke {
            repo.join("bench/out/smoke.json")
        } else {
            repo.join("bench/results/results.json")
        }
    });
    // Smoke runs never write BENCHMARKS.md unless asked to.
    let markdown = match markdown.as_deref() {
        Some("-") => None,
        Some(p) => Some(PathBuf::from(p)),
        None if smoke => None,
        None => Some(repo.join("BENCHMARKS.md")),
    };
    Ok(Args {
        plan,
        only,
        measurements: MEASUREMENTS
            .into_iter()
            .filter(|m| !skip.iter().any(|s| s == m))
            .collect(),
        json,
        markdown,
        repo,
        broker_without_nodelay,
        from_json,
    })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if let Some(path) = &args.from_json {
        let results: Value = serde_json::from_str(&fs::read_to_string(path)?)?;
        println!("{}", report::terminal(&results));
        if let Some(md) = &args.markdown {
            fs::write(md, report::markdown(&results))?;
            println!("Markdown: {}", md.display());
        }
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let results = rt.block_on(run(&args))?;
    let failed = report::failures(&results);
    let json_text = serde_json::to_string_pretty(&results)?;
    if let Some(dir) = args.json.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&args.json, json_text + "\n").with_context(|| format!("write {}", args.json.display()))?;
    println!("{}", report::terminal(&results));
    println!("JSON: {}", args.json.display());
    if let Some(md) = &args.markdown {
        fs::write(md, report::markdown(&results)).with_context(|| format!("write {}", md.display()))?;
        println!("Markdown: {}", md.display());
    }
    if !failed.is_empty() {
        eprintln!("measurements that did not complete:");
        for f in &failed {
            eprintln!("  {f}");
        }
        std::process::exit(1);
    }
    Ok(())
}

struct Env {
    setup: Setup,
    ca: PathBuf,
    broker_cert: PathBuf,
    broker_key: PathBuf,
    client_config: Arc<rustls::ClientConfig>,
    sinks: Option<Sinks>,
    broker_without_nodelay: bool,
    _pki: Pki,
}

impl Env {
    /// The broker recipe's files for this run; `tickets`: whether it issues TLS session tickets.
    fn broker_files(&self, tickets: bool) -> BrokerFiles<'_> {
        BrokerFiles {
            repo: &self.setup.repo,
            ca: &self.ca,
            cert: &self.broker_cert,
            key: &self.broker_key,
            without_nodelay: self.broker_without_nodelay,
            tickets,
        }
    }
}

async fn run(args: &Args) -> Result<Value> {
    let started = Instant::now();
    let plan = &args.plan;
    let mqtls_bin = args.repo.join("target/release/mqtls");
    if !mqtls_bin.is_file() {
        bail!(
            "{} is missing: run `cargo build --release --bin mqtls` at the repository root (bench/run does)",
            mqtls_bin.display()
        );
    }
    let pki = Pki::new();
    let client = pki.client(measure::DEVICE_CN);
    let broker_cert = pki.server("mosquitto", &["localhost", "127.0.0.1"]);
    let sink_cert = pki.server("sink", &["localhost", "127.0.0.1"]);
    let combined = pki.dir().join("client-combined.pem");
    common::pki::write_file(
        &combined,
        format!(
            "{}{}",
            fs::read_to_string(&client.cert)?,
            fs::read_to_string(&client.key)?
        )
        .as_bytes(),
        0o600,
    );
    let work = pki.dir().join("work");
    fs::create_dir_all(&work)?;
    let sinks = if args.measurements.contains(&"throughput") {
        Some(Sinks::start(pki.ca_pem_path(), &sink_cert.cert, &sink_cert.key).await?)
    } else {
        None
    };
    let env = Env {
        setup: Setup {
            repo: args.repo.clone(),
            dir: work,
            mqtls_bin,
            ca: pki.ca_pem_path().to_path_buf(),
            cert: client.cert.clone(),
            key: client.key.clone(),
            combined,
            max_connections: plan.mem_ns.iter().copied().max().unwrap_or(0).max(plan.storm_devices) + 500,
        },
        ca: pki.ca_pem_path().to_path_buf(),
        broker_cert: broker_cert.cert.clone(),
        broker_key: broker_cert.key.clone(),
        client_config: pki.rustls_client_config(Some(&client)),
        sinks,
        broker_without_nodelay: args.broker_without_nodelay,
        _pki: pki,
    };

    let mut results: BTreeMap<Kind, Map<String, Value>> = args.only.iter().map(|&k| (k, Map::new())).collect();
    if args.measurements.iter().any(|m| matches!(*m, "latency" | "setup")) {
        paired_phase(args, &env, &mut results).await;
    }
    for &kind in &args.only {
        eprintln!("== {kind}");
        let out = results.get_mut(&kind).expect("every kind has its map");
        run_contender(kind, args, &env, out).await;
    }
    if args.measurements.contains(&"storm") {
        storm_phase(args, &env, &mut results).await;
    }
    let mut baseline = Map::new();
    if let Some(sinks) = &env.sinks {
        throughput_phase(args, &env, sinks, &mut results, &mut baseline).await;
    }
    let contenders: Map<String, Value> = results
        .into_iter()
        .map(|(k, m)| (k.name().to_owned(), Value::Object(m)))
        .collect();
    Ok(json!({
        "meta": meta(args, started.elapsed()),
        "measurements": args.measurements,
        "contenders": contenders,
        "plain_tcp": baseline,
    }))
}

/// Every contender at once, each in front of the same broker, so that their measurements can rotate over
/// them: latency and set-up rate with TLS session resumption (a broker that issues session tickets, as
/// shipped), then set-up rate without (a broker that issues none, so that nobody can resume).
async fn paired_phase(args: &Args, env: &Env, results: &mut BTreeMap<Kind, Map<String, Value>>) {
    let plan = &args.plan;
    let wants = |m: &str| args.measurements.contains(&m);
    let mut modes = vec![(true, "with session tickets")];
    if wants("setup") {
        modes.push((false, "without session tickets"));
    }
    for (tickets, label) in modes {
        eprintln!("== all contenders, one broker {label}");
        let steps: Vec<&str> = if tickets {
            ["latency", "setup"].into_iter().filter(|m| wants(m)).collect()
        } else {
            vec!["setup"]
        };
        let key = |m: &str| {
            if tickets {
                m.to_owned()
            } else {
                format!("{m}_no_resumption")
            }
        };
        let lineup = match Lineup::start(&args.only, env, tickets).await {
            Ok(l) => l,
            Err(e) => {
                let msg = format!("{e:#}");
                eprintln!("  FAILED to start the broker: {msg}");
                for out in results.values_mut() {
                    for m in &steps {
                        out.insert(key(m), json!({ "error": format!("could not start: {msg}") }));
                    }
                }
                continue;
            }
        };
        for (kind, e) in &lineup.failed {
            for m in &steps {
                results.entry(*kind).or_default().insert(key(m), json!({ "error": e }));
            }
        }
        tokio::time::sleep(plan.settle).await;
        for m in &steps {
            eprintln!("  {} ...", key(m));
            let t0 = Instant::now();
            let figures = match *m {
                "latency" => {
                    measure::latency(
                        &lineup.targets,
                        &plan.lat_sizes,
                        plan.lat_warmup,
                        plan.lat_count,
                        plan.lat_block,
                    )
                    .await
                }
                _ => {
                    measure::setup_rate(
                        &lineup.targets,
                        plan.setup_in_flight,
                        plan.setup_window,
                        plan.setup_rounds,
                    )
                    .await
                }
            };
            eprintln!("    done in {:.1} s", t0.elapsed().as_secs_f64());
            for (name, r) in figures {
                let kind = Kind::parse(&name).expect("targets are named after kinds");
                results.entry(kind).or_default().insert(key(m), outcome(r));
            }
        }
        lineup.check_alive(results, &steps.iter().map(|m| key(m)).collect::<Vec<_>>());
    }
}

/// One broker and every contender in front of it (direct: the broker itself).
struct Lineup {
    broker: Broker,
    running: Vec<(Kind, Running)>,
    targets: Vec<measure::Entrant>,
    /// Contenders that could not start, and why.
    failed: Vec<(Kind, String)>,
}

impl Lineup {
    async fn start(kinds: &[Kind], env: &Env, tickets: bool) -> Result<Lineup> {
        let files = env.broker_files(tickets);
        let tag = if tickets { "paired" } else { "paired-no-tickets" };
        let broker = Broker::start(&files, &env.setup.dir, tag).await?;
        let mut lineup = Lineup {
            broker,
            running: Vec::new(),
            targets: Vec::new(),
            failed: Vec::new(),
        };
        let broker_addr = lineup.broker.addr;
        for &kind in kinds {
            let checked = async {
                let (r, target) = front(kind, broker_addr, env, tag).await?;
                check(kind, &target, r.as_ref()).await?;
                anyhow::Ok((r, target))
            }
            .await;
            match checked {
                Ok((r, target)) => {
                    lineup.targets.push(measure::Entrant {
                        name: kind.name().to_owned(),
                        target,
                        pgid: r.as_ref().map(|r| r.proc.pgid()),
                    });
                    if let Some(r) = r {
                        lineup.running.push((kind, r));
                    }
                }
                Err(e) => {
                    let msg = format!("could not start: {e:#}");
                    eprintln!("  {kind}: {msg}");
                    lineup.failed.push((kind, msg));
                }
            }
        }
        Ok(lineup)
    }

    /// A contender that died during the phase fails its measurements of the phase, whatever they read.
    fn check_alive(mut self, results: &mut BTreeMap<Kind, Map<String, Value>>, keys: &[String]) {
        for (kind, r) in &mut self.running {
            if !r.proc.alive() {
                let msg = format!("{kind} exited:\n{}", r.proc.log_tail());
                eprintln!("  {msg}");
                for k in keys {
                    results
                        .entry(*kind)
                        .or_default()
                        .insert(k.clone(), json!({ "error": msg }));
                }
            }
        }
    }
}

/// A full MQTT connection through `target`, as a check that the chain works.
async fn check(kind: Kind, target: &Target, running: Option<&Running>) -> Result<()> {
    match net::Conn::mqtt(target, 60, Duration::from_secs(10)).await {
        Ok(c) => c
            .close(Duration::from_secs(10))
            .await
            .context("closing the check connection"),
        Err(e) => {
            let log = running.map(|r| r.proc.log_tail()).unwrap_or_default();
            bail!("a device cannot connect through {kind}: {e}\n{log}");
        }
    }
}

/// Every contender in front of the TLS sink at once, and plain TCP: runs rotate over them.
async fn throughput_phase(
    args: &Args,
    env: &Env,
    sinks: &Sinks,
    results: &mut BTreeMap<Kind, Map<String, Value>>,
    baseline: &mut Map<String, Value>,
) {
    let plan = &args.plan;
    eprintln!("== all contenders, throughput to the TLS sink (and plain TCP)");
    let mut running = Vec::new();
    let mut targets = Vec::new();
    for &kind in &args.only {
        match front(kind, sinks.tls, env, "sink").await {
            Ok((r, target)) => {
                targets.push(measure::Entrant {
                    name: kind.name().into(),
                    target,
                    pgid: r.as_ref().map(|r| r.proc.pgid()),
                });
                running.extend(r);
            }
            Err(e) => {
                let msg = format!("could not start: {e:#}");
                eprintln!("  {kind}: {msg}");
                results
                    .entry(kind)
                    .or_default()
                    .insert("throughput".into(), json!({ "error": msg }));
            }
        }
    }
    // Whether each one resumes its TLS sessions upstream, as the sink sees it.
    let mut resumption = BTreeMap::new();
    for t in &targets {
        resumption.insert(t.name.clone(), measure::resumption(&t.target, sinks, 8).await);
    }
    targets.push(measure::Entrant {
        name: "plain".into(),
        target: Target::Plain(sinks.plain),
        pgid: None,
    });
    eprintln!("  throughput ...");
    let t0 = Instant::now();
    let figures = measure::throughput(&targets, sinks, plan.bulk_bytes, plan.bulk_runs).await;
    eprintln!("    done in {:.1} s", t0.elapsed().as_secs_f64());
    for (name, r) in figures {
        if name == "plain" {
            baseline.insert("throughput".into(), outcome(r));
            continue;
        }
        let kind = Kind::parse(&name).expect("targets are named after kinds");
        let mut v = outcome(r);
        match resumption.remove(&name) {
            Some(Ok(res)) if v.get("error").is_none() => v["resumption_at_sink"] = res,
            Some(Err(e)) => v = json!({ "error": format!("resumption check: {e:#}") }),
            _ => {}
        }
        results.entry(kind).or_default().insert("throughput".into(), v);
    }
    drop(running);
}

fn outcome(r: Result<Value>) -> Value {
    match r {
        Ok(v) => v,
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("    FAILED: {msg}");
            json!({ "error": msg })
        }
    }
}

/// Runs one step with a time limit: its figures or why it failed.
async fn step<F>(name: &str, limit: Duration, f: F) -> Value
where
    F: std::future::Future<Output = Result<Value>>,
{
    eprintln!("  {name} ...");
    let t0 = Instant::now();
    let r = match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("did not finish within {limit:?}")),
    };
    let mut v = outcome(r);
    if let Value::Object(m) = &mut v {
        m.insert("wall_s".into(), json!(t0.elapsed().as_secs_f64()));
    }
    eprintln!("    done in {:.1} s", t0.elapsed().as_secs_f64());
    v
}

/// Storms in rounds, each contender in turn with a fresh broker and a fresh contender; the median round
/// is reported (the time until the last device is back is a maximum, which one bad moment of a shared
/// machine decides).
async fn storm_phase(args: &Args, env: &Env, results: &mut BTreeMap<Kind, Map<String, Value>>) {
    let plan = &args.plan;
    let mut rounds: BTreeMap<Kind, Vec<Value>> = BTreeMap::new();
    for round in 0..plan.storm_rounds {
        for k in 0..args.only.len() {
            let kind = args.only[(k + round) % args.only.len()];
            eprintln!("== {kind}: storm, round {} of {}", round + 1, plan.storm_rounds);
            let v = match start_with_broker(kind, env).await {
                Err(e) => {
                    let msg = format!("could not start: {e:#}");
                    eprintln!("  FAILED: {msg}");
                    json!({ "error": msg })
                }
                Ok((broker, mut running, target)) => {
                    tokio::time::sleep(plan.settle).await;
                    let pgid = running.as_ref().map(|r| r.proc.pgid());
                    let f = measure::storm(&target, plan.storm_devices, plan.storm_limit, pgid, broker.proc.pgid());
                    let mut v = step("storm", plan.step_limit, f).await;
                    if let Some(r) = running.as_mut() {
                        if !r.proc.alive() {
                            let msg = format!("{kind} exited during the storm:\n{}", r.proc.log_tail());
                            v = json!({ "error": msg });
                        }
                    }
                    drop(running);
                    drop(broker);
                    v
                }
            };
            rounds.entry(kind).or_default().push(v);
        }
    }
    for (kind, mut all) in rounds {
        let v = match all.iter().position(|v| v.get("error").is_some()) {
            Some(failed) => all.swap_remove(failed),
            None => {
                let times: Vec<f64> = all
                    .iter()
                    .map(|v| v["all_connected_s"].as_f64().unwrap_or(f64::NAN))
                    .collect();
                all.sort_by(|a, b| {
                    let t = |v: &Value| v["all_connected_s"].as_f64().unwrap_or(f64::INFINITY);
                    t(a).total_cmp(&t(b))
                });
                let mut median = all.swap_remove(all.len() / 2);
                median["rounds"] = json!(times);
                median
            }
        };
        results.entry(kind).or_default().insert("storm".into(), v);
    }
}

/// The measurements that need the contender on its own, with a fresh broker: memory (from a fresh process)
/// and CPU.
async fn run_contender(kind: Kind, args: &Args, env: &Env, out: &mut Map<String, Value>) {
    let plan = &args.plan;
    let wants = |m: &str| args.measurements.contains(&m);
    let broker_steps: Vec<&str> = ["memory", "cpu"]
        .into_iter()
        .filter(|m| wants(m) && kind.is_proxy())
        .collect();
    if broker_steps.is_empty() {
        return;
    }
    match start_with_broker(kind, env).await {
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("  FAILED to start: {msg}");
            for m in &broker_steps {
                out.insert((*m).into(), json!({ "error": format!("could not start: {msg}") }));
            }
        }
        Ok((broker, mut running, target)) => {
            let pgid = running.as_ref().map(|r| r.proc.pgid());
            // Let start-up work (the broker's, the contender's, the check connection) die down.
            tokio::time::sleep(plan.settle).await;
            for m in &broker_steps {
                let v = match *m {
                    "memory" => {
                        step(
                            m,
                            plan.step_limit,
                            measure::memory(pgid.unwrap(), &target, &plan.mem_ns, plan.settle),
                        )
                        .await
                    }
                    "cpu" => {
                        let f = measure::cpu(
                            pgid.unwrap(),
                            broker.proc.pgid(),
                            &target,
                            plan.cpu_devices,
                            plan.cpu_rate,
                            plan.cpu_messages,
                        );
                        step(m, plan.step_limit, f).await
                    }
                    _ => unreachable!(),
                };
                out.insert((*m).into(), v);
                if let Some(r) = running.as_mut() {
                    if !r.proc.alive() {
                        let msg = format!("{kind} exited during {m}:\n{}", r.proc.log_tail());
                        eprintln!("  {msg}");
                        out.insert((*m).into(), json!({ "error": msg }));
                        break;
                    }
                }
            }
            drop(running);
            drop(broker);
        }
    }
}

/// `kind` in front of `upstream` (started, with its listening address as the target), or for direct TLS
/// no process and `upstream` itself as the target.
async fn front(kind: Kind, upstream: std::net::SocketAddr, env: &Env, tag: &str) -> Result<(Option<Running>, Target)> {
    if !kind.is_proxy() {
        let target = Target::Tls {
            addr: upstream,
            config: env.client_config.clone(),
        };
        return Ok((None, target));
    }
    let r = contender::start(kind, upstream, &env.setup, tag).await?;
    let target = Target::Plain(r.listen);
    Ok((Some(r), target))
}

/// A fresh broker, the contender in front of it (none for direct), and one full MQTT connection
/// through it as a check that the chain works.
async fn start_with_broker(kind: Kind, env: &Env) -> Result<(Broker, Option<Running>, Target)> {
    let files = env.broker_files(true);
    let broker = Broker::start(&files, &env.setup.dir, kind.name()).await?;
    let (running, target) = front(kind, broker.addr, env, "broker").await?;
    check(kind, &target, running.as_ref()).await?;
    Ok((broker, running, target))
}

fn version(cmd: &str, args: &[&str], pick: impl Fn(&str) -> bool) -> String {
    let Some(bin) = process::find_binary(&[cmd]) else {
        return "not installed".into();
    };
    let Ok(out) = Command::new(bin).args(args).output() else {
        return "?".into();
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().find(|l| pick(l)).unwrap_or("?").trim().to_owned()
}

fn meta(args: &Args, elapsed: Duration) -> Value {
    let sh = |c: &str, a: &[&str]| {
        Command::new(c)
            .args(a)
            .current_dir(&args.repo)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let p = &args.plan;
    json!({
        "mode": p.mode,
        "date": sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "commit": sh("git", &["rev-parse", "--short", "HEAD"]),
        "dirty": !sh("git", &["status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"]).is_empty(),
        "kernel": sh("uname", &["-r"]),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())).unwrap_or_default(),
        "seconds": elapsed.as_secs_f64(),
        "versions": {
            "mosquitto": version("mosquitto", &["-h"], |l| l.contains("mosquitto version")),
            "stunnel": version("stunnel4", &["-version"], |l| l.starts_with("stunnel ")),
            "haproxy": version("haproxy", &["-v"], |l| l.starts_with("HAProxy version")),
            "socat": version("socat", &["-V"], |l| l.starts_with("socat version")),
            "openssl": version("openssl", &["version"], |l| l.starts_with("OpenSSL")),
        },
        "broker_tcp_nodelay": !args.broker_without_nodelay && broker::recipe_sets_nodelay(&args.repo),
        "plan": {
            "settle_s": p.settle.as_secs_f64(),
            "memory_n": p.mem_ns,
            "latency_messages": p.lat_count,
            "latency_warmup": p.lat_warmup,
            "latency_block": p.lat_block,
            "latency_payloads": p.lat_sizes,
            "setup_in_flight": p.setup_in_flight,
            "setup_seconds": p.setup_window.as_secs_f64() * p.setup_rounds as f64,
            "setup_window_seconds": p.setup_window.as_secs_f64(),
            "setup_rounds": p.setup_rounds,
            "storm_devices": p.storm_devices,
            "storm_rounds": p.storm_rounds,
            "bulk_bytes": p.bulk_bytes,
            "bulk_runs": p.bulk_runs,
            "cpu_devices": p.cpu_devices,
            "cpu_rate": p.cpu_rate,
            "cpu_messages": p.cpu_messages,
        },
    })
}
