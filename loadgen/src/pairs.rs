//! Sender → receiver pairs, the load of `latency` and `throughput`: the tasks, their
//! counters, and the merge of their results into a report.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use msgbuf::client::WsClient;
use msgbuf::protocol::ServerFrame;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::conn::{connect_all, connect_all_as, run_id, Common, Connector};
use crate::frames::{self, classify, code_name, seq_of, Incoming};
use crate::histogram::{new_hist, LatencyMs};
use crate::report::Report;
use crate::stamp::{body, now_us, parse_body, sleep_until_us};

#[derive(Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub accepted: AtomicU64,
    pub errors: AtomicU64,
    pub received: AtomicU64,
}

impl Counters {
    pub fn get(&self) -> (u64, u64, u64, u64) {
        (
            self.sent.load(Relaxed),
            self.accepted.load(Relaxed),
            self.errors.load(Relaxed),
            self.received.load(Relaxed),
        )
    }
}

pub struct SenderOut {
    pub sent: u64,
    pub accepted: HashSet<String>,
    pub errors: BTreeMap<String, u64>,
    pub receipts: u64,
    pub closed: Option<String>,
    /// send → message_accepted.
    pub accept_hist: Histogram<u64>,
    /// send → receipt (the receiver's ack went round through MongoDB).
    pub receipt_hist: Histogram<u64>,
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

pub struct ReceiverOut {
    pub ids: HashSet<String>,
    pub hist: Histogram<u64>,
    pub duplicates: u64,
    /// Of the duplicates, those not flagged `redelivery` (a re-send after the ack timeout
    /// is meant to repeat an id; these are not).
    pub unflagged_duplicates: u64,
    pub redeliveries: u64,
    pub order_violations: u64,
    pub foreign: u64,
    /// Messages completed per second since `t0` (index = second): received here, by the
    /// last of the user's sockets to get them (see [`Completion`]).
    pub per_second: Vec<u64>,
    /// The worst send → receive latency (µs) of the messages received in each second: shows
    /// whether a tail is spread out or a few stalls.
    pub max_per_second: Vec<u64>,
    pub acked: u64,
    pub closed: Option<String>,
}

/// How a sender paces itself.
pub enum Pace {
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
pub async fn sender_task(
    mut ws: WsClient,
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
            received = ws.recv() => {
                match classify(received) {
                    Incoming::Frame(ServerFrame::MessageAccepted(a)) => {
                        let now = now_us();
                        let t = seq_of(a.client_msg_id.as_deref())
                            .and_then(|seq| sent_at.remove(&seq));
                        if let Some(t) = t {
                            out.accept_hist.saturating_record(now.saturating_sub(t).max(1));
                            accepted_at.insert(a.id.clone(), t);
                        }
                        if out.accepted.insert(a.id) {
                            counters.accepted.fetch_add(1, Relaxed);
                        }
                    }
                    Incoming::Frame(ServerFrame::Error(e)) => {
                        *out.errors.entry(code_name(&e.code)).or_default() += 1;
                        counters.errors.fetch_add(1, Relaxed);
                        // That message will never arrive: give its window slot back.
                        if let Pace::Window { permits, .. } = &pace {
                            if e.client_msg_id.is_some() {
                                permits.add_permits(1);
                            }
                        }
                    }
                    Incoming::Frame(ServerFrame::Receipt(r)) => {
                        out.receipts += 1;
                        if let Some(t) = accepted_at.remove(&r.id) {
                            out.receipt_hist.saturating_record(now_us().saturating_sub(t).max(1));
                        }
                    }
                    Incoming::Frame(_) | Incoming::Other => {}
                    Incoming::Closed(why) => { out.closed = Some(why); break; }
                }
                false
            }
        };
        if go {
            let t = due.unwrap_or_else(now_us);
            let frame = frames::chat(&to, &chat, body(t, pair, seq, size), seq);
            if let Err(e) = ws.send_frame(&frame).await {
                out.closed = Some(e.to_string());
                break;
            }
            sent_at.insert(seq, t);
            seq += 1;
            out.sent += 1;
            counters.sent.fetch_add(1, Relaxed);
        }
    }
    ws.close().await;
    out
}

/// One pair's messages on their way to every receiver socket of its user. With several
/// (devices), a message is done when the last socket got it: then its closed-loop window
/// slot comes back, and it counts in the rate once (messages, not deliveries).
pub struct Completion {
    sockets: usize,
    permits: Option<Arc<Semaphore>>,
    /// seq → sockets that got it, until all did.
    seen: std::sync::Mutex<HashMap<u64, usize>>,
}

impl Completion {
    pub fn new(sockets: usize, permits: Option<Arc<Semaphore>>) -> Self {
        Completion {
            sockets: sockets.max(1),
            permits,
            seen: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// A socket got message `seq` (its first copy there): whether that completed it.
    fn got(&self, seq: u64) -> bool {
        let done = self.sockets == 1 || {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let n = seen.entry(seq).or_default();
            *n += 1;
            let done = *n >= self.sockets;
            if done {
                seen.remove(&seq);
            }
            done
        };
        if let (true, Some(p)) = (done, &self.permits) {
            p.add_permits(1);
        }
        done
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
pub async fn receiver_task(
    mut ws: WsClient,
    pair: usize,
    t0_us: u64,
    ack_interval: Option<Duration>,
    completion: Arc<Completion>,
    counters: Arc<Counters>,
    stop: CancellationToken,
) -> ReceiverOut {
    let mut out = ReceiverOut {
        ids: HashSet::new(),
        hist: new_hist(),
        duplicates: 0,
        unflagged_duplicates: 0,
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
            received = ws.recv() => {
                match classify(received) {
                    Incoming::Frame(ServerFrame::ChatMessage(m)) => {
                        let now = now_us();
                        let id = m.id;
                        if m.redelivery {
                            out.redeliveries += 1;
                        }
                        if !out.ids.insert(id.clone()) {
                            out.duplicates += 1;
                            out.unflagged_duplicates += u64::from(!m.redelivery);
                        } else {
                            counters.received.fetch_add(1, Relaxed);
                            let sec = (now.saturating_sub(t0_us) / 1_000_000) as usize;
                            if out.per_second.len() <= sec {
                                out.per_second.resize(sec + 1, 0);
                                out.max_per_second.resize(sec + 1, 0);
                            }
                            match parse_body(&m.message) {
                                Some((t, p, n)) if p == pair => {
                                    let us = now.saturating_sub(t).max(1);
                                    out.hist.saturating_record(us);
                                    out.max_per_second[sec] = out.max_per_second[sec].max(us);
                                    if last_seq.is_some_and(|l| n <= l) {
                                        out.order_violations += 1;
                                    }
                                    last_seq = Some(n);
                                    if completion.got(n) {
                                        out.per_second[sec] += 1;
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
            let frame = frames::ack(std::mem::take(&mut pending_acks));
            if let Err(e) = ws.send_frame(&frame).await {
                out.closed = Some(e.to_string());
                break;
            }
        }
    }
    if !pending_acks.is_empty() {
        out.acked += pending_acks.len() as u64;
        let _ = ws.send_frame(&frames::ack(pending_acks)).await;
    }
    ws.close().await;
    out
}

pub struct PairRun {
    pub senders: Vec<tokio::task::JoinHandle<SenderOut>>,
    /// `sockets` per sender, in sender order.
    pub receivers: Vec<tokio::task::JoinHandle<ReceiverOut>>,
    /// `--devices` (0: one socket without a device) and the sockets per receiver.
    pub devices: usize,
    pub sockets: usize,
    pub plain_sockets: bool,
    pub counters: Arc<Counters>,
    pub stop_sending: CancellationToken,
    pub stop: CancellationToken,
}

/// Sets up `pairs` joined receivers and joined senders; sender i and receiver i are on
/// different instances when there are two or more URLs.
pub async fn setup_pairs(
    common: &Common,
    pairs: usize,
    read_buffer: usize,
) -> anyhow::Result<(Vec<WsClient>, Vec<WsClient>, String)> {
    let connector = Arc::new(Connector::new(common));
    let run = run_id(common);
    let n = common.urls.len();
    let sockets = common.sockets();
    let receivers = connect_all_as(
        &connector,
        (0..pairs * sockets)
            .map(|j| {
                let (i, k) = (j / sockets, j % sockets);
                (
                    common.urls[(i + 1 + k) % n].clone(),
                    format!("{run}-r{i}"),
                    common.device_id(k),
                )
            })
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

pub fn start_pairs(
    common: &Common,
    senders: Vec<WsClient>,
    receivers: Vec<WsClient>,
    run: &str,
    t0_us: u64,
    mut pace: impl FnMut(usize) -> Pace,
    permits: &[Arc<Semaphore>],
) -> PairRun {
    let counters = Arc::new(Counters::default());
    let stop_sending = CancellationToken::new();
    let stop = CancellationToken::new();
    let sockets = common.sockets();
    let completions: Vec<Arc<Completion>> = (0..senders.len())
        .map(|i| Arc::new(Completion::new(sockets, permits.get(i).cloned())))
        .collect();
    let receivers = receivers
        .into_iter()
        .enumerate()
        .map(|(j, ws)| {
            let i = j / sockets;
            tokio::spawn(receiver_task(
                ws,
                i,
                t0_us,
                (!common.no_ack).then_some(common.ack_interval),
                completions[i].clone(),
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
        devices: common.devices,
        sockets,
        plain_sockets: common.plain_sockets,
        counters,
        stop_sending,
        stop,
    }
}

/// Waits until every send is answered and every accepted message received (or `grace`),
/// then stops everything and merges the results into `report`.
pub async fn finish_pairs(
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
        if accepted + errors >= sent && received >= accepted * run.sockets as u64 {
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
    let mut unflagged_duplicates = 0;
    for (i, s) in senders.iter().enumerate() {
        report.sent += s.sent;
        report.accepted += s.accepted.len() as u64;
        for (code, n) in &s.errors {
            report.errors += n;
            *report.error_codes.entry(code.clone()).or_default() += n;
        }
        receipts += s.receipts;
        accept_hist.add(&s.accept_hist).ok();
        receipt_hist.add(&s.receipt_hist).ok();
        if let Some(why) = &s.closed {
            closed.push(format!("sender {i}: {why}"));
        }
    }
    // Every socket (device) of a receiver gets every message: each is checked on its own;
    // the rate counts messages once each got to all of them (not deliveries).
    for (j, r) in receivers.iter().enumerate() {
        let (i, k) = (j / run.sockets, j % run.sockets);
        let s = &senders[i];
        report.received += r.ids.len() as u64;
        report.lost += s.accepted.difference(&r.ids).count() as u64;
        report.unexpected += r.ids.difference(&s.accepted).count() as u64;
        report.duplicates += r.duplicates;
        unflagged_duplicates += r.unflagged_duplicates;
        report.redeliveries += r.redeliveries;
        report.order_violations += r.order_violations;
        foreign += r.foreign;
        acked += r.acked;
        hist.add(&r.hist).ok();
        if per_second.len() < r.per_second.len() {
            per_second.resize(r.per_second.len(), 0);
        }
        for (sec, n) in r.per_second.iter().enumerate() {
            per_second[sec] += n;
        }
        if max_per_second.len() < r.max_per_second.len() {
            max_per_second.resize(r.max_per_second.len(), 0);
        }
        for (sec, us) in r.max_per_second.iter().enumerate() {
            max_per_second[sec] = max_per_second[sec].max(*us);
        }
        if let Some(why) = &r.closed {
            closed.push(format!("receiver {i} device {k}: {why}"));
        }
    }
    report.extra.insert("devices".into(), json!(run.devices));
    report
        .extra
        .insert("sockets_per_receiver".into(), json!(run.sockets));
    report
        .extra
        .insert("plain_sockets".into(), json!(run.plain_sockets));
    report
        .extra
        .insert("unflagged_duplicates".into(), json!(unflagged_duplicates));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_completes_when_the_last_socket_got_it() {
        let permits = Arc::new(Semaphore::new(0));
        let c = Completion::new(3, Some(permits.clone()));
        assert!(!c.got(7));
        assert!(!c.got(7));
        assert!(!c.got(8));
        assert_eq!(
            permits.available_permits(),
            0,
            "no slot back before the third"
        );
        assert!(c.got(7));
        assert_eq!(permits.available_permits(), 1);
        let single = Completion::new(1, None);
        assert!(single.got(1), "one socket: every first copy completes");
    }
}
