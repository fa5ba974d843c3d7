//! `idle`: C joined connections held open, for the server's memory per connection.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use futures::StreamExt;
use msgbuf::parse_duration;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::conn::{run_id, Common, Connector};
use crate::frames::{classify, Incoming};
use crate::histogram::{new_hist, LatencyMs};
use crate::procfs::{proc_status_kib, raise_nofile};
use crate::report::Report;
use crate::stamp::now_us;

#[derive(Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Joined connections to hold (all on the first URL).
    #[arg(long, default_value_t = 50_000)]
    pub connections: usize,
    /// Connections per user (each user distinct by default).
    #[arg(long, default_value_t = 1)]
    pub per_user: usize,
    /// Source addresses to bind client sockets to (round-robin); default
    /// 127.0.0.2, 127.0.0.3, … one per 10,000 connections.
    #[arg(long, value_delimiter = ',')]
    pub source_addrs: Vec<IpAddr>,
    /// Handshakes + joins in progress at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// How long to hold the connections once all are joined.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub hold: Duration,
    /// Upper bound on connecting them all.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Server process to sample VmRSS of (before connecting, and once all are joined).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// File written (with the joined count) once all connections are joined.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Connect (WebSocket, and for Socket.IO the namespace) but never send `join_chat`
    /// (splits the cost per connection
    /// into "open socket" and "joined session").
    #[arg(long)]
    pub no_join: bool,
}

pub async fn idle(args: IdleArgs) -> anyhow::Result<()> {
    let c = &args.common;
    let total = args.connections;
    let nofile = raise_nofile(total as u64 + 4096);
    if nofile < total as u64 + 100 {
        bail!("RLIMIT_NOFILE is {nofile}; {total} connections need more (run as root or raise `ulimit -Hn`)");
    }
    let sources: Vec<IpAddr> = if args.source_addrs.is_empty() {
        (0..total.div_ceil(10_000).max(1))
            .map(|k| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + k as u8)))
            .collect()
    } else {
        args.source_addrs.clone()
    };
    let url = c.urls[0].clone();
    let run = run_id(c);
    let per_user = args.per_user.max(1);
    let no_join = args.no_join;
    let mut report = Report::new(
        "idle",
        json!({"proto": c.proto.to_string(), "connections": total, "per_user": per_user, "url": url,
               "sources": sources.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
               "concurrency": args.concurrency, "hold_s": args.hold.as_secs_f64(), "join": !no_join}),
    );
    report.latency_basis = "TCP connect → WebSocket handshake → joined, per connection".into();
    let rss_before = args.server_pid.and_then(|p| proc_status_kib(p, "VmRSS"));
    let connector = Arc::new(Connector::new(c));
    let stop = CancellationToken::new();
    let drops = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut hist = new_hist();
    let mut holders = Vec::with_capacity(total);
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut joined = 0usize;
    let mut next_report = Instant::now() + Duration::from_secs(5);
    let mut attempts = futures::stream::iter(0..total)
        .map(|i| {
            let (connector, url, src) =
                (connector.clone(), url.clone(), sources[i % sources.len()]);
            let user = format!("{run}-i{}", i / per_user);
            async move {
                let start = now_us();
                let r = if no_join {
                    tokio::time::timeout(
                        Duration::from_secs(60),
                        connector.connect(&url, &user, Some(src), 512),
                    )
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("connect timed out")))
                    .map(|ws| (ws, 0))
                } else {
                    connector
                        .connect_joined(&url, &user, Some(src), 512, Duration::from_secs(60), None)
                        .await
                };
                (r, now_us() - start)
            }
        })
        .buffer_unordered(args.concurrency.max(1));
    let connect_deadline = tokio::time::Instant::now() + args.connect_timeout;
    loop {
        let next = tokio::time::timeout_at(connect_deadline, attempts.next()).await;
        let Ok(Some((result, us))) = next else {
            if next.is_err() {
                *failures
                    .entry("connect phase timed out".into())
                    .or_default() += 1;
            }
            break;
        };
        match result {
            Ok((mut ws, _)) => {
                joined += 1;
                hist.saturating_record(us.max(1));
                let (stop, drops) = (stop.clone(), drops.clone());
                holders.push(tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            received = ws.recv() => match classify(received) {
                                Incoming::Closed(_) => { drops.fetch_add(1, Relaxed); return; }
                                _ => continue,
                            },
                        }
                    }
                    drop(ws);
                }));
            }
            Err(e) => {
                let key = e.root_cause().to_string();
                let key: String = key.chars().take(80).collect();
                *failures.entry(key).or_default() += 1;
            }
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(5);
            eprintln!(
                "idle: {joined} joined, {} failed, {:.0} s",
                failures.values().sum::<u64>(),
                t0.elapsed().as_secs_f64()
            );
        }
    }
    drop(attempts);
    let connect_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "idle: {joined} of {total} connections joined in {connect_s:.1} s; holding for {:?}",
        args.hold
    );
    // Let the server settle (allocator, tasks parked) before sampling.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_joined = args.server_pid.and_then(|p| proc_status_kib(p, "VmRSS"));
    if let Some(path) = &args.ready_file {
        std::fs::write(path, format!("{joined}\n"))?;
    }
    tokio::time::sleep(args.hold.saturating_sub(Duration::from_secs(2))).await;
    let rss_end = args.server_pid.and_then(|p| proc_status_kib(p, "VmRSS"));
    let hwm = args.server_pid.and_then(|p| proc_status_kib(p, "VmHWM"));
    let dropped = drops.load(Relaxed);
    stop.cancel();
    for h in holders {
        let _ = h.await;
    }
    report.sent = total as u64;
    report.accepted = joined as u64;
    report.errors = failures.values().sum();
    report.error_codes = failures;
    report.latency_ms = LatencyMs::of(&hist);
    report.duration_s = connect_s;
    report.throughput_msgs_per_s = joined as f64 / connect_s.max(1e-9);
    report.extra.insert("joined".into(), json!(joined));
    report
        .extra
        .insert("dropped_while_held".into(), json!(dropped));
    report.extra.insert("connect_s".into(), json!(connect_s));
    report.extra.insert("nofile".into(), json!(nofile));
    report
        .extra
        .insert("server_rss_before_kib".into(), json!(rss_before));
    report
        .extra
        .insert("server_rss_joined_kib".into(), json!(rss_joined));
    report
        .extra
        .insert("server_rss_end_kib".into(), json!(rss_end));
    report.extra.insert("server_hwm_kib".into(), json!(hwm));
    if let (Some(b), Some(a)) = (rss_before, rss_joined) {
        if joined > 0 {
            let per = (a as f64 - b as f64) * 1024.0 / joined as f64;
            report
                .extra
                .insert("server_rss_growth_bytes_per_conn".into(), json!(per));
        }
    }
    report.finish(c.json.as_deref())
}
