//! `drain`: K messages buffered for a user who has never connected, then the user joins;
//! the time from `join_chat` to the last message, order and loss. With `--ack` the user
//! acks each message as it reads it, one blocking send per ack, as docs/PROTOCOL.md
//! describes a client; otherwise it acks everything once the drain is over. With `--ack`
//! and `--mongodb-uri`, also the time until MongoDB has recorded the whole drain (every
//! message delivered and acked).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use mongodb::bson::{doc, Document};
use mongodb::options::Hint;
use mongodb::Collection;
use msgbuf::client::WsClient;
use msgbuf::parse_duration;
use msgbuf::protocol::ServerFrame;
use serde_json::json;

use crate::conn::{connect_all, run_id, Common, Connector};
use crate::frames::{self, classify, code_name, Incoming};
use crate::histogram::{new_hist, LatencyMs};
use crate::pairs::SenderOut;
use crate::report::Report;
use crate::stamp::{body, now_us, parse_body};

#[derive(Args)]
pub struct DrainArgs {
    #[command(flatten)]
    pub common: Common,
    /// Messages buffered for the offline user.
    #[arg(long, default_value_t = 10_000)]
    pub messages: usize,
    /// Senders sharing them (round-robin over the URLs).
    #[arg(long, default_value_t = 8)]
    pub senders: usize,
    /// Pipelined sends per sender.
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// How long the joining user may take to receive everything.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// When given: before the join, `explain` (executionStats) the reads of the user's
    /// pending messages (both halves, find and count) against this replica set and put the
    /// plans in the report; with `--ack`, also time the drain until this replica set has
    /// recorded it all (`recorded_ms`).
    #[arg(long)]
    pub mongodb_uri: Option<String>,
    /// Database msgbuf uses (for `--mongodb-uri`).
    #[arg(long, default_value = "msgbuf")]
    pub db: String,
    /// The joining user acks every message as soon as it reads it (one `ack` per message,
    /// each send awaited before the next read), inside the timed drain.
    #[arg(long)]
    pub ack: bool,
    /// Device catch-up: the user's `phone` device is joined during the fill and receives
    /// and acks every message live; then its `laptop` device, registered before the fill,
    /// joins and is timed catching up on the same messages (docs/PROTOCOL.md, "Devices").
    #[arg(long)]
    pub catch_up: bool,
    /// The server's `MSGBUF_DEVICE_SKEW` (with `--catch-up --mongodb-uri`): the laptop's
    /// floor passes what it acked once that is older than this, so its up-to-date join
    /// is awaited for this long (and a minute more) at most.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub device_skew: Duration,
    /// Leave the up-to-date join out (the `devices` scenario runs it later).
    #[arg(skip)]
    pub defer_up_to_date_join: bool,
}

pub async fn drain(args: DrainArgs) -> anyhow::Result<()> {
    run(&args).await?.finish(args.common.json.as_deref())
}

/// The run, its report not yet printed (the `devices` scenario runs the catch-up).
pub async fn run(args: &DrainArgs) -> anyhow::Result<Report> {
    let c = &args.common;
    let connector = Arc::new(Connector::new(c));
    let run = run_id(c);
    let receiver = format!("{run}-offline");
    let n_senders = args.senders.max(1);
    let mut report = Report::new(
        "drain",
        json!({"proto": c.proto.to_string(), "messages": args.messages, "senders": n_senders, "window": args.window,
               "size": c.size, "receiver_url": c.urls[0], "urls": c.urls, "ack": args.ack,
               "catch_up": args.catch_up}),
    );
    report.latency_basis = if args.ack {
        "join_chat sent → each chat_message read, each acked before the next read (max = time to the last message)"
    } else {
        "join_chat sent → each chat_message read (max = time to the last message)"
    }
    .into();
    let (joined_device, phone) = if args.catch_up {
        let laptop = connector
            .connect(&c.urls[0], &receiver, None, 8 * 1024)
            .await?;
        read_backlog(laptop, 0, args.timeout, false, Some(LAPTOP), None).await?;
        let phone = connector
            .connect(&c.urls[0], &receiver, None, 64 * 1024)
            .await?;
        let expected = args.messages as u64;
        let timeout = args.timeout;
        let phone = tokio::spawn(read_backlog(
            phone,
            expected,
            timeout,
            true,
            Some(PHONE),
            None,
        ));
        (Some(LAPTOP), Some(phone))
    } else {
        (None, None)
    };
    let fill = fill(args, &connector, &run, &receiver).await?;
    if let Some(phone) = phone {
        // Read and acked on the phone (its close waits until the acks are recorded).
        let phone = phone.await??;
        report.extra.insert(
            "phone".into(),
            json!({"received": phone.seen.len(), "lost": fill.accepted.difference(&phone.seen).count(),
                   "duplicates": phone.duplicates, "unflagged_duplicates": phone.unflagged_duplicates,
                   "close": phone.close}),
        );
        eprintln!(
            "drain: the phone read and acked {} messages live; the laptop catches up",
            phone.seen.len()
        );
    }
    report.sent = fill.sent;
    for (code, n) in &fill.errors {
        report.errors += n;
        *report.error_codes.entry(code.clone()).or_default() += n;
    }
    report.accepted = fill.accepted.len() as u64;
    eprintln!(
        "drain: {} of {} messages accepted for {receiver} in {:.1} s; joining",
        report.accepted, args.messages, fill.seconds
    );
    if let Some(uri) = &args.mongodb_uri {
        match crate::explain::explain_pending(uri, &args.db, &receiver).await {
            Ok(v) => {
                report.extra.insert("explain".into(), v);
            }
            Err(e) => eprintln!("drain: explain failed: {e:#}"),
        }
    }
    // What the drain asks of MongoDB and what the instances say they wrote (claims with
    // their ack, or alone).
    let meter = match &args.mongodb_uri {
        Some(uri) => Some(DrainMeter::start(uri, &c.urls).await?),
        None => None,
    };
    // The offline user comes online: connect, then time join_chat → last message.
    let ws = connector
        .connect(&c.urls[0], &receiver, None, 64 * 1024)
        .await?;
    // With acks, the drain also ends where MongoDB has recorded all of it.
    let watch = match (&args.mongodb_uri, args.ack && !args.catch_up) {
        (Some(uri), true) => Some(RecordWatch::connect(uri, &args.db, &receiver).await?),
        _ => None,
    };
    let d = read_backlog(
        ws,
        report.accepted,
        args.timeout,
        args.ack,
        joined_device,
        watch.as_ref(),
    )
    .await?;
    let drain_ms = (d.last_us - d.t0) as f64 / 1000.0;
    if watch.is_some() {
        report.extra.insert(
            "recorded_ms".into(),
            json!(d.recorded_us.map(|u| (u - d.t0) as f64 / 1000.0)),
        );
    }
    if let Some(meter) = meter {
        let (mongo, server) = meter.since(&c.urls).await;
        report.extra.insert("mongo".into(), mongo);
        report.extra.insert("server".into(), server);
    }
    report.received = d.seen.len() as u64;
    report.lost = fill.accepted.difference(&d.seen).count() as u64;
    report.unexpected = d.seen.difference(&fill.accepted).count() as u64;
    report.duplicates = d.duplicates;
    report
        .extra
        .insert("unflagged_duplicates".into(), json!(d.unflagged_duplicates));
    report.redeliveries = d.redeliveries;
    report.order_violations = d.order_violations;
    report.latency_ms = LatencyMs::of(&d.hist);
    report.duration_s = drain_ms / 1000.0;
    report.throughput_msgs_per_s = if drain_ms > 0.0 {
        report.received as f64 / (drain_ms / 1000.0)
    } else {
        0.0
    };
    report.extra.insert("drain_ms".into(), json!(drain_ms));
    report.extra.insert(
        "first_message_ms".into(),
        json!(d.first_us.map(|u| (u - d.t0) as f64 / 1000.0)),
    );
    report.extra.insert(
        "joined_ms".into(),
        json!(d.joined_us.map(|u| u as f64 / 1000.0)),
    );
    report
        .extra
        .insert("joined_pending".into(), json!(d.pending));
    report
        .extra
        .insert("receiver_instance".into(), json!(d.instance));
    report.extra.insert("fill_s".into(), json!(fill.seconds));
    report.extra.insert("receiver".into(), json!(receiver));
    report
        .extra
        .insert("in_order".into(), json!(report.order_violations == 0));
    if args.ack {
        report
            .extra
            .insert("acked_while_draining".into(), json!(d.acked));
    }
    report.extra.insert("close".into(), json!(d.close));
    report.extra.insert(
        "device_skew_s".into(),
        json!(args.device_skew.as_secs_f64()),
    );
    if let (true, false, Some(uri)) = (args.catch_up, args.defer_up_to_date_join, &args.mongodb_uri)
    {
        let join = up_to_date_join(c, &receiver, uri, &args.db, args.device_skew).await?;
        report.extra.insert("up_to_date_join".into(), join);
    }
    report
        .extra
        .insert("sender_closes".into(), json!(fill.closes));
    Ok(report)
}

/// serverStatus and the instances' counters at the join, to report their deltas once the
/// drain is over (recorded, when watched).
struct DrainMeter {
    client: mongodb::Client,
    stats: serde_json::Map<String, serde_json::Value>,
    metrics: std::collections::HashMap<String, f64>,
}

impl DrainMeter {
    async fn start(uri: &str, urls: &[String]) -> anyhow::Result<Self> {
        let client = crate::mongo::connect(uri).await?;
        let stats = crate::mongo_stats::snapshot(&client).await?;
        let metrics = crate::server_metrics::read(urls).await;
        Ok(DrainMeter {
            client,
            stats,
            metrics,
        })
    }

    async fn since(self, urls: &[String]) -> (serde_json::Value, serde_json::Value) {
        let mongo = match crate::mongo_stats::snapshot(&self.client).await {
            Ok(now) => serde_json::Value::Object(crate::mongo_stats::delta(&now, &self.stats)),
            Err(e) => {
                eprintln!("drain: serverStatus failed: {e:#}");
                serde_json::Value::Null
            }
        };
        let now = crate::server_metrics::read(urls).await;
        (mongo, crate::server_metrics::deltas(&self.metrics, &now))
    }
}

/// The join of an up-to-date device: the catch-up's laptop is brought up to date
/// ([`bring_up_to_date`]), then its join's reads are explained and timed, and one more join
/// through the server runs under the database profiler ([`measure_up_to_date_join`]).
pub async fn up_to_date_join(
    c: &Common,
    user: &str,
    uri: &str,
    db: &str,
    skew: Duration,
) -> anyhow::Result<serde_json::Value> {
    let waited = bring_up_to_date(c, user, uri, db, skew).await?;
    measure_up_to_date_join(c, user, uri, db, waited).await
}

/// How the laptop was brought up to date: rejoins and seconds waited.
#[derive(Debug, Clone, Copy)]
pub struct UpToDate {
    rejoins: u32,
    waited_s: f64,
}

/// The laptop (`user`'s device) rejoins and closes until its document's acked set is
/// empty: each socket end moves its floor past what it acked, once those ids are older
/// than the server's skew window.
pub async fn bring_up_to_date(
    c: &Common,
    user: &str,
    uri: &str,
    db: &str,
    skew: Duration,
) -> anyhow::Result<UpToDate> {
    let connector = Connector::new(c);
    let url = &c.urls[0];
    let database = crate::mongo::connect(uri).await?.database(db);
    let started = Instant::now();
    let limit = skew + Duration::from_secs(60);
    let mut rejoins = 0;
    loop {
        match crate::explain::device_state(&database, user, LAPTOP).await? {
            Some(state) if state.acked == 0 => break,
            Some(state) => anyhow::ensure!(
                started.elapsed() < limit,
                "the laptop still has {} acked ids above its floor after {limit:?}",
                state.acked
            ),
            None => anyhow::bail!("no device document for {user}/{LAPTOP}"),
        }
        let ws = connector.connect(url, user, None, 8 * 1024).await?;
        read_backlog(ws, 0, Duration::from_secs(5), false, Some(LAPTOP), None).await?;
        rejoins += 1;
        // The floor moves in the background after the close.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(UpToDate {
        rejoins,
        waited_s: started.elapsed().as_secs_f64(),
    })
}

/// The up-to-date laptop's join: `explain` and round trips of its reads, then a real join
/// under the profiler.
pub async fn measure_up_to_date_join(
    c: &Common,
    user: &str,
    uri: &str,
    db: &str,
    waited: UpToDate,
) -> anyhow::Result<serde_json::Value> {
    let connector = Connector::new(c);
    let url = &c.urls[0];
    let UpToDate { rejoins, waited_s } = waited;
    let Some(mut v) = crate::explain::explain_device_join(uri, db, user, LAPTOP).await? else {
        anyhow::bail!("{user}/{LAPTOP} has acked ids above its floor again");
    };
    // A real join, as the server runs it: its reads are done when `joined` comes.
    let profiler = crate::explain::Profiler::start(uri, db).await?;
    let mut ws = connector.connect(url, user, None, 8 * 1024).await?;
    let t0 = now_us();
    let joined = crate::conn::join(&mut ws, Some(LAPTOP)).await;
    let joined_ms = (now_us() - t0) as f64 / 1000.0;
    let profiled = profiler.stop(user).await;
    ws.close().await;
    let pending = joined?;
    v["rejoins"] = json!(rejoins);
    v["waited_s"] = json!(waited_s);
    v["profiled_join"] = json!({"joined_ms": joined_ms, "pending": pending, "profile": profiled?});
    eprintln!(
        "drain: an up-to-date device's join ({rejoins} rejoins, {waited_s:.1} s): explain {} ms, profiler {} ms of MongoDB time, reads timed here {:.0} µs; joined after {joined_ms:.2} ms",
        v["execution_ms_total"],
        v["profiled_join"]["profile"]["millis_total"],
        v["round_trips_us_total"].as_f64().unwrap_or(f64::NAN)
    );
    Ok(v)
}

/// What the senders buffered for the offline user.
struct Fill {
    sent: u64,
    accepted: HashSet<String>,
    errors: BTreeMap<String, u64>,
    closes: Vec<String>,
    seconds: f64,
}

/// Every sender sends its share, pipelined, until all are answered.
async fn fill(
    args: &DrainArgs,
    connector: &Arc<Connector>,
    run: &str,
    receiver: &str,
) -> anyhow::Result<Fill> {
    let c = &args.common;
    let n_senders = args.senders.max(1);
    let senders = connect_all(
        connector,
        (0..n_senders)
            .map(|i| (c.urls[i % c.urls.len()].clone(), format!("{run}-s{i}")))
            .collect(),
        8 * 1024,
    )
    .await?;
    let start = Instant::now();
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            let share = args.messages / n_senders + usize::from(i < args.messages % n_senders);
            tokio::spawn(send_share(
                ws,
                i,
                share as u64,
                receiver.to_owned(),
                format!("{run}-c{i}"),
                c.size,
                args.window.max(1) as u64,
            ))
        })
        .collect();
    let mut fill = Fill {
        sent: 0,
        accepted: HashSet::new(),
        errors: BTreeMap::new(),
        closes: Vec::new(),
        seconds: 0.0,
    };
    for t in tasks {
        let out = t.await?;
        fill.sent += out.sent;
        for (code, n) in out.errors {
            *fill.errors.entry(code).or_default() += n;
        }
        fill.closes.extend(out.closed);
        fill.accepted.extend(out.accepted);
    }
    fill.seconds = start.elapsed().as_secs_f64();
    Ok(fill)
}

/// Sends `share` messages to `to`, at most `window` unanswered at a time.
async fn send_share(
    mut ws: WsClient,
    pair: usize,
    share: u64,
    to: String,
    chat: String,
    size: usize,
    window: u64,
) -> SenderOut {
    let mut out = SenderOut::default();
    let mut answered = 0u64;
    while answered < share {
        while out.sent < share && out.sent - answered < window {
            let seq = out.sent;
            let frame = frames::chat(&to, &chat, body(now_us(), pair, seq, size), seq);
            if let Err(e) = ws.send_frame(&frame).await {
                out.closed = Some(e.to_string());
                return out;
            }
            out.sent += 1;
        }
        let Ok(received) = tokio::time::timeout(Duration::from_secs(30), ws.recv()).await else {
            out.closed = Some("no answer within 30 s".into());
            return out;
        };
        match classify(received) {
            Incoming::Frame(ServerFrame::MessageAccepted(a)) => {
                answered += 1;
                out.accepted.insert(a.id);
            }
            Incoming::Frame(ServerFrame::Error(e)) => {
                answered += 1;
                *out.errors.entry(code_name(&e.code)).or_default() += 1;
            }
            Incoming::Frame(_) | Incoming::Other => {}
            Incoming::Closed(why) => {
                out.closed = Some(why);
                return out;
            }
        }
    }
    ws.close().await;
    out
}

/// What the joining socket saw. Times are µs on the [`now_us`] clock.
struct Drained {
    t0: u64,
    joined_us: Option<u64>,
    first_us: Option<u64>,
    last_us: u64,
    pending: Option<u64>,
    instance: Option<String>,
    hist: Histogram<u64>,
    seen: HashSet<String>,
    duplicates: u64,
    /// Of the duplicates, those not flagged `redelivery`.
    unflagged_duplicates: u64,
    redeliveries: u64,
    order_violations: u64,
    acked: u64,
    /// When MongoDB showed every message delivered and acked (with a [`RecordWatch`]).
    recorded_us: Option<u64>,
    close: Option<String>,
}

/// How the load generator sees that a drain is recorded: none of the receiver's messages
/// is left undelivered or unacknowledged in MongoDB (majority reads, on the two indexes
/// msgbuf keeps for exactly those).
pub struct RecordWatch {
    messages: Collection<Document>,
    receiver: String,
}

/// Between two looks at MongoDB: the resolution of `recorded_ms`.
const RECORD_POLL: Duration = Duration::from_millis(5);

impl RecordWatch {
    pub async fn connect(uri: &str, db: &str, receiver: &str) -> anyhow::Result<Self> {
        let client = crate::mongo::connect(uri).await?;
        Ok(RecordWatch {
            messages: crate::mongo::messages(&client.database(db)),
            receiver: receiver.to_owned(),
        })
    }

    /// Waits until every message of the receiver is recorded delivered and acked; the
    /// time (µs) it saw that, or `None` past `deadline`.
    async fn wait(&self, deadline: tokio::time::Instant) -> anyhow::Result<Option<u64>> {
        let undelivered = doc! {"receiver": &self.receiver, "delivered": false};
        let unacked =
            doc! {"receiver": &self.receiver, "delivered": true, "ackedAt": {"$type": "null"}};
        loop {
            // Hinted: left to the planner, a look can scan the receiver's whole backlog
            // (and slow the writes it waits for).
            let left = self
                .messages
                .find_one(undelivered.clone())
                .hint(Hint::Name("receiver_1_delivered_1__id_1".into()))
                .projection(doc! {"_id": 1})
                .await?
                .is_some()
                || self
                    .messages
                    .find_one(unacked.clone())
                    .hint(Hint::Name("receiver_1__id_1_unacked".into()))
                    .projection(doc! {"_id": 1})
                    .await?
                    .is_some();
            if !left {
                return Ok(Some(now_us()));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(RECORD_POLL).await;
        }
    }
}

/// Joins and reads until `expected` distinct messages arrived (or `timeout`); with `ack`,
/// acks each new message before reading on. Then acks whatever is not acked yet and
/// watches a second for late extras.
/// The device ids of `--catch-up`.
const PHONE: &str = "phone";
const LAPTOP: &str = "laptop";

async fn read_backlog(
    mut ws: WsClient,
    expected: u64,
    timeout: Duration,
    ack: bool,
    device: Option<&'static str>,
    watch: Option<&RecordWatch>,
) -> anyhow::Result<Drained> {
    let mut d = Drained {
        t0: 0,
        joined_us: None,
        first_us: None,
        last_us: 0,
        pending: None,
        instance: None,
        hist: new_hist(),
        seen: HashSet::with_capacity(expected as usize),
        duplicates: 0,
        unflagged_duplicates: 0,
        redeliveries: 0,
        order_violations: 0,
        acked: 0,
        recorded_us: None,
        close: None,
    };
    let mut unacked: Vec<String> = Vec::new();
    let mut last_seq: HashMap<usize, u64> = HashMap::new();
    d.t0 = now_us();
    d.last_us = d.t0;
    let join = match device {
        Some(device) => frames::join_device(device)?,
        None => frames::join(),
    };
    ws.send_frame(&join).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    while (d.seen.len() as u64) < expected {
        let Ok(received) = tokio::time::timeout_at(deadline, ws.recv()).await else {
            d.close = Some("drain timeout".to_owned());
            break;
        };
        match classify(received) {
            Incoming::Frame(ServerFrame::Joined(j)) => {
                d.joined_us = Some(now_us() - d.t0);
                d.pending = Some(j.pending);
                d.instance = Some(j.instance);
            }
            Incoming::Frame(ServerFrame::ChatMessage(m)) => {
                let now = now_us();
                if m.redelivery {
                    d.redeliveries += 1;
                }
                if !d.seen.insert(m.id.clone()) {
                    d.duplicates += 1;
                    d.unflagged_duplicates += u64::from(!m.redelivery);
                    continue;
                }
                d.first_us.get_or_insert(now);
                d.hist.saturating_record((now - d.t0).max(1));
                if let Some((_, p, n)) = parse_body(&m.message) {
                    if last_seq.get(&p).is_some_and(|l| n <= *l) {
                        d.order_violations += 1;
                    }
                    last_seq.insert(p, n);
                }
                if ack {
                    if let Err(e) = ws.send_frame(&frames::ack(vec![m.id.clone()])).await {
                        d.close = Some(e.to_string());
                        break;
                    }
                    d.acked += 1;
                } else {
                    unacked.push(m.id);
                }
                // With acks, the drain is over when the last one is sent.
                d.last_us = if ack { now_us() } else { now };
            }
            Incoming::Frame(_) | Incoming::Other => {}
            Incoming::Closed(why) => {
                d.close = Some(why);
                break;
            }
        }
    }
    for chunk in unacked.chunks(1000) {
        ws.send_frame(&frames::ack(chunk.to_vec())).await?;
    }
    if let Some(watch) = watch {
        d.recorded_us = watch.wait(deadline).await?;
    }
    let settle = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(received) = tokio::time::timeout_at(settle, ws.recv()).await {
        match classify(received) {
            Incoming::Frame(ServerFrame::ChatMessage(m)) => {
                let repeat = !d.seen.insert(m.id);
                d.duplicates += u64::from(repeat);
                d.unflagged_duplicates += u64::from(repeat && !m.redelivery);
            }
            Incoming::Closed(_) => break,
            _ => {}
        }
    }
    ws.close().await;
    Ok(d)
}
