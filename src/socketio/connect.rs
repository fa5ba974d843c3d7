//! A socket's life: the connect middleware (identity, the per-user limit, the socket's
//! handlers), then the session on the instance's tracker, then the disconnect its end
//! calls for.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde::Deserialize;
use socketioxide::adapter::LocalAdapter;
use socketioxide::socket::Socket;
use socketioxide::SocketError;
use tokio_util::sync::CancellationToken;

use super::inbound::{self, Events};
use super::outbound::Emitter;
use super::SocketArc;
use crate::auth::{bearer_token, Claims};
use crate::error::Error;
use crate::presence::ConnectionGuard;
use crate::session::{End, Session};
use crate::state::AppState;

/// How often a session that ended for a full queue retries to disconnect its socket (the
/// disconnect packet needs room in the same full buffer).
const RETRY_DISCONNECT: Duration = Duration::from_millis(200);

/// The handshake's `auth` object: `io(url, { auth: { token } })`.
#[derive(Deserialize, Default)]
pub(super) struct Handshake {
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
pub(super) async fn authenticate(
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
    let (inlet, events) = inbound::channel(&state);
    socket.on_fallback(inlet);
    let closed = CancellationToken::new();
    let on_close = closed.clone();
    socket.on_disconnect(move || async move { on_close.cancel() });
    let ready = Ready {
        claims,
        guard,
        events,
        closed,
    };
    socket
        .extensions
        .insert(Starting(Arc::new(Mutex::new(Some(ready)))));
    Ok(())
}

/// The connect handler: runs the session on the instance's task tracker.
pub(super) async fn start(SocketArc(socket): SocketArc, state: Arc<AppState>) {
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
