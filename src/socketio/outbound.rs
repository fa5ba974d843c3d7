//! The session's frames on their way out: v1 frames become `emit(event, data)` and
//! answers acknowledgements, into socketioxide's bounded buffer, retried while it is full.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Sink;
use serde::Deserialize;
use serde_json::value::RawValue;
use socketioxide::adapter::LocalAdapter;
use socketioxide::socket::Socket;
use socketioxide::{SendError, SocketError};
use tokio::time::{Instant, Sleep};

use super::ack_sender;
use crate::session::Out;

/// socketioxide has no way to wait for room in a socket's buffer. A full one is retried
/// first after yielding the thread, `RETRY_YIELDS` times: the packets that filled it woke
/// the transport's writer task, which empties it in one go. A drain of 10,000 messages
/// went from 1,180 ms to ~90 ms (v1: 87 ms) with these. While it stays full, it is retried
/// after `RETRY_FULL`, doubled each time (a client that stopped reading costs a few
/// wake-ups a second until it is disconnected).
const RETRY_YIELDS: u8 = 8;
const RETRY_FULL: Duration = Duration::from_millis(2);
const RETRY_FULL_MAX: Duration = Duration::from_millis(100);

/// The session's sink: v1 frames become `emit(event, data)` and answers acknowledgements,
/// one at a time into socketioxide's bounded buffer.
pub(super) struct Emitter {
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
pub(super) struct Gone;

enum Emitted {
    Sent,
    Full,
    Closed,
}

impl Emitter {
    pub(super) fn new(socket: Arc<Socket<LocalAdapter>>) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;

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
