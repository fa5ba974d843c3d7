//! The document: one chat message in the buffer, with the original app's field names.

use std::time::Duration;

use mongodb::bson::{oid::ObjectId, DateTime};
use serde::{Deserialize, Serialize};

use crate::protocol::{rfc3339, Accepted, ChatOut};

/// One chat message in the buffer. Field names are the original app's (`chatId`, …).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BufferedMessage {
    #[serde(rename = "_id")]
    pub id: ObjectId,
    pub receiver: String,
    pub sender: String,
    pub chat_id: String,
    pub message: String,
    /// Acceptance time (also encoded in `_id`).
    pub timestamp: DateTime,
    /// Flipped false -> true exactly once, by the claim.
    pub delivered: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<DateTime>,
    /// Instance that recorded the delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_by: Option<String>,
    /// Last time the message was written to a socket; the ack timeout runs from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed_at: Option<DateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_at: Option<DateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
    /// The sender's device, when it sent from one: that device's catch-up skips it (it
    /// has what it sent); the sender's other devices get it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_device: Option<String>,
    #[serde(default)]
    pub redeliveries: i32,
    pub updated_at: DateTime,
}

impl BufferedMessage {
    pub fn new(
        sender: &str,
        receiver: &str,
        chat_id: &str,
        message: &str,
        client_msg_id: Option<String>,
    ) -> Self {
        let now = DateTime::now();
        BufferedMessage {
            id: ObjectId::new(),
            receiver: receiver.to_owned(),
            sender: sender.to_owned(),
            chat_id: chat_id.to_owned(),
            message: message.to_owned(),
            timestamp: now,
            delivered: false,
            delivered_at: None,
            delivered_by: None,
            pushed_at: None,
            acked_at: None,
            client_msg_id,
            sender_device: None,
            redeliveries: 0,
            updated_at: now,
        }
    }

    /// The `chat_message` payload a receiver sees.
    pub fn to_wire(&self, redelivery: bool) -> ChatOut {
        ChatOut {
            id: self.id.to_hex(),
            from: self.sender.clone(),
            to: self.receiver.clone(),
            chat_id: self.chat_id.clone(),
            message: self.message.clone(),
            timestamp: rfc3339(self.timestamp),
            redelivery,
        }
    }

    /// What the sender is told once the message is stored.
    pub fn accepted(&self) -> Accepted {
        Accepted {
            id: self.id.to_hex(),
            client_msg_id: self.client_msg_id.clone(),
            timestamp: rfc3339(self.timestamp),
        }
    }

    /// Pushed, unacknowledged, and past its ack timeout (`cutoff` from [`overdue_cutoff`]):
    /// the in-memory twin of the store's overdue filter.
    pub fn is_overdue(&self, cutoff: DateTime) -> bool {
        self.is_unacked() && self.pushed_at.is_some_and(|p| p < cutoff)
    }

    /// Pushed (to some socket of the receiver), not acknowledged yet.
    pub fn is_unacked(&self) -> bool {
        self.delivered && self.acked_at.is_none()
    }
}

/// Pushes before this instant without an ack are overdue for a re-send.
pub fn overdue_cutoff(ack_timeout: Duration) -> DateTime {
    DateTime::from_millis(DateTime::now().timestamp_millis() - ack_timeout.as_millis() as i64)
}
