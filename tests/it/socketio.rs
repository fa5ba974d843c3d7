//! The Socket.IO endpoint's limits and hostile inputs, spoken as raw Engine.IO v4 /
//! Socket.IO v5 packets over a WebSocket (and HTTP long-polling where it matters): each
//! gets the answer of the contract (docs/SOCKETIO.md), and nobody else is affected.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use msgbuf::client::WsClient;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::common::*;

/// A Socket.IO packet as the tests look at it.
#[derive(Debug)]
enum Packet {
    /// `42["event", data]`
    Event(String, Value),
    /// `43<id>[data]`
    Ack(i64, Value),
    /// `44{"message"}`
    ConnectError(String),
    /// Engine.IO close (`1`), a close frame, or the connection ended.
    Closed,
    Other(String),
}

/// A Socket.IO client written by hand, over a WebSocket.
pub(crate) struct Sio {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Sio {
    /// An Engine.IO session over WebSocket, not yet connected to a namespace.
    async fn open(addr: SocketAddr, query: &str) -> Sio {
        let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket{query}");
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket handshake");
        let mut s = Sio { ws };
        let open = s.raw(T).await.expect("the open packet");
        assert!(open.starts_with("0{"), "Engine.IO open packet: {open}");
        s
    }

    /// Opens a session and connects the default namespace with `auth`: `Ok` on `40`, the
    /// message of `44` (`connect_error`) otherwise.
    async fn connect(addr: SocketAddr, auth: Value) -> (Sio, Result<(), String>) {
        let mut s = Self::open(addr, "").await;
        s.send(format!("40{auth}")).await;
        let answer = s.connected().await;
        (s, answer)
    }

    async fn connected(&mut self) -> Result<(), String> {
        match self.next(T).await {
            Packet::Other(t) if t.starts_with("40") => Ok(()),
            Packet::ConnectError(m) => Err(m),
            other => panic!("expected 40 or 44, got {other:?}"),
        }
    }

    /// Connected and joined as `user`.
    pub(crate) async fn joined(addr: SocketAddr, user: &str) -> Sio {
        let (mut s, connected) = Self::connect(addr, json!({"token": token(user)})).await;
        connected.expect("connected");
        s.emit("join_chat", json!(user)).await;
        s.expect("joined").await;
        s
    }

    async fn send(&mut self, text: String) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("send");
    }

    async fn emit(&mut self, event: &str, data: Value) {
        self.send(format!("42{}", json!([event, data]))).await
    }

    /// An event with an acknowledgement callback, under `id`.
    async fn call(&mut self, id: i64, event: &str, data: Value) {
        self.send(format!("42{id}{}", json!([event, data]))).await
    }

    /// The next text packet, answering pings: `Some(None)` once the connection has ended,
    /// `None` if nothing came within `timeout`.
    async fn raw_within(&mut self, timeout: Duration) -> Option<Option<String>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match frame {
                Some(Ok(Message::Text(t))) if t.as_str() == "2" => {
                    let _ = self.ws.send(Message::Text("3".into())).await;
                }
                Some(Ok(Message::Text(t))) => return Some(Some(t.to_string())),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return Some(None),
                Some(Ok(_)) => {}
            }
        }
    }

    async fn raw(&mut self, timeout: Duration) -> Option<String> {
        self.raw_within(timeout).await.expect("a packet in time")
    }

    /// The next packet, or `None` if nothing came within `timeout`.
    async fn try_next(&mut self, timeout: Duration) -> Option<Packet> {
        let Some(t) = self.raw_within(timeout).await? else {
            return Some(Packet::Closed);
        };
        Some(parse(t))
    }

    async fn next(&mut self, timeout: Duration) -> Packet {
        self.try_next(timeout).await.expect("a packet in time")
    }

    /// Skips packets until event `name`; its data.
    async fn expect(&mut self, name: &str) -> Value {
        loop {
            match self.next(T).await {
                Packet::Event(n, data) if n == name => return data,
                Packet::Closed => panic!("closed while waiting for `{name}`"),
                _ => {}
            }
        }
    }

    async fn expect_ack(&mut self, id: i64) -> Value {
        loop {
            match self.next(T).await {
                Packet::Ack(i, data) if i == id => return data,
                Packet::Closed => panic!("closed while waiting for ack {id}"),
                _ => {}
            }
        }
    }

    /// Whether the connection ends within `timeout` (events before that are skipped).
    async fn closes_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.try_next(left).await {
                Some(Packet::Closed) => return true,
                Some(_) => {}
                None => return false,
            }
        }
    }
}

fn parse(t: String) -> Packet {
    if t == "1" {
        return Packet::Closed;
    }
    if let Some(rest) = t.strip_prefix("42") {
        let v: Vec<Value> = serde_json::from_str(rest).expect("an event array");
        let name = v[0].as_str().expect("event name").to_owned();
        return Packet::Event(name, v.get(1).cloned().unwrap_or(Value::Null));
    }
    if let Some(rest) = t.strip_prefix("43") {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        let id = rest[..digits].parse().expect("ack id");
        let v: Vec<Value> = serde_json::from_str(&rest[digits..]).expect("ack array");
        return Packet::Ack(id, v.first().cloned().unwrap_or(Value::Null));
    }
    // Packets of other namespaces (`44/nope,...`) are `Other`.
    if let Some(rest) = t.strip_prefix("44").filter(|r| r.starts_with('{')) {
        let v: Value = serde_json::from_str(rest).expect("connect_error data");
        return Packet::ConnectError(v["message"].as_str().unwrap_or_default().to_owned());
    }
    Packet::Other(t)
}

async fn error_code(s: &mut Sio) -> String {
    let e = s.expect("error").await;
    e["code"].as_str().expect("code").to_owned()
}

#[tokio::test]
async fn malformed_events_get_error_events_and_the_socket_stays() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("sio_malformed");
    let mut config = test_config(&rs, &db, "A");
    config.rate_limit = 1;
    config.rate_burst = 3;
    let a = Instance::start(config).await;
    let mut s = Sio::joined(a.addr, "mallory").await;
    let big = "x".repeat(16_385);
    for (event, data, code) in [
        ("dance", json!({}), "bad_request"),
        ("chat_message", json!({"to": "bob"}), "bad_request"),
        (
            "chat_message",
            json!({"to": 7, "chatId": "c", "message": "m"}),
            "bad_request",
        ),
        ("chat_message", json!("just text"), "bad_request"),
        (
            "chat_message",
            json!({"to": "bob", "receiver": "eve", "chatId": "c", "message": "m"}),
            "bad_request",
        ),
        ("ack", json!({"ids": ["zz"]}), "bad_request"),
        ("ack", json!(5), "bad_request"),
        ("join_chat", json!(["me"]), "bad_request"),
        ("join_chat", json!("bob"), "forbidden"),
        ("join_chat", json!({"userId": "bob"}), "forbidden"),
        (
            "chat_message",
            json!({"to": "bob", "chatId": "c", "message": big, "clientMsgId": "big"}),
            "too_large",
        ),
    ] {
        s.emit(event, data).await;
        assert_eq!(error_code(&mut s).await, code, "{event}");
    }
    // With a callback, the refusal also comes back through it.
    s.call(7, "chat_message", json!({"to": "bob", "clientMsgId": "k7"}))
        .await;
    let answer = s.expect_ack(7).await;
    assert_eq!(answer["error"]["code"], "bad_request");
    assert_eq!(answer["error"]["clientMsgId"], "k7");
    // A binary attachment (`45` + a binary frame) is refused, not stored.
    s.send(r#"451-["chat_message",{"_placeholder":true,"num":0}]"#.to_owned())
        .await;
    s.ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .expect("binary");
    assert_eq!(error_code(&mut s).await, "bad_request");

    // Rate limit: a burst of 3, then `rate_limited` naming the clientMsgId.
    for i in 0..6 {
        s.emit(
            "chat_message",
            json!({"to": "bob", "chatId": "c", "message": "m", "clientMsgId": format!("r{i}")}),
        )
        .await;
    }
    let mut limited = 0;
    for _ in 0..6 {
        match s.next(T).await {
            Packet::Event(e, data) if e == "error" => {
                assert_eq!(data["code"], "rate_limited");
                assert!(data["clientMsgId"].as_str().is_some());
                limited += 1;
            }
            Packet::Event(e, _) => assert_eq!(e, "message_accepted"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(limited >= 2, "some sends were rate limited ({limited})");

    // Still connected and usable.
    s.call(8, "join_chat", Value::Null).await;
    assert_eq!(s.expect_ack(8).await["userId"], "mallory");
}

#[tokio::test]
async fn bad_tokens_and_the_connection_limit_get_connect_error() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("sio_refused");
    let mut config = test_config(&rs, &db, "A");
    config.max_connections_per_user = 2;
    let a = Instance::start(config).await;
    let wrong = msgbuf::Auth::new("nope", None, None)
        .mint("mallory", false, Duration::from_secs(60))
        .expect("mint");
    for (auth, says) in [
        (json!({}), "missing token"),
        (json!("not an object"), "missing token"),
        (json!({"token": "garbage"}), "malformed token"),
        (json!({"token": expired_token("mallory")}), "token expired"),
        (json!({"token": wrong}), "token signature invalid"),
    ] {
        let (_, answer) = Sio::connect(a.addr, auth.clone()).await;
        let message = answer.expect_err("refused");
        assert!(message.contains(says), "{auth}: {message}");
    }

    // The token in the query, for clients that cannot set `auth`.
    let mut q = Sio::open(a.addr, &format!("&token={}", token("quinn"))).await;
    q.send("40".to_owned()).await;
    q.connected().await.expect("connected by ?token=");

    // Two connections per user; the third is refused until one closes.
    let (first, ok) = Sio::connect(a.addr, json!({"token": token("mallory")})).await;
    ok.expect("first");
    let (second, ok) = Sio::connect(a.addr, json!({"token": token("mallory")})).await;
    ok.expect("second");
    let (_, third) = Sio::connect(a.addr, json!({"token": token("mallory")})).await;
    assert!(
        third
            .expect_err("third refused")
            .contains("too many connections"),
        "connect_error names the limit"
    );
    // Leaving the namespace (`41`) releases a slot, and so does a dropped connection.
    let mut first = first;
    first.send("41".to_owned()).await;
    let (_third, _) = wait_for("the slot of the socket that left", T, || async {
        let (s, ok) = Sio::connect(a.addr, json!({"token": token("mallory")})).await;
        ok.ok().map(|()| (s, ()))
    })
    .await;
    drop(second);
    wait_for("the slot of the dropped connection", T, || async {
        let (_s, ok) = Sio::connect(a.addr, json!({"token": token("mallory")})).await;
        ok.ok()
    })
    .await;
}

#[tokio::test]
async fn oversized_packets_close_the_connection_and_others_carry_on() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("sio_oversized");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let mut s = Sio::joined(a.addr, "mallory").await;
    let big = format!(
        "42{}",
        json!(["chat_message", {"to": "bob", "chatId": "c", "message": "x".repeat(70 * 1024)}])
    );
    s.send(big).await;
    assert!(
        s.closes_within(T).await,
        "a 70 KiB WebSocket message closes"
    );

    // Long-polling: a POST over MSGBUF_MAX_FRAME_BYTES is refused.
    let (status, body) = raw_http(
        a.addr,
        "GET",
        "/socket.io/?EIO=4&transport=polling",
        &[],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let open: Value = serde_json::from_str(body.trim_start_matches('0')).expect("open packet");
    let sid = open["sid"].as_str().expect("sid");
    let (status, _) = raw_http(
        a.addr,
        "POST",
        &format!("/socket.io/?EIO=4&transport=polling&sid={sid}"),
        &[("Content-Type", "text/plain;charset=UTF-8")],
        &"4".repeat(70 * 1024),
    )
    .await;
    assert!(status >= 400, "an oversized POST is refused ({status})");

    let mut bob = Sio::joined(a.addr, "bob").await;
    let mut alice = Sio::joined(a.addr, "alice").await;
    alice
        .emit(
            "chat_message",
            json!({"to": "bob", "chatId": "c", "message": "still fine"}),
        )
        .await;
    assert_eq!(bob.expect("chat_message").await["message"], "still fine");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_and_its_messages_wait_in_mongodb() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("sio_stalled");
    let mut config = test_config(&rs, &db, "A");
    config.queue_capacity = 16;
    config.rate_limit = 100_000;
    config.rate_burst = 100_000;
    config.ack_timeout = Duration::from_secs(1);
    let a = Instance::start(config).await;
    let stalled = Sio::joined(a.addr, "slow").await;

    // 16 KiB messages until the stalled socket's queues overflow: its TCP buffers, the
    // Socket.IO buffer, the outbox and the presence queue are all bounded.
    let mut sender = WsClient::connect(&a.ws_url(), &token("fast"))
        .await
        .expect("connect");
    sender.join(T).await.expect("joined");
    let text = "m".repeat(16 * 1024);
    let mut ids = Vec::new();
    let started = Instant::now();
    while queue_full_disconnects(&a) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60) && ids.len() < 5_000,
            "the stalled socket was never disconnected ({} sent)",
            ids.len()
        );
        for _ in 0..50 {
            sender.chat("slow", "c", &text, None).await.expect("send");
        }
        for _ in 0..50 {
            let ev = sender
                .expect("message_accepted", T)
                .await
                .expect("accepted");
            ids.push(id_of(&ev.data));
        }
    }
    let (_, stats) = http_get(
        &a.http("/api/messages/buffer-stats"),
        Some(&admin_token("ops")),
    )
    .await;
    assert_eq!(
        json(&stats)["onlineUsers"],
        1,
        "only the sender is joined: {stats}"
    );

    // The same user, reading this time, gets every message (pushed-but-unacked ones after
    // the ack timeout, as re-sends).
    drop(stalled);
    let mut reader = Sio::joined(a.addr, "slow").await;
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < ids.len() {
        assert!(
            Instant::now() < deadline,
            "{} of {} arrived",
            seen.len(),
            ids.len()
        );
        if let Packet::Event(e, data) = reader.next(T).await {
            if e == "chat_message" {
                let id = id_of(&data);
                reader.emit("ack", json!(id)).await;
                seen.insert(id);
            }
        }
    }
    assert!(ids.iter().all(|id| seen.contains(id)));
}

fn queue_full_disconnects(a: &Instance) -> u64 {
    a.state
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix("msgbuf_queue_full_disconnects_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test]
async fn origins_outside_the_allowed_list_are_refused_and_allowed_ones_get_cors() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("sio_origins");
    let mut config = test_config(&rs, &db, "A");
    config.allowed_origins = vec!["https://chat.example".to_owned()];
    let a = Instance::start(config).await;
    let handshake = "/socket.io/?EIO=4&transport=polling";

    for origin in [Some("https://evil.example"), None] {
        let headers: Vec<(&str, &str)> = origin.iter().map(|o| ("Origin", *o)).collect();
        let (status, _) = raw_http(a.addr, "GET", handshake, &headers, "").await;
        assert_eq!(status, 403, "{origin:?}");
    }
    let mut req = format!("ws://{}/socket.io/?EIO=4&transport=websocket", a.addr)
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Origin", "https://evil.example".parse().expect("origin"));
    match tokio_tungstenite::connect_async(req).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }

    let allowed = [("Origin", "https://chat.example")];
    let (status, head) = raw_http_head(a.addr, "GET", handshake, &allowed).await;
    assert_eq!(status, 200);
    assert!(
        head.contains("access-control-allow-origin: https://chat.example"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-credentials: true"),
        "{head}"
    );
    let preflight = [
        ("Origin", "https://chat.example"),
        ("Access-Control-Request-Method", "POST"),
        ("Access-Control-Request-Headers", "content-type"),
    ];
    let (status, head) = raw_http_head(a.addr, "OPTIONS", handshake, &preflight).await;
    assert_eq!(status, 204);
    assert!(
        head.contains("access-control-allow-methods: get, post, options"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-headers: content-type"),
        "{head}"
    );
}

#[tokio::test]
async fn socketio_sockets_close_on_shutdown_and_the_instance_stops_promptly() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("sio_shutdown");
    let mut config = test_config(&rs, &db, "A");
    config.shutdown_timeout = Duration::from_secs(6);
    let a = Instance::start(config).await;
    let mut s = Sio::joined(a.addr, "bob").await;

    // A long-polling client with its GET waiting for data.
    let (_, body) = raw_http(
        a.addr,
        "GET",
        "/socket.io/?EIO=4&transport=polling",
        &[],
        "",
    )
    .await;
    let open: Value = serde_json::from_str(body.trim_start_matches('0')).expect("open packet");
    let poll = format!(
        "/socket.io/?EIO=4&transport=polling&sid={}",
        open["sid"].as_str().expect("sid")
    );
    let auth = format!("40{}", json!({"token": token("polly")}));
    let (status, _) = raw_http(a.addr, "POST", &poll, &[], &auth).await;
    assert_eq!(status, 200);
    let (_, connected) = raw_http(a.addr, "GET", &poll, &[], "").await;
    // Packets of one poll are separated by U+001E; a ping may come first.
    assert!(
        connected.split('\u{1e}').any(|p| p.starts_with("40")),
        "{connected}"
    );
    let addr = a.addr;
    let waiting = tokio::spawn(async move { raw_http(addr, "GET", &poll, &[], "").await });

    let started = Instant::now();
    a.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "stopped in {:?}, not by the shutdown timeout",
        started.elapsed()
    );
    assert!(s.closes_within(T).await, "the WebSocket client was closed");
    let (status, _) = tokio::time::timeout(T, waiting)
        .await
        .expect("the long poll returned")
        .expect("join");
    assert!(status == 200 || status == 0, "long poll ended ({status})");
}

#[tokio::test]
async fn hostile_packets_never_take_the_instance_down() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("sio_hostile");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    for packet in [
        "",
        "4",
        "42",
        "42[",
        "42[1]",
        "42[null,{}]",
        r#"42["chat_message"]"#,
        r#"421["ack"]"#,
        r#"42["join_chat",{"userId":[1,2]}]"#,
        r#"42["ack",{"ids":[null]}]"#,
        "43[]",
        "431[{}]",
        r#"45-["x",{}]"#,
        "41",
        "40",
        "40/nope,{}",
        "49",
        "9",
        "5",
        "6",
        "3",
        "2",
        r#"42["chat_message",{"to":"bob","chatId":"c","message":"\ud800"}]"#,
    ] {
        let mut s = Sio::joined(a.addr, "mallory").await;
        s.send(packet.to_owned()).await;
        if packet == "41" {
            // The client's own disconnect of the namespace: nothing is answered on it any
            // more (and Engine.IO may keep the transport open); the instance's health is
            // checked after the loop.
            continue;
        }
        // Then either the socket still answers, or it was closed; never a hang.
        s.call(999, "join_chat", Value::Null).await;
        loop {
            match s.next(T).await {
                Packet::Ack(999, data) => {
                    assert_eq!(data["userId"], "mallory", "{packet}");
                    break;
                }
                Packet::Closed => break,
                _ => {}
            }
        }
    }
    let mut bob = Sio::joined(a.addr, "bob").await;
    let mut alice = Sio::joined(a.addr, "alice").await;
    alice
        .emit(
            "chat_message",
            json!({"to": "bob", "chatId": "c", "message": "after the storm"}),
        )
        .await;
    assert_eq!(
        bob.expect("chat_message").await["message"],
        "after the storm"
    );
    assert_eq!(http_get(&a.http("/healthz"), None).await.0, 200);
}

/// One HTTP/1.1 request with extra headers: the status and the body.
async fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let text = raw_http_text(addr, method, path, headers, body).await;
    let status = status_of(&text);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// Like [`raw_http`]: the status and the head, lower-cased.
async fn raw_http_head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let text = raw_http_text(addr, method, path, headers, "").await;
    let head = text.split_once("\r\n\r\n").map_or(&*text, |(h, _)| h);
    (status_of(&text), head.to_ascii_lowercase())
}

fn status_of(text: &str) -> u16 {
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

async fn raw_http_text(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> String {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return String::new();
    };
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let mut out = Vec::new();
    if s.write_all(req.as_bytes()).await.is_err() {
        return String::new();
    }
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the server ends the socket within `timeout`: a namespace disconnect (`41`) or
/// the connection closing.
async fn disconnected_within(s: &mut Sio, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match s.try_next(left).await {
            Some(Packet::Closed) => return true,
            Some(Packet::Other(t)) if t == "41" => return true,
            Some(_) => {}
            None => return false,
        }
    }
}

/// The hostile-client limits of `/ws`, over Socket.IO: a repeated `clientMsgId` answers the
/// stored id, the send limit is the user's across both transports, join and ack floods get
/// `rate_limited`, and an expired token ends the socket.
#[tokio::test]
async fn the_v1_limits_hold_over_socketio_and_the_send_limit_is_shared_with_v1() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("sio_limits");
    let mut config = test_config(&rs, &db, "A");
    config.rate_limit = 1;
    config.rate_burst = 10;
    let a = Instance::start(config).await;
    let mut s = Sio::joined(a.addr, "mallory").await;

    let mut ids = Vec::new();
    for i in 0..3 {
        s.call(
            i,
            "chat_message",
            json!({"to": "bob", "chatId": "c", "message": "m", "clientMsgId": "same"}),
        )
        .await;
        ids.push(id_of(&s.expect_ack(i).await));
    }
    assert!(ids.iter().all(|id| *id == ids[0]), "one id: {ids:?}");
    for i in 3..10 {
        s.emit(
            "chat_message",
            json!({"to": "bob", "chatId": "c", "message": format!("m{i}")}),
        )
        .await;
    }
    let mut v1 = a.connect("mallory").await;
    let mut refused = 0;
    for _ in 0..3 {
        v1.chat("bob", "c", "over v1", None).await.expect("send");
        let ev = v1.next_event(T).await.expect("an answer");
        if ev.event == "error" && ev.data["code"] == "rate_limited" {
            refused += 1;
        }
    }
    assert!(
        refused >= 2,
        "the burst was spent over Socket.IO: {refused} of 3 refused over v1"
    );

    for _ in 0..30 {
        s.emit("join_chat", json!("mallory")).await;
    }
    assert_eq!(error_code(&mut s).await, "rate_limited", "a join flood");
    let many: Vec<String> = (0..1000)
        .map(|_| mongodb::bson::oid::ObjectId::new().to_hex())
        .collect();
    for _ in 0..60 {
        s.emit("ack", json!({"ids": many})).await;
    }
    assert_eq!(error_code(&mut s).await, "rate_limited", "an ack flood");

    // A token that expires while its socket is joined: the server ends the socket.
    let short = auth()
        .mint("quinn", false, Duration::from_secs(2))
        .expect("mint");
    let (mut q, ok) = Sio::connect(a.addr, json!({"token": short})).await;
    ok.expect("connected");
    q.emit("join_chat", json!("quinn")).await;
    q.expect("joined").await;
    assert!(
        disconnected_within(&mut q, Duration::from_secs(10)).await,
        "the socket outlived its token"
    );
}
