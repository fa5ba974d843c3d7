//! The indexes of `buffered_messages`, and the TTL that implements the retention.

use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::options::IndexOptions;
use mongodb::IndexModel;

use super::{Store, StoreError, MESSAGES};

/// The index that streams a user's messages by state in `_id` order.
pub const DRAIN_INDEX: &str = "receiver_1_delivered_1__id_1";
/// Claimed messages still waiting for their ack, by receiver in `_id` order: a partial
/// index, so the redelivery sweep, the drain's overdue half and the join's count read
/// only messages in flight, never a user's whole delivered history.
pub const UNACKED_INDEX: &str = "receiver_1__id_1_unacked";
pub const TTL_INDEX: &str = "deliveredAt_ttl";
/// What a user sent, in `_id` order: the sent-message sync of a device's catch-up.
pub const SENDER_INDEX: &str = "sender_1__id_1";
pub(super) const DELIVERED_INDEX: &str = "delivered_1";
pub(super) const OLDEST_UNDELIVERED_INDEX: &str = "delivered_1__id_1";
pub(super) const RECEIVER_DELIVERED_INDEX: &str = "receiver_1_delivered_1";

/// The predicate of [`UNACKED_INDEX`]. A claim writes `ackedAt: null` explicitly (`$type`
/// is what a partial index can test; a missing field is not), and an ack replaces it.
pub(super) fn unacked_filter() -> Document {
    doc! {"delivered": true, "ackedAt": {"$type": "null"}}
}

fn named(keys: Document, name: &str) -> IndexModel {
    IndexModel::builder()
        .keys(keys)
        .options(IndexOptions::builder().name(name.to_owned()).build())
        .build()
}

impl Store {
    /// Creates the indexes the queries need. Idempotent (same keys and options).
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let models = vec![
            // The original app's indexes.
            named(doc! {"receiver": 1}, "receiver_1"),
            named(doc! {"delivered": 1}, DELIVERED_INDEX),
            named(
                doc! {"receiver": 1, "delivered": 1},
                RECEIVER_DELIVERED_INDEX,
            ),
            // Ordered drains and per-user sweeps: equality on (receiver, delivered), sorted by _id.
            named(doc! {"receiver": 1, "delivered": 1, "_id": 1}, DRAIN_INDEX),
            // Oldest undelivered and the age-based cleanup without a sort stage.
            named(doc! {"delivered": 1, "_id": 1}, OLDEST_UNDELIVERED_INDEX),
            IndexModel::builder()
                .keys(doc! {"receiver": 1, "_id": 1})
                .options(
                    IndexOptions::builder()
                        .name(UNACKED_INDEX.to_owned())
                        .partial_filter_expression(unacked_filter())
                        .build(),
                )
                .build(),
            named(doc! {"sender": 1, "_id": 1}, SENDER_INDEX),
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

    /// Creates the TTL index on `deliveredAt`, or changes its `expireAfterSeconds` in place
    /// with `collMod` (no rebuild) when the retention changed.
    pub async fn ensure_ttl_index(&self, retention: Duration) -> Result<(), StoreError> {
        let seconds = retention.as_secs().max(1) as i64;
        match self.ttl_seconds().await? {
            None => {
                let model = IndexModel::builder()
                    .keys(doc! {"deliveredAt": 1})
                    .options(
                        IndexOptions::builder()
                            .name(TTL_INDEX.to_owned())
                            .expire_after(Duration::from_secs(seconds as u64))
                            .build(),
                    )
                    .build();
                self.raw.create_index(model).await?;
                tracing::info!(
                    expire_after_seconds = seconds,
                    "created TTL index on deliveredAt"
                );
            }
            Some(Some(current)) if current == seconds => {}
            Some(current) => {
                self.db
                    .run_command(doc! {
                        "collMod": MESSAGES,
                        "index": {"name": TTL_INDEX, "expireAfterSeconds": seconds},
                    })
                    .await?;
                tracing::info!(from = ?current, to = seconds, "changed the TTL index retention with collMod");
            }
        }
        Ok(())
    }

    /// `None` without a TTL index; `Some(None)` for one without `expireAfterSeconds`.
    async fn ttl_seconds(&self) -> Result<Option<Option<i64>>, StoreError> {
        let mut cursor = self.raw.list_indexes().await?;
        while let Some(index) = cursor.try_next().await? {
            let options = index.options;
            if options.as_ref().and_then(|o| o.name.as_deref()) == Some(TTL_INDEX) {
                let seconds = options
                    .and_then(|o| o.expire_after)
                    .map(|d| d.as_secs() as i64);
                return Ok(Some(seconds));
            }
        }
        Ok(None)
    }
}
