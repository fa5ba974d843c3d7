//! Acks: each `ack` frame goes to the record loop at once (bounded by the ids not yet
//! recorded), and is answered, in order, once written.

use std::pin::Pin;

use futures::Future;
use mongodb::bson::oid::ObjectId;

use super::{CallId, Out, Session};
use crate::error::Error;
use crate::protocol::AckIds;
use crate::store::StoreError;

/// Acked ids handed to delivery and not yet recorded before the session stops reading.
/// Each ack frame goes to the record loop at once, where it merges with other frames'
/// acks (one `$in` per user) and, when it comes within the loop's linger, with the claim of
/// its message (one write for both); waiting here for earlier acks would only delay it.
pub(super) const MAX_UNRECORDED_ACKS: usize = 4 * crate::protocol::MAX_ACK_IDS;

pub(super) type AckWrite = Pin<Box<dyn Future<Output = AckWritten> + Send>>;

/// One ack frame's write, done.
pub(super) struct AckWritten {
    result: Result<(), StoreError>,
    /// How many ids it recorded (for the unrecorded-acks bound and the call's answer).
    ids: usize,
    call: Option<CallId>,
}

impl Session {
    pub(super) fn ack(&mut self, ack: AckIds, call: Option<CallId>) {
        let parsed: Result<Vec<ObjectId>, _> = ack.ids.iter().map(ObjectId::parse_str).collect();
        let Ok(ids) = parsed else {
            return self.refuse(Error::bad_request("`ids` must be 24-hex message ids"), call);
        };
        if let Err(e) = self.limits.check_acks(ids.len()) {
            self.state.metrics().rate_limited.increment(1);
            return self.reply_error(e, call);
        }
        if ids.is_empty() {
            // Nothing to write: answered at once, not held behind other writes.
            if let Some(call) = call {
                self.outbox.push(acked_answer(call, 0));
            }
            return;
        }
        let n = ids.len();
        if let Some(drain) = self.drain.as_mut() {
            drain.pace.acked(n, std::time::Instant::now());
        }
        self.unrecorded_acks += n;
        let state = self.state.clone();
        let user = self.claims.sub.clone();
        let device = self.device.clone();
        self.ack_writes.push_back(Box::pin(async move {
            let result = state.delivery.ack(user, device, ids).await;
            AckWritten {
                result,
                ids: n,
                call,
            }
        }));
    }

    pub(super) fn ack_written(&mut self, written: AckWritten) {
        self.unrecorded_acks -= written.ids;
        match (written.result, written.call) {
            (Ok(()), Some(call)) => self.outbox.push(acked_answer(call, written.ids)),
            (Ok(()), None) => {}
            (Err(e), call) => self.reply_error(Error::from(e), call),
        }
    }
}

fn acked_answer(call: CallId, acked: usize) -> Out {
    Out::Answer(call, format!(r#"{{"acked":{acked}}}"#).into())
}
