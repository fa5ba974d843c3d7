//! The change-stream tailer: exactly one stream per instance, on `buffered_messages`.
//!
//! The `$match` never changes (resume tokens stay valid) and keeps only what delivery
//! needs: inserts, and the updates that record an ack (for receipts). Receivers are
//! filtered in the process, against [`crate::presence`].
//!
//! The resume token is checkpointed in MongoDB about once a second, after the events up to
//! it were handed to sockets, and from the post-batch token when nothing arrives — so an
//! idle stream's checkpoint keeps advancing with the oplog. When the token is gone from
//! the oplog (`ChangeStreamHistoryLost` and kin) the collection, the source of truth, is
//! rescanned for the joined users and a fresh stream is opened.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mongodb::bson::{doc, DateTime, Document, RawDocumentBuf};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType};

use crate::delivery::Delivery;
use crate::metrics::Metrics;
use crate::store::{BufferedMessage, Store};

const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Server error codes meaning "the stream cannot resume from this token".
const HISTORY_LOST: [i32; 4] = [
    286, // ChangeStreamHistoryLost
    136, // CappedPositionLost
    260, // InvalidResumeToken
    280, // ChangeStreamFatalError
];

pub fn is_history_lost(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        mongodb::error::ErrorKind::Command(c) => HISTORY_LOST.contains(&c.code),
        _ => false,
    }
}

/// The fixed pipeline of the stream. MongoDB rewrites this `$match` into a filter on the
/// oplog itself, so the entries it drops (claims, re-sends, checkpoints) are never turned
/// into events. An ack is recognised by `receiptFor`, which only an ack writes (a claim
/// writes `ackedAt` too: an explicit null).
pub fn pipeline() -> Vec<Document> {
    vec![doc! {"$match": {"$or": [
        {"operationType": "insert"},
        {"operationType": "update", "updateDescription.updatedFields.receiptFor": {"$exists": true}},
    ]}}]
}

pub struct Tailer {
    pub store: Store,
    pub instance: Arc<str>,
    pub delivery: Arc<Delivery>,
    pub metrics: Arc<Metrics>,
    /// True while a stream is open: part of `/readyz`.
    pub running: Arc<AtomicBool>,
}

impl Tailer {
    /// Tails until `cancel`, then checkpoints and returns.
    pub async fn run(self, cancel: tokio_util::sync::CancellationToken) {
        let mut token = match self.store.load_checkpoint(&self.instance).await {
            Ok(token) => token,
            Err(e) => {
                tracing::warn!(error = %e, "could not load the stream checkpoint; starting from now");
                None
            }
        };
        if token.is_some() {
            tracing::info!(instance = %self.instance, "resuming the change stream from its checkpoint");
        }
        let mut backoff = Duration::from_millis(100);
        let mut rescan = false;
        while !cancel.is_cancelled() {
            let mut watch = self.store.raw().watch().pipeline(pipeline());
            if let Some(t) = &token {
                watch = watch.resume_after(t.clone());
            }
            let opened = tokio::select! {
                _ = cancel.cancelled() => break,
                r = watch => r,
            };
            let mut stream = match opened {
                // Inserts are decoded once, from the raw bytes, straight into a
                // `BufferedMessage` (a foreign document is skipped there, never stalls the
                // stream the way a failing typed decode of the whole event would).
                Ok(s) => s.with_type::<ChangeStreamEvent<RawDocumentBuf>>(),
                Err(e) if is_history_lost(&e) => {
                    self.history_lost(&e).await;
                    token = None;
                    rescan = true;
                    continue;
                }
                Err(e) => {
                    self.running.store(false, Ordering::Relaxed);
                    self.metrics.stream_resumes.increment(1);
                    tracing::warn!(error = %e, ?backoff, "opening the change stream failed; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            self.running.store(true, Ordering::Relaxed);
            backoff = Duration::from_millis(100);
            // The stream is open before the rescan reads, so nothing falls in between; a
            // message both rescanned and streamed is skipped by the socket's id set.
            if rescan {
                match self.delivery.rescan().await {
                    Ok(n) => {
                        tracing::info!(messages = n, "rescanned the collection after history loss");
                        rescan = false;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "rescan failed; retrying with the next stream")
                    }
                }
            }
            let mut last_checkpoint = Instant::now();
            loop {
                let next = tokio::select! {
                    _ = cancel.cancelled() => None,
                    r = stream.next_if_any() => Some(r),
                };
                let Some(result) = next else { break };
                match result {
                    Ok(Some(event)) => self.handle(event).await,
                    Ok(None) => {}
                    Err(e) if is_history_lost(&e) => {
                        self.history_lost(&e).await;
                        token = None;
                        rescan = true;
                        break;
                    }
                    Err(e) => {
                        self.metrics.stream_resumes.increment(1);
                        tracing::warn!(error = %e, "change stream error; resuming");
                        token = stream.resume_token().or(token);
                        break;
                    }
                }
                if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                    last_checkpoint = Instant::now();
                    if let Some(t) = stream.resume_token() {
                        self.checkpoint(&t).await;
                        token = Some(t);
                    }
                }
            }
            self.running.store(false, Ordering::Relaxed);
            if !rescan {
                if let Some(t) = stream.resume_token() {
                    token = Some(t);
                }
            }
        }
        if let Some(t) = &token {
            self.checkpoint(t).await;
        }
        self.running.store(false, Ordering::Relaxed);
    }

    async fn checkpoint(&self, token: &mongodb::change_stream::event::ResumeToken) {
        match self.store.save_checkpoint(&self.instance, token).await {
            Ok(()) => self.metrics.checkpoints.increment(1),
            Err(e) => tracing::warn!(error = %e, "stream checkpoint not saved; will retry"),
        }
    }

    async fn history_lost(&self, e: &mongodb::error::Error) {
        self.metrics.stream_history_lost.increment(1);
        tracing::warn!(error = %e, "resume token no longer in the oplog: rescanning the collection and opening a fresh stream");
        if let Err(e) = self.store.clear_checkpoint(&self.instance).await {
            tracing::warn!(error = %e, "could not clear the stale checkpoint");
        }
    }

    async fn handle(&self, event: ChangeStreamEvent<RawDocumentBuf>) {
        self.metrics.stream_events.increment(1);
        if let Some(wall) = event.wall_time {
            let lag_ms = DateTime::now().timestamp_millis() - wall.timestamp_millis();
            self.metrics
                .stream_lag
                .record(lag_ms.max(0) as f64 / 1000.0);
        }
        match event.operation_type {
            OperationType::Insert => {
                let Some(doc) = event.full_document else {
                    return;
                };
                match mongodb::bson::from_slice::<BufferedMessage>(doc.as_bytes()) {
                    Ok(msg) => self.delivery.on_insert(&msg).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping a document that is not a BufferedMessage")
                    }
                }
            }
            OperationType::Update => {
                let (Some(update), Some(key)) = (event.update_description, event.document_key)
                else {
                    return;
                };
                let fields = &update.updated_fields;
                if let (Ok(id), Ok(sender), Ok(at)) = (
                    key.get_object_id("_id"),
                    fields.get_str("receiptFor"),
                    fields.get_datetime("ackedAt"),
                ) {
                    self.delivery.on_ack(id, sender, *at);
                }
            }
            _ => {}
        }
    }
}
