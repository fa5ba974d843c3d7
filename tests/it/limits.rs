//! Limits a hostile client meets without slowing anyone else (bounded stress tests that
//! assert their bound).

use std::time::{Duration, Instant};

use mongodb::bson::doc;
use msgbuf::client::WsClient;
use serde_json::json;

use crate::common::*;

/// Accept latencies of `n` sends by `c`, each waiting for its `message_accepted`.
async fn accept_times(
    c: &mut msgbuf::client::WsClient,
    tag: &str,
    n: usize,
    out: &mut Vec<Duration>,
) {
    for i in 0..n {
        let started = Instant::now();
        c.chat("bob", "c", "hi", Some(&format!("{tag}-{i}")))
            .await
            .expect("send");
        c.expect("message_accepted", T).await.expect("accepted");
        out.push(started.elapsed());
    }
}

fn p99(mut took: Vec<Duration>) -> Duration {
    took.sort();
    took[(took.len() * 99 / 100).min(took.len() - 1)]
}

/// Sixteen flooders (every insert shard gets some), each repeating one clientMsgId at
/// 40/s, pipelined two at a time, under the rate limit; stopped by `stop`.
async fn flood(
    a: &Instance,
    stop: &tokio_util::sync::CancellationToken,
) -> Vec<tokio::task::JoinHandle<u32>> {
    let mut flooders = Vec::new();
    for f in 0..16 {
        let (mut c, _) = a.join(&format!("flooder{f}")).await;
        let stop = stop.clone();
        flooders.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut answered = 0u32;
            while !stop.is_cancelled() {
                tick.tick().await;
                for _ in 0..2 {
                    c.chat("bob", "c", "again", Some("the-same-id"))
                        .await
                        .expect("send");
                }
                for _ in 0..2 {
                    c.expect("message_accepted", T).await.expect("accepted");
                    answered += 1;
                }
            }
            answered
        }));
    }
    flooders
}

fn insert_batches(a: &Instance) -> f64 {
    let text = a.state.metrics_text();
    text.lines()
        .find_map(|l| l.strip_prefix("msgbuf_insert_batch_seconds_count "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_flood_of_one_repeated_client_msg_id_does_not_slow_other_senders() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("duplicate_flood");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let (mut normal, _) = a.join("normal").await;
    // Quiet and flooded rounds alternate, so that other load on the machine weighs on both.
    let (mut quiet, mut flooded) = (Vec::new(), Vec::new());
    let mut repeats = 0;
    let mut batches_during_floods = 0.0;
    for round in 0..4 {
        accept_times(&mut normal, &format!("quiet{round}"), 50, &mut quiet).await;
        let stop = tokio_util::sync::CancellationToken::new();
        let flooders = flood(&a, &stop).await;
        let before = insert_batches(&a);
        accept_times(&mut normal, &format!("flooded{round}"), 50, &mut flooded).await;
        batches_during_floods += insert_batches(&a) - before;
        stop.cancel();
        for f in flooders {
            repeats += f.await.expect("flooder");
        }
    }
    let stored = messages(&rs, &db)
        .await
        .count_documents(mongodb::bson::doc! {"clientMsgId": "the-same-id"})
        .await
        .expect("count");
    assert_eq!(
        stored, 16,
        "one document per flooder, however often it repeats"
    );
    assert!(repeats >= 4 * 16 * 2, "the flood ran: {repeats} answers");
    // The repeats never reach the insert shards: about one batch per normal send.
    assert!(
        batches_during_floods <= 4.0 * 50.0 + 16.0,
        "{batches_during_floods} insert batches for 200 sends beside {repeats} repeats"
    );
    let (quiet, flooded) = (p99(quiet), p99(flooded));
    // A floor for the quiet figure (a majority write on a busy 2-core machine) and slack
    // for the tests that run beside this one; without the fix the flooded p99 was 568 ms.
    let bound = 2 * quiet.max(Duration::from_millis(10)) + Duration::from_millis(25);
    assert!(
        flooded <= bound,
        "p99 accept latency beside the flood {flooded:?}, quiet {quiet:?} (bound {bound:?})"
    );
}

#[tokio::test]
async fn the_send_limit_is_per_user_across_sockets_reconnects_and_rest() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("send_limit_per_user");
    let mut config = test_config(&rs, &db, "A");
    config.rate_limit = 1;
    config.rate_burst = 5;
    let a = Instance::start(config).await;
    let (mut first, _) = a.join("alice").await;
    for i in 0..5 {
        first
            .chat("bob", "c", "m", Some(&format!("k{i}")))
            .await
            .expect("send");
        first
            .expect("message_accepted", T)
            .await
            .expect("within the burst");
    }
    first.close().await;
    // A new socket does not get a new budget.
    let (mut second, _) = a.join("alice").await;
    second
        .chat("bob", "c", "m", Some("k5"))
        .await
        .expect("send");
    let ev = second.next_event(T).await.expect("an answer");
    assert_eq!(
        (ev.event.as_str(), &ev.data["code"]),
        ("error", &serde_json::json!("rate_limited")),
        "{ev:?}"
    );
    assert_eq!(ev.data["clientMsgId"], "k5");
    // Nor does REST.
    let body = r#"{"to":"bob","chatId":"c","message":"m","clientMsgId":"k6"}"#;
    let (s, answer) = http(
        "POST",
        &a.http("/api/messages"),
        Some(&token("alice")),
        Some(body),
    )
    .await;
    assert_eq!(s, 429, "{answer}");
    // Another user is not affected.
    let (s, answer) = http(
        "POST",
        &a.http("/api/messages"),
        Some(&token("carol")),
        Some(body),
    )
    .await;
    assert_eq!(s, 201, "{answer}");
}

#[tokio::test]
async fn joins_and_acked_ids_are_capped_per_socket() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("join_ack_caps");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let mut c = a.connect("bob").await;
    let mut refused = 0;
    for _ in 0..30 {
        c.send_event("join_chat", serde_json::json!({}))
            .await
            .expect("join");
    }
    let mut joined = 0;
    while joined + refused < 30 {
        let ev = c.next_event(T).await.expect("an answer to each join");
        match ev.event.as_str() {
            "joined" => joined += 1,
            "error" if ev.data["code"] == "rate_limited" => refused += 1,
            other => panic!("unexpected {other}: {}", ev.data),
        }
    }
    assert!(
        joined >= 1 && refused >= 10,
        "joined {joined}, refused {refused}"
    );

    // 1,000-id ack frames in a loop: refused once past the cap, the socket stays.
    let ids: Vec<String> = (0..1000)
        .map(|_| mongodb::bson::oid::ObjectId::new().to_hex())
        .collect();
    for _ in 0..60 {
        c.ack(&ids).await.expect("ack frame");
    }
    let ev = c.expect("error", T).await.expect("an error");
    assert_eq!(ev.data["code"], "rate_limited", "{:?}", ev.data);
    c.chat("alice", "c", "still here", None)
        .await
        .expect("send");
    c.expect("message_accepted", T)
        .await
        .expect("the socket stays open");
}

#[tokio::test]
async fn slow_request_bodies_are_cut_off_and_capped_in_number() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rs = ReplicaSet::start(1).await;
    let db = db_name("slow_bodies");
    let mut config = test_config(&rs, &db, "A");
    config.handshake_timeout = Duration::from_secs(1);
    let a = Instance::start(config).await;
    let alice = token("alice");
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..200 {
        let addr = a.addr;
        let alice = alice.clone();
        slow.push(tokio::spawn(async move {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
            let head = format!(
                "POST /api/messages HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {alice}\r\n\
                 Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{{"
            );
            tcp.write_all(head.as_bytes()).await.expect("head");
            let mut answer = Vec::new();
            let _ = tcp.read_to_end(&mut answer).await;
            let answer = String::from_utf8_lossy(&answer).into_owned();
            answer.split(' ').nth(1).unwrap_or("none").to_owned()
        }));
    }
    let mut statuses = std::collections::BTreeMap::new();
    for s in slow {
        let status = tokio::time::timeout(Duration::from_secs(20), s)
            .await
            .expect("no slow body holds its connection for long")
            .expect("task");
        *statuses.entry(status).or_insert(0) += 1;
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "took {took:?}: {statuses:?}"
    );
    assert!(
        statuses.keys().all(|s| s == "408" || s == "503"),
        "each slow body is answered 408 (too slow) or 503 (too many at once): {statuses:?}"
    );
    assert!(
        statuses.contains_key("503"),
        "the in-flight cap held: {statuses:?}"
    );
    // Afterwards the route serves normally.
    let body = r#"{"to":"bob","chatId":"c","message":"m"}"#;
    let (s, answer) = http("POST", &a.http("/api/messages"), Some(&alice), Some(body)).await;
    assert_eq!(s, 201, "{answer}");
}

#[tokio::test]
async fn a_page_of_buffered_messages_holds_at_most_a_mebibyte_and_paging_returns_all() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("page_bytes");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let store = msgbuf::Store::new(rs.client().await.database(&db));
    let text = "x".repeat(16 * 1024);
    let batch: Vec<_> = (0..100)
        .map(|_| msgbuf::BufferedMessage::new("alice", "bob", "c", &text, None))
        .collect();
    for r in store.insert_batch(&batch).await {
        r.expect("insert");
    }
    let bob = token("bob");
    let mut after: Option<String> = None;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let mut url = a.http("/api/messages/buffered/bob?limit=1000");
        if let Some(after) = &after {
            url.push_str(&format!("&after={after}"));
        }
        let (s, body) = http_get(&url, Some(&bob)).await;
        assert_eq!(s, 200, "{body}");
        let page = json(&body);
        let messages = page["messages"].as_array().expect("messages").clone();
        let bytes: usize = messages
            .iter()
            .map(|m| m["message"].as_str().map_or(0, str::len))
            .sum();
        assert!(bytes <= (1 << 20) + 16 * 1024, "page of {bytes} bytes");
        seen.extend(messages.iter().map(id_of));
        pages += 1;
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = batch.iter().map(|m| m.id.to_hex()).collect();
    assert_eq!(seen, expected, "every message once, oldest first");
    assert!(pages >= 2, "100 × 16 KiB takes more than one page");
}

/// Sockets of one user that join and never read, over a backlog of 3,000 × 16 KiB
/// (47 MiB), on either transport: what the instance holds for them is bounded by the
/// user's budget and one drain's read-ahead, not by the number of sockets. Measured (debug
/// build): 17–21 MiB of growth over v1, 19–27 MiB over Socket.IO; the same test against
/// the instance before the byte budgets: 428 MiB.
#[tokio::test]
async fn sockets_of_one_user_that_never_read_hold_a_bounded_number_of_bytes() {
    stalled_sockets_of_one_user(Transport::V1).await;
}

#[tokio::test]
async fn socketio_sockets_of_one_user_that_never_read_hold_a_bounded_number_of_bytes() {
    stalled_sockets_of_one_user(Transport::SocketIo).await;
}

#[derive(Debug, Clone, Copy)]
enum Transport {
    V1,
    SocketIo,
}

async fn stalled_sockets_of_one_user(transport: Transport) {
    const SOCKETS: usize = 24;
    const BACKLOG: u64 = 3000;
    const BOUND_MIB: u64 = 48;
    let rs = ReplicaSet::start(1).await;
    let db = db_name(&format!("user_bytes_{transport:?}"));
    let store = msgbuf::Store::new(rs.client().await.database(&db));
    store.ensure_indexes().await.expect("indexes");
    let text = "x".repeat(16 * 1024);
    for _ in 0..BACKLOG / 250 {
        let batch: Vec<_> = (0..250)
            .map(|_| msgbuf::BufferedMessage::new("alice", "hoarder", "c", &text, None))
            .collect();
        for r in store.insert_batch(&batch).await {
            r.expect("insert");
        }
    }
    // Started after the backlog is stored, so that its change stream has not read it: the
    // growth measured is the sockets' doing. The stalled sockets stay open for the whole
    // measurement (not closed with 4001).
    let a = ProcInstance::start(&rs.uri, &db, "A", &[("MSGBUF_WRITE_TIMEOUT", "120s")]).await;
    let before = a.rss_kib();
    let config = msgbuf::client::ClientConfig {
        read_buffer: 4096,
        ..Default::default()
    };
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], a.port).into();
    let mut v1 = Vec::new();
    let mut sio = Vec::new();
    for _ in 0..SOCKETS {
        match transport {
            Transport::V1 => {
                let mut ws = WsClient::connect_with(&a.ws_url(), &token("hoarder"), &config)
                    .await
                    .expect("connect");
                ws.send_event("join_chat", json!({})).await.expect("join");
                v1.push(ws);
            }
            Transport::SocketIo => sio.push(crate::socketio::Sio::joined(addr, "hoarder").await),
        }
    }
    // Sampled until it stops growing: nothing moves once the budget and the sockets'
    // kernel buffers are full.
    let mut peak = before;
    let mut grew = Instant::now();
    wait_for(
        "the instance's memory to settle",
        Duration::from_secs(60),
        || {
            let rss = a.rss_kib();
            if rss > peak + 1024 {
                grew = Instant::now();
            }
            peak = peak.max(rss);
            let settled = grew.elapsed() > Duration::from_secs(4);
            async move { settled.then_some(()) }
        },
    )
    .await;
    let growth_mib = peak.saturating_sub(before) / 1024;
    eprintln!("{SOCKETS} stalled {transport:?} sockets: RSS {before} KiB -> peak {peak} KiB");
    assert!(
        growth_mib < BOUND_MIB,
        "{SOCKETS} stalled sockets of one user grew the instance by {growth_mib} MiB (bound {BOUND_MIB})"
    );
    // Nothing is lost: every message is still unacknowledged in MongoDB, for the next
    // join (undelivered, or pushed and re-sent after the ack timeout).
    drop((v1, sio));
    let unacked = messages(&rs, &db)
        .await
        .count_documents(doc! {"receiver": "hoarder", "ackedAt": null})
        .await
        .expect("count");
    assert_eq!(unacked, BACKLOG);
}
