//! Wire types of protocol v1 (`docs/PROTOCOL.md`) and the decoder of client frames.
//!
//! Decoding never panics and never closes the socket: every malformed frame maps to a
//! [`ProtocolError`] that the socket task sends back as an `error` event.

use serde::{Deserialize, Serialize};

use crate::auth::is_valid_user_id;

/// Limits fixed by the protocol.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;
pub const MAX_CHAT_ID_CHARS: usize = 128;
pub const MAX_CLIENT_MSG_ID_CHARS: usize = 64;
pub const MAX_ACK_IDS: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    TooLarge,
    RateLimited,
    Unavailable,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
    pub client_msg_id: Option<String>,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
            client_msg_id: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn with_client_msg_id(mut self, id: Option<String>) -> Self {
        self.client_msg_id = id;
        self
    }

    /// The `error` event frame.
    pub fn to_frame(&self) -> String {
        frame(
            "error",
            &ErrorOut {
                code: self.code,
                message: &self.message,
                client_msg_id: self.client_msg_id.as_deref(),
            },
        )
    }
}

/// A `chat_message` from a client (also the body of `POST /api/messages`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    pub to: String,
    #[serde(rename = "chatId")]
    pub chat_id: String,
    pub message: String,
    #[serde(rename = "clientMsgId", default)]
    pub client_msg_id: Option<String>,
}

impl SendMessage {
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let err = |code, msg: &str| {
            Err(ProtocolError::new(code, msg).with_client_msg_id(self.client_msg_id.clone()))
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

/// A decoded client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    Join { user_id: Option<String> },
    Chat(SendMessage),
    Ack { ids: Vec<String> },
}

#[derive(Deserialize)]
struct RawFrame {
    event: String,
    #[serde(default)]
    data: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinData {
    #[serde(rename = "userId", default)]
    user_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckData {
    ids: Vec<String>,
}

/// Decodes one text frame. Field validation of `chat_message` is part of decoding, so a
/// decoded [`ClientEvent::Chat`] is ready to store.
pub fn decode(text: &str) -> Result<ClientEvent, ProtocolError> {
    let raw: RawFrame = serde_json::from_str(text).map_err(|e| {
        ProtocolError::bad_request(format!(
            "frames are JSON objects {{\"event\": ..., \"data\": {{...}}}}: {e}"
        ))
    })?;
    let data = raw
        .data
        .unwrap_or_else(|| serde_json::Value::Object(Default::default()));
    match raw.event.as_str() {
        "join_chat" => {
            let join: JoinData = from_data(&raw.event, data)?;
            Ok(ClientEvent::Join {
                user_id: join.user_id,
            })
        }
        "chat_message" => {
            let client_msg_id = data
                .get("clientMsgId")
                .and_then(|v| v.as_str())
                .map(str::to_owned);
            let msg: SendMessage =
                from_data(&raw.event, data).map_err(|e| e.with_client_msg_id(client_msg_id))?;
            msg.validate()?;
            Ok(ClientEvent::Chat(msg))
        }
        "ack" => {
            let ack: AckData = from_data(&raw.event, data)?;
            if ack.ids.len() > MAX_ACK_IDS {
                return Err(ProtocolError::bad_request("`ack` takes at most 1000 ids"));
            }
            Ok(ClientEvent::Ack { ids: ack.ids })
        }
        other => Err(ProtocolError::bad_request(format!(
            "unknown event `{}` (expected join_chat, chat_message or ack)",
            truncate(other, 64)
        ))),
    }
}

fn from_data<T: serde::de::DeserializeOwned>(
    event: &str,
    data: serde_json::Value,
) -> Result<T, ProtocolError> {
    serde_json::from_value(data)
        .map_err(|e| ProtocolError::bad_request(format!("invalid `{event}` data: {e}")))
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Serialises `{"event": name, "data": data}`.
pub fn frame<T: Serialize>(event: &str, data: &T) -> String {
    #[derive(Serialize)]
    struct Frame<'a, T> {
        event: &'a str,
        data: &'a T,
    }
    // Serialising these plain structs cannot fail; an empty object keeps the socket alive
    // even if it ever did.
    serde_json::to_string(&Frame { event, data }).unwrap_or_else(|_| "{}".to_owned())
}

#[derive(Serialize)]
struct ErrorOut<'a> {
    code: ErrorCode,
    message: &'a str,
    #[serde(rename = "clientMsgId", skip_serializing_if = "Option::is_none")]
    client_msg_id: Option<&'a str>,
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

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub id: String,
    #[serde(rename = "clientMsgId")]
    pub client_msg_id: Option<String>,
    pub timestamp: String,
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Joined {
    #[serde(rename = "userId")]
    pub user_id: String,
    pub instance: String,
    pub pending: u64,
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

    #[test]
    fn decodes_the_three_events() {
        assert_eq!(
            decode(r#"{"event":"join_chat","data":{}}"#),
            Ok(ClientEvent::Join { user_id: None })
        );
        assert_eq!(
            decode(r#"{"event":"join_chat"}"#),
            Ok(ClientEvent::Join { user_id: None })
        );
        let chat = decode(
            r#"{"event":"chat_message","data":{"to":"bob","chatId":"c","message":"hi","clientMsgId":"k1"}}"#,
        );
        assert!(
            matches!(chat, Ok(ClientEvent::Chat(ref m)) if m.to == "bob" && m.client_msg_id.as_deref() == Some("k1"))
        );
        assert_eq!(
            decode(r#"{"event":"ack","data":{"ids":["a"]}}"#),
            Ok(ClientEvent::Ack {
                ids: vec!["a".into()]
            })
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
            assert_eq!(
                decode(bad).map_err(|e| e.code),
                Err(ErrorCode::BadRequest),
                "{bad}"
            );
        }
        let big = format!(
            r#"{{"event":"chat_message","data":{{"to":"bob","chatId":"c","message":"{}","clientMsgId":"k"}}}}"#,
            "x".repeat(MAX_MESSAGE_BYTES + 1)
        );
        let err = decode(&big).expect_err("too large");
        assert_eq!(
            (err.code, err.client_msg_id.as_deref()),
            (ErrorCode::TooLarge, Some("k"))
        );
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
                Ok(ClientEvent::Chat(m)) => prop_assert!(m.validate().is_ok()),
                Ok(_) => {}
                Err(e) => prop_assert!(!e.message.is_empty()),
            }
            let only_chat = serde_json::json!({"event": "chat_message", "data": {"to": to, "chatId": chat, "message": msg}});
            if let Ok(ClientEvent::Chat(m)) = decode(&only_chat.to_string()) {
                prop_assert!(m.validate().is_ok());
            }
        }
    }
}
