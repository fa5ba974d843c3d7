//! Claims held back by the record loop until their receiver's ack comes, so that the claim
//! and the ack go in one write: one document rewrite, one oplog entry and one change event
//! per message instead of two, and the message never enters the unacked index.
//!
//! A client that acks as it reads acks within a round trip, but once the loop is behind (a
//! large drain: claims queue by the page, acks one by one after them) an ack reaches the
//! loop rounds after its claim; the 15 ms linger alone paired only some of them
//! (BENCHMARKS.md, "Backlog"). A claim is held up to [`CLAIM_HOLD`] (less when the ack
//! timeout is short: the sweep re-pushes what is still undelivered after it), then written
//! alone: a client that does not ack has its deliveries recorded that much later.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use mongodb::bson::oid::ObjectId;

use super::records::Claim;

/// How long a claim may wait for its ack.
pub const CLAIM_HOLD: Duration = Duration::from_secs(1);
/// Claims held at most: past this the oldest are written without waiting (bounds the
/// loop's memory, like its queue).
const MAX_HELD: usize = 16_000;

pub struct HeldClaims {
    hold: Duration,
    by_id: HashMap<ObjectId, Claim>,
    /// Ids in arrival order, so in deadline order; an id paired meanwhile is skipped.
    order: VecDeque<(Instant, ObjectId)>,
}

impl HeldClaims {
    /// Claims wait at most `hold`: [`CLAIM_HOLD`], or a quarter of the ack timeout when
    /// that is shorter.
    pub fn new(ack_timeout: Duration) -> Self {
        HeldClaims {
            hold: CLAIM_HOLD.min(ack_timeout / 4),
            by_id: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Holds `claims`, each from when it was queued. A repeated id (a second push of one
    /// message) keeps its first deadline.
    pub fn add(&mut self, claims: Vec<(Instant, Claim)>) {
        for (at, claim) in claims {
            let id = claim.id;
            if self.by_id.insert(id, claim).is_none() {
                self.order.push_back((at, id));
            }
        }
    }

    /// The held claims that `acks` acknowledge, each only by its receiver (a socket acks
    /// only its own user's messages).
    pub fn take_acked(&mut self, acks: &[(&str, &[ObjectId])]) -> Vec<Claim> {
        let mut out = Vec::new();
        for (user, ids) in acks {
            for id in *ids {
                if self.by_id.get(id).is_some_and(|c| c.receiver == *user) {
                    out.extend(self.by_id.remove(id));
                }
            }
        }
        out
    }

    /// The held claims of `user`: a device of theirs left, and what was pushed to it
    /// unacked must read as delivered (so as `redelivery`) when it joins again.
    pub fn take_of(&mut self, user: &str) -> Vec<Claim> {
        self.by_id
            .extract_if(|_, c| c.receiver == user)
            .map(|(_, c)| c)
            .collect()
    }

    /// The claims whose hold ended by `read_up_to` (the loop has read every record queued
    /// until then, so their acks did not come in time), all of them when `all`, oldest
    /// first, and the oldest beyond the bound.
    pub fn take_due(&mut self, read_up_to: Instant, all: bool) -> Vec<Claim> {
        let mut out = Vec::new();
        while let Some(&(at, id)) = self.order.front() {
            if !self.by_id.contains_key(&id) {
                self.order.pop_front();
                continue;
            }
            let due = all || at + self.hold <= read_up_to || self.by_id.len() > MAX_HELD;
            if !due {
                break;
            }
            self.order.pop_front();
            out.extend(self.by_id.remove(&id));
        }
        out
    }

    /// When the oldest claim must be written (`None`: nothing is held). May be early when
    /// that claim was paired meanwhile: the loop then writes nothing and asks again.
    pub fn due(&self) -> Option<Instant> {
        self.order.front().map(|(at, _)| *at + self.hold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::DeliveryPath;

    fn at(t: Instant, claims: Vec<Claim>) -> Vec<(Instant, Claim)> {
        claims.into_iter().map(|c| (t, c)).collect()
    }

    fn claim(receiver: &str) -> Claim {
        Claim {
            id: ObjectId::new(),
            receiver: receiver.to_owned(),
            path: DeliveryPath::Drain,
        }
    }

    #[test]
    fn a_claim_waits_for_its_receivers_ack_and_no_one_elses() {
        let t0 = Instant::now();
        let mut held = HeldClaims::new(Duration::from_secs(30));
        let (a, b) = (claim("bob"), claim("bob"));
        held.add(at(t0, vec![a.clone(), b.clone()]));
        let by_mallory = [b.id];
        assert!(held.take_acked(&[("mallory", &by_mallory)]).is_empty());
        let by_bob = [a.id];
        assert_eq!(held.take_acked(&[("bob", &by_bob)]), vec![a]);
        assert!(held
            .take_due(t0 + Duration::from_millis(999), false)
            .is_empty());
        assert_eq!(held.take_due(t0 + CLAIM_HOLD, false), vec![b]);
        assert!(held.due().is_none());
    }

    #[test]
    fn a_leaving_user_takes_their_claims_only() {
        let t0 = Instant::now();
        let mut held = HeldClaims::new(Duration::from_secs(30));
        let (a, b) = (claim("bob"), claim("carol"));
        held.add(at(t0, vec![a.clone(), b.clone()]));
        assert_eq!(held.take_of("bob"), vec![a]);
        assert_eq!(held.take_due(t0 + CLAIM_HOLD, false), vec![b]);
    }

    #[test]
    fn a_short_ack_timeout_shortens_the_hold() {
        let t0 = Instant::now();
        let mut held = HeldClaims::new(Duration::from_secs(1));
        held.add(at(t0, vec![claim("bob")]));
        assert_eq!(held.due(), Some(t0 + Duration::from_millis(250)));
    }

    #[test]
    fn shutdown_takes_everything_and_the_bound_takes_the_oldest() {
        let t0 = Instant::now();
        let mut held = HeldClaims::new(Duration::from_secs(30));
        let first = claim("bob");
        held.add(at(t0, vec![first.clone()]));
        held.add(at(t0, (0..MAX_HELD).map(|_| claim("bob")).collect()));
        assert_eq!(held.take_due(t0, false), vec![first]);
        assert_eq!(held.take_due(t0, true).len(), MAX_HELD);
        assert!(held.due().is_none());
    }

    #[test]
    fn a_repeated_claim_is_held_once() {
        let t0 = Instant::now();
        let mut held = HeldClaims::new(Duration::from_secs(30));
        let a = claim("bob");
        held.add(at(t0, vec![a.clone()]));
        held.add(at(t0 + Duration::from_millis(500), vec![a.clone()]));
        assert_eq!(held.take_due(t0 + CLAIM_HOLD, true), vec![a]);
    }
}
