//! A small client (tokio-tungstenite) that speaks the wire enums of [`crate::protocol`]
//! over protocol v1 (`/ws`) or over Socket.IO framing on a raw WebSocket (`/socket.io/`,
//! Engine.IO v4 / Socket.IO v5, default namespace), shared by `msgbuf smoke`, the load
//! generator and the integration tests. Either way the caller sends [`ClientFrame`]s and
//! reads [`ServerFrame`]s; the framing, the Socket.IO connect and the Engine.IO heartbeat
//! are handled here.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::protocol::{AckIds, ClientFrame, JoinChat, SendMessage, ServerFrame};

mod framing;

use framing::{
    packet, socketio_event, ConnectAuth, EventArgs, OpenPacket, Packet, DISCONNECT, PING, PONG,
};

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
    /// Socket.IO: the server refused the namespace connect (`44{"message"}`).
    #[error("socket.io connect_error: {0}")]
    ConnectError(String),
    /// Socket.IO: the server disconnected the socket (`41`) or closed the Engine.IO
    /// session (`1`).
    #[error("disconnected by the server (socket.io)")]
    Disconnected,
}

/// One server event.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub event: String,
    #[serde(default)]
    pub data: Value,
}

/// The wire protocol a client speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Proto {
    /// Protocol v1 on `/ws`: `{"event", "data"}` text frames, the token as bearer header.
    #[default]
    V1,
    /// Socket.IO v5 over Engine.IO v4 on `/socket.io/`, WebSocket transport only: the
    /// token in the namespace CONNECT's auth payload, events `42["event",data]`.
    SocketIo,
}

impl Proto {
    /// The URL of this protocol's endpoint on the server `url` names: v1 takes `url` as it
    /// is; Socket.IO keeps its scheme and authority and asks for `/socket.io/` over
    /// WebSocket (a URL already on `/socket.io` is kept, so a caller can choose a query).
    pub fn endpoint(self, url: &str) -> String {
        match self {
            Proto::V1 => url.to_owned(),
            Proto::SocketIo => {
                let (scheme, rest) = url.split_once("://").unwrap_or(("ws", url));
                let authority = rest.split(['/', '?']).next().unwrap_or(rest);
                let path = &rest[authority.len()..];
                if path.starts_with("/socket.io") {
                    url.to_owned()
                } else {
                    format!("{scheme}://{authority}{SOCKETIO_PATH}")
                }
            }
        }
    }
}

/// Engine.IO v4 over WebSocket from the first request (no long-polling, no upgrade).
const SOCKETIO_PATH: &str = "/socket.io/?EIO=4&transport=websocket";

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::V1 => "v1",
            Proto::SocketIo => "socketio",
        })
    }
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "v1" => Ok(Proto::V1),
            "socketio" | "socket.io" => Ok(Proto::SocketIo),
            _ => Err(format!("unknown protocol {s:?}: v1 or socketio")),
        }
    }
}

/// How a client connects: protocol, buffer sizes and the local address of its socket.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub proto: Proto,
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
            proto: Proto::V1,
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
    proto: Proto,
    /// Socket.IO: an Engine.IO ping was read and its pong is not sent yet. It is sent at the
    /// start of the next read, so a read cancelled mid-pong sends it again instead of
    /// losing it (a second pong is harmless; a missing one ends the session).
    pong_owed: bool,
}

impl WsClient {
    /// Connects to `url` (`ws://host:port/ws`) with `token` as bearer header.
    pub async fn connect(url: &str, token: &str) -> Result<Self, ClientError> {
        Self::connect_with(url, token, &ClientConfig::default()).await
    }

    /// Connects with `config`: TCP (from `config.local_addr` when set), then the handshake
    /// (and for Socket.IO the namespace connect). `url` is the endpoint itself; see
    /// [`Proto::endpoint`].
    pub async fn connect_with(
        url: &str,
        token: &str,
        config: &ClientConfig,
    ) -> Result<Self, ClientError> {
        let request = request(url, token, config.proto)?;
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
        Self::handshake_request(tcp, request, token, config).await
    }

    /// The WebSocket handshake (and for Socket.IO the namespace connect) over a TCP
    /// stream the caller opened.
    pub async fn handshake(
        tcp: TcpStream,
        url: &str,
        token: &str,
        config: &ClientConfig,
    ) -> Result<Self, ClientError> {
        Self::handshake_request(tcp, request(url, token, config.proto)?, token, config).await
    }

    async fn handshake_request(
        tcp: TcpStream,
        request: Request,
        token: &str,
        config: &ClientConfig,
    ) -> Result<Self, ClientError> {
        tcp.set_nodelay(true).map_err(io)?;
        let (ws, _) = tokio_tungstenite::client_async_with_config(
            request,
            MaybeTlsStream::Plain(tcp),
            Some(config.websocket()),
        )
        .await?;
        let mut client = WsClient {
            ws,
            proto: config.proto,
            pong_owed: false,
        };
        if config.proto == Proto::SocketIo {
            client.socketio_connect(token).await?;
        }
        Ok(client)
    }

    /// Engine.IO's open packet, then the default namespace's CONNECT with the token in
    /// its auth payload, as socket.io-client sends `io(url, { auth: { token } })`.
    async fn socketio_connect(&mut self, token: &str) -> Result<(), ClientError> {
        let open = self.next_text().await?;
        match packet(open.as_str()) {
            Packet::Open(json) if serde_json::from_str::<OpenPacket>(json).is_ok() => {}
            _ => return Err(ClientError::Unexpected(open.to_string())),
        }
        let auth = serde_json::to_string(&ConnectAuth { token })
            .map_err(|e| ClientError::Unexpected(e.to_string()))?;
        self.send_raw(format!("40{auth}")).await?;
        loop {
            let text = self.next_text().await?;
            match packet(text.as_str()) {
                Packet::Connect(_) => return Ok(()),
                Packet::ConnectError(message) => return Err(ClientError::ConnectError(message)),
                Packet::Close | Packet::Disconnect => return Err(ClientError::Disconnected),
                Packet::Ping | Packet::Pong | Packet::Noop => continue,
                // Nothing else comes before the namespace is connected.
                _ => return Err(ClientError::Unexpected(text.to_string())),
            }
        }
    }

    /// The protocol this client speaks.
    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// Sends a client frame in this client's protocol.
    pub async fn send_frame(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        let text = match self.proto {
            Proto::V1 => frame.encode(),
            Proto::SocketIo => socketio_event(frame)?,
        };
        self.send_raw(text).await
    }

    /// Sends any event (a name the server may not know, data of any shape).
    pub async fn send_event(&mut self, event: &str, data: Value) -> Result<(), ClientError> {
        let text = match self.proto {
            Proto::V1 => json!({"event": event, "data": data}).to_string(),
            Proto::SocketIo => format!("42{}", json!([event, data])),
        };
        self.send_raw(text).await
    }

    /// Sends one text frame as it is (an encoded frame, or anything a test wants to try):
    /// no Socket.IO framing is added.
    pub async fn send_raw(&mut self, text: String) -> Result<(), ClientError> {
        self.ws.send(Message::Text(text.into())).await?;
        Ok(())
    }

    pub async fn send_message(&mut self, message: Message) -> Result<(), ClientError> {
        self.ws.send(message).await?;
        Ok(())
    }

    /// The next text frame, with WebSocket pings, pongs and binary frames skipped and, for
    /// Socket.IO, Engine.IO pings answered. Cancel-safe: a frame is only taken off the
    /// socket in the same poll that returns it (or that records the pong it asks for).
    async fn next_text(&mut self) -> Result<Utf8Bytes, ClientError> {
        loop {
            if self.pong_owed {
                self.ws.send(Message::Text(PONG.into())).await?;
                self.pong_owed = false;
            }
            match self.ws.next().await {
                None => return Err(ClientError::Closed(None)),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(t))) => {
                    if self.proto == Proto::SocketIo && t.as_str() == PING {
                        self.pong_owed = true;
                        continue;
                    }
                    return Ok(t);
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(ClientError::Closed(frame.map(|f| f.code.into())))
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next application message: a v1 frame, or the argument array of a Socket.IO
    /// event. Engine.IO and Socket.IO control packets are handled here; an acknowledgement
    /// (this client asks for none) or any other packet is `Unexpected`.
    async fn next_message(&mut self) -> Result<AppText, ClientError> {
        loop {
            let text = self.next_text().await?;
            if self.proto == Proto::V1 {
                return Ok(AppText::V1(text));
            }
            match packet(text.as_str()) {
                Packet::Event(args) => {
                    let at = text.len() - args.len();
                    return Ok(AppText::Event(text, at));
                }
                Packet::Close | Packet::Disconnect => return Err(ClientError::Disconnected),
                Packet::ConnectError(message) => return Err(ClientError::ConnectError(message)),
                Packet::Ping
                | Packet::Pong
                | Packet::Noop
                | Packet::Open(_)
                | Packet::Connect(_) => continue,
                Packet::Ack(..) | Packet::Other => {
                    return Err(ClientError::Unexpected(text.to_string()))
                }
            }
        }
    }

    /// The next server frame, decoded; pings, pongs and binary frames are skipped (and
    /// Engine.IO pings answered). A message that is not a server frame is `Unexpected`
    /// (the socket stays usable); a close is `Closed` with its code, a Socket.IO
    /// disconnect `Disconnected`. Cancel-safe: a frame is only taken off the socket in the
    /// same poll that returns it, so this can sit in a `select!`.
    pub async fn recv(&mut self) -> Result<ServerFrame, ClientError> {
        match self.next_message().await? {
            AppText::V1(t) => {
                serde_json::from_str(t.as_str()).map_err(|_| ClientError::Unexpected(t.to_string()))
            }
            AppText::Event(t, at) => serde_json::from_str::<EventArgs<ServerFrame>>(&t[at..])
                .map(|args| args.0)
                .map_err(|_| ClientError::Unexpected(t.to_string())),
        }
    }

    /// The next event, or `Closed` with the close code.
    pub async fn next_event(&mut self, timeout: Duration) -> Result<Event, ClientError> {
        let message = tokio::time::timeout(timeout, self.next_message())
            .await
            .map_err(|_| ClientError::Timeout("an event".into()))??;
        match message {
            AppText::V1(t) => {
                let v: Value = serde_json::from_str(t.as_str())
                    .map_err(|_| ClientError::Unexpected(t.to_string()))?;
                Ok(Event {
                    event: v["event"].as_str().unwrap_or_default().to_owned(),
                    data: v["data"].clone(),
                })
            }
            AppText::Event(t, at) => serde_json::from_str::<EventArgs<Event>>(&t[at..])
                .map(|args| args.0)
                .map_err(|_| ClientError::Unexpected(t.to_string())),
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

    /// Sends `join_chat` as the device `device_id` and returns the `joined` data.
    pub async fn join_device(
        &mut self,
        device_id: &str,
        timeout: Duration,
    ) -> Result<Value, ClientError> {
        let device_id = crate::device::DeviceId::parse(device_id)
            .ok_or_else(|| ClientError::Unexpected(crate::device::DeviceId::RULE.to_owned()))?;
        self.send_frame(&ClientFrame::JoinChat(JoinChat {
            user_id: None,
            device_id: Some(device_id),
        }))
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

    /// Closes the connection (a Socket.IO client leaves its namespace first, as
    /// `socket.disconnect()` does).
    pub async fn close(mut self) {
        if self.proto == Proto::SocketIo {
            let _ = self.send_raw(DISCONNECT.to_owned()).await;
        }
        let _ = self.ws.close(None).await;
        // The server answers the close once the session ended (its acks recorded): wait
        // for it, so that a client that closes and reconnects finds them recorded.
        let answered = async {
            while let Some(Ok(msg)) = self.ws.next().await {
                if msg.is_close() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, answered).await;
    }
}

/// How long [`WsClient::close`] waits for the server's answer to its close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The handshake request for `url`: v1 carries `token` as bearer header; Socket.IO sends
/// it in the namespace CONNECT instead, as a browser client does.
fn request(url: &str, token: &str, proto: Proto) -> Result<Request, ClientError> {
    let mut request = url.into_client_request()?;
    if proto == Proto::V1 {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::Unexpected("token is not a valid header value".into()))?;
        request.headers_mut().insert("Authorization", value);
    }
    Ok(request)
}

fn io(e: std::io::Error) -> ClientError {
    ClientError::Ws(e.into())
}

/// An application message as read off the socket, before it is decoded.
enum AppText {
    V1(Utf8Bytes),
    /// A Socket.IO event packet and the offset of its argument array in it.
    Event(Utf8Bytes, usize),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Joined;
    use tokio::net::TcpListener;
    use tokio_tungstenite::WebSocketStream;

    #[test]
    fn endpoints_per_protocol() {
        let url = "ws://127.0.0.1:8080/ws";
        assert_eq!(Proto::V1.endpoint(url), url);
        assert_eq!(
            Proto::SocketIo.endpoint(url),
            "ws://127.0.0.1:8080/socket.io/?EIO=4&transport=websocket"
        );
        assert_eq!(
            Proto::SocketIo.endpoint("ws://[::1]:9"),
            "ws://[::1]:9/socket.io/?EIO=4&transport=websocket"
        );
        let own = "ws://h:1/socket.io/?EIO=4&transport=websocket&token=t";
        assert_eq!(Proto::SocketIo.endpoint(own), own);
        assert_eq!("socketio".parse(), Ok(Proto::SocketIo));
        assert_eq!("v1".parse(), Ok(Proto::V1));
        assert!("v2".parse::<Proto>().is_err());
        assert_eq!(Proto::SocketIo.to_string(), "socketio");
    }

    /// A scripted Engine.IO/Socket.IO server on loopback: one connection, `script` run
    /// on it.
    async fn server<F, Fut>(script: F) -> (String, tokio::task::JoinHandle<()>)
    where
        F: FnOnce(WebSocketStream<TcpStream>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let ws = tokio_tungstenite::accept_async(tcp)
                .await
                .expect("handshake");
            script(ws).await
        });
        (Proto::SocketIo.endpoint(&format!("ws://{addr}/ws")), task)
    }

    async fn text(ws: &mut WebSocketStream<TcpStream>) -> String {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return t.to_string(),
                Some(Ok(_)) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    async fn say(ws: &mut WebSocketStream<TcpStream>, t: &str) {
        ws.send(Message::Text(t.to_owned().into()))
            .await
            .expect("send");
    }

    fn config() -> ClientConfig {
        ClientConfig {
            proto: Proto::SocketIo,
            ..ClientConfig::default()
        }
    }

    #[tokio::test]
    async fn socketio_connects_with_the_token_answers_pings_and_frames_events() {
        let (url, server) = server(|mut ws| async move {
            say(&mut ws, r#"0{"sid":"e1","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":65536}"#).await;
            let connect = text(&mut ws).await;
            let auth: Value = serde_json::from_str(connect.strip_prefix("40").expect("40")).expect("auth");
            assert_eq!(auth, json!({"token": "jwt"}));
            say(&mut ws, "2").await; // a ping before the connect is answered, too
            assert_eq!(text(&mut ws).await, "3");
            say(&mut ws, r#"40{"sid":"s1"}"#).await;
            let join = text(&mut ws).await;
            assert_eq!(join, r#"42["join_chat",{}]"#);
            say(&mut ws, "2").await;
            say(&mut ws, r#"43[{"ignored":true}]"#).await; // no ack id: not an ack
            say(&mut ws, r#"42["joined",{"userId":"bob","instance":"a","pending":0}]"#).await;
            assert_eq!(text(&mut ws).await, "3");
            say(&mut ws, "41").await;
            assert_eq!(text(&mut ws).await, "41");
        })
        .await;
        let mut c = WsClient::connect_with(&url, "jwt", &config())
            .await
            .expect("connected");
        c.send_frame(&ClientFrame::JoinChat(JoinChat::default()))
            .await
            .expect("send");
        assert!(matches!(c.recv().await, Err(ClientError::Unexpected(_))));
        assert_eq!(
            c.recv().await.expect("joined"),
            ServerFrame::Joined(Joined {
                user_id: "bob".into(),
                instance: "a".into(),
                pending: 0,
                ..Joined::default()
            })
        );
        assert!(matches!(c.recv().await, Err(ClientError::Disconnected)));
        c.close().await;
        server.await.expect("server script");
    }

    #[tokio::test]
    async fn socketio_connect_error_fails_the_connect() {
        let (url, server) = server(|mut ws| async move {
            say(&mut ws, r#"0{"sid":"e1","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":65536}"#).await;
            let _ = text(&mut ws).await;
            say(&mut ws, r#"44{"message":"invalid token: expired"}"#).await;
        })
        .await;
        match WsClient::connect_with(&url, "old", &config()).await {
            Err(ClientError::ConnectError(m)) => assert_eq!(m, "invalid token: expired"),
            Err(e) => panic!("expected connect_error, got {e}"),
            Ok(_) => panic!("expected connect_error, got a connection"),
        }
        server.await.expect("server script");
    }
}
