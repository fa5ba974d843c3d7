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
    // Stored before the instance starts: the backlog is all pending, none of it streamed.
    let store = msgbuf::Store::new(rs.client().await.database(&db));
    store.ensure_indexes().await.expect("indexes");
    let mut inserted = Vec::with_capacity(BACKLOG);
    for chunk in 0..BACKLOG / 1000 {
        let batch: Vec<_> = (0..1000)
            .map(|i| {
                let text = format!("backlog {}", chunk * 1000 + i);
                msgbuf::BufferedMessage::new("alice", "bob", "c1", &text, None)
            })
            .collect();
        for r in store.insert_batch(&batch).await {
            r.expect("insert");
        }
        inserted.extend(batch.iter().map(|m| m.id.to_hex()));
    }
    let a = Instance::start(test_config(&rs, &db, "A")).await;

    // Small kernel buffers on the client side: the server's writes and the client's acks
    // fill them within a few hundred messages, so a server that stops reading while it
    // drains wedges here at once.
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    socket.set_send_buffer_size(4096).expect("sndbuf");
    let tcp = socket.connect(a.addr).await.expect("connect");
    let mut request = a.ws_url().into_client_request().expect("request");
    let bearer = format!("Bearer {}", token("bob")).parse().expect("header");
    request.headers_mut().insert("Authorization", bearer);
    let (mut ws, _) = tokio_tungstenite::client_async(request, tcp)
        .await
        .expect("handshake");
    ws.send(Message::Text(r#"{"event":"join_chat","data":{}}"#.into()))
        .await
        .expect("join");

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
