//! The delivery rules in one place: accepting (batched inserts), pushing inserts to local
//! sockets, recording deliveries (batched claims), receipts, re-sends after the ack
//! timeout, and the sweep.
//!
//! Round trips are batched where the guarantees allow it ([`batching`]). Inserts are
//! grouped per shard (a sender always maps to the same shard, and a shard runs one
//! ordered `insertMany` at a time, so one sender's messages are stored — and streamed —
//! in acceptance order). Claims are grouped into one conditional `updateMany`
//! (`delivered: false` in the filter, so each document still flips exactly once), and so
//! are acks; a claim whose ack arrives while it waits is written together with it
//! ([`records`]).

mod batching;
mod device_acks;
mod held_claims;
mod recent;
mod records;

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use mongodb::bson::{oid::ObjectId, DateTime};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::device::DeviceId;
use crate::error::Error;
use crate::limits::SendLimit;
use crate::metrics::{DeliveryPath, Metrics};
use crate::presence::{Outbound, Presence};
use crate::protocol::{rfc3339, Accepted, Receipt, ServerFrame};
use crate::store::{BufferedMessage, DevicePolicy, Receivers, Store, StoreError};
use batching::{InsertJob, Record};

/// Several shards keep several batches in flight under load (one shard halved the
/// throughput scenario's rate in BENCHMARKS.md); each sender stays on one shard.
const INSERT_SHARDS: usize = 4;
const SWEEP_USERS_PER_QUERY: usize = 500;
const SWEEP_LIMIT: i64 = 1000;

pub struct Delivery {
    store: Store,
    /// Recorded as `deliveredBy`.
    instance: Arc<str>,
    presence: Arc<Presence>,
    metrics: Arc<Metrics>,
    /// A push not acked within this is re-sent.
    ack_timeout: Duration,
    /// One queue per insert shard.
    inserts: Vec<mpsc::Sender<InsertJob>>,
    /// Claims and acks for the record loop.
    records: batching::RecordQueue,
    /// Sends accepted lately, by (sender, clientMsgId): a repeat is answered here and
    /// costs its sender nothing in the insert shard that other senders share.
    recent: recent::RecentAccepts,
    /// Sends per user on this instance, whatever the socket or route.
    send_limit: SendLimit,
    /// An accept later than this after its id was made breaks the devices' skew bound
    /// (`MSGBUF_DEVICE_SKEW`): counted and logged.
    late_after: Duration,
}

/// What delivery is built from: one of each per instance.
pub struct Parts {
    pub store: Store,
    pub instance: Arc<str>,
    pub presence: Arc<Presence>,
    pub metrics: Arc<Metrics>,
    pub ack_timeout: Duration,
    pub send_limit: SendLimit,
    pub devices: DevicePolicy,
}

impl Delivery {
    /// Starts the insert shards and the claim and ack batcher on `tracker`; they finish
    /// the work queued before `cancel` and then stop.
    pub fn start(parts: Parts, tracker: &TaskTracker, cancel: &CancellationToken) -> Arc<Self> {
        let Parts {
            store,
            instance,
            presence,
            metrics,
            ack_timeout,
            send_limit,
            devices,
        } = parts;
        let inserts = (0..INSERT_SHARDS)
            .map(|_| batching::spawn_insert_shard(&store, &metrics, tracker, cancel))
            .collect();
        let records = batching::spawn_record_loop(
            &store,
            &instance,
            &metrics,
            devices,
            ack_timeout,
            tracker,
            cancel,
        );
        Arc::new(Delivery {
            store,
            instance,
            presence,
            metrics,
            ack_timeout,
            inserts,
            records,
            recent: recent::RecentAccepts::default(),
            send_limit,
            late_after: devices.skew,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn presence(&self) -> &Arc<Presence> {
        &self.presence
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Takes one send from `user`'s budget, or says why not.
    pub fn check_send(&self, user: &str) -> Result<(), Error> {
        let checked = self.send_limit.check(user);
        if checked.is_err() {
            self.metrics.rate_limited.increment(1);
        }
        checked
    }

    /// Stores a message with majority write concern; returns once it is acknowledged.
    pub async fn accept(&self, msg: BufferedMessage) -> Result<Accepted, StoreError> {
        let started = Instant::now();
        let key = msg
            .client_msg_id
            .as_ref()
            .map(|id| (msg.sender.clone(), id.clone()));
        if let Some(accepted) = key.as_ref().and_then(|k| self.recent.get(k)) {
            return Ok(accepted);
        }
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
        if let Ok(a) = &accepted {
            self.check_skew(a);
        }
        if let (Some(key), Ok(accepted)) = (key, &accepted) {
            self.recent.insert(key, accepted.clone());
        }
        accepted
    }

    /// A message accepted (or found again by its clientMsgId) longer than the skew window
    /// after its id was made may commit below a device's floor: say so, loudly.
    fn check_skew(&self, accepted: &Accepted) {
        let made = ObjectId::parse_str(&accepted.id).map(|id| id.timestamp());
        let Ok(made) = made else { return };
        // An id's time is in whole seconds: up to one more second of age is rounding.
        let age = DateTime::now().timestamp_millis() - made.timestamp_millis() - 1000;
        if age > self.late_after.as_millis() as i64 {
            self.metrics.late_accepts.increment(1);
            tracing::warn!(id = %accepted.id, age_ms = age, "a send was accepted later than MSGBUF_DEVICE_SKEW after it arrived; raise the skew above the longest write");
        }
    }

    /// Records `user`'s acks (batched with other sockets' acks and with claims), and,
    /// from a device's socket, that device's receipt of them (held back up to
    /// [`device_acks::DEVICE_ACK_LINGER`]; returns once the messages' acks are written).
    pub async fn ack(
        &self,
        user: String,
        device: Option<DeviceId>,
        ids: Vec<ObjectId>,
    ) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        let job = records::AckJob {
            user,
            device,
            ids,
            reply,
        };
        self.records
            .send(Record::Ack(job))
            .await
            .map_err(|_| StoreError::ShuttingDown)?;
        rx.await.map_err(|_| StoreError::ShuttingDown)?
    }

    /// A device's socket ended: its acks (held back to be batched) and its user's held
    /// claims are written, then its floor moves past them. Returns once they are written,
    /// so that a rejoin reads what was pushed to it unacked as such (`redelivery`).
    pub async fn device_left(&self, user: String, device: DeviceId) {
        let (written, rx) = oneshot::channel();
        let left = Record::DeviceLeft {
            user,
            device,
            written,
        };
        // Lost only at shutdown, when the loop writes what it holds anyway, and a later
        // move of the floor makes this one.
        if self.records.send(left).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// An insert seen on the change stream: push it to the receiver's sockets here (then
    /// record the delivery), and to the sender's devices here (the sent-message sync; the
    /// socket that sent it skips it, it made the id).
    pub async fn on_insert(&self, msg: &BufferedMessage) {
        let to_receiver = self.presence.is_online(&msg.receiver);
        let to_sender = msg.sender != msg.receiver && self.presence.is_online(&msg.sender);
        if !to_receiver && !to_sender {
            return;
        }
        let frame = chat_frame(msg);
        if to_sender {
            self.presence.push_to_devices(&msg.sender, &frame);
        }
        if to_receiver && self.presence.push(&msg.receiver, &frame) > 0 {
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
        let receipt = ServerFrame::Receipt(Receipt {
            id: id.to_hex(),
            status: "delivered".to_owned(),
            at: rfc3339(at),
        });
        let frame: Utf8Bytes = receipt.encode().into();
        let n = self.presence.push(sender, &Outbound::Frame(frame));
        self.metrics.receipts.increment(n as u64);
    }

    /// Queues claims of messages addressed to `receiver` for the batcher (waits when it is
    /// behind: backpressure on the stream and on drains).
    pub async fn claim_later(&self, receiver: &str, ids: &[ObjectId], path: DeliveryPath) {
        for id in ids {
            let record = Record::Claim(records::Claim {
                id: *id,
                receiver: receiver.to_owned(),
                path,
            });
            if self.records.send(record).await.is_err() {
                return;
            }
        }
    }

    /// Records that a join's drain re-sent `ids` (pushed earlier, never acked, past their
    /// ack timeout): their ack timeout starts again. Written in the background: the
    /// socket has them already, and a lost write only means an earlier re-send.
    pub fn record_redelivered(&self, ids: Vec<ObjectId>, tracker: &TaskTracker) {
        if ids.is_empty() {
            return;
        }
        self.metrics
            .delivered(DeliveryPath::Redelivery, ids.len() as u64);
        let store = self.store.clone();
        tracker.spawn(async move {
            if let Err(e) = store.record_resent(&ids).await {
                tracing::warn!(error = %e, "could not record re-sent messages");
            }
        });
    }

    /// Re-sends pushed-but-unacknowledged messages of users joined here once their ack
    /// timeout passed (one instance wins each re-send), and pushes undelivered messages
    /// that no live push or drain took (a safety net for any gap).
    pub async fn sweep(&self) -> Result<(), StoreError> {
        let users = self.presence.joined_users();
        for chunk in users.chunks(SWEEP_USERS_PER_QUERY) {
            let due = self
                .store
                .pending_older_than(chunk, self.ack_timeout, SWEEP_LIMIT)
                .await?;
            for msg in due {
                if !msg.delivered {
                    if self
                        .presence
                        .push_to_settled(&msg.receiver, &chat_frame(&msg))
                        > 0
                    {
                        self.claim_later(&msg.receiver, &[msg.id], DeliveryPath::Sweep)
                            .await;
                    }
                } else if self.store.claim_redelivery(msg.id, msg.pushed_at).await? {
                    // A re-send is meant to repeat an id: it skips the socket's duplicate check.
                    let frame = redelivery_frame(&msg);
                    if self.presence.push_to_settled(&msg.receiver, &frame) > 0 {
                        self.metrics.delivered(DeliveryPath::Redelivery, 1);
                    }
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
                let batch = self
                    .store
                    .undelivered(Receivers::Many(chunk), after, SWEEP_LIMIT)
                    .await?;
                for msg in &batch.messages {
                    self.push_and_claim(msg, DeliveryPath::Rescan).await;
                }
                n += batch.messages.len();
                match batch.messages.last() {
                    Some(last) if batch.more => after = Some(last.id),
                    _ => break,
                }
            }
        }
        Ok(n)
    }

    async fn push_and_claim(&self, msg: &BufferedMessage, path: DeliveryPath) {
        if self.presence.push(&msg.receiver, &chat_frame(msg)) > 0 {
            self.claim_later(&msg.receiver, &[msg.id], path).await;
        }
    }

    /// How often the redelivery sweep runs.
    fn sweep_interval(&self) -> Duration {
        (self.ack_timeout / 3).clamp(Duration::from_millis(200), Duration::from_secs(10))
    }
}

/// A message's first push: a socket that wrote this id already skips it.
pub fn chat_frame(msg: &BufferedMessage) -> Outbound {
    let frame = ServerFrame::ChatMessage(msg.to_wire(false)).encode();
    Outbound::Chat {
        id: msg.id,
        frame: frame.into(),
    }
}

/// A re-send after the ack timeout: flagged, and written even where the id was written
/// before (repeating it is the point).
pub fn redelivery_frame(msg: &BufferedMessage) -> Outbound {
    Outbound::Frame(ServerFrame::ChatMessage(msg.to_wire(true)).encode().into())
}

/// The redelivery sweep as a background task.
pub struct Sweeper {
    pub delivery: Arc<Delivery>,
}

impl Sweeper {
    /// Sweeps every [`Delivery::sweep_interval`] until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.delivery.sweep_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.delivery.sweep().await {
                tracing::warn!(error = %e, "redelivery sweep failed; retrying next tick");
            }
            self.delivery.send_limit.forget_idle();
        }
    }
}
