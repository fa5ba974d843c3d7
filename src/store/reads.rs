//! Reads other than the join drain: the sweep's and the rescan's, REST pages, statistics.

use std::future::IntoFuture;
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, oid::ObjectId, Bson, Document};
use mongodb::options::Hint;
use serde::Serialize;

use super::indexes::{
    unacked_filter, DELIVERED_INDEX, DRAIN_INDEX, OLDEST_UNDELIVERED_INDEX,
    RECEIVER_DELIVERED_INDEX, UNACKED_INDEX,
};
use super::message::overdue_cutoff;
use super::pending::overdue_of;
use super::{BufferedMessage, Store, StoreError};
use crate::protocol::rfc3339;

/// Whose messages a read is about.
#[derive(Debug, Clone, Copy)]
pub enum Receivers<'a> {
    One(&'a str),
    Many(&'a [String]),
}

impl Receivers<'_> {
    fn to_bson(self) -> Bson {
        match self {
            Receivers::One(user) => user.into(),
            Receivers::Many(users) => doc! {"$in": users}.into(),
        }
    }
}

/// Message text a page holds at most (one message more may cross it).
pub const PAGE_BYTES: usize = 1 << 20;
/// Documents per `getMore` of a page: 64 of the largest messages are 1 MiB.
const PAGE_BATCH: u32 = 64;

/// One page of messages, oldest first.
#[derive(Debug, Default)]
pub struct Page {
    pub messages: Vec<BufferedMessage>,
    /// The page was cut by its limit or its size: read on after its last id.
    pub more: bool,
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

impl Store {
    /// What the redelivery sweep looks at for the users joined here, oldest first, at most
    /// `limit`: undelivered messages accepted more than `older_than` ago (no live push or
    /// drain took them), and pushed ones whose ack is more than `older_than` overdue.
    ///
    /// Two hinted reads, one per half, rather than one `$or` of both: for 100 receivers the
    /// `$or` cost 35 ms per call against 10 ms for the pair (BENCHMARKS.md), on every sweep.
    pub async fn pending_older_than(
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

    /// Undelivered messages of `receivers` after `after`, oldest first (REST pages, the
    /// rescan after history loss): up to `limit`, and no more once the page holds
    /// [`PAGE_BYTES`] of message text (memory per read is bounded whatever the messages
    /// weigh). The page says whether more may follow.
    pub async fn undelivered(
        &self,
        receivers: Receivers<'_>,
        after: Option<ObjectId>,
        limit: i64,
    ) -> Result<Page, StoreError> {
        let mut filter = doc! {"receiver": receivers.to_bson(), "delivered": false};
        if let Some(after) = after {
            filter.insert("_id", doc! {"$gt": after});
        }
        let mut cursor = self
            .oldest_first_in(filter, DRAIN_INDEX)
            .limit(limit)
            .batch_size(PAGE_BATCH)
            .await?;
        let mut page = Page::default();
        let mut bytes = 0;
        while let Some(msg) = cursor.try_next().await? {
            bytes += msg.message.len();
            page.messages.push(msg);
            if bytes >= PAGE_BYTES {
                page.more = true;
                return Ok(page);
            }
        }
        page.more = page.messages.len() as i64 == limit;
        Ok(page)
    }

    /// Buffer counts, each answered from an index.
    pub async fn counts(&self) -> Result<BufferCounts, StoreError> {
        let count = |filter: Document, index: &str| {
            self.raw
                .count_documents(filter)
                .hint(Hint::Name(index.into()))
                .into_future()
        };
        let oldest = self
            .messages
            .find_one(doc! {"delivered": false})
            .sort(doc! {"_id": 1})
            .hint(Hint::Name(OLDEST_UNDELIVERED_INDEX.into()));
        let (undelivered, delivered, unacked, users, oldest) = futures::try_join!(
            count(doc! {"delivered": false}, DELIVERED_INDEX),
            count(doc! {"delivered": true}, DELIVERED_INDEX),
            count(unacked_filter(), UNACKED_INDEX),
            self.users_with_undelivered(),
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

    async fn users_with_undelivered(&self) -> Result<u64, mongodb::error::Error> {
        let mut cursor = self
            .raw
            .aggregate(vec![
                doc! {"$match": {"delivered": false}},
                doc! {"$group": {"_id": "$receiver"}},
                doc! {"$count": "n"},
            ])
            .hint(Hint::Name(RECEIVER_DELIVERED_INDEX.into()))
            .await?;
        Ok(match cursor.try_next().await? {
            Some(d) => d
                .get_i32("n")
                .map(i64::from)
                .or_else(|_| d.get_i64("n"))
                .unwrap_or(0) as u64,
            None => 0,
        })
    }
}
