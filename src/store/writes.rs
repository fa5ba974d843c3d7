//! Every write on `buffered_messages`: sends, claims, acks and re-sends.
//!
//! Each state change is one conditional write (the condition is what makes it happen at
//! most once across instances), batched where the caller batches.

use mongodb::bson::{doc, oid::ObjectId, DateTime};
use mongodb::error::ErrorKind;
use mongodb::options::ReturnDocument;

use super::error::duplicate_key_message;
use super::{BufferedMessage, Store, StoreError};
use crate::protocol::Accepted;

impl Store {
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
            let e = match self.messages.insert_many(rest).ordered(true).await {
                Ok(_) => {
                    out.extend(rest.iter().map(|m| Ok(m.accepted())));
                    break;
                }
                Err(e) => e,
            };
            let Some(i) = first_failed(&e).filter(|i| *i < rest.len()) else {
                // Whole batch in doubt (no primary, network): the client retries, with its
                // clientMsgId making the retry idempotent.
                out.extend(rest.iter().map(|_| Err(StoreError::Mongo(e.clone()))));
                break;
            };
            out.extend(rest[..i].iter().map(|m| Ok(m.accepted())));
            out.push(self.resolve_duplicate(&rest[i], &e).await);
            rest = &rest[i + 1..];
        }
        out
    }

    async fn resolve_duplicate(
        &self,
        msg: &BufferedMessage,
        e: &mongodb::error::Error,
    ) -> Result<Accepted, StoreError> {
        let Some(index_msg) = duplicate_key_message(e) else {
            return Err(StoreError::Mongo(e.clone()));
        };
        if index_msg.contains("clientMsgId") {
            if let Some(existing) = self
                .messages
                .find_one(doc! {"sender": &msg.sender, "clientMsgId": &msg.client_msg_id})
                .await?
            {
                return Ok(existing.accepted());
            }
        }
        // Same _id: an earlier attempt of this very insert went through.
        Ok(msg.accepted())
    }

    /// Claims a batch for this instance: flips `delivered` false -> true on those not yet
    /// claimed. A single id uses `findOneAndUpdate`. Returns how many this call flipped.
    /// `ackedAt` becomes an explicit null unless an ack got there first (`$max`: a date
    /// sorts after null), which puts the message into the unacked index until its ack.
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

    /// Records acks, each only on messages addressed to the user who sent it, in one write.
    /// The pipeline copies the sender into `receiptFor`, so the change event carries who gets
    /// the receipt.
    pub async fn ack(&self, acks: &[(String, Vec<ObjectId>)]) -> Result<u64, StoreError> {
        // A socket can only acknowledge its own user's messages.
        let by_user: Vec<_> = acks
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

    /// Records that still-unacknowledged messages were written to a socket again (a join
    /// re-sends its own overdue messages): restarts their ack timeout.
    pub async fn record_resent(&self, ids: &[ObjectId]) -> Result<(), StoreError> {
        let now = DateTime::now();
        self.raw
            .update_many(
                doc! {"_id": {"$in": ids}, "ackedAt": null},
                doc! {"$set": {"pushedAt": now, "updatedAt": now}, "$inc": {"redeliveries": 1}},
            )
            .await?;
        Ok(())
    }

    /// Claims the re-send of one timed-out message (the sweep): the condition on the
    /// `pushedAt` it read lets only one instance win each timeout.
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

    /// Deletes `user`'s undelivered messages.
    pub async fn delete_undelivered(&self, user: &str) -> Result<u64, StoreError> {
        Ok(self
            .raw
            .delete_many(doc! {"receiver": user, "delivered": false})
            .await?
            .deleted_count)
    }
}

/// The position of the write error that stopped an ordered insert, unless the batch as a
/// whole is in doubt (a write concern error).
fn first_failed(e: &mongodb::error::Error) -> Option<usize> {
    match e.kind.as_ref() {
        ErrorKind::InsertMany(m) if m.write_concern_error.is_none() => m
            .write_errors
            .as_ref()
            .and_then(|w| w.first())
            .map(|w| w.index),
        _ => None,
    }
}
