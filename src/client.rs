//! A small protocol-v1 client (tokio-tungstenite) that speaks the wire enums of
//! [`crate::protocol`], shared by `msgbuf smoke`, the load generator and the integration
//! tests.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::protocol::{AckIds, ClientFrame, JoinChat, SendMessage, ServerFrame};

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

/// How a client connects: buffer sizes and the local address of its socket.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Bytes read from the socket at a time. Small for many idle sockets; large enough
    /// for a drain's burst otherwise.
    pub read_buffer: usize,
    /// Largest frame accepted from the server.
    pub max_message: usize,
    /// Local address to bind the socket to (any port): one loopback address gives one
    /// ephemeral port range, so many connections need several.
    pub local_addr: Option<IpAddr>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            read_buffer: 8 * 1024,
            max_message: 1 << 20,
            local_addr: None,
        }
    }
}

impl ClientConfig {
    fn websocket(&self) -> WebSocketConfig {
        // Unbuffered writes: every frame goes out when it is sent, as a chat client's would.
        WebSocketConfig::default()
            .read_buffer_size(self.read_buffer)
            .write_buffer_size(0)
            .max_message_size(Some(self.max_message))
    }
}

pub struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    /// Connects to `url` (`ws://host:port/ws`) with `token` as bearer header.
    pub async fn connect(url: &str, token: &str) -> Result<Self, ClientError> {
        Self::connect_with(url, token, &ClientConfig::default()).await
    }

    /// Connects with `config`: TCP (from `config.local_addr` when set), then the handshake.
    pub async fn connect_with(
        url: &str,
        token: &str,
        config: &ClientConfig,
    ) -> Result<Self, ClientError> {
        let request = request(url, token)?;
        if request.uri().scheme_str() != Some("ws") {
            // No TLS in this build: a wss:// URL must fail, not talk plain TCP to it.
            return Err(ClientError::Unexpected(format!("only ws:// URLs: {url}")));
        }
        let host = request
            .uri()
            .host()
            .ok_or_else(|| ClientError::Unexpected(format!("URL without host: {url}")))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_owned();
        let port = request.uri().port_u16().unwrap_or(80);
        let tcp = match config.local_addr {
            None => TcpStream::connect((host.as_str(), port))
                .await
                .map_err(io)?,
            Some(local) => {
                let remote = tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map_err(io)?
                    .find(|a| a.is_ipv4() == local.is_ipv4())
                    .ok_or_else(|| {
                        ClientError::Unexpected(format!("{host} has no address like {local}"))
                    })?;
                let socket = if local.is_ipv4() {
                    TcpSocket::new_v4()
                } else {
                    TcpSocket::new_v6()
                }
                .map_err(io)?;
                socket.bind(SocketAddr::new(local, 0)).map_err(io)?;
                socket.connect(remote).await.map_err(io)?
            }
        };
        Self::handshake_request(tcp, request, config).await
    }

    /// The WebSocket handshake over a TCP stream the caller opened.
    pub async fn handshake(
        tcp: TcpStream,
        url: &str,
        token: &str,
        config: &ClientConfig,
    ) -> Result<Self, ClientError> {
        Self::handshake_request(tcp, request(url, token)?, config).await
    }

    async fn handshake_request(
        tcp: TcpStream,
        request: Request,
        config: &ClientConfig,
    ) -> Result<Self, ClientError> {
        tcp.set_nodelay(true).map_err(io)?;
        let (ws, _) = tokio_tungstenite::client_async_with_config(
            request,
            MaybeTlsStream::Plain(tcp),
            Some(config.websocket()),
        )
        .await?;
        Ok(WsClient { ws })
    }

    pub async fn send_frame(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        self.send_raw(frame.encode()).await
    }

    pub async fn send_event(&mut self, event: &str, data: Value) -> Result<(), ClientError> {
        self.send_raw(json!({"event": event, "data": data}).to_string())
            .await
    }

    /// Sends one text frame as it is (an encoded frame, or anything a test wants to try).
    pub async fn send_raw(&mut self, text: String) -> Result<(), ClientError> {
        self.ws.send(Message::Text(text.into())).await?;
        Ok(())
    }

    pub async fn send_message(&mut self, message: Message) -> Result<(), ClientError> {
        self.ws.send(message).await?;
        Ok(())
    }

    /// The next server frame, decoded; pings, pongs and binary frames are skipped. A text
    /// frame that is not a server frame is `Unexpected` (the socket stays usable); a close
    /// is `Closed` with its code. Cancel-safe: a frame is only taken off the socket in the
    /// same poll that returns it, so this can sit in a `select!`.
    pub async fn recv(&mut self) -> Result<ServerFrame, ClientError> {
        loop {
            match self.ws.next().await {
                None => return Err(ClientError::Closed(None)),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(t.as_str())
                        .map_err(|_| ClientError::Unexpected(t.to_string()))
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(ClientError::Closed(frame.map(|f| f.code.into())))
                }
                Some(Ok(_)) => continue,
            }
        }
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
        self.send_frame(&ClientFrame::JoinChat(JoinChat::default()))
            .await?;
        Ok(self.expect("joined", timeout).await?.data)
    }

    pub async fn chat(
        &mut self,
        to: &str,
        chat_id: &str,
        message: &str,
        client_msg_id: Option<&str>,
    ) -> Result<(), ClientError> {
        self.send_frame(&ClientFrame::ChatMessage(SendMessage {
            to: to.to_owned(),
            chat_id: chat_id.to_owned(),
            message: message.to_owned(),
            client_msg_id: client_msg_id.map(str::to_owned),
        }))
        .await
    }

    pub async fn ack(&mut self, ids: &[String]) -> Result<(), ClientError> {
        self.send_frame(&ClientFrame::Ack(AckIds { ids: ids.to_vec() }))
            .await
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// The handshake request for `url` with `token` as bearer header.
fn request(url: &str, token: &str) -> Result<Request, ClientError> {
    let mut request = url.into_client_request()?;
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|_| ClientError::Unexpected("token is not a valid header value".into()))?;
    request.headers_mut().insert("Authorization", value);
    Ok(request)
}

fn io(e: std::io::Error) -> ClientError {
    ClientError::Ws(e.into())
}
