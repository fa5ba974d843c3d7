//! `floor`: MongoDB alone — insert → change event latency at a fixed rate, and the
//! insert+notify rate of closed-loop writers. The reference every target is set from.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use futures::StreamExt;
use hdrhistogram::Histogram;
use mongodb::bson::{doc, Document};
use msgbuf::parse_duration;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::histogram::{new_hist, LatencyMs};
use crate::mongo;
use crate::procfs::proc_cpu_s;
use crate::report::Report;
use crate::stamp::{body, instant_of, now_us, parse_body};

#[derive(Args)]
pub struct FloorArgs {
    /// Replica set to measure (a scratch database is created and dropped).
    #[arg(long, env = "MSGBUF_MONGODB_URI")]
    pub mongodb_uri: String,
    /// The mongod process: its CPU time per phase goes into the report.
    #[arg(long)]
    pub mongod_pid: Option<u32>,
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Inserts per second in the latency phase (open loop).
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Concurrent writers in the throughput phase (each: insert, wait, insert …).
    #[arg(long, default_value_t = 32)]
    pub writers: usize,
    /// Documents per insert in the throughput phase (1 = insertOne).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub throughput_duration: Duration,
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub warmup: Duration,
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Grace for the last change events.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,
}

pub struct FloorPhaseOut {
    pub hist: Histogram<u64>,
    pub ids: HashSet<i64>,
    pub duplicates: u64,
    pub per_second: Vec<u64>,
}

pub async fn floor(args: FloorArgs) -> anyhow::Result<()> {
    let client = mongo::connect(&args.mongodb_uri).await?;
    let db_name = format!("msgbuf_floor_{}", std::process::id());
    let db = client.database(&db_name);
    // msgbuf's collection, indexes, write concern and stream filter, without msgbuf.
    let messages = mongo::messages(&db);
    mongo::create_indexes(&messages).await?;
    let mut stream = messages.watch().pipeline(mongo::stream_pipeline()).await?;
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
        mongo::new_message(
            &format!("floor-w{phase}"),
            "floor-r",
            "floor",
            &body(t, phase, seq as u64, args.size),
            &seq.to_string(),
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
        let (messages, acked, errors) = (messages.clone(), acked0.clone(), errors0.clone());
        let msg = msg_of(0, seq, due);
        inserts.push(tokio::spawn(async move {
            match messages.insert_one(&msg).await {
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
        let (messages, next_seq, acked, ids, errors) = (
            messages.clone(),
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
                let docs: Vec<Document> = seqs
                    .iter()
                    .map(|s| {
                        mongo::new_message(
                            "floor-w1",
                            "floor-r",
                            "floor",
                            &body(t, 1, *s as u64, size),
                            &s.to_string(),
                        )
                    })
                    .collect();
                let r = if batch == 1 {
                    messages.insert_one(&docs[0]).await.map(|_| ())
                } else {
                    messages.insert_many(&docs).await.map(|_| ())
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
        let n = messages.count_documents(doc! {}).await.unwrap_or(0);
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
