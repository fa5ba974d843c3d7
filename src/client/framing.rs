//! Socket.IO framing as the client speaks it on a raw WebSocket: Engine.IO v4 packets (one
//! per WebSocket message), the default namespace's Socket.IO packets inside them, and an
//! event's argument array read as the v1 frame `{"event", "data"}`, so that the same serde
//! types decode both protocols.

use std::fmt;

use serde::de::{DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::ClientError;
use crate::protocol::ClientFrame;
/// Engine.IO v4 heartbeat: the server pings, the client answers.
pub(super) const PING: &str = "2";
pub(super) const PONG: &str = "3";
/// Socket.IO DISCONNECT of the default namespace.
pub(super) const DISCONNECT: &str = "41";

/// Engine.IO's open packet (`0{"sid", "pingInterval", ...}`): only what shows it is one
/// (the heartbeat needs no settings here: the server pings, `recv` answers).
#[derive(Deserialize)]
pub(super) struct OpenPacket {
    #[allow(dead_code)]
    sid: String,
}

/// The namespace CONNECT's auth payload.
#[derive(Serialize)]
pub(super) struct ConnectAuth<'a> {
    pub(super) token: &'a str,
}

/// `connect_error`'s data.
#[derive(Deserialize)]
struct ConnectErrorData {
    message: String,
}

/// An Engine.IO packet (one per WebSocket message in v4) and, inside message packets,
/// the Socket.IO packet of the default namespace.
#[derive(Debug, PartialEq)]
pub(super) enum Packet<'a> {
    /// `0{...}`
    Open(&'a str),
    /// `1`
    Close,
    /// `2`
    Ping,
    /// `3`
    Pong,
    /// `6`
    Noop,
    /// `40{"sid"}`
    Connect(&'a str),
    /// `41`
    Disconnect,
    /// `42["event",data]`, or `42<id>[...]` when the server asks for an acknowledgement:
    /// the argument array.
    Event(&'a str),
    /// `43<id>[data]`
    Ack(u64, &'a str),
    /// `44{"message"}`
    ConnectError(String),
    /// Other namespaces, binary packets (`45`, `46`), Engine.IO upgrade packets.
    Other,
}

pub(super) fn packet(text: &str) -> Packet<'_> {
    match text.as_bytes().first() {
        Some(b'0') => Packet::Open(&text[1..]),
        Some(b'1') if text.len() == 1 => Packet::Close,
        Some(b'2') if text.len() == 1 => Packet::Ping,
        Some(b'3') if text.len() == 1 => Packet::Pong,
        Some(b'6') if text.len() == 1 => Packet::Noop,
        Some(b'4') => socketio_packet(&text[1..]),
        _ => Packet::Other,
    }
}

/// A Socket.IO packet: type, then (for the default namespace) an optional ack id, then JSON.
fn socketio_packet(p: &str) -> Packet<'_> {
    let Some(kind) = p.as_bytes().first() else {
        return Packet::Other;
    };
    let rest = &p[1..];
    // A namespace other than "/" is written first (`/admin,`); this client uses only "/".
    if rest.starts_with('/') {
        return Packet::Other;
    }
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let (id, json) = rest.split_at(digits);
    match kind {
        b'0' => Packet::Connect(rest),
        b'1' => Packet::Disconnect,
        b'2' => Packet::Event(json),
        b'3' => match id.parse() {
            Ok(id) => Packet::Ack(id, json),
            Err(_) => Packet::Other,
        },
        b'4' => Packet::ConnectError(
            serde_json::from_str::<ConnectErrorData>(rest)
                .map(|d| d.message)
                .unwrap_or_else(|_| rest.to_owned()),
        ),
        _ => Packet::Other,
    }
}

/// A client frame as a Socket.IO event, `42["event",data]`: the v1 frame's event name and
/// data as the event's name and only argument (`decode_socketio` reads them back).
pub(super) fn socketio_event(frame: &ClientFrame) -> Result<String, ClientError> {
    let args = match frame {
        ClientFrame::JoinChat(j) => serde_json::to_string(&("join_chat", j)),
        ClientFrame::ChatMessage(m) => serde_json::to_string(&("chat_message", m)),
        ClientFrame::Ack(a) => serde_json::to_string(&("ack", a)),
    }
    .map_err(|e| ClientError::Unexpected(e.to_string()))?;
    Ok(format!("42{args}"))
}

/// A Socket.IO event's arguments, `["event", data, ...]`, read as the v1 frame
/// `{"event": "event", "data": data}` that `T` deserialises from: the same serde types
/// decode both protocols. Later arguments are ignored; a missing `data` reads as `null`.
pub(super) struct EventArgs<T>(pub(super) T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for EventArgs<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Args<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Args<T> {
            type Value = EventArgs<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a Socket.IO event array [\"event\", data]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let value =
                    T::deserialize(serde::de::value::MapAccessDeserializer::new(ArgsAsFields {
                        seq: &mut seq,
                        next: 0,
                    }))?;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(EventArgs(value))
            }
        }
        d.deserialize_seq(Args(std::marker::PhantomData))
    }
}

/// The first two elements of an event array as the fields `event` and `data`.
struct ArgsAsFields<'a, A> {
    seq: &'a mut A,
    next: u8,
}

impl<'de, A: SeqAccess<'de>> MapAccess<'de> for ArgsAsFields<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let key = match self.next {
            0 => "event",
            1 => "data",
            _ => return Ok(None),
        };
        seed.deserialize(IntoDeserializer::<'de, A::Error>::into_deserializer(key))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        let field = self.next;
        self.next += 1;
        let mut slot = Some(seed);
        if let Some(value) = self.seq.next_element_seed(Take(&mut slot))? {
            return Ok(value);
        }
        match (field, slot) {
            // `["event"]`: an event without data.
            (1, Some(seed)) => {
                seed.deserialize(IntoDeserializer::<'de, A::Error>::into_deserializer(()))
            }
            _ => Err(serde::de::Error::invalid_length(0, &"an event name")),
        }
    }
}

/// A seed that leaves itself in place when the sequence has no element to give it.
struct Take<'a, S>(&'a mut Option<S>);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Take<'_, S> {
    type Value = S::Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        match self.0.take() {
            Some(seed) => seed.deserialize(d),
            None => Err(serde::de::Error::custom("seed used twice")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Event;
    use crate::protocol::{
        decode_socketio, Accepted, AckIds, ChatOut, JoinChat, Joined, SendMessage, ServerFrame,
    };
    use serde_json::value::RawValue;
    use serde_json::{json, Value};

    /// What the server makes of an event packet: name and first argument, through
    /// the server's own decoder of event data (`socketio::inbound`).
    fn server_decodes(packet_text: &str) -> ClientFrame {
        let Packet::Event(args) = packet(packet_text) else {
            panic!("not an event: {packet_text}");
        };
        let parts: Vec<&RawValue> = serde_json::from_str(args).expect("an array");
        let name: String = serde_json::from_str(parts[0].get()).expect("a name");
        decode_socketio(&name, parts.get(1).map(|d| d.get())).expect("a valid frame")
    }

    #[test]
    fn client_frames_become_events_the_server_decodes_back() {
        for frame in [
            ClientFrame::JoinChat(JoinChat::default()),
            ClientFrame::JoinChat(JoinChat {
                user_id: Some("alice".into()),
                device_id: crate::device::DeviceId::parse("laptop-1"),
            }),
            ClientFrame::ChatMessage(SendMessage {
                to: "bob".into(),
                chat_id: "c1".into(),
                message: "hi \"there\"".into(),
                client_msg_id: Some("7".into()),
            }),
            ClientFrame::Ack(AckIds {
                ids: vec!["65a0c0ffee0000000000abcd".into()],
            }),
        ] {
            let text = socketio_event(&frame).expect("encodes");
            assert!(text.starts_with("42[\""), "{text}");
            assert_eq!(server_decodes(&text), frame, "{text}");
        }
    }

    #[test]
    fn server_events_decode_into_the_v1_frames() {
        let frames = [
            ServerFrame::Joined(Joined {
                user_id: "bob".into(),
                instance: "a".into(),
                pending: 3,
                ..Joined::default()
            }),
            ServerFrame::ChatMessage(ChatOut {
                id: "65a0c0ffee0000000000abcd".into(),
                from: "alice".into(),
                to: "bob".into(),
                chat_id: "c".into(),
                message: "m".into(),
                timestamp: "2026-01-01T00:00:00Z".into(),
                redelivery: true,
            }),
            ServerFrame::MessageAccepted(Accepted {
                id: "65a0c0ffee0000000000abcd".into(),
                client_msg_id: Some("1".into()),
                timestamp: "2026-01-01T00:00:00Z".into(),
            }),
        ];
        for frame in frames {
            // The server emits the v1 frame's event and data (`socketio::outbound::emit`).
            let v1: Value = serde_json::from_str(&frame.encode()).expect("v1 JSON");
            let args = json!([v1["event"], v1["data"]]).to_string();
            let decoded: EventArgs<ServerFrame> = serde_json::from_str(&args).expect(&args);
            assert_eq!(decoded.0, frame);
            // Later arguments are ignored.
            let more = json!([v1["event"], v1["data"], {"x": 1}, 5]).to_string();
            let decoded: EventArgs<ServerFrame> = serde_json::from_str(&more).expect(&more);
            assert_eq!(decoded.0, frame);
        }
        for bad in [
            r#"[]"#,
            r#"["joined"]"#,
            r#"["nope",{}]"#,
            r#"{"event":"joined"}"#,
            "[5]",
        ] {
            assert!(
                serde_json::from_str::<EventArgs<ServerFrame>>(bad).is_err(),
                "{bad}"
            );
        }
        let e: EventArgs<Event> = serde_json::from_str(r#"["hello"]"#).expect("no data");
        assert_eq!((e.0.event.as_str(), e.0.data), ("hello", Value::Null));
        let e: EventArgs<Event> = serde_json::from_str(r#"["x",[1,2],3]"#).expect("data");
        assert_eq!(e.0.data, json!([1, 2]));
    }

    #[test]
    fn packets_are_sorted_by_engine_io_and_socket_io_type() {
        assert_eq!(packet(r#"0{"sid":"s"}"#), Packet::Open(r#"{"sid":"s"}"#));
        assert_eq!(packet("1"), Packet::Close);
        assert_eq!(packet("2"), Packet::Ping);
        assert_eq!(packet("3"), Packet::Pong);
        assert_eq!(packet("6"), Packet::Noop);
        assert_eq!(
            packet(r#"40{"sid":"x"}"#),
            Packet::Connect(r#"{"sid":"x"}"#)
        );
        assert_eq!(packet("41"), Packet::Disconnect);
        assert_eq!(packet(r#"42["a",1]"#), Packet::Event(r#"["a",1]"#));
        assert_eq!(packet(r#"4217["a",1]"#), Packet::Event(r#"["a",1]"#));
        assert_eq!(
            packet(r#"4312[{"acked":1}]"#),
            Packet::Ack(12, r#"[{"acked":1}]"#)
        );
        assert_eq!(
            packet(r#"44{"message":"invalid token: expired"}"#),
            Packet::ConnectError("invalid token: expired".into())
        );
        for other in [
            "",
            "2probe",
            "5",
            "4",
            r#"40/admin,{"sid":"x"}"#,
            r#"42/admin,["a"]"#,
            "451-[\"a\",{\"_placeholder\":true,\"num\":0}]",
            "43[1]",
            "x",
        ] {
            assert_eq!(packet(other), Packet::Other, "{other:?}");
        }
    }
}
