//! The change stream on `buffered_messages` and its per-instance checkpoints.

use mongodb::bson::{doc, DateTime, Document, RawDocumentBuf};
use mongodb::change_stream::event::{ChangeStreamEvent, ResumeToken};
use mongodb::change_stream::ChangeStream;

use super::error::code;
use super::{Store, StoreError, CHECKPOINTS};

/// The stream the tailer reads; events are decoded from raw bytes by the reader.
pub type MessageChanges = ChangeStream<ChangeStreamEvent<RawDocumentBuf>>;

/// Server errors meaning "the stream cannot resume from this token".
const HISTORY_LOST: [i32; 4] = [
    code::CHANGE_STREAM_HISTORY_LOST,
    code::CAPPED_POSITION_LOST,
    code::INVALID_RESUME_TOKEN,
    code::CHANGE_STREAM_FATAL_ERROR,
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
/// writes `ackedAt` too: an explicit null). It never changes, so resume tokens stay valid.
fn pipeline() -> Vec<Document> {
    vec![doc! {"$match": {"$or": [
        {"operationType": "insert"},
        {"operationType": "update", "updateDescription.updatedFields.receiptFor": {"$exists": true}},
    ]}}]
}

impl Store {
    /// Opens the stream of inserts and acks, after `token` when given.
    pub async fn watch_messages(
        &self,
        token: Option<ResumeToken>,
    ) -> Result<MessageChanges, mongodb::error::Error> {
        let watch = self.raw.watch().pipeline(pipeline());
        let stream = match token {
            Some(t) => watch.resume_after(t).await?,
            None => watch.await?,
        };
        // Inserts are decoded once, from the raw bytes, straight into a `BufferedMessage`
        // (a foreign document is skipped there, never stalls the stream the way a failing
        // typed decode of the whole event would).
        Ok(stream.with_type::<ChangeStreamEvent<RawDocumentBuf>>())
    }

    /// Loads this instance's change-stream checkpoint.
    pub async fn load_checkpoint(&self, instance: &str) -> Result<Option<ResumeToken>, StoreError> {
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
        token: &ResumeToken,
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
