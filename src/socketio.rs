//! Socket.IO on `/socket.io/` (socketioxide: Socket.IO protocol v5, i.e. socket.io-client
//! 3.x/4.x, over WebSocket and HTTP long-polling, default namespace): a second transport
//! onto the [`Session`] core, for clients of the Node Socket.IO server (docs/SOCKETIO.md).
//!
//! The connect middleware authenticates (the same JWT checks as `/ws`, from `auth.token`
//! or `?token=`) and counts the connection against the per-user limit; a refusal reaches
//! the client as `connect_error`. Events are decoded where socketioxide reads them, so they
//! keep their order, and queue on a bounded per-socket channel that the session reads; the
//! session's v1 frames go out as `emit(event, data)` and its answers as acknowledgements.
//! No delivery rule lives here. The cross-instance fan-out is msgbuf's change stream: no
//! Socket.IO adapter, rooms or broadcast are used.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures::{Sink, Stream, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::{AckSender, TryData};
use socketioxide::handler::{
    ConnectHandler, FromConnectParts, FromMessageParts, MessageHandler, Value,
};
use socketioxide::socket::Socket;
use socketioxide::{ParserConfig, SendError, SocketError, SocketIo};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::auth::{bearer_token, Claims};
use crate::error::Error;
use crate::presence::ConnectionGuard;
use crate::protocol::{decode_socketio, ClientFrame};
use crate::session::{End, Inbound, Out, Session};
use crate::state::AppState;

/// The path socketioxide serves (and `edge` guards).
const PATH: &str = "/socket.io";
/// Events queued for one session, by count and by bytes of their JSON: socketioxide reads
/// a socket without backpressure, so what does not fit is refused (`rate_limited`).
const INBOUND_EVENTS: usize = 256;
const INBOUND_BYTES: usize = 1 << 20;
/// Packets socketioxide buffers per socket on their way out (its default is 128). The
/// session's outbox and presence queue hold the rest, bounded as for `/ws`.
const ENGINE_BUFFER: usize = 32;
/// socketioxide has no way to wait for room in a socket's buffer. A full one is retried
/// first after yielding the thread, `RETRY_YIELDS` times: the packets that filled it woke
/// the transport's writer task, which empties it in one go. A drain of 10,000 messages
/// went from 1,180 ms to ~90 ms (v1: 87 ms) with these. While it stays full, it is retried
/// after `RETRY_FULL`, doubled each time (a client that stopped reading costs a few
/// wake-ups a second until it is disconnected).
const RETRY_YIELDS: u8 = 8;
const RETRY_FULL: Duration = Duration::from_millis(2);
const RETRY_FULL_MAX: Duration = Duration::from_millis(100);
/// How often a session that ended for a full queue retries to disconnect its socket (the
/// disconnect packet needs room in the same full buffer).
const RETRY_DISCONNECT: Duration = Duration::from_millis(200);
/// Binary attachments are refused (`bad_request`), but a few are read so that the packet
/// can be answered instead of closing the connection.
const MAX_BINARIES: usize = 4;

/// Mounts Socket.IO on `router`: the socketioxide layer, and in front of it the origin
/// check and CORS headers of `/socket.io/` requests. On shutdown every Socket.IO
/// transport is closed, so clients reconnect (to another instance) by themselves.
pub fn mount(router: Router, state: &Arc<AppState>) -> Router {
    let config = &state.config;
    let max = config.max_frame_bytes;
    let parser = ParserConfig::common()
        .max_incoming_binaries(MAX_BINARIES)
        .max_incoming_binary_buf_size(max);
    let (layer, io) = SocketIo::builder()
        .req_path(PATH)
        .max_payload(max as u64)
        .max_buffer_size(ENGINE_BUFFER)
        .ws_read_buffer_size(2 * 1024)
        .ws_max_message_size(max)
        .ws_max_frame_size(max)
        // A client has as long to connect the namespace as to send a request head.
        .connect_timeout(config.handshake_timeout)
        .with_parser(parser)
        .build_layer();
    let on_connect = {
        let state = state.clone();
        move |socket: SocketArc| start(socket, state)
    };
    let authenticate = {
        let state = state.clone();
        move |socket: SocketArc, TryData(auth): TryData<Handshake>| {
            authenticate(socket, auth.ok(), state)
        }
    };
    io.ns("/", on_connect.with(authenticate));
    let shutdown = state.shutdown.clone();
    state.tasks.spawn(async move {
        shutdown.cancelled().await;
        io.close().await;
    });
    router
        .layer(layer)
        .layer(axum::middleware::from_fn_with_state(state.clone(), edge))
}

/// The socket, as socketioxide holds it (acknowledgements are built from it).
#[derive(Clone)]
struct SocketArc(Arc<Socket<LocalAdapter>>);

impl FromConnectParts<LocalAdapter> for SocketArc {
    type Error = std::convert::Infallible;
    fn from_connect_parts(
        s: &Arc<Socket<LocalAdapter>>,
        _: &Option<Value>,
    ) -> Result<Self, Self::Error> {
        Ok(SocketArc(s.clone()))
    }
}

/// The handshake's `auth` object: `io(url, { auth: { token } })`.
#[derive(Deserialize, Default)]
struct Handshake {
    #[serde(default)]
    token: Option<String>,
}

/// What the connect middleware leaves for the connect handler. Shared (socketioxide's
/// extensions hold clones) and taken once.
#[derive(Clone)]
struct Starting(Arc<Mutex<Option<Ready>>>);

struct Ready {
    claims: Claims,
    guard: ConnectionGuard,
    events: Events,
    closed: CancellationToken,
}

/// The connect middleware: identity, the per-user limit, then this socket's event and
/// disconnect handlers — before the client is told it is connected, so that no event of
/// it can come first. An `Err` is sent to the client as `connect_error` with its message.
async fn authenticate(
    SocketArc(socket): SocketArc,
    auth: Option<Handshake>,
    state: Arc<AppState>,
) -> Result<(), Error> {
    let parts = socket.req_parts();
    let token = auth
        .and_then(|a| a.token)
        .filter(|t| !t.is_empty())
        .or_else(|| bearer_token(&parts.headers, parts.uri.query()).map(str::to_owned));
    let Some(token) = token else {
        return Err(Error::new(
            crate::error::ErrorCode::Unauthorized,
            "missing token: connect with `auth: { token: \"<jwt>\" }` or `?token=<jwt>`",
        ));
    };
    let claims = state.auth.verify(&token).map_err(|e| {
        let e = Error::from(e);
        e.report();
        e
    })?;
    let guard = state.connect(&claims.sub).map_err(|e| {
        tracing::info!(user = %claims.sub, "socket.io connection refused: {e}");
        Error::rate_limited(e.to_string())
    })?;
    let (tx, rx) = mpsc::channel(INBOUND_EVENTS);
    let queued = Arc::new(AtomicUsize::new(0));
    socket.on_fallback(Inlet {
        tx,
        queued: queued.clone(),
        state: state.clone(),
    });
    let closed = CancellationToken::new();
    let on_close = closed.clone();
    socket.on_disconnect(move || async move { on_close.cancel() });
    let ready = Ready {
        claims,
        guard,
        events: Events { rx, queued },
        closed,
    };
    socket
        .extensions
        .insert(Starting(Arc::new(Mutex::new(Some(ready)))));
    Ok(())
}

/// The connect handler: runs the session on the instance's task tracker.
async fn start(SocketArc(socket): SocketArc, state: Arc<AppState>) {
    let ready = socket
        .extensions
        .remove::<Starting>()
        .and_then(|s| s.0.lock().ok().and_then(|mut r| r.take()));
    let Some(ready) = ready else {
        // Only the middleware above connects sockets, and it always leaves this.
        tracing::error!(sid = %socket.id, "socket.io socket without its session state");
        return;
    };
    let tasks = state.tasks.clone();
    tasks.spawn(serve(socket, state, ready));
}

/// Runs one socket: the session, then the disconnect its end calls for.
async fn serve(socket: Arc<Socket<LocalAdapter>>, state: Arc<AppState>, ready: Ready) {
    let Ready {
        claims,
        guard,
        events,
        closed,
    } = ready;
    // The socket's events until it disconnects (its handlers, and so the channel's sender,
    // live as long as the socket, which the sink holds).
    let mut inbound = std::pin::pin!(events.take_until(closed.cancelled_owned()));
    let mut sink = Emitter::new(socket.clone());
    let end = Session::new(state.clone(), claims, guard)
        .run(&mut inbound, &mut sink)
        .await;
    match end {
        // `mount`'s shutdown task closes every transport; the client has gone.
        End::Shutdown | End::Gone => {}
        // An expired token: the server disconnects, the client reconnects with a fresh one.
        End::QueueFull | End::TokenExpired | End::Close(..) => {
            disconnect(socket, &state.shutdown).await
        }
    }
}

/// Disconnects a socket whose session has ended. The disconnect packet needs room in the
/// socket's buffer, full when the client stopped reading: retried until it fits or the
/// socket closes (Engine.IO's heartbeat closes a socket whose buffer stays full).
async fn disconnect(socket: Arc<Socket<LocalAdapter>>, shutdown: &CancellationToken) {
    loop {
        match socket.clone().disconnect() {
            Err(SocketError::InternalChannelFull) => {}
            Ok(()) | Err(_) => return,
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RETRY_DISCONNECT) => {}
        }
    }
}

/// A socket's event handler: decodes each event in socketioxide's read path (in order)
/// and queues it for the session without waiting.
struct Inlet {
    tx: mpsc::Sender<Queued>,
    /// Bytes of the events queued on `tx`.
    queued: Arc<AtomicUsize>,
    state: Arc<AppState>,
}

/// Marks [`Inlet`]'s [`MessageHandler`] implementation (socketioxide's own are for closures).
struct Inline;

impl MessageHandler<LocalAdapter, Inline> for Inlet {
    fn call(&self, s: Arc<Socket<LocalAdapter>>, v: Value, ack_id: Option<i64>) {
        let (frame, size) = match &v {
            Value::Str(text, bins) => {
                let frame = if bins.as_ref().is_some_and(|b| !b.is_empty()) {
                    Err(Error::bad_request(
                        "binary attachments are not supported; send JSON",
                    ))
                } else {
                    decode_event(text.as_str())
                };
                (frame, text.len())
            }
            Value::Bytes(b) => (
                Err(Error::bad_request("binary data is not supported")),
                b.len(),
            ),
        };
        if self.queued.fetch_add(size, Ordering::Relaxed) + size > INBOUND_BYTES {
            self.queued.fetch_sub(size, Ordering::Relaxed);
            return self.overloaded(&s, frame, ack_id);
        }
        let item = match ack_id {
            Some(id) => Inbound::Call(frame, id),
            None => Inbound::Frame(frame),
        };
        match self.tx.try_send(Box::new((item, size))) {
            Ok(()) => {}
            Err(e) => {
                self.queued.fetch_sub(size, Ordering::Relaxed);
                if let mpsc::error::TrySendError::Full(queued) = e {
                    let frame = match queued.0 {
                        Inbound::Frame(f) | Inbound::Call(f, _) => f,
                        Inbound::End(_) => return,
                    };
                    self.overloaded(&s, frame, ack_id);
                }
                // Closed: the session has ended and the socket is being disconnected.
            }
        }
    }
}

impl Inlet {
    /// Refuses an event that found the session's queue full: `rate_limited`, as an
    /// `error` event and through its acknowledgement. Sent from here, so it may overtake
    /// answers still queued in the session.
    fn overloaded(
        &self,
        s: &Arc<Socket<LocalAdapter>>,
        frame: Result<ClientFrame, Error>,
        ack_id: Option<i64>,
    ) {
        self.state.metrics().rate_limited.increment(1);
        let client_msg_id = match frame {
            Ok(ClientFrame::ChatMessage(m)) => m.client_msg_id,
            Err(e) => e.client_msg_id().map(str::to_owned),
            Ok(_) => None,
        };
        let wire = Error::rate_limited("too many events in flight; slow down and retry")
            .with_client_msg_id(client_msg_id)
            .to_wire();
        let _ = s.emit("error", &wire);
        if let Some(id) = ack_id {
            #[derive(serde::Serialize)]
            struct Refused<'a> {
                error: &'a crate::error::WireError,
            }
            let _ = ack_sender(s, id).send(&Refused { error: &wire });
        }
    }
}

/// Decodes one event packet's JSON, `["event", data, ...]`: the name and the first
/// argument (later ones are ignored, as the Node server's handlers did).
fn decode_event(text: &str) -> Result<ClientFrame, Error> {
    let parts: Vec<&RawValue> = serde_json::from_str(text)
        .map_err(|_| Error::bad_request("an event is a JSON array [\"event\", data]"))?;
    let event: Cow<'_, str> = parts
        .first()
        .and_then(|e| serde_json::from_str(e.get()).ok())
        .ok_or_else(|| Error::bad_request("an event's name is a string"))?;
    decode_socketio(&event, parts.get(1).map(|d| d.get()))
}

/// An acknowledgement sender for a client's ack id.
fn ack_sender(s: &Arc<Socket<LocalAdapter>>, id: i64) -> AckSender<LocalAdapter> {
    // The extractor reads only the socket and the id; the packet value is not looked at.
    let mut unused = Value::Bytes(Bytes::new());
    match AckSender::from_message_parts(s, &mut unused, &Some(id)) {
        Ok(ack) => ack,
        Err(never) => match never {},
    }
}

/// An event on its way to the session, with the bytes it counts for. Boxed: a channel
/// allocates room for 32 items at once, in every socket, idle or not.
type Queued = Box<(Inbound, usize)>;

/// The session's side of the inbound channel.
struct Events {
    rx: mpsc::Receiver<Queued>,
    queued: Arc<AtomicUsize>,
}

impl Stream for Events {
    type Item = Inbound;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Inbound>> {
        self.rx.poll_recv(cx).map(|item| {
            item.map(|queued| {
                let (inbound, size) = *queued;
                self.queued.fetch_sub(size, Ordering::Relaxed);
                inbound
            })
        })
    }
}

/// The session's sink: v1 frames become `emit(event, data)` and answers acknowledgements,
/// one at a time into socketioxide's bounded buffer.
struct Emitter {
    socket: Arc<Socket<LocalAdapter>>,
    /// Taken by the sink, waiting for room in the buffer.
    pending: Option<Out>,
    /// Allocated the first time the buffer is found full.
    retry: Option<Pin<Box<Sleep>>>,
    backoff: Duration,
    /// Retries by yielding since the buffer was last found with room.
    yields: u8,
}

/// The socket is gone.
#[derive(Debug)]
struct Gone;

enum Emitted {
    Sent,
    Full,
    Closed,
}

impl Emitter {
    fn new(socket: Arc<Socket<LocalAdapter>>) -> Self {
        Emitter {
            socket,
            pending: None,
            retry: None,
            backoff: RETRY_FULL,
            yields: 0,
        }
    }

    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Gone>> {
        loop {
            let Some(out) = self.pending.as_ref() else {
                return Poll::Ready(Ok(()));
            };
            match emit(&self.socket, out) {
                Emitted::Sent => {
                    self.pending = None;
                    self.backoff = RETRY_FULL;
                    self.yields = 0;
                    return Poll::Ready(Ok(()));
                }
                Emitted::Closed => return Poll::Ready(Err(Gone)),
                Emitted::Full if self.yields < RETRY_YIELDS => {
                    // Woken at once, the task goes to the back of its worker's queue,
                    // behind the writer task.
                    self.yields += 1;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Emitted::Full => {
                    let at = Instant::now() + self.backoff;
                    self.backoff = (self.backoff * 2).min(RETRY_FULL_MAX);
                    let retry = self
                        .retry
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                    retry.as_mut().reset(at);
                    if retry.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

/// Hands one item to socketioxide. `data` goes out as the JSON text the session encoded
/// (a [`RawValue`]), not parsed and serialised again.
fn emit(socket: &Arc<Socket<LocalAdapter>>, out: &Out) -> Emitted {
    let sent = match out {
        Out::Frame(text) => match serde_json::from_str::<V1Frame<'_>>(text.as_str()) {
            Ok(frame) => socket.emit(frame.event, frame.data),
            Err(e) => return dropped(e),
        },
        Out::Answer(id, data) => match serde_json::from_str::<&RawValue>(data.as_str()) {
            Ok(data) => ack_sender(socket, *id).send(data),
            Err(e) => return dropped(e),
        },
    };
    match sent {
        Ok(()) => Emitted::Sent,
        Err(SendError::Socket(SocketError::InternalChannelFull)) => Emitted::Full,
        Err(SendError::Socket(_)) => Emitted::Closed,
        Err(SendError::Serialize(e)) => dropped(e),
    }
}

/// An encoded v1 frame, split without copying.
#[derive(Deserialize)]
struct V1Frame<'a> {
    event: &'a str,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// The session encodes every item itself, so this does not happen; should it, the item is
/// dropped rather than the socket.
fn dropped(e: impl std::fmt::Display) -> Emitted {
    tracing::error!(error = %e, "socket.io: an outgoing frame could not be encoded; dropped");
    Emitted::Sent
}

impl Sink<Out> for Emitter {
    type Error = Gone;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Gone>> {
        self.poll_pending(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, out: Out) -> Result<(), Gone> {
        match emit(&self.socket, &out) {
            Emitted::Sent => Ok(()),
            Emitted::Full => {
                self.pending = Some(out);
                Ok(())
            }
            Emitted::Closed => Err(Gone),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Gone>> {
        // socketioxide writes its buffer out by itself; only our pending item is ours.
        self.poll_pending(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Gone>> {
        self.poll_pending(cx)
    }
}

/// In front of socketioxide: `MSGBUF_ALLOWED_ORIGINS` for every `/socket.io/` request
/// (handshake, polling, WebSocket upgrade: 403 outside the list), and CORS for the
/// allowed origins, whose pages long-poll across origins.
async fn edge(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let ours = path
        .strip_prefix(PATH)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    if !ours {
        return next.run(req).await;
    }
    let req = detach_head(req);
    let allowed = &state.config.allowed_origins;
    let origin = req.headers().get(header::ORIGIN).cloned();
    let origin_ok = allowed.is_empty()
        || origin
            .as_ref()
            .and_then(|o| o.to_str().ok())
            .is_some_and(|o| allowed.iter().any(|a| a == o));
    if !origin_ok {
        return Error::forbidden("origin not allowed").into_response();
    }
    // No `Origin`: not a cross-origin browser request, nothing to add.
    let Some(origin) = origin else {
        return next.run(req).await;
    };
    let mut response = if req.method() == Method::OPTIONS {
        let mut preflight = StatusCode::NO_CONTENT.into_response();
        let headers = preflight.headers_mut();
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        let requested = req
            .headers()
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("content-type, authorization"));
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested);
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        preflight
    } else {
        next.run(req).await
    };
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    response
}

/// The request with its URI and header values copied out of hyper's read buffer.
///
/// hyper parses a request head without copying: the URI and every header value are slices
/// of the connection's 8 KiB read buffer, which stays allocated while any of them lives.
/// engineioxide keeps the head of the request that opened an Engine.IO session for the
/// socket's whole life (`Socket::req_parts`), so every Socket.IO connection pinned a whole
/// read buffer: heaptrack of 4,000 idle joined WebSocket connections showed 8,192 bytes
/// each still held from hyper's `poll_read_head`, of 35.6 KiB per connection in all (a v1
/// socket drops its request after the handshake, 11.4 KiB). The copies cost the bytes of
/// the head.
fn detach_head(req: Request) -> Request {
    let (mut parts, body) = req.into_parts();
    if let Ok(uri) = parts.uri.to_string().parse() {
        // `Uri: FromStr` copies; a URI that does not print back (none hyper accepts) stays.
        parts.uri = uri;
    }
    let mut headers = axum::http::HeaderMap::with_capacity(parts.headers.len());
    for (name, value) in &parts.headers {
        // Header names are already owned (hyper copies them); values hyper accepted are
        // valid for `from_bytes`, and one that were not would stay as it is.
        let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        copy.set_sensitive(value.is_sensitive());
        headers.append(name.clone(), copy);
    }
    parts.headers = headers;
    Request::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use crate::protocol::JoinChat;

    #[test]
    fn an_event_packet_decodes_its_first_argument() {
        assert_eq!(
            decode_event(r#"["join_chat","alice",{"extra":1}]"#),
            Ok(ClientFrame::JoinChat(JoinChat {
                user_id: Some("alice".into()),
                device_id: None,
            }))
        );
        assert_eq!(
            decode_event(r#"["join_chat"]"#),
            Ok(ClientFrame::JoinChat(JoinChat::default()))
        );
        for bad in ["{}", "[]", "[5]", "nope", r#"["dance",{}]"#] {
            assert_eq!(
                decode_event(bad).map_err(|e| e.code()),
                Err(ErrorCode::BadRequest),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_detached_head_shares_no_bytes_with_the_read_buffer() {
        // A head as hyper builds it: URI and values are slices of one buffer.
        const URI: &[u8] = b"/socket.io/?EIO=4&transport=websocket&token=t";
        let buffer =
            Bytes::from_static(b"/socket.io/?EIO=4&transport=websocket&token=t abc a\xffb");
        let at = |from: usize, len: usize| buffer.slice(URI.len() + from..URI.len() + from + len);
        let mut req = Request::new(axum::body::Body::empty());
        *req.uri_mut() =
            axum::http::Uri::from_maybe_shared(buffer.slice(0..URI.len())).expect("uri");
        let value = |b: Bytes| HeaderValue::from_maybe_shared(b).expect("a header value");
        req.headers_mut().append(header::COOKIE, value(at(1, 1)));
        req.headers_mut().append(header::COOKIE, value(at(2, 2)));
        let mut secret = value(at(5, 3));
        secret.set_sensitive(true);
        req.headers_mut().insert(header::AUTHORIZATION, secret);
        let within = |p: *const u8| buffer.as_ptr_range().contains(&p);
        assert!(within(
            req.headers()[header::AUTHORIZATION].as_bytes().as_ptr()
        ));

        let req = detach_head(req);
        assert_eq!(req.uri(), "/socket.io/?EIO=4&transport=websocket&token=t");
        assert_eq!(req.uri().query(), Some("EIO=4&transport=websocket&token=t"));
        let cookies: Vec<_> = req.headers().get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a", "bc"]);
        let auth = &req.headers()[header::AUTHORIZATION];
        assert_eq!(auth.as_bytes(), b"a\xffb");
        assert!(auth.is_sensitive());
        for (_, v) in req.headers() {
            assert!(
                !within(v.as_bytes().as_ptr()),
                "{v:?} still points into the buffer"
            );
        }
        let query = req.uri().query().expect("query");
        assert!(!within(query.as_ptr()));
    }

    #[test]
    fn v1_frames_split_into_event_and_raw_data() {
        let frame = crate::protocol::ServerFrame::Joined(crate::protocol::Joined {
            user_id: "bob".into(),
            instance: "a".into(),
            pending: 2,
            ..Default::default()
        })
        .encode();
        let parsed: V1Frame<'_> = serde_json::from_str(&frame).expect("a v1 frame");
        assert_eq!(parsed.event, "joined");
        assert_eq!(
            parsed.data.get(),
            r#"{"userId":"bob","instance":"a","pending":2}"#
        );
    }
}
