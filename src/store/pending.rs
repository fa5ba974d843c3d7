//! What a join drains: a user's pending messages — undelivered, and pushed but overdue for
//! their ack — oldest first, read as two index-ordered halves merged by `_id`.

use std::future::IntoFuture;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::Hint;

use super::indexes::{unacked_filter, DRAIN_INDEX, UNACKED_INDEX};
use super::message::overdue_cutoff;
use super::{BufferedMessage, Store, StoreError};

/// A join reads up to this many pending messages per half in one go and counts them
/// itself; above it, the join counts, and streams later ([`Store::stream_pending`]). Small
/// enough that what a socket holds before its drain is bounded: 2 × 32 messages of at
/// most 16 KiB, about 1 MiB.
const SMALL_BACKLOG: i64 = 32;
/// Documents per `getMore` of a streamed drain. A drain's read-ahead is the one buffer
/// outside the byte budgets (the driver holds each batch whole): two cursors of 256
/// messages of at most 16 KiB stay under 9 MiB, and a user drains one socket at a time.
const STREAM_BATCH: u32 = 256;

/// Claimed, unacknowledged and pushed longer than `ack_timeout` ago, for `receiver` (a
/// name or an `$in`): a predicate that [`UNACKED_INDEX`] answers.
pub(super) fn overdue_of(receiver: Bson, ack_timeout: Duration) -> Document {
    let mut filter = doc! {"receiver": receiver};
    filter.extend(unacked_filter());
    filter.insert("pushedAt", doc! {"$lt": overdue_cutoff(ack_timeout)});
    filter
}

impl Store {
    /// The drain filter: undelivered messages, and pushed-but-unacknowledged ones past the
    /// ack timeout.
    pub fn pending_filter(user: &str, ack_timeout: Duration) -> Document {
        let [undelivered, overdue] = Self::drain_filters(user, ack_timeout);
        doc! {"$or": [undelivered, overdue]}
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

    /// What a join needs first: how many messages are pending for `user`, and, when there
    /// are few (the usual case), all of them, oldest first: one limited read per half,
    /// counted from what was read. A larger backlog is only counted (`None`): the caller
    /// streams it with [`Store::stream_pending`] when it is ready to.
    pub async fn open_pending(
        &self,
        user: &str,
        ack_timeout: Duration,
    ) -> Result<(u64, Option<Pending>), StoreError> {
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
            return Ok((all.len() as u64, Some(Pending::loaded(all))));
        }
        let count = self.count_pending(user, ack_timeout).await?;
        Ok((count, None))
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
                .hint(Hint::Name(index.into()))
                .into_future()
        };
        let (a, b) = futures::try_join!(
            count(undelivered, undelivered_index),
            count(overdue, overdue_index)
        )?;
        Ok(a + b)
    }

    /// Every pending message of `user`, oldest first, streamed in batches.
    pub async fn stream_pending(
        &self,
        user: &str,
        ack_timeout: Duration,
    ) -> Result<Pending, StoreError> {
        let [undelivered, overdue] = self
            .pending_finds(user, ack_timeout)
            .map(|find| find.batch_size(STREAM_BATCH));
        let (undelivered, overdue) =
            futures::try_join!(undelivered.into_future(), overdue.into_future())?;
        Ok(Pending(Source::Streaming(Box::new(Streams {
            cursors: [undelivered, overdue],
            heads: [None, None],
            exhausted: [false, false],
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
    pub(super) fn oldest_first_in(
        &self,
        filter: Document,
        index: &str,
    ) -> mongodb::action::Find<'_, BufferedMessage> {
        self.messages
            .find(filter)
            .sort(doc! {"_id": 1})
            .hint(Hint::Name(index.into()))
    }
}

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
    /// The next message of each half, read ahead to compare ids.
    heads: [Option<BufferedMessage>; 2],
    exhausted: [bool; 2],
}

impl Pending {
    fn loaded(messages: Vec<BufferedMessage>) -> Self {
        Pending(Source::Loaded(messages.into_iter()))
    }

    /// The next pending message, `None` at the end.
    ///
    /// Cancel-safe: it only awaits while filling an empty head (a cursor's `next` keeps its
    /// `getMore` in the cursor), and takes a message without awaiting, so a session can
    /// poll it beside its socket and drop the call when the socket wins.
    pub async fn next(&mut self) -> Option<Result<BufferedMessage, StoreError>> {
        let streams = match &mut self.0 {
            Source::Loaded(messages) => return messages.next().map(Ok),
            Source::Streaming(streams) => &mut **streams,
        };
        for i in 0..2 {
            if streams.heads[i].is_none() && !streams.exhausted[i] {
                match streams.cursors[i].next().await {
                    Some(Ok(m)) => streams.heads[i] = Some(m),
                    Some(Err(e)) => return Some(Err(e.into())),
                    None => streams.exhausted[i] = true,
                }
            }
        }
        let i = match &streams.heads {
            [None, None] => return None,
            [Some(_), None] => 0,
            [None, Some(_)] => 1,
            [Some(a), Some(b)] => usize::from(b.id < a.id),
        };
        streams.heads[i].take().map(Ok)
    }
}
