//! The change-stream tailer: exactly one stream per instance, on `buffered_messages`
//! (the query itself is [`Store::watch_messages`]).
//!
//! The stream carries inserts and the updates that record an ack (for receipts).
//! Receivers are filtered in the process, against [`crate::presence`].
//!
//! The resume token is checkpointed in MongoDB about once a second, after the events up to
//! it were handed to sockets, and from the post-batch token when nothing arrives — so an
//! idle stream's checkpoint keeps advancing with the oplog. When the token is gone from
//! the oplog (`ChangeStreamHistoryLost` and kin) the collection, the source of truth, is
//! rescanned for the joined users and a fresh stream is opened.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mongodb::bson::{DateTime, RawDocumentBuf};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken};
use tokio_util::sync::CancellationToken;

use crate::delivery::Delivery;
use crate::state::StreamStatus;
use crate::store::{is_history_lost, BufferedMessage, MessageChanges, Store};

const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub struct Tailer {
    pub delivery: Arc<Delivery>,
    /// Raised while a stream is open: part of `/readyz`.
    pub status: StreamStatus,
}

/// Where the next stream starts.
#[derive(Default)]
struct Position {
    token: Option<ResumeToken>,
    /// The token was lost: rescan the collection once the next stream is open.
    rescan: bool,
}

/// How one stream ended.
enum Ended {
    Cancelled,
    /// Reopen from the position reached.
    Reopen,
}

impl Tailer {
    fn store(&self) -> &Store {
        self.delivery.store()
    }

    /// Tails until `cancel`, then checkpoints and returns.
    pub async fn run(self, cancel: CancellationToken) {
        let mut position = self.load_position().await;
        let mut backoff = FIRST_BACKOFF;
        while !cancel.is_cancelled() {
            let opened = tokio::select! {
                _ = cancel.cancelled() => break,
                r = self.store().watch_messages(position.token.clone()) => r,
            };
            let stream = match opened {
                Ok(stream) => stream,
                Err(e) if is_history_lost(&e) => {
                    self.history_lost(&e, &mut position).await;
                    continue;
                }
                Err(e) => {
                    self.status.set(false);
                    self.delivery.metrics().stream_resumes.increment(1);
                    tracing::warn!(error = %e, ?backoff, "opening the change stream failed; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            self.status.set(true);
            backoff = FIRST_BACKOFF;
            // The stream is open before the rescan reads, so nothing falls in between; a
            // message both rescanned and streamed is skipped by the socket's id set.
            self.rescan_if_lost(&mut position).await;
            let ended = self.follow(stream, &mut position, &cancel).await;
            self.status.set(false);
            if let Ended::Cancelled = ended {
                break;
            }
        }
        if let Some(t) = &position.token {
            self.checkpoint(t).await;
        }
        self.status.set(false);
    }

    async fn load_position(&self) -> Position {
        let instance = self.delivery.instance();
        match self.store().load_checkpoint(instance).await {
            Ok(Some(token)) => {
                tracing::info!(instance, "resuming the change stream from its checkpoint");
                Position {
                    token: Some(token),
                    rescan: false,
                }
            }
            Ok(None) => Position::default(),
            Err(e) => {
                tracing::warn!(error = %e, "could not load the stream checkpoint; starting from now");
                Position::default()
            }
        }
    }

    async fn rescan_if_lost(&self, position: &mut Position) {
        if !position.rescan {
            return;
        }
        match self.delivery.rescan().await {
            Ok(n) => {
                tracing::info!(messages = n, "rescanned the collection after history loss");
                position.rescan = false;
            }
            Err(e) => tracing::warn!(error = %e, "rescan failed; retrying with the next stream"),
        }
    }

    /// Hands events to delivery until the stream fails or `cancel`, checkpointing as it
    /// goes; leaves in `position` where the next stream starts.
    async fn follow(
        &self,
        mut stream: MessageChanges,
        position: &mut Position,
        cancel: &CancellationToken,
    ) -> Ended {
        let mut last_checkpoint = Instant::now();
        let ended = loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => break Ended::Cancelled,
                r = stream.next_if_any() => r,
            };
            match next {
                Ok(Some(event)) => self.handle(event).await,
                Ok(None) => {}
                Err(e) if is_history_lost(&e) => {
                    self.history_lost(&e, position).await;
                    return Ended::Reopen;
                }
                Err(e) => {
                    self.delivery.metrics().stream_resumes.increment(1);
                    tracing::warn!(error = %e, "change stream error; resuming");
                    break Ended::Reopen;
                }
            }
            if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                last_checkpoint = Instant::now();
                if let Some(t) = stream.resume_token() {
                    self.checkpoint(&t).await;
                    position.token = Some(t);
                }
            }
        };
        if let Some(t) = stream.resume_token() {
            position.token = Some(t);
        }
        ended
    }

    async fn checkpoint(&self, token: &ResumeToken) {
        match self
            .store()
            .save_checkpoint(self.delivery.instance(), token)
            .await
        {
            Ok(()) => self.delivery.metrics().checkpoints.increment(1),
            Err(e) => tracing::warn!(error = %e, "stream checkpoint not saved; will retry"),
        }
    }

    async fn history_lost(&self, e: &mongodb::error::Error, position: &mut Position) {
        self.delivery.metrics().stream_history_lost.increment(1);
        tracing::warn!(error = %e, "resume token no longer in the oplog: rescanning the collection and opening a fresh stream");
        if let Err(e) = self
            .store()
            .clear_checkpoint(self.delivery.instance())
            .await
        {
            tracing::warn!(error = %e, "could not clear the stale checkpoint");
        }
        *position = Position {
            token: None,
            rescan: true,
        };
    }

    async fn handle(&self, event: ChangeStreamEvent<RawDocumentBuf>) {
        let metrics = self.delivery.metrics();
        metrics.stream_events.increment(1);
        if let Some(wall) = event.wall_time {
            let lag_ms = DateTime::now().timestamp_millis() - wall.timestamp_millis();
            metrics.stream_lag.record(lag_ms.max(0) as f64 / 1000.0);
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
