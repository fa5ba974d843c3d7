//! Continuous chat traffic for fault scenarios: senders retry until accepted (same
//! `clientMsgId`), receivers reconnect and ack; the ledger counts every message.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use msgbuf::client::WsClient;
use tokio_util::sync::CancellationToken;

use super::token;

#[derive(Default)]
pub struct Ledger {
    pub sent: usize,
    /// id -> receiver
    pub accepted: HashMap<String, String>,
    /// receiver -> ids received (after de-duplication)
    pub received: HashMap<String, HashSet<String>>,
    /// The same id twice on one socket without `redelivery`.
    pub duplicates: usize,
    pub unavailable: usize,
    pub reconnects: usize,
}

impl Ledger {
    pub fn lost(&self) -> Vec<String> {
        self.accepted
            .iter()
            .filter(|(id, to)| !self.received.get(*to).is_some_and(|r| r.contains(*id)))
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub fn received_total(&self) -> usize {
        self.received.values().map(HashSet::len).sum()
    }
}

/// What a scenario reports (a row of docs/RELIABILITY.md).
pub struct Report {
    pub scenario: String,
    pub sent: usize,
    pub accepted: usize,
    pub received: usize,
    pub lost: usize,
    pub duplicates: usize,
    pub unavailable: usize,
    pub reconnects: usize,
    pub drained_in: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} s |",
            self.scenario,
            self.sent,
            self.accepted,
            self.received,
            self.lost,
            self.duplicates,
            self.unavailable,
            self.reconnects,
            self.drained_in.as_secs_f64()
        )
    }
}

pub struct Traffic {
    pub ledger: Arc<Mutex<Ledger>>,
    stop_sending: CancellationToken,
    stop_receiving: CancellationToken,
    senders: Vec<tokio::task::JoinHandle<()>>,
    receivers: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    /// `senders` users each sending one message per `interval` to `receivers` users, all
    /// spread over `urls` (each moves to the next URL when its instance goes away).
    pub fn start(
        scenario: &str,
        urls: Vec<String>,
        senders: usize,
        receivers: usize,
        interval: Duration,
    ) -> Traffic {
        Self::with(scenario, urls, senders, receivers, interval, true)
    }

    /// Senders only: the `receivers` users stay offline.
    pub fn offline(
        scenario: &str,
        urls: Vec<String>,
        senders: usize,
        receivers: usize,
        interval: Duration,
    ) -> Traffic {
        Self::with(scenario, urls, senders, receivers, interval, false)
    }

    fn with(
        scenario: &str,
        urls: Vec<String>,
        senders: usize,
        receivers: usize,
        interval: Duration,
        online: bool,
    ) -> Traffic {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let stop_sending = CancellationToken::new();
        let stop_receiving = CancellationToken::new();
        let urls = Arc::new(urls);
        let receiver_names: Arc<Vec<String>> = Arc::new(
            (0..receivers)
                .map(|r| format!("{scenario}-rx{r}"))
                .collect(),
        );
        let mut receiver_tasks = Vec::new();
        for (r, name) in receiver_names.iter().enumerate().filter(|_| online) {
            receiver_tasks.push(tokio::spawn(receive(
                name.clone(),
                urls.clone(),
                r,
                ledger.clone(),
                stop_receiving.clone(),
            )));
        }
        // Sender names are unique per Traffic, so their clientMsgIds never collide with an earlier run's.
        let run = mongodb::bson::oid::ObjectId::new().to_hex();
        let sender_tasks = (0..senders)
            .map(|s| {
                let name = format!("{scenario}-tx{s}-{}", &run[16..]);
                tokio::spawn(send(
                    name,
                    s,
                    urls.clone(),
                    receiver_names.clone(),
                    interval,
                    ledger.clone(),
                    stop_sending.clone(),
                ))
            })
            .collect();
        Traffic {
            ledger,
            stop_sending,
            stop_receiving,
            senders: sender_tasks,
            receivers: receiver_tasks,
        }
    }

    pub fn accepted(&self) -> usize {
        self.ledger.lock().map(|l| l.accepted.len()).unwrap_or(0)
    }

    /// Waits until `n` more messages than now were accepted.
    pub async fn progress(&self, n: usize, timeout: Duration) {
        let target = self.accepted() + n;
        super::wait_for(&format!("{n} more accepted messages"), timeout, || async {
            (self.accepted() >= target).then_some(())
        })
        .await;
    }

    /// Stops sending, waits (up to `timeout`) until every accepted message arrived, and reports.
    pub async fn finish(self, scenario: &str, timeout: Duration) -> Report {
        self.stop_sending.cancel();
        // A send in flight completes (accepted or not) before the ledger is final.
        for t in self.senders {
            let _ = t.await;
        }
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            let lost = self
                .ledger
                .lock()
                .map(|l| l.lost().len())
                .unwrap_or(usize::MAX);
            if lost == 0 || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let drained_in = started.elapsed();
        self.stop_receiving.cancel();
        for t in self.receivers {
            let _ = t.await;
        }
        let l = self.ledger.lock().expect("ledger");
        Report {
            scenario: scenario.to_owned(),
            sent: l.sent,
            accepted: l.accepted.len(),
            received: l.received_total(),
            lost: l.lost().len(),
            duplicates: l.duplicates,
            unavailable: l.unavailable,
            reconnects: l.reconnects,
            drained_in,
        }
    }
}

async fn connect(
    name: &str,
    urls: &[String],
    turn: &mut usize,
    ledger: &Mutex<Ledger>,
    stop: &CancellationToken,
) -> Option<WsClient> {
    loop {
        if stop.is_cancelled() {
            return None;
        }
        let url = &urls[*turn % urls.len()];
        match WsClient::connect(url, &token(name)).await {
            Ok(c) => return Some(c),
            Err(_) => {
                *turn += 1;
                if let Ok(mut l) = ledger.lock() {
                    l.reconnects += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn send(
    name: String,
    s: usize,
    urls: Arc<Vec<String>>,
    receivers: Arc<Vec<String>>,
    interval: Duration,
    ledger: Arc<Mutex<Ledger>>,
    stop: CancellationToken,
) {
    let mut turn = s;
    let mut conn: Option<WsClient> = None;
    let mut i = 0usize;
    let mut counted = usize::MAX;
    while !stop.is_cancelled() {
        let Some(c) = conn.as_mut() else {
            conn = connect(&name, &urls, &mut turn, &ledger, &stop).await;
            continue;
        };
        let to = &receivers[(s + i) % receivers.len()];
        let client_id = format!("{name}-{i}");
        if counted != i {
            counted = i;
            if let Ok(mut l) = ledger.lock() {
                l.sent += 1;
            }
        }
        if c.chat(to, "fault", &format!("{name} {i}"), Some(&client_id))
            .await
            .is_err()
        {
            conn = None;
            turn += 1;
            continue;
        }
        match c.next_event(Duration::from_secs(10)).await {
            Ok(ev) if ev.event == "message_accepted" => {
                let id = ev.data["id"].as_str().unwrap_or_default().to_owned();
                if let Ok(mut l) = ledger.lock() {
                    l.accepted.insert(id, to.clone());
                }
                i += 1;
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(interval) => {}
                }
            }
            Ok(ev) if ev.event == "error" && ev.data["code"] == "unavailable" => {
                if let Ok(mut l) = ledger.lock() {
                    l.unavailable += 1;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(ev) => panic!("{name}: unexpected answer {} {}", ev.event, ev.data),
            Err(_) => {
                // The instance went away (or no answer): retry the same clientMsgId elsewhere.
                conn = None;
                turn += 1;
            }
        }
    }
}

async fn receive(
    name: String,
    urls: Arc<Vec<String>>,
    r: usize,
    ledger: Arc<Mutex<Ledger>>,
    stop: CancellationToken,
) {
    let mut turn = r + 1;
    while !stop.is_cancelled() {
        let Some(mut c) = connect(&name, &urls, &mut turn, &ledger, &stop).await else {
            return;
        };
        if c.join(Duration::from_secs(10)).await.is_err() {
            turn += 1;
            continue;
        }
        let mut on_socket = HashSet::new();
        loop {
            let ev = tokio::select! {
                _ = stop.cancelled() => return,
                ev = c.next_event(Duration::from_secs(3600)) => ev,
            };
            let Ok(ev) = ev else {
                turn += 1;
                break;
            };
            if ev.event != "chat_message" {
                continue;
            }
            let id = ev.data["id"].as_str().unwrap_or_default().to_owned();
            let redelivery = ev.data["redelivery"].as_bool().unwrap_or(false);
            if let Ok(mut l) = ledger.lock() {
                if !on_socket.insert(id.clone()) && !redelivery {
                    l.duplicates += 1;
                }
                l.received
                    .entry(name.clone())
                    .or_default()
                    .insert(id.clone());
            }
            if c.ack(&[id]).await.is_err() {
                turn += 1;
                break;
            }
        }
    }
}
