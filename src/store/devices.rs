//! The `devices` collection: one document per (user, deviceId) with the device's catch-up
//! state (its floor and acked set, see [`crate::device`]), written at its joins, with its
//! acks (batched by the record loop) and when its floor moves.

use std::collections::HashSet;
use std::future::IntoFuture;
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, oid::ObjectId, DateTime, Document};
use mongodb::options::{Hint, IndexOptions, ReturnDocument, WriteConcern};
use mongodb::IndexModel;
use serde::{Deserialize, Serialize};

use super::error::is_transient;
use super::indexes::{DRAIN_INDEX, SENDER_INDEX};
use super::{Store, StoreError};
use crate::device::{missed_history, next_floor, skew_cap, DeviceId};
use crate::protocol::rfc3339;

pub const DEVICES: &str = "devices";
const DEVICE_KEY_INDEX: &str = "user_1_device_1";
const DEVICE_TTL_INDEX: &str = "expireAt_ttl";
/// Acked ids a device document keeps at most (about 1 MiB). The floor normally keeps the
/// set to the skew window's messages; a device whose floor is stuck behind a message it
/// never acknowledges loses its oldest acks past this, and gets those messages again.
const MAX_ACKED: i32 = 50_000;
/// Message ids one floor move reads per side (received, sent) at most.
const FLOOR_READ: i64 = 5_000;

/// What the device rules take from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct DevicePolicy {
    /// How long after its id's time a message may still commit (`MSGBUF_DEVICE_SKEW`).
    pub skew: Duration,
    /// The message retention: a device away longer missed history, and is forgotten.
    pub retention: Duration,
    /// Devices per user (`MSGBUF_MAX_DEVICES`).
    pub max_per_user: usize,
}

impl DevicePolicy {
    /// When a device seen at `now` is deleted: one retention after it is forgotten, so
    /// that its return is still told `missedHistory` rather than taken for a new device.
    fn expiry(&self, now: DateTime) -> DateTime {
        DateTime::from_millis(now.timestamp_millis() + 2 * self.retention.as_millis() as i64)
    }

    /// Devices seen since then are current (listed, counted, caught up).
    fn current_since(&self, now: DateTime) -> DateTime {
        DateTime::from_millis(now.timestamp_millis() - self.retention.as_millis() as i64)
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeviceDoc {
    user: String,
    device: String,
    first_seen: DateTime,
    last_seen: DateTime,
    /// Every message of the user at or below this id is done for the device.
    floor: ObjectId,
    /// The floor it was registered with (or started over from). Missing in documents
    /// written before it was kept: the floor stands in (reads a wider range, same result).
    #[serde(default)]
    origin: Option<ObjectId>,
    /// Ids above the floor that the device acknowledged (unsorted; may repeat).
    #[serde(default)]
    acked: Vec<ObjectId>,
    /// The TTL index deletes the document then.
    expire_at: DateTime,
}

impl DeviceDoc {
    /// Its origin, the floor standing in where none was kept (never above the floor).
    fn origin(&self) -> ObjectId {
        self.origin.unwrap_or(self.floor).min(self.floor)
    }
}

/// A device's catch-up state as its join reads it.
#[derive(Debug, Clone)]
pub struct Catchup {
    pub device: DeviceId,
    pub floor: ObjectId,
    /// The floor it started from. Between it and the floor, every message was acknowledged
    /// by this device (the floor only passes those), so the only messages below the floor a
    /// join still sends — undelivered, or overdue for an ack — are below this.
    pub origin: ObjectId,
    pub acked: HashSet<ObjectId>,
    /// Away longer than the retention: what it missed may be gone; its state starts over.
    pub missed_history: bool,
}

impl Catchup {
    /// A device starting at `floor` with nothing acknowledged above it.
    fn fresh(device: &DeviceId, floor: ObjectId, missed_history: bool) -> Self {
        Catchup {
            device: device.clone(),
            floor,
            origin: floor,
            acked: HashSet::new(),
            missed_history,
        }
    }

    pub fn bounds(&self) -> DeviceBounds<'_> {
        DeviceBounds {
            device: self.device.as_str(),
            origin: self.origin,
            floor: self.floor,
        }
    }
}

/// Where a device's catch-up stands ([`Catchup`]'s ids): what a join's reads are bounded by.
#[derive(Debug, Clone, Copy)]
pub struct DeviceBounds<'a> {
    pub device: &'a str,
    /// The floor it started from: below it, what is undelivered is sent.
    pub origin: ObjectId,
    /// Above it, everything it has not acknowledged is sent.
    pub floor: ObjectId,
}

/// A device as `GET /api/users/{userId}/devices` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceView {
    pub device_id: String,
    pub first_seen: String,
    pub last_seen: String,
    /// Messages it has not received: the user's messages above its floor, received or
    /// sent from another device, that it did not acknowledge.
    pub pending: u64,
}

fn key(user: &str, device: &str) -> Document {
    doc! {"user": user, "device": device}
}

impl Store {
    /// The unique key of a device and the TTL that forgets it (the document carries its
    /// own expiry, so a changed retention needs no index change).
    pub async fn ensure_device_indexes(&self) -> Result<(), StoreError> {
        let unique = IndexModel::builder()
            .keys(doc! {"user": 1, "device": 1})
            .options(
                IndexOptions::builder()
                    .name(DEVICE_KEY_INDEX.to_owned())
                    .unique(true)
                    .build(),
            )
            .build();
        let ttl = IndexModel::builder()
            .keys(doc! {"expireAt": 1})
            .options(
                IndexOptions::builder()
                    .name(DEVICE_TTL_INDEX.to_owned())
                    .expire_after(Duration::ZERO)
                    .build(),
            )
            .build();
        self.devices.create_indexes([unique, ttl]).await?;
        Ok(())
    }

    /// A device's join: marks it seen and returns its catch-up state, registering it at
    /// its first join (within the user's device limit) and starting it over when it was
    /// away longer than the retention.
    pub async fn register_device(
        &self,
        user: &str,
        device: &DeviceId,
        policy: DevicePolicy,
    ) -> Result<Catchup, StoreError> {
        let now = DateTime::now();
        let seen = doc! {"$set": {"lastSeen": now, "expireAt": policy.expiry(now)}};
        // Marking a known device seen is bookkeeping on the scale of the retention (a
        // lastSeen lost in a failover only makes the device look seen a little earlier):
        // acknowledged by the primary alone, so the join does not wait for a journal sync.
        // Its state (floor, acked set) is written with majority where it changes.
        let before = self
            .devices
            .find_one_and_update(key(user, device.as_str()), seen)
            .return_document(ReturnDocument::Before)
            .write_concern(WriteConcern::nodes(1))
            .await?;
        if let Some(before) = before {
            let before: DeviceDoc = mongodb::bson::from_document(before)?;
            if !missed_history(before.last_seen, now, policy.retention) {
                return Ok(Catchup {
                    device: device.clone(),
                    floor: before.floor,
                    origin: before.origin(),
                    acked: before.acked.into_iter().collect(),
                    missed_history: false,
                });
            }
            let floor = skew_cap(now, policy.skew);
            self.devices
                .update_one(
                    key(user, device.as_str()),
                    doc! {"$set": {"floor": floor, "origin": floor, "acked": []}},
                )
                .await?;
            return Ok(Catchup::fresh(device, floor, true));
        }
        let current = self
            .devices
            .count_documents(doc! {"user": user, "lastSeen": {"$gte": policy.current_since(now)}})
            .hint(Hint::Name(DEVICE_KEY_INDEX.into()))
            .await?;
        if current >= policy.max_per_user as u64 {
            return Err(StoreError::TooManyDevices(policy.max_per_user));
        }
        let floor = skew_cap(now, policy.skew);
        // Two sockets of a new device may register at once: one inserts, both read it.
        let registered = self
            .devices
            .find_one_and_update(
                key(user, device.as_str()),
                doc! {
                    "$set": {"lastSeen": now, "expireAt": policy.expiry(now)},
                    "$setOnInsert": {"firstSeen": now, "floor": floor, "origin": floor, "acked": []},
                },
            )
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await?;
        let floor = registered
            .and_then(|d| d.get_object_id("floor").ok())
            .unwrap_or(floor);
        Ok(Catchup::fresh(device, floor, false))
    }

    /// Records the acks of a record batch's devices in one `update` command, a statement
    /// per device, unordered: one round trip and one majority wait however many devices
    /// acked (a separate write per device held every other write back, BENCHMARKS.md
    /// "Devices"). Returns each device's outcome, in order. A forgotten device records
    /// nothing: its next join registers it again.
    pub async fn record_device_acks(
        &self,
        acks: &[(&str, &str, &[ObjectId])],
        policy: DevicePolicy,
    ) -> Vec<Result<(), StoreError>> {
        if acks.is_empty() {
            return Vec::new();
        }
        let now = DateTime::now();
        let updates: Vec<Document> = acks
            .iter()
            .map(|(user, device, ids)| {
                doc! {"q": key(user, device), "u": {
                    "$push": {"acked": {"$each": *ids, "$slice": -MAX_ACKED}},
                    "$set": {"lastSeen": now, "expireAt": policy.expiry(now)},
                }}
            })
            .collect();
        let command = doc! {
            "update": DEVICES, "updates": updates, "ordered": false,
            "writeConcern": {"w": "majority"},
        };
        // Retried once, as the driver retries a write: a repeated `$push` only repeats
        // ids in the set, which may repeat.
        let reply = match self.db.run_command(command.clone()).await {
            Err(e) if is_transient(&e) => self.db.run_command(command).await,
            reply => reply,
        };
        statement_outcomes(reply, acks.len())
    }

    /// Moves a device's floor past what it acknowledged, up to the skew cap, and drops
    /// those ids from its acked set: what keeps the set, and the range a join reads,
    /// small. Returns whether the floor moved.
    pub async fn advance_device_floor(
        &self,
        user: &str,
        device: &str,
        policy: DevicePolicy,
    ) -> Result<bool, StoreError> {
        let Some(doc) = self.devices.find_one(key(user, device)).await? else {
            return Ok(false);
        };
        let state: DeviceDoc = mongodb::bson::from_document(doc)?;
        let mut cap = skew_cap(DateTime::now(), policy.skew);
        if state.floor >= cap {
            return Ok(false);
        }
        let range = doc! {"$gt": state.floor, "$lte": cap};
        let (received, sent) = futures::try_join!(
            self.ids_in(received_above(user, range.clone()), DRAIN_INDEX),
            self.ids_in(sent_above(user, device, range), SENDER_INDEX),
        )?;
        // A side cut by its limit is known only up to its last id.
        for side in [&received, &sent] {
            if side.len() as i64 >= FLOOR_READ {
                if let Some(last) = side.last() {
                    cap = cap.min(*last);
                }
            }
        }
        let mut ids = received;
        ids.extend(sent);
        ids.sort();
        let acked: HashSet<ObjectId> = state.acked.into_iter().collect();
        let Some(floor) = next_floor(state.floor, cap, &ids, &acked, true) else {
            return Ok(false);
        };
        self.devices
            .update_one(
                key(user, device),
                doc! {"$max": {"floor": floor}, "$pull": {"acked": {"$lte": floor}}},
            )
            .await?;
        Ok(true)
    }

    async fn ids_in(&self, filter: Document, index: &str) -> Result<Vec<ObjectId>, StoreError> {
        let docs: Vec<Document> = self
            .raw
            .find(filter)
            .sort(doc! {"_id": 1})
            .projection(doc! {"_id": 1})
            .limit(FLOOR_READ)
            .hint(Hint::Name(index.into()))
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| d.get_object_id("_id").ok())
            .collect())
    }

    /// `user`'s current devices, by id, each with what it has not received.
    pub async fn devices_of(
        &self,
        user: &str,
        policy: DevicePolicy,
    ) -> Result<Vec<DeviceView>, StoreError> {
        let since = policy.current_since(DateTime::now());
        let docs: Vec<Document> = self
            .devices
            .find(doc! {"user": user, "lastSeen": {"$gte": since}})
            .sort(doc! {"device": 1})
            .hint(Hint::Name(DEVICE_KEY_INDEX.into()))
            .await?
            .try_collect()
            .await?;
        let mut views = Vec::with_capacity(docs.len());
        for doc in docs {
            let d: DeviceDoc = mongodb::bson::from_document(doc)?;
            let pending = self.not_received(user, &d).await?;
            views.push(DeviceView {
                device_id: d.device,
                first_seen: rfc3339(d.first_seen),
                last_seen: rfc3339(d.last_seen),
                pending,
            });
        }
        Ok(views)
    }

    /// Messages above the device's floor it did not acknowledge, and the undelivered
    /// ones below its origin (what its next join sends, the overdue re-sends aside).
    async fn not_received(&self, user: &str, d: &DeviceDoc) -> Result<u64, StoreError> {
        let not_acked = doc! {"$gt": d.floor, "$nin": &d.acked};
        let count = |filter: Document, index: &str| {
            self.raw
                .count_documents(filter)
                .hint(Hint::Name(index.into()))
                .into_future()
        };
        let (received, sent, below) = futures::try_join!(
            count(received_above(user, not_acked.clone()), DRAIN_INDEX),
            count(sent_above(user, &d.device, not_acked), SENDER_INDEX),
            count(
                doc! {"receiver": user, "delivered": false, "_id": {"$lte": d.origin()}},
                DRAIN_INDEX
            ),
        )?;
        Ok(received + sent + below)
    }

    /// Forgets one device; false when there was none.
    pub async fn forget_device(&self, user: &str, device: &str) -> Result<bool, StoreError> {
        let r = self.devices.delete_one(key(user, device)).await?;
        Ok(r.deleted_count > 0)
    }

    /// Current devices of all users (buffer statistics).
    pub async fn count_devices(&self, policy: DevicePolicy) -> Result<u64, StoreError> {
        // lastSeen >= since, read from the TTL index: expireAt is lastSeen + 2 retentions.
        let since = policy.expiry(policy.current_since(DateTime::now()));
        Ok(self
            .devices
            .count_documents(doc! {"expireAt": {"$gte": since}})
            .hint(Hint::Name(DEVICE_TTL_INDEX.into()))
            .await?)
    }
}

/// Each statement's outcome in the reply of an unordered write command: the command's own
/// failure and a write-concern error count for all, a write error for its statement.
fn statement_outcomes(
    reply: Result<Document, mongodb::error::Error>,
    n: usize,
) -> Vec<Result<(), StoreError>> {
    let failed = |message: &str, transient: bool| StoreError::Statement {
        message: message.to_owned(),
        transient,
    };
    let reply = match reply {
        Ok(reply) => reply,
        Err(e) => return (0..n).map(|_| Err(StoreError::Mongo(e.clone()))).collect(),
    };
    if let Ok(wce) = reply.get_document("writeConcernError") {
        let message = wce
            .get_str("errmsg")
            .unwrap_or("write concern not satisfied");
        return (0..n).map(|_| Err(failed(message, true))).collect();
    }
    let mut out: Vec<Result<(), StoreError>> = (0..n).map(|_| Ok(())).collect();
    for e in reply.get_array("writeErrors").into_iter().flatten() {
        let Some(e) = e.as_document() else { continue };
        let index = e
            .get_i32("index")
            .ok()
            .and_then(|i| usize::try_from(i).ok());
        if let Some(slot) = index.and_then(|i| out.get_mut(i)) {
            *slot = Err(failed(e.get_str("errmsg").unwrap_or("write error"), false));
        }
    }
    out
}

/// Messages to `user` whose `_id` matches `range`, from [`DRAIN_INDEX`] (both `delivered`
/// values, merged in `_id` order).
pub(super) fn received_above(user: &str, range: Document) -> Document {
    doc! {"receiver": user, "delivered": {"$in": [false, true]}, "_id": range}
}

/// Messages `user` sent from anything but `device` whose `_id` matches `range`, from
/// [`SENDER_INDEX`].
pub(super) fn sent_above(user: &str, device: &str, range: Document) -> Document {
    doc! {"sender": user, "_id": range, "senderDevice": {"$ne": device}}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_error_fails_its_statement_and_a_write_concern_error_fails_all() {
        let reply =
            doc! {"ok": 1, "n": 2, "writeErrors": [{"index": 1, "code": 2, "errmsg": "bad"}]};
        let out = statement_outcomes(Ok(reply), 3);
        assert!(out[0].is_ok() && out[2].is_ok());
        assert!(matches!(
            &out[1],
            Err(StoreError::Statement {
                transient: false,
                ..
            })
        ));

        let reply = doc! {"ok": 1, "n": 3, "writeConcernError": {"code": 64, "errmsg": "timeout"}};
        let out = statement_outcomes(Ok(reply), 3);
        assert!(out
            .iter()
            .all(|r| r.as_ref().is_err_and(StoreError::is_unavailable)));

        let out = statement_outcomes(Ok(doc! {"ok": 1, "n": 2}), 2);
        assert!(out.iter().all(Result::is_ok));
    }
}
