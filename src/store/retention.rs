//! The cleanup's queries: its lease, and the deletes the TTL index cannot do.

use std::time::Duration;

use mongodb::bson::{doc, DateTime, Document};

use super::error::code;
use super::{Store, StoreError, LEASES};

const CLEANUP_LEASE: &str = "cleanup";

impl Store {
    /// Takes the cleanup lease for `hold` if it is free or expired (or already ours).
    pub async fn take_cleanup_lease(
        &self,
        instance: &str,
        hold: Duration,
    ) -> Result<bool, StoreError> {
        let leases = self.db.collection::<Document>(LEASES);
        let now = DateTime::now();
        let until = DateTime::from_millis(now.timestamp_millis() + hold.as_millis() as i64);
        let result = leases
            .update_one(
                doc! {"_id": CLEANUP_LEASE, "$or": [{"until": {"$lt": now}}, {"holder": instance}]},
                doc! {"$set": {"holder": instance, "until": until, "takenAt": now}},
            )
            .upsert(true)
            .write_concern(mongodb::options::WriteConcern::majority())
            .await;
        match result {
            Ok(r) => Ok(r.matched_count == 1 || r.upserted_id.is_some()),
            // The upsert collided with a live lease of another instance.
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes delivered messages older than `cutoff`: those the TTL monitor has not
    /// reached yet, and those without `deliveredAt` (which TTL never sees).
    pub async fn delete_delivered_before(&self, cutoff: DateTime) -> Result<u64, StoreError> {
        Ok(self
            .raw
            .delete_many(doc! {"delivered": true, "$or": [
                {"deliveredAt": {"$lt": cutoff}},
                {"deliveredAt": {"$exists": false}, "timestamp": {"$lt": cutoff}},
            ]})
            .await?
            .deleted_count)
    }

    /// Deletes undelivered messages accepted before `cutoff`.
    pub async fn delete_undelivered_before(&self, cutoff: DateTime) -> Result<u64, StoreError> {
        Ok(self
            .raw
            .delete_many(doc! {"delivered": false, "timestamp": {"$lt": cutoff}})
            .await?
            .deleted_count)
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    matches!(e.kind.as_ref(), ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == code::DUPLICATE_KEY)
}
