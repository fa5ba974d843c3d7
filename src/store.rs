//! The `BufferedMessage` collection: model, indexes and every query msgbuf runs on it.
//!
//! Inserts and claims use majority write concern and reads use majority read concern
//! (set once on the collection handle), so nothing acknowledged can be rolled back by a
//! failover and no drain sees a write that could be.

use std::future::IntoFuture;
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, oid::ObjectId, DateTime, Document};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{
    CollectionOptions, IndexOptions, ReadConcern, ReturnDocument, WriteConcern,
};
use mongodb::{Collection, Database, IndexModel};
use serde::{Deserialize, Serialize};

use crate::protocol::{rfc3339, ChatOut};

pub const MESSAGES: &str = "buffered_messages";
pub const CHECKPOINTS: &str = "stream_checkpoints";
pub const LEASES: &str = "leases";
pub const TTL_INDEX: &str = "deliveredAt_ttl";
/// A join reads up to this many pending messages per half in one go and counts them
/// itself; above it, the join counts first and then streams.
const SMALL_BACKLOG: i64 = 100;
/// Claimed messages still waiting for their ack, by receiver in `_id` order: a partial
/// index, so the redelivery sweep, the drain's overdue half and the join's count read
/// only messages in flight, never a user's whole delivered history.
pub const UNACKED_INDEX: &str = "receiver_1__id_1_unacked";

/// The predicate of [`UNACKED_INDEX`]. A claim writes `ackedAt: null` explicitly (`$type`
/// is what a partial index can test; a missing field is not), and an ack replaces it.
fn unacked_filter() -> Document {
    doc! {"delivered": true, "ackedAt": {"$type": "null"}}
}

/// One chat message in the buffer. Field names are the original app's (`chatId`, …).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BufferedMessage {
    #[serde(rename = "_id")]
    pub id: ObjectId,
    pub receiver: String,
    pub sender: String,
    pub chat_id: String,
    pub message: String,
    /// Acceptance time (also encoded in `_id`).
    pub timestamp: DateTime,
    /// Flipped false -> true exactly once, by the claim.
    pub delivered: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<DateTime>,
    /// Instance that recorded the delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_by: Option<String>,
    /// Last time the message was written to a socket; the ack timeout runs from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed_at: Option<DateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_at: Option<DateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
    #[serde(default)]
    pub redeliveries: i32,
    pub updated_at: DateTime,
}

impl BufferedMessage {
    pub fn new(
        sender: &str,
        receiver: &str,
        chat_id: &str,
        message: &str,
        client_msg_id: Option<String>,
    ) -> Self {
        let now = DateTime::now();
        BufferedMessage {
            id: ObjectId::new(),
            receiver: receiver.to_owned(),
            sender: sender.to_owned(),
            chat_id: chat_id.to_owned(),
            message: message.to_owned(),
            timestamp: now,
            delivered: false,
            delivered_at: None,
            delivered_by: None,
            pushed_at: None,
            acked_at: None,
            client_msg_id,
            redeliveries: 0,
            updated_at: now,
        }
    }

    /// The `chat_message` payload a receiver sees.
    pub fn to_wire(&self, redelivery: bool) -> ChatOut {
        ChatOut {
            id: self.id.to_hex(),
            from: self.sender.clone(),
            to: self.receiver.clone(),
            chat_id: self.chat_id.clone(),
            message: self.message.clone(),
            timestamp: rfc3339(self.timestamp),
            redelivery,
        }
    }
}

/// What `message_accepted` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub id: ObjectId,
    pub timestamp: DateTime,
    pub client_msg_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("mongodb: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("bson: {0}")]
    Bson(#[from] mongodb::bson::de::Error),
    #[error("the store is shutting down")]
    ShuttingDown,
}

impl StoreError {
    /// True for errors a client should retry (no primary, network, timeouts).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Mongo(e) => is_transient(e),
            StoreError::Bson(_) => false,
            StoreError::ShuttingDown => true,
        }
    }
}

/// Errors that pass with time: network, server selection, elections, write concern waits.
pub fn is_transient(e: &mongodb::error::Error) -> bool {
    if e.contains_label("RetryableWriteError") || e.contains_label("TransientTransactionError") {
        return true;
    }
    match e.kind.as_ref() {
        ErrorKind::ServerSelection { .. } => true,
        ErrorKind::Command(c) => matches!(
            c.code,
            6 | 7 | 89 | 91 | 189 | 10107 | 11600 | 11602 | 13435 | 13436 | 262 | 64
        ),
        ErrorKind::Write(WriteFailure::WriteConcernError(_)) => true,
        ErrorKind::InsertMany(m) => m.write_concern_error.is_some(),
        ErrorKind::ConnectionPoolCleared { .. } | ErrorKind::Io(_) => true,
        _ => false,
    }
}

fn duplicate_key_index(e: &mongodb::error::Error) -> Option<String> {
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == 11000 => Some(w.message.clone()),
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .and_then(|errs| errs.first())
            .filter(|w| w.code == 11000)
            .map(|w| w.message.clone()),
        _ => None,
    }
}

/// Counts for `/api/messages/buffer-stats`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BufferCounts {
    pub undelivered: u64,
    pub delivered: u64,
    pub unacked: u64,
    pub total: u64,
    pub users_with_undelivered: u64,
    pub oldest_undelivered_at: Option<String>,
}

/// Handle to the collections; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Database,
    messages: Collection<BufferedMessage>,
    raw: Collection<Document>,
}

impl Store {
    pub fn new(db: Database) -> Self {
        let options = CollectionOptions::builder()
            .write_concern(WriteConcern::majority())
            .read_concern(ReadConcern::majority())
            .build();
        let messages = db.collection_with_options::<BufferedMessage>(MESSAGES, options);
        let raw = messages.clone_with_type::<Document>();
        Store { db, messages, raw }
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    pub fn messages(&self) -> &Collection<BufferedMessage> {
        &self.messages
    }

    pub fn raw(&self) -> &Collection<Document> {
        &self.raw
    }

    /// Creates the indexes the queries need. Idempotent (same keys and options).
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let idx = |keys: Document, name: &str| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().name(name.to_owned()).build())
                .build()
        };
        let models = vec![
            // The original app's indexes.
            idx(doc! {"receiver": 1}, "receiver_1"),
            idx(doc! {"delivered": 1}, "delivered_1"),
            idx(
                doc! {"receiver": 1, "delivered": 1},
                "receiver_1_delivered_1",
            ),
            // Ordered drains and per-user sweeps: equality on (receiver, delivered), sorted by _id.
            idx(
                doc! {"receiver": 1, "delivered": 1, "_id": 1},
                "receiver_1_delivered_1__id_1",
            ),
            // Oldest undelivered and the age-based cleanup without a sort stage.
            idx(doc! {"delivered": 1, "_id": 1}, "delivered_1__id_1"),
            IndexModel::builder()
                .keys(doc! {"receiver": 1, "_id": 1})
                .options(
                    IndexOptions::builder()
                        .name(UNACKED_INDEX.to_owned())
                        .partial_filter_expression(unacked_filter())
                        .build(),
                )
                .build(),
            // Idempotent sends: one document per (sender, clientMsgId).
            IndexModel::builder()
                .keys(doc! {"sender": 1, "clientMsgId": 1})
                .options(
                    IndexOptions::builder()
                        .name("sender_1_clientMsgId_1".to_owned())
                        .unique(true)
                        .partial_filter_expression(doc! {"clientMsgId": {"$type": "string"}})
                        .build(),
                )
                .build(),
        ];
        self.raw.create_indexes(models).await?;
        Ok(())
    }

    /// Inserts a batch in order (ordered `insertMany`, one round trip) and reports each
    /// message's outcome in input order. A duplicate `(sender, clientMsgId)` resolves to
    /// the stored message; a duplicate `_id` (a retried batch) is the message itself.
    pub async fn insert_batch(
        &self,
        docs: &[BufferedMessage],
    ) -> Vec<Result<Accepted, StoreError>> {
        let mut out = Vec::with_capacity(docs.len());
        let mut rest = docs;
        while !rest.is_empty() {
            match self.messages.insert_many(rest).ordered(true).await {
                Ok(_) => {
                    out.extend(rest.iter().map(|m| Ok(accepted_of(m))));
                    break;
                }
                Err(e) => {
                    let failed_at = match e.kind.as_ref() {
                        ErrorKind::InsertMany(m) if m.write_concern_error.is_none() => m
                            .write_errors
                            .as_ref()
                            .and_then(|w| w.first())
                            .map(|w| w.index),
                        _ => None,
                    };
                    let Some(i) = failed_at.filter(|i| *i < rest.len()) else {
                        // Whole batch in doubt (no primary, network): the client retries,
                        // with its clientMsgId making the retry idempotent.
                        for _ in rest {
                            out.push(Err(StoreError::Mongo(e.clone())));
                        }
                        break;
                    };
                    out.extend(rest[..i].iter().map(|m| Ok(accepted_of(m))));
                    out.push(self.resolve_duplicate(&rest[i], &e).await);
                    rest = &rest[i + 1..];
                }
            }
        }
        out
    }

    async fn resolve_duplicate(
        &self,
        msg: &BufferedMessage,
        e: &mongodb::error::Error,
    ) -> Result<Accepted, StoreError> {
        let Some(index_msg) = duplicate_key_index(e) else {
            return Err(StoreError::Mongo(e.clone()));
        };
        if index_msg.contains("clientMsgId") {
            if let Some(existing) = self
                .messages
                .find_one(doc! {"sender": &msg.sender, "clientMsgId": &msg.client_msg_id})
                .await?
            {
                return Ok(accepted_of(&existing));
            }
        }
        // Same _id: an earlier attempt of this very insert went through.
        Ok(accepted_of(msg))
    }

    /// Claims a batch for this instance: flips `delivered` false -> true on those not yet
    /// claimed. A single id uses `findOneAndUpdate`. Returns how many this call flipped.
    /// `ackedAt` becomes an explicit null unless an ack got there first (`$max`: a date
    /// sorts after null), which puts the message into [`UNACKED_INDEX`] until its ack.
    pub async fn claim(&self, ids: &[ObjectId], instance: &str) -> Result<u64, StoreError> {
        let now = DateTime::now();
        let set = doc! {
            "$set": {"delivered": true, "deliveredAt": now, "deliveredBy": instance, "pushedAt": now, "updatedAt": now},
            "$max": {"ackedAt": null},
        };
        if let [id] = ids {
            let won = self
                .raw
                .find_one_and_update(doc! {"_id": id, "delivered": false}, set)
                .return_document(ReturnDocument::After)
                .projection(doc! {"_id": 1})
                .await?;
            return Ok(won.is_some() as u64);
        }
        let r = self
            .raw
            .update_many(doc! {"_id": {"$in": ids}, "delivered": false}, set)
            .await?;
        Ok(r.modified_count)
    }

    /// Records a re-send of pushed-but-unacknowledged messages: restarts their ack timeout.
    pub async fn touch_pushed(&self, ids: &[ObjectId]) -> Result<(), StoreError> {
        let now = DateTime::now();
        self.raw
            .update_many(
                doc! {"_id": {"$in": ids}, "ackedAt": null},
                doc! {"$set": {"pushedAt": now, "updatedAt": now}, "$inc": {"redeliveries": 1}},
            )
            .await?;
        Ok(())
    }

    /// Claims the re-send of one timed-out message: only one instance wins each timeout.
    pub async fn claim_redelivery(
        &self,
        id: ObjectId,
        pushed_at: Option<DateTime>,
    ) -> Result<bool, StoreError> {
        let now = DateTime::now();
        let won = self
            .raw
            .find_one_and_update(
                doc! {"_id": id, "ackedAt": null, "pushedAt": pushed_at},
                doc! {"$set": {"pushedAt": now, "updatedAt": now}, "$inc": {"redeliveries": 1}},
            )
            .projection(doc! {"_id": 1})
            .await?;
        Ok(won.is_some())
    }

    /// The drain filter: undelivered messages, and pushed-but-unacknowledged ones past the
    /// ack timeout.
    pub fn pending_filter(user: &str, ack_timeout: Duration) -> Document {
        let [undelivered, overdue] = Self::drain_filters(user, ack_timeout);
        doc! {"$or": [undelivered, overdue]}
    }

    /// How many messages a join will drain: the two halves counted apart, each from its
    /// own index (an `$or` count is planned per call and may pick a plan that reads the
    /// user's whole history).
    async fn count_pending(&self, user: &str, ack_timeout: Duration) -> Result<u64, StoreError> {
        let [undelivered, overdue] = Self::drain_filters(user, ack_timeout);
        let [undelivered_index, overdue_index] = Self::DRAIN_HINTS;
        let count = |filter: Document, index: &str| {
            self.raw
                .count_documents(filter)
                .hint(mongodb::options::Hint::Name(index.into()))
                .into_future()
        };
        let (a, b) = futures::try_join!(
            count(undelivered, undelivered_index),
            count(overdue, overdue_index)
        )?;
        Ok(a + b)
    }

    /// The two halves of [`Store::pending_filter`] and the index that answers each in `_id`
    /// order (no in-memory sort of a large backlog): undelivered from [`DRAIN_INDEX`], and
    /// delivered-but-overdue from [`UNACKED_INDEX`].
    pub fn drain_filters(user: &str, ack_timeout: Duration) -> [Document; 2] {
        [
            doc! {"receiver": user, "delivered": false},
            overdue_of(user.into(), ack_timeout),
        ]
    }

    /// The index each of [`Store::drain_filters`] is read from.
    pub const DRAIN_HINTS: [&'static str; 2] = [DRAIN_INDEX, UNACKED_INDEX];

    /// What a join needs: how many messages are pending for `user`, and all of them, oldest
    /// first. A small backlog (the usual case) is read whole, one limited read per half,
    /// and counted from what was read; a larger one is counted and then streamed.
    pub async fn open_pending(
        &self,
        user: &str,
        ack_timeout: Duration,
    ) -> Result<(u64, Pending), StoreError> {
        let [undelivered, overdue] = self.pending_finds(user, ack_timeout).map(|find| {
            find.limit(SMALL_BACKLOG + 1)
                .batch_size(SMALL_BACKLOG as u32 + 1)
        });
        let (undelivered, overdue) =
            futures::try_join!(undelivered.into_future(), overdue.into_future())?;
        let (undelivered, overdue): (Vec<_>, Vec<_>) =
            futures::try_join!(undelivered.try_collect(), overdue.try_collect())?;
        let limit = SMALL_BACKLOG as usize;
        if undelivered.len() <= limit && overdue.len() <= limit {
            let mut all = undelivered;
            all.extend(overdue);
            all.sort_by_key(|m| m.id);
            return Ok((all.len() as u64, Pending::loaded(all)));
        }
        let count = self.count_pending(user, ack_timeout).await?;
        Ok((count, self.pending(user, ack_timeout).await?))
    }

    /// Every pending message of `user`, oldest first, streamed in batches.
    async fn pending(&self, user: &str, ack_timeout: Duration) -> Result<Pending, StoreError> {
        let [undelivered, overdue] = self
            .pending_finds(user, ack_timeout)
            .map(|find| find.batch_size(1000));
        let (undelivered, overdue) =
            futures::try_join!(undelivered.into_future(), overdue.into_future())?;
        Ok(Pending(Source::Streaming(Box::new(Streams {
            cursors: [undelivered, overdue],
            heads: [None, None],
            started: false,
        }))))
    }

    /// The two halves of `user`'s pending messages, each read in `_id` order from the index
    /// that answers it.
    fn pending_finds(
        &self,
        user: &str,
        ack_timeout: Duration,
    ) -> [mongodb::action::Find<'_, BufferedMessage>; 2] {
        let [undelivered, overdue] = Self::drain_filters(user, ack_timeout);
        let [undelivered_index, overdue_index] = Self::DRAIN_HINTS;
        [
            self.oldest_first_in(undelivered, undelivered_index),
            self.oldest_first_in(overdue, overdue_index),
        ]
    }

    /// Messages matching `filter`, oldest first, read from `index` (hinted: one plan, never
    /// a per-call race between indexes).
    fn oldest_first_in(
        &self,
        filter: Document,
        index: &str,
    ) -> mongodb::action::Find<'_, BufferedMessage> {
        self.messages
            .find(filter)
            .sort(doc! {"_id": 1})
            .hint(mongodb::options::Hint::Name(index.into()))
    }

    /// Pending messages of several users older than `older_than` (the redelivery sweep and
    /// the history-lost rescan).
    ///
    /// Two hinted reads, one per half, rather than one `$or` of both: for 100 receivers the
    /// `$or` cost 35 ms per call against 10 ms for the pair (BENCHMARKS.md), on every sweep.
    pub async fn overdue(
        &self,
        users: &[String],
        older_than: Duration,
        limit: i64,
    ) -> Result<Vec<BufferedMessage>, StoreError> {
        let cutoff = overdue_cutoff(older_than);
        let undelivered =
            doc! {"receiver": {"$in": users}, "delivered": false, "timestamp": {"$lt": cutoff}};
        let overdue = overdue_of(doc! {"$in": users}.into(), older_than);
        let read = |filter: Document, index: &'static str| async move {
            self.oldest_first_in(filter, index)
                .limit(limit)
                .await?
                .try_collect::<Vec<_>>()
                .await
        };
        let (mut all, overdue) =
            futures::try_join!(read(undelivered, DRAIN_INDEX), read(overdue, UNACKED_INDEX))?;
        all.extend(overdue);
        all.sort_by_key(|m| m.id);
        all.truncate(limit.max(0) as usize);
        Ok(all)
    }

    /// Up to `limit` messages matching `filter`, oldest first.
    async fn oldest_first(
        &self,
        filter: Document,
        limit: i64,
    ) -> Result<Vec<BufferedMessage>, StoreError> {
        Ok(self
            .messages
            .find(filter)
            .sort(doc! {"_id": 1})
            .limit(limit)
            .await?
            .try_collect()
            .await?)
    }

    /// Undelivered messages of `users` (the rescan after history loss), oldest first.
    pub async fn undelivered_of(
        &self,
        users: &[String],
        after: Option<ObjectId>,
        limit: i64,
    ) -> Result<Vec<BufferedMessage>, StoreError> {
        self.undelivered_page(doc! {"$in": users}.into(), after, limit)
            .await
    }

    /// Records acks, each only on messages addressed to the user who sent it, in one write.
    /// The pipeline copies the sender into `receiptFor`, so the change event carries who gets
    /// the receipt.
    pub async fn ack(&self, acks: &[(String, Vec<ObjectId>)]) -> Result<u64, StoreError> {
        // A socket can only acknowledge its own user's messages.
        let by_user: Vec<Document> = acks
            .iter()
            .map(|(user, ids)| doc! {"_id": {"$in": ids}, "receiver": user})
            .collect();
        let r = self
            .raw
            .update_many(
                doc! {"$or": by_user, "ackedAt": null},
                vec![doc! {"$set": {"ackedAt": "$$NOW", "updatedAt": "$$NOW", "receiptFor": "$sender"}}],
            )
            .await?;
        Ok(r.modified_count)
    }

    /// A claim and its ack in one write, for messages whose ack (from their receiver: the
    /// caller checks that) reached this instance before their claim was written: one
    /// document rewrite and one oplog entry instead of two. Flips only unclaimed messages,
    /// as [`Store::claim`] and [`Store::ack`] together would; returns how many it flipped.
    /// An earlier ack's date is kept, and `receiptFor` then rewrites the same value, which
    /// is no change, so the stream sends no second receipt.
    pub async fn claim_acked(&self, ids: &[ObjectId], instance: &str) -> Result<u64, StoreError> {
        let r = self
            .raw
            .update_many(
                doc! {"_id": {"$in": ids}, "delivered": false},
                vec![doc! {"$set": {
                    "delivered": true,
                    "deliveredAt": "$$NOW",
                    "deliveredBy": instance,
                    "pushedAt": "$$NOW",
                    "updatedAt": "$$NOW",
                    "ackedAt": {"$ifNull": ["$ackedAt", "$$NOW"]},
                    "receiptFor": "$sender",
                }}],
            )
            .await?;
        Ok(r.modified_count)
    }

    /// A page of `user`'s undelivered messages after `after`, oldest first.
    pub async fn buffered_page(
        &self,
        user: &str,
        after: Option<ObjectId>,
        limit: i64,
    ) -> Result<Vec<BufferedMessage>, StoreError> {
        self.undelivered_page(user.into(), after, limit).await
    }

    async fn undelivered_page(
        &self,
        receiver: mongodb::bson::Bson,
        after: Option<ObjectId>,
        limit: i64,
    ) -> Result<Vec<BufferedMessage>, StoreError> {
        let mut filter = doc! {"receiver": receiver, "delivered": false};
        if let Some(after) = after {
            filter.insert("_id", doc! {"$gt": after});
        }
        self.oldest_first(filter, limit).await
    }

    /// Deletes `user`'s undelivered messages.
    pub async fn delete_undelivered(&self, user: &str) -> Result<u64, StoreError> {
        Ok(self
            .raw
            .delete_many(doc! {"receiver": user, "delivered": false})
            .await?
            .deleted_count)
    }

    /// Buffer counts, each answered from an index.
    pub async fn counts(&self) -> Result<BufferCounts, StoreError> {
        let undelivered = self
            .raw
            .count_documents(doc! {"delivered": false})
            .hint(mongodb::options::Hint::Name("delivered_1".into()));
        let delivered = self
            .raw
            .count_documents(doc! {"delivered": true})
            .hint(mongodb::options::Hint::Name("delivered_1".into()));
        let unacked = self
            .raw
            .count_documents(unacked_filter())
            .hint(mongodb::options::Hint::Name(UNACKED_INDEX.into()));
        let users = async {
            let mut cursor = self
                .raw
                .aggregate(vec![
                    doc! {"$match": {"delivered": false}},
                    doc! {"$group": {"_id": "$receiver"}},
                    doc! {"$count": "n"},
                ])
                .hint(mongodb::options::Hint::Name(
                    "receiver_1_delivered_1".into(),
                ))
                .await?;
            let n = match cursor.try_next().await? {
                Some(d) => d
                    .get_i32("n")
                    .map(i64::from)
                    .or_else(|_| d.get_i64("n"))
                    .unwrap_or(0) as u64,
                None => 0,
            };
            Ok::<u64, mongodb::error::Error>(n)
        };
        let oldest = self
            .messages
            .find_one(doc! {"delivered": false})
            .sort(doc! {"_id": 1})
            .hint(mongodb::options::Hint::Name("delivered_1__id_1".into()));
        let (undelivered, delivered, unacked, users, oldest) = futures::try_join!(
            undelivered.into_future(),
            delivered.into_future(),
            unacked.into_future(),
            users,
            oldest.into_future()
        )?;
        Ok(BufferCounts {
            undelivered,
            delivered,
            unacked,
            total: undelivered + delivered,
            users_with_undelivered: users,
            oldest_undelivered_at: oldest.map(|m| rfc3339(m.timestamp)),
        })
    }

    /// Loads this instance's change-stream checkpoint.
    pub async fn load_checkpoint(
        &self,
        instance: &str,
    ) -> Result<Option<mongodb::change_stream::event::ResumeToken>, StoreError> {
        let coll = self.db.collection::<Document>(CHECKPOINTS);
        let Some(d) = coll.find_one(doc! {"_id": instance}).await? else {
            return Ok(None);
        };
        match d.get("token") {
            Some(t) => Ok(Some(mongodb::bson::from_bson(t.clone())?)),
            None => Ok(None),
        }
    }

    pub async fn save_checkpoint(
        &self,
        instance: &str,
        token: &mongodb::change_stream::event::ResumeToken,
    ) -> Result<(), StoreError> {
        let coll = self.db.collection::<Document>(CHECKPOINTS);
        let token = mongodb::bson::to_bson(token)
            .map_err(|e| StoreError::Mongo(mongodb::error::Error::custom(e.to_string())))?;
        coll.update_one(
            doc! {"_id": instance},
            doc! {"$set": {"token": token, "updatedAt": DateTime::now()}},
        )
        .upsert(true)
        .await?;
        Ok(())
    }

    pub async fn clear_checkpoint(&self, instance: &str) -> Result<(), StoreError> {
        self.db
            .collection::<Document>(CHECKPOINTS)
            .delete_one(doc! {"_id": instance})
            .await?;
        Ok(())
    }
}

/// Pushes before this instant without an ack are overdue for a re-send.
pub fn overdue_cutoff(ack_timeout: Duration) -> DateTime {
    DateTime::from_millis(DateTime::now().timestamp_millis() - ack_timeout.as_millis() as i64)
}

/// Claimed, unacknowledged and pushed longer than `ack_timeout` ago, for `receiver` (a
/// name or an `$in`): a predicate that [`UNACKED_INDEX`] answers.
fn overdue_of(receiver: mongodb::bson::Bson, ack_timeout: Duration) -> Document {
    let mut filter = doc! {"receiver": receiver};
    filter.extend(unacked_filter());
    filter.insert("pushedAt", doc! {"$lt": overdue_cutoff(ack_timeout)});
    filter
}

impl BufferedMessage {
    /// Pushed, unacknowledged, and past its ack timeout (`cutoff` from [`overdue_cutoff`]).
    pub fn is_overdue(&self, cutoff: DateTime) -> bool {
        self.delivered && self.acked_at.is_none() && self.pushed_at.is_some_and(|p| p < cutoff)
    }
}

/// The index that streams a user's messages by state in `_id` order.
pub const DRAIN_INDEX: &str = "receiver_1_delivered_1__id_1";

/// A user's pending messages, oldest first: two index-ordered cursors merged by `_id`.
pub struct Pending(Source);

enum Source {
    /// A small backlog, read whole and merged.
    Loaded(std::vec::IntoIter<BufferedMessage>),
    /// Two cursors (one per half, each in `_id` order), merged by `_id` as they stream.
    Streaming(Box<Streams>),
}

struct Streams {
    cursors: [mongodb::Cursor<BufferedMessage>; 2],
    heads: [Option<BufferedMessage>; 2],
    started: bool,
}

impl Pending {
    fn loaded(messages: Vec<BufferedMessage>) -> Self {
        Pending(Source::Loaded(messages.into_iter()))
    }

    pub async fn next(&mut self) -> Option<Result<BufferedMessage, StoreError>> {
        use futures::StreamExt;
        let Streams {
            cursors,
            heads,
            started,
        } = match &mut self.0 {
            Source::Loaded(messages) => return messages.next().map(Ok),
            Source::Streaming(streams) => &mut **streams,
        };
        if !*started {
            *started = true;
            for i in 0..2 {
                match cursors[i].next().await.transpose() {
                    Ok(head) => heads[i] = head,
                    Err(e) => return Some(Err(e.into())),
                }
            }
        }
        let i = match (&heads[0], &heads[1]) {
            (None, None) => return None,
            (Some(_), None) => 0,
            (None, Some(_)) => 1,
            (Some(a), Some(b)) => usize::from(b.id < a.id),
        };
        let out = heads[i].take();
        match cursors[i].next().await.transpose() {
            Ok(head) => heads[i] = head,
            Err(e) => return Some(Err(e.into())),
        }
        out.map(Ok)
    }
}

fn accepted_of(m: &BufferedMessage) -> Accepted {
    Accepted {
        id: m.id,
        timestamp: m.timestamp,
        client_msg_id: m.client_msg_id.clone(),
    }
}
