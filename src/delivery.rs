//! The delivery rules in one place: accepting (batched inserts), pushing inserts to local
//! sockets, recording deliveries (batched claims), receipts, and the redelivery sweep.
//!
//! Round trips are batched where the guarantees allow it. Inserts are grouped per shard
//! (a sender always maps to the same shard, and a shard runs one ordered `insertMany` at
//! a time, so one sender's messages are stored — and streamed — in acceptance order):
//! sends that arrive while a shard's batch is in flight go out together in its next one.
//! Claims are grouped into one conditional `updateMany` (`delivered: false` in the filter,
//! so each document still flips exactly once), and so are acks; a claim whose ack arrives
//! while it waits is written together with it (one rewrite of the document, not two).

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use mongodb::bson::{oid::ObjectId, DateTime};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::{DeliveryPath, Metrics};
use crate::presence::{Outbound, Presence};
use crate::protocol::{self, rfc3339, Receipt};
use crate::store::{Accepted, BufferedMessage, Store, StoreError};

/// Several shards keep several batches in flight under load (one shard halved the
/// throughput scenario's rate in BENCHMARKS.md); each sender stays on one shard.
const INSERT_SHARDS: usize = 4;
const MAX_INSERT_BATCH: usize = 256;
/// Claims and acks recorded by one round of writes, at most.
const MAX_RECORD_BATCH: usize = 1000;
/// Claims and acks are bookkeeping (the push already happened, an ack only gates the
/// sender's receipt): waiting a little turns ~one majority write per message into one per
/// batch, and gives a client that acks at once the time to get its ack in before the claim
/// is written, so that both go in one write.
const RECORD_LINGER: Duration = Duration::from_millis(15);
const SWEEP_USERS_PER_QUERY: usize = 500;
const SWEEP_LIMIT: i64 = 1000;

struct AckJob {
    user: String,
    ids: Vec<ObjectId>,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// What the record loop writes: a delivery to claim (with the message's receiver), or a
/// socket's acks.
enum Record {
    Claim(ObjectId, String, DeliveryPath),
    Ack(AckJob),
}

struct InsertJob {
    msg: BufferedMessage,
    reply: oneshot::Sender<Result<Accepted, StoreError>>,
}

pub struct Delivery {
    store: Store,
    instance: Arc<str>,
    presence: Arc<Presence>,
    metrics: Arc<Metrics>,
    ack_timeout: Duration,
    inserts: Vec<mpsc::Sender<InsertJob>>,
    records: mpsc::Sender<Record>,
}

impl Delivery {
    /// Starts the insert shards and the claim and ack batcher on `tracker`; they finish
    /// the work queued before `cancel` and then stop.
    pub fn start(
        store: Store,
        instance: Arc<str>,
        presence: Arc<Presence>,
        metrics: Arc<Metrics>,
        ack_timeout: Duration,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Arc<Self> {
        let inserts = (0..INSERT_SHARDS)
            .map(|_| {
                let (tx, rx) = mpsc::channel(4 * MAX_INSERT_BATCH);
                tracker.spawn(insert_loop(
                    store.clone(),
                    metrics.clone(),
                    rx,
                    cancel.clone(),
                ));
                tx
            })
            .collect();
        let (records, record_rx) = mpsc::channel(16 * MAX_RECORD_BATCH);
        tracker.spawn(record_loop(
            store.clone(),
            instance.clone(),
            metrics.clone(),
            record_rx,
            cancel.clone(),
        ));
        Arc::new(Delivery {
            store,
            instance,
            presence,
            metrics,
            ack_timeout,
            inserts,
            records,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn ack_timeout(&self) -> Duration {
        self.ack_timeout
    }

    /// Stores a message with majority write concern; returns once it is acknowledged.
    pub async fn accept(&self, msg: BufferedMessage) -> Result<Accepted, StoreError> {
        let started = Instant::now();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        msg.sender.hash(&mut h);
        let shard = &self.inserts[(h.finish() as usize) % self.inserts.len()];
        let (reply, rx) = oneshot::channel();
        shard
            .send(InsertJob { msg, reply })
            .await
            .map_err(|_| StoreError::ShuttingDown)?;
        let accepted = rx.await.map_err(|_| StoreError::ShuttingDown)?;
        self.metrics
            .accept_latency
            .record(started.elapsed().as_secs_f64());
        accepted
    }

    /// Records `user`'s acks (batched with other sockets' acks and with claims).
    pub async fn ack(&self, user: String, ids: Vec<ObjectId>) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.records
            .send(Record::Ack(AckJob { user, ids, reply }))
            .await
            .map_err(|_| StoreError::ShuttingDown)?;
        rx.await.map_err(|_| StoreError::ShuttingDown)?
    }

    /// An insert seen on the change stream: push it to the receiver's sockets here, then
    /// record the delivery.
    pub async fn on_insert(&self, msg: &BufferedMessage) {
        if !self.presence.is_online(&msg.receiver) {
            return;
        }
        let frame: Utf8Bytes = protocol::frame("chat_message", &msg.to_wire(false)).into();
        let pushed = self
            .presence
            .push(&msg.receiver, &Outbound::Chat { id: msg.id, frame });
        if pushed > 0 {
            let age_ms = DateTime::now().timestamp_millis() - msg.timestamp.timestamp_millis();
            self.metrics
                .delivery_latency
                .record(age_ms.max(0) as f64 / 1000.0);
            self.claim_later(&msg.receiver, &[msg.id], DeliveryPath::Live)
                .await;
        }
    }

    /// An ack seen on the change stream: tell the sender's sockets here.
    pub fn on_ack(&self, id: ObjectId, sender: &str, at: DateTime) {
        if !self.presence.is_online(sender) {
            return;
        }
        let receipt = Receipt {
            id: id.to_hex(),
            status: "delivered".to_owned(),
            at: rfc3339(at),
        };
        let frame: Utf8Bytes = protocol::frame("receipt", &receipt).into();
        let n = self.presence.push(sender, &Outbound::Frame(frame));
        self.metrics.receipts.increment(n as u64);
    }

    /// Queues claims of messages addressed to `receiver` for the batcher (waits when it is
    /// behind: backpressure on the stream).
    pub async fn claim_later(&self, receiver: &str, ids: &[ObjectId], path: DeliveryPath) {
        for id in ids {
            let record = Record::Claim(*id, receiver.to_owned(), path);
            if self.records.send(record).await.is_err() {
                return;
            }
        }
    }

    /// Re-sends pushed-but-unacknowledged messages of users joined here once their ack
    /// timeout passed (one instance wins each re-send), and pushes undelivered messages
    /// that no live push or drain took (a safety net for any gap).
    pub async fn sweep(&self) -> Result<(), StoreError> {
        let users = self.presence.joined_users();
        for chunk in users.chunks(SWEEP_USERS_PER_QUERY) {
            for msg in self
                .store
                .overdue(chunk, self.ack_timeout, SWEEP_LIMIT)
                .await?
            {
                if msg.delivered {
                    if self.store.claim_redelivery(msg.id, msg.pushed_at).await? {
                        // A re-send is meant to repeat an id: it skips the socket's duplicate check.
                        let frame: Utf8Bytes =
                            protocol::frame("chat_message", &msg.to_wire(true)).into();
                        if self.presence.push(&msg.receiver, &Outbound::Frame(frame)) > 0 {
                            self.metrics.delivered(DeliveryPath::Redelivery, 1);
                        }
                    }
                } else {
                    self.push_and_claim(&msg, DeliveryPath::Drain).await;
                }
            }
        }
        Ok(())
    }

    /// After the change stream lost its place: undelivered messages of users joined here
    /// are pushed from the collection, the source of truth.
    pub async fn rescan(&self) -> Result<usize, StoreError> {
        let users = self.presence.joined_users();
        let mut n = 0;
        for chunk in users.chunks(SWEEP_USERS_PER_QUERY) {
            let mut after = None;
            loop {
                let batch = self.store.undelivered_of(chunk, after, SWEEP_LIMIT).await?;
                for msg in &batch {
                    self.push_and_claim(msg, DeliveryPath::Drain).await;
                }
                n += batch.len();
                match batch.last() {
                    Some(last) if batch.len() as i64 == SWEEP_LIMIT => after = Some(last.id),
                    _ => break,
                }
            }
        }
        Ok(n)
    }

    async fn push_and_claim(&self, msg: &BufferedMessage, path: DeliveryPath) {
        let frame: Utf8Bytes = protocol::frame("chat_message", &msg.to_wire(false)).into();
        if self
            .presence
            .push(&msg.receiver, &Outbound::Chat { id: msg.id, frame })
            > 0
        {
            self.claim_later(&msg.receiver, &[msg.id], path).await;
        }
    }

    /// How often the redelivery sweep runs.
    pub fn sweep_interval(&self) -> Duration {
        (self.ack_timeout / 3).clamp(Duration::from_millis(200), Duration::from_secs(10))
    }
}

/// Runs the redelivery sweep until `cancel`.
pub async fn sweep_loop(delivery: Arc<Delivery>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(delivery.sweep_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = delivery.sweep().await {
            tracing::warn!(error = %e, "redelivery sweep failed; retrying next tick");
        }
    }
}

async fn insert_loop(
    store: Store,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<InsertJob>,
    cancel: CancellationToken,
) {
    let mut closed = false;
    let mut jobs = Vec::with_capacity(MAX_INSERT_BATCH);
    let mut docs = Vec::with_capacity(MAX_INSERT_BATCH);
    let mut replies = Vec::with_capacity(MAX_INSERT_BATCH);
    while let Some(job) = next_job(&mut rx, &cancel, &mut closed).await {
        jobs.push(job);
        take_queued(&mut rx, &mut jobs, MAX_INSERT_BATCH);
        for InsertJob { msg, reply } in jobs.drain(..) {
            docs.push(msg);
            replies.push(reply);
        }
        let started = Instant::now();
        let results = store.insert_batch(&docs).await;
        metrics
            .insert_latency
            .record(started.elapsed().as_secs_f64());
        for (reply, result) in replies.drain(..).zip(results) {
            // A dropped receiver is a client that went away; the message is stored anyway.
            let _ = reply.send(result);
        }
        docs.clear();
    }
}

/// Writes claims and acks in batches: per delivery path, the claims whose ack is in the
/// same batch go in one write with it ([`Store::claim_acked`]), the others in one claim
/// write; the remaining acks in one ack write. Replies to the ack jobs once all is written.
async fn record_loop(
    store: Store,
    instance: Arc<str>,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<Record>,
    cancel: CancellationToken,
) {
    let mut closed = false;
    let mut batch = Vec::with_capacity(MAX_RECORD_BATCH);
    while let Some(first) = next_job(&mut rx, &cancel, &mut closed).await {
        batch.push(first);
        linger(&mut rx, &mut batch, MAX_RECORD_BATCH, RECORD_LINGER, closed).await;
        let mut claims = Vec::new();
        let mut acks = Vec::new();
        for record in batch.drain(..) {
            match record {
                Record::Claim(id, receiver, path) => claims.push((id, receiver, path)),
                Record::Ack(job) => acks.push(job),
            }
        }
        let acked_by: HashMap<ObjectId, &str> = acks
            .iter()
            .flat_map(|job| job.ids.iter().map(|id| (*id, job.user.as_str())))
            .collect();
        // Ids whose ack went in with their claim: the ack write skips them.
        let mut done = HashSet::new();
        for path in [
            DeliveryPath::Live,
            DeliveryPath::Drain,
            DeliveryPath::Redelivery,
        ] {
            // An ack counts only from the message's receiver; checking that here keeps the
            // write's filter one shape (`_id` in a list), which MongoDB plans once.
            let (mut with_ack, mut alone) = (Vec::new(), Vec::new());
            for (id, receiver, _) in claims.iter().filter(|(_, _, p)| *p == path) {
                if acked_by.get(id) == Some(&receiver.as_str()) {
                    with_ack.push(*id);
                } else {
                    alone.push(*id);
                }
            }
            let n = with_ack.len() + alone.len();
            if n == 0 {
                continue;
            }
            let mut won = 0;
            if !with_ack.is_empty() {
                match store.claim_acked(&with_ack, &instance).await {
                    Ok(flipped) => {
                        won += flipped;
                        metrics.acks.increment(flipped);
                        metrics.claims_with_ack.increment(flipped);
                        if flipped == with_ack.len() as u64 {
                            done.extend(with_ack);
                        } else {
                            // Some were claimed elsewhere first: the plain writes below
                            // are conditional, so each still flips at most once.
                            alone.extend(with_ack);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, n = with_ack.len(), "claim with ack failed; writing them apart");
                        alone.extend(with_ack);
                    }
                }
            }
            if !alone.is_empty() {
                won += claim_until_written(&store, &instance, &alone, &cancel).await;
            }
            metrics.delivered(path, won);
            metrics.claims_lost.increment(n as u64 - won.min(n as u64));
        }
        if acks.is_empty() {
            continue;
        }
        let rest: Vec<(String, Vec<ObjectId>)> = acks
            .iter()
            .map(|job| {
                let ids = job.ids.iter().filter(|id| !done.contains(*id));
                (job.user.clone(), ids.copied().collect::<Vec<_>>())
            })
            .filter(|(_, ids)| !ids.is_empty())
            .collect();
        let result = if rest.is_empty() {
            Ok(0)
        } else {
            store.ack(&rest).await
        };
        match &result {
            Ok(n) => metrics.acks.increment(*n),
            Err(e) => tracing::warn!(error = %e, n = rest.len(), "acks not recorded"),
        }
        for job in acks {
            let _ = job.reply.send(match &result {
                Ok(_) => Ok(()),
                Err(StoreError::Mongo(e)) => Err(StoreError::Mongo(e.clone())),
                Err(_) => Err(StoreError::ShuttingDown),
            });
        }
    }
}

/// Claims `ids`, retrying with backoff until the write goes through or shutdown;
/// returns how many this instance flipped.
async fn claim_until_written(
    store: &Store,
    instance: &str,
    ids: &[ObjectId],
    cancel: &CancellationToken,
) -> u64 {
    let mut backoff = Duration::from_millis(50);
    loop {
        match store.claim(ids, instance).await {
            Ok(won) => return won,
            // Unclaimed messages stay `delivered: false` and are drained again on the
            // next join, so giving up at shutdown loses nothing.
            Err(e) if cancel.is_cancelled() => {
                tracing::warn!(error = %e, n = ids.len(), "claims not recorded at shutdown");
                return 0;
            }
            Err(e) => {
                tracing::warn!(error = %e, n = ids.len(), "claim failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cancel.cancelled() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The next job of a batching loop. On shutdown the queue stops taking work but what it
/// already holds is still returned; `None` once it is closed and empty.
async fn next_job<T>(
    rx: &mut mpsc::Receiver<T>,
    cancel: &CancellationToken,
    closed: &mut bool,
) -> Option<T> {
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled(), if !*closed => {
                rx.close();
                *closed = true;
            }
            job = rx.recv() => return job,
        }
    }
}

/// Adds jobs to `batch`, up to `max` in all, for at most `wait` (not at all once the
/// queue is closed: shutdown finishes what is queued without delay).
async fn linger<T>(
    rx: &mut mpsc::Receiver<T>,
    batch: &mut Vec<T>,
    max: usize,
    wait: Duration,
    closed: bool,
) {
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    while batch.len() < max {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) if closed => break,
            Err(_) => tokio::select! {
                _ = &mut deadline => break,
                job = rx.recv() => match job {
                    Some(job) => batch.push(job),
                    None => break,
                },
            },
        }
    }
}

/// Adds jobs that are already queued to `batch`, up to `max` in all (never waits).
fn take_queued<T>(rx: &mut mpsc::Receiver<T>, batch: &mut Vec<T>, max: usize) {
    while batch.len() < max {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
}
