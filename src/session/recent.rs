//! The ids written on one socket lately: a live push and a drain of the same message
//! must not both reach it.

use std::collections::{HashSet, VecDeque};

use mongodb::bson::oid::ObjectId;

/// Ids remembered per socket.
const RECENT_IDS: usize = 4096;

/// The last ids written on a socket; allocates only once something was written.
#[derive(Default)]
pub struct RecentIds {
    set: HashSet<ObjectId>,
    order: VecDeque<ObjectId>,
}

impl RecentIds {
    /// False when `id` was written recently.
    pub fn insert(&mut self, id: ObjectId) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > RECENT_IDS {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_let_through_once_until_it_ages_out() {
        let mut recent = RecentIds::default();
        let first = ObjectId::new();
        assert!(recent.insert(first));
        assert!(!recent.insert(first));
        for _ in 0..RECENT_IDS {
            assert!(recent.insert(ObjectId::new()));
        }
        assert!(
            recent.insert(first),
            "forgotten after {RECENT_IDS} newer ids"
        );
    }
}
