//! Devices: a user's phone, laptop or tablet, each with its own catch-up (see
//! docs/PROTOCOL.md, "Devices"). This module holds the rules; [`crate::store`] keeps the
//! state (`devices` collection) and the session core applies them.
//!
//! A device's state is a **floor** and an **acked set**: every message of the user whose
//! `_id` is at or below the floor is done for the device (acknowledged by it, or older
//! than its registration), and the acked set lists the ids above the floor it
//! acknowledged. A join sends the user's messages above the floor that are not in the set,
//! oldest first. ObjectIds are not in commit order across instances, so the floor never
//! passes an id younger than the skew window ([`skew_cap`]): every message with an older
//! id was committed (and visible) before the floor moved past it.

use std::time::Duration;

use mongodb::bson::oid::ObjectId;
use mongodb::bson::DateTime;

/// A client's stable name for one of its user's devices: 1..=64 characters of
/// `[A-Za-z0-9_.:-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceId(String);

impl DeviceId {
    pub const RULE: &'static str = "`deviceId` is 1..=64 characters of [A-Za-z0-9_.:-]";

    /// The id, or `None` when it breaks [`DeviceId::RULE`].
    pub fn parse(s: &str) -> Option<Self> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
        ok.then(|| DeviceId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        DeviceId::parse(&s).ok_or_else(|| serde::de::Error::custom(Self::RULE))
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The highest floor allowed at `now`: the smallest ObjectId of the second `skew` ago. Also
/// the floor a device starts from, so that what was accepted just before its first join but
/// committed after it still reaches it.
/// A message is accepted within `skew` of its id's time (msgbuf makes the id when the
/// send arrives, and an accept that took longer is caught up explicitly), so once the
/// floor is at most this, every message below it is committed and a read sees it.
pub fn skew_cap(now: DateTime, skew: Duration) -> ObjectId {
    let millis = now.timestamp_millis() - skew.as_millis() as i64;
    oid_at_or_after(millis.max(0) / 1000)
}

/// The smallest ObjectId whose time is `secs` (seconds since the epoch).
fn oid_at_or_after(secs: i64) -> ObjectId {
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(&(secs.clamp(0, u32::MAX as i64) as u32).to_be_bytes());
    ObjectId::from_bytes(bytes)
}

/// Whether a device last seen at `last_seen` may have lost messages to the retention:
/// its `joined` then says `missedHistory`, and its catch-up starts afresh.
pub fn missed_history(last_seen: DateTime, now: DateTime, retention: Duration) -> bool {
    now.timestamp_millis() - last_seen.timestamp_millis() > retention.as_millis() as i64
}

/// Where a device's floor can move: past every id of `ids` (the user's messages above the
/// current floor, in `_id` order, up to `cap`) until the first one the device has not
/// acknowledged. `complete` says `ids` holds every such message up to `cap` (a read that
/// was not cut by its limit): then, with nothing unacknowledged, the floor goes to `cap`.
/// Returns `None` when the floor stays.
pub fn next_floor(
    floor: ObjectId,
    cap: ObjectId,
    ids: &[ObjectId],
    acked: &std::collections::HashSet<ObjectId>,
    complete: bool,
) -> Option<ObjectId> {
    let mut reached = floor;
    for id in ids.iter().copied().filter(|id| *id > floor && *id <= cap) {
        if !acked.contains(&id) {
            return (reached > floor).then_some(reached);
        }
        reached = id;
    }
    if complete && cap > reached {
        reached = cap;
    }
    (reached > floor).then_some(reached)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn oid(secs: u32, n: u8) -> ObjectId {
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&secs.to_be_bytes());
        b[11] = n;
        ObjectId::from_bytes(b)
    }

    #[test]
    fn device_ids_follow_the_rule() {
        assert!(DeviceId::parse("phone-1:a_b.c").is_some());
        assert!(DeviceId::parse(&"x".repeat(64)).is_some());
        for bad in ["", &"x".repeat(65), "a b", "ü", "a/b", "a\"b"] {
            assert!(DeviceId::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn the_cap_is_the_first_id_of_the_second_skew_ago() {
        let now = DateTime::from_millis(100_500);
        let cap = skew_cap(now, Duration::from_secs(30));
        assert_eq!(cap, oid(70, 0));
        assert!(oid(69, 255) < cap && cap <= oid(70, 0));
    }

    #[test]
    fn the_floor_stops_at_the_first_unacknowledged_message() {
        let (floor, cap) = (oid(10, 0), oid(100, 0));
        let ids = [oid(11, 1), oid(12, 1), oid(13, 1), oid(14, 1)];
        let acked: HashSet<_> = [ids[0], ids[1], ids[3]].into();
        assert_eq!(
            next_floor(floor, cap, &ids, &acked, true),
            Some(ids[1]),
            "ids[2] is not acknowledged: the floor waits below it"
        );
        let unacked_first: HashSet<_> = [ids[1]].into();
        assert_eq!(next_floor(floor, cap, &ids, &unacked_first, true), None);
    }

    #[test]
    fn the_floor_never_passes_the_skew_cap() {
        let (floor, cap) = (oid(10, 0), oid(12, 0));
        let ids = [oid(11, 1), oid(13, 1)];
        let acked: HashSet<_> = ids.into();
        assert_eq!(next_floor(floor, cap, &ids, &acked, true), Some(cap));
        assert_eq!(
            next_floor(floor, cap, &ids, &acked, false),
            Some(ids[0]),
            "a read cut by its limit moves the floor only past what it saw"
        );
        assert_eq!(next_floor(floor, cap, &[], &acked, true), Some(cap));
        assert_eq!(
            next_floor(cap, floor, &[], &acked, true),
            None,
            "never back"
        );
    }

    #[test]
    fn a_device_away_longer_than_the_retention_missed_history() {
        let day = Duration::from_secs(86_400);
        let seen = DateTime::from_millis(0);
        assert!(!missed_history(
            seen,
            DateTime::from_millis(86_400_000),
            day
        ));
        assert!(missed_history(seen, DateTime::from_millis(86_400_001), day));
    }
}
