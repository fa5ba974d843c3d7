//! Device acks held back by the record loop. A device's own receipt of a message matters
//! only at that device's next join and floor move, not to the sender (the message's ack,
//! written at once, gives the receipt), so the loop keeps them up to [`DEVICE_ACK_LINGER`]
//! and writes one statement per device for all its acks meanwhile: at 5 messages a second
//! per device that is one statement a second instead of one per ack (BENCHMARKS.md,
//! "Devices"). A device's socket ending writes them at once, before its floor moves.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mongodb::bson::oid::ObjectId;

use crate::device::DeviceId;

/// How long a device ack may wait for others of its device. A device that drops without
/// closing and rejoins elsewhere within this may get what it acked in the last second
/// again (unflagged: its message was acked); a clean close loses nothing of it.
pub const DEVICE_ACK_LINGER: Duration = Duration::from_secs(1);
/// Ids held at most: past this they are written at once (bounds the loop's memory).
const MAX_HELD_IDS: usize = 20_000;

/// The acks waiting, per device.
#[derive(Default)]
pub struct DeviceAcks {
    by_device: HashMap<(String, DeviceId), Vec<ObjectId>>,
    ids: usize,
    /// When the oldest waiting ack came.
    since: Option<Instant>,
}

impl DeviceAcks {
    pub fn add(&mut self, user: &str, device: &DeviceId, ids: &[ObjectId], now: Instant) {
        if ids.is_empty() {
            return;
        }
        self.by_device
            .entry((user.to_owned(), device.clone()))
            .or_default()
            .extend_from_slice(ids);
        self.ids += ids.len();
        self.since.get_or_insert(now);
    }

    /// When they must be written (`None`: nothing waits).
    pub fn due(&self) -> Option<Instant> {
        self.since.map(|since| since + DEVICE_ACK_LINGER)
    }

    /// Whether they must be written now.
    pub fn is_due(&self, now: Instant) -> bool {
        self.ids >= MAX_HELD_IDS || self.due().is_some_and(|due| due <= now)
    }

    pub fn is_empty(&self) -> bool {
        self.by_device.is_empty()
    }

    /// Everything waiting, one entry per device; leaves nothing behind.
    pub fn take(&mut self) -> Vec<((String, DeviceId), Vec<ObjectId>)> {
        self.ids = 0;
        self.since = None;
        self.by_device.drain().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(s: &str) -> DeviceId {
        DeviceId::parse(s).expect("device id")
    }

    #[test]
    fn acks_wait_one_linger_from_the_first_and_go_out_one_entry_per_device() {
        let t0 = Instant::now();
        let mut held = DeviceAcks::default();
        assert_eq!(held.due(), None);
        let (a, b, c) = (ObjectId::new(), ObjectId::new(), ObjectId::new());
        held.add("bob", &device("phone"), &[a], t0);
        held.add(
            "bob",
            &device("phone"),
            &[b],
            t0 + Duration::from_millis(500),
        );
        held.add(
            "bob",
            &device("laptop"),
            &[c],
            t0 + Duration::from_millis(600),
        );
        assert_eq!(held.due(), Some(t0 + DEVICE_ACK_LINGER));
        assert!(!held.is_due(t0 + Duration::from_millis(999)));
        assert!(held.is_due(t0 + DEVICE_ACK_LINGER));

        let mut out = held.take();
        out.sort_by(|x, y| x.0 .1.as_str().cmp(y.0 .1.as_str()));
        assert_eq!(out[0], (("bob".into(), device("laptop")), vec![c]));
        assert_eq!(out[1], (("bob".into(), device("phone")), vec![a, b]));
        assert!(held.is_empty() && held.due().is_none());
    }

    #[test]
    fn many_held_ids_are_due_at_once() {
        let now = Instant::now();
        let mut held = DeviceAcks::default();
        let ids: Vec<ObjectId> = (0..MAX_HELD_IDS).map(|_| ObjectId::new()).collect();
        held.add("bob", &device("phone"), &ids, now);
        assert!(held.is_due(now));
    }
}
