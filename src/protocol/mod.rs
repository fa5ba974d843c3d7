//! Wire types of protocol v1 (`docs/PROTOCOL.md`): every frame is `{"event", "data"}`, and
//! both directions are serde-tagged enums, [`ClientFrame`] and [`ServerFrame`], shared by the
//! server, the bundled client, the load generator and the tests.
//!
//! [`decode`] (and [`decode_socketio`], the same frames from Socket.IO events, in
//! `protocol/socketio.rs`) never panics
//! and never closes the socket: every malformed frame maps to an [`Error`] that the session
//! sends back as an `error` event.

use serde::{Deserialize, Deserializer, Serialize};

use crate::auth::is_valid_user_id;
use crate::device::DeviceId;
use crate::error::{Error, ErrorCode, WireError};

mod socketio;

pub use socketio::decode_socketio;

/// Limits fixed by the protocol.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;
pub const MAX_CHAT_ID_CHARS: usize = 128;
pub const MAX_CLIENT_MSG_ID_CHARS: usize = 64;
pub const MAX_ACK_IDS: usize = 1000;

/// A frame from a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", content = "data", rename_all = "snake_case")]
pub enum ClientFrame {
    /// `data` may be left out: `{"event": "join_chat"}` joins as the token's user.
    JoinChat(JoinChat),
    ChatMessage(#[serde(deserialize_with = "object")] SendMessage),
    Ack(#[serde(deserialize_with = "object")] AckIds),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct JoinChat {
    #[serde(rename = "userId", skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The joining device's stable id: it then catches up on everything since its last
    /// join (docs/PROTOCOL.md, "Devices"). Without it, the socket is ephemeral.
    #[serde(rename = "deviceId", skip_serializing_if = "Option::is_none")]
    pub device_id: Option<DeviceId>,
}

impl<'de> Deserialize<'de> for JoinChat {
    /// From an object, or from nothing (`data` left out or `null`).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            #[serde(rename = "userId", default)]
            user_id: Option<String>,
            #[serde(rename = "deviceId", default)]
            device_id: Option<DeviceId>,
        }
        let fields: Fields = object_or_nothing(d)?;
        Ok(JoinChat {
            user_id: fields.user_id,
            device_id: fields.device_id,
        })
    }
}

/// A `chat_message` from a client (also the body of `POST /api/messages`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    pub to: String,
    #[serde(rename = "chatId")]
    pub chat_id: String,
    pub message: String,
    #[serde(
        rename = "clientMsgId",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub client_msg_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckIds {
    pub ids: Vec<String>,
}

/// Reads `T` only from a JSON object. A derived struct would also take an array, by
/// position (`["bob", "chat", "text"]`), which no client means.
fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    struct ObjectOnly<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectOnly<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
        }
    }
    d.deserialize_map(ObjectOnly(std::marker::PhantomData))
}

/// Like [`object`], and a missing (or `null`) `data` is the default.
fn object_or_nothing<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<T, D::Error> {
    struct OrNothing<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de> + Default> serde::de::Visitor<'de> for OrNothing<T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object or nothing")
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<T, E> {
            Ok(T::default())
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<T, E> {
            Ok(T::default())
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<T, D2::Error> {
            object(d)
        }
    }
    d.deserialize_option(OrNothing(std::marker::PhantomData))
}

impl SendMessage {
    pub fn validate(&self) -> Result<(), Error> {
        let err = |code, msg: &'static str| {
            Err(Error::new(code, msg).with_client_msg_id(self.client_msg_id.clone()))
        };
        if !is_valid_user_id(&self.to) {
            return err(
                ErrorCode::BadRequest,
                "`to` must be 1..=128 characters of [A-Za-z0-9_.@:-]",
            );
        }
        let chat_chars = self.chat_id.chars().count();
        if chat_chars == 0 || chat_chars > MAX_CHAT_ID_CHARS {
            return err(ErrorCode::BadRequest, "`chatId` must be 1..=128 characters");
        }
        if self.message.is_empty() {
            return err(ErrorCode::BadRequest, "`message` must not be empty");
        }
        if self.message.len() > MAX_MESSAGE_BYTES {
            return err(ErrorCode::TooLarge, "`message` is larger than 16384 bytes");
        }
        if let Some(id) = &self.client_msg_id {
            let n = id.chars().count();
            if n == 0 || n > MAX_CLIENT_MSG_ID_CHARS {
                return err(
                    ErrorCode::BadRequest,
                    "`clientMsgId` must be 1..=64 characters",
                );
            }
        }
        Ok(())
    }
}

/// Decodes one text frame. Field validation is part of decoding, so a decoded
/// [`ClientFrame::ChatMessage`] is ready to store.
pub fn decode(text: &str) -> Result<ClientFrame, Error> {
    let frame: ClientFrame = serde_json::from_str(text).map_err(|e| {
        Error::bad_request(format!(
            "frames are JSON objects {{\"event\": \"join_chat\"|\"chat_message\"|\"ack\", \"data\": {{...}}}}: {e}"
        ))
        .with_client_msg_id(client_msg_id_of(text))
    })?;
    match &frame {
        ClientFrame::ChatMessage(m) => m.validate()?,
        ClientFrame::Ack(a) if a.ids.len() > MAX_ACK_IDS => {
            return Err(Error::bad_request("`ack` takes at most 1000 ids"))
        }
        _ => {}
    }
    Ok(frame)
}

/// The `clientMsgId` of a frame that failed to decode, so the error can name it.
fn client_msg_id_of(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    if v["event"] != "chat_message" {
        return None;
    }
    v["data"]["clientMsgId"].as_str().map(str::to_owned)
}

/// A frame from the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", content = "data", rename_all = "snake_case")]
pub enum ServerFrame {
    ChatMessage(ChatOut),
    MessageAccepted(Accepted),
    Joined(Joined),
    Receipt(Receipt),
    Error(WireError),
}

impl ServerFrame {
    /// The JSON text of the frame.
    pub fn encode(&self) -> String {
        // These plain structs always serialise; an empty object keeps the socket alive
        // even if one ever did not.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }
}

impl ClientFrame {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// `chat_message` from the server.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct ChatOut {
    pub id: String,
    pub from: String,
    pub to: String,
    #[serde(rename = "chatId")]
    pub chat_id: String,
    pub message: String,
    pub timestamp: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub redelivery: bool,
}

/// A stored send: `message_accepted` on the socket, the 201 body of `POST /api/messages`.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub id: String,
    #[serde(rename = "clientMsgId")]
    pub client_msg_id: Option<String>,
    pub timestamp: String,
}

#[derive(Debug, Default, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Joined {
    #[serde(rename = "userId")]
    pub user_id: String,
    pub instance: String,
    pub pending: u64,
    /// The device that joined, for a device's join.
    #[serde(rename = "deviceId", default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// For a device's join: true when it was away longer than the retention, so what it
    /// missed may be gone (the client reloads history from its app).
    #[serde(
        rename = "missedHistory",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub missed_history: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub id: String,
    pub status: String,
    pub at: String,
}

/// RFC 3339 with milliseconds, UTC (`2026-11-26T19:49:52.123Z`).
pub fn rfc3339(dt: mongodb::bson::DateTime) -> String {
    humantime::format_rfc3339_millis(dt.to_system_time()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn code_of(text: &str) -> Option<ErrorCode> {
        decode(text).err().map(|e| e.code())
    }

    #[test]
    fn decodes_the_three_events() {
        assert_eq!(
            decode(r#"{"event":"join_chat","data":{}}"#),
            Ok(ClientFrame::JoinChat(JoinChat::default()))
        );
        assert_eq!(
            decode(r#"{"event":"join_chat"}"#),
            Ok(ClientFrame::JoinChat(JoinChat::default()))
        );
        let chat = decode(
            r#"{"event":"chat_message","data":{"to":"bob","chatId":"c","message":"hi","clientMsgId":"k1"}}"#,
        );
        assert!(
            matches!(chat, Ok(ClientFrame::ChatMessage(ref m)) if m.to == "bob" && m.client_msg_id.as_deref() == Some("k1"))
        );
        assert_eq!(
            decode(r#"{"event":"ack","data":{"ids":["a"]}}"#),
            Ok(ClientFrame::Ack(AckIds {
                ids: vec!["a".into()]
            }))
        );
    }

    #[test]
    fn rejects_bad_frames_with_codes() {
        for bad in [
            "nope",
            "[]",
            r#"{"data":{}}"#,
            r#"{"event":"dance","data":{}}"#,
            r#"{"event":"chat_message","data":{"to":"bob"}}"#,
            r#"{"event":"chat_message","data":{"to":5,"chatId":"c","message":"m"}}"#,
            r#"{"event":"chat_message","data":{"to":"b b","chatId":"c","message":"m"}}"#,
            r#"{"event":"ack","data":{"ids":"x"}}"#,
        ] {
            assert_eq!(code_of(bad), Some(ErrorCode::BadRequest), "{bad}");
        }
        let big = format!(
            r#"{{"event":"chat_message","data":{{"to":"bob","chatId":"c","message":"{}","clientMsgId":"k"}}}}"#,
            "x".repeat(MAX_MESSAGE_BYTES + 1)
        );
        let err = decode(&big).expect_err("too large");
        assert_eq!(
            (err.code(), err.client_msg_id()),
            (ErrorCode::TooLarge, Some("k"))
        );
    }

    #[test]
    fn data_must_be_an_object_without_repeated_keys() {
        for bad in [
            r#"{"event":"chat_message","data":["bob","chat","text","id"]}"#,
            r#"{"event":"chat_message","data":{"to":"bob","to":"mallory","chatId":"c","message":"m"}}"#,
            r#"{"event":"join_chat","data":["me"]}"#,
            r#"{"event":"ack","data":[["a"]]}"#,
            r#"{"event":"ack","event":"ack","data":{"ids":[]}}"#,
        ] {
            assert_eq!(code_of(bad), Some(ErrorCode::BadRequest), "{bad}");
        }
    }

    #[test]
    fn a_decode_error_of_a_send_names_its_client_msg_id() {
        let err = decode(r#"{"event":"chat_message","data":{"to":"bob","clientMsgId":"k9"}}"#)
            .expect_err("missing fields");
        assert_eq!(err.client_msg_id(), Some("k9"));
    }

    #[test]
    fn server_frames_round_trip_in_the_documented_shape() {
        let frame = ServerFrame::Joined(Joined {
            user_id: "bob".into(),
            instance: "a".into(),
            pending: 3,
            ..Joined::default()
        });
        let text = frame.encode();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).ok(),
            Some(
                serde_json::json!({"event": "joined", "data": {"userId": "bob", "instance": "a", "pending": 3}})
            )
        );
        assert_eq!(serde_json::from_str::<ServerFrame>(&text).ok(), Some(frame));
        let send = ClientFrame::ChatMessage(SendMessage {
            to: "bob".into(),
            chat_id: "c".into(),
            message: "m".into(),
            client_msg_id: None,
        });
        assert_eq!(decode(&send.encode()), Ok(send));
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(s in ".{0,300}") {
            let _ = decode(&s);
        }

        #[test]
        fn arbitrary_frames_map_to_event_or_error(event in prop_oneof![Just("join_chat".to_owned()), Just("chat_message".to_owned()), Just("ack".to_owned()), "[a-z_]{0,12}"],
                                                  to in ".{0,140}", chat in ".{0,140}", msg in ".{0,200}", ids in proptest::collection::vec(".{0,30}", 0..4)) {
            let v = serde_json::json!({"event": event, "data": {"to": to, "chatId": chat, "message": msg, "ids": ids}});
            match decode(&v.to_string()) {
                Ok(ClientFrame::ChatMessage(m)) => prop_assert!(m.validate().is_ok()),
                Ok(_) => {}
                Err(e) => prop_assert!(!e.message().is_empty()),
            }
            let only_chat = serde_json::json!({"event": "chat_message", "data": {"to": to, "chatId": chat, "message": msg}});
            if let Ok(ClientFrame::ChatMessage(m)) = decode(&only_chat.to_string()) {
                prop_assert!(m.validate().is_ok());
            }
        }
    }
}
