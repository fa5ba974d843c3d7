//! `summary DIR`: the targets table (and the CPU and serverStatus tables) of a
//! `scripts/bench` run, from the JSON files it wrote.

use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::{json, Value};

#[derive(Args)]
pub struct SummaryArgs {
    /// Directory holding floor.json, latency.json, throughput.json, drain.json, devices.json, idle.json
    /// (and the *.procs.json files written by scripts/bench).
    pub dir: PathBuf,
}

pub fn load(dir: &Path, name: &str) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join(name)).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn f(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_f64()
}

pub const SCENARIOS: [&str; 13] = [
    "floor",
    "latency",
    "latency.socketio",
    "throughput",
    "throughput.socketio",
    "drain",
    "drain.socketio",
    "catchup",
    "devices",
    "idle",
    "idle.socketio",
    "latency-profile",
    "throughput-profile",
];

/// One line of a targets table.
struct Row {
    scenario: &'static str,
    target: String,
    measured: String,
    met: Option<bool>,
}

/// `lost`/`duplicates` of a report: the text and whether both are 0.
fn clean(v: &Value) -> (String, bool) {
    let lost = f(v, &["lost"]).unwrap_or(f64::NAN);
    let dup = f(v, &["duplicates"]).unwrap_or(f64::NAN);
    (
        format!("lost {lost}, duplicates {dup}"),
        lost == 0.0 && dup == 0.0,
    )
}

/// Bytes of instance RSS growth per idle connection of result `name` (`idle`,
/// `idle.socketio`): scripts/bench's own samples of the instance, else the load
/// generator's.
fn idle_per_conn(dir: &Path, name: &str) -> Option<f64> {
    load(dir, &format!("{name}.procs.json"))
        .and_then(|p| f(&p, &["rss_growth_bytes_per_conn"]))
        .or_else(|| {
            load(dir, &format!("{name}.json"))
                .and_then(|v| f(&v, &["extra", "server_rss_growth_bytes_per_conn"]))
        })
}

fn table(rows: &[Row]) -> String {
    let mut text = String::from("| scenario | target | measured | met |\n|---|---|---|---|\n");
    for r in rows {
        text.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r.scenario,
            r.target,
            r.measured,
            match r.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "n/a",
            }
        ));
    }
    text
}

/// The Socket.IO targets, each against v1 in the same run: at 500 msg/s p50 and p99
/// ≤ 1.3 × v1's, throughput ≥ 70 % of v1's, idle memory per connection ≤ 1.5 × v1's, and
/// 0 lost / 0 duplicates in every scenario. Empty when the run has no Socket.IO results.
fn socketio_rows(dir: &Path) -> Vec<Row> {
    let mut rows = Vec::new();
    let ratio = |x: f64, base: Option<f64>| match base {
        Some(b) if b > 0.0 => format!(" ({:.2} × v1)", x / b),
        _ => String::new(),
    };
    let v1_lat = load(dir, "latency.json");
    if let Some(v) = load(dir, "latency.socketio.json") {
        for (label, key) in [
            ("socketio latency p50", "p50"),
            ("socketio latency p99", "p99"),
        ] {
            let x = f(&v, &["latency_ms", key]).unwrap_or(f64::NAN);
            let base = v1_lat.as_ref().and_then(|b| f(b, &["latency_ms", key]));
            rows.push(Row {
                scenario: label,
                target: format!(
                    "≤ 1.3 × v1 {key} = {:.2} ms",
                    base.map_or(f64::NAN, |b| 1.3 * b)
                ),
                measured: format!("{x:.2} ms{}", ratio(x, base)),
                met: base.map(|b| x <= 1.3 * b),
            });
        }
        let (m, ok) = clean(&v);
        rows.push(Row {
            scenario: "socketio latency loss",
            target: "0 lost, 0 duplicates".into(),
            measured: format!(
                "{m} ({} received of {} accepted)",
                f(&v, &["received"]).unwrap_or(0.0),
                f(&v, &["accepted"]).unwrap_or(0.0)
            ),
            met: Some(ok),
        });
    }
    if let Some(v) = load(dir, "throughput.socketio.json") {
        let rate = f(&v, &["throughput_msgs_per_s"]).unwrap_or(f64::NAN);
        let base = load(dir, "throughput.json").and_then(|b| f(&b, &["throughput_msgs_per_s"]));
        rows.push(Row {
            scenario: "socketio throughput",
            target: format!(
                "≥ 70 % of v1 = {:.0} msg/s",
                base.map_or(f64::NAN, |b| 0.7 * b)
            ),
            measured: format!(
                "{rate:.0} msg/s ({:.0} % of v1)",
                base.map_or(f64::NAN, |b| 100.0 * rate / b)
            ),
            met: base.map(|b| rate >= 0.7 * b),
        });
        let (m, ok) = clean(&v);
        rows.push(Row {
            scenario: "socketio throughput loss",
            target: "0 lost, 0 duplicates".into(),
            measured: m,
            met: Some(ok),
        });
    }
    if let Some(v) = load(dir, "drain.socketio.json") {
        let ms = f(&v, &["extra", "drain_ms"]).unwrap_or(f64::NAN);
        let n = f(&v, &["params", "messages"]).unwrap_or(f64::NAN);
        let base = load(dir, "drain.json").and_then(|b| f(&b, &["extra", "drain_ms"]));
        rows.push(Row {
            scenario: "socketio drain",
            target: format!("none (v1: {:.1} ms)", base.unwrap_or(f64::NAN)),
            measured: format!(
                "{ms:.1} ms{} (joined after {:.1} ms)",
                ratio(ms, base),
                f(&v, &["extra", "joined_ms"]).unwrap_or(f64::NAN)
            ),
            met: None,
        });
        let (m, ok) = clean(&v);
        let order = f(&v, &["order_violations"]).unwrap_or(f64::NAN);
        let received = f(&v, &["received"]).unwrap_or(0.0);
        rows.push(Row {
            scenario: "socketio drain order/loss",
            target: "all, in order, 0 lost, 0 duplicates".into(),
            measured: format!("received {received} of {n}, order violations {order}, {m}"),
            met: Some(ok && order == 0.0 && received == n),
        });
    }
    if let Some(v) = load(dir, "idle.socketio.json") {
        let want = f(&v, &["params", "connections"]).unwrap_or(f64::NAN);
        let joined = f(&v, &["extra", "joined"]).unwrap_or(0.0);
        let dropped = f(&v, &["extra", "dropped_while_held"]).unwrap_or(f64::NAN);
        rows.push(Row {
            scenario: "socketio idle joined",
            target: format!("{want} joined connections, 0 dropped"),
            measured: format!(
                "{joined} joined in {:.1} s, {dropped} dropped",
                f(&v, &["extra", "connect_s"]).unwrap_or(f64::NAN)
            ),
            met: Some(joined == want && dropped == 0.0),
        });
        let per = idle_per_conn(dir, "idle.socketio");
        let base = idle_per_conn(dir, "idle");
        rows.push(Row {
            scenario: "socketio idle memory",
            target: format!(
                "≤ 1.5 × v1 = {:.2} KiB per connection",
                base.map_or(f64::NAN, |b| 1.5 * b / 1024.0)
            ),
            measured: match per {
                Some(b) => format!("{:.2} KiB per connection{}", b / 1024.0, ratio(b, base)),
                None => "not sampled".into(),
            },
            met: per.zip(base).map(|(b, v1)| b <= 1.5 * v1),
        });
    }
    rows
}

pub fn summary(args: SummaryArgs) -> anyhow::Result<()> {
    let dir = &args.dir;
    let floor = load(dir, "floor.json");
    let lat = load(dir, "latency.json");
    let thr = load(dir, "throughput.json");
    let drn = load(dir, "drain.json");
    let idl = load(dir, "idle.json");
    let idle_procs = load(dir, "idle.procs.json");
    let mut rows: Vec<Row> = Vec::new();
    let fp50 = floor.as_ref().and_then(|v| f(v, &["latency_ms", "p50"]));
    let fp99 = floor.as_ref().and_then(|v| f(v, &["latency_ms", "p99"]));
    let frate = floor
        .as_ref()
        .and_then(|v| f(v, &["throughput_msgs_per_s"]));
    if let Some(v) = &floor {
        let (m, ok) = clean(v);
        rows.push(Row {
            scenario: "floor",
            target: "reference (MongoDB alone), 0 lost".into(),
            measured: format!(
                "p50 {:.2} ms, p99 {:.2} ms, max rate {:.0} ev/s; {m}",
                fp50.unwrap_or(f64::NAN),
                fp99.unwrap_or(f64::NAN),
                frate.unwrap_or(f64::NAN)
            ),
            met: Some(ok),
        });
    }
    if let Some(v) = &lat {
        let p50 = f(v, &["latency_ms", "p50"]).unwrap_or(f64::NAN);
        let p99 = f(v, &["latency_ms", "p99"]).unwrap_or(f64::NAN);
        let (m, ok) = clean(v);
        let (t50, t99) = (fp50.map(|x| x + 2.0), fp99.map(|x| 3.0 * x));
        rows.push(Row {
            scenario: "latency p50",
            target: format!("≤ floor p50 + 2 ms = {:.2} ms", t50.unwrap_or(f64::NAN)),
            measured: format!("{p50:.2} ms"),
            met: t50.map(|t| p50 <= t),
        });
        rows.push(Row {
            scenario: "latency p99",
            target: format!("≤ 3 × floor p99 = {:.2} ms", t99.unwrap_or(f64::NAN)),
            measured: format!(
                "{p99:.2} ms (p99.9 {:.2}, max {:.2})",
                f(v, &["latency_ms", "p999"]).unwrap_or(f64::NAN),
                f(v, &["latency_ms", "max"]).unwrap_or(f64::NAN)
            ),
            met: t99.map(|t| p99 <= t),
        });
        rows.push(Row {
            scenario: "latency loss",
            target: "0 lost, 0 duplicates".into(),
            measured: format!(
                "{m} ({} received of {} accepted)",
                f(v, &["received"]).unwrap_or(0.0),
                f(v, &["accepted"]).unwrap_or(0.0)
            ),
            met: Some(ok),
        });
    }
    if let Some(v) = &thr {
        let rate = f(v, &["throughput_msgs_per_s"]).unwrap_or(f64::NAN);
        let target = frate.map(|r| 0.7 * r);
        rows.push(Row {
            scenario: "throughput",
            target: format!(
                "≥ 70 % of floor rate = {:.0} msg/s",
                target.unwrap_or(f64::NAN)
            ),
            measured: format!(
                "{rate:.0} msg/s ({:.0} % of floor)",
                frate.map(|r| 100.0 * rate / r).unwrap_or(f64::NAN)
            ),
            met: target.map(|t| rate >= t),
        });
        let (m, ok) = clean(v);
        rows.push(Row {
            scenario: "throughput loss",
            target: "0 lost, 0 duplicates".into(),
            measured: m,
            met: Some(ok),
        });
    }
    if let Some(v) = &drn {
        let ms = f(v, &["extra", "drain_ms"]).unwrap_or(f64::NAN);
        let n = f(v, &["params", "messages"]).unwrap_or(f64::NAN);
        let acked = match v.pointer("/params/ack") {
            Some(Value::Bool(true)) => "; each message acked as it was read",
            _ => "",
        };
        rows.push(Row {
            scenario: "drain",
            target: format!("{n} pending → joining socket ≤ 250 ms"),
            measured: format!(
                "{ms:.1} ms (joined after {:.1} ms{acked})",
                f(v, &["extra", "joined_ms"]).unwrap_or(f64::NAN)
            ),
            met: Some(ms <= 250.0),
        });
        let (m, ok) = clean(v);
        let order = f(v, &["order_violations"]).unwrap_or(f64::NAN);
        let received = f(v, &["received"]).unwrap_or(0.0);
        rows.push(Row {
            scenario: "drain order/loss",
            target: "all, in order, 0 lost, 0 duplicates".into(),
            measured: format!("received {received} of {n}, order violations {order}, {m}"),
            met: Some(ok && order == 0.0 && received == n),
        });
    }
    if let Some(v) = &idl {
        let ran = f(v, &["params", "connections"]).unwrap_or(f64::NAN);
        // scripts/bench caps the count to the open-files limit; the target is what was asked.
        let want = idle_procs
            .as_ref()
            .and_then(|p| f(p, &["requested"]))
            .unwrap_or(ran);
        let fd_note = match idle_procs.as_ref().and_then(|p| f(p, &["fd_hard_limit"])) {
            Some(l) if ran < want => format!(" (capped to {ran}: RLIMIT_NOFILE hard limit {l})"),
            _ => String::new(),
        };
        let joined = f(v, &["extra", "joined"]).unwrap_or(0.0);
        // Prefer scripts/bench's own samples of the instance's VmRSS.
        let per = idle_per_conn(dir, "idle");
        rows.push(Row {
            scenario: "idle joined",
            target: format!("{want} joined connections on one instance"),
            measured: format!(
                "{joined} joined in {:.1} s, {} dropped{fd_note}",
                f(v, &["extra", "connect_s"]).unwrap_or(f64::NAN),
                f(v, &["extra", "dropped_while_held"]).unwrap_or(f64::NAN)
            ),
            met: Some(joined == want),
        });
        rows.push(Row {
            scenario: "idle memory",
            target: "≤ 12 KiB RSS growth per connection".into(),
            measured: match per {
                Some(b) => format!("{:.2} KiB per connection", b / 1024.0),
                None => "not sampled".into(),
            },
            met: per.map(|b| b <= 12.0 * 1024.0),
        });
    }
    if let Some(v) = load(dir, "devices.json") {
        for t in crate::scenario::devices::targets(&v) {
            rows.push(Row {
                scenario: t.label,
                target: t.target,
                measured: t.measured,
                met: t.met,
            });
        }
    }
    let mut text = table(&rows);
    let sio = socketio_rows(dir);
    if !sio.is_empty() {
        text.push_str(
            "\nSocket.IO (/socket.io/, WebSocket transport) against v1, same run and instances:\n\n",
        );
        text.push_str(&table(&sio));
    }
    // Where the CPU went in each scenario (scripts/bench's /proc samples).
    let mut res = String::new();
    for scen in SCENARIOS {
        let Some(p) = load(dir, &format!("{scen}.procs.json")) else {
            continue;
        };
        let cpu = |name: &str| f(&p, &["processes", name, "cpu_s"]);
        let peak = |name: &str| f(&p, &["processes", name, "peak_rss_kib"]);
        let wall = f(&p, &["wall_s"]).unwrap_or(f64::NAN);
        let cap = wall * f(&p, &["nproc"]).unwrap_or(f64::NAN);
        let busy = f(&p, &["machine_busy_s"]).unwrap_or(f64::NAN);
        let lg = load(dir, &format!("{scen}.json"))
            .and_then(|v| f(&v, &["loadgen_cpu_s"]))
            .unwrap_or(0.0);
        let ours = ["mongod", "msgbuf-a", "msgbuf-b"]
            .iter()
            .filter_map(|n| cpu(n))
            .sum::<f64>()
            + lg;
        let show = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
        let mib = |v: Option<f64>| {
            v.map(|x| format!("{:.0}", x / 1024.0))
                .unwrap_or_else(|| "-".into())
        };
        res.push_str(&format!(
            "| {scen} | {wall:.1} | {} | {} | {} | {lg:.1} | {:.1} | {busy:.1} of {cap:.1} | {} / {} / {} |\n",
            show(cpu("mongod")),
            show(cpu("msgbuf-a")),
            show(cpu("msgbuf-b")),
            busy - ours,
            mib(peak("mongod")),
            mib(peak("msgbuf-a")),
            mib(peak("msgbuf-b")),
        ));
    }
    // What mongod was asked to do, per message received.
    let mut mon = String::new();
    for scen in SCENARIOS {
        let Some(m) = load(dir, &format!("{scen}.mongo.json")) else {
            continue;
        };
        let g = |k: &str| m.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        let msgs = load(dir, &format!("{scen}.json"))
            .and_then(|v| f(&v, &["received"]))
            .unwrap_or(f64::NAN);
        let per = |x: f64| if msgs > 0.0 { x / msgs } else { f64::NAN };
        let writes = g("opLatencies.writes.ops");
        mon.push_str(&format!(
            "| {scen} | {msgs:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.0} | {:.1} |\n",
            per(g("metrics.commands.insert.total")),
            per(g("metrics.document.inserted")),
            per(g("metrics.commands.update.total") + g("metrics.commands.findAndModify.total")),
            per(g("metrics.document.updated")),
            per(g("metrics.commands.getMore.total")),
            per(g("metrics.queryExecutor.scannedObjects")),
            if writes > 0.0 { g("opLatencies.writes.latency") / writes / 1000.0 } else { f64::NAN },
            per(g("wiredTiger.log.log sync operations")) * 1000.0,
            g("wiredTiger.cache.pages evicted by application threads"),
            g("wiredTiger.thread-yield.application thread time waiting for cache (usecs)") / 1e6,
        ));
    }
    if !mon.is_empty() {
        text.push_str(
            "\nmongod serverStatus deltas during each scenario, per message received (floor: per change event):\n\n\
             | scenario | messages | insert cmds | docs inserted | update cmds | docs updated | getMores | docs scanned | avg write op ms | journal syncs per 1000 | pages evicted by app threads | app wait for cache s |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        text.push_str(&mon);
    }
    if !res.is_empty() {
        text.push_str(
            "\nCPU seconds per process during each scenario; peak RSS in MiB (sampled every 0.25 s):\n\n\
             | scenario | wall s | mongod | msgbuf-a | msgbuf-b | loadgen | other processes | machine busy | peak RSS mongod / a / b |\n\
             |---|---|---|---|---|---|---|---|---|\n",
        );
        text.push_str(&res);
    }
    print!("{text}");
    std::fs::write(dir.join("summary.md"), &text)?;
    let json_rows: Vec<Value> = rows
        .iter()
        .chain(&sio)
        .map(|r| json!({"scenario": r.scenario, "target": r.target, "measured": r.measured, "met": r.met}))
        .collect();
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&json_rows)? + "\n",
    )?;
    Ok(())
}
