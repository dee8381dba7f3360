//! The table of figures and ratios, for the terminal and for BENCHMARKS.md.

use std::fmt::Write as _;

use serde_json::Value;

use crate::contender::Kind;

#[derive(Clone, Copy, PartialEq)]
enum Better {
    Lower,
    Higher,
    /// A text row (no ratio).
    Neither,
}

enum Cell {
    Num(f64),
    Text(String),
    Failed,
    NotRun,
    NotApplicable,
}

type Getter = Box<dyn Fn(&Value, Kind) -> Cell>;

struct Row {
    label: String,
    unit: &'static str,
    better: Better,
    get: Getter,
}

fn measure<'a>(all: &'a Value, kind: Kind, m: &str) -> Result<&'a Value, Cell> {
    let ran = all["measurements"].as_array().is_some_and(|a| a.iter().any(|x| x == m));
    let not_applicable = kind == Kind::Direct && matches!(m, "memory" | "cpu");
    if not_applicable {
        return Err(Cell::NotApplicable);
    }
    match all["contenders"].get(kind.name()).and_then(|c| c.get(m)) {
        None if !ran => Err(Cell::NotRun),
        None => Err(Cell::NotRun),
        Some(v) if v.get("error").is_some() => Err(Cell::Failed),
        Some(v) => Ok(v),
    }
}

fn num(all: &Value, kind: Kind, m: &str, f: impl Fn(&Value) -> Option<f64>) -> Cell {
    match measure(all, kind, m) {
        Ok(v) => f(v).map(Cell::Num).unwrap_or(Cell::Failed),
        Err(c) => c,
    }
}

fn rows(all: &Value) -> Vec<Row> {
    let plan = &all["meta"]["plan"];
    let mut rows = Vec::new();
    for n in plan["memory_n"].as_array().cloned().unwrap_or_default() {
        let n = n.as_u64().unwrap_or(0);
        rows.push(Row {
            label: format!("Memory per idle connection, N = {}", thousands(n)),
            unit: "KiB",
            better: Better::Lower,
            get: Box::new(move |all, k| {
                num(all, k, "memory", |v| {
                    v["points"].as_array()?.iter().find(|p| p["n"].as_u64() == Some(n))?["pss_kib_per_conn"].as_f64()
                })
            }),
        });
    }
    for size in plan["latency_payloads"].as_array().cloned().unwrap_or_default() {
        let size = size.as_u64().unwrap_or(0).to_string();
        let shown = if size == "1024" {
            "1 KiB".to_string()
        } else {
            format!("{size} B")
        };
        for q in ["p50", "p99"] {
            let key = format!("{q}_us");
            let (s, k2) = (size.clone(), key.clone());
            rows.push(Row {
                label: format!("QoS 1 PUBLISH→PUBACK round trip, {shown}, {q}"),
                unit: "µs",
                better: Better::Lower,
                get: Box::new(move |all, k| num(all, k, "latency", |v| v[&s][&k2].as_f64())),
            });
        }
        for q in ["p50", "p99"] {
            let key = format!("added_{q}_us");
            let s = size.clone();
            rows.push(Row {
                label: format!("  latency added vs direct TLS (interleaved), {shown}, {q}"),
                unit: "µs",
                better: Better::Lower,
                get: Box::new(move |all, k| {
                    if k == Kind::Direct {
                        return Cell::NotApplicable;
                    }
                    num(all, k, "latency", |v| v[&s][&key].as_f64())
                }),
            });
        }
    }
    let in_flight = plan["setup_in_flight"].as_u64().unwrap_or(0);
    for (key, how) in [("setup", "with"), ("setup_no_resumption", "without")] {
        rows.push(Row {
            label: format!("Connection setup rate {how} TLS session resumption, {in_flight} in flight"),
            unit: "conn/s",
            better: Better::Higher,
            get: Box::new(move |all, k| num(all, k, key, |v| v["per_second"].as_f64())),
        });
        rows.push(Row {
            label: "  connection setup time, p50".into(),
            unit: "ms",
            better: Better::Lower,
            get: Box::new(move |all, k| num(all, k, key, |v| Some(v["setup_time"]["p50_us"].as_f64()? / 1000.0))),
        });
        rows.push(Row {
            label: "  proxy CPU per connection set up".into(),
            unit: "ms",
            better: Better::Lower,
            get: Box::new(move |all, k| match k {
                Kind::Direct => Cell::NotApplicable,
                _ => num(all, k, key, |v| v["cpu_ms_per_setup"].as_f64()),
            }),
        });
        if key == "setup" {
            rows.push(Row {
                label: "  resumes TLS sessions upstream".into(),
                unit: "",
                better: Better::Neither,
                get: Box::new(|all, k| {
                    // Proxies: seen at the rustls sink. Direct: the device's own handshakes with Mosquitto.
                    if k == Kind::Direct {
                        return resumed_by_device(all, k, "setup");
                    }
                    match measure(all, k, "throughput") {
                        Ok(v) => {
                            let r = &v["resumption_at_sink"];
                            match (r["resumed"].as_u64(), r["connections"].as_u64()) {
                                (Some(x), Some(n)) => Cell::Text(yes_no(x, n)),
                                _ => Cell::Failed,
                            }
                        }
                        Err(c) => c,
                    }
                }),
            });
        } else {
            rows.push(Row {
                label: "  resumed handshakes (seen by the direct device)".into(),
                unit: "",
                better: Better::Neither,
                get: Box::new(|all, k| match k {
                    Kind::Direct => resumed_by_device(all, k, "setup_no_resumption"),
                    _ => Cell::NotApplicable,
                }),
            });
        }
    }
    let storm = plan["storm_devices"].as_u64().unwrap_or(0);
    rows.push(Row {
        label: format!(
            "Reconnect storm: {} devices at once, all connected after",
            thousands(storm)
        ),
        unit: "s",
        better: Better::Lower,
        get: Box::new(|all, k| num(all, k, "storm", |v| v["all_connected_s"].as_f64())),
    });
    rows.push(Row {
        label: "  storm: connection attempts (with retries)".into(),
        unit: "",
        better: Better::Neither,
        get: Box::new(|all, k| match measure(all, k, "storm") {
            Ok(v) => Cell::Text(thousands(v["attempts"].as_u64().unwrap_or(0))),
            Err(c) => c,
        }),
    });
    rows.push(Row {
        label: "Bulk throughput to a TLS sink".into(),
        unit: "MB/s",
        better: Better::Higher,
        get: Box::new(|all, k| num(all, k, "throughput", |v| v["mb_per_s"].as_f64())),
    });
    rows.push(Row {
        label: "  throughput / plain TCP over loopback".into(),
        unit: "×",
        better: Better::Higher,
        get: Box::new(|all, k| {
            let Some(plain) = all["plain_tcp"]["throughput"]["mb_per_s"].as_f64() else {
                return Cell::NotRun;
            };
            num(all, k, "throughput", |v| Some(v["mb_per_s"].as_f64()? / plain))
        }),
    });
    rows.push(Row {
        label: "  proxy CPU per GB carried".into(),
        unit: "CPU s",
        better: Better::Lower,
        get: Box::new(|all, k| match k {
            Kind::Direct => Cell::NotApplicable,
            _ => num(all, k, "throughput", |v| v["cpu_s_per_gb"].as_f64()),
        }),
    });
    rows.push(Row {
        label: "CPU per million QoS 0 PUBLISH (32 B)".into(),
        unit: "CPU s",
        better: Better::Lower,
        get: Box::new(|all, k| num(all, k, "cpu", |v| v["cpu_s_per_million"].as_f64())),
    });
    rows
}

/// The direct device's own count of resumed handshakes during a set-up measurement.
fn resumed_by_device(all: &Value, k: Kind, m: &str) -> Cell {
    match measure(all, k, m) {
        Ok(v) => match (v["device_tls_resumed"].as_u64(), v["device_tls_handshakes"].as_u64()) {
            (Some(r), Some(n)) => Cell::Text(yes_no(r, n)),
            _ => Cell::Failed,
        },
        Err(c) => c,
    }
}

fn yes_no(resumed: u64, n: u64) -> String {
    if resumed > 0 {
        format!("yes ({resumed}/{n})")
    } else {
        format!("no (0/{n})")
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_num(x: f64, unit: &str) -> String {
    match unit {
        "KiB" | "ms" => format!("{x:.1}"),
        "µs" if x.abs() < 100.0 => format!("{x:.1}"),
        "µs" | "conn/s" | "MB/s" => format!("{x:.0}"),
        "×" => format!("{x:.2}"),
        _ => format!("{x:.2}"),
    }
}

fn show(c: &Cell, unit: &str) -> String {
    match c {
        Cell::Num(x) => fmt_num(*x, unit),
        Cell::Text(t) => t.clone(),
        Cell::Failed => "FAILED".into(),
        Cell::NotRun => "not run".into(),
        Cell::NotApplicable => "—".into(),
    }
}

fn columns(all: &Value) -> Vec<Kind> {
    Kind::ALL
        .into_iter()
        .filter(|k| all["contenders"].get(k.name()).is_some())
        .collect()
}

/// mqtls / best peer, and which peer was best.
fn best_ratio(row: &Row, all: &Value) -> Option<(f64, Kind)> {
    let m = mqtls_num(row, all)?;
    let (b, p) = best_of(row, all, &Kind::PEERS)?;
    (b > 0.0 && m > 0.0 && m.is_finite()).then(|| (m / b, p))
}

fn main_table(all: &Value) -> String {
    let cols = columns(all);
    let mut s = String::new();
    let _ = write!(s, "| measurement | unit | better |");
    for k in &cols {
        let _ = write!(s, " {k} |");
    }
    s.push_str(" mqtls / best peer |\n|---|---|---|");
    for _ in &cols {
        s.push_str("---:|");
    }
    s.push_str("---|\n");
    for row in rows(all) {
        let better = match row.better {
            Better::Lower => "lower",
            Better::Higher => "higher",
            Better::Neither => "",
        };
        let _ = write!(s, "| {} | {} | {} |", row.label, row.unit, better);
        for &k in &cols {
            let _ = write!(s, " {} |", show(&(row.get)(all, k), row.unit));
        }
        match (row.better, best_ratio(&row, all)) {
            (Better::Neither, _) => s.push_str(" |\n"),
            (_, Some((r, p))) => {
                let _ = writeln!(s, " **{r:.2}** (best peer: {p}) |");
            }
            (_, None) => s.push_str(" n/a |\n"),
        }
    }
    s
}

fn peer_table(all: &Value) -> String {
    let mut s = String::from("| measurement | better |");
    let peers: Vec<Kind> = Kind::PEERS
        .into_iter()
        .filter(|k| all["contenders"].get(k.name()).is_some())
        .collect();
    for p in &peers {
        let _ = write!(s, " mqtls / {p} |");
    }
    s.push_str("\n|---|---|");
    for _ in &peers {
        s.push_str("---:|");
    }
    s.push('\n');
    for row in rows(all) {
        if row.better == Better::Neither {
            continue;
        }
        let better = if row.better == Better::Lower { "lower" } else { "higher" };
        let _ = write!(s, "| {} | {} |", row.label.trim(), better);
        let m = (row.get)(all, Kind::Mqtls);
        for &p in &peers {
            match (&m, (row.get)(all, p)) {
                (Cell::Num(a), Cell::Num(b)) if b > 0.0 && *a > 0.0 => {
                    let _ = write!(s, " {:.2} |", a / b);
                }
                _ => s.push_str(" n/a |"),
            }
        }
        s.push('\n');
    }
    s
}

/// Every measurement that was attempted and did not complete, as "contender: measurement: why".
pub fn failures(all: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(cs) = all["contenders"].as_object() {
        for (k, c) in cs {
            if let Some(ms) = c.as_object() {
                for (m, v) in ms {
                    if let Some(e) = v.get("error") {
                        out.push(format!(
                            "{k}: {m}: {}",
                            e.as_str().unwrap_or("?").lines().next().unwrap_or("")
                        ));
                    }
                }
            }
        }
    }
    if let Some(e) = all["plain_tcp"]["throughput"].get("error") {
        out.push(format!("plain TCP: throughput: {e}"));
    }
    out
}

fn not_run(all: &Value) -> Vec<String> {
    let ran: Vec<&str> = all["measurements"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let mut out: Vec<String> = crate::MEASUREMENTS
        .iter()
        .filter(|m| !ran.contains(m))
        .map(|m| format!("measurement `{m}` (skipped)"))
        .collect();
    for k in Kind::ALL {
        if all["contenders"].get(k.name()).is_none() {
            out.push(format!("contender `{k}` (not selected)"));
        }
    }
    out
}

/// One of issue 5's targets: mqtls's figure against a bound computed from the same run.
struct Target {
    what: String,
    mqtls: Option<f64>,
    bound: Option<f64>,
    /// How the bound is made, e.g. "best peer (haproxy)".
    bound_text: String,
    unit: &'static str,
    better: Better,
}

fn mqtls_num(row: &Row, all: &Value) -> Option<f64> {
    match (row.get)(all, Kind::Mqtls) {
        Cell::Num(x) => Some(x),
        _ => None,
    }
}

/// The best peer's figure for a row (stunnel, HAProxy or socat; `peers` narrows the set).
fn best_of(row: &Row, all: &Value, peers: &[Kind]) -> Option<(f64, Kind)> {
    let mut best: Option<(f64, Kind)> = None;
    for &p in peers {
        if let Cell::Num(v) = (row.get)(all, p) {
            let better = match best {
                None => true,
                Some((b, _)) => (row.better == Better::Lower && v < b) || (row.better == Better::Higher && v > b),
            };
            if better {
                best = Some((v, p));
            }
        }
    }
    best
}

fn targets(all: &Value) -> Vec<Target> {
    let rows = rows(all);
    let find = |prefix: &str| rows.iter().find(|r| r.label.trim_start().starts_with(prefix));
    let mut out = Vec::new();
    let vs_best = |label: &str, row: Option<&Row>| {
        let row = row?;
        let best = best_of(row, all, &Kind::PEERS);
        Some(Target {
            what: format!("{label}: no worse than the best peer"),
            mqtls: mqtls_num(row, all),
            bound: best.map(|b| b.0),
            bound_text: best
                .map(|b| format!("best peer ({})", b.1))
                .unwrap_or_else(|| "best peer".into()),
            unit: row.unit,
            better: row.better,
        })
    };
    for r in rows
        .iter()
        .filter(|r| r.label.starts_with("Memory per idle connection"))
    {
        let best = best_of(r, all, &[Kind::Stunnel, Kind::Haproxy]);
        out.push(Target {
            what: format!("{}: at most half of the best of stunnel and HAProxy", r.label),
            mqtls: mqtls_num(r, all),
            bound: best.map(|b| b.0 / 2.0),
            bound_text: best
                .map(|b| format!("half of {}", b.1))
                .unwrap_or_else(|| "half of the best".into()),
            unit: r.unit,
            better: Better::Lower,
        });
        out.push(Target {
            what: format!("{}: at most 12 KiB", r.label),
            mqtls: mqtls_num(r, all),
            bound: Some(12.0),
            bound_text: "fixed".into(),
            unit: r.unit,
            better: Better::Lower,
        });
    }
    for r in rows
        .iter()
        .filter(|r| r.label.trim_start().starts_with("latency added"))
    {
        out.extend(vs_best(r.label.trim(), Some(r)));
    }
    out.extend(vs_best(
        "Connection setup rate with session resumption",
        find("Connection setup rate with TLS"),
    ));
    out.extend(vs_best(
        "Connection setup rate without session resumption",
        find("Connection setup rate without TLS"),
    ));
    out.extend(vs_best(
        "Reconnect storm, time until all are connected",
        find("Reconnect storm"),
    ));
    out.extend(vs_best("Bulk throughput", find("Bulk throughput")));
    if let Some(r) = find("throughput / plain TCP") {
        out.push(Target {
            what: "Bulk throughput: at least half of plain TCP over loopback".into(),
            mqtls: mqtls_num(r, all),
            bound: Some(0.5),
            bound_text: "fixed".into(),
            unit: r.unit,
            better: Better::Higher,
        });
    }
    out
}

fn targets_table(all: &Value) -> String {
    let mut s = String::from("| target | mqtls | bound | | margin |\n|---|---:|---:|---|---:|\n");
    for t in targets(all) {
        let (m, b) = match (t.mqtls, t.bound) {
            (Some(m), Some(b)) => (m, b),
            _ => {
                let _ = writeln!(s, "| {} | n/a | n/a | {} | not measured |", t.what, t.bound_text);
                continue;
            }
        };
        let met = match t.better {
            Better::Higher => m >= b,
            _ => m <= b,
        };
        // How far inside (or outside) the bound mqtls is, as mqtls / bound.
        let _ = writeln!(
            s,
            "| {} | {} {} | {} {} ({}) | {} | {:.2} |",
            t.what,
            fmt_num(m, t.unit),
            t.unit,
            fmt_num(b, t.unit),
            t.unit,
            t.bound_text,
            if met { "met" } else { "**short**" },
            m / b
        );
    }
    s
}

pub fn terminal(all: &Value) -> String {
    let mut s = format!(
        "\nmqtls benchmark ({} mode, {} s)\n\n",
        all["meta"]["mode"].as_str().unwrap_or("?"),
        all["meta"]["seconds"]
            .as_f64()
            .map(|x| format!("{x:.0}"))
            .unwrap_or_default()
    );
    s.push_str(&main_table(all));
    s.push_str("\nTargets (issue 5), from this run:\n\n");
    s.push_str(&targets_table(all));
    s.push_str("\nmqtls / each peer (below 1 is better for \"lower\" rows, above 1 for \"higher\" rows):\n\n");
    s.push_str(&peer_table(all));
    let nr = not_run(all);
    if !nr.is_empty() {
        let _ = writeln!(s, "\nNot run: {}", nr.join(", "));
    }
    let f = failures(all);
    if !f.is_empty() {
        let _ = writeln!(s, "\nDid not complete:\n  {}", f.join("\n  "));
    }
    s
}

pub fn markdown(all: &Value) -> String {
    let meta = &all["meta"];
    let v = &meta["versions"];
    let p = &meta["plan"];
    let g = |x: &Value| x.as_str().unwrap_or("?").to_owned();
    // "stunnel 5.68 on x86_64-pc-linux-gnu platform" -> "stunnel 5.68", and so on.
    let short = |x: &Value, words: usize| g(x).split_whitespace().take(words).collect::<Vec<_>>().join(" ");
    let mut s = String::new();
    s.push_str("# Benchmarks\n\n");
    let _ = writeln!(
        s,
        "Produced by `bench/run` ({} mode) on {} at commit `{}`{}; the whole run took {:.0} s. \
         Machine: {} CPU(s) ({}), Linux {}. Everything ran on that one machine over loopback: the \
         contender, the broker, the devices and the sinks share its {} cores, so these figures compare the \
         contenders with one another; they are not absolute capacities.\n",
        g(&meta["mode"]),
        g(&meta["date"]),
        g(&meta["commit"]),
        if meta["dirty"].as_bool() == Some(true) {
            " (with uncommitted changes in src/)"
        } else {
            ""
        },
        meta["seconds"].as_f64().unwrap_or(0.0),
        meta["cpus"],
        g(&meta["cpu_model"]),
        g(&meta["kernel"]),
        meta["cpus"],
    );
    let _ = writeln!(
        s,
        "Contenders: **mqtls** (release build), {}, {}, {}, and **direct** (the device speaks mutual TLS itself, \
         with rustls) where that applies. Upstream: {} with mutual TLS (`require_certificate true`), \
         from `deploy/mosquitto/`: one broker shared by all contenders for latency and set-up rate (whose measurements rotate over the contenders), a fresh one for each contender's memory, storm and CPU measurements. OpenSSL (stunnel, HAProxy, socat, Mosquitto): {}.\n",
        short(&v["stunnel"], 2),
        short(&v["haproxy"], 3),
        short(&v["socat"], 3),
        short(&v["mosquitto"], 3),
        short(&v["openssl"], 2),
    );
    if meta["broker_tcp_nodelay"].as_bool() == Some(true) {
        s.push_str(
            "The broker recipe sets `set_tcp_nodelay true`: without it Mosquitto's CONNACK waits behind its TLS 1.3 \
             session tickets for the device's delayed ACK, and every connection set-up takes about 40 ms whoever \
             sits in front of the broker (`bench/run --broker-without-nodelay` measures it that way).\n\n",
        );
    } else {
        s.push_str(
            "The broker ran without `set_tcp_nodelay true`: its CONNACK waits behind its TLS 1.3 session tickets \
             for the device's delayed ACK, so every connection set-up includes about 40 ms whoever sits in front \
             of the broker.\n\n",
        );
    }
    s.push_str("![headline figures](bench/results/benchmarks.png)\n\n");
    s.push_str("## Results\n\n");
    s.push_str(&main_table(all));
    s.push_str(
        "\n\"mqtls / best peer\" divides mqtls's figure by the best figure among stunnel, HAProxy and socat: \
         below 1 is better for rows where lower is better, above 1 for rows where higher is better. \
         `—`: does not apply (direct has no proxy process).\n\n",
    );
    s.push_str(
        "### Targets\n\nIssue 5's targets, each judged against a bound from this same run (margin: mqtls / bound).\n\n",
    );
    s.push_str(&targets_table(all));
    s.push_str("\n### mqtls against each peer\n\n");
    s.push_str(&peer_table(all));
    let nr = not_run(all);
    if !nr.is_empty() {
        let _ = writeln!(s, "\nNot run: {}.", nr.join(", "));
    }
    let f = failures(all);
    if !f.is_empty() {
        let _ = writeln!(s, "\nDid not complete:\n\n- {}", f.join("\n- "));
    }
    let _ = write!(
        s,
        r#"
## What was measured

Every peer presents one client certificate for every device, since none can choose one per device; mqtls is
configured the same way (one `[[device]]` with `source = "127.0.0.0/8"` and no `client_id`), so all
contenders do the same work. Each verifies the broker's chain against the CA and its name (`localhost`), and
has Nagle off on both sides. Devices are raw MQTT 3.1.1 clients written in the driver, bound to source
addresses spread over 127.77.0.0/16. mqtls logs at `warn` (its per-connection `info` lines off), stunnel at
`err`, HAProxy and socat log nothing per connection.

1. **Memory per idle connection**: after 20 warm-up connections, the contender's process group's PSS
   (summed from `/proc/<pid>/smaps_rollup`; for a single process this is its RSS less its share of shared
   libraries) is read; then {mem} devices connect (CONNECT/CONNACK done, keep-alive 3600 s) and stay idle,
   and after {settle:.1} s the growth is divided by N. socat forks one process per connection: its figure
   sums all of them. Kernel socket buffers are not counted for anyone. All N connections are then checked
   with a PINGREQ/PINGRESP through the proxy. RSS figures are in `bench/results/results.json`.
2. **Latency**: every contender runs at once in front of one broker, and one device per contender
   (and one speaking TLS directly to the broker: "direct") sends QoS 1 PUBLISH and waits for the PUBACK,
   one at a time. Blocks of {lb} round trips rotate over the contenders, so that all of them see the
   same moments of the machine: {lw} warm-up then {lc} measured round trips each, per payload size.
   "Added" is a contender's percentile minus direct's, both from the same interleaved run.
3. **Setup rate**: {inflight} devices at a time, each: TCP connect, CONNECT (the proxy opens its
   mutual-TLS connection to the broker), CONNACK, DISCONNECT, close, until the proxy closes too. Windows
   of {sw:.1} s rotate over the contenders (all running at once in front of one broker), {sr} per
   contender. *With* session resumption: the broker issues TLS 1.3 session tickets (Mosquitto as
   shipped), and each client uses them if it can; whether each proxy resumes was observed at the rustls
   sink (below: 8 connections in a row, counting resumed handshakes), for direct in its own handshakes.
   *Without*: a second broker started with an OpenSSL configuration that issues no session tickets
   (`NumTickets = 0`), so that every handshake is a full one for everybody (the direct device's count of
   resumed handshakes shows it).
4. **Reconnect storm**: {storm} devices start connecting at the same instant; a device whose attempt fails
   (refused, reset, timed out) tries again after 100–200 ms. Figure: the time until the last CONNACK,
   the median of {storm_rounds} rounds (each with a fresh broker and contender, contenders in turn).
   Mosquitto listens with a backlog of 100 and handshakes on one thread, so its accept queue overflows
   when more connections arrive at once than it can take, and the kernel retries dropped SYNs only after
   1 s, 3 s, 7 s: this measures how well each contender lives with that, as a real gateway would.
5. **Throughput**: every contender runs at once in front of a rustls server in the driver that requires a
   client certificate and discards what it reads; a device sends a CONNECT and then {bulk} MiB through
   one contender after another, {runs} rounds after one uncounted round, and the median is reported;
   "plain TCP" is the same transfer over loopback with no TLS and no proxy, in the same rotation. The
   proxy's CPU time (user + system of its process group) per GB carried is measured over the same runs.
6. **CPU**: {cpud} devices send {cpum} QoS 0 PUBLISH of 32 B in total, one per write, at {rate} messages/s
   in all, each ending with a PINGREQ/PINGRESP; the contender's user + system CPU time (from
   `/proc/<pid>/stat`, over its process group) is scaled to one million messages.

Raw figures (percentiles, errors, retries, broker CPU): `bench/results/results.json`. Reproduce with
`bench/run` (see `bench/README.md`, which also records what each change to mqtls bought, measured before
and after, and where an idle connection's memory goes).
"#,
        mem = p["memory_n"]
            .as_array()
            .map(|a| a
                .iter()
                .map(|x| thousands(x.as_u64().unwrap_or(0)))
                .collect::<Vec<_>>()
                .join(" then "))
            .unwrap_or_default(),
        settle = p["settle_s"].as_f64().unwrap_or(0.0),
        lw = p["latency_warmup"],
        lc = thousands(p["latency_messages"].as_u64().unwrap_or(0)),
        inflight = p["setup_in_flight"],
        sw = p["setup_window_seconds"].as_f64().unwrap_or(0.0),
        sr = p["setup_rounds"],
        lb = p["latency_block"],
        storm = thousands(p["storm_devices"].as_u64().unwrap_or(0)),
        storm_rounds = p["storm_rounds"].as_u64().unwrap_or(1),
        bulk = p["bulk_bytes"].as_u64().unwrap_or(0) >> 20,
        runs = p["bulk_runs"],
        cpud = p["cpu_devices"],
        cpum = thousands(p["cpu_messages"].as_u64().unwrap_or(0)),
        rate = thousands(p["cpu_rate"].as_f64().unwrap_or(0.0) as u64),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every target is found by its row's label: a renamed label would drop a target without a word.
    #[test]
    fn every_target_finds_its_row() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results/results.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let all: Value = serde_json::from_str(&text).expect("results.json parses");
        let plan = &all["meta"]["plan"];
        let count = |key: &str| plan[key].as_array().map_or(0, Vec::len);
        let (memory, latency) = (count("memory_n"), count("latency_payloads"));
        assert!(
            memory > 0 && latency > 0,
            "the plan in results.json lists memory N and latency payloads"
        );
        // 2 per memory N (half of the best, 12 KiB), 2 per latency payload (added p50, p99), plus set-up
        // with and without resumption, the storm, bulk throughput and throughput / plain TCP.
        let expected = 2 * memory + 2 * latency + 5;
        let found: Vec<String> = targets(&all).into_iter().map(|t| t.what).collect();
        assert_eq!(found.len(), expected, "targets found: {found:#?}");
    }
}
