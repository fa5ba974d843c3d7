//! `devices`: the targets of a user with several devices (docs/PROTOCOL.md, "Devices"), in
//! one run, each part one of the other scenarios' runs:
//! 1. catch-up (`drain --catch-up`): a device catching up messages another device of its
//!    user already read and acked; `join_chat` → the last message, in order, 0 lost;
//! 2. latency (`latency`) at the same offered rate with 1 joined device per receiver, then
//!    with `--many` (each acking): p50/p99, and 0 lost / 0 duplicates on every device;
//! 3. throughput (`throughput`, its closed loop and rate) with 1 device, then `--many`: a
//!    window slot comes back, and a message counts, once it reached every device;
//! 4. with `--control`, 2 and 3 again with one socket without a `deviceId` per receiver,
//!    and with `--many` such plain sockets: the same fan-out without the devices'
//!    bookkeeping, to tell the two apart;
//! 5. the join of an up-to-date device (the catch-up's laptop, once its floor passed what
//!    it acked): `explain` of its reads, the reads timed, and a join under the profiler;
//!    the laptop is brought up to date right after 1, its join measured last.
//!
//! Each part's report is kept whole (`extra.parts`), with what each part cost (CPU of the
//! `--pid` processes, serverStatus and `top` deltas: `extra.resources`); the targets are
//! judged by [`targets`] (here and in `summary`).

use std::time::{Duration, Instant};

use clap::Args;
use msgbuf::parse_duration;
use serde_json::{json, Value};

use crate::conn::{run_id, Common};
use crate::report::{self_cpu_seconds, Report};
use crate::scenario::{drain, latency, throughput};
use crate::summary::f;

#[derive(Args)]
pub struct DevicesArgs {
    /// (`--devices` and `--plain-sockets` are set by each part.)
    #[command(flatten)]
    pub common: Common,
    /// Devices per receiver in the multi-device parts.
    #[arg(long, default_value_t = 3)]
    pub many: usize,
    /// Catch-up: messages read and acked on the phone, then caught up on the laptop.
    #[arg(long, default_value_t = 10_000)]
    pub messages: usize,
    /// Catch-up: senders sharing them.
    #[arg(long, default_value_t = 8)]
    pub fill_senders: usize,
    /// Throughput: senders (and as many receiving users).
    #[arg(long, default_value_t = 32)]
    pub senders: usize,
    /// Throughput: messages per sender not yet received (by every device).
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Throughput: measured time of each run.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub throughput_duration: Duration,
    /// Throughput: unmeasured time before it.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Also latency and throughput with 1 and with `--many` plain sockets per receiver.
    #[arg(long)]
    pub control: bool,
    /// The replica set, for the up-to-date join (explain, profiler) and the serverStatus
    /// and `top` deltas of each part; without it both are left out.
    #[arg(long)]
    pub mongodb_uri: Option<String>,
    /// Database msgbuf uses.
    #[arg(long, default_value = "msgbuf")]
    pub db: String,
    /// The instances' `MSGBUF_DEVICE_SKEW` (reported; bounds the wait for an up-to-date
    /// device: a floor passes an acked id only once it is older than this).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub device_skew: Duration,
    /// A process whose CPU time each part reports, NAME=PID (repeatable).
    #[arg(long = "pid", value_parser = parse_pid)]
    pub pids: Vec<(String, u32)>,
    /// Parts to run: catchup, latency, throughput, join (the join needs the catch-up).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "catchup,latency,throughput,join"
    )]
    pub parts: Vec<String>,
    /// Pause between parts (background work of the last one settles).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub settle: Duration,
    /// The latency parts' load (each part one such run); last, so that its help heading
    /// covers only its own options.
    #[command(flatten, next_help_heading = "Latency parts")]
    pub latency: latency::LatencyLoad,
}

fn parse_pid(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s.split_once('=').ok_or("expected NAME=PID")?;
    let pid = pid.parse().map_err(|e| format!("PID: {e}"))?;
    Ok((name.to_owned(), pid))
}

/// The keys of `extra.parts`.
pub const CATCH_UP: &str = "catch_up";
pub const LATENCY_NONE: &str = "latency_no_device";
pub const THROUGHPUT_NONE: &str = "throughput_no_device";
pub const LATENCY_ONE: &str = "latency_one";
pub const LATENCY_MANY: &str = "latency_many";
pub const LATENCY_PLAIN: &str = "latency_many_plain";
pub const THROUGHPUT_ONE: &str = "throughput_one";
pub const THROUGHPUT_MANY: &str = "throughput_many";
pub const THROUGHPUT_PLAIN: &str = "throughput_many_plain";

/// What a part cost: wall time, CPU of the watched processes and of this one, and what
/// mongod was asked to do.
struct Meter<'a> {
    args: &'a DevicesArgs,
    mongo: Option<mongodb::Client>,
    namespaces: Vec<String>,
}

struct Reading {
    at: Instant,
    cpu: Vec<Option<f64>>,
    own_cpu: f64,
    /// CPU seconds of every process on the machine (/proc/stat).
    machine_busy: Option<f64>,
    /// The instances' Prometheus series, summed over the instances.
    metrics: std::collections::HashMap<String, f64>,
    stats: Option<serde_json::Map<String, Value>>,
    top: Option<serde_json::Map<String, Value>>,
}

impl Meter<'_> {
    async fn read(&self) -> Reading {
        let (stats, top) = match &self.mongo {
            Some(client) => (
                crate::mongo_stats::snapshot(client).await.ok(),
                crate::mongo_stats::top(client, &self.namespaces).await.ok(),
            ),
            None => (None, None),
        };
        let metrics = crate::server_metrics::read(&self.args.common.urls).await;
        Reading {
            machine_busy: machine_busy_s(),
            metrics,
            at: Instant::now(),
            cpu: self
                .args
                .pids
                .iter()
                .map(|(_, pid)| crate::procfs::proc_cpu_s(*pid))
                .collect(),
            own_cpu: self_cpu_seconds(),
            stats,
            top,
        }
    }

    fn since(&self, before: &Reading, after: &Reading) -> Value {
        let mut cpu = serde_json::Map::new();
        for (i, (name, _)) in self.args.pids.iter().enumerate() {
            if let (Some(a), Some(b)) = (before.cpu[i], after.cpu[i]) {
                cpu.insert(name.clone(), json!(round2(b - a)));
            }
        }
        cpu.insert(
            "loadgen".into(),
            json!(round2(after.own_cpu - before.own_cpu)),
        );
        if let (Some(a), Some(b)) = (before.machine_busy, after.machine_busy) {
            // Everything else on the machine meanwhile: a part that ran beside other work
            // shows it here.
            let ours: f64 = cpu.values().filter_map(Value::as_f64).sum();
            cpu.insert("machine".into(), json!(round2(b - a)));
            cpu.insert("other".into(), json!(round2(b - a - ours)));
        }
        let delta = |a: &Option<serde_json::Map<String, Value>>,
                     b: &Option<serde_json::Map<String, Value>>| match (a, b) {
            (Some(a), Some(b)) => Value::Object(crate::mongo_stats::delta(b, a)),
            _ => Value::Null,
        };
        json!({
            "wall_s": round2(after.at.duration_since(before.at).as_secs_f64()),
            "cpu_s": cpu,
            "mongo": delta(&before.stats, &after.stats),
            "top": delta(&before.top, &after.top),
            "server": crate::server_metrics::deltas(&before.metrics, &after.metrics),
        })
    }
}

/// CPU seconds all processes used since boot: user+nice+system+irq+softirq+steal.
fn machine_busy_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let ticks = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)? + f.get(7)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub async fn devices(args: DevicesArgs) -> anyhow::Result<()> {
    let c = &args.common;
    let many = args.many.max(2);
    let run = run_id(c);
    let wants = |p: &str| args.parts.iter().any(|x| x == p);
    let mongo = match &args.mongodb_uri {
        Some(uri) => Some(crate::mongo::connect(uri).await?),
        None => None,
    };
    let meter = Meter {
        args: &args,
        mongo,
        namespaces: vec![
            format!("{}.{}", args.db, crate::mongo::MESSAGES),
            format!("{}.{}", args.db, msgbuf::DEVICES),
        ],
    };
    eprintln!(
        "devices: 1 vs {many} devices per receiver; the instances' device skew: {:?}{}",
        args.device_skew,
        if args.device_skew == Duration::from_secs(30) {
            " (the server's default)"
        } else {
            " (not the server's default of 30s)"
        }
    );
    // Each part's users are its own (the run id and a tag).
    let common = |tag: &str, devices: usize, plain: bool| Common {
        devices,
        plain_sockets: plain,
        json: None,
        run_id: Some(format!("{run}-{tag}")),
        ..c.clone()
    };
    let mut parts = serde_json::Map::new();
    let mut resources = serde_json::Map::new();
    let mut catch_up_user = None;
    let started = Instant::now();

    macro_rules! part {
        ($key:expr, $what:expr, $run:expr) => {{
            if !parts.is_empty() {
                tokio::time::sleep(args.settle).await;
            }
            eprintln!("devices: {}", $what);
            let before = meter.read().await;
            let mut report: Report = $run.await?;
            let after = meter.read().await;
            let used = meter.since(&before, &after);
            report.loadgen_cpu_s = used["cpu_s"]["loadgen"].as_f64().unwrap_or(0.0);
            println!("-- devices: {} --", $what);
            report.print();
            resources.insert($key.to_owned(), used);
            let value = serde_json::to_value(&report)?;
            parts.insert($key.to_owned(), value);
        }};
    }

    if wants("catchup") {
        let drain_args = drain::DrainArgs {
            common: common("cu", 0, false),
            messages: args.messages,
            senders: args.fill_senders,
            window: 32,
            timeout: Duration::from_secs(60),
            mongodb_uri: None,
            db: args.db.clone(),
            ack: false,
            catch_up: true,
            device_skew: args.device_skew,
            defer_up_to_date_join: true,
        };
        part!(
            CATCH_UP,
            format!(
                "catch-up: a device catching up {} messages another device of its user read and acked",
                args.messages
            ),
            drain::run(&drain_args)
        );
        catch_up_user = parts[CATCH_UP]["extra"]["receiver"]
            .as_str()
            .map(str::to_owned);
    }
    // The laptop is brought up to date right after the catch-up: that wait (the skew
    // window) also keeps the catch-up's after-effects out of the latency parts (every run
    // before this order had a write stall of about a second some 30 s after the catch-up,
    // in the 1-device latency part). Its join is measured last.
    let mut up_to_date = None;
    if wants("join") {
        match (&catch_up_user, &args.mongodb_uri) {
            (Some(user), Some(uri)) => {
                eprintln!("devices: bringing the catch-up's laptop up to date");
                let c = common("cu", 0, false);
                up_to_date =
                    Some(drain::bring_up_to_date(&c, user, uri, &args.db, args.device_skew).await?);
            }
            _ => eprintln!("devices: no up-to-date join (it needs the catch-up and --mongodb-uri)"),
        }
    }
    let lat = |tag: &'static str, devices: usize, plain: bool| latency::LatencyArgs {
        common: common(tag, devices, plain),
        load: args.latency,
    };
    if wants("latency") {
        let one = lat("l1", 1, false);
        let n = lat("ln", many, false);
        let what = |d: usize, kind: &str| {
            format!(
                "latency, {d} {kind} per receiver, {} users, {} msg/s for {:?}",
                args.latency.users, args.latency.rate, args.latency.duration
            )
        };
        if args.control {
            let none = lat("l0", 0, false);
            part!(
                LATENCY_NONE,
                what(1, "plain socket (no deviceId)"),
                latency::run(&none)
            );
        }
        part!(LATENCY_ONE, what(1, "device"), latency::run(&one));
        part!(LATENCY_MANY, what(many, "devices"), latency::run(&n));
        if args.control {
            let plain = lat("lp", many, true);
            part!(
                LATENCY_PLAIN,
                what(many, "plain sockets (no deviceId)"),
                latency::run(&plain)
            );
        }
    }
    let thr = |tag: &'static str, devices: usize, plain: bool| throughput::ThroughputArgs {
        common: common(tag, devices, plain),
        senders: args.senders,
        window: args.window,
        duration: args.throughput_duration,
        warmup: args.warmup,
    };
    if wants("throughput") {
        let what = |d: usize, kind: &str| {
            format!(
                "throughput, {d} {kind} per receiver, {} senders x window {}, {:?}",
                args.senders, args.window, args.throughput_duration
            )
        };
        if args.control {
            part!(
                THROUGHPUT_NONE,
                what(1, "plain socket (no deviceId)"),
                throughput::run(&thr("t0", 0, false))
            );
        }
        part!(
            THROUGHPUT_ONE,
            what(1, "device"),
            throughput::run(&thr("t1", 1, false))
        );
        part!(
            THROUGHPUT_MANY,
            what(many, "devices"),
            throughput::run(&thr("tn", many, false))
        );
        if args.control {
            part!(
                THROUGHPUT_PLAIN,
                what(many, "plain sockets (no deviceId)"),
                throughput::run(&thr("tp", many, true))
            );
        }
    }
    let mut join = Value::Null;
    if let (Some(waited), Some(user), Some(uri)) = (up_to_date, &catch_up_user, &args.mongodb_uri) {
        eprintln!("devices: the join of an up-to-date device (the catch-up's laptop)");
        let before = meter.read().await;
        join = drain::measure_up_to_date_join(&common("cu", 0, false), user, uri, &args.db, waited)
            .await?;
        let after = meter.read().await;
        resources.insert("up_to_date_join".into(), meter.since(&before, &after));
    }

    let mut report = Report::new(
        "devices",
        json!({"proto": c.proto.to_string(), "many": many, "messages": args.messages,
               "fill_senders": args.fill_senders, "users": args.latency.users, "rate": args.latency.rate,
               "duration_s": args.latency.duration.as_secs_f64(), "senders": args.senders,
               "window": args.window, "throughput_duration_s": args.throughput_duration.as_secs_f64(),
               "warmup_s": args.warmup.as_secs_f64(), "control": args.control,
               "device_skew_s": args.device_skew.as_secs_f64(), "size": c.size,
               "urls": c.urls, "parts": args.parts}),
    );
    // Loss and order over every part; the latency and rate are the many-device runs'.
    let mut unflagged = 0.0;
    for part in parts.values() {
        let n = |k: &str| part[k].as_u64().unwrap_or(0);
        report.sent += n("sent");
        report.accepted += n("accepted");
        report.errors += n("errors");
        report.received += n("received");
        report.lost += n("lost");
        report.duplicates += n("duplicates");
        report.redeliveries += n("redeliveries");
        report.unexpected += n("unexpected");
        report.order_violations += n("order_violations");
        unflagged += f(part, &["extra", "unflagged_duplicates"]).unwrap_or(0.0);
    }
    if let Some(p) = parts.get(LATENCY_MANY) {
        report.latency_ms = serde_json::from_value(p["latency_ms"].clone())?;
        report.latency_basis = format!(
            "the {many}-device latency run's: scheduled send → chat_message read, on each device"
        );
    }
    if let Some(p) = parts.get(THROUGHPUT_MANY) {
        report.throughput_msgs_per_s = f(p, &["throughput_msgs_per_s"]).unwrap_or(0.0);
        report.duration_s = f(p, &["duration_s"]).unwrap_or(0.0);
    }
    report
        .extra
        .insert("unflagged_duplicates".into(), json!(unflagged));
    report.extra.insert(
        "wall_s".into(),
        json!(round2(started.elapsed().as_secs_f64())),
    );
    report.extra.insert("parts".into(), Value::Object(parts));
    report.extra.insert("up_to_date_join".into(), join);
    report
        .extra
        .insert("resources".into(), Value::Object(resources));
    let rows = targets(&serde_json::to_value(&report)?);
    report.extra.insert(
        "targets".into(),
        json!(rows
            .iter()
            .map(|t| json!({"target": t.label, "wanted": t.target, "measured": t.measured, "met": t.met}))
            .collect::<Vec<_>>()),
    );
    // The parts were printed as they ran: the totals alone, then the tables.
    report.loadgen_cpu_s = self_cpu_seconds();
    let extra = std::mem::take(&mut report.extra);
    report.print();
    report.extra = extra;
    report.write_json(c.json.as_deref())?;
    println!("\n{}", targets_table(&rows));
    println!("{}", resources_table(&report.extra["resources"]));
    Ok(())
}

/// One judged target of the devices scenario.
pub struct Target {
    pub label: &'static str,
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
}

fn targets_table(rows: &[Target]) -> String {
    let mut s = String::from("| devices target | wanted | measured | met |\n|---|---|---|---|\n");
    for t in rows {
        let met = match t.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "n/a",
        };
        s.push_str(&format!(
            "| {} | {} | {} | {met} |\n",
            t.label, t.target, t.measured
        ));
    }
    s
}

/// What each part cost (from `extra.resources`).
fn resources_table(resources: &Value) -> String {
    let Some(map) = resources.as_object() else {
        return String::new();
    };
    let mut s = String::from(
        "| part | wall s | CPU s (mongod, msgbuf-a, msgbuf-b, loadgen; other) | mongod update cmds | findAndModify | find | mongod ms on `devices` (update) | mongod ms on `buffered_messages` (update) | avg write op ms | server mean / p99 ms: insert batch, stream lag |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (part, r) in map {
        let cpu = ["mongod", "msgbuf-a", "msgbuf-b", "loadgen"]
            .iter()
            .map(|n| {
                f(r, &["cpu_s", n])
                    .map(|x| format!("{x:.1}"))
                    .unwrap_or_else(|| "-".into())
            })
            .collect::<Vec<_>>()
            .join(" / ")
            + &f(r, &["cpu_s", "other"]).map_or(String::new(), |x| format!("; {x:.1}"));
        let hist = |h: &str| {
            let mean = f(r, &["server", h, "mean_ms"]);
            let p99 = f(r, &["server", h, "p99_le_ms"]);
            match (mean, p99) {
                (Some(m), Some(p)) => format!("{m:.1} / ≤{p}"),
                _ => "-".into(),
            }
        };
        let m = |k: &str| r["mongo"][k].as_f64();
        let top = |suffix: &str| {
            r["top"]
                .as_object()
                .and_then(|t| {
                    t.iter()
                        .find(|(k, _)| k.ends_with(suffix))
                        .and_then(|(_, v)| v.as_f64())
                })
                .map(|us| format!("{:.0}", us / 1000.0))
                .unwrap_or_else(|| "-".into())
        };
        let show = |v: Option<f64>| v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
        let writes = m("opLatencies.writes.ops").filter(|n| *n > 0.0);
        s.push_str(&format!(
            "| {part} | {:.1} | {cpu} | {} | {} | {} | {} ({}) | {} ({}) | {} | {}, {} |\n",
            f(r, &["wall_s"]).unwrap_or(f64::NAN),
            show(m("metrics.commands.update.total")),
            show(m("metrics.commands.findAndModify.total")),
            show(m("metrics.commands.find.total")),
            top(&format!(".{} total us", msgbuf::DEVICES)),
            top(&format!(".{} update us", msgbuf::DEVICES)),
            top(&format!(".{} total us", crate::mongo::MESSAGES)),
            top(&format!(".{} update us", crate::mongo::MESSAGES)),
            writes
                .zip(m("opLatencies.writes.latency"))
                .map(|(n, us)| format!("{:.2}", us / n / 1000.0))
                .unwrap_or_else(|| "-".into()),
            hist("insert_batch"),
            hist("stream_lag"),
        ));
    }
    s
}

/// The devices targets, judged from a devices report (its JSON): the catch-up (≤ 250 ms,
/// in order, 0 lost), the many-device latency p99 (≤ 1.5 × the 1-device p99) and rate
/// (≥ 60 % of the 1-device rate), 0 lost and 0 unflagged duplicates in every part, and an
/// up-to-date device's join (≤ 2 ms of MongoDB time).
pub fn targets(v: &Value) -> Vec<Target> {
    let mut rows = Vec::new();
    let parts = &v["extra"]["parts"];
    let many = f(v, &["params", "many"]).unwrap_or(f64::NAN);
    let nan = f64::NAN;
    if let Some(p) = parts.get(CATCH_UP) {
        let ms = f(p, &["extra", "drain_ms"]).unwrap_or(nan);
        let n = f(p, &["params", "messages"]).unwrap_or(nan);
        let received = f(p, &["received"]).unwrap_or(0.0);
        let lost = f(p, &["lost"]).unwrap_or(nan);
        let order = f(p, &["order_violations"]).unwrap_or(nan);
        let dup = f(p, &["extra", "unflagged_duplicates"]).unwrap_or(nan);
        let phone = f(p, &["extra", "phone", "received"]).unwrap_or(nan);
        rows.push(Target {
            label: "devices catch-up",
            target: format!("{n} acked on another device → joining device ≤ 250 ms"),
            measured: format!(
                "{ms:.1} ms (joined after {:.1} ms; the other device read {phone})",
                f(p, &["extra", "joined_ms"]).unwrap_or(nan)
            ),
            met: Some(ms <= 250.0),
        });
        rows.push(Target {
            label: "devices catch-up order/loss",
            target: "all, in order, 0 lost, 0 duplicates".into(),
            measured: format!(
                "received {received} of {n}, order violations {order}, lost {lost}, duplicates {dup}"
            ),
            met: Some(received == n && order == 0.0 && lost == 0.0 && dup == 0.0),
        });
    }
    let lat = |k: &str, q: &str| parts.get(k).and_then(|p| f(p, &["latency_ms", q]));
    if let (Some(one), Some(n)) = (lat(LATENCY_ONE, "p99"), lat(LATENCY_MANY, "p99")) {
        let plain = [(LATENCY_NONE, 1.0), (LATENCY_PLAIN, many)]
            .iter()
            .filter_map(|(k, n)| lat(k, "p99").map(|x| format!("; {n} plain socket(s): {x:.2} ms")))
            .collect::<String>();
        rows.push(Target {
            label: "devices latency p99",
            target: format!("≤ 1.5 × 1-device p99 = {:.2} ms", 1.5 * one),
            measured: format!(
                "{n:.2} ms with {many} devices ({:.2} ×; p50 {:.2} vs {:.2} ms; 1 device: p99 {one:.2} ms{plain})",
                n / one,
                lat(LATENCY_MANY, "p50").unwrap_or(nan),
                lat(LATENCY_ONE, "p50").unwrap_or(nan),
            ),
            met: Some(n <= 1.5 * one),
        });
    }
    let rate = |k: &str| parts.get(k).and_then(|p| f(p, &["throughput_msgs_per_s"]));
    if let (Some(one), Some(n)) = (rate(THROUGHPUT_ONE), rate(THROUGHPUT_MANY)) {
        let plain = [(THROUGHPUT_NONE, 1.0), (THROUGHPUT_PLAIN, many)]
            .iter()
            .filter_map(|(k, n)| rate(k).map(|x| format!("; {n} plain socket(s): {x:.0} msg/s")))
            .collect::<String>();
        let open =
            [LATENCY_ONE, LATENCY_MANY].map(|k| rate(k).map_or("-".into(), |x| format!("{x:.0}")));
        rows.push(Target {
            label: "devices throughput",
            target: format!("≥ 60 % of 1-device rate = {:.0} msg/s", 0.6 * one),
            measured: format!(
                "{n:.0} msg/s with {many} devices ({:.0} % of 1 device's {one:.0}{plain}; the latency runs received {} vs {} msg/s)",
                100.0 * n / one,
                open[1],
                open[0]
            ),
            met: Some(n >= 0.6 * one),
        });
    }
    if let Some(map) = parts.as_object().filter(|m| !m.is_empty()) {
        let sum = |path: &[&str]| map.values().filter_map(|p| f(p, path)).sum::<f64>();
        let (lost, dup) = (sum(&["lost"]), sum(&["extra", "unflagged_duplicates"]));
        rows.push(Target {
            label: "devices loss",
            target: "0 lost, 0 duplicates (but `redelivery` ones) in every part".into(),
            measured: format!(
                "lost {lost}, duplicates {dup} ({} flagged redelivery) over {} deliveries in {} parts",
                sum(&["duplicates"]) - dup,
                sum(&["received"]),
                map.len()
            ),
            met: Some(lost == 0.0 && dup == 0.0),
        });
    }
    let join = &v["extra"]["up_to_date_join"];
    if let Some(explained) = f(join, &["execution_ms_total"]) {
        let profiled = f(join, &["profiled_join", "profile", "millis_total"]);
        let ops = join["profiled_join"]["profile"]["ops"]
            .as_array()
            .map_or(0, Vec::len);
        let sources = join["sources"]
            .as_array()
            .map_or(0, |s| s.len().saturating_sub(1));
        rows.push(Target {
            label: "devices up-to-date join",
            target: "≤ 2 ms MongoDB time of the join's reads".into(),
            measured: format!(
                "explain: {explained} ms (Σ executionTimeMillis of the device document and {sources} sources; {} keys, {} docs examined); profiler: {} ms over {ops} ops; timed here {:.0} µs (Σ round trips)",
                f(join, &["keys_examined_total"]).unwrap_or(nan),
                f(join, &["docs_examined_total"]).unwrap_or(nan),
                profiled.map_or("-".into(), |x| x.to_string()),
                f(join, &["round_trips_us_total"]).unwrap_or(nan),
            ),
            met: Some(explained <= 2.0 && profiled.is_none_or(|x| x <= 2.0)),
        });
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(p99_one: f64, p99_many: f64, rate_one: f64, rate_many: f64, join_ms: i64) -> Value {
        let part = |p99: f64, rate: f64| {
            json!({"latency_ms": {"p50": 1.0, "p99": p99}, "throughput_msgs_per_s": rate,
                   "lost": 0, "duplicates": 1, "received": 10, "extra": {"unflagged_duplicates": 0}})
        };
        json!({"params": {"many": 3}, "extra": {
            "parts": {
                CATCH_UP: {"received": 10000, "lost": 0, "order_violations": 0, "duplicates": 0,
                           "params": {"messages": 10000},
                           "extra": {"drain_ms": 160.0, "joined_ms": 30.0, "unflagged_duplicates": 0,
                                     "phone": {"received": 10000}}},
                LATENCY_ONE: part(p99_one, 500.0),
                LATENCY_MANY: part(p99_many, 500.0),
                THROUGHPUT_ONE: part(1.0, rate_one),
                THROUGHPUT_MANY: part(1.0, rate_many),
            },
            "up_to_date_join": {"execution_ms_total": join_ms, "keys_examined_total": 1,
                                "docs_examined_total": 1, "round_trips_us_total": 900.0,
                                "profiled_join": {"profile": {"millis_total": join_ms, "ops": []}}},
        }})
    }

    fn met(rows: &[Target]) -> Vec<(&'static str, Option<bool>)> {
        rows.iter().map(|t| (t.label, t.met)).collect()
    }

    #[test]
    fn each_target_is_judged_against_its_bound() {
        let ok = targets(&report(40.0, 60.0, 3000.0, 1800.0, 2));
        assert_eq!(
            met(&ok),
            [
                ("devices catch-up", Some(true)),
                ("devices catch-up order/loss", Some(true)),
                ("devices latency p99", Some(true)),
                ("devices throughput", Some(true)),
                ("devices loss", Some(true)),
                ("devices up-to-date join", Some(true)),
            ]
        );
        let missed = targets(&report(40.0, 61.0, 3000.0, 1799.0, 3));
        let judged: Vec<_> = met(&missed).into_iter().map(|(_, m)| m).collect();
        assert_eq!(
            judged,
            [
                Some(true),
                Some(true),
                Some(false),
                Some(false),
                Some(true),
                Some(false)
            ],
            "a redelivery-flagged duplicate is no loss; the bounds are strict"
        );
    }
}
