//! `msgbuf-loadgen`: load generator and measurement tool for msgbuf (see BENCHMARKS.md).
//!
//! Scenarios (each prints a table and, with `--json FILE`, writes one JSON object):
//! - `latency`: open loop at a fixed total rate; send → receive latency (HDR histogram).
//! - `throughput`: closed loop, a bounded window of undelivered messages per sender.
//! - `drain`: K messages buffered for an offline user, then the user joins; time to the last.
//! - `idle`: C joined connections held open, for the server's memory per connection.
//! - `floor`: MongoDB alone: insert → change event latency and the insert+notify rate.
//!
//! Helpers for `scripts/bench`: `summary DIR` (targets table), `free-port`.
//!
//! Every message carries its (scheduled) send time in its text, `t=<µs>;p=<pair>;n=<seq>;`,
//! in microseconds since this process started; senders and receivers live in this process,
//! so one monotonic clock measures send → receive. All load is bounded in count and time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use msgbuf::auth::Auth;
use msgbuf::config::parse_duration;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

type Ws = WebSocketStream<TcpStream>;

/// Server selection timeout of the load generator's own MongoDB client (setup and audits).
const MONGODB_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// Command line

#[derive(Parser)]
#[command(
    name = "msgbuf-loadgen",
    about = "Load generator for msgbuf: latency, throughput, drain, idle, floor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open loop at a fixed total rate; send → receive latency.
    Latency(LatencyArgs),
    /// Closed loop: as fast as the system sustains with a window per sender.
    Throughput(ThroughputArgs),
    /// K messages buffered for an offline user, then the user joins.
    Drain(DrainArgs),
    /// C joined connections held open (server memory per connection).
    Idle(IdleArgs),
    /// MongoDB alone: insert → change-event latency and max insert+notify rate.
    Floor(FloorArgs),
    /// Reads the JSON results in DIR and prints (and writes) the targets table.
    Summary(SummaryArgs),
    /// Selected serverStatus counters of a mongod (deltas with `--baseline`), as JSON.
    MongoStats(MongoStatsArgs),
    /// Prints a free TCP port on 127.0.0.1.
    FreePort,
}

#[derive(Args, Clone)]
struct Common {
    /// Comma-separated WebSocket URLs of the instances (ws://127.0.0.1:PORT/ws).
    #[arg(long, value_delimiter = ',', required = true)]
    urls: Vec<String>,
    /// HS256 secret the instances verify tokens with.
    #[arg(long, env = "MSGBUF_JWT_SECRET", hide_env_values = true)]
    secret: String,
    /// Write the result as one JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Prefix of user names (default: lg-<pid>-<unix seconds>), so runs do not mix.
    #[arg(long)]
    run_id: Option<String>,
    /// After sending stops: how long to wait for outstanding replies and deliveries.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    grace: Duration,
    /// Bytes of each message text (the timestamp header is padded up to this).
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Receivers send an `ack` at least this often (batched ids); 0 (the default) acks each
    /// message as soon as it is read, as an interactive client would (the server batches).
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    ack_interval: Duration,
    /// Diagnostics only: receivers never ack (no ack writes, no receipts; messages are
    /// re-sent after the server's ack timeout).
    #[arg(long)]
    no_ack: bool,
}

#[derive(Args)]
struct LatencyArgs {
    #[command(flatten)]
    common: Common,
    /// Users in all: half senders, half receivers (sender i → receiver i).
    #[arg(long, default_value_t = 200)]
    users: usize,
    /// Total messages per second (open loop, spread evenly over the senders).
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
}

#[derive(Args)]
struct ThroughputArgs {
    #[command(flatten)]
    common: Common,
    /// Senders (and as many receivers).
    #[arg(long, default_value_t = 32)]
    senders: usize,
    /// Messages per sender sent but not yet received by its receiver.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Measured time.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured time before it (load already on).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    warmup: Duration,
}

#[derive(Args)]
struct DrainArgs {
    #[command(flatten)]
    common: Common,
    /// Messages buffered for the offline user.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Senders sharing them (round-robin over the URLs).
    #[arg(long, default_value_t = 8)]
    senders: usize,
    /// Pipelined sends per sender.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// How long the joining user may take to receive everything.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
    /// When given: before the join, `explain` (executionStats) the server's drain queries
    /// (msgbuf's own filter) against this replica set and put the plans in the report.
    #[arg(long)]
    mongodb_uri: Option<String>,
    /// Database msgbuf uses (for `--mongodb-uri`).
    #[arg(long, default_value = "msgbuf")]
    db: String,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    /// Joined connections to hold (all on the first URL).
    #[arg(long, default_value_t = 50_000)]
    connections: usize,
    /// Connections per user (each user distinct by default).
    #[arg(long, default_value_t = 1)]
    per_user: usize,
    /// Source addresses to bind client sockets to (round-robin); default
    /// 127.0.0.2, 127.0.0.3, … one per 10,000 connections.
    #[arg(long, value_delimiter = ',')]
    source_addrs: Vec<IpAddr>,
    /// Handshakes + joins in progress at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// How long to hold the connections once all are joined.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    hold: Duration,
    /// Upper bound on connecting them all.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Server process to sample VmRSS of (before connecting, and once all are joined).
    #[arg(long)]
    server_pid: Option<u32>,
    /// File written (with the joined count) once all connections are joined.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Upgrade to WebSocket but never send `join_chat` (splits the cost per connection
    /// into "open socket" and "joined session").
    #[arg(long)]
    no_join: bool,
}

#[derive(Args)]
struct FloorArgs {
    /// Replica set to measure (a scratch database is created and dropped).
    #[arg(long, env = "MSGBUF_MONGODB_URI")]
    mongodb_uri: String,
    /// The mongod process: its CPU time per phase goes into the report.
    #[arg(long)]
    mongod_pid: Option<u32>,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Inserts per second in the latency phase (open loop).
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Concurrent writers in the throughput phase (each: insert, wait, insert …).
    #[arg(long, default_value_t = 32)]
    writers: usize,
    /// Documents per insert in the throughput phase (1 = insertOne).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    throughput_duration: Duration,
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    warmup: Duration,
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Grace for the last change events.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    grace: Duration,
}

#[derive(Args)]
struct MongoStatsArgs {
    #[arg(long, env = "MSGBUF_MONGODB_URI")]
    mongodb_uri: String,
    /// Write here (else stdout).
    #[arg(long)]
    out: Option<PathBuf>,
    /// An earlier output of this command: print the differences since then.
    #[arg(long)]
    baseline: Option<PathBuf>,
}

#[derive(Args)]
struct SummaryArgs {
    /// Directory holding floor.json, latency.json, throughput.json, drain.json, idle.json
    /// (and the *.procs.json files written by scripts/bench).
    dir: PathBuf,
}

// ---------------------------------------------------------------------------------------
// Clock, message text, frames

static EPOCH: OnceLock<Instant> = OnceLock::new();

fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// Microseconds since this process started (monotonic).
fn now_us() -> u64 {
    epoch().elapsed().as_micros() as u64
}

fn instant_of(us: u64) -> tokio::time::Instant {
    tokio::time::Instant::from_std(epoch() + Duration::from_micros(us))
}

fn body(t_us: u64, pair: usize, seq: u64, size: usize) -> String {
    let mut s = format!("t={t_us};p={pair};n={seq};");
    if s.len() < size {
        s.extend(std::iter::repeat_n('x', size - s.len()));
    }
    s
}

/// (t, pair, seq) from a message text written by [`body`].
fn parse_body(s: &str) -> Option<(u64, usize, u64)> {
    let mut it = s.split(';');
    let t = it.next()?.strip_prefix("t=")?.parse().ok()?;
    let p = it.next()?.strip_prefix("p=")?.parse().ok()?;
    let n = it.next()?.strip_prefix("n=")?.parse().ok()?;
    Some((t, p, n))
}

fn chat_frame(to: &str, chat: &str, text: &str, client_msg_id: &str) -> String {
    json!({"event": "chat_message", "data": {
        "to": to, "chatId": chat, "message": text, "clientMsgId": client_msg_id}})
    .to_string()
}

#[derive(Deserialize)]
struct InFrame {
    event: String,
    #[serde(default)]
    data: InData,
}

#[derive(Deserialize, Default)]
struct InData {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "clientMsgId")]
    client_msg_id: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    redelivery: bool,
    #[serde(default)]
    pending: Option<u64>,
    #[serde(default)]
    instance: Option<String>,
}

enum Incoming {
    Frame(InFrame),
    /// Ping/pong/binary/unparseable: ignored.
    Other,
    Closed(String),
}

fn classify(msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> Incoming {
    match msg {
        None => Incoming::Closed("eof".into()),
        Some(Err(e)) => Incoming::Closed(e.to_string()),
        Some(Ok(Message::Text(t))) => match serde_json::from_str::<InFrame>(t.as_str()) {
            Ok(f) => Incoming::Frame(f),
            Err(_) => Incoming::Other,
        },
        Some(Ok(Message::Close(frame))) => Incoming::Closed(format!(
            "close {}",
            frame.map(|f| u16::from(f.code)).unwrap_or(1005)
        )),
        Some(Ok(_)) => Incoming::Other,
    }
}

// ---------------------------------------------------------------------------------------
// Connections

struct Connector {
    auth: Auth,
}

impl Connector {
    fn new(secret: &str) -> Self {
        Connector {
            auth: Auth::new(secret, None, None),
        }
    }

    /// TCP (optionally bound to `source`) + WebSocket handshake with small buffers.
    async fn connect(
        &self,
        url: &str,
        user: &str,
        source: Option<IpAddr>,
        read_buffer: usize,
    ) -> anyhow::Result<Ws> {
        let token = self.auth.mint(user, false, Duration::from_secs(4 * 3600))?;
        let mut request = url.into_client_request()?;
        request
            .headers_mut()
            .insert("Authorization", format!("Bearer {token}").parse()?);
        let host = request.uri().host().context("URL without host")?.to_owned();
        let port = request.uri().port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await?
            .next()
            .context("host did not resolve")?;
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(src) = source {
            socket
                .bind(SocketAddr::new(src, 0))
                .with_context(|| format!("binding to {src}"))?;
        }
        let tcp = socket.connect(addr).await?;
        tcp.set_nodelay(true)?;
        let config = WebSocketConfig::default()
            .read_buffer_size(read_buffer)
            .write_buffer_size(0)
            .max_message_size(Some(1 << 20));
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(request, tcp, Some(config)).await?;
        Ok(ws)
    }

    /// Connects and joins; returns the socket and the `joined` data's `pending`.
    async fn connect_joined(
        &self,
        url: &str,
        user: &str,
        source: Option<IpAddr>,
        read_buffer: usize,
        timeout: Duration,
    ) -> anyhow::Result<(Ws, u64)> {
        let fut = async {
            let mut ws = self.connect(url, user, source, read_buffer).await?;
            let pending = join(&mut ws).await?;
            Ok::<_, anyhow::Error>((ws, pending))
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| anyhow::anyhow!("connect+join timed out after {timeout:?}"))?
    }
}

async fn join(ws: &mut Ws) -> anyhow::Result<u64> {
    ws.send(Message::Text(
        r#"{"event":"join_chat","data":{}}"#.to_owned().into(),
    ))
    .await?;
    loop {
        match classify(ws.next().await) {
            Incoming::Frame(f) if f.event == "joined" => return Ok(f.data.pending.unwrap_or(0)),
            Incoming::Frame(f) if f.event == "error" => {
                bail!("join refused: {:?} {:?}", f.data.code, f.data.message)
            }
            Incoming::Frame(_) | Incoming::Other => continue,
            Incoming::Closed(why) => bail!("closed before joined: {why}"),
        }
    }
}

/// Connects and joins many users at once (bounded concurrency), in input order.
async fn connect_all(
    connector: &Arc<Connector>,
    targets: Vec<(String, String)>,
    read_buffer: usize,
) -> anyhow::Result<Vec<Ws>> {
    let results: Vec<anyhow::Result<Ws>> = futures::stream::iter(targets)
        .map(|(url, user)| {
            let c = connector.clone();
            async move {
                c.connect_joined(&url, &user, None, read_buffer, Duration::from_secs(30))
                    .await
                    .map(|(ws, _)| ws)
                    .with_context(|| format!("{user} on {url}"))
            }
        })
        .buffered(64)
        .collect()
        .await;
    results.into_iter().collect()
}

fn run_id(common: &Common) -> String {
    common.run_id.clone().unwrap_or_else(|| {
        format!(
            "lg{}-{}",
            std::process::id(),
            msgbuf::auth::unix_now() % 1_000_000
        )
    })
}

// ---------------------------------------------------------------------------------------
// Shared counters and per-task results

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    accepted: AtomicU64,
    errors: AtomicU64,
    received: AtomicU64,
}

impl Counters {
    fn get(&self) -> (u64, u64, u64, u64) {
        (
            self.sent.load(Relaxed),
            self.accepted.load(Relaxed),
            self.errors.load(Relaxed),
            self.received.load(Relaxed),
        )
    }
}

struct SenderOut {
    sent: u64,
    accepted: HashSet<String>,
    errors: BTreeMap<String, u64>,
    receipts: u64,
    closed: Option<String>,
    /// send → message_accepted.
    accept_hist: Histogram<u64>,
    /// send → receipt (the receiver's ack went round through MongoDB).
    receipt_hist: Histogram<u64>,
}

impl Default for SenderOut {
    fn default() -> Self {
        SenderOut {
            sent: 0,
            accepted: HashSet::new(),
            errors: BTreeMap::new(),
            receipts: 0,
            closed: None,
            accept_hist: new_hist(),
            receipt_hist: new_hist(),
        }
    }
}

struct ReceiverOut {
    ids: HashSet<String>,
    hist: Histogram<u64>,
    duplicates: u64,
    redeliveries: u64,
    order_violations: u64,
    foreign: u64,
    /// Unique messages received per second since `t0` (index = second).
    per_second: Vec<u64>,
    /// The worst send → receive latency (µs) of the messages received in each second: shows
    /// whether a tail is spread out or a few stalls.
    max_per_second: Vec<u64>,
    acked: u64,
    closed: Option<String>,
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 1 h, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

/// How a sender paces itself.
enum Pace {
    /// Open loop: message k of this sender is due at `start_us + offset_us + k * interval_us`,
    /// and that scheduled time is what its latency is measured from.
    Open {
        start_us: u64,
        offset_us: u64,
        interval_us: u64,
        count: u64,
    },
    /// Closed loop: a permit per message; receivers return permits. Stops at `until_us`.
    Window {
        permits: Arc<Semaphore>,
        until_us: u64,
    },
}

#[allow(clippy::too_many_arguments)]
async fn sender_task(
    mut ws: Ws,
    pair: usize,
    to: String,
    chat: String,
    size: usize,
    pace: Pace,
    counters: Arc<Counters>,
    stop_sending: CancellationToken,
    stop: CancellationToken,
) -> SenderOut {
    let mut out = SenderOut::default();
    let mut seq: u64 = 0;
    let mut sending = true;
    // seq → send time until accepted; id → send time until the receipt.
    let mut sent_at: HashMap<u64, u64> = HashMap::new();
    let mut accepted_at: HashMap<String, u64> = HashMap::new();
    loop {
        let due = match &pace {
            Pace::Open {
                start_us,
                offset_us,
                interval_us,
                count,
            } => {
                if seq >= *count {
                    sending = false;
                }
                Some(start_us + offset_us + seq * interval_us)
            }
            Pace::Window { until_us, .. } => {
                if now_us() >= *until_us {
                    sending = false;
                }
                None
            }
        };
        let permits = match &pace {
            Pace::Window { permits, .. } => Some(permits.clone()),
            Pace::Open { .. } => None,
        };
        let go = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = stop_sending.cancelled(), if sending => { sending = false; continue; }
            _ = sleep_until_us(due), if sending && due.is_some() => true,
            _ = acquire(permits), if sending && due.is_none() => true,
            msg = ws.next() => {
                match classify(msg) {
                    Incoming::Frame(f) => match f.event.as_str() {
                        "message_accepted" => {
                            let now = now_us();
                            let t = f.data.client_msg_id.and_then(|c| c.parse::<u64>().ok())
                                .and_then(|seq| sent_at.remove(&seq));
                            if let Some(t) = t {
                                out.accept_hist.saturating_record(now.saturating_sub(t).max(1));
                            }
                            if let Some(id) = f.data.id {
                                if let Some(t) = t {
                                    accepted_at.insert(id.clone(), t);
                                }
                                if out.accepted.insert(id) {
                                    counters.accepted.fetch_add(1, Relaxed);
                                }
                            }
                        }
                        "error" => {
                            *out.errors.entry(f.data.code.unwrap_or_default()).or_default() += 1;
                            counters.errors.fetch_add(1, Relaxed);
                            // That message will never arrive: give its window slot back.
                            if let Pace::Window { permits, .. } = &pace {
                                if f.data.client_msg_id.is_some() {
                                    permits.add_permits(1);
                                }
                            }
                        }
                        "receipt" => {
                            out.receipts += 1;
                            if let Some(t) = f.data.id.and_then(|id| accepted_at.remove(&id)) {
                                out.receipt_hist.saturating_record(now_us().saturating_sub(t).max(1));
                            }
                        }
                        _ => {}
                    },
                    Incoming::Other => {}
                    Incoming::Closed(why) => { out.closed = Some(why); break; }
                }
                false
            }
        };
        if go {
            let t = due.unwrap_or_else(now_us);
            let frame = chat_frame(&to, &chat, &body(t, pair, seq, size), &seq.to_string());
            if let Err(e) = ws.send(Message::Text(frame.into())).await {
                out.closed = Some(e.to_string());
                break;
            }
            sent_at.insert(seq, t);
            seq += 1;
            out.sent += 1;
            counters.sent.fetch_add(1, Relaxed);
        }
    }
    let _ = ws.close(None).await;
    out
}

async fn sleep_until_us(due: Option<u64>) {
    if let Some(us) = due {
        tokio::time::sleep_until(instant_of(us)).await;
    }
}

async fn acquire(permits: Option<Arc<Semaphore>>) {
    match permits {
        Some(p) => {
            if let Ok(permit) = p.acquire().await {
                permit.forget();
            } else {
                std::future::pending::<()>().await
            }
        }
        None => std::future::pending::<()>().await,
    }
}

#[allow(clippy::too_many_arguments)]
async fn receiver_task(
    mut ws: Ws,
    pair: usize,
    t0_us: u64,
    ack_interval: Option<Duration>,
    permits: Option<Arc<Semaphore>>,
    counters: Arc<Counters>,
    stop: CancellationToken,
) -> ReceiverOut {
    let mut out = ReceiverOut {
        ids: HashSet::new(),
        hist: new_hist(),
        duplicates: 0,
        redeliveries: 0,
        order_violations: 0,
        foreign: 0,
        per_second: Vec::new(),
        max_per_second: Vec::new(),
        acked: 0,
        closed: None,
    };
    let mut last_seq: Option<u64> = None;
    let mut pending_acks: Vec<String> = Vec::new();
    let acking = ack_interval.is_some();
    let ack_at_once = ack_interval == Some(Duration::ZERO);
    let every = ack_interval.filter(|d| !d.is_zero());
    let mut tick = tokio::time::interval(every.unwrap_or(Duration::from_secs(3600)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let flush = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = tick.tick() => !pending_acks.is_empty(),
            msg = ws.next() => {
                match classify(msg) {
                    Incoming::Frame(f) if f.event == "chat_message" => {
                        let now = now_us();
                        let id = f.data.id.unwrap_or_default();
                        if f.data.redelivery {
                            out.redeliveries += 1;
                        }
                        if !out.ids.insert(id.clone()) {
                            out.duplicates += 1;
                        } else {
                            counters.received.fetch_add(1, Relaxed);
                            let sec = (now.saturating_sub(t0_us) / 1_000_000) as usize;
                            if out.per_second.len() <= sec {
                                out.per_second.resize(sec + 1, 0);
                                out.max_per_second.resize(sec + 1, 0);
                            }
                            out.per_second[sec] += 1;
                            match f.data.message.as_deref().and_then(parse_body) {
                                Some((t, p, n)) if p == pair => {
                                    let us = now.saturating_sub(t).max(1);
                                    out.hist.saturating_record(us);
                                    out.max_per_second[sec] = out.max_per_second[sec].max(us);
                                    if last_seq.is_some_and(|l| n <= l) {
                                        out.order_violations += 1;
                                    }
                                    last_seq = Some(n);
                                    if let Some(p) = &permits {
                                        p.add_permits(1);
                                    }
                                }
                                _ => out.foreign += 1,
                            }
                            if acking {
                                pending_acks.push(id);
                            }
                        }
                        (ack_at_once && !pending_acks.is_empty()) || pending_acks.len() >= 500
                    }
                    Incoming::Frame(_) | Incoming::Other => false,
                    Incoming::Closed(why) => { out.closed = Some(why); break; }
                }
            }
        };
        if flush {
            out.acked += pending_acks.len() as u64;
            let frame = json!({"event": "ack", "data": {"ids": pending_acks}}).to_string();
            pending_acks.clear();
            if let Err(e) = ws.send(Message::Text(frame.into())).await {
                out.closed = Some(e.to_string());
                break;
            }
        }
    }
    if !pending_acks.is_empty() {
        out.acked += pending_acks.len() as u64;
        let frame = json!({"event": "ack", "data": {"ids": pending_acks}}).to_string();
        let _ = ws.send(Message::Text(frame.into())).await;
    }
    let _ = ws.close(None).await;
    out
}

// ---------------------------------------------------------------------------------------
// Report

#[derive(Serialize, Deserialize, Default, Clone)]
struct LatencyMs {
    count: u64,
    #[serde(default)]
    min: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
    mean: f64,
}

impl LatencyMs {
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return LatencyMs::default();
        }
        LatencyMs {
            count: h.len(),
            min: ms(h.min()),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

#[derive(Serialize, Deserialize, Default, Clone)]
struct Report {
    scenario: String,
    params: Value,
    sent: u64,
    accepted: u64,
    errors: u64,
    error_codes: BTreeMap<String, u64>,
    received: u64,
    /// Accepted (or, for floor, acknowledged) but never received.
    lost: u64,
    /// The same id twice on one socket (or stream).
    duplicates: u64,
    /// Of those and others: frames flagged `"redelivery": true`.
    redeliveries: u64,
    /// Received, but no `message_accepted` for it was seen.
    unexpected: u64,
    order_violations: u64,
    /// Seconds over which `throughput_msgs_per_s` is computed.
    duration_s: f64,
    throughput_msgs_per_s: f64,
    /// What the latency numbers measure.
    latency_basis: String,
    latency_ms: LatencyMs,
    loadgen_cpu_s: f64,
    extra: BTreeMap<String, Value>,
}

impl Report {
    fn new(scenario: &str, params: Value) -> Self {
        Report {
            scenario: scenario.to_owned(),
            params,
            ..Default::default()
        }
    }

    fn print(&self) {
        let row = |k: &str, v: String| println!("  {k:<22} {v}");
        println!("== {} ==", self.scenario);
        row("params", self.params.to_string());
        row("sent", self.sent.to_string());
        row("accepted", self.accepted.to_string());
        row("errors", format!("{} {:?}", self.errors, self.error_codes));
        row("received", self.received.to_string());
        row("lost", self.lost.to_string());
        row("duplicates", self.duplicates.to_string());
        row("redeliveries", self.redeliveries.to_string());
        row("unexpected", self.unexpected.to_string());
        row("order violations", self.order_violations.to_string());
        row(
            "throughput",
            format!(
                "{:.1} msg/s over {:.1} s",
                self.throughput_msgs_per_s, self.duration_s
            ),
        );
        let l = &self.latency_ms;
        row("latency basis", self.latency_basis.clone());
        row(
            "latency ms",
            format!(
                "n={} p50={:.2} p90={:.2} p99={:.2} p99.9={:.2} max={:.2} mean={:.2}",
                l.count, l.p50, l.p90, l.p99, l.p999, l.max, l.mean
            ),
        );
        row("loadgen cpu", format!("{:.2} s", self.loadgen_cpu_s));
        for (k, v) in &self.extra {
            if !v.is_array() {
                row(k, v.to_string());
            }
        }
    }

    fn finish(mut self, json_path: Option<&Path>) -> anyhow::Result<()> {
        self.loadgen_cpu_s = self_cpu_seconds();
        self.print();
        if let Some(path) = json_path {
            std::fs::write(path, serde_json::to_string_pretty(&self)? + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

fn self_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct we hand it.
    unsafe {
        let mut r: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut r) != 0 {
            return 0.0;
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(r.ru_utime) + tv(r.ru_stime)
    }
}

/// utime + stime of a process, in seconds.
fn proc_cpu_s(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// VmRSS / VmHWM (KiB) of a process.
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn raise_nofile(want: u64) -> u64 {
    // SAFETY: plain libc calls on a stack struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        if r.rlim_cur < want {
            let new = libc::rlimit {
                rlim_cur: want,
                rlim_max: r.rlim_max.max(want),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &new) != 0 {
                // Not allowed to raise the hard limit: take what it allows.
                let new = libc::rlimit {
                    rlim_cur: r.rlim_max,
                    rlim_max: r.rlim_max,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &new);
            }
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        }
        r.rlim_cur
    }
}

// ---------------------------------------------------------------------------------------
// latency and throughput: pairs of sender → receiver

struct PairRun {
    senders: Vec<tokio::task::JoinHandle<SenderOut>>,
    receivers: Vec<tokio::task::JoinHandle<ReceiverOut>>,
    counters: Arc<Counters>,
    stop_sending: CancellationToken,
    stop: CancellationToken,
}

/// Sets up `pairs` joined receivers and joined senders; sender i and receiver i are on
/// different instances when there are two or more URLs.
async fn setup_pairs(
    common: &Common,
    pairs: usize,
    read_buffer: usize,
) -> anyhow::Result<(Vec<Ws>, Vec<Ws>, String)> {
    let connector = Arc::new(Connector::new(&common.secret));
    let run = run_id(common);
    let n = common.urls.len();
    let receivers = connect_all(
        &connector,
        (0..pairs)
            .map(|i| (common.urls[(i + 1) % n].clone(), format!("{run}-r{i}")))
            .collect(),
        read_buffer,
    )
    .await?;
    let senders = connect_all(
        &connector,
        (0..pairs)
            .map(|i| (common.urls[i % n].clone(), format!("{run}-s{i}")))
            .collect(),
        read_buffer,
    )
    .await?;
    Ok((senders, receivers, run))
}

fn start_pairs(
    common: &Common,
    senders: Vec<Ws>,
    receivers: Vec<Ws>,
    run: &str,
    t0_us: u64,
    mut pace: impl FnMut(usize) -> Pace,
    permits: &[Arc<Semaphore>],
) -> PairRun {
    let counters = Arc::new(Counters::default());
    let stop_sending = CancellationToken::new();
    let stop = CancellationToken::new();
    let receivers = receivers
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            tokio::spawn(receiver_task(
                ws,
                i,
                t0_us,
                (!common.no_ack).then_some(common.ack_interval),
                permits.get(i).cloned(),
                counters.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let senders = senders
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            tokio::spawn(sender_task(
                ws,
                i,
                format!("{run}-r{i}"),
                format!("{run}-c{i}"),
                common.size,
                pace(i),
                counters.clone(),
                stop_sending.clone(),
                stop.clone(),
            ))
        })
        .collect();
    PairRun {
        senders,
        receivers,
        counters,
        stop_sending,
        stop,
    }
}

/// Waits until every send is answered and every accepted message received (or `grace`),
/// then stops everything and merges the results into `report`.
async fn finish_pairs(
    run: PairRun,
    grace: Duration,
    report: &mut Report,
    window: Option<(u64, u64)>,
    t0_us: u64,
) -> anyhow::Result<()> {
    run.stop_sending.cancel();
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let (sent, accepted, errors, received) = run.counters.get();
        if accepted + errors >= sent && received >= accepted {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!(
                "grace over: sent {sent}, answered {}, accepted {accepted}, received {received}",
                accepted + errors
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let late duplicates show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    run.stop.cancel();
    let mut senders = Vec::new();
    for h in run.senders {
        senders.push(h.await?);
    }
    let mut receivers = Vec::new();
    for h in run.receivers {
        receivers.push(h.await?);
    }
    let mut hist = new_hist();
    let mut accept_hist = new_hist();
    let mut receipt_hist = new_hist();
    let mut per_second: Vec<u64> = Vec::new();
    let mut max_per_second: Vec<u64> = Vec::new();
    let mut closed = Vec::new();
    let mut receipts = 0;
    let mut acked = 0;
    let mut foreign = 0;
    for (i, (s, r)) in senders.iter().zip(&receivers).enumerate() {
        report.sent += s.sent;
        report.accepted += s.accepted.len() as u64;
        for (code, n) in &s.errors {
            report.errors += n;
            *report.error_codes.entry(code.clone()).or_default() += n;
        }
        receipts += s.receipts;
        accept_hist.add(&s.accept_hist).ok();
        receipt_hist.add(&s.receipt_hist).ok();
        report.received += r.ids.len() as u64;
        report.lost += s.accepted.difference(&r.ids).count() as u64;
        report.unexpected += r.ids.difference(&s.accepted).count() as u64;
        report.duplicates += r.duplicates;
        report.redeliveries += r.redeliveries;
        report.order_violations += r.order_violations;
        foreign += r.foreign;
        acked += r.acked;
        hist.add(&r.hist).ok();
        if per_second.len() < r.per_second.len() {
            per_second.resize(r.per_second.len(), 0);
        }
        for (k, n) in r.per_second.iter().enumerate() {
            per_second[k] += n;
        }
        if max_per_second.len() < r.max_per_second.len() {
            max_per_second.resize(r.max_per_second.len(), 0);
        }
        for (k, us) in r.max_per_second.iter().enumerate() {
            max_per_second[k] = max_per_second[k].max(*us);
        }
        if let Some(why) = &s.closed {
            closed.push(format!("sender {i}: {why}"));
        }
        if let Some(why) = &r.closed {
            closed.push(format!("receiver {i}: {why}"));
        }
    }
    report.latency_ms = LatencyMs::of(&hist);
    let (from, to) = window.unwrap_or((0, per_second.len() as u64));
    let in_window: u64 = per_second
        .iter()
        .enumerate()
        .filter(|(k, _)| (*k as u64) >= from && (*k as u64) < to)
        .map(|(_, n)| n)
        .sum();
    let secs = (to - from).max(1) as f64;
    report.duration_s = secs;
    report.throughput_msgs_per_s = in_window as f64 / secs;
    report.extra.insert("receipts".into(), json!(receipts));
    report.extra.insert(
        "accept_latency_ms".into(),
        serde_json::to_value(LatencyMs::of(&accept_hist))?,
    );
    report.extra.insert(
        "receipt_latency_ms".into(),
        serde_json::to_value(LatencyMs::of(&receipt_hist))?,
    );
    report.extra.insert("acked".into(), json!(acked));
    report.extra.insert("foreign".into(), json!(foreign));
    report
        .extra
        .insert("unexpected_closes".into(), json!(closed.len()));
    report.extra.insert("closes".into(), json!(closed));
    report
        .extra
        .insert("received_per_second".into(), json!(per_second));
    let max_ms: Vec<f64> = max_per_second
        .iter()
        .map(|us| (*us as f64 / 10.0).round() / 100.0)
        .collect();
    report
        .extra
        .insert("max_latency_ms_per_second".into(), json!(max_ms));
    let _ = t0_us;
    Ok(())
}

async fn latency(args: LatencyArgs) -> anyhow::Result<()> {
    let c = &args.common;
    let pairs = (args.users / 2).max(1);
    let mut report = Report::new(
        "latency",
        json!({"users": pairs * 2, "senders": pairs, "receivers": pairs, "rate": args.rate,
               "duration_s": args.duration.as_secs_f64(), "size": c.size, "urls": c.urls}),
    );
    report.latency_basis =
        "scheduled send time (open loop, no coordinated omission) → chat_message read by the receiver"
            .into();
    let (senders, receivers, run) = setup_pairs(c, pairs, 8 * 1024).await?;
    eprintln!(
        "latency: {pairs} senders and {pairs} receivers joined; sending {} msg/s for {:?}",
        args.rate, args.duration
    );
    let per_sender = args.rate / pairs as f64;
    let interval_us = (1e6 / per_sender) as u64;
    let count = (per_sender * args.duration.as_secs_f64()).round() as u64;
    let start_us = now_us() + 200_000;
    let run_state = start_pairs(
        c,
        senders,
        receivers,
        &run,
        start_us,
        |i| Pace::Open {
            start_us,
            offset_us: interval_us * i as u64 / pairs as u64,
            interval_us,
            count,
        },
        &[],
    );
    tokio::time::sleep_until(instant_of(start_us) + args.duration + Duration::from_millis(50))
        .await;
    finish_pairs(run_state, c.grace, &mut report, None, start_us).await?;
    // Throughput of an open loop: what was received over the send phase.
    report.duration_s = args.duration.as_secs_f64();
    report.throughput_msgs_per_s = report.received as f64 / report.duration_s;
    report.finish(c.json.as_deref())
}

async fn throughput(args: ThroughputArgs) -> anyhow::Result<()> {
    let c = &args.common;
    let pairs = args.senders.max(1);
    let mut report = Report::new(
        "throughput",
        json!({"senders": pairs, "receivers": pairs, "window": args.window,
               "warmup_s": args.warmup.as_secs_f64(), "duration_s": args.duration.as_secs_f64(),
               "size": c.size, "urls": c.urls}),
    );
    report.latency_basis =
        "send → chat_message read by the receiver (closed loop: includes waiting in the window)"
            .into();
    let (senders, receivers, run) = setup_pairs(c, pairs, 8 * 1024).await?;
    let permits: Vec<Arc<Semaphore>> = (0..pairs)
        .map(|_| Arc::new(Semaphore::new(args.window)))
        .collect();
    let t0_us = now_us();
    let until_us = t0_us + (args.warmup + args.duration).as_micros() as u64;
    eprintln!(
        "throughput: {pairs} senders × window {} for {:?} (+{:?} warm-up)",
        args.window, args.duration, args.warmup
    );
    let run_state = start_pairs(
        c,
        senders,
        receivers,
        &run,
        t0_us,
        |i| Pace::Window {
            permits: permits[i].clone(),
            until_us,
        },
        &permits,
    );
    tokio::time::sleep_until(instant_of(until_us)).await;
    let window = (
        args.warmup.as_secs(),
        args.warmup.as_secs() + args.duration.as_secs(),
    );
    finish_pairs(run_state, c.grace, &mut report, Some(window), t0_us).await?;
    report.finish(c.json.as_deref())
}

// ---------------------------------------------------------------------------------------
// drain

async fn drain(args: DrainArgs) -> anyhow::Result<()> {
    let c = &args.common;
    let connector = Arc::new(Connector::new(&c.secret));
    let run = run_id(c);
    let receiver = format!("{run}-offline");
    let n_senders = args.senders.max(1);
    let mut report = Report::new(
        "drain",
        json!({"messages": args.messages, "senders": n_senders, "window": args.window,
               "size": c.size, "receiver_url": c.urls[0], "urls": c.urls}),
    );
    report.latency_basis =
        "join_chat sent → each chat_message read (max = time to the last message)".into();
    let senders = connect_all(
        &connector,
        (0..n_senders)
            .map(|i| (c.urls[i % c.urls.len()].clone(), format!("{run}-s{i}")))
            .collect(),
        8 * 1024,
    )
    .await?;
    // Buffer: every sender sends its share, pipelined, until all are answered.
    let counters = Arc::new(Counters::default());
    let fill_start = Instant::now();
    let mut tasks = Vec::new();
    for (i, mut ws) in senders.into_iter().enumerate() {
        let share = args.messages / n_senders + usize::from(i < args.messages % n_senders);
        let (to, chat, size, window) = (
            receiver.clone(),
            format!("{run}-c{i}"),
            c.size,
            args.window.max(1),
        );
        let counters = counters.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = SenderOut::default();
            let mut answered = 0u64;
            while (answered as usize) < share {
                while (out.sent as usize) < share && out.sent - answered < window as u64 {
                    let seq = out.sent;
                    let frame =
                        chat_frame(&to, &chat, &body(now_us(), i, seq, size), &seq.to_string());
                    if let Err(e) = ws.send(Message::Text(frame.into())).await {
                        out.closed = Some(e.to_string());
                        return out;
                    }
                    out.sent += 1;
                    counters.sent.fetch_add(1, Relaxed);
                }
                let msg = tokio::time::timeout(Duration::from_secs(30), ws.next()).await;
                let Ok(msg) = msg else {
                    out.closed = Some("no answer within 30 s".into());
                    return out;
                };
                match classify(msg) {
                    Incoming::Frame(f) if f.event == "message_accepted" => {
                        answered += 1;
                        if let Some(id) = f.data.id {
                            out.accepted.insert(id);
                            counters.accepted.fetch_add(1, Relaxed);
                        }
                    }
                    Incoming::Frame(f) if f.event == "error" => {
                        answered += 1;
                        *out.errors
                            .entry(f.data.code.unwrap_or_default())
                            .or_default() += 1;
                        counters.errors.fetch_add(1, Relaxed);
                    }
                    Incoming::Frame(_) | Incoming::Other => {}
                    Incoming::Closed(why) => {
                        out.closed = Some(why);
                        return out;
                    }
                }
            }
            let _ = ws.close(None).await;
            out
        }));
    }
    let mut accepted = HashSet::new();
    let mut closes = Vec::new();
    for t in tasks {
        let out = t.await?;
        report.sent += out.sent;
        for (code, n) in out.errors {
            report.errors += n;
            *report.error_codes.entry(code).or_default() += n;
        }
        if let Some(why) = out.closed {
            closes.push(why);
        }
        accepted.extend(out.accepted);
    }
    report.accepted = accepted.len() as u64;
    let fill_s = fill_start.elapsed().as_secs_f64();
    eprintln!(
        "drain: {} of {} messages accepted for {receiver} in {fill_s:.1} s; joining",
        report.accepted, args.messages
    );
    if let Some(uri) = &args.mongodb_uri {
        match explain_drain(uri, &args.db, &receiver).await {
            Ok(v) => {
                report.extra.insert("explain".into(), v);
            }
            Err(e) => eprintln!("drain: explain failed: {e:#}"),
        }
    }
    // The offline user comes online: connect, then time join_chat → last message.
    let mut ws = connector
        .connect(&c.urls[0], &receiver, None, 64 * 1024)
        .await?;
    let mut hist = new_hist();
    let mut ids: Vec<String> = Vec::with_capacity(accepted.len());
    let mut seen = HashSet::with_capacity(accepted.len());
    let mut last_seq: HashMap<usize, u64> = HashMap::new();
    let mut joined_us = None;
    let mut pending = None;
    let mut instance = None;
    let t0 = now_us();
    ws.send(Message::Text(
        r#"{"event":"join_chat","data":{}}"#.to_owned().into(),
    ))
    .await?;
    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut last_us = t0;
    let mut first_us: Option<u64> = None;
    let mut close = None;
    while (seen.len() as u64) < report.accepted {
        let Ok(msg) = tokio::time::timeout_at(deadline, ws.next()).await else {
            close = Some("drain timeout".to_owned());
            break;
        };
        match classify(msg) {
            Incoming::Frame(f) if f.event == "joined" => {
                joined_us = Some(now_us() - t0);
                pending = f.data.pending;
                instance = f.data.instance;
            }
            Incoming::Frame(f) if f.event == "chat_message" => {
                let now = now_us();
                let id = f.data.id.unwrap_or_default();
                if f.data.redelivery {
                    report.redeliveries += 1;
                }
                if !seen.insert(id.clone()) {
                    report.duplicates += 1;
                    continue;
                }
                last_us = now;
                first_us.get_or_insert(now);
                hist.saturating_record((now - t0).max(1));
                if let Some((_, p, n)) = f.data.message.as_deref().and_then(parse_body) {
                    if last_seq.get(&p).is_some_and(|l| n <= *l) {
                        report.order_violations += 1;
                    }
                    last_seq.insert(p, n);
                }
                ids.push(id);
            }
            Incoming::Frame(_) | Incoming::Other => {}
            Incoming::Closed(why) => {
                close = Some(why);
                break;
            }
        }
    }
    let drain_ms = (last_us - t0) as f64 / 1000.0;
    // Ack everything (batches of 1000), then watch for late extras for a moment.
    for chunk in ids.chunks(1000) {
        let frame = json!({"event": "ack", "data": {"ids": chunk}}).to_string();
        ws.send(Message::Text(frame.into())).await?;
    }
    let settle = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(msg) = tokio::time::timeout_at(settle, ws.next()).await {
        match classify(msg) {
            Incoming::Frame(f) if f.event == "chat_message" => {
                let id = f.data.id.unwrap_or_default();
                if !seen.insert(id.clone()) {
                    report.duplicates += 1;
                } else {
                    ids.push(id);
                }
            }
            Incoming::Closed(_) => break,
            _ => {}
        }
    }
    let _ = ws.close(None).await;
    report.received = seen.len() as u64;
    report.lost = accepted.difference(&seen).count() as u64;
    report.unexpected = seen.difference(&accepted).count() as u64;
    report.latency_ms = LatencyMs::of(&hist);
    report.duration_s = drain_ms / 1000.0;
    report.throughput_msgs_per_s = if drain_ms > 0.0 {
        report.received as f64 / (drain_ms / 1000.0)
    } else {
        0.0
    };
    report.extra.insert("drain_ms".into(), json!(drain_ms));
    report.extra.insert(
        "first_message_ms".into(),
        json!(first_us.map(|u| (u - t0) as f64 / 1000.0)),
    );
    report.extra.insert(
        "joined_ms".into(),
        json!(joined_us.map(|u| u as f64 / 1000.0)),
    );
    report.extra.insert("joined_pending".into(), json!(pending));
    report
        .extra
        .insert("receiver_instance".into(), json!(instance));
    report.extra.insert("fill_s".into(), json!(fill_s));
    report.extra.insert("receiver".into(), json!(receiver));
    report
        .extra
        .insert("in_order".into(), json!(report.order_violations == 0));
    report.extra.insert("close".into(), json!(close));
    report.extra.insert("sender_closes".into(), json!(closes));
    report.finish(c.json.as_deref())
}

/// The plans MongoDB picks for msgbuf's join: `count_pending` and `pending` (same filter,
/// sort and batch size as `msgbuf::store`), with their execution statistics.
async fn explain_drain(uri: &str, db: &str, user: &str) -> anyhow::Result<Value> {
    use mongodb::bson::{doc, Bson, Document};
    use msgbuf::store::{Store, MESSAGES};
    fn stages(d: &Document, out: &mut Vec<String>) {
        if let Ok(name) = d.get_str("stage") {
            let mut s = name.to_owned();
            if let Ok(ix) = d.get_str("indexName") {
                s.push_str(&format!("({ix})"));
            }
            out.push(s);
        }
        for key in ["inputStage", "inputStages"] {
            match d.get(key) {
                Some(Bson::Document(c)) => stages(c, out),
                Some(Bson::Array(a)) => a.iter().for_each(|c| {
                    if let Bson::Document(c) = c {
                        stages(c, out)
                    }
                }),
                _ => {}
            }
        }
    }
    let summarize = |r: &Document| -> Value {
        let stats = r.get_document("executionStats").ok();
        let mut plan = Vec::new();
        if let Some(root) = stats.and_then(|s| s.get_document("executionStages").ok()) {
            stages(root, &mut plan);
        }
        let num = |k: &str| {
            stats
                .and_then(|s| s.get(k))
                .and_then(|b| match b {
                    Bson::Int32(i) => Some(*i as i64),
                    Bson::Int64(i) => Some(*i),
                    Bson::Double(d) => Some(*d as i64),
                    _ => None,
                })
                .unwrap_or(-1)
        };
        json!({"stages": plan, "nReturned": num("nReturned"),
               "totalKeysExamined": num("totalKeysExamined"),
               "totalDocsExamined": num("totalDocsExamined"),
               "executionTimeMillis": num("executionTimeMillis")})
    };
    let client = msgbuf::mongo::connect_replica_set(uri, MONGODB_TIMEOUT).await?;
    let database = client.database(db);
    let filter = Store::pending_filter(user, Duration::from_secs(30));
    let find = database
        .run_command(doc! {
            "explain": {"find": MESSAGES, "filter": filter.clone(), "sort": {"_id": 1}, "batchSize": 1000},
            "verbosity": "executionStats"})
        .await?;
    let count = database
        .run_command(doc! {
        "explain": {"count": MESSAGES, "query": filter},
        "verbosity": "executionStats"})
        .await?;
    Ok(json!({"pending_find": summarize(&find), "count_pending": summarize(&count)}))
}

// ---------------------------------------------------------------------------------------
// idle

async fn idle(args: IdleArgs) -> anyhow::Result<()> {
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
        json!({"connections": total, "per_user": per_user, "url": url,
               "sources": sources.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
               "concurrency": args.concurrency, "hold_s": args.hold.as_secs_f64(), "join": !no_join}),
    );
    report.latency_basis = "TCP connect → WebSocket handshake → joined, per connection".into();
    let rss_before = args.server_pid.and_then(|p| proc_status_kib(p, "VmRSS"));
    let connector = Arc::new(Connector::new(&c.secret));
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
                        .connect_joined(&url, &user, Some(src), 512, Duration::from_secs(60))
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
                            msg = ws.next() => match classify(msg) {
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

// ---------------------------------------------------------------------------------------
// floor: MongoDB alone

struct FloorPhaseOut {
    hist: Histogram<u64>,
    ids: HashSet<i64>,
    duplicates: u64,
    per_second: Vec<u64>,
}

async fn floor(args: FloorArgs) -> anyhow::Result<()> {
    use mongodb::bson::doc;
    use msgbuf::store::{BufferedMessage, Store};

    let client = msgbuf::mongo::connect_replica_set(&args.mongodb_uri, MONGODB_TIMEOUT).await?;
    let db_name = format!("msgbuf_floor_{}", std::process::id());
    let db = client.database(&db_name);
    let store = Store::new(db.clone());
    // The same collection, indexes, write concern and stream pipeline as msgbuf.
    store.ensure_indexes().await?;
    let mut stream = store
        .raw()
        .watch()
        .pipeline(msgbuf::stream::pipeline())
        .await?;
    // Document `seq` is encoded in clientMsgId; phase in the text's p= field.
    let phase_t0 = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let stop = CancellationToken::new();
    let reader = {
        let (stop, phase_t0) = (stop.clone(), phase_t0.clone());
        tokio::spawn(async move {
            let mut out: Vec<FloorPhaseOut> = (0..2)
                .map(|_| FloorPhaseOut {
                    hist: new_hist(),
                    ids: HashSet::new(),
                    duplicates: 0,
                    per_second: Vec::new(),
                })
                .collect();
            loop {
                let ev = tokio::select! {
                    _ = stop.cancelled() => break,
                    ev = stream.next() => ev,
                };
                let Some(Ok(ev)) = ev else { break };
                let now = now_us();
                let Some(doc) = ev.full_document else {
                    continue;
                };
                let (Ok(text), Ok(cid)) = (doc.get_str("message"), doc.get_str("clientMsgId"))
                else {
                    continue;
                };
                let (Some((t, phase, _)), Ok(seq)) = (parse_body(text), cid.parse::<i64>()) else {
                    continue;
                };
                let Some(o) = out.get_mut(phase) else {
                    continue;
                };
                if !o.ids.insert(seq) {
                    o.duplicates += 1;
                    continue;
                }
                o.hist.saturating_record(now.saturating_sub(t).max(1));
                let sec = (now.saturating_sub(phase_t0[phase].load(Relaxed)) / 1_000_000) as usize;
                if o.per_second.len() <= sec {
                    o.per_second.resize(sec + 1, 0);
                }
                o.per_second[sec] += 1;
            }
            out
        })
    };
    let msg_of = |phase: usize, seq: i64, t: u64| {
        BufferedMessage::new(
            &format!("floor-w{phase}"),
            "floor-r",
            "floor",
            &body(t, phase, seq as u64, args.size),
            Some(seq.to_string()),
        )
    };
    // Phase 0: open loop at `rate`.
    let interval_us = (1e6 / args.rate) as u64;
    let count = (args.rate * args.duration.as_secs_f64()).round() as i64;
    let start_us = now_us() + 200_000;
    phase_t0[0].store(start_us, Relaxed);
    let cpu0 = args.mongod_pid.and_then(proc_cpu_s);
    eprintln!(
        "floor: {count} single inserts at {} /s (w:majority) → change stream",
        args.rate
    );
    let acked0 = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let errors0 = Arc::new(AtomicU64::new(0));
    let mut inserts = Vec::with_capacity(count as usize);
    for seq in 0..count {
        let due = start_us + seq as u64 * interval_us;
        tokio::time::sleep_until(instant_of(due)).await;
        let (store, acked, errors) = (store.clone(), acked0.clone(), errors0.clone());
        let msg = msg_of(0, seq, due);
        inserts.push(tokio::spawn(async move {
            match store.messages().insert_one(&msg).await {
                Ok(_) => {
                    acked.lock().expect("lock").insert(seq);
                }
                Err(_) => {
                    errors.fetch_add(1, Relaxed);
                }
            }
        }));
    }
    for i in inserts {
        let _ = i.await;
    }
    // Phase 1: `writers` closed-loop writers.
    let cpu1 = args.mongod_pid.and_then(proc_cpu_s);
    let t1 = now_us();
    phase_t0[1].store(t1, Relaxed);
    let until = t1 + (args.warmup + args.throughput_duration).as_micros() as u64;
    eprintln!(
        "floor: {} writers × insert of {} (w:majority) for {:?} (+{:?} warm-up)",
        args.writers, args.batch, args.throughput_duration, args.warmup
    );
    let next_seq = Arc::new(AtomicU64::new(0));
    let acked1 = Arc::new(AtomicU64::new(0));
    let acked1_ids = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let errors1 = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for _ in 0..args.writers.max(1) {
        let (store, next_seq, acked, ids, errors) = (
            store.clone(),
            next_seq.clone(),
            acked1.clone(),
            acked1_ids.clone(),
            errors1.clone(),
        );
        let batch = args.batch.max(1);
        let size = args.size;
        writers.push(tokio::spawn(async move {
            while now_us() < until {
                let seqs: Vec<i64> = (0..batch)
                    .map(|_| next_seq.fetch_add(1, Relaxed) as i64)
                    .collect();
                let t = now_us();
                let docs: Vec<BufferedMessage> = seqs
                    .iter()
                    .map(|s| {
                        BufferedMessage::new(
                            "floor-w1",
                            "floor-r",
                            "floor",
                            &body(t, 1, *s as u64, size),
                            Some(s.to_string()),
                        )
                    })
                    .collect();
                let r = if batch == 1 {
                    store.messages().insert_one(&docs[0]).await.map(|_| ())
                } else {
                    store.messages().insert_many(&docs).await.map(|_| ())
                };
                match r {
                    Ok(()) => {
                        acked.fetch_add(batch as u64, Relaxed);
                        ids.lock().expect("lock").extend(seqs);
                    }
                    Err(_) => {
                        errors.fetch_add(batch as u64, Relaxed);
                    }
                }
            }
        }));
    }
    for w in writers {
        let _ = w.await;
    }
    let cpu2 = args.mongod_pid.and_then(proc_cpu_s);
    // Wait until every acknowledged insert is visible, then one more second for the
    // stream to deliver the last of them.
    let sent1 = next_seq.load(Relaxed);
    let expected = acked0.lock().expect("lock").len() as u64 + acked1.load(Relaxed);
    let grace_end = tokio::time::Instant::now() + args.grace;
    while tokio::time::Instant::now() < grace_end {
        let n = store.raw().count_documents(doc! {}).await.unwrap_or(0);
        if n >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let out = reader.await?;
    let acked0 = acked0.lock().expect("lock").clone();
    let acked1_ids = acked1_ids.lock().expect("lock").clone();
    let _ = db.drop().await;

    let phase_report = |name: &str,
                        o: &FloorPhaseOut,
                        sent: u64,
                        acked: &HashSet<i64>,
                        errors: u64,
                        window: (u64, u64)| {
        let mut r = Report::new(name, Value::Null);
        r.sent = sent;
        r.accepted = acked.len() as u64;
        r.errors = errors;
        r.received = o.ids.len() as u64;
        r.lost = acked.difference(&o.ids).count() as u64;
        r.unexpected = o.ids.difference(acked).count() as u64;
        r.duplicates = o.duplicates;
        r.latency_ms = LatencyMs::of(&o.hist);
        let in_window: u64 = o
            .per_second
            .iter()
            .enumerate()
            .filter(|(k, _)| (*k as u64) >= window.0 && (*k as u64) < window.1)
            .map(|(_, n)| n)
            .sum();
        r.duration_s = (window.1 - window.0).max(1) as f64;
        r.throughput_msgs_per_s = in_window as f64 / r.duration_s;
        r.extra
            .insert("events_per_second".into(), json!(o.per_second));
        r
    };
    let dur0 = args.duration.as_secs();
    let mut lat = phase_report(
        "floor-latency",
        &out[0],
        count as u64,
        &acked0,
        errors0.load(Relaxed),
        (0, dur0.max(1)),
    );
    lat.latency_basis = "scheduled insertOne (w:majority) → change event read".into();
    lat.params = json!({"rate": args.rate, "duration_s": args.duration.as_secs_f64()});
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        lat.extra.insert("mongod_cpu_s".into(), json!(b - a));
    }
    let w = args.warmup.as_secs();
    let mut thr = phase_report(
        "floor-throughput",
        &out[1],
        sent1,
        &acked1_ids,
        errors1.load(Relaxed),
        (w, w + args.throughput_duration.as_secs()),
    );
    thr.latency_basis = "insert issued → change event read (closed loop)".into();
    thr.params = json!({"writers": args.writers, "batch": args.batch,
        "warmup_s": args.warmup.as_secs_f64(), "duration_s": args.throughput_duration.as_secs_f64()});
    if let (Some(a), Some(b)) = (cpu1, cpu2) {
        thr.extra.insert("mongod_cpu_s".into(), json!(b - a));
    }
    let mut report = Report::new(
        "floor",
        json!({"rate": args.rate, "duration_s": args.duration.as_secs_f64(), "writers": args.writers,
               "batch": args.batch, "throughput_duration_s": args.throughput_duration.as_secs_f64(),
               "size": args.size, "streams": 1}),
    );
    report.latency_basis = lat.latency_basis.clone();
    report.sent = lat.sent + thr.sent;
    report.accepted = lat.accepted + thr.accepted;
    report.errors = lat.errors + thr.errors;
    report.received = lat.received + thr.received;
    report.lost = lat.lost + thr.lost;
    report.duplicates = lat.duplicates + thr.duplicates;
    report.unexpected = lat.unexpected + thr.unexpected;
    // Top level: latency from the fixed-rate phase, throughput = the max insert+notify rate.
    report.latency_ms = lat.latency_ms.clone();
    report.duration_s = thr.duration_s;
    report.throughput_msgs_per_s = thr.throughput_msgs_per_s;
    lat.print();
    thr.print();
    report
        .extra
        .insert("phase_latency".into(), serde_json::to_value(&lat)?);
    report
        .extra
        .insert("phase_throughput".into(), serde_json::to_value(&thr)?);
    report.finish(args.json.as_deref())
}

// ---------------------------------------------------------------------------------------
// mongo-stats: what msgbuf asks of mongod, per scenario

/// serverStatus paths worth comparing between scenarios (counters unless noted).
const MONGO_STATS: &[&str] = &[
    "opcounters.insert",
    "opcounters.query",
    "opcounters.update",
    "opcounters.delete",
    "opcounters.getmore",
    "opcounters.command",
    "opLatencies.reads.latency",
    "opLatencies.reads.ops",
    "opLatencies.writes.latency",
    "opLatencies.writes.ops",
    "opLatencies.commands.latency",
    "opLatencies.commands.ops",
    "metrics.document.inserted",
    "metrics.document.updated",
    "metrics.document.returned",
    "metrics.document.deleted",
    "metrics.commands.insert.total",
    "metrics.commands.update.total",
    "metrics.commands.findAndModify.total",
    "metrics.commands.getMore.total",
    "metrics.commands.find.total",
    "metrics.commands.count.total",
    "metrics.commands.aggregate.total",
    "metrics.queryExecutor.scanned",
    "metrics.queryExecutor.scannedObjects",
    "wiredTiger.cache.pages evicted by application threads",
    "wiredTiger.cache.bytes currently in the cache",
    "wiredTiger.cache.maximum bytes configured",
    "wiredTiger.thread-yield.application thread time evicting (usecs)",
    "wiredTiger.thread-yield.application thread time waiting for cache (usecs)",
    "wiredTiger.log.log sync operations",
    "wiredTiger.log.log sync time duration (usecs)",
    "wiredTiger.transaction.transaction checkpoints",
];

async fn mongo_stats(args: MongoStatsArgs) -> anyhow::Result<()> {
    use mongodb::bson::{doc, Bson, Document};
    fn num(d: &Document, path: &str) -> Option<f64> {
        // Keys may contain spaces but not dots: split on '.' only up to the known depth.
        let mut cur = d;
        let parts: Vec<&str> = path.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            cur = cur.get_document(p).ok()?;
        }
        match cur.get(parts[parts.len() - 1])? {
            Bson::Int32(i) => Some(*i as f64),
            Bson::Int64(i) => Some(*i as f64),
            Bson::Double(x) => Some(*x),
            _ => None,
        }
    }
    let client = msgbuf::mongo::connect_replica_set(&args.mongodb_uri, MONGODB_TIMEOUT).await?;
    let status = client
        .database("admin")
        .run_command(doc! {"serverStatus": 1})
        .await?;
    let mut out = serde_json::Map::new();
    for path in MONGO_STATS {
        if let Some(v) = num(&status, path) {
            out.insert((*path).to_owned(), json!(v));
        }
    }
    if let Some(base) = &args.baseline {
        let base: serde_json::Map<String, Value> =
            serde_json::from_str(&std::fs::read_to_string(base)?)?;
        for (k, v) in out.iter_mut() {
            let gauge = k.contains("bytes currently") || k.contains("maximum bytes");
            if let (Some(now), Some(then)) = (v.as_f64(), base.get(k).and_then(|b| b.as_f64())) {
                if !gauge {
                    *v = json!(now - then);
                }
            }
        }
    }
    let text = serde_json::to_string_pretty(&out)? + "\n";
    match &args.out {
        Some(p) => std::fs::write(p, text)?,
        None => print!("{text}"),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// summary: targets table for scripts/bench

fn load(dir: &Path, name: &str) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join(name)).ok()?;
    serde_json::from_str(&text).ok()
}

fn f(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_f64()
}

const SCENARIOS: [&str; 7] = [
    "floor",
    "latency",
    "throughput",
    "drain",
    "idle",
    "latency-profile",
    "throughput-profile",
];

fn summary(args: SummaryArgs) -> anyhow::Result<()> {
    let dir = &args.dir;
    let floor = load(dir, "floor.json");
    let lat = load(dir, "latency.json");
    let thr = load(dir, "throughput.json");
    let drn = load(dir, "drain.json");
    let idl = load(dir, "idle.json");
    let idle_procs = load(dir, "idle.procs.json");
    struct Row {
        scenario: &'static str,
        target: String,
        measured: String,
        met: Option<bool>,
    }
    let mut rows: Vec<Row> = Vec::new();
    let clean = |v: &Value| -> (String, bool) {
        let lost = f(v, &["lost"]).unwrap_or(f64::NAN);
        let dup = f(v, &["duplicates"]).unwrap_or(f64::NAN);
        (
            format!("lost {lost}, duplicates {dup}"),
            lost == 0.0 && dup == 0.0,
        )
    };
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
        rows.push(Row {
            scenario: "drain",
            target: format!("{n} pending → joining socket ≤ 250 ms"),
            measured: format!(
                "{ms:.1} ms (joined after {:.1} ms)",
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
        let per = idle_procs
            .as_ref()
            .and_then(|p| f(p, &["rss_growth_bytes_per_conn"]))
            .or_else(|| f(v, &["extra", "server_rss_growth_bytes_per_conn"]));
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
    let mut text = String::new();
    text.push_str("| scenario | target | measured | met |\n|---|---|---|---|\n");
    for r in &rows {
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
        .map(|r| json!({"scenario": r.scenario, "target": r.target, "measured": r.measured, "met": r.met}))
        .collect();
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&json_rows)? + "\n",
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------

fn main() -> anyhow::Result<()> {
    epoch();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Latency(a) => latency(a).await,
            Command::Throughput(a) => throughput(a).await,
            Command::Drain(a) => drain(a).await,
            Command::Idle(a) => idle(a).await,
            Command::Floor(a) => floor(a).await,
            Command::Summary(a) => summary(a),
            Command::MongoStats(a) => mongo_stats(a).await,
            Command::FreePort => {
                let l = std::net::TcpListener::bind("127.0.0.1:0")?;
                println!("{}", l.local_addr()?.port());
                Ok(())
            }
        }
    })
}
