//! What a join drains: a user's pending messages — undelivered, and pushed but overdue for
//! their ack — oldest first, read as index-ordered sources merged by `_id`. A device's
//! join adds what it missed above its floor (received, and sent from its user's other
//! sockets), less what it acknowledged.

use std::collections::HashSet;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{doc, oid::ObjectId, Bson, Document};
use mongodb::options::Hint;

use super::devices::{received_above, sent_above, DeviceBounds};
use super::indexes::{unacked_filter, DRAIN_INDEX, SENDER_INDEX, UNACKED_INDEX};
use super::message::overdue_cutoff;
use super::{BufferedMessage, Catchup, Store, StoreError};

/// A join reads up to this many pending messages per source in one go and counts them
/// itself; above it, the join counts, and streams later ([`Store::stream_pending`]). Small
/// enough that what a socket holds before its drain is bounded: 2 × 32 messages of at
/// most 16 KiB, about 1 MiB (a device's sources above its floor also read what it
/// acknowledged there, up to [`SMALL_ACKED`] more).
const SMALL_BACKLOG: i64 = 32;
const SMALL_ACKED: i64 = 256;
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

/// One source of a join: a filter, and the index that answers it in `_id` order.
#[derive(Debug, Clone)]
pub struct CatchUpSource {
    pub filter: Document,
    pub index: &'static str,
    /// Above a device's floor: also reads what the device acknowledged there (skipped).
    pub above_floor: bool,
}

impl CatchUpSource {
    fn below(filter: Document, index: &'static str) -> Self {
        CatchUpSource {
            filter,
            index,
            above_floor: false,
        }
    }

    fn above(filter: Document, index: &'static str) -> Self {
        CatchUpSource {
            filter,
            index,
            above_floor: true,
        }
    }
}

/// Whose messages a join reads: the user's, and for a device's join its catch-up state.
#[derive(Debug, Clone, Copy)]
pub struct Reader<'a> {
    pub user: &'a str,
    pub ack_timeout: Duration,
    pub device: Option<&'a Catchup>,
}

impl Store {
    /// The drain filter of an ephemeral socket: undelivered messages, and
    /// pushed-but-unacknowledged ones past the ack timeout.
    pub fn pending_filter(user: &str, ack_timeout: Duration) -> Document {
        let [undelivered, overdue] = drain_filters(user, ack_timeout);
        doc! {"$or": [undelivered, overdue]}
    }

    /// What a join reads, source by source, with the index that answers each in `_id`
    /// order (no in-memory sort of a large backlog). An ephemeral socket: undelivered
    /// (from [`DRAIN_INDEX`]) and delivered-but-overdue (from [`UNACKED_INDEX`]). A device:
    /// what is undelivered at or below its origin (above it, up to the floor, it
    /// acknowledged everything), and above its floor everything it was sent (both
    /// `delivered` values of [`DRAIN_INDEX`]) and what its user sent from elsewhere
    /// ([`SENDER_INDEX`]): each a bounded range of an index. Overdue messages below its
    /// origin (older than the device, pushed to another socket, never acknowledged) reach
    /// it by the redelivery sweep instead: reading them at every join would walk the
    /// unacked index's entries that the user's acks deleted, which a scan still steps
    /// over until the storage engine drops them, minutes later (4 ms after 10,000 acks).
    pub fn catch_up_sources(
        user: &str,
        ack_timeout: Duration,
        device: Option<DeviceBounds<'_>>,
    ) -> Vec<CatchUpSource> {
        let [mut undelivered, overdue] = drain_filters(user, ack_timeout);
        let Some(DeviceBounds {
            device,
            origin,
            floor,
        }) = device
        else {
            return vec![
                CatchUpSource::below(undelivered, DRAIN_INDEX),
                CatchUpSource::below(overdue, UNACKED_INDEX),
            ];
        };
        undelivered.insert("_id", doc! {"$lte": origin.min(floor)});
        vec![
            CatchUpSource::below(undelivered, DRAIN_INDEX),
            CatchUpSource::above(received_above(user, doc! {"$gt": floor}), DRAIN_INDEX),
            CatchUpSource::above(sent_above(user, device, doc! {"$gt": floor}), SENDER_INDEX),
        ]
    }

    /// What a join needs first: how many messages it will send, and, when there are few
    /// (the usual case), all of them, oldest first: one limited read per source, counted
    /// from what was read. A larger backlog is only counted (`None`): the caller streams
    /// it with [`Store::stream_pending`] when it is ready to.
    pub async fn open_pending(
        &self,
        reader: Reader<'_>,
    ) -> Result<(u64, Option<Pending>), StoreError> {
        let skip = skipped(reader);
        let (finds, limits): (Vec<_>, Vec<i64>) = self
            .sources(reader)
            .into_iter()
            .map(|source| {
                // A device's sources above its floor also read its acks there.
                let acked = if source.above_floor { skip.len() } else { 0 };
                let limit = SMALL_BACKLOG + 1 + acked.min(SMALL_ACKED as usize) as i64;
                (self.oldest_first_in(source.filter, source.index), limit)
            })
            .unzip();
        let reads = finds
            .into_iter()
            .zip(&limits)
            .map(|(find, limit)| async move {
                let cursor = find.limit(*limit).batch_size(*limit as u32).await?;
                cursor.try_collect::<Vec<_>>().await
            });
        let sources = futures::future::try_join_all(reads).await?;
        let cut = sources
            .iter()
            .zip(&limits)
            .any(|(read, limit)| read.len() as i64 >= *limit);
        if !cut {
            let mut all: Vec<BufferedMessage> = sources
                .into_iter()
                .flatten()
                .filter(|m| !skip.contains(&m.id))
                .collect();
            all.sort_by_key(|m| m.id);
            all.dedup_by_key(|m| m.id);
            return Ok((all.len() as u64, Some(Pending::loaded(all))));
        }
        let count = self.count_pending(reader).await?;
        Ok((count.saturating_sub(skip.len() as u64), None))
    }

    /// How many messages a join will send (for a device, before taking off what it
    /// acknowledged): each source counted apart, from its own index (an `$or` count is
    /// planned per call and may pick a plan that reads the user's whole history).
    async fn count_pending(&self, reader: Reader<'_>) -> Result<u64, StoreError> {
        let counts = self.sources(reader).into_iter().map(|source| {
            self.raw
                .count_documents(source.filter)
                .hint(Hint::Name(source.index.into()))
                .into_future()
        });
        Ok(futures::future::try_join_all(counts).await?.iter().sum())
    }

    /// Every message a join sends, oldest first, streamed in batches.
    pub async fn stream_pending(&self, reader: Reader<'_>) -> Result<Pending, StoreError> {
        let opens = self
            .finds(reader)
            .into_iter()
            .map(|find| find.batch_size(STREAM_BATCH).into_future());
        let cursors = futures::future::try_join_all(opens).await?;
        let n = cursors.len();
        Ok(Pending(Source::Streaming(Box::new(Streams {
            cursors,
            heads: (0..n).map(|_| None).collect(),
            exhausted: vec![false; n],
            skip: skipped(reader),
        }))))
    }

    fn sources(&self, reader: Reader<'_>) -> Vec<CatchUpSource> {
        let device = reader.device.map(Catchup::bounds);
        Self::catch_up_sources(reader.user, reader.ack_timeout, device)
    }

    /// The sources of a join, each read in `_id` order from the index that answers it.
    fn finds(&self, reader: Reader<'_>) -> Vec<mongodb::action::Find<'_, BufferedMessage>> {
        self.sources(reader)
            .into_iter()
            .map(|source| self.oldest_first_in(source.filter, source.index))
            .collect()
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

/// The two halves of an ephemeral socket's drain.
fn drain_filters(user: &str, ack_timeout: Duration) -> [Document; 2] {
    [
        doc! {"receiver": user, "delivered": false},
        overdue_of(user.into(), ack_timeout),
    ]
}

/// The ids a device acknowledged above its floor: its join skips them.
fn skipped(reader: Reader<'_>) -> Arc<HashSet<ObjectId>> {
    Arc::new(reader.device.map(|d| d.acked.clone()).unwrap_or_default())
}

/// The messages a join sends, oldest first: index-ordered cursors merged by `_id`.
pub struct Pending(Source);

enum Source {
    /// A small backlog, read whole and merged.
    Loaded(std::vec::IntoIter<BufferedMessage>),
    /// One cursor per source (each in `_id` order), merged by `_id` as they stream.
    Streaming(Box<Streams>),
}

struct Streams {
    cursors: Vec<mongodb::Cursor<BufferedMessage>>,
    /// The next message of each source, read ahead to compare ids.
    heads: Vec<Option<BufferedMessage>>,
    exhausted: Vec<bool>,
    /// Ids left out (what a device acknowledged).
    skip: Arc<HashSet<ObjectId>>,
}

impl Pending {
    fn loaded(messages: Vec<BufferedMessage>) -> Self {
        Pending(Source::Loaded(messages.into_iter()))
    }

    /// The next message, `None` at the end.
    ///
    /// Cancel-safe: it only awaits while filling an empty head (a cursor's `next` keeps its
    /// `getMore` in the cursor), and takes a message without awaiting, so a session can
    /// poll it beside its socket and drop the call when the socket wins.
    pub async fn next(&mut self) -> Option<Result<BufferedMessage, StoreError>> {
        let streams = match &mut self.0 {
            Source::Loaded(messages) => return messages.next().map(Ok),
            Source::Streaming(streams) => &mut **streams,
        };
        loop {
            for i in 0..streams.cursors.len() {
                if streams.heads[i].is_none() && !streams.exhausted[i] {
                    match streams.cursors[i].next().await {
                        Some(Ok(m)) => streams.heads[i] = Some(m),
                        Some(Err(e)) => return Some(Err(e.into())),
                        None => streams.exhausted[i] = true,
                    }
                }
            }
            let oldest = streams
                .heads
                .iter()
                .enumerate()
                .filter_map(|(i, h)| h.as_ref().map(|m| (m.id, i)))
                .min()?;
            let msg = streams.heads[oldest.1].take()?;
            if !streams.skip.contains(&msg.id) {
                return Some(Ok(msg));
            }
        }
    }
}
