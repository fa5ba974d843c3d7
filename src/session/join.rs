//! A join: registering the socket (and, with a `deviceId`, the device: its catch-up
//! state), answering `joined` with the number pending, and the drain of what is pending,
//! oldest first, merged with the live pushes held meanwhile. A
//! large backlog waits for the user's drain turn on the instance, so that one user's many
//! sockets hold one drain's read-ahead, not one each.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Future, FutureExt};
use tokio::sync::OwnedSemaphorePermit;

use super::drain::{pop_before, Drain};
use super::{to_json, write_filtered, CallId, Out, Session, Step, STEP};
use crate::error::Error;
use crate::metrics::DeliveryPath;
use crate::presence::Queued;
use crate::protocol::{JoinChat, Joined, ServerFrame};
use crate::store::{overdue_cutoff, BufferedMessage, Catchup, Pending, Reader, StoreError};

/// A join's next step: counting what is pending (reading a small backlog whole), or
/// waiting for the user's drain turn and opening the stream of a large one.
pub(super) type Opening = Pin<Box<dyn Future<Output = Result<Opened, StoreError>> + Send>>;

/// The steps of a join before its drain.
pub(super) enum Opened {
    /// Counted, and small enough to be read whole: answer and drain.
    Small {
        count: u64,
        cursor: Pending,
        catchup: Option<Arc<Catchup>>,
    },
    /// Counted, too many to read whole: answer, then wait for the user's drain turn.
    Large {
        count: u64,
        catchup: Option<Arc<Catchup>>,
    },
    /// The turn came and the stream is open: drain.
    Streaming {
        turn: OwnedSemaphorePermit,
        cursor: Pending,
    },
}

/// A join between its frame and its drain.
pub(super) struct Joining {
    opening: Opening,
    /// The `join_chat` frames this join answers (a join that comes while another is opening
    /// is answered by it: the drain that follows holds what either would), and the count
    /// they are answered with once known.
    calls: Vec<Option<CallId>>,
    count: Option<u64>,
    /// A device's catch-up state, read at its registration (the stream reads by it).
    catchup: Option<Arc<Catchup>>,
    /// Live frames that arrived since the join registered (or during a drain it restarts).
    held: VecDeque<Queued>,
}

impl Session {
    /// Registers the session, answers `joined`, then starts draining pending messages
    /// oldest first. Registration comes first, so a message inserted during the drain is
    /// either in the drain or queued live (and then skipped if it was both).
    pub(super) async fn join(&mut self, join: JoinChat, call: Option<CallId>) -> Step {
        if join
            .user_id
            .as_deref()
            .is_some_and(|u| u != self.claims.sub)
        {
            self.refuse(Error::forbidden("`userId` must be the token's user"), call);
            return Step::Continue;
        }
        if let Err(e) = self.limits.check_join() {
            self.state.metrics().rate_limited.increment(1);
            self.reply_error(e, call);
            return Step::Continue;
        }
        if let Some(device) = join.device_id {
            if self.device.as_ref().is_some_and(|d| *d != device) {
                let e =
                    Error::bad_request("a socket joins as one device: `deviceId` cannot change");
                self.refuse(e, call);
                return Step::Continue;
            }
            self.device = Some(device);
            self.guard.set_device(true);
        }
        if let Some(queue) = self.guard.join(self.overflow.clone()) {
            self.queue = Some(queue);
        }
        if let Some(joining) = self.joining.as_mut() {
            joining.calls.push(call);
            return Step::Continue;
        }
        // A join during a drain starts over; what was written stays filtered by id.
        let held = match self.drain.take() {
            Some(mut drain) => {
                self.record_drained(&mut drain).await;
                std::mem::take(&mut drain.held)
            }
            None => VecDeque::new(),
        };
        self.guard.set_draining(true);
        let state = self.state.clone();
        let user = self.claims.sub.clone();
        let device = self.device.clone();
        let opening = Box::pin(async move {
            let store = state.store();
            let catchup = match device {
                Some(device) => {
                    let policy = state.config.device_policy();
                    Some(Arc::new(
                        store.register_device(&user, &device, policy).await?,
                    ))
                }
                None => None,
            };
            let reader = Reader {
                user: &user,
                ack_timeout: state.config.ack_timeout,
                device: catchup.as_deref(),
            };
            Ok(match store.open_pending(reader).await? {
                (count, Some(cursor)) => Opened::Small {
                    count,
                    cursor,
                    catchup,
                },
                (count, None) => Opened::Large { count, catchup },
            })
        });
        self.joining = Some(Joining {
            opening,
            calls: vec![call],
            count: None,
            catchup: None,
            held,
        });
        Step::Continue
    }

    /// A step of the join is done: answer `joined` once counted, drain once open.
    pub(super) fn on_opened(&mut self, opened: Result<Opened, StoreError>) {
        let Some(mut joining) = self.joining.take() else {
            return;
        };
        match opened {
            Ok(Opened::Small {
                count,
                cursor,
                catchup,
            }) => {
                self.answer_joined(count, catchup.as_deref(), &mut joining.calls);
                self.start_drain(cursor, joining.held, None);
            }
            Ok(Opened::Large { count, catchup }) => {
                self.answer_joined(count, catchup.as_deref(), &mut joining.calls);
                joining.count = Some(count);
                joining.opening = self.open_stream(catchup.clone());
                joining.catchup = catchup;
                self.joining = Some(joining);
            }
            Ok(Opened::Streaming { turn, cursor }) => {
                // Joins that came while this one waited for its turn.
                if let Some(count) = joining.count {
                    let catchup = joining.catchup.take();
                    self.answer_joined(count, catchup.as_deref(), &mut joining.calls);
                }
                self.start_drain(cursor, joining.held, Some(turn));
            }
            Err(e) => {
                // Not joined after all: what arrived meanwhile goes out as it would have.
                self.guard.set_draining(false);
                if matches!(e, StoreError::TooManyDevices(_)) {
                    // Not a device either: it gets no sync of what its user sends.
                    self.device = None;
                    self.guard.set_device(false);
                }
                for item in joining.held {
                    write_filtered(&mut self.outbox, &mut self.sent, item);
                }
                // Reported once, answered to every waiting join.
                let e = Error::from(e);
                e.report();
                let wire = e.to_wire();
                for call in joining.calls {
                    self.reply_wire(wire.clone(), call);
                }
            }
        }
    }

    /// Waits for the user's drain turn on this instance, then opens the stream: one large
    /// drain at a time per user, so the cursors' read-ahead of many sockets does not add up.
    fn open_stream(&self, catchup: Option<Arc<Catchup>>) -> Opening {
        let turn = self.guard.drain_turn().clone();
        let state = self.state.clone();
        let user = self.claims.sub.clone();
        Box::pin(async move {
            // Never closed; an error would mean the instance is going away.
            let turn = turn
                .acquire_owned()
                .await
                .map_err(|_| StoreError::ShuttingDown)?;
            let reader = Reader {
                user: &user,
                ack_timeout: state.config.ack_timeout,
                device: catchup.as_deref(),
            };
            let cursor = state.store().stream_pending(reader).await?;
            Ok(Opened::Streaming { turn, cursor })
        })
    }

    /// One `joined` (and its answer, for a call) per waiting `join_chat`.
    fn answer_joined(
        &mut self,
        pending: u64,
        catchup: Option<&Catchup>,
        calls: &mut Vec<Option<CallId>>,
    ) {
        let joined = Joined {
            user_id: self.claims.sub.clone(),
            instance: self.state.instance().to_owned(),
            pending,
            device_id: catchup.map(|c| c.device.to_string()),
            missed_history: catchup.map(|c| c.missed_history),
        };
        let answer = to_json(&joined);
        let frame = ServerFrame::Joined(joined).encode_out();
        for call in calls.drain(..) {
            self.outbox.push(frame.clone());
            if let Some(call) = call {
                self.outbox.push(Out::Answer(call, answer.clone()));
            }
        }
    }

    fn start_drain(
        &mut self,
        cursor: Pending,
        held: VecDeque<Queued>,
        turn: Option<OwnedSemaphorePermit>,
    ) {
        let cutoff = overdue_cutoff(self.state.config.ack_timeout);
        self.drain = Some(Drain::new(cursor, cutoff, held, turn));
    }

    /// Writes the drained message `first` and whatever else the cursor has ready, merged
    /// with the live pushes that arrived meanwhile.
    pub(super) async fn on_drained(
        &mut self,
        first: Option<Result<BufferedMessage, StoreError>>,
    ) -> Step {
        let mut next = Some(first);
        let mut n = 0;
        while let Some(item) = next.take() {
            match item {
                Some(Ok(msg)) => {
                    if let Step::End(end) = self.write_drained(msg).await {
                        return Step::End(end);
                    }
                }
                Some(Err(e)) => {
                    // What was not drained stays pending; the sweep or the next join
                    // picks it up.
                    self.end_drain().await;
                    self.reply_error(Error::from(e), None);
                    return Step::Continue;
                }
                None => {
                    self.end_drain().await;
                    return Step::Continue;
                }
            }
            n += 1;
            if n < STEP && self.outbox.has_room() {
                // Only what is ready now: a getMore waits in the select, beside the reads.
                next = match self.drain.as_mut() {
                    Some(drain) => drain.cursor.next().now_or_never(),
                    None => None,
                };
            }
        }
        // Before the socket can take them: a claim reaches the record loop ahead of its
        // ack, which can then go in one write with it.
        if let Some(mut drain) = self.drain.take() {
            self.record_drained(&mut drain).await;
            self.drain = Some(drain);
        }
        Step::Continue
    }

    async fn write_drained(&mut self, msg: BufferedMessage) -> Step {
        if !self.hold_queued() {
            return Step::End(self.queue_full());
        }
        let Some(drain) = self.drain.as_mut() else {
            return Step::Continue;
        };
        while let Some(item) = pop_before(&mut drain.held, msg.id) {
            write_filtered(&mut self.outbox, &mut self.sent, item);
        }
        if self.sent.insert(msg.id) {
            // A device also catches up on what its user sent: no claim, no re-send there.
            let received = msg.receiver == self.claims.sub;
            let overdue = received && msg.is_overdue(drain.cutoff);
            // A device may have been pushed this before its socket dropped, unacked.
            let maybe_seen = self.device.is_some() && received && msg.is_unacked();
            let frame = ServerFrame::ChatMessage(msg.to_wire(overdue || maybe_seen));
            self.outbox.push(frame.encode_out());
            drain.pace.drained(1);
            if overdue {
                drain.resent.push(msg.id);
            } else if received && !msg.delivered {
                drain.claim.push(msg.id);
            }
        }
        Step::Continue
    }

    /// Moves what the live queue holds into the drain's held frames; false once more than
    /// a queue's worth is held (a drain does not lift the memory limit).
    fn hold_queued(&mut self) -> bool {
        let (Some(queue), Some(drain)) = (self.queue.as_mut(), self.drain.as_mut()) else {
            return true;
        };
        while let Some(item) = queue.try_recv() {
            drain.held.push_back(item);
        }
        drain.held.len() <= self.state.config.queue_capacity
    }

    /// Ends the drain in progress, if any: held live frames go out, deliveries are recorded.
    async fn end_drain(&mut self) {
        if self.drain.is_none() {
            return;
        }
        self.hold_queued();
        let Some(mut drain) = self.drain.take() else {
            return;
        };
        for item in std::mem::take(&mut drain.held) {
            write_filtered(&mut self.outbox, &mut self.sent, item);
        }
        self.guard.set_draining(false);
        self.record_drained(&mut drain).await;
    }

    async fn record_drained(&mut self, drain: &mut Drain) {
        let delivery = &self.state.delivery;
        delivery
            .claim_later(&self.claims.sub, &drain.claim, DeliveryPath::Drain)
            .await;
        drain.claim.clear();
        delivery.record_redelivered(std::mem::take(&mut drain.resent), &self.state.tasks);
    }
}

pub(super) async fn poll_joining(joining: &mut Option<Joining>) -> Result<Opened, StoreError> {
    match joining {
        Some(j) => (&mut j.opening).await,
        None => std::future::pending().await,
    }
}

pub(super) async fn next_drained(
    drain: &mut Option<Drain>,
) -> Option<Result<BufferedMessage, StoreError>> {
    match drain {
        Some(d) => d.cursor.next().await,
        None => std::future::pending().await,
    }
}
