//! A join's drain in progress: the pending cursor, the live pushes that arrived meanwhile
//! (held, to be merged in by id so one sender's messages keep their order), and the
//! deliveries still to record.

use std::borrow::Borrow;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use mongodb::bson::{oid::ObjectId, DateTime};
use tokio::sync::OwnedSemaphorePermit;

use crate::presence::{Outbound, Queued};
use crate::store::Pending;

pub struct Drain {
    pub cursor: Pending,
    /// Live frames queued during the drain, in queue order (still counted against the
    /// socket's queue bound).
    pub held: VecDeque<Queued>,
    /// Written, undelivered: to claim (at the end of each step of the drain).
    pub claim: Vec<ObjectId>,
    /// Written again after their ack timeout: to record as re-sent.
    pub resent: Vec<ObjectId>,
    /// Pushes before this are overdue (fixed at the join, like the query's filter).
    pub cutoff: DateTime,
    /// How far the drain is ahead of its client's acks.
    pub pace: Pace,
    /// The user's drain turn on this instance (a large drain's), held until the drain ends.
    _turn: Option<OwnedSemaphorePermit>,
}

impl Drain {
    pub fn new(
        cursor: Pending,
        cutoff: DateTime,
        held: VecDeque<Queued>,
        turn: Option<OwnedSemaphorePermit>,
    ) -> Self {
        Drain {
            cursor,
            held,
            claim: Vec::new(),
            resent: Vec::new(),
            cutoff,
            pace: Pace::default(),
            _turn: turn,
        }
    }
}

/// Drained messages a client that acks as it reads may leave unacknowledged before the
/// drain waits for its acks. Without a bound the drain runs as far ahead as the socket
/// buffers hold (tens of thousands of messages on loopback), each message then reaches
/// the client, and its ack the record loop, seconds after its claim: past the claim's hold,
/// so claim and ack become two writes (BENCHMARKS.md, "Backlog"). 1,024 messages keep a
/// client reading a few thousand a second well inside the hold, and are far more than a
/// round trip's worth.
pub const AHEAD: usize = 1024;
/// A client that acked before but has not for this long no longer paces the drain (its
/// claims go alone after their hold anyway).
pub const ACK_STALL: Duration = Duration::from_millis(500);

/// Messages drained and acks read during a drain.
#[derive(Debug, Default)]
pub struct Pace {
    drained: usize,
    acked: usize,
    last_ack: Option<Instant>,
}

impl Pace {
    pub fn drained(&mut self, n: usize) {
        self.drained += n;
    }

    pub fn acked(&mut self, n: usize, now: Instant) {
        self.acked += n;
        self.last_ack = Some(now);
    }

    /// Whether the drain may write its next step: always for a client that has not acked
    /// during it (one that does not ack as it reads is not held back), else while it is
    /// less than [`AHEAD`] ahead of the acks, or once they stalled.
    pub fn may_go_on(&self, now: Instant) -> bool {
        let Some(last_ack) = self.last_ack else {
            return true;
        };
        self.drained.saturating_sub(self.acked) < AHEAD || now >= last_ack + ACK_STALL
    }
}

/// The front of `held` if it may go out before drained message `next`: receipts and other
/// frames always, chat messages with a smaller id (inserted earlier).
pub fn pop_before<T: Borrow<Outbound>>(held: &mut VecDeque<T>, next: ObjectId) -> Option<T> {
    let ready = match held.front()?.borrow() {
        Outbound::Frame(_) => true,
        Outbound::Chat { id, .. } => *id < next,
    };
    ready.then(|| held.pop_front()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(id: ObjectId) -> Outbound {
        Outbound::Chat {
            id,
            frame: "chat".into(),
        }
    }

    #[test]
    fn a_drain_waits_for_a_client_that_acks_but_not_for_one_that_does_not() {
        let t0 = Instant::now();
        let mut pace = Pace::default();
        pace.drained(5 * AHEAD);
        assert!(pace.may_go_on(t0), "no ack yet: not paced");
        pace.acked(1, t0);
        assert!(!pace.may_go_on(t0), "far ahead of its acks");
        pace.acked(4 * AHEAD, t0);
        assert!(pace.may_go_on(t0), "within the window again");
        pace.drained(AHEAD);
        assert!(!pace.may_go_on(t0 + ACK_STALL - Duration::from_millis(1)));
        assert!(pace.may_go_on(t0 + ACK_STALL), "its acks stalled");
    }

    #[test]
    fn held_pushes_go_out_in_id_order_around_drained_messages() {
        let ids: Vec<ObjectId> = (0..3).map(|_| ObjectId::new()).collect();
        let mut held = VecDeque::from([
            Outbound::Frame("receipt".into()),
            chat(ids[0]),
            chat(ids[2]),
        ]);
        assert!(matches!(
            pop_before(&mut held, ids[1]),
            Some(Outbound::Frame(_))
        ));
        assert!(
            matches!(pop_before(&mut held, ids[1]), Some(Outbound::Chat { id, .. }) if id == ids[0])
        );
        assert!(pop_before(&mut held, ids[1]).is_none(), "a later id waits");
        assert_eq!(held.len(), 1);
    }
}
