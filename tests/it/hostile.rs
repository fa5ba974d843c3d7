//! Protocol error cases and hostile clients: each gets the error or close code of the
//! contract, and nobody else is affected.

use std::time::Duration;

use msgbuf::client::{ClientError, WsClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

async fn error_code(c: &mut WsClient) -> String {
    let ev = c.expect("error", T).await.expect("error event");
    ev.data["code"].as_str().expect("code").to_owned()
}

#[tokio::test]
async fn every_protocol_error_gets_its_error_event_and_the_socket_stays_open() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("protocol_errors");
    let mut config = test_config(&rs, &db, "A");
    config.rate_limit = 1;
    config.rate_burst = 3;
    config.max_connections_per_user = 2;
    let a = Instance::start(config).await;
    let (mut c, _) = a.join("mallory").await;
    let big = format!(
        r#"{{"event":"chat_message","data":{{"to":"bob","chatId":"c","message":"{}","clientMsgId":"big"}}}}"#,
        "x".repeat(16_385)
    );
    for (frame, code) in [
        ("not json".to_owned(), "bad_request"),
        (r#"{"event":"dance","data":{}}"#.to_owned(), "bad_request"),
        (
            r#"{"event":"chat_message","data":{"to":"bob"}}"#.to_owned(),
            "bad_request",
        ),
        (
            r#"{"event":"chat_message","data":{"to":7,"chatId":"c","message":"m"}}"#.to_owned(),
            "bad_request",
        ),
        (
            r#"{"event":"ack","data":{"ids":["zz"]}}"#.to_owned(),
            "bad_request",
        ),
        (
            r#"{"event":"join_chat","data":{"userId":"bob"}}"#.to_owned(),
            "forbidden",
        ),
        (big, "too_large"),
    ] {
        c.send_raw(frame.clone()).await.expect("send");
        assert_eq!(
            error_code(&mut c).await,
            code,
            "{}",
            &frame[..frame.len().min(80)]
        );
    }
    c.send_message(Message::Binary(vec![1, 2, 3].into()))
        .await
        .expect("binary");
    assert_eq!(error_code(&mut c).await, "bad_request");

    // Rate limit: a burst of 3, then `rate_limited` with the clientMsgId.
    for i in 0..6 {
        c.chat("bob", "c", "m", Some(&format!("r{i}")))
            .await
            .expect("send");
    }
    let mut limited = 0;
    for _ in 0..6 {
        let ev = c.next_event(T).await.expect("answer");
        if ev.event == "error" {
            assert_eq!(ev.data["code"], "rate_limited");
            assert!(ev.data["clientMsgId"].as_str().is_some());
            limited += 1;
        }
    }
    assert!(limited >= 2, "some sends were rate limited ({limited})");

    // Still open and usable.
    c.send_raw(r#"{"event":"join_chat","data":{}}"#.to_owned())
        .await
        .expect("send");
    c.expect("joined", T).await.expect("socket still open");

    // Per-user connection limit (2): a third socket is refused before the upgrade.
    let _second = a.connect("mallory").await;
    let third = WsClient::connect(&a.ws_url(), &token("mallory")).await;
    assert!(third.is_err(), "third connection refused");
}

#[tokio::test]
async fn oversized_frames_close_with_1009_and_invalid_utf8_with_1007() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("oversized");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let (mut c, _) = a.join("mallory").await;
    c.send_raw("x".repeat(70 * 1024)).await.expect("send");
    match c.next_event(T).await {
        Err(ClientError::Closed(code)) => assert_eq!(code, Some(1009)),
        other => panic!("expected close 1009, got {other:?}"),
    }

    // Invalid UTF-8 in a text frame, written by hand (masked, opcode 1).
    let mut s = raw_upgrade(&a, &token("mallory")).await;
    let payload = [0xff_u8, 0xfe, 0xfd];
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).await.expect("write");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(T, s.read(&mut buf))
        .await
        .expect("answer")
        .expect("read");
    assert!(n >= 4 && buf[0] == 0x88, "a close frame");
    assert_eq!(u16::from_be_bytes([buf[2], buf[3]]), 1007);

    // Others are unaffected.
    let (mut bob, _) = a.join("bob").await;
    let (mut alice, _) = a.join("alice").await;
    alice
        .chat("bob", "c", "still fine", None)
        .await
        .expect("send");
    bob.expect("chat_message", T).await.expect("delivered");
}

async fn raw_upgrade(a: &Instance, token: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(a.addr)
        .await
        .expect("connect");
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n",
        a.addr
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.expect("read head");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

#[tokio::test]
async fn bad_tokens_get_401_and_no_upgrade_and_slow_handshakes_time_out() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("bad_tokens");
    let mut config = test_config(&rs, &db, "A");
    config.handshake_timeout = Duration::from_secs(1);
    let a = Instance::start(config).await;
    let good = token("bob");
    let payload = good.split('.').nth(1).expect("payload");
    let wrong = msgbuf::Auth::new("nope", None, None)
        .mint("bob", false, Duration::from_secs(60))
        .expect("mint");
    for bad in [
        format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}."),
        expired_token("bob"),
        wrong,
        "garbage".to_owned(),
    ] {
        match WsClient::connect(&a.ws_url(), &bad).await {
            Err(ClientError::Ws(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                assert_eq!(resp.status(), 401)
            }
            Err(e) => panic!("expected HTTP 401, got {e}"),
            Ok(_) => panic!("upgraded with a bad token"),
        }
    }
    // Slow loris: a request head that never ends is cut off.
    let mut s = tokio::net::TcpStream::connect(a.addr)
        .await
        .expect("connect");
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server closed the slow connection");
}

#[tokio::test]
async fn origins_outside_the_allowed_list_are_refused() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("origins");
    let mut config = test_config(&rs, &db, "A");
    config.allowed_origins = vec!["https://chat.example".to_owned()];
    let a = Instance::start(config).await;
    let attempt = |origin: &'static str| {
        let url = a.ws_url();
        async move {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut req = url.into_client_request().expect("request");
            req.headers_mut().insert(
                "Authorization",
                format!("Bearer {}", token("bob")).parse().expect("header"),
            );
            req.headers_mut()
                .insert("Origin", origin.parse().expect("origin"));
            tokio_tungstenite::connect_async(req)
                .await
                .map(|_| ())
                .map_err(|e| match e {
                    tokio_tungstenite::tungstenite::Error::Http(resp) => resp.status().as_u16(),
                    _ => 0,
                })
        }
    };
    assert_eq!(attempt("https://evil.example").await, Err(403));
    assert!(attempt("https://chat.example").await.is_ok());
}

#[tokio::test]
async fn serve_refuses_to_start_without_a_secret_and_token_mints_valid_tokens() {
    let rs = ReplicaSet::start(1).await;
    let output = msgbuf_command()
        .arg("serve")
        .env("MSGBUF_MONGODB_URI", &rs.uri)
        .env("MSGBUF_BIND", format!("127.0.0.1:{}", free_port()))
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("MSGBUF_JWT_SECRET is not set"));

    let output = msgbuf_command()
        .args(["token", "carol", "--admin", "--ttl", "1h"])
        .env("MSGBUF_JWT_SECRET", SECRET)
        .output()
        .expect("run");
    assert!(output.status.success());
    let minted = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let claims = auth().verify(&minted).expect("valid token");
    assert_eq!((claims.sub.as_str(), claims.is_admin()), ("carol", true));
    assert!(claims.exp <= msgbuf::unix_now() + 3600);
}

#[tokio::test]
async fn an_ack_for_someone_elses_message_records_nothing_and_sends_no_receipt() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("forged_ack");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let (mut bob, _) = a.join("bob").await;
    let (mut mallory, _) = a.join("mallory").await;
    let (mut alice, _) = a.join("alice").await;

    alice.chat("bob", "c", "for bob", None).await.expect("send");
    let to_bob = id_of(
        &alice
            .expect("message_accepted", T)
            .await
            .expect("accepted")
            .data,
    );
    // Mallory acks it at once, so her ack can meet bob's claim in one batch, and again
    // after the claim is written.
    mallory
        .ack(std::slice::from_ref(&to_bob))
        .await
        .expect("ack");
    let got = bob.expect("chat_message", T).await.expect("live message");
    assert_eq!(id_of(&got.data), to_bob);
    let coll = messages(&rs, &db).await;
    let oid = mongodb::bson::oid::ObjectId::parse_str(&to_bob).expect("oid");
    wait_for("the claim", T, || async {
        let d = coll
            .find_one(mongodb::bson::doc! {"_id": oid})
            .await
            .ok()??;
        d.get_bool("delivered").unwrap_or(false).then_some(())
    })
    .await;
    mallory
        .ack(std::slice::from_ref(&to_bob))
        .await
        .expect("ack");

    // A message to mallory that she acks: her acks are written in order, so by its
    // receipt her two forged acks have been written too.
    alice
        .chat("mallory", "c", "for mallory", None)
        .await
        .expect("send");
    let to_mallory = id_of(
        &alice
            .expect("message_accepted", T)
            .await
            .expect("accepted")
            .data,
    );
    let got = mallory
        .expect("chat_message", T)
        .await
        .expect("live message");
    mallory.ack(&[id_of(&got.data)]).await.expect("ack");
    let receipt = alice.expect("receipt", T).await.expect("receipt");
    assert_eq!(
        id_of(&receipt.data),
        to_mallory,
        "no receipt for bob's message yet"
    );
    let d = coll
        .find_one(mongodb::bson::doc! {"_id": oid})
        .await
        .expect("find")
        .expect("stored");
    assert_eq!(d.get("ackedAt"), Some(&mongodb::bson::Bson::Null), "{d}");

    bob.ack(std::slice::from_ref(&to_bob)).await.expect("ack");
    let receipt = alice.expect("receipt", T).await.expect("receipt");
    assert_eq!(id_of(&receipt.data), to_bob);
}
