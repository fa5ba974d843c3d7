//! The WebSocket session: authentication on the handshake, then one task per socket that
//! reads client frames, runs the join drain, and writes the outbound queue.
//!
//! Per-socket rules: frames are written in queue order; an id already written on this
//! socket is not written again (a live push racing a drain); the drain runs before any
//! queued live frame, so one sender's messages keep their order; sends are pipelined
//! (bounded) and answered in order.

use std::collections::{HashSet, VecDeque};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use futures::stream::FuturesOrdered;
use futures::{Future, SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use mongodb::bson::oid::ObjectId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::{bearer_token, AuthError, Claims};
use crate::error::AppError;
use crate::metrics::DeliveryPath;
use crate::presence::{ConnectionGuard, Outbound};
use crate::protocol::{self, ClientEvent, ErrorCode, Joined, ProtocolError};
use crate::server::AppState;
use crate::store::BufferedMessage;

/// Close codes (documented in docs/PROTOCOL.md).
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_INVALID_PAYLOAD: u16 = 1007;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_QUEUE_FULL: u16 = 4001;

const QUEUE_FULL_REASON: &str = "outbound queue full; undelivered messages wait for your next join";

/// Sends in flight per socket before the socket stops reading (backpressure).
const MAX_INFLIGHT: usize = 64;
/// Ids remembered per socket to skip duplicates between a drain and live pushes.
const RECENT_IDS: usize = 4096;
/// Frames written before one flush.
const WRITE_BATCH: usize = 128;
/// Drained messages between flushes/claims.
const DRAIN_PAGE: usize = 500;

type Reply = Pin<Box<dyn Future<Output = Option<String>> + Send>>;

/// `GET /ws`: authenticates, applies the origin and connection limits, upgrades.
pub async fn upgrade(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
    ws: WebSocketUpgrade,
) -> Result<Response, AppError> {
    if !state.config.allowed_origins.is_empty() {
        let origin = headers
            .get(axum::http::header::ORIGIN)
            .and_then(|o| o.to_str().ok());
        if !origin.is_some_and(|o| state.config.allowed_origins.iter().any(|a| a == o)) {
            return Err(AppError::Forbidden("origin not allowed".into()));
        }
    }
    let token = bearer_token(&headers, uri.query()).ok_or(AuthError::Missing)?;
    let claims = state.auth.verify(token)?;
    let guard = state
        .presence
        .connect(&claims.sub, state.config.max_connections_per_user)
        .map_err(|e| {
            tracing::info!(user = %claims.sub, "connection refused: {e}");
            AppError::RateLimited
        })?;
    let max = state.config.max_frame_bytes;
    let tasks = state.tasks.clone();
    Ok(ws
        // Small buffers keep an idle connection cheap; writes collect up to 8 KiB and go
        // out on the flush that ends every batch, so a drain is not a syscall per frame.
        .read_buffer_size(2 * 1024)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(max * 4)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            tasks.track_future(Session::new(state, claims, guard).run(socket))
        }))
}

/// The last ids written on a socket; allocates only once something was written.
#[derive(Default)]
struct RecentIds {
    set: HashSet<ObjectId>,
    order: VecDeque<ObjectId>,
}

impl RecentIds {
    /// False when `id` was written recently.
    fn insert(&mut self, id: ObjectId) -> bool {
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

struct Session {
    state: Arc<AppState>,
    claims: Claims,
    guard: ConnectionGuard,
    queue: Option<mpsc::Receiver<Outbound>>,
    overflow: CancellationToken,
    sent: RecentIds,
    inflight: FuturesOrdered<Reply>,
    limiter: DefaultDirectRateLimiter,
}

enum Flow {
    Continue,
    Close(u16, &'static str),
    Gone,
}

impl Session {
    fn new(state: Arc<AppState>, claims: Claims, guard: ConnectionGuard) -> Self {
        let rate = NonZeroU32::new(state.config.rate_limit.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(state.config.rate_burst.max(1)).unwrap_or(NonZeroU32::MIN);
        Session {
            limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
            state,
            claims,
            guard,
            queue: None,
            overflow: CancellationToken::new(),
            sent: RecentIds::default(),
            inflight: FuturesOrdered::new(),
        }
    }

    async fn run(mut self, mut socket: WebSocket) {
        let shutdown = self.state.shutdown.clone();
        let overflow = self.overflow.clone();
        let flow = loop {
            let flow = tokio::select! {
                biased;
                _ = shutdown.cancelled() => Flow::Close(CLOSE_GOING_AWAY, "server shutting down"),
                _ = overflow.cancelled() => {
                    self.state.metrics.queue_full_disconnects.increment(1);
                    Flow::Close(CLOSE_QUEUE_FULL, QUEUE_FULL_REASON)
                }
                Some(reply) = self.inflight.next(), if !self.inflight.is_empty() => match reply {
                    Some(frame) => send(&mut socket, frame.into()).await,
                    None => Flow::Continue,
                },
                Some(item) = recv_queue(&mut self.queue) => self.write_queued(&mut socket, item).await,
                msg = socket.recv(), if self.inflight.len() < MAX_INFLIGHT => match msg {
                    // Boxed: the join drain's state would otherwise sit in every idle socket's task.
                    Some(Ok(msg)) => Box::pin(self.on_message(&mut socket, msg)).await,
                    Some(Err(e)) => read_error(e),
                    None => Flow::Gone,
                },
            };
            match flow {
                Flow::Continue => continue,
                other => break other,
            }
        };
        if let Flow::Close(code, reason) = flow {
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            };
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                socket.send(Message::Close(Some(frame))),
            )
            .await;
        }
        // Sends still in flight complete in the insert shards (the messages are stored);
        // only their acknowledgements are lost with the socket, and clients retry by clientMsgId.
    }

    async fn write_queued(&mut self, socket: &mut WebSocket, first: Outbound) -> Flow {
        let mut item = Some(first);
        let mut written = 0;
        while let Some(next) = item.take() {
            if !self.feed_queued(socket, next).await {
                return Flow::Gone;
            }
            written += 1;
            if written < WRITE_BATCH {
                item = self.queue.as_mut().and_then(|q| q.try_recv().ok());
            }
        }
        match socket.flush().await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Gone,
        }
    }

    async fn on_message(&mut self, socket: &mut WebSocket, msg: Message) -> Flow {
        match msg {
            Message::Text(text) => self.on_text(socket, text.as_str()).await,
            Message::Binary(_) => {
                self.protocol_error(
                    socket,
                    ProtocolError::bad_request(
                        "binary frames are not supported; send JSON text frames",
                    ),
                )
                .await
            }
            Message::Close(_) => Flow::Gone,
            Message::Ping(_) | Message::Pong(_) => Flow::Continue,
        }
    }

    async fn protocol_error(&mut self, socket: &mut WebSocket, e: ProtocolError) -> Flow {
        self.state.metrics.protocol_errors.increment(1);
        send(socket, e.to_frame().into()).await
    }

    async fn on_text(&mut self, socket: &mut WebSocket, text: &str) -> Flow {
        let event = match protocol::decode(text) {
            Ok(event) => event,
            Err(e) => return self.protocol_error(socket, e).await,
        };
        match event {
            ClientEvent::Join { user_id } => {
                if user_id.as_deref().is_some_and(|u| u != self.claims.sub) {
                    let e = ProtocolError::new(
                        ErrorCode::Forbidden,
                        "`userId` must be the token's user",
                    );
                    return self.protocol_error(socket, e).await;
                }
                self.join(socket).await
            }
            ClientEvent::Chat(m) => {
                if self.limiter.check().is_err() {
                    self.state.metrics.rate_limited.increment(1);
                    let e = ProtocolError::new(
                        ErrorCode::RateLimited,
                        "too many messages; slow down and retry",
                    )
                    .with_client_msg_id(m.client_msg_id);
                    return send(socket, e.to_frame().into()).await;
                }
                let msg = BufferedMessage::new(
                    &self.claims.sub,
                    &m.to,
                    &m.chat_id,
                    &m.message,
                    m.client_msg_id,
                );
                let state = self.state.clone();
                self.inflight.push_back(Box::pin(async move {
                    let client_msg_id = msg.client_msg_id.clone();
                    Some(match state.delivery.accept(msg).await {
                        Ok(a) => {
                            state.metrics.accepted_ws.increment(1);
                            protocol::frame(
                                "message_accepted",
                                &protocol::Accepted {
                                    id: a.id.to_hex(),
                                    client_msg_id: a.client_msg_id,
                                    timestamp: protocol::rfc3339(a.timestamp),
                                },
                            )
                        }
                        Err(e) => ProtocolError::from(crate::error::AppError::from(e))
                            .with_client_msg_id(client_msg_id)
                            .to_frame(),
                    })
                }));
                Flow::Continue
            }
            ClientEvent::Ack { ids } => {
                let parsed: Result<Vec<ObjectId>, _> =
                    ids.iter().map(ObjectId::parse_str).collect();
                let Ok(ids) = parsed else {
                    return self
                        .protocol_error(
                            socket,
                            ProtocolError::bad_request("`ids` must be 24-hex message ids"),
                        )
                        .await;
                };
                let state = self.state.clone();
                let user = self.claims.sub.clone();
                self.inflight.push_back(Box::pin(async move {
                    match state.delivery.ack(user, ids).await {
                        Ok(()) => None,
                        Err(e) => {
                            Some(ProtocolError::from(crate::error::AppError::from(e)).to_frame())
                        }
                    }
                }));
                Flow::Continue
            }
        }
    }

    /// Registers the session, answers `joined`, then drains pending messages oldest first.
    /// Registration comes first, so a message inserted during the drain is either in the
    /// drain or queued live (and then skipped here if it was both).
    async fn join(&mut self, socket: &mut WebSocket) -> Flow {
        let user = self.claims.sub.clone();
        if let Some(queue) = self
            .guard
            .join(self.state.config.queue_capacity, self.overflow.clone())
        {
            self.queue = Some(queue);
        }
        let store = &self.state.store;
        let ack_timeout = self.state.config.ack_timeout;
        let (pending, messages) = match store.open_pending(&user, ack_timeout).await {
            Ok(opened) => opened,
            Err(e) => {
                let e = ProtocolError::from(AppError::from(e));
                return send(socket, e.to_frame().into()).await;
            }
        };
        let joined = Joined {
            user_id: user.clone(),
            instance: self.state.instance.to_string(),
            pending,
        };
        if let Flow::Gone = send(socket, protocol::frame("joined", &joined).into()).await {
            return Flow::Gone;
        }
        match self.drain(socket, messages).await {
            Ok(flow) => flow,
            Err(e) => {
                // What was not drained stays pending; the redelivery sweep or the next join
                // picks it up.
                let e = ProtocolError::from(AppError::from(e));
                send(socket, e.to_frame().into()).await
            }
        }
    }

    /// Streams the pending messages, oldest first. Live pushes that reach this session's
    /// queue meanwhile are merged in by id, so one sender's messages keep their order even
    /// when a live copy was claimed (and so left out of the drain) before the query ran.
    async fn drain(
        &mut self,
        socket: &mut WebSocket,
        mut cursor: crate::store::Pending,
    ) -> Result<Flow, crate::store::StoreError> {
        let delivery = self.state.delivery.clone();
        let cutoff = crate::store::overdue_cutoff(self.state.config.ack_timeout);
        let mut held = VecDeque::new();
        let mut claim = Vec::new();
        let mut resent = Vec::new();
        let mut in_page = 0;
        while let Some(msg) = cursor.next().await {
            let msg = msg?;
            if !self.hold_queued(&mut held) {
                self.state.metrics.queue_full_disconnects.increment(1);
                return Ok(Flow::Close(CLOSE_QUEUE_FULL, QUEUE_FULL_REASON));
            }
            while let Some(item) = pop_before(&mut held, msg.id) {
                if !self.feed_queued(socket, item).await {
                    return Ok(Flow::Gone);
                }
            }
            if self.sent.insert(msg.id) {
                let overdue = msg.is_overdue(cutoff);
                let frame = protocol::frame("chat_message", &msg.to_wire(overdue));
                if socket.feed(Message::Text(frame.into())).await.is_err() {
                    return Ok(Flow::Gone);
                }
                if overdue {
                    resent.push(msg.id);
                } else if !msg.delivered {
                    claim.push(msg.id);
                }
                in_page += 1;
            }
            if in_page >= DRAIN_PAGE {
                in_page = 0;
                if socket.flush().await.is_err() {
                    return Ok(Flow::Gone);
                }
                self.record_drained(&delivery, &mut claim, &mut resent)
                    .await;
            }
        }
        self.hold_queued(&mut held);
        while let Some(item) = held.pop_front() {
            if !self.feed_queued(socket, item).await {
                return Ok(Flow::Gone);
            }
        }
        if socket.flush().await.is_err() {
            return Ok(Flow::Gone);
        }
        self.record_drained(&delivery, &mut claim, &mut resent)
            .await;
        Ok(Flow::Continue)
    }

    /// Moves what the queue holds into `held`; false once more than a queue's worth is held
    /// (the same bound as the queue itself: a drain does not lift the memory limit).
    fn hold_queued(&mut self, held: &mut VecDeque<Outbound>) -> bool {
        if let Some(queue) = self.queue.as_mut() {
            while let Ok(item) = queue.try_recv() {
                held.push_back(item);
            }
        }
        held.len() <= self.state.config.queue_capacity
    }

    /// Feeds one queued frame unless its id was already written; false when the socket is gone.
    async fn feed_queued(&mut self, socket: &mut WebSocket, item: Outbound) -> bool {
        let frame = match item {
            Outbound::Chat { id, frame } => self.sent.insert(id).then_some(frame),
            Outbound::Frame(frame) => Some(frame),
        };
        match frame {
            Some(frame) => socket.feed(Message::Text(frame)).await.is_ok(),
            None => true,
        }
    }

    async fn record_drained(
        &mut self,
        delivery: &crate::delivery::Delivery,
        claim: &mut Vec<ObjectId>,
        resent: &mut Vec<ObjectId>,
    ) {
        delivery
            .claim_later(&self.claims.sub, claim, DeliveryPath::Drain)
            .await;
        claim.clear();
        if !resent.is_empty() {
            self.state
                .metrics
                .delivered(DeliveryPath::Redelivery, resent.len() as u64);
            let ids = std::mem::take(resent);
            let store = self.state.store.clone();
            self.state.tasks.spawn(async move {
                if let Err(e) = store.touch_pushed(&ids).await {
                    tracing::warn!(error = %e, "could not record re-sent messages");
                }
            });
        }
    }
}

/// The front of `held` if it may go out before drained message `next`: receipts and other
/// frames always, chat messages with a smaller id (inserted earlier).
fn pop_before(held: &mut VecDeque<Outbound>, next: ObjectId) -> Option<Outbound> {
    let ready = match held.front()? {
        Outbound::Frame(_) => true,
        Outbound::Chat { id, .. } => *id < next,
    };
    ready.then(|| held.pop_front()).flatten()
}

async fn recv_queue(queue: &mut Option<mpsc::Receiver<Outbound>>) -> Option<Outbound> {
    match queue {
        Some(q) => q.recv().await,
        None => std::future::pending().await,
    }
}

async fn send(socket: &mut WebSocket, frame: Utf8Bytes) -> Flow {
    match socket.send(Message::Text(frame)).await {
        Ok(()) => Flow::Continue,
        Err(_) => Flow::Gone,
    }
}

/// Maps a read error to the close code the protocol names.
fn read_error(e: axum::Error) -> Flow {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let inner = e.into_inner();
    match inner.downcast_ref::<WsError>() {
        Some(WsError::Capacity(_)) => Flow::Close(CLOSE_TOO_BIG, "frame too large"),
        Some(WsError::Utf8(_)) => {
            Flow::Close(CLOSE_INVALID_PAYLOAD, "text frame is not valid UTF-8")
        }
        _ => Flow::Gone,
    }
}
