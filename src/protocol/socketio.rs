//! Socket.IO events as the Node Socket.IO server took them, decoded into the v1
//! [`ClientFrame`]s with the same validation (docs/SOCKETIO.md).

use serde::Deserialize;

use super::{AckIds, ClientFrame, JoinChat, SendMessage, MAX_ACK_IDS};
use crate::device::DeviceId;
use crate::error::Error;

/// A `chat_message` as the Node Socket.IO server took it: `receiver` may stand for `to`,
/// and other fields (the Node app's `sender`, say) are ignored — the sender is the token's
/// user. A repeated key is still an error.
#[derive(Deserialize)]
struct SocketIoSend {
    #[serde(alias = "receiver")]
    to: String,
    #[serde(rename = "chatId")]
    chat_id: String,
    message: String,
    #[serde(rename = "clientMsgId", default)]
    client_msg_id: Option<String>,
}

/// `join_chat` with an object: `userId` and `deviceId` if present; other fields are
/// ignored.
#[derive(Deserialize)]
struct SocketIoJoin {
    #[serde(rename = "userId", default)]
    user_id: Option<String>,
    #[serde(rename = "deviceId", default)]
    device_id: Option<DeviceId>,
}

#[derive(Deserialize)]
struct SocketIoAck {
    ids: Vec<String>,
}

/// Decodes one Socket.IO event: its name and the JSON text of its first argument (`None`
/// when it has none). The same frames and the same validation as [`decode`], from the
/// payloads the Node Socket.IO server took (see docs/SOCKETIO.md): `join_chat` with the
/// user id as a string, `chat_message` with `receiver` for `to`, `ack` with a bare id or
/// an array of ids. Never panics.
pub fn decode_socketio(event: &str, data: Option<&str>) -> Result<ClientFrame, Error> {
    let data = data.map(str::trim).filter(|d| *d != "null");
    let frame = match event {
        "join_chat" => ClientFrame::JoinChat(match data {
            None => JoinChat::default(),
            Some(d) if d.starts_with('"') => JoinChat {
                user_id: Some(from_json::<String>(d, "join_chat")?),
                device_id: None,
            },
            Some(d) if d.starts_with('{') => {
                let join = from_json::<SocketIoJoin>(d, "join_chat")?;
                JoinChat {
                    user_id: join.user_id,
                    device_id: join.device_id,
                }
            }
            Some(_) => return Err(Error::bad_request(JOIN_SHAPE)),
        }),
        "chat_message" => {
            let d = data
                .filter(|d| d.starts_with('{'))
                .ok_or_else(|| Error::bad_request(format!("`chat_message` takes {SEND_SHAPE}")))?;
            let m: SocketIoSend = serde_json::from_str(d).map_err(|e| {
                Error::bad_request(format!("`chat_message` takes {SEND_SHAPE}: {e}"))
                    .with_client_msg_id(client_msg_id_in(d))
            })?;
            let m = SendMessage {
                to: m.to,
                chat_id: m.chat_id,
                message: m.message,
                client_msg_id: m.client_msg_id,
            };
            m.validate()?;
            ClientFrame::ChatMessage(m)
        }
        "ack" => {
            let ids = match data {
                Some(d) if d.starts_with('"') => vec![from_json::<String>(d, "ack")?],
                Some(d) if d.starts_with('[') => from_json::<Vec<String>>(d, "ack")?,
                Some(d) if d.starts_with('{') => from_json::<SocketIoAck>(d, "ack")?.ids,
                _ => return Err(Error::bad_request(ACK_SHAPE)),
            };
            if ids.len() > MAX_ACK_IDS {
                return Err(Error::bad_request("`ack` takes at most 1000 ids"));
            }
            ClientFrame::Ack(AckIds { ids })
        }
        _ => {
            return Err(Error::bad_request(
                "unknown event: send `join_chat`, `chat_message` or `ack`",
            ))
        }
    };
    Ok(frame)
}

const JOIN_SHAPE: &str =
    "`join_chat` takes your user id as a string, `{\"userId\": ...}`, or nothing";
const SEND_SHAPE: &str = "{\"to\" (or \"receiver\"), \"chatId\", \"message\", \"clientMsgId\"?}";
const ACK_SHAPE: &str = "`ack` takes `{\"ids\": [...]}`, an id, or an array of ids";

fn from_json<'a, T: Deserialize<'a>>(data: &'a str, event: &str) -> Result<T, Error> {
    serde_json::from_str(data).map_err(|e| {
        let shape = if event == "ack" {
            ACK_SHAPE
        } else {
            JOIN_SHAPE
        };
        Error::bad_request(format!("{shape}: {e}"))
    })
}

/// The `clientMsgId` of a `chat_message` argument that failed to decode.
fn client_msg_id_in(data: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(data).ok()?;
    v["clientMsgId"].as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use crate::protocol::MAX_MESSAGE_BYTES;
    use proptest::prelude::*;

    fn sio(event: &str, data: Option<&str>) -> Result<ClientFrame, Error> {
        decode_socketio(event, data)
    }

    fn joins_as(user: Option<&str>) -> Result<ClientFrame, Error> {
        Ok(ClientFrame::JoinChat(JoinChat {
            user_id: user.map(str::to_owned),
            device_id: None,
        }))
    }

    #[test]
    fn socketio_join_takes_a_string_an_object_or_nothing() {
        assert_eq!(
            sio("join_chat", Some(r#""alice""#)),
            joins_as(Some("alice"))
        );
        assert_eq!(
            sio("join_chat", Some(r#"{"userId":"alice","room":"x"}"#)),
            joins_as(Some("alice"))
        );
        assert_eq!(sio("join_chat", Some("{}")), joins_as(None));
        assert_eq!(sio("join_chat", None), joins_as(None));
        assert_eq!(sio("join_chat", Some("null")), joins_as(None));
        for bad in ["5", "[\"alice\"]", r#"{"userId":7}"#, "\"unterminated"] {
            assert_eq!(
                sio("join_chat", Some(bad)).map_err(|e| e.code()),
                Err(ErrorCode::BadRequest),
                "{bad}"
            );
        }
    }

    #[test]
    fn socketio_chat_message_accepts_receiver_and_validates_as_v1() {
        let Ok(ClientFrame::ChatMessage(m)) = sio(
            "chat_message",
            Some(
                r#"{"receiver":"bob","sender":"alice","chatId":"c","message":"hi","clientMsgId":"k"}"#,
            ),
        ) else {
            panic!("decoded");
        };
        assert_eq!(
            (
                m.to.as_str(),
                m.chat_id.as_str(),
                m.client_msg_id.as_deref()
            ),
            ("bob", "c", Some("k"))
        );
        for bad in [
            r#"{"to":"bob","receiver":"eve","chatId":"c","message":"m"}"#,
            r#"{"to":"bob","to":"eve","chatId":"c","message":"m"}"#,
            r#"{"to":"b b","chatId":"c","message":"m"}"#,
            r#"{"to":"bob","chatId":"","message":"m"}"#,
            r#"["bob","c","m"]"#,
            r#""bob""#,
        ] {
            assert_eq!(
                sio("chat_message", Some(bad)).map_err(|e| e.code()),
                Err(ErrorCode::BadRequest),
                "{bad}"
            );
        }
        assert_eq!(
            sio("chat_message", None).map_err(|e| e.code()),
            Err(ErrorCode::BadRequest)
        );
        let big = format!(
            r#"{{"to":"bob","chatId":"c","message":"{}","clientMsgId":"k"}}"#,
            "x".repeat(MAX_MESSAGE_BYTES + 1)
        );
        let err = sio("chat_message", Some(&big)).expect_err("too large");
        assert_eq!(
            (err.code(), err.client_msg_id()),
            (ErrorCode::TooLarge, Some("k"))
        );
        let err = sio("chat_message", Some(r#"{"to":"bob","clientMsgId":"k2"}"#))
            .expect_err("missing fields");
        assert_eq!(err.client_msg_id(), Some("k2"));
    }

    #[test]
    fn socketio_ack_takes_ids_an_id_or_an_array() {
        let ack = |ids: &[&str]| {
            Ok(ClientFrame::Ack(AckIds {
                ids: ids.iter().map(|s| s.to_string()).collect(),
            }))
        };
        assert_eq!(sio("ack", Some(r#"{"ids":["a","b"]}"#)), ack(&["a", "b"]));
        assert_eq!(sio("ack", Some(r#""a""#)), ack(&["a"]));
        assert_eq!(sio("ack", Some(r#"["a","b"]"#)), ack(&["a", "b"]));
        let many = serde_json::to_string(&vec!["a"; MAX_ACK_IDS + 1]).unwrap_or_default();
        for bad in [
            None,
            Some("5"),
            Some(r#"{"ids":"a"}"#),
            Some("[1]"),
            Some(many.as_str()),
        ] {
            assert_eq!(
                sio("ack", bad).map_err(|e| e.code()),
                Err(ErrorCode::BadRequest),
                "{bad:?}"
            );
        }
        assert_eq!(
            sio("dance", Some("{}")).map_err(|e| e.code()),
            Err(ErrorCode::BadRequest)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_socketio_events_never_panic(event in prop_oneof![Just("join_chat".to_owned()), Just("chat_message".to_owned()), Just("ack".to_owned()), ".{0,12}"], data in proptest::option::of(".{0,300}")) {
            if let Ok(ClientFrame::ChatMessage(m)) = decode_socketio(&event, data.as_deref()) {
                prop_assert!(m.validate().is_ok());
            }
        }
    }
}
