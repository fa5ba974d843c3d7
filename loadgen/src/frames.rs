//! Every frame the load generator sends is built here (and framed for the connection's
//! protocol by [`WsClient::send_frame`](msgbuf::client::WsClient::send_frame)); every frame
//! it reads is decoded by [`WsClient::recv`](msgbuf::client::WsClient::recv) and sorted here.

use msgbuf::client::ClientError;
use msgbuf::protocol::{AckIds, ClientFrame, JoinChat, SendMessage, ServerFrame};

pub fn join() -> ClientFrame {
    ClientFrame::JoinChat(JoinChat::default())
}

/// `join_chat` as the device `device` of the token's user.
pub fn join_device(device: &str) -> anyhow::Result<ClientFrame> {
    let device_id = msgbuf::DeviceId::parse(device)
        .ok_or_else(|| anyhow::anyhow!("{}", msgbuf::DeviceId::RULE))?;
    Ok(ClientFrame::JoinChat(JoinChat {
        user_id: None,
        device_id: Some(device_id),
    }))
}

/// A `chat_message` whose `clientMsgId` is the sender's sequence number, so the
/// `message_accepted` names the send it answers.
pub fn chat(to: &str, chat: &str, text: String, seq: u64) -> ClientFrame {
    ClientFrame::ChatMessage(SendMessage {
        to: to.to_owned(),
        chat_id: chat.to_owned(),
        message: text,
        client_msg_id: Some(seq.to_string()),
    })
}

pub fn ack(ids: Vec<String>) -> ClientFrame {
    ClientFrame::Ack(AckIds { ids })
}

/// The sequence number a `message_accepted` or `error` answers (see [`chat`]).
pub fn seq_of(client_msg_id: Option<&str>) -> Option<u64> {
    client_msg_id?.parse().ok()
}

/// An error code as it is on the wire (`bad_request`, …): the key of `error_codes`.
pub fn code_name<T: serde::Serialize>(code: &T) -> String {
    match serde_json::to_value(code) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".to_owned(),
    }
}

pub enum Incoming {
    Frame(ServerFrame),
    /// A text frame that is no server frame: ignored.
    Other,
    Closed(String),
}

pub fn classify(received: Result<ServerFrame, ClientError>) -> Incoming {
    match received {
        Ok(frame) => Incoming::Frame(frame),
        Err(ClientError::Unexpected(_)) => Incoming::Other,
        Err(ClientError::Closed(None)) => Incoming::Closed("eof".into()),
        Err(ClientError::Closed(Some(code))) => Incoming::Closed(format!("close {code}")),
        Err(ClientError::Disconnected) => Incoming::Closed("socket.io disconnect".into()),
        Err(e) => Incoming::Closed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_decodes_every_frame_built_here() {
        for frame in [
            join(),
            chat("bob", "c1", "t=1;p=0;n=0;xx".into(), 7),
            ack(vec!["65a0c0ffee0000000000abcd".to_owned()]),
        ] {
            let text = frame.encode();
            assert_eq!(msgbuf::protocol::decode(&text), Ok(frame), "{text}");
        }
    }

    #[test]
    fn sequence_numbers_round_trip_through_client_msg_id() {
        let frame: serde_json::Value =
            serde_json::from_str(&chat("bob", "c", "m".into(), 42).encode()).expect("JSON");
        assert_eq!(seq_of(frame["data"]["clientMsgId"].as_str()), Some(42));
        assert_eq!(seq_of(Some("x")), None);
    }
}
