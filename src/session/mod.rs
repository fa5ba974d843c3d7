//! The session core: what a connected, authenticated user does, whatever the transport —
//! join (register, count pending, drain oldest first, merge live pushes queued meanwhile;
//! a device also catches up on what it missed), send (accept with idempotency and the rate
//! limit), ack (per device too), receipts, and the per-socket duplicate filter.
//!
//! A transport (protocol v1 on `/ws`: [`crate::ws`]; Socket.IO: [`crate::socketio`]) turns
//! its frames into [`Inbound`] items and gives the session a sink of [`Out`] items (encoded
//! v1 frames, and answers to the frames that asked for one); it holds no delivery rule.
//!
//! The session never stops reading while it writes: reads, replies, the drain and live
//! pushes are raced in one loop, and frames go out through a bounded [`outbox::Outbox`]
//! written concurrently. A client that acks every message as it reads, with a blocking
//! send, therefore cannot wedge a drain (both TCP buffers full, nobody reading).
//!
//! Per-socket rules: frames are written in queue order; an id already written on this
//! socket is not written again (a live push racing a drain); during a drain, live pushes
//! are held and merged in by id, so one sender's messages keep their order; sends are
//! pipelined (bounded) and answered in order.

mod acks;
mod drain;
mod join;
mod outbox;
mod recent;

use std::pin::Pin;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use futures::stream::FuturesOrdered;
use futures::{Future, Sink, Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::auth::Claims;
use crate::device::DeviceId;
use crate::error::Error;
use crate::error::WireError;
use crate::limits::SocketLimits;
use crate::presence::{ConnectionGuard, LiveQueue, Outbound, Queued};
use crate::protocol::{ClientFrame, SendMessage, ServerFrame};
use crate::state::AppState;
use crate::store::BufferedMessage;
use acks::{AckWrite, MAX_UNRECORDED_ACKS};
use drain::Drain;
use join::{next_drained, poll_joining, Joining};
use outbox::Outbox;
use recent::RecentIds;

/// Sends in flight per socket before the session stops reading (backpressure).
const MAX_INFLIGHT: usize = 64;
/// Queued frames moved to the outbox in one step, so one busy source does not hold up
/// the others for long.
const STEP: usize = 128;
/// How often a session that only its user's byte budget holds back looks again (the
/// user's other sockets free the budget as they write; only such sessions pay this).
const BUDGET_RECHECK: std::time::Duration = std::time::Duration::from_millis(20);
/// How often a drain held back by its client's acks looks whether they stalled.
const PACE_RECHECK: std::time::Duration = std::time::Duration::from_millis(50);
/// How long an ending socket waits for the acks it read to be recorded.
const ACK_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// What a transport hands the session.
pub enum Inbound {
    /// A decoded client frame, or why the frame could not be decoded.
    Frame(Result<ClientFrame, Error>),
    /// A frame whose sender waits for its answer under `CallId` (a Socket.IO
    /// acknowledgement callback): handled as [`Inbound::Frame`], and its answer also goes
    /// out as [`Out::Answer`], after the frame's v1 reply.
    Call(Result<ClientFrame, Error>, CallId),
    /// The transport ends the session.
    End(End),
}

/// The transport's name for one [`Inbound::Call`] (Socket.IO: the packet's ack id).
pub type CallId = i64;

/// What the session writes, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    /// An encoded v1 frame, `{"event", "data"}`.
    Frame(Utf8Bytes),
    /// The JSON answer to an [`Inbound::Call`]: the data of the frame's `joined` or
    /// `message_accepted`, `{"acked": n}` once an `ack` is recorded, or
    /// `{"error": {"code", "message", "clientMsgId"?}}`.
    Answer(CallId, Utf8Bytes),
}

impl Out {
    /// Bytes held (for the outbox's bound).
    pub fn len(&self) -> usize {
        match self {
            Out::Frame(f) | Out::Answer(_, f) => f.len(),
        }
    }
}

/// A reply to a send: its v1 frame and, when the send was a call, its answer.
struct Replied {
    frame: Utf8Bytes,
    answer: Option<Out>,
}

/// Why a session ended; the transport says it in its own terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The server is shutting down (v1: close 1001).
    Shutdown,
    /// The client stopped reading; its messages wait in MongoDB (v1: close 4001).
    QueueFull,
    /// The token's `exp` passed; the client reconnects with a fresh one (v1: close 4002).
    TokenExpired,
    /// A transport-level violation, with the transport's close code and reason.
    Close(u16, &'static str),
    /// The peer closed, or the connection broke.
    Gone,
}

type Reply = Pin<Box<dyn Future<Output = Replied> + Send>>;
/// One connected, authenticated client.
pub struct Session {
    state: Arc<AppState>,
    claims: Claims,
    /// Counts the connection against the per-user limit; joins at most one session.
    guard: ConnectionGuard,
    /// Live frames for this socket, once joined.
    queue: Option<LiveQueue>,
    /// Cancelled by a push that found the queue full.
    overflow: CancellationToken,
    sent: RecentIds,
    /// Answers to sends, in the order the frames came.
    inflight: FuturesOrdered<Reply>,
    /// Ack frames being recorded, answered in the order they came, and their ids.
    ack_writes: FuturesOrdered<AckWrite>,
    unrecorded_acks: usize,
    /// Caps on joins and acked ids (sends are limited per user, in delivery).
    limits: SocketLimits,
    outbox: Outbox,
    joining: Option<Joining>,
    drain: Option<Drain>,
    /// The device this socket joined as (docs/PROTOCOL.md, "Devices"); `None` for an
    /// ephemeral socket.
    device: Option<DeviceId>,
    /// Fires when the outbox has waited `MSGBUF_WRITE_TIMEOUT` without the socket taking
    /// anything: a stalled writer counts as a full queue. Made on the first write.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

enum Step {
    Continue,
    End(End),
}

impl Session {
    pub fn new(state: Arc<AppState>, claims: Claims, guard: ConnectionGuard) -> Self {
        let outbox = Outbox::new(guard.budget().clone());
        Session {
            limits: SocketLimits::default(),
            state,
            claims,
            guard,
            queue: None,
            overflow: CancellationToken::new(),
            sent: RecentIds::default(),
            inflight: FuturesOrdered::new(),
            ack_writes: FuturesOrdered::new(),
            unrecorded_acks: 0,
            outbox,
            joining: None,
            drain: None,
            device: None,
            stall: None,
        }
    }

    /// Runs the session until it ends; the transport then closes in its own way.
    pub async fn run<I, O>(mut self, inbound: &mut I, sink: &mut O) -> End
    where
        I: Stream<Item = Inbound> + Unpin,
        O: Sink<Out> + Unpin,
    {
        let shutdown = self.state.shutdown.clone();
        let overflow = self.overflow.clone();
        let expiry = tokio::time::sleep_until(token_expiry(self.claims.exp));
        tokio::pin!(expiry);
        loop {
            self.watch_for_stall();
            let step = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Step::End(End::Shutdown),
                _ = overflow.cancelled() => Step::End(self.queue_full()),
                _ = &mut expiry => Step::End(End::TokenExpired),
                _ = poll_stall(&mut self.stall), if self.outbox.has_work() => Step::End(self.queue_full()),
                written = self.outbox.pump(sink), if self.outbox.has_work() => match written {
                    Ok(()) => Step::Continue,
                    Err(()) => Step::End(End::Gone),
                },
                // Replies are not held back by a full outbox: they are bounded by
                // MAX_INFLIGHT, and holding them would stop the reads below.
                Some(reply) = self.inflight.next(), if !self.inflight.is_empty() => {
                    self.outbox.push(Out::Frame(reply.frame));
                    if let Some(answer) = reply.answer {
                        self.outbox.push(answer);
                    }
                    Step::Continue
                }
                Some(written) = self.ack_writes.next(), if !self.ack_writes.is_empty() => {
                    self.ack_written(written);
                    Step::Continue
                }
                input = inbound.next(), if self.inflight.len() < MAX_INFLIGHT && self.unrecorded_acks < MAX_UNRECORDED_ACKS => match input {
                    // Boxed: the join's state would otherwise sit in every idle socket's task.
                    Some(Inbound::Frame(frame)) => Box::pin(self.on_frame(frame, None)).await,
                    Some(Inbound::Call(frame, call)) => Box::pin(self.on_frame(frame, Some(call))).await,
                    Some(Inbound::End(end)) => Step::End(end),
                    None => Step::End(End::Gone),
                },
                opened = poll_joining(&mut self.joining), if self.joining.is_some() => {
                    self.on_opened(opened);
                    Step::Continue
                }
                next = next_drained(&mut self.drain), if self.drain_may_go_on() && self.outbox.has_room() => {
                    Box::pin(self.on_drained(next)).await
                }
                _ = tokio::time::sleep(PACE_RECHECK), if self.drain_waits_for_acks() => Step::Continue,
                Some(item) = recv_queue(&mut self.queue), if self.settled() && self.outbox.has_room() => {
                    self.on_live(item);
                    Step::Continue
                }
                _ = tokio::time::sleep(BUDGET_RECHECK), if self.outbox.waits_for_user() => Step::Continue,
            };
            if let Step::End(end) = step {
                // A drain cut short records nothing more: what it wrote but did not claim
                // stays undelivered for the next join. Sends still in flight complete in
                // the insert shards (the messages are stored); only their
                // acknowledgements are lost with the socket, and clients retry by
                // clientMsgId.
                self.finish().await;
                return end;
            }
        }
    }

    /// The acks read before the end are still recorded (a device that acked and closed
    /// must not get those messages again), within [`ACK_FLUSH`]; then a device's floor
    /// moves past them.
    async fn finish(&mut self) {
        let deadline = tokio::time::Instant::now() + ACK_FLUSH;
        let writes = &mut self.ack_writes;
        let flushed =
            tokio::time::timeout_at(deadline, async { while writes.next().await.is_some() {} });
        if flushed.await.is_err() {
            tracing::debug!("acks still unrecorded when the socket ended");
        }
        if let Some(device) = self.device.take() {
            let user = self.claims.sub.clone();
            let left = self.state.delivery.device_left(user, device);
            if tokio::time::timeout_at(deadline, left).await.is_err() {
                tracing::debug!("device acks still unrecorded when the socket ended");
            }
        }
    }

    /// Pushes the stall deadline back whenever the socket took something.
    fn watch_for_stall(&mut self) {
        // Progress made while the outbox emptied counts once the next frame waits.
        if !self.outbox.has_work() {
            return;
        }
        let progressed = self.outbox.take_progress();
        let deadline = tokio::time::Instant::now() + self.state.config.write_timeout;
        match self.stall.as_mut() {
            Some(stall) if progressed => stall.as_mut().reset(deadline),
            Some(_) => {}
            None => self.stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }

    fn queue_full(&self) -> End {
        self.state.metrics().queue_full_disconnects.increment(1);
        End::QueueFull
    }

    async fn on_frame(&mut self, frame: Result<ClientFrame, Error>, call: Option<CallId>) -> Step {
        match frame {
            Ok(ClientFrame::JoinChat(join)) => self.join(join, call).await,
            Ok(ClientFrame::ChatMessage(msg)) => {
                self.send(msg, call);
                Step::Continue
            }
            Ok(ClientFrame::Ack(ack)) => {
                self.ack(ack, call);
                Step::Continue
            }
            Err(e) => {
                self.refuse(e, call);
                Step::Continue
            }
        }
    }

    /// Answers a frame the session cannot act on with an `error` event.
    fn refuse(&mut self, e: Error, call: Option<CallId>) {
        self.state.metrics().protocol_errors.increment(1);
        self.reply_error(e, call);
    }

    fn reply_error(&mut self, e: Error, call: Option<CallId>) {
        e.report();
        self.reply_wire(e.to_wire(), call);
    }

    /// An `error` frame, and the same error as the answer of `call` when there is one.
    fn reply_wire(&mut self, wire: WireError, call: Option<CallId>) {
        let answer = call.map(|call| error_answer(call, wire.clone()));
        self.outbox.push(ServerFrame::Error(wire).encode_out());
        if let Some(answer) = answer {
            self.outbox.push(answer);
        }
    }

    fn send(&mut self, m: SendMessage, call: Option<CallId>) {
        if let Err(e) = self.state.delivery.check_send(&self.claims.sub) {
            return self.reply_error(e.with_client_msg_id(m.client_msg_id), call);
        }
        let mut msg = BufferedMessage::new(
            &self.claims.sub,
            &m.to,
            &m.chat_id,
            &m.message,
            m.client_msg_id,
        );
        if let Some(device) = &self.device {
            msg.sender_device = Some(device.to_string());
            // The sync of this message to the user's devices is not echoed to this socket.
            if msg.receiver != msg.sender {
                self.sent.insert(msg.id);
            }
        }
        let state = self.state.clone();
        self.inflight.push_back(Box::pin(async move {
            let client_msg_id = msg.client_msg_id.clone();
            match state.delivery.accept(msg).await {
                Ok(accepted) => {
                    state.metrics().accepted_ws.increment(1);
                    let answer = call.map(|call| Out::Answer(call, to_json(&accepted)));
                    Replied {
                        frame: ServerFrame::MessageAccepted(accepted).encode().into(),
                        answer,
                    }
                }
                Err(e) => {
                    let e = Error::from(e).with_client_msg_id(client_msg_id);
                    e.report();
                    let wire = e.to_wire();
                    Replied {
                        answer: call.map(|call| error_answer(call, wire.clone())),
                        frame: ServerFrame::Error(wire).encode().into(),
                    }
                }
            }
        }));
    }

    /// A drain in progress that its client's acks let go on ([`drain::Pace`]).
    fn drain_may_go_on(&self) -> bool {
        self.drain
            .as_ref()
            .is_some_and(|d| d.pace.may_go_on(std::time::Instant::now()))
    }

    /// A drain held back by its client's acks: it goes on when they come, or stall.
    fn drain_waits_for_acks(&self) -> bool {
        self.drain.is_some() && !self.drain_may_go_on()
    }

    /// Neither joining nor draining: live frames go straight out.
    fn settled(&self) -> bool {
        self.joining.is_none() && self.drain.is_none()
    }

    /// Live frames, up to a step's worth, into the outbox.
    fn on_live(&mut self, first: Queued) {
        write_filtered(&mut self.outbox, &mut self.sent, first);
        for _ in 1..STEP {
            if !self.outbox.has_room() {
                break;
            }
            match self.queue.as_mut().map(|q| q.try_recv()) {
                Some(Some(item)) => write_filtered(&mut self.outbox, &mut self.sent, item),
                _ => break,
            }
        }
    }
}

/// Queues one live frame unless it is a chat message whose id was already written.
fn write_filtered(outbox: &mut Outbox, sent: &mut RecentIds, item: Queued) {
    match item.take() {
        Outbound::Chat { id, frame } => {
            if sent.insert(id) {
                outbox.push(Out::Frame(frame));
            }
        }
        Outbound::Frame(frame) => outbox.push(Out::Frame(frame)),
    }
}

impl ServerFrame {
    fn encode_out(&self) -> Out {
        Out::Frame(self.encode().into())
    }
}

/// The JSON of an answer's object; these plain structs always serialise.
fn to_json<T: serde::Serialize>(value: &T) -> Utf8Bytes {
    serde_json::to_string(value)
        .unwrap_or_else(|_| "{}".to_owned())
        .into()
}

fn error_answer(call: CallId, error: WireError) -> Out {
    #[derive(serde::Serialize)]
    struct Refused {
        error: WireError,
    }
    Out::Answer(call, to_json(&Refused { error }))
}

async fn poll_stall(stall: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match stall {
        Some(s) => s.as_mut().await,
        None => std::future::pending().await,
    }
}

/// The instant a token with this `exp` (seconds since the epoch) stops being valid.
fn token_expiry(exp: u64) -> tokio::time::Instant {
    let now = crate::auth::unix_now();
    tokio::time::Instant::now() + std::time::Duration::from_secs(exp.saturating_sub(now))
}

async fn recv_queue(queue: &mut Option<LiveQueue>) -> Option<Queued> {
    match queue {
        Some(q) => q.recv().await,
        None => std::future::pending().await,
    }
}
