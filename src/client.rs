//! A small protocol-v1 client (tokio-tungstenite), shared by `msgbuf smoke`, the load
//! generator and the integration tests.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("connection closed{}", .0.as_ref().map(|c| format!(" with code {c}")).unwrap_or_default())]
    Closed(Option<u16>),
    #[error("unexpected frame: {0}")]
    Unexpected(String),
}

/// One server event.
#[derive(Debug, Clone)]
pub struct Event {
    pub event: String,
    pub data: Value,
}

pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    /// Connects to `url` (`ws://host:port/ws`) with `token` as bearer header.
    pub async fn connect(url: &str, token: &str) -> Result<Self, ClientError> {
        let mut request = url.into_client_request()?;
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::Unexpected("token is not a valid header value".into()))?;
        request.headers_mut().insert("Authorization", value);
        let config = WebSocketConfig::default()
            .read_buffer_size(8 * 1024)
            .write_buffer_size(0)
            .max_message_size(Some(1 << 20));
        let (ws, _) =
            tokio_tungstenite::connect_async_with_config(request, Some(config), true).await?;
        Ok(WsClient { ws })
    }

    pub async fn send_event(&mut self, event: &str, data: Value) -> Result<(), ClientError> {
        self.send_raw(json!({"event": event, "data": data}).to_string())
            .await
    }

    pub async fn send_raw(&mut self, text: String) -> Result<(), ClientError> {
        self.ws.send(Message::Text(text.into())).await?;
        Ok(())
    }

    pub async fn send_message(&mut self, message: Message) -> Result<(), ClientError> {
        self.ws.send(message).await?;
        Ok(())
    }

    /// The next event, or `Closed` with the close code.
    pub async fn next_event(&mut self, timeout: Duration) -> Result<Event, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| ClientError::Timeout("an event".into()))?;
            match frame {
                None => return Err(ClientError::Closed(None)),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str())
                        .map_err(|_| ClientError::Unexpected(t.to_string()))?;
                    return Ok(Event {
                        event: v["event"].as_str().unwrap_or_default().to_owned(),
                        data: v["data"].clone(),
                    });
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(ClientError::Closed(frame.map(|f| f.code.into())))
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Skips events until one named `name` arrives.
    pub async fn expect(&mut self, name: &str, timeout: Duration) -> Result<Event, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Ok(e) if e.event == name => return Ok(e),
                Ok(_) => continue,
                Err(ClientError::Timeout(_)) => return Err(ClientError::Timeout(name.to_owned())),
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `join_chat` and returns the `joined` data.
    pub async fn join(&mut self, timeout: Duration) -> Result<Value, ClientError> {
        self.send_event("join_chat", json!({})).await?;
        Ok(self.expect("joined", timeout).await?.data)
    }

    pub async fn chat(
        &mut self,
        to: &str,
        chat_id: &str,
        message: &str,
        client_msg_id: Option<&str>,
    ) -> Result<(), ClientError> {
        let mut data = json!({"to": to, "chatId": chat_id, "message": message});
        if let Some(id) = client_msg_id {
            data["clientMsgId"] = json!(id);
        }
        self.send_event("chat_message", data).await
    }

    pub async fn ack(&mut self, ids: &[String]) -> Result<(), ClientError> {
        self.send_event("ack", json!({"ids": ids})).await
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}
