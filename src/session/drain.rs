//! A join's drain in progress: the pending cursor, the live pushes that arrived meanwhile
//! (held, to be merged in by id so one sender's messages keep their order), and the
//! deliveries still to record.

use std::borrow::Borrow;
use std::collections::VecDeque;

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
            _turn: turn,
        }
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
