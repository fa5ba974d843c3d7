//! The session core as a client sees it: a large drain to a client that acks every message
//! as it reads it, with a blocking send, over small socket buffers.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use mongodb::bson::doc;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

const BACKLOG: usize = 20_000;

#[tokio::test]
async fn a_large_drain_completes_to_a_client_that_acks_each_message_with_a_blocking_send() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("acking_drain");
    let (_, backlog) = stored_backlog(&rs, &db, "bob", "c1", BACKLOG).await;
    let inserted: Vec<String> = backlog.iter().map(|m| m.id.to_hex()).collect();
    let a = Instance::start(test_config(&rs, &db, "A")).await;

    // Small kernel buffers on the client side: the server's writes and the client's acks
    // fill them within a few hundred messages, so a server that stops reading while it
    // drains wedges here at once.
    let mut ws = join_over_small_buffers(&a, "bob").await;

    let mut received = Vec::with_capacity(BACKLOG);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while received.len() < BACKLOG {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "drain stalled: {} of {BACKLOG} messages received",
                    received.len()
                )
            })
            .expect("socket open")
            .expect("frame");
        let Message::Text(text) = frame else { continue };
        let v: serde_json::Value = serde_json::from_str(text.as_str()).expect("json");
        if v["event"] != "chat_message" {
            continue;
        }
        let id = id_of(&v["data"]);
        // The documented way: ack as soon as a message is read, and wait for the send.
        let ack = serde_json::json!({"event": "ack", "data": {"ids": [&id]}}).to_string();
        ws.send(Message::Text(ack.into())).await.expect("ack sent");
        received.push(id);
    }
    assert_eq!(received, inserted, "every message once, oldest first");

    let messages = messages(&rs, &db).await;
    wait_for(
        "every ack to be recorded",
        Duration::from_secs(60),
        || async {
            let acked = messages
                .count_documents(doc! {"ackedAt": {"$type": "date"}})
                .await
                .expect("count");
            (acked == BACKLOG as u64).then_some(())
        },
    )
    .await;
    let claimed = messages
        .count_documents(doc! {"delivered": true, "deliveredBy": "A"})
        .await
        .expect("count");
    assert_eq!(claimed, BACKLOG as u64);
}

type RawWs = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Connects `user` over a socket with 4 KiB kernel buffers and sends `join_chat`.
async fn join_over_small_buffers(a: &Instance, user: &str) -> RawWs {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    socket.set_send_buffer_size(4096).expect("sndbuf");
    let tcp = socket.connect(a.addr).await.expect("connect");
    let mut request = a.ws_url().into_client_request().expect("request");
    let bearer = format!("Bearer {}", token(user)).parse().expect("header");
    request.headers_mut().insert("Authorization", bearer);
    let (mut ws, _) = tokio_tungstenite::client_async(request, tcp)
        .await
        .expect("handshake");
    ws.send(Message::Text(r#"{"event":"join_chat","data":{}}"#.into()))
        .await
        .expect("join");
    ws
}

/// Joins `user` from a socket with tiny kernel buffers that then never reads.
async fn join_and_stop_reading(a: &Instance, user: &str) -> RawWs {
    let mut ws = join_over_small_buffers(a, user).await;
    let joined = tokio::time::timeout(T, ws.next())
        .await
        .expect("joined in time");
    assert!(matches!(joined, Some(Ok(Message::Text(_)))), "{joined:?}");
    ws
}

/// Sends `n` messages of 16 KiB to `to` through REST (not rate limited by a socket).
async fn send_big(a: &Instance, to: &str, n: usize) {
    let alice = token("alice");
    let text = "x".repeat(16 * 1024);
    for i in 0..n {
        let body = serde_json::json!({"to": to, "chatId": "c", "message": text, "clientMsgId": format!("big-{i}")});
        let (s, answer) = http(
            "POST",
            &a.http("/api/messages"),
            Some(&alice),
            Some(&body.to_string()),
        )
        .await;
        assert_eq!(s, 201, "{answer}");
    }
}

#[tokio::test]
async fn a_socket_that_stops_reading_is_closed_after_the_write_timeout_and_loses_nothing() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("stalled_writer");
    let mut config = test_config(&rs, &db, "A");
    config.write_timeout = Duration::from_secs(2);
    config.ack_timeout = Duration::from_secs(2);
    let a = Instance::start(config).await;
    let stalled = join_and_stop_reading(&a, "bob").await;
    // Far less than a queue's worth of frames, but far more bytes than the socket takes.
    send_big(&a, "bob", 300).await;
    wait_for(
        "the stalled socket to be closed",
        Duration::from_secs(30),
        || async {
            let text = a.state.metrics_text();
            (text.contains("msgbuf_queue_full_disconnects_total 1")
                && text.contains("msgbuf_connections 0"))
            .then_some(())
        },
    )
    .await;
    drop(stalled);
    // Its messages waited in MongoDB: a new socket gets every one (re-sent when pushed
    // to the old socket and not acked).
    let messages = messages(&rs, &db).await;
    wait_for("every push to be past its ack timeout", T, || async {
        let cutoff = mongodb::bson::DateTime::from_millis(
            mongodb::bson::DateTime::now().timestamp_millis() - 2_500,
        );
        let waiting = messages
            .count_documents(doc! {"pushedAt": {"$gt": cutoff}})
            .await
            .ok()?;
        (waiting == 0).then_some(())
    })
    .await;
    let (mut bob, joined) = a.join("bob").await;
    assert_eq!(joined["pending"], 300, "{joined}");
    let mut ids = std::collections::HashSet::new();
    while ids.len() < 300 {
        let ev = bob.expect("chat_message", T).await.expect("drained");
        ids.insert(id_of(&ev.data));
    }
}

#[tokio::test]
async fn shutdown_closes_a_socket_that_does_not_read_within_about_a_second() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("shutdown_stalled");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let _stalled = join_and_stop_reading(&a, "bob").await;
    send_big(&a, "bob", 200).await;
    let started = std::time::Instant::now();
    a.stop().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}");
}

#[tokio::test]
async fn a_socket_is_closed_with_4002_when_its_token_expires() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("token_expiry");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let short = auth()
        .mint("bob", false, Duration::from_secs(2))
        .expect("mint");
    let mut bob = msgbuf::client::WsClient::connect(&a.ws_url(), &short)
        .await
        .expect("connect");
    bob.join(T).await.expect("joined");
    let end = bob.expect("a close", Duration::from_secs(10)).await;
    assert!(
        matches!(end, Err(msgbuf::client::ClientError::Closed(Some(4002)))),
        "{end:?}"
    );
}

#[tokio::test]
async fn a_socket_idle_longer_than_the_write_timeout_still_gets_its_next_messages() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("idle_then_busy");
    let mut config = test_config(&rs, &db, "A");
    config.write_timeout = Duration::from_millis(500);
    let a = Instance::start(config).await;
    let (mut bob, _) = a.join("bob").await;
    let (mut alice, _) = a.join("alice").await;
    for round in 0..3 {
        alice
            .chat("bob", "c", &format!("round {round}"), None)
            .await
            .expect("send");
        alice.expect("message_accepted", T).await.expect("accepted");
        let ev = bob
            .expect("chat_message", T)
            .await
            .expect("delivered, socket open");
        assert_eq!(ev.data["message"], format!("round {round}"));
        // The scenario itself: quiet for longer than the write timeout.
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    assert!(a
        .state
        .metrics_text()
        .contains("msgbuf_queue_full_disconnects_total 0"));
}
