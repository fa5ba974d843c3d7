//! What one round of the record loop writes: the pure plan (which claims go in one write
//! with their ack, which alone, which acks remain), apart from the writes themselves.

use crate::device::DeviceId;
use std::collections::{HashMap, HashSet};

use mongodb::bson::oid::ObjectId;
use tokio::sync::oneshot;

use crate::metrics::DeliveryPath;
use crate::store::StoreError;

/// A delivery to record: the message was written to a socket of `receiver`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub id: ObjectId,
    pub receiver: String,
    pub path: DeliveryPath,
}

/// A socket's acks, answered once written.
pub struct AckJob {
    pub user: String,
    /// The acking socket's device, whose own receipt of `ids` is recorded too.
    pub device: Option<DeviceId>,
    pub ids: Vec<ObjectId>,
    pub reply: oneshot::Sender<Result<(), StoreError>>,
}

/// The claims of one delivery path in a batch.
#[derive(Debug, PartialEq, Eq)]
pub struct ClaimGroup {
    pub path: DeliveryPath,
    /// Acked in the same batch by their receiver: claim and ack in one write.
    pub with_ack: Vec<ObjectId>,
    pub alone: Vec<ObjectId>,
}

/// Groups `claims` by path (in [`DeliveryPath::ALL`] order, empty paths left out) and
/// splits each into those whose receiver's ack is among `acks` and the rest.
///
/// An ack counts only from the message's receiver; checking that here keeps the write's
/// filter one shape (`_id` in a list), which MongoDB plans once.
pub fn plan_claims(claims: &[Claim], acks: &[(&str, &[ObjectId])]) -> Vec<ClaimGroup> {
    let acked_by: HashMap<ObjectId, &str> = acks
        .iter()
        .flat_map(|(user, ids)| ids.iter().map(move |id| (*id, *user)))
        .collect();
    DeliveryPath::ALL
        .into_iter()
        .filter_map(|path| {
            let mut group = ClaimGroup {
                path,
                with_ack: Vec::new(),
                alone: Vec::new(),
            };
            for claim in claims.iter().filter(|c| c.path == path) {
                if acked_by.get(&claim.id) == Some(&claim.receiver.as_str()) {
                    group.with_ack.push(claim.id);
                } else {
                    group.alone.push(claim.id);
                }
            }
            (!group.with_ack.is_empty() || !group.alone.is_empty()).then_some(group)
        })
        .collect()
}

/// The acks still to write once the ids in `done` went in with their claims, one entry per
/// user (in order of first appearance): a client that acks each message sends many
/// frames, and one `$in` per user keeps the write's `$or` short.
pub fn remaining_acks(
    acks: &[(&str, &[ObjectId])],
    done: &HashSet<ObjectId>,
) -> Vec<(String, Vec<ObjectId>)> {
    let mut by_user: Vec<(String, Vec<ObjectId>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (user, ids) in acks {
        let ids = ids.iter().filter(|id| !done.contains(*id)).copied();
        let i = *index.entry(*user).or_insert_with(|| {
            by_user.push(((*user).to_owned(), Vec::new()));
            by_user.len() - 1
        });
        by_user[i].1.extend(ids);
    }
    by_user.retain(|(_, ids)| !ids.is_empty());
    by_user
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(id: ObjectId, receiver: &str, path: DeliveryPath) -> Claim {
        Claim {
            id,
            receiver: receiver.to_owned(),
            path,
        }
    }

    #[test]
    fn a_claim_goes_with_its_ack_only_when_the_receiver_acked_it() {
        let [a, b, c] = [ObjectId::new(), ObjectId::new(), ObjectId::new()];
        let claims = [
            claim(a, "bob", DeliveryPath::Live),
            claim(b, "bob", DeliveryPath::Live),
            claim(c, "carol", DeliveryPath::Drain),
        ];
        // mallory acks bob's message: that must not count as bob's ack.
        let bob_ids = [a];
        let mallory_ids = [b];
        let acks: [(&str, &[ObjectId]); 2] = [("bob", &bob_ids), ("mallory", &mallory_ids)];
        let plan = plan_claims(&claims, &acks);
        assert_eq!(
            plan,
            vec![
                ClaimGroup {
                    path: DeliveryPath::Live,
                    with_ack: vec![a],
                    alone: vec![b],
                },
                ClaimGroup {
                    path: DeliveryPath::Drain,
                    with_ack: vec![],
                    alone: vec![c],
                },
            ]
        );
    }

    #[test]
    fn acks_written_with_their_claim_are_not_written_again() {
        let [a, b] = [ObjectId::new(), ObjectId::new()];
        let ids = [a, b];
        let only_a = [a];
        let acks: [(&str, &[ObjectId]); 2] = [("bob", &ids), ("carol", &only_a)];
        let done = HashSet::from([a]);
        assert_eq!(
            remaining_acks(&acks, &done),
            vec![("bob".to_owned(), vec![b])]
        );
        assert!(remaining_acks(&acks, &HashSet::from([a, b])).is_empty());
    }

    #[test]
    fn one_users_ack_frames_merge_into_one_entry() {
        let [a, b, c] = [ObjectId::new(), ObjectId::new(), ObjectId::new()];
        let (first, second, third) = ([a], [b], [c]);
        let acks: [(&str, &[ObjectId]); 3] = [("bob", &first), ("carol", &second), ("bob", &third)];
        assert_eq!(
            remaining_acks(&acks, &HashSet::new()),
            vec![
                ("bob".to_owned(), vec![a, c]),
                ("carol".to_owned(), vec![b])
            ]
        );
    }

    #[test]
    fn no_claims_no_groups() {
        assert!(plan_claims(&[], &[]).is_empty());
    }
}
