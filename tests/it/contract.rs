//! Every answer is the documented one: JSON error bodies with the documented status, and
//! WebSocket closes answered with a close frame.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

fn error_code(body: &str) -> String {
    json(body)["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("a JSON error body: {body}"))
        .to_owned()
}

#[tokio::test]
async fn http_errors_are_json_with_the_documented_status() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("contract_http");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let alice = token("alice");

    // A plain GET of /ws without a token: 401 before any upgrade check.
    let (s, body) = http("GET", &a.http("/ws"), None, None).await;
    assert_eq!(
        (s, error_code(&body).as_str()),
        (401, "unauthorized"),
        "{body}"
    );
    // With a token but no upgrade headers: 400, JSON.
    let (s, body) = http("GET", &a.http("/ws"), Some(&alice), None).await;
    assert_eq!(
        (s, error_code(&body).as_str()),
        (400, "bad_request"),
        "{body}"
    );

    // A body over the limit: 413 too_large.
    let big = format!(
        r#"{{"to":"bob","chatId":"c","message":"{}"}}"#,
        "x".repeat(3 << 20)
    );
    let (s, body) = http("POST", &a.http("/api/messages"), Some(&alice), Some(&big)).await;
    assert_eq!(
        (s, error_code(&body).as_str()),
        (413, "too_large"),
        "{body}"
    );

    // An array read by position, and a repeated key: both refused, nothing stored.
    for bad in [
        r#"["bob","chat","text","id"]"#,
        r#"{"to":"bob","to":"mallory","chatId":"c","message":"m"}"#,
    ] {
        let (s, body) = http("POST", &a.http("/api/messages"), Some(&alice), Some(bad)).await;
        assert_eq!(
            (s, error_code(&body).as_str()),
            (400, "bad_request"),
            "{bad}: {body}"
        );
    }
    let stored = messages(&rs, &db)
        .await
        .count_documents(mongodb::bson::doc! {})
        .await
        .expect("count");
    assert_eq!(stored, 0, "a refused body stores nothing");

    // A 1 MB token: 431, JSON (a head over 32 KiB).
    let huge = "t".repeat(1 << 20);
    let (s, body) = http(
        "GET",
        &a.http("/api/messages/buffer-stats"),
        Some(&huge),
        None,
    )
    .await;
    assert_eq!(
        (s, error_code(&body).as_str()),
        (431, "too_large"),
        "{body}"
    );

    // A method the route does not take: 405, JSON.
    let (s, body) = http("PUT", &a.http("/api/messages"), Some(&alice), Some("{}")).await;
    assert_eq!(s, 405, "{body}");
    error_code(&body);
    // A path segment that is not UTF-8: 400, JSON.
    let (s, body) = http(
        "GET",
        &a.http("/api/messages/buffered/%FF"),
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(
        (s, error_code(&body).as_str()),
        (400, "bad_request"),
        "{body}"
    );
}

#[tokio::test]
async fn a_client_close_is_answered_and_a_protocol_violation_closes_with_1002() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("contract_ws");
    let a = Instance::start(test_config(&rs, &db, "A")).await;

    // The client closes: the server answers with a close frame (no 1006 on the client).
    let mut c = a.connect("bob").await;
    c.join(T).await.expect("joined");
    let (mut ws, _) = {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = a.ws_url().into_client_request().expect("request");
        let bearer = format!("Bearer {}", token("carol"))
            .parse()
            .expect("header");
        request.headers_mut().insert("Authorization", bearer);
        tokio_tungstenite::connect_async(request)
            .await
            .expect("connect")
    };
    ws.send(Message::Close(None)).await.expect("close sent");
    let answer = tokio::time::timeout(T, ws.next())
        .await
        .expect("an answer in time");
    assert!(
        matches!(answer, Some(Ok(Message::Close(_)))),
        "the close is answered: {answer:?}"
    );

    // A raw client that sends an unmasked frame after the handshake gets close 1002.
    let mut tcp = tokio::net::TcpStream::connect(a.addr).await.expect("tcp");
    let head = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {}\r\n\r\n",
        a.addr,
        token("dave")
    );
    tcp.write_all(head.as_bytes()).await.expect("head");
    let mut buf = vec![0u8; 4096];
    let n = tcp.read(&mut buf).await.expect("101");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
    // FIN + text opcode, no mask bit: a client must mask (RFC 6455 5.1).
    tcp.write_all(&[0x81, 0x02, b'h', b'i'])
        .await
        .expect("frame");
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < 4 {
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut buf))
            .await
            .expect("a close frame in time")
            .expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.len() >= 4 && got[0] == 0x88, "a close frame: {got:?}");
    assert_eq!(u16::from_be_bytes([got[2], got[3]]), 1002, "{got:?}");
    c.close().await;
}
