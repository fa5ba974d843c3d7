//! A socket's events on their way to its session: decoded where socketioxide reads them
//! (so they keep their order) and queued on a channel bounded by count and by bytes.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use serde_json::value::RawValue;
use socketioxide::adapter::LocalAdapter;
use socketioxide::handler::{MessageHandler, Value};
use socketioxide::socket::Socket;
use tokio::sync::mpsc;

use super::ack_sender;
use crate::error::Error;
use crate::protocol::{decode_socketio, ClientFrame};
use crate::session::Inbound;
use crate::state::AppState;

/// Events queued for one session, by count and by bytes of their JSON: socketioxide reads
/// a socket without backpressure, so what does not fit is refused (`rate_limited`).
const INBOUND_EVENTS: usize = 256;
const INBOUND_BYTES: usize = 1 << 20;

/// A socket's inbound channel: the handler socketioxide calls, and the session's stream.
pub(super) fn channel(state: &Arc<AppState>) -> (Inlet, Events) {
    let (tx, rx) = mpsc::channel(INBOUND_EVENTS);
    let queued = Arc::new(AtomicUsize::new(0));
    let inlet = Inlet {
        tx,
        queued: queued.clone(),
        state: state.clone(),
    };
    (inlet, Events { rx, queued })
}

/// A socket's event handler: decodes each event in socketioxide's read path (in order)
/// and queues it for the session without waiting.
pub(super) struct Inlet {
    tx: mpsc::Sender<Queued>,
    /// Bytes of the events queued on `tx`.
    queued: Arc<AtomicUsize>,
    state: Arc<AppState>,
}

/// Marks [`Inlet`]'s [`MessageHandler`] implementation (socketioxide's own are for closures).
pub(super) struct Inline;

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

/// An event on its way to the session, with the bytes it counts for. Boxed: a channel
/// allocates room for 32 items at once, in every socket, idle or not.
type Queued = Box<(Inbound, usize)>;

/// The session's side of the inbound channel.
pub(super) struct Events {
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
}
