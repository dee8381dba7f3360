//! The six measurements. Each returns a JSON object of figures, or an error when it could not complete
//! (a connection that failed, a CONNACK that refused, a sink that never answered): the bench reports
//! figures, it never compares them against thresholds.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::{Barrier, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout};

use crate::common::codec;
use crate::net::{self, Conn, Target};
use crate::procfs;
use crate::sink::Sinks;

/// One contender in a measurement that rotates over several: its name, where its devices connect, and
/// the process group whose CPU time is counted (none for direct TLS and plain TCP).
pub struct Entrant {
    pub name: String,
    pub target: Target,
    pub pgid: Option<i32>,
}

/// CN of the one client certificate every contender presents; the broker's ACL lets it publish below
/// `sensors/<CN>/`.
pub const DEVICE_CN: &str = "bench-device";
const STEP: Duration = Duration::from_secs(20);
/// Keep-alive of the devices: large, so that nobody times out during a run, but not 0, so that mqtls
/// keeps its per-connection silence timer (the real-world cost).
const KEEP_ALIVE: u16 = 3600;

fn topic(what: &str) -> String {
    format!("sensors/{DEVICE_CN}/{what}")
}

/// Opens `n` MQTT connections, `in_flight` at a time; fails if any fails.
pub async fn open_many(target: &Target, n: usize, in_flight: usize) -> Result<Vec<Conn>> {
    let sem = Arc::new(Semaphore::new(in_flight));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let (sem, target) = (sem.clone(), target.clone());
        set.spawn(async move {
            let _p = sem.acquire_owned().await;
            Conn::mqtt(&target, KEEP_ALIVE, STEP).await
        });
    }
    let mut conns = Vec::with_capacity(n);
    let mut errors = BTreeMap::<String, usize>::new();
    while let Some(r) = set.join_next().await {
        match r? {
            Ok(c) => conns.push(c),
            Err(e) => *errors.entry(e.to_string()).or_default() += 1,
        }
    }
    if !errors.is_empty() {
        bail!("{} of {n} connections failed: {errors:?}", n - conns.len());
    }
    Ok(conns)
}

/// PINGREQ/PINGRESP on every connection (proves each one is still proxied end to end).
pub async fn ping_all(conns: Vec<Conn>) -> Result<Vec<Conn>> {
    let mut chunks: Vec<Vec<Conn>> = (0..64).map(|_| Vec::new()).collect();
    for (i, c) in conns.into_iter().enumerate() {
        chunks[i % 64].push(c);
    }
    let mut set = JoinSet::new();
    for mut chunk in chunks {
        set.spawn(async move {
            for c in &mut chunk {
                timeout(STEP, c.ping())
                    .await
                    .map_err(|_| anyhow!("no PINGRESP in time"))??;
            }
            Ok::<_, anyhow::Error>(chunk)
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.extend(r??);
    }
    Ok(out)
}

/// Measurement 1: Memory per idle proxied connection: the growth of the contender's process group (PSS, and RSS)
/// from a warm baseline to N idle connections, divided by N.
pub async fn memory(pgid: i32, target: &Target, ns: &[usize], settle: Duration) -> Result<Value> {
    // Warm up: TLS configuration, worker threads, allocator arenas.
    for _ in 0..20 {
        Conn::mqtt(target, KEEP_ALIVE, STEP).await?.close(STEP).await?;
    }
    sleep(settle).await;
    let base = procfs::group_mem(pgid);
    let mut conns: Vec<Conn> = Vec::new();
    let mut points = Vec::new();
    for &n in ns {
        let started = Instant::now();
        let more = open_many(target, n - conns.len(), 32).await?;
        let open_s = started.elapsed().as_secs_f64();
        conns.extend(more);
        sleep(settle).await;
        let m = procfs::group_mem(pgid);
        eprintln!(
            "    N={n}: PSS {} -> {} KiB, RSS {} -> {} KiB, {} process(es)",
            base.pss_kib, m.pss_kib, base.rss_kib, m.rss_kib, m.processes
        );
        points.push(json!({
            "n": n,
            "pss_kib_per_conn": (m.pss_kib as f64 - base.pss_kib as f64) / n as f64,
            "rss_kib_per_conn": (m.rss_kib as f64 - base.rss_kib as f64) / n as f64,
            "pss_kib": m.pss_kib,
            "rss_kib": m.rss_kib,
            "processes": m.processes,
            "open_seconds": open_s,
        }));
    }
    let total = conns.len();
    let conns = ping_all(conns).await.context("pinging the idle connections")?;
    drop(conns);
    // Let the contender tear the connections down before the next measurement.
    let deadline = Instant::now() + Duration::from_secs(30);
    while procfs::group(pgid).len() > 1 && Instant::now() < deadline {
        sleep(Duration::from_millis(100)).await;
    }
    sleep(settle).await;
    Ok(json!({
        "baseline_pss_kib": base.pss_kib,
        "baseline_rss_kib": base.rss_kib,
        "verified_connections": total,
        "points": points,
    }))
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("histogram bounds")
}

fn summary_us(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.50) as f64 / 1000.0,
        "p90_us": h.value_at_quantile(0.90) as f64 / 1000.0,
        "p99_us": h.value_at_quantile(0.99) as f64 / 1000.0,
        "p999_us": h.value_at_quantile(0.999) as f64 / 1000.0,
        "max_us": h.max() as f64 / 1000.0,
        "mean_us": h.mean() / 1000.0,
    })
}

/// Measurement 2: QoS 1 PUBLISH -> PUBACK round trips, one at a time, through every target in turn: blocks of
/// `block` round trips rotate over the targets, so that all of them see the same moments of the machine
/// (a p99 measured minutes apart on a shared machine compares the machine's moods, not the contenders).
/// With a `direct` target among them, each other target's added latency is its percentile minus direct's.
pub async fn latency(
    targets: &[Entrant],
    sizes: &[usize],
    warmup: usize,
    count: usize,
    block: usize,
) -> BTreeMap<String, Result<Value>> {
    let mut conns: Vec<(String, Result<Conn>)> = Vec::new();
    for e in targets {
        conns.push((
            e.name.clone(),
            Conn::mqtt(&e.target, KEEP_ALIVE, STEP)
                .await
                .map_err(anyhow::Error::from),
        ));
    }
    let mut out: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
    let mut pid: u16 = 0;
    let t = topic("latency");
    for &size in sizes {
        let payload = vec![0x5A; size];
        let mut hs: Vec<Histogram<u64>> = conns.iter().map(|_| hist()).collect();
        let mut done = 0;
        let mut round = 0;
        while done < warmup + count {
            let n = block.min(warmup + count - done);
            // Start each round with another target, so that none always follows the same one.
            for k in 0..conns.len() {
                let i = (k + round) % conns.len();
                let (_, c) = &mut conns[i];
                let r = match c {
                    Ok(conn) => round_trips(conn, &t, &payload, &mut pid, done, n, warmup, &mut hs[i]).await,
                    Err(_) => Ok(()),
                };
                if let Err(e) = r {
                    *c = Err(e);
                }
            }
            done += n;
            round += 1;
        }
        for ((name, c), h) in conns.iter().zip(&hs) {
            if c.is_ok() {
                out.entry(name.clone())
                    .or_default()
                    .insert(size.to_string(), summary_us(h));
            }
        }
        let direct = out.get("direct").and_then(|d| d.get(&size.to_string())).cloned();
        if let Some(direct) = direct {
            for (_, v) in out.iter_mut().filter(|(n, _)| *n != "direct") {
                let Some(v) = v.get_mut(&size.to_string()) else {
                    continue;
                };
                for q in ["p50", "p99"] {
                    let key = format!("{q}_us");
                    let added = v[&key].as_f64().unwrap_or(0.0) - direct[&key].as_f64().unwrap_or(0.0);
                    v[format!("added_{q}_us")] = json!(added);
                }
            }
        }
    }
    let mut results = BTreeMap::new();
    for (name, c) in conns {
        let r = match c {
            Ok(conn) => {
                let _ = conn.close(STEP).await;
                Ok(Value::Object(out.remove(&name).unwrap_or_default()))
            }
            Err(e) => Err(e.context("round trips")),
        };
        results.insert(name, r);
    }
    results
}

/// `n` round trips; those whose index (from `first`) is past `warmup` are recorded in `h`.
#[allow(clippy::too_many_arguments)]
async fn round_trips(
    c: &mut Conn,
    topic: &str,
    payload: &[u8],
    pid: &mut u16,
    first: usize,
    n: usize,
    warmup: usize,
    h: &mut Histogram<u64>,
) -> Result<()> {
    for i in first..first + n {
        *pid = pid.wrapping_add(1).max(1);
        let id = *pid;
        let msg = net::publish(topic, 1, id, payload);
        let t0 = Instant::now();
        timeout(STEP, async {
            c.send(&msg).await?;
            loop {
                let p = c.read_packet().await?;
                if codec::parse_puback(&p) == Ok(id) {
                    return Ok::<_, std::io::Error>(());
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no PUBACK in time"))??;
        if i >= warmup {
            h.record(t0.elapsed().as_nanos() as u64)?;
        }
    }
    Ok(())
}

/// What one target's connection set-ups came to.
struct SetupTally {
    completed: u64,
    seconds: f64,
    tls: u64,
    resumed: u64,
    errors: BTreeMap<String, usize>,
    times: Histogram<u64>,
    cpu_s: f64,
    /// Why the measurement failed (not a device's failed set-up, counted in `errors`, but the driver's own).
    failure: Option<anyhow::Error>,
}

impl SetupTally {
    fn new() -> SetupTally {
        SetupTally {
            completed: 0,
            seconds: 0.0,
            tls: 0,
            resumed: 0,
            errors: BTreeMap::new(),
            times: hist(),
            cpu_s: 0.0,
            failure: None,
        }
    }
}

/// Measurement 3: completed connections per second: TCP, (the contender's mutual-TLS handshake upstream),
/// CONNECT/CONNACK, DISCONNECT and close, with `in_flight` devices at a time. Windows of `window` rotate
/// over the targets, `rounds` times, so that all of them see the same moments of the machine.
pub async fn setup_rate(
    targets: &[Entrant],
    in_flight: usize,
    window: Duration,
    rounds: usize,
) -> BTreeMap<String, Result<Value>> {
    let mut tallies: Vec<SetupTally> = targets.iter().map(|_| SetupTally::new()).collect();
    for round in 0..rounds {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let e = &targets[i];
            if tallies[i].failure.is_some() {
                continue;
            }
            let c0 = e.pgid.map(procfs::group_cpu_secs);
            if let Err(err) = setup_window(&e.target, in_flight, window, &mut tallies[i]).await {
                tallies[i].failure = Some(err);
                continue;
            }
            if let (Some(pgid), Some(c0)) = (e.pgid, c0) {
                tallies[i].cpu_s += procfs::group_cpu_secs(pgid) - c0;
            }
        }
    }
    let mut out = BTreeMap::new();
    for (e, t) in targets.iter().zip(tallies) {
        let r = if let Some(err) = t.failure {
            Err(err)
        } else if t.completed == 0 {
            Err(anyhow!("no connection completed: {:?}", t.errors))
        } else {
            let mut v = json!({
                "in_flight": in_flight,
                "completed": t.completed,
                "seconds": t.seconds,
                "per_second": t.completed as f64 / t.seconds,
                "failed": t.errors.values().sum::<usize>(),
                "errors": t.errors,
                "setup_time": summary_us(&t.times),
            });
            if t.tls > 0 {
                v["device_tls_resumed"] = json!(t.resumed);
                v["device_tls_handshakes"] = json!(t.tls);
            }
            if e.pgid.is_some() {
                v["cpu_ms_per_setup"] = json!(t.cpu_s * 1e3 / t.completed as f64);
            }
            Ok(v)
        };
        out.insert(e.name.clone(), r);
    }
    out
}

/// Set-ups through `target` for `window` (those started before its end are finished and counted).
async fn setup_window(target: &Target, in_flight: usize, window: Duration, tally: &mut SetupTally) -> Result<()> {
    let start = Instant::now();
    let deadline = start + window;
    let mut set = JoinSet::new();
    for _ in 0..in_flight {
        let target = target.clone();
        set.spawn(async move {
            let mut h = hist();
            let (mut ok, mut resumed, mut tls) = (0u64, 0u64, 0u64);
            let mut errors = BTreeMap::<String, usize>::new();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let r = timeout(STEP, async {
                    let mut c = Conn::open(&target).await?;
                    c.handshake(0).await?;
                    let setup = t0.elapsed();
                    let res = c.resumed;
                    c.close(STEP).await?;
                    Ok::<_, std::io::Error>((setup, res))
                })
                .await;
                match r {
                    Ok(Ok((setup, res))) => {
                        ok += 1;
                        h.record(setup.as_nanos() as u64).ok();
                        if let Some(r) = res {
                            tls += 1;
                            resumed += r as u64;
                        }
                    }
                    Ok(Err(e)) => *errors.entry(e.to_string()).or_default() += 1,
                    Err(_) => *errors.entry("timed out".into()).or_default() += 1,
                }
            }
            (ok, h, tls, resumed, errors)
        });
    }
    while let Some(r) = set.join_next().await {
        let (ok, wh, t, res, errs) = r.context("a set-up task failed")?;
        tally.completed += ok;
        tally.times.add(wh).context("adding a task's set-up times")?;
        tally.tls += t;
        tally.resumed += res;
        for (k, v) in errs {
            *tally.errors.entry(k).or_default() += v;
        }
    }
    tally.seconds += start.elapsed().as_secs_f64();
    Ok(())
}

/// Measurement 4: `n` devices connect at the same instant; each retries (after 100-200 ms) when refused or failed,
/// as a device would. Reports when the last one had its CONNACK.
pub async fn storm(target: &Target, n: usize, limit: Duration, pgid: Option<i32>, broker_pgid: i32) -> Result<Value> {
    let cpu0 = (pgid.map(procfs::group_cpu_secs), procfs::group_cpu_secs(broker_pgid));
    let barrier = Arc::new(Barrier::new(n + 1));
    let mut set = JoinSet::new();
    for i in 0..n {
        let (target, barrier) = (target.clone(), barrier.clone());
        set.spawn(async move {
            barrier.wait().await;
            let start = Instant::now();
            let mut attempts = 0u32;
            let mut errors = Vec::new();
            loop {
                attempts += 1;
                let left = limit.saturating_sub(start.elapsed());
                if left.is_zero() {
                    return Err((attempts, errors));
                }
                match Conn::mqtt(&target, KEEP_ALIVE, left.min(Duration::from_secs(60))).await {
                    Ok(c) => return Ok((start.elapsed(), attempts, errors, c)),
                    Err(e) => {
                        errors.push(e.to_string());
                        sleep(Duration::from_millis(100 + (i % 100) as u64)).await;
                    }
                }
            }
        });
    }
    let begin = Instant::now();
    barrier.wait().await;
    let mut times = hist();
    let mut conns = Vec::new();
    let mut attempts = 0u64;
    let mut failed = 0usize;
    let mut errors = BTreeMap::<String, usize>::new();
    while let Some(r) = set.join_next().await {
        match r? {
            Ok((t, a, errs, c)) => {
                times.record(t.as_nanos() as u64)?;
                attempts += u64::from(a);
                conns.push(c);
                for e in errs {
                    *errors.entry(e).or_default() += 1;
                }
            }
            Err((a, errs)) => {
                failed += 1;
                attempts += u64::from(a);
                for e in errs {
                    *errors.entry(e).or_default() += 1;
                }
            }
        }
    }
    let _ = begin;
    let cpu = (
        pgid.map(|p| procfs::group_cpu_secs(p) - cpu0.0.unwrap_or(0.0)),
        procfs::group_cpu_secs(broker_pgid) - cpu0.1,
    );
    drop(conns);
    if failed > 0 {
        bail!("{failed} of {n} devices not connected within {limit:?}; errors: {errors:?}");
    }
    sleep(Duration::from_secs(1)).await;
    Ok(json!({
        "devices": n,
        "all_connected_s": times.max() as f64 / 1e9,
        "p50_s": times.value_at_quantile(0.5) as f64 / 1e9,
        "p99_s": times.value_at_quantile(0.99) as f64 / 1e9,
        "attempts": attempts,
        "retry_reasons": errors,
        "cpu_s": cpu.0,
        "broker_cpu_s": cpu.1,
    }))
}

/// TLS session resumption as seen by the rustls sink: `n` sequential connections through the target.
pub async fn resumption(target: &Target, sinks: &Sinks, n: usize) -> Result<Value> {
    let connect = net::connect(&net::next_client_id(), 0);
    sinks.state.expected.store(connect.len() as u64, Ordering::SeqCst);
    sleep(Duration::from_millis(300)).await;
    sinks.state.resumed.lock().unwrap().clear();
    for _ in 0..n {
        let mut c = Conn::open(target).await?;
        c.send(&connect).await?;
        timeout(STEP, sink_answer(&mut c))
            .await
            .map_err(|_| anyhow!("sink never answered"))??;
        drop(c);
        sleep(Duration::from_millis(50)).await;
    }
    let seen = sinks.state.resumed.lock().unwrap().clone();
    Ok(json!({
        "connections": seen.len(),
        "resumed": seen.iter().filter(|r| **r).count(),
    }))
}

/// Measurement 5: bulk bytes from a device through each target to a sink; MB/s (10^6 bytes) and the
/// contender's CPU seconds per GB, median of `runs`. Runs rotate over the targets (one run through each,
/// then the next round), after one uncounted round that warms every path up.
pub async fn throughput(
    targets: &[Entrant],
    sinks: &Sinks,
    bytes: u64,
    runs: usize,
) -> BTreeMap<String, Result<Value>> {
    let mut rates: Vec<Vec<f64>> = targets.iter().map(|_| Vec::new()).collect();
    let mut cpu: Vec<Vec<f64>> = targets.iter().map(|_| Vec::new()).collect();
    let mut failed: Vec<Option<anyhow::Error>> = targets.iter().map(|_| None).collect();
    for round in 0..=runs {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            if failed[i].is_some() {
                continue;
            }
            let t = &targets[i];
            let c0 = t.pgid.map(procfs::group_cpu_secs);
            match bulk_once(&t.target, sinks, bytes).await {
                Ok(secs) if round > 0 => {
                    rates[i].push(bytes as f64 / secs / 1e6);
                    if let (Some(pgid), Some(c0)) = (t.pgid, c0) {
                        cpu[i].push((procfs::group_cpu_secs(pgid) - c0) / (bytes as f64 / 1e9));
                    }
                }
                Ok(_) => {}
                Err(e) => failed[i] = Some(e),
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let mut out = BTreeMap::new();
    for (i, t) in targets.iter().enumerate() {
        let r = match failed[i].take() {
            Some(e) => Err(e),
            None => {
                let mut v = json!({
                    "bytes": bytes,
                    "runs": runs,
                    "mb_per_s": median(&mut rates[i]),
                    "all_mb_per_s": rates[i],
                });
                if t.pgid.is_some() {
                    v["cpu_s_per_gb"] = json!(median(&mut cpu[i]));
                    v["all_cpu_s_per_gb"] = json!(cpu[i]);
                }
                Ok(v)
            }
        };
        out.insert(t.name.clone(), r);
    }
    out
}

/// One bulk transfer: CONNECT, then `bytes`, until the sink has them all; its duration in seconds.
async fn bulk_once(target: &Target, sinks: &Sinks, bytes: u64) -> Result<f64> {
    let connect = net::connect(&net::next_client_id(), 0);
    let chunk = vec![0xA5u8; 64 * 1024];
    sinks
        .state
        .expected
        .store(connect.len() as u64 + bytes, Ordering::SeqCst);
    let mut c = Conn::open(target).await?;
    let t0 = Instant::now();
    timeout(Duration::from_secs(300), async {
        c.write(&connect).await?;
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(chunk.len() as u64) as usize;
            c.write(&chunk[..n]).await?;
            sent += n as u64;
        }
        c.flush().await?;
        sink_answer(&mut c).await
    })
    .await
    .map_err(|_| anyhow!("bulk transfer did not finish in 300 s"))??;
    Ok(t0.elapsed().as_secs_f64())
}

/// Measurement 6: CPU seconds of the contender's process group per million QoS 0 PUBLISH of 32 B, sent one per write
/// at a steady rate from `devices` connections; each device ends with a PINGREQ/PINGRESP so that every
/// message has passed through.
pub async fn cpu(
    pgid: i32,
    broker_pgid: i32,
    target: &Target,
    devices: usize,
    rate: f64,
    messages: u64,
) -> Result<Value> {
    let conns = open_many(target, devices, 32).await?;
    sleep(Duration::from_millis(500)).await;
    let per_device = messages / devices as u64;
    let period = Duration::from_secs_f64(devices as f64 / rate);
    let msg = net::publish(&topic("cpu"), 0, 0, &[0x33; 32]);
    let c0 = procfs::group_cpu_secs(pgid);
    let b0 = procfs::group_cpu_secs(broker_pgid);
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    for (i, mut c) in conns.into_iter().enumerate() {
        let msg = msg.clone();
        set.spawn(async move {
            // Stagger the devices over one period.
            sleep(period.mul_f64(i as f64 / devices as f64)).await;
            let mut iv = tokio::time::interval(period);
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for _ in 0..per_device {
                iv.tick().await;
                c.send(&msg).await?;
            }
            timeout(Duration::from_secs(60), c.ping())
                .await
                .map_err(|_| anyhow!("no PINGRESP after the messages"))??;
            Ok::<_, anyhow::Error>(c)
        });
    }
    let mut conns = Vec::new();
    while let Some(r) = set.join_next().await {
        conns.push(r??);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let c1 = procfs::group_cpu_secs(pgid);
    let b1 = procfs::group_cpu_secs(broker_pgid);
    drop(conns);
    let sent = per_device * devices as u64;
    Ok(json!({
        "messages": sent,
        "devices": devices,
        "target_rate": rate,
        "achieved_rate": sent as f64 / elapsed,
        "seconds": elapsed,
        "cpu_s": c1 - c0,
        "cpu_s_per_million": (c1 - c0) / sent as f64 * 1e6,
        "broker_cpu_s_per_million": (b1 - b0) / sent as f64 * 1e6,
    }))
}

/// Reads the sink's whole answer (its CONNACK, then `K`) and checks it.
async fn sink_answer(c: &mut Conn) -> Result<()> {
    let mut got = [0u8; crate::sink::ANSWER.len()];
    let mut n = 0;
    while n < got.len() {
        match c.read_raw(&mut got[n..]).await? {
            0 => bail!("the sink's answer ended after {n} bytes"),
            k => n += k,
        }
    }
    if got != crate::sink::ANSWER {
        bail!("unexpected answer from the sink: {got:02x?}");
    }
    Ok(())
}
