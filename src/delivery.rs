//! The delivery rules in one place: accepting (batched inserts), pushing inserts to local
//! sockets, recording deliveries (batched claims), receipts, and the redelivery sweep.
//!
//! Round trips are batched where the guarantees allow it. Inserts are grouped per shard
//! (a sender always maps to the same shard, and a shard runs one ordered `insertMany` at
//! a time, so one sender's messages are stored — and streamed — in acceptance order):
//! sends that arrive while a shard's batch is in flight go out together in its next one.
//! Claims are grouped into one conditional `updateMany` (`delivered: false` in the filter,
//! so each document still flips exactly once), and so are acks.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

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
const MAX_CLAIM_BATCH: usize = 1000;
const CLAIM_LINGER: Duration = Duration::from_millis(10);
const MAX_ACK_BATCH: usize = 256;
/// Acks only gate the sender's receipt, never a delivery: waiting a little for more of
/// them turns ~one majority write per message into one per batch.
const ACK_LINGER: Duration = Duration::from_millis(20);
const SWEEP_USERS_PER_QUERY: usize = 500;
const SWEEP_LIMIT: i64 = 1000;

struct AckJob {
    user: String,
    ids: Vec<ObjectId>,
    reply: oneshot::Sender<Result<(), StoreError>>,
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
    claims: mpsc::Sender<(ObjectId, DeliveryPath)>,
    acks: mpsc::Sender<AckJob>,
}

impl Delivery {
    /// Starts the insert shards and the claim batcher on `tracker`; they finish the work
    /// queued before `cancel` and then stop.
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
                tracker.spawn(insert_loop(store.clone(), rx, cancel.clone()));
                tx
            })
            .collect();
        let (claims, claim_rx) = mpsc::channel(16 * MAX_CLAIM_BATCH);
        tracker.spawn(claim_loop(
            store.clone(),
            instance.clone(),
            metrics.clone(),
            claim_rx,
            cancel.clone(),
        ));
        let (acks, ack_rx) = mpsc::channel(4 * MAX_ACK_BATCH);
        tracker.spawn(ack_loop(
            store.clone(),
            metrics.clone(),
            ack_rx,
            cancel.clone(),
        ));
        Arc::new(Delivery {
            store,
            instance,
            presence,
            metrics,
            ack_timeout,
            inserts,
            claims,
            acks,
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
        let mut h = std::collections::hash_map::DefaultHasher::new();
        msg.sender.hash(&mut h);
        let shard = &self.inserts[(h.finish() as usize) % self.inserts.len()];
        let (reply, rx) = oneshot::channel();
        shard
            .send(InsertJob { msg, reply })
            .await
            .map_err(|_| StoreError::ShuttingDown)?;
        rx.await.map_err(|_| StoreError::ShuttingDown)?
    }

    /// Records `user`'s acks (batched with other sockets' acks into one write).
    pub async fn ack(&self, user: String, ids: Vec<ObjectId>) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.acks
            .send(AckJob { user, ids, reply })
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
            self.claim_later(&[msg.id], DeliveryPath::Live).await;
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

    /// Queues claims for the batcher (waits when it is behind: backpressure on the stream).
    pub async fn claim_later(&self, ids: &[ObjectId], path: DeliveryPath) {
        for id in ids {
            if self.claims.send((*id, path)).await.is_err() {
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
            self.claim_later(&[msg.id], path).await;
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

async fn insert_loop(store: Store, mut rx: mpsc::Receiver<InsertJob>, cancel: CancellationToken) {
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
        let results = store.insert_batch(&docs).await;
        for (reply, result) in replies.drain(..).zip(results) {
            // A dropped receiver is a client that went away; the message is stored anyway.
            let _ = reply.send(result);
        }
        docs.clear();
    }
}

async fn claim_loop(
    store: Store,
    instance: Arc<str>,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<(ObjectId, DeliveryPath)>,
    cancel: CancellationToken,
) {
    let mut closed = false;
    let mut batch: Vec<(ObjectId, DeliveryPath)> = Vec::with_capacity(MAX_CLAIM_BATCH);
    while let Some(item) = next_job(&mut rx, &cancel, &mut closed).await {
        batch.push(item);
        // A claim is bookkeeping (the push already happened): linger briefly so that one
        // write records many deliveries and MongoDB syncs its journal less often.
        linger(&mut rx, &mut batch, MAX_CLAIM_BATCH, CLAIM_LINGER, closed).await;
        for path in [
            DeliveryPath::Live,
            DeliveryPath::Drain,
            DeliveryPath::Redelivery,
        ] {
            let ids: Vec<ObjectId> = batch
                .iter()
                .filter(|(_, p)| *p == path)
                .map(|(id, _)| *id)
                .collect();
            if ids.is_empty() {
                continue;
            }
            let mut backoff = Duration::from_millis(50);
            loop {
                match store.claim(&ids, &instance).await {
                    Ok(won) => {
                        metrics.delivered(path, won);
                        metrics
                            .claims_lost
                            .increment(ids.len() as u64 - won.min(ids.len() as u64));
                        break;
                    }
                    // Unclaimed messages stay `delivered: false` and are drained again on the
                    // next join, so giving up at shutdown loses nothing.
                    Err(e) if cancel.is_cancelled() => {
                        tracing::warn!(error = %e, n = ids.len(), "claims not recorded at shutdown");
                        break;
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
        batch.clear();
    }
}

/// Groups acks from all sockets into one `updateMany` per batch (one round trip and one
/// journal sync for many acks), lingering [`ACK_LINGER`] for more.
async fn ack_loop(
    store: Store,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<AckJob>,
    cancel: CancellationToken,
) {
    let mut closed = false;
    let mut jobs = Vec::with_capacity(MAX_ACK_BATCH);
    let mut batch: Vec<(String, Vec<ObjectId>)> = Vec::with_capacity(MAX_ACK_BATCH);
    let mut replies = Vec::with_capacity(MAX_ACK_BATCH);
    while let Some(job) = next_job(&mut rx, &cancel, &mut closed).await {
        jobs.push(job);
        linger(&mut rx, &mut jobs, MAX_ACK_BATCH, ACK_LINGER, closed).await;
        for AckJob { user, ids, reply } in jobs.drain(..) {
            batch.push((user, ids));
            replies.push(reply);
        }
        let result = store.ack(&batch).await;
        match &result {
            Ok(n) => metrics.acks.increment(*n),
            Err(e) => tracing::warn!(error = %e, n = batch.len(), "acks not recorded"),
        }
        for reply in replies.drain(..) {
            let _ = reply.send(match &result {
                Ok(_) => Ok(()),
                Err(StoreError::Mongo(e)) => Err(StoreError::Mongo(e.clone())),
                Err(_) => Err(StoreError::ShuttingDown),
            });
        }
        batch.clear();
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
