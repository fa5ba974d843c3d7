//! Socket.IO on `/socket.io/` (socketioxide: Socket.IO protocol v5, i.e. socket.io-client
//! 3.x/4.x, over WebSocket and HTTP long-polling, default namespace): a second transport
//! onto the [`Session`](crate::session::Session) core, for clients of the Node Socket.IO server (docs/SOCKETIO.md).
//!
//! The connect middleware authenticates (the same JWT checks as `/ws`, from `auth.token`
//! or `?token=`) and counts the connection against the per-user limit; a refusal reaches
//! the client as `connect_error`. Events are decoded where socketioxide reads them, so they
//! keep their order, and queue on a bounded per-socket channel that the session reads; the
//! session's v1 frames go out as `emit(event, data)` and its answers as acknowledgements.
//! No delivery rule lives here. The cross-instance fan-out is msgbuf's change stream: no
//! Socket.IO adapter, rooms or broadcast are used.
//!
//! A socket's life is in [`connect`], its events on their way in in [`inbound`], the
//! session's frames on their way out in [`outbound`], and the origin check and CORS of
//! every `/socket.io/` request in [`edge`].

use std::sync::Arc;

use axum::body::Bytes;
use axum::Router;
use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::{AckSender, TryData};
use socketioxide::handler::{ConnectHandler, FromConnectParts, FromMessageParts, Value};
use socketioxide::socket::Socket;
use socketioxide::{ParserConfig, SocketIo};

use crate::state::AppState;

mod connect;
mod edge;
mod inbound;
mod outbound;

use connect::{authenticate, start, Handshake};

/// The path socketioxide serves (and `edge` guards).
const PATH: &str = "/socket.io";
/// Packets socketioxide buffers per socket on their way out (its default is 128). The
/// session's outbox and presence queue hold the rest, bounded as for `/ws`.
const ENGINE_BUFFER: usize = 32;
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
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            edge::edge,
        ))
}

/// The socket, as socketioxide holds it (acknowledgements are built from it).
#[derive(Clone)]
pub(super) struct SocketArc(pub(super) Arc<Socket<LocalAdapter>>);

impl FromConnectParts<LocalAdapter> for SocketArc {
    type Error = std::convert::Infallible;
    fn from_connect_parts(
        s: &Arc<Socket<LocalAdapter>>,
        _: &Option<Value>,
    ) -> Result<Self, Self::Error> {
        Ok(SocketArc(s.clone()))
    }
}

/// An acknowledgement sender for a client's ack id.
pub(super) fn ack_sender(s: &Arc<Socket<LocalAdapter>>, id: i64) -> AckSender<LocalAdapter> {
    // The extractor reads only the socket and the id; the packet value is not looked at.
    let mut unused = Value::Bytes(Bytes::new());
    match AckSender::from_message_parts(s, &mut unused, &Some(id)) {
        Ok(ack) => ack,
        Err(never) => match never {},
    }
}
