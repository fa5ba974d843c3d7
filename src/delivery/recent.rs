//! Sends accepted lately, so that a client repeating a `clientMsgId` (a retry, or a
//! flood) is answered from memory: an ordered `insertMany` stops at a duplicate, and
//! resolving it costs a read, in a shard other senders share.
//!
//! Only an optimisation: a miss (another instance, an entry aged out) goes to MongoDB,
//! where the unique index keeps the send idempotent.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::protocol::Accepted;

/// Entries kept, at most.
const CAPACITY: usize = 10_000;
/// A retry comes within seconds; an older entry may describe a message that was since
/// cleared, which a repeat should then store again.
const MAX_AGE: Duration = Duration::from_secs(60);

type Key = (String, String);

#[derive(Default)]
pub struct RecentAccepts {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_key: HashMap<Key, (Accepted, Instant)>,
    order: VecDeque<(Key, Instant)>,
}

impl RecentAccepts {
    pub fn get(&self, key: &Key) -> Option<Accepted> {
        let inner = self.inner.lock().ok()?;
        let (accepted, at) = inner.by_key.get(key)?;
        (at.elapsed() < MAX_AGE).then(|| accepted.clone())
    }

    pub fn insert(&self, key: Key, accepted: Accepted) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let now = Instant::now();
        inner.evict(now);
        if inner.by_key.insert(key.clone(), (accepted, now)).is_none() {
            inner.order.push_back((key, now));
        }
    }
}

impl Inner {
    fn evict(&mut self, now: Instant) {
        while let Some((key, at)) = self.order.front() {
            if self.order.len() < CAPACITY && now.duration_since(*at) < MAX_AGE {
                break;
            }
            if self.by_key.get(key).is_some_and(|(_, t)| t == at) {
                self.by_key.remove(key);
            }
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(id: &str) -> Accepted {
        Accepted {
            id: id.to_owned(),
            client_msg_id: Some("k".into()),
            timestamp: "t".into(),
        }
    }

    #[test]
    fn a_repeat_is_answered_with_the_first_id_and_the_set_stays_bounded() {
        let recent = RecentAccepts::default();
        let key = ("alice".to_owned(), "k".to_owned());
        assert!(recent.get(&key).is_none());
        recent.insert(key.clone(), accepted("first"));
        assert_eq!(recent.get(&key).map(|a| a.id), Some("first".to_owned()));
        for i in 0..CAPACITY {
            recent.insert(("bob".into(), i.to_string()), accepted("other"));
        }
        assert!(recent.get(&key).is_none(), "the oldest entry went first");
        let inner = recent.inner.lock().expect("lock");
        assert!(inner.by_key.len() <= CAPACITY && inner.order.len() <= CAPACITY);
    }
}
