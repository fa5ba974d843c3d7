//! The batching loops behind [`super::Delivery`]: insert shards and the claim/ack record
//! loop. Each finishes what was queued before shutdown, then stops.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mongodb::bson::oid::ObjectId;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::device_acks::DeviceAcks;
use super::held_claims::HeldClaims;
use super::records::{plan_claims, remaining_acks, AckJob, Claim, ClaimGroup};
use crate::device::DeviceId;
use crate::metrics::Metrics;
use crate::protocol::Accepted;
use crate::store::{BufferedMessage, DevicePolicy, Store, StoreError};

const MAX_INSERT_BATCH: usize = 256;
/// Claims and acks recorded by one round of writes, at most.
const MAX_RECORD_BATCH: usize = 1000;
/// Claims and acks are bookkeeping (the push already happened, an ack only gates the
/// sender's receipt): waiting a little turns ~one majority write per message into one per
/// batch. A claim then waits longer for its ack ([`HeldClaims`]).
const RECORD_LINGER: Duration = Duration::from_millis(15);

pub struct InsertJob {
    pub msg: BufferedMessage,
    pub reply: oneshot::Sender<Result<Accepted, StoreError>>,
}

/// What the record loop writes.
pub enum Record {
    Claim(Claim),
    Ack(AckJob),
    /// A device's socket ended: write its user's held claims and acks (and those queued
    /// before this), answer `written`, then move its floor past them.
    DeviceLeft {
        user: String,
        device: DeviceId,
        written: oneshot::Sender<()>,
    },
}

/// A [`Record`] and when it entered the queue.
pub struct Queued {
    at: Instant,
    record: Record,
}

/// The record loop's queue. Each record is stamped as it enters, so that the loop can tell
/// how far its reading has come in time: a held claim is written alone only once the loop
/// has read everything queued up to the end of its hold, so its ack did not come in time
/// (however far behind the loop is), rather than at a time the ack may still be waiting
/// in the queue.
#[derive(Clone)]
pub struct RecordQueue(mpsc::Sender<Queued>);

/// The record loop stopped (shutdown).
#[derive(Debug)]
pub struct Stopped;

impl RecordQueue {
    /// Queues `record`, waiting while the queue is full (backpressure on its senders).
    pub async fn send(&self, record: Record) -> Result<(), Stopped> {
        let permit = self.0.reserve().await.map_err(|_| Stopped)?;
        // Stamped once admitted: stamps then follow the queue's order.
        permit.send(Queued {
            at: Instant::now(),
            record,
        });
        Ok(())
    }
}

/// A device's floor is moved after this many of its acks were recorded (and when its
/// socket ends): often enough that its acked set stays small.
const ACKS_PER_FLOOR_MOVE: usize = 256;

pub fn spawn_insert_shard(
    store: &Store,
    metrics: &Arc<Metrics>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> mpsc::Sender<InsertJob> {
    let (tx, rx) = mpsc::channel(4 * MAX_INSERT_BATCH);
    tracker.spawn(insert_loop(
        store.clone(),
        metrics.clone(),
        rx,
        cancel.clone(),
    ));
    tx
}

pub fn spawn_record_loop(
    store: &Store,
    instance: &Arc<str>,
    metrics: &Arc<Metrics>,
    devices: DevicePolicy,
    ack_timeout: Duration,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> RecordQueue {
    let (tx, rx) = mpsc::channel(16 * MAX_RECORD_BATCH);
    let recorder = Recorder {
        store: store.clone(),
        instance: instance.clone(),
        metrics: metrics.clone(),
        devices,
        device_acks: DeviceAcks::default(),
        held: HeldClaims::new(ack_timeout),
        acks_since_floor_move: HashMap::new(),
        tracker: tracker.clone(),
        cancel: cancel.clone(),
    };
    tracker.spawn(recorder.run(rx));
    RecordQueue(tx)
}

/// One shard: one ordered `insertMany` at a time, of everything queued meanwhile.
async fn insert_loop(
    store: Store,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<InsertJob>,
    cancel: CancellationToken,
) {
    let mut closed = false;
    let mut jobs = Vec::with_capacity(MAX_INSERT_BATCH);
    while let Some(job) = next_job(&mut rx, &cancel, &mut closed).await {
        jobs.push(job);
        take_queued(&mut rx, &mut jobs, MAX_INSERT_BATCH);
        let (docs, replies): (Vec<_>, Vec<_>) =
            jobs.drain(..).map(|job| (job.msg, job.reply)).unzip();
        let started = Instant::now();
        let results = store.insert_batch(&docs).await;
        metrics
            .insert_latency
            .record(started.elapsed().as_secs_f64());
        for (reply, result) in replies.into_iter().zip(results) {
            // A dropped receiver is a client that went away; the message is stored anyway.
            let _ = reply.send(result);
        }
    }
}

/// Writes claims and acks in batches.
struct Recorder {
    store: Store,
    instance: Arc<str>,
    metrics: Arc<Metrics>,
    devices: DevicePolicy,
    /// Device acks not written yet.
    device_acks: DeviceAcks,
    /// Claims waiting for their ack, to be written with it.
    held: HeldClaims,
    /// Per device with a socket here, its acks recorded since its floor last moved.
    acks_since_floor_move: HashMap<(String, DeviceId), usize>,
    /// Floor moves run beside the loop, on the instance's tracker.
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Recorder {
    async fn run(mut self, mut rx: mpsc::Receiver<Queued>) {
        let mut closed = false;
        let mut batch = Vec::with_capacity(MAX_RECORD_BATCH);
        let mut read = Instant::now();
        loop {
            let wake = earliest(self.device_acks.due(), self.held.due());
            tokio::select! {
                // Records first: a hold that ran out on the clock may have its ack queued.
                biased;
                first = next_job(&mut rx, &self.cancel, &mut closed) => {
                    let Some(first) = first else { break };
                    batch.push(first);
                    linger(&mut rx, &mut batch, MAX_RECORD_BATCH, RECORD_LINGER, closed).await;
                }
                _ = sleep_until(wake), if wake.is_some() => {}
            }
            read = read_up_to(&rx, &batch, read);
            self.round(batch.drain(..), read, closed).await;
        }
        // Shutdown: what is held is written before the loop ends.
        self.round(std::iter::empty(), Instant::now(), true).await;
        self.write_device_acks().await;
    }

    /// One round: the records taken from the queue (maybe none: a hold ran out), then
    /// whatever is due now that the loop has read what was queued up to `read_up_to`.
    /// `last` writes every held claim.
    async fn round(
        &mut self,
        records: impl Iterator<Item = Queued>,
        read_up_to: Instant,
        last: bool,
    ) {
        let now = Instant::now();
        let (claims, acks, left) = split(records);
        let ack_ids: Vec<(&str, &[ObjectId])> = acks
            .iter()
            .map(|job| (job.user.as_str(), job.ids.as_slice()))
            .collect();
        self.held.add(claims);
        let mut ready = self.held.take_acked(&ack_ids);
        ready.extend(self.held.take_due(read_up_to, last));
        for (user, _, _) in &left {
            ready.extend(self.held.take_of(user));
        }
        let mut done = HashSet::new();
        for group in plan_claims(&ready, &ack_ids) {
            done.extend(self.write_claims(group).await);
        }
        let result = self.write_acks(remaining_acks(&ack_ids, &done)).await;
        for job in acks {
            if let Some(device) = &job.device {
                self.device_acks.add(&job.user, device, &job.ids, now);
            }
            let _ = job
                .reply
                .send(result.as_ref().map(|_| ()).map_err(StoreError::duplicate));
        }
        if !left.is_empty() || self.device_acks.is_due(now) {
            self.write_device_acks().await;
        }
        for (user, device, written) in left {
            self.acks_since_floor_move
                .remove(&(user.clone(), device.clone()));
            self.move_floor(user, device);
            let _ = written.send(());
        }
    }

    /// Writes the device acks held back (one statement per device, one command for all),
    /// and moves the floor of each device that reached [`ACKS_PER_FLOOR_MOVE`].
    async fn write_device_acks(&mut self) {
        if self.device_acks.is_empty() {
            return;
        }
        let held = self.device_acks.take();
        let statements: Vec<(&str, &str, &[ObjectId])> = held
            .iter()
            .map(|((user, device), ids)| (user.as_str(), device.as_str(), ids.as_slice()))
            .collect();
        let results = self
            .store
            .record_device_acks(&statements, self.devices)
            .await;
        for (((user, device), ids), result) in held.into_iter().zip(results) {
            if let Err(e) = result {
                // Not retried: the device gets those messages again on its next join.
                tracing::warn!(error = %e, user, device = %device, "device acks not recorded");
                continue;
            }
            let since = self
                .acks_since_floor_move
                .entry((user.clone(), device.clone()))
                .or_default();
            *since += ids.len();
            if *since >= ACKS_PER_FLOOR_MOVE {
                *since = 0;
                self.move_floor(user, device);
            }
        }
    }

    /// Moves a device's floor in the background: it only bounds the device's state, and
    /// a move that fails is made by a later one.
    fn move_floor(&self, user: String, device: DeviceId) {
        let store = self.store.clone();
        let policy = self.devices;
        self.tracker.spawn(async move {
            if let Err(e) = store
                .advance_device_floor(&user, device.as_str(), policy)
                .await
            {
                tracing::warn!(error = %e, user, device = %device, "device floor not moved");
            }
        });
    }

    /// Writes one path's claims; returns the ids whose ack went in with their claim.
    async fn write_claims(&self, group: ClaimGroup) -> Vec<ObjectId> {
        let ClaimGroup {
            path,
            with_ack,
            mut alone,
        } = group;
        let n = (with_ack.len() + alone.len()) as u64;
        let mut won = 0;
        let mut done = Vec::new();
        if !with_ack.is_empty() {
            match self.store.claim_acked(&with_ack, &self.instance).await {
                Ok(flipped) => {
                    won += flipped;
                    self.metrics.acks.increment(flipped);
                    self.metrics.claims_with_ack.increment(flipped);
                    // The ones it did not flip were claimed elsewhere first (a claim never
                    // flips back): a plain claim of them would match nothing. Their acks
                    // still go in with the batch's other acks (not `done`).
                    if flipped == with_ack.len() as u64 {
                        done = with_ack;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, n = with_ack.len(), "claim with ack failed; writing them apart");
                    alone.extend(with_ack);
                }
            }
        }
        if !alone.is_empty() {
            won += self.claim_until_written(&alone).await;
        }
        self.metrics.delivered(path, won);
        self.metrics.claims_lost.increment(n - won.min(n));
        done
    }

    async fn write_acks(&self, acks: Vec<(String, Vec<ObjectId>)>) -> Result<u64, StoreError> {
        if acks.is_empty() {
            return Ok(0);
        }
        let result = self.store.ack(&acks).await;
        match &result {
            Ok(n) => self.metrics.acks.increment(*n),
            Err(e) => tracing::warn!(error = %e, n = acks.len(), "acks not recorded"),
        }
        result
    }

    /// Claims `ids`, retrying with backoff until the write goes through or shutdown;
    /// returns how many this instance flipped.
    async fn claim_until_written(&self, ids: &[ObjectId]) -> u64 {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.store.claim(ids, &self.instance).await {
                Ok(won) => return won,
                // Unclaimed messages stay `delivered: false` and are drained again on the
                // next join, so giving up at shutdown loses nothing.
                Err(e) if self.cancel.is_cancelled() => {
                    tracing::warn!(error = %e, n = ids.len(), "claims not recorded at shutdown");
                    return 0;
                }
                Err(e) => {
                    tracing::warn!(error = %e, n = ids.len(), "claim failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.cancel.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

type Left = Vec<(String, DeviceId, oneshot::Sender<()>)>;

/// How far in time the loop has read its queue: to now when it is empty, else to the
/// last record it took (in this round's `batch`, else in an earlier one).
fn read_up_to(rx: &mpsc::Receiver<Queued>, batch: &[Queued], earlier: Instant) -> Instant {
    if rx.is_empty() {
        return Instant::now();
    }
    batch.last().map_or(earlier, |last| last.at)
}

/// The claims (with when each was queued), acks and device ends of a round.
fn split(records: impl Iterator<Item = Queued>) -> (Vec<(Instant, Claim)>, Vec<AckJob>, Left) {
    let mut claims = Vec::new();
    let mut acks = Vec::new();
    let mut left = Vec::new();
    for Queued { at, record } in records {
        match record {
            Record::Claim(claim) => claims.push((at, claim)),
            Record::Ack(job) => acks.push(job),
            Record::DeviceLeft {
                user,
                device,
                written,
            } => left.push((user, device, written)),
        }
    }
    (claims, acks, left)
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

/// The earlier of two deadlines, if any.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Sleeps until `at` (forever when `None`; callers guard on it).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::DeliveryPath;

    fn queued(at: Instant) -> Queued {
        Queued {
            at,
            record: Record::Claim(Claim {
                id: ObjectId::new(),
                receiver: "bob".into(),
                path: DeliveryPath::Live,
            }),
        }
    }

    #[tokio::test]
    async fn the_loop_has_read_up_to_its_last_record_while_more_wait_and_to_now_once_none_do() {
        let t0 = Instant::now() - Duration::from_secs(5);
        let (tx, mut rx) = mpsc::channel(4);
        tx.send(queued(t0)).await.expect("queued");
        tx.send(queued(t0 + Duration::from_secs(1)))
            .await
            .expect("queued");
        let earlier = t0 - Duration::from_secs(1);
        assert_eq!(read_up_to(&rx, &[], earlier), earlier, "nothing read yet");
        let batch = vec![rx.recv().await.expect("first")];
        assert_eq!(
            read_up_to(&rx, &batch, earlier),
            t0,
            "an ack may still wait behind it"
        );
        let batch = vec![rx.recv().await.expect("second")];
        assert!(read_up_to(&rx, &batch, t0) >= t0 + Duration::from_secs(5));
    }
}
