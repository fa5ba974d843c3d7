//! Protocol v1 over WebSocket (`GET /ws`): authenticates the handshake, then adapts
//! WebSocket messages to the [`Session`] core and its ends to close codes. No delivery
//! rule lives here.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use futures::{Sink, SinkExt, StreamExt};

use crate::auth::{bearer_token, AuthError, Claims};
use crate::error::{Error, ErrorCode};
use crate::presence::ConnectionGuard;
use crate::protocol;
use crate::session::{End, Inbound, Out, Session};
use crate::state::AppState;

/// Close codes (documented in docs/PROTOCOL.md).
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
pub const CLOSE_INVALID_PAYLOAD: u16 = 1007;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_QUEUE_FULL: u16 = 4001;
pub const CLOSE_TOKEN_EXPIRED: u16 = 4002;

const QUEUE_FULL_REASON: &str = "outbound queue full; undelivered messages wait for your next join";

/// `GET /ws`: authenticates, applies the origin and connection limits, upgrades.
pub async fn upgrade(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, Error> {
    if !state.config.allowed_origins.is_empty() {
        let origin = headers
            .get(axum::http::header::ORIGIN)
            .and_then(|o| o.to_str().ok());
        if !origin.is_some_and(|o| state.config.allowed_origins.iter().any(|a| a == o)) {
            return Err(Error::forbidden("origin not allowed"));
        }
    }
    let token = bearer_token(&headers, uri.query()).ok_or(AuthError::Missing)?;
    let claims = state.auth.verify(token)?;
    // Checked after the token, so an unauthenticated caller learns only that it is one.
    let ws = ws.map_err(|r| Error::bad_request(r.body_text()).with_status(r.status()))?;
    let guard = state.connect(&claims.sub).map_err(|e| {
        tracing::info!(user = %claims.sub, "connection refused: {e}");
        Error::new(ErrorCode::RateLimited, "too many requests")
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
        .on_upgrade(move |socket| tasks.track_future(serve(socket, state, claims, guard))))
}

/// Runs one socket: the session over its two halves, then the close frame its end calls for.
async fn serve(socket: WebSocket, state: Arc<AppState>, claims: Claims, guard: ConnectionGuard) {
    let (sink, stream) = socket.split();
    let mut sink = TextSink(sink);
    let mut inbound = stream.filter_map(|msg| std::future::ready(inbound(msg)));
    let end = Session::new(state, claims, guard)
        .run(&mut inbound, &mut sink)
        .await;
    let close = match end {
        End::Shutdown => Some((CLOSE_GOING_AWAY, "server shutting down")),
        End::QueueFull => Some((CLOSE_QUEUE_FULL, QUEUE_FULL_REASON)),
        End::TokenExpired => Some((
            CLOSE_TOKEN_EXPIRED,
            "token expired; reconnect with a fresh token",
        )),
        End::Close(code, reason) => Some((code, reason)),
        End::Gone => None,
    };
    let mut sink = sink.0;
    let goodbye = async {
        match close {
            Some((code, reason)) => {
                let frame = CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(reason),
                };
                let _ = sink.send(Message::Close(Some(frame))).await;
            }
            // Sends the reply to a client's Close that the reader queued, if any.
            None => {
                let _ = sink.flush().await;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), goodbye).await;
}

/// One WebSocket message as the session sees it; pings are the WebSocket layer's.
fn inbound(msg: Result<Message, axum::Error>) -> Option<Inbound> {
    Some(match msg {
        Ok(Message::Text(text)) => Inbound::Frame(protocol::decode(text.as_str())),
        Ok(Message::Binary(_)) => Inbound::Frame(Err(Error::bad_request(
            "binary frames are not supported; send JSON text frames",
        ))),
        Ok(Message::Close(_)) => Inbound::End(End::Gone),
        Ok(Message::Ping(_) | Message::Pong(_)) => return None,
        Err(e) => Inbound::End(read_error(e)),
    })
}

/// Maps a read error to the close code the protocol names.
fn read_error(e: axum::Error) -> End {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let inner = e.into_inner();
    match inner.downcast_ref::<WsError>() {
        Some(WsError::Capacity(_)) => End::Close(CLOSE_TOO_BIG, "frame too large"),
        Some(WsError::Utf8(_)) => {
            End::Close(CLOSE_INVALID_PAYLOAD, "text frame is not valid UTF-8")
        }
        // Unmasked frames, reserved bits, unknown opcodes.
        Some(WsError::Protocol(_)) => {
            End::Close(CLOSE_PROTOCOL_ERROR, "WebSocket protocol violation")
        }
        _ => End::Gone,
    }
}

/// The write half, taking encoded v1 frames.
struct TextSink<S>(S);

impl<S: Sink<Message> + Unpin> Sink<Out> for TextSink<S> {
    type Error = S::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Pin::new(&mut self.0).poll_ready(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, out: Out) -> Result<(), S::Error> {
        match out {
            Out::Frame(frame) => Pin::new(&mut self.0).start_send(Message::Text(frame)),
            // v1 frames never ask for an answer (no `Inbound::Call`), so there is none.
            Out::Answer(..) => Ok(()),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Pin::new(&mut self.0).poll_close(cx)
    }
}
