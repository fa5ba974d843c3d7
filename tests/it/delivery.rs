//! Issue: core delivery pipeline — two instances in one test, a real replica set.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, oid::ObjectId, Document};
use msgbuf::client::{ClientError, WsClient};
use serde_json::Value;

use crate::common::*;

async fn two_instances(rs: &ReplicaSet, db: &str) -> (Instance, Instance) {
    let a = Instance::start(test_config(rs, db, "A")).await;
    let b = Instance::start(test_config(rs, db, "B")).await;
    (a, b)
}

async fn send(c: &mut WsClient, to: &str, text: &str, client_id: Option<&str>) -> Value {
    c.chat(to, "chat-1", text, client_id).await.expect("send");
    let ev = c.expect("message_accepted", T).await.expect("accepted");
    ev.data
}

async fn doc_of(rs: &ReplicaSet, db: &str, id: &str) -> Document {
    let oid = ObjectId::parse_str(id).expect("oid");
    messages(rs, db)
        .await
        .find_one(doc! {"_id": oid})
        .await
        .expect("find")
        .expect("stored")
}

#[tokio::test]
async fn live_delivery_across_instances_is_claimed_once_and_acked_with_a_receipt() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("live_cross");
    let (a, b) = two_instances(&rs, &db).await;
    let (mut bob, joined) = b.join("bob").await;
    assert_eq!(joined["instance"], "B");
    let (mut alice, _) = a.join("alice").await;

    let accepted = send(&mut alice, "bob", "hello bob", Some("m1")).await;
    let id = id_of(&accepted);
    assert_eq!(accepted["clientMsgId"], "m1");
    let got = bob
        .expect("chat_message", T)
        .await
        .expect("live message")
        .data;
    assert_eq!(
        (
            got["id"].as_str(),
            got["from"].as_str(),
            got["message"].as_str()
        ),
        (Some(id.as_str()), Some("alice"), Some("hello bob"))
    );

    let stored = wait_for("the claim", T, || async {
        let d = doc_of(&rs, &db, &id).await;
        d.get_bool("delivered").unwrap_or(false).then_some(d)
    })
    .await;
    assert_eq!(stored.get_str("deliveredBy").ok(), Some("B"));

    bob.ack(std::slice::from_ref(&id)).await.expect("ack");
    let receipt = alice.expect("receipt", T).await.expect("receipt").data;
    assert_eq!(
        (receipt["id"].as_str(), receipt["status"].as_str()),
        (Some(id.as_str()), Some("delivered"))
    );
    assert!(doc_of(&rs, &db, &id).await.get_datetime("ackedAt").is_ok());
}

#[tokio::test]
async fn offline_receiver_gets_all_oldest_first_once_on_either_instance() {
    // 150 is above what a join reads in one go (100 per half), so the count and the
    // streamed drain are the ones under test; smaller backlogs are read whole (the restart
    // and redelivery tests join with 10–20 pending).
    const N: usize = 150;
    let rs = ReplicaSet::start(1).await;
    let db = db_name("offline_drain");
    let (a, b) = two_instances(&rs, &db).await;
    let (mut alice, _) = a.join("alice").await;
    let (mut carol, _) = b.join("carol").await;
    let mut sent = Vec::new();
    for i in 0..N {
        let c = if i % 2 == 0 { &mut alice } else { &mut carol };
        sent.push(
            send(c, "bob", &format!("m{i}"), None).await["id"]
                .as_str()
                .expect("id")
                .to_owned(),
        );
    }
    let (mut bob, joined) = b.join("bob").await;
    assert_eq!(joined["pending"], N);
    let got: Vec<String> = receive_chat(&mut bob, N, T, |_| false)
        .await
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(got, sent, "all, oldest first, each once");
    let coll = messages(&rs, &db).await;
    wait_for("all claimed", T, || async {
        (coll
            .count_documents(doc! {"receiver": "bob", "delivered": true})
            .await
            .ok()?
            == N as u64)
            .then_some(())
    })
    .await;
    assert!(
        matches!(
            bob.next_event(Duration::from_millis(300)).await,
            Err(ClientError::Timeout(_))
        ),
        "nothing more"
    );
}

#[tokio::test]
async fn every_socket_of_the_receiver_gets_a_live_message_and_one_claim_is_recorded() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("three_sockets");
    let (a, b) = two_instances(&rs, &db).await;
    let (mut s1, _) = a.join("bob").await;
    let (mut s2, _) = a.join("bob").await;
    let (mut s3, _) = b.join("bob").await;
    let (mut alice, _) = b.join("alice").await;
    let id = send(&mut alice, "bob", "to all devices", None).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    for s in [&mut s1, &mut s2, &mut s3] {
        assert_eq!(
            s.expect("chat_message", T).await.expect("live").data["id"],
            id.as_str()
        );
    }
    let d = wait_for("the claim", T, || async {
        let d = doc_of(&rs, &db, &id).await;
        d.get_bool("delivered").unwrap_or(false).then_some(d)
    })
    .await;
    assert!(["A", "B"].contains(&d.get_str("deliveredBy").expect("deliveredBy")));
    // The counter moves once the claim's write returns, which can be after the document
    // reads as delivered.
    let claimed = wait_for("the claim counted", T, || async {
        let claimed: f64 = [&a, &b].iter().map(|i| delivered_live(&i.state)).sum();
        (claimed > 0.0).then_some(claimed)
    })
    .await;
    assert_eq!(claimed, 1.0, "exactly one claim recorded across instances");
}

fn delivered_live(state: &msgbuf::AppState) -> f64 {
    metric(
        &state.metrics_text(),
        "msgbuf_messages_delivered_total{path=\"live\"}",
    )
}

pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn the_same_client_msg_id_twice_gives_one_document_and_the_same_id() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("idempotent");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let (mut alice, _) = a.join("alice").await;
    let first = send(&mut alice, "bob", "once", Some("k-1")).await;
    let second = send(&mut alice, "bob", "once", Some("k-1")).await;
    assert_eq!(first["id"], second["id"]);
    let n = messages(&rs, &db)
        .await
        .count_documents(doc! {"clientMsgId": "k-1"})
        .await
        .expect("count");
    assert_eq!(n, 1);
}

#[tokio::test]
async fn a_restarted_instance_resumes_from_its_checkpoint_and_misses_nothing() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("restart_resume");
    let (a, b) = two_instances(&rs, &db).await;
    let checkpoints = rs
        .client()
        .await
        .database(&db)
        .collection::<Document>(msgbuf::CHECKPOINTS);
    wait_for("B's first checkpoint", T, || async {
        checkpoints.find_one(doc! {"_id": "B"}).await.ok().flatten()
    })
    .await;
    b.stop().await;
    let (mut alice, _) = a.join("alice").await;
    let mut sent = HashSet::new();
    for i in 0..20 {
        sent.insert(
            send(&mut alice, "bob", &format!("while B was down {i}"), None).await["id"]
                .as_str()
                .expect("id")
                .to_owned(),
        );
    }
    let b = Instance::start(test_config(&rs, &db, "B")).await;
    let resumes = metric(&b.state.metrics_text(), "msgbuf_stream_history_lost_total");
    assert_eq!(
        resumes, 0.0,
        "resumed from the checkpoint without history loss"
    );
    let (mut bob, joined) = b.join("bob").await;
    assert_eq!(joined["pending"], 20);
    let mut got = HashSet::new();
    while got.len() < 20 {
        got.insert(
            bob.expect("chat_message", T).await.expect("message").data["id"]
                .as_str()
                .expect("id")
                .to_owned(),
        );
    }
    assert_eq!(got, sent);
    // Live delivery on the resumed stream.
    let id = send(&mut alice, "bob", "after restart", None).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert_eq!(
        bob.expect("chat_message", T).await.expect("live").data["id"],
        id.as_str()
    );
}

#[tokio::test]
async fn a_client_that_never_reads_is_disconnected_and_gets_the_rest_on_its_next_join() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("slow_reader");
    let mut config = test_config(&rs, &db, "A");
    config.queue_capacity = 16;
    // Messages claimed into the closed socket's queue come back after the ack timeout.
    config.ack_timeout = Duration::from_secs(1);
    config.rate_limit = 100_000;
    config.rate_burst = 100_000;
    let a = Instance::start(config).await;
    let (mut bob, _) = a.join("bob").await;
    let (mut alice, _) = a.join("alice").await;
    // Far more than the queue (16) plus what the kernel's socket buffers hold.
    let big = "x".repeat(8000);
    let total = 600;
    for i in 0..total {
        alice
            .chat("bob", "c", &format!("{i}{big}"), Some(&format!("k{i}")))
            .await
            .expect("send");
    }
    let mut accepted = 0;
    while accepted < total {
        if alice.expect("message_accepted", T).await.is_ok() {
            accepted += 1;
        }
    }
    let disconnects = wait_for("the queue-full disconnect", T, || async {
        let n = metric(
            &a.state.metrics_text(),
            "msgbuf_queue_full_disconnects_total",
        );
        (n >= 1.0).then_some(n)
    })
    .await;
    assert_eq!(disconnects, 1.0);
    // Bob's socket was closed with 4001 once he reads what is buffered.
    let mut read = HashSet::new();
    let code = loop {
        match bob.next_event(T).await {
            Ok(ev) if ev.event == "chat_message" => {
                read.insert(id_of(&ev.data));
            }
            Ok(_) => {}
            Err(ClientError::Closed(code)) => break code,
            Err(e) => panic!("unexpected: {e}"),
        }
    };
    assert_eq!(code, Some(4001));
    // Later joins drain the rest: undelivered at once, the unacknowledged ones of the
    // closed queue once their ack timeout has passed.
    let mut got = read.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while got.len() < total {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {total} reached bob",
            got.len()
        );
        // This socket may be closed for a full queue too (16 slots, re-sends of the sweep
        // racing the drain, even before `joined` is out): what it did not get waits for
        // the next join.
        let mut bob = a.connect("bob").await;
        let joined = match bob.join(T).await {
            Ok(joined) => joined,
            Err(ClientError::Closed(Some(4001))) => continue,
            Err(e) => panic!("join: {e}"),
        };
        let pending = joined["pending"].as_u64().expect("pending") as usize;
        assert!(pending <= total);
        for _ in 0..pending {
            let Ok(ev) = bob.expect("chat_message", T).await else {
                break;
            };
            let id = id_of(&ev.data);
            got.insert(id.clone());
            if bob.ack(&[id]).await.is_err() {
                break;
            }
        }
        bob.close().await;
        if pending == 0 {
            // Nothing pending yet: the closed queue's messages wait out their ack timeout.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let all = got;
    assert_eq!(
        all.len(),
        total,
        "every message reached bob across the two sessions"
    );
}

#[tokio::test]
async fn a_thousand_messages_ten_senders_ten_receivers_two_instances_once_each_in_order() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("thousand");
    let (a, b) = two_instances(&rs, &db).await;
    let mut receivers = Vec::new();
    for r in 0..10 {
        let inst = if r % 2 == 0 { &a } else { &b };
        receivers.push(inst.join(&format!("r{r}")).await.0);
    }
    let mut senders = Vec::new();
    for s in 0..10 {
        let inst = if s % 2 == 0 { &b } else { &a };
        let (mut c, _) = inst.join(&format!("s{s}")).await;
        senders.push(tokio::spawn(async move {
            for i in 0..100 {
                c.chat(&format!("r{}", i % 10), "c", &format!("{s}:{i}"), None)
                    .await
                    .expect("send");
            }
            for _ in 0..100 {
                c.expect("message_accepted", T).await.expect("accepted");
            }
            c
        }));
    }
    let mut readers = Vec::new();
    for (r, mut c) in receivers.into_iter().enumerate() {
        readers.push(tokio::spawn(async move {
            let mut per_sender: HashMap<String, Vec<u32>> = HashMap::new();
            let mut ids = HashSet::new();
            while ids.len() < 100 {
                let ev = c
                    .expect("chat_message", Duration::from_secs(60))
                    .await
                    .unwrap_or_else(|e| panic!("r{r}: {e}"));
                assert!(ids.insert(id_of(&ev.data)), "duplicate on r{r}");
                let (s, i) = ev.data["message"]
                    .as_str()
                    .expect("text")
                    .split_once(':')
                    .expect("s:i");
                per_sender
                    .entry(s.to_owned())
                    .or_default()
                    .push(i.parse().expect("i"));
            }
            per_sender
        }));
    }
    for s in senders {
        s.await.expect("sender");
    }
    for r in readers {
        let per_sender = r.await.expect("reader");
        assert_eq!(per_sender.len(), 10);
        for seq in per_sender.values() {
            assert!(
                seq.windows(2).all(|w| w[0] < w[1]),
                "per-sender order: {seq:?}"
            );
        }
    }
}

#[tokio::test]
async fn the_drain_query_uses_an_index_and_skips_acknowledged_history() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("explain");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    // Bob's history: 30 messages delivered and acknowledged, and 5 still undelivered.
    let (mut alice, _) = a.join("alice").await;
    let (mut bob, _) = a.join("bob").await;
    let mut ids = Vec::new();
    for i in 0..30 {
        send(&mut alice, "bob", &format!("old {i}"), None).await;
        ids.push(id_of(
            &bob.expect("chat_message", T).await.expect("live").data,
        ));
    }
    bob.ack(&ids).await.expect("ack");
    wait_for("the acks", T, || async {
        let acked = messages(&rs, &db)
            .await
            .count_documents(doc! {"ackedAt": {"$type": "date"}})
            .await
            .expect("count");
        (acked == 30).then_some(())
    })
    .await;
    bob.close().await;
    for i in 0..5 {
        send(&mut alice, "bob", &format!("new {i}"), None).await;
    }

    let explain = |command: Document| {
        let rs = &rs;
        let db = &db;
        async move {
            rs.client()
                .await
                .database(db)
                .run_command(doc! {"explain": command, "verbosity": "executionStats"})
                .await
                .expect("explain")
        }
    };
    // The drain itself: each half streams from its index in _id order, with no sort stage,
    // and reads only what it returns: the acknowledged history is never examined.
    let halves = msgbuf::Store::catch_up_sources("bob", Duration::from_secs(30), None);
    for (half, returned) in halves.into_iter().zip([5, 0]) {
        let (filter, hint) = (half.filter, half.index);
        let e = explain(
            doc! {"find": msgbuf::MESSAGES, "filter": filter, "sort": {"_id": 1}, "hint": hint},
        )
        .await;
        let plan = e
            .get_document("queryPlanner")
            .and_then(|p| p.get_document("winningPlan"))
            .expect("winning plan")
            .to_string();
        assert!(
            plan.contains("IXSCAN") && !plan.contains("\"SORT\""),
            "index-ordered drain: {plan}"
        );
        let stats = e.get_document("executionStats").expect("stats");
        assert_eq!(
            (
                stats.get_i32("nReturned").ok(),
                stats.get_i32("totalDocsExamined").ok()
            ),
            (Some(returned), Some(returned)),
            "{hint}: {stats}"
        );
    }
    // The count on join answers the same filter without a collection scan.
    let filter = msgbuf::Store::pending_filter("bob", Duration::from_secs(30));
    let e = explain(doc! {"count": msgbuf::MESSAGES, "query": filter}).await;
    let plan = e.get_document("queryPlanner").expect("plan").to_string();
    assert!(
        plan.contains("IXSCAN") && !plan.contains("COLLSCAN"),
        "count uses indexes: {plan}"
    );
    let examined = e
        .get_document("executionStats")
        .and_then(|s| s.get_i32("totalDocsExamined"))
        .expect("docs examined");
    assert!(examined <= 5, "count read the history: {examined}");

    let indexes: Vec<String> = messages(&rs, &db)
        .await
        .list_index_names()
        .await
        .expect("indexes");
    for name in [
        "receiver_1",
        "delivered_1",
        "receiver_1_delivered_1",
        "receiver_1_delivered_1__id_1",
        "receiver_1__id_1_unacked",
        "sender_1_clientMsgId_1",
        "deliveredAt_ttl",
    ] {
        assert!(indexes.contains(&name.to_owned()), "{name} in {indexes:?}");
    }
    drop(a);
}

#[tokio::test]
async fn an_ack_that_lands_before_the_claim_stays_recorded() {
    // The claim is written after the push (batched), so a fast client's ack can reach
    // MongoDB first; the claim must not turn the message back into "awaiting its ack".
    let rs = ReplicaSet::start(1).await;
    let db = db_name("ack_first");
    let store = msgbuf::Store::new(rs.client().await.database(&db));
    store.ensure_indexes().await.expect("indexes");
    let early = msgbuf::BufferedMessage::new("alice", "bob", "c", "acked early", None);
    let normal = msgbuf::BufferedMessage::new("alice", "bob", "c", "acked later", None);
    for r in store.insert_batch(&[early.clone(), normal.clone()]).await {
        r.expect("insert");
    }
    store
        .ack(&[("bob".to_owned(), vec![early.id])])
        .await
        .expect("ack");
    assert_eq!(
        store
            .claim(&[early.id, normal.id], "A")
            .await
            .expect("claim"),
        2
    );
    let early_doc = doc_of(&rs, &db, &early.id.to_hex()).await;
    assert!(early_doc.get_datetime("ackedAt").is_ok(), "{early_doc}");
    assert_eq!(early_doc.get_bool("delivered").ok(), Some(true));
    let normal_doc = doc_of(&rs, &db, &normal.id.to_hex()).await;
    assert_eq!(
        normal_doc.get("ackedAt"),
        Some(&mongodb::bson::Bson::Null),
        "{normal_doc}"
    );
    let counts = store.counts().await.expect("counts");
    assert_eq!((counts.delivered, counts.unacked), (2, 1));
}

#[tokio::test]
async fn a_claim_written_with_its_ack_flips_only_unclaimed_messages_and_keeps_an_earlier_ack() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("claim_acked");
    let store = msgbuf::Store::new(rs.client().await.database(&db));
    store.ensure_indexes().await.expect("indexes");
    let msg = |text: &str| msgbuf::BufferedMessage::new("alice", "bob", "c", text, None);
    let (fresh, elsewhere, acked_before) = (msg("fresh"), msg("elsewhere"), msg("acked before"));
    let all = [&fresh, &elsewhere, &acked_before].map(|m| m.clone());
    for r in store.insert_batch(&all).await {
        r.expect("insert");
    }
    assert_eq!(store.claim(&[elsewhere.id], "B").await.expect("claim"), 1);
    store
        .ack(&[("bob".to_owned(), vec![acked_before.id])])
        .await
        .expect("ack");
    let first_ack = doc_of(&rs, &db, &acked_before.id.to_hex())
        .await
        .get_datetime("ackedAt")
        .copied()
        .expect("acked");

    let flipped = store
        .claim_acked(&[fresh.id, elsewhere.id, acked_before.id], "A")
        .await
        .expect("claim with ack");
    assert_eq!(
        flipped, 2,
        "fresh and acked-before; not the one claimed elsewhere"
    );

    let d = doc_of(&rs, &db, &fresh.id.to_hex()).await;
    assert_eq!(
        (
            d.get_bool("delivered"),
            d.get_str("deliveredBy"),
            d.get_str("receiptFor")
        ),
        (Ok(true), Ok("A"), Ok("alice")),
        "{d}"
    );
    assert!(d.get_datetime("ackedAt").is_ok(), "{d}");
    let d = doc_of(&rs, &db, &elsewhere.id.to_hex()).await;
    assert_eq!(d.get_str("deliveredBy").ok(), Some("B"), "{d}");
    assert_eq!(d.get("ackedAt"), Some(&mongodb::bson::Bson::Null), "{d}");
    let d = doc_of(&rs, &db, &acked_before.id.to_hex()).await;
    assert_eq!(d.get_datetime("ackedAt").ok(), Some(&first_ack), "{d}");
    let counts = store.counts().await.expect("counts");
    assert_eq!((counts.delivered, counts.unacked), (3, 1));
}

#[tokio::test]
async fn a_receiver_that_acks_at_once_gets_each_message_recorded_with_one_receipt() {
    // An ack sent as soon as the message is read usually reaches the instance before the
    // (batched) claim is written, and both then go in one write. Whichever way each message
    // goes, it is recorded delivered and acknowledged, and its sender gets one receipt.
    const N: usize = 20;
    let rs = ReplicaSet::start(1).await;
    let db = db_name("ack_at_once");
    let (a, b) = two_instances(&rs, &db).await;
    let (mut bob, _) = b.join("bob").await;
    let (mut alice, _) = a.join("alice").await;
    let reader = tokio::spawn(async move {
        for _ in 0..=N {
            let m = bob.expect("chat_message", T).await.expect("live message");
            bob.ack(&[id_of(&m.data)]).await.expect("ack");
        }
        bob
    });

    let mut accepted = Vec::new();
    let mut receipts: HashMap<String, usize> = HashMap::new();
    let mut send_and_collect = async |texts: Vec<String>| {
        let first = accepted.len();
        for text in &texts {
            alice.chat("bob", "chat-1", text, None).await.expect("send");
        }
        while accepted.len() < first + texts.len()
            || accepted[first..]
                .iter()
                .any(|id| !receipts.contains_key(id))
        {
            let ev = alice.next_event(T).await.expect("an event");
            match ev.event.as_str() {
                "message_accepted" => accepted.push(id_of(&ev.data)),
                "receipt" => *receipts.entry(id_of(&ev.data)).or_default() += 1,
                _ => {}
            }
        }
    };
    send_and_collect((0..N).map(|i| format!("m{i}")).collect()).await;
    // A marker sent after every receipt is in: a second receipt for any of the others would
    // come from a write made before the marker's, so it would be in by the marker's receipt.
    send_and_collect(vec!["marker".to_owned()]).await;
    let _bob = reader.await.expect("reader");
    let twice: Vec<_> = receipts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "receipts sent twice: {twice:?}");
    assert_eq!(
        receipts.keys().collect::<HashSet<_>>(),
        accepted.iter().collect::<HashSet<_>>()
    );
    for id in &accepted {
        let d = doc_of(&rs, &db, id).await;
        assert_eq!(d.get_str("deliveredBy").ok(), Some("B"), "{d}");
        assert!(d.get_datetime("ackedAt").is_ok(), "{d}");
    }
}

#[tokio::test]
async fn a_drain_acked_as_it_is_read_is_recorded_one_write_per_message() {
    // A drain queues claims faster than the client's acks come back; each claim waits for
    // its ack, so that claim and ack go in one write, however far behind the acks are.
    const N: usize = 2000;
    let rs = ReplicaSet::start(1).await;
    let db = db_name("drain_acked");
    let (store, backlog) = stored_backlog(&rs, &db, "bob", "c", N).await;
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let (mut bob, joined) = a.join("bob").await;
    assert_eq!(joined["pending"], N);
    let got: Vec<String> = receive_chat(&mut bob, N, T, |_| true)
        .await
        .iter()
        .map(id_of)
        .collect();
    let sent: Vec<String> = backlog.iter().map(|m| m.id.to_hex()).collect();
    assert_eq!(got, sent, "all, oldest first, each once");
    let counts = wait_for("every message recorded delivered and acked", T, || async {
        let c = store.counts().await.ok()?;
        (c.delivered == N as u64 && c.unacked == 0).then_some(c)
    })
    .await;
    assert_eq!(counts.undelivered, 0);
    assert_eq!(
        metric(&a.state.metrics_text(), "msgbuf_claims_with_ack_total"),
        N as f64,
        "each claim went in one write with its ack"
    );
}

#[tokio::test]
async fn a_drain_goes_on_when_its_client_stops_acking() {
    // The drain keeps within a window of its client's acks; a client that acked once and
    // then stopped still gets everything (the window gives way once its acks stall).
    const N: usize = 2500;
    let rs = ReplicaSet::start(1).await;
    let db = db_name("drain_ack_stall");
    let (store, backlog) = stored_backlog(&rs, &db, "bob", "c", N).await;
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let (mut bob, joined) = a.join("bob").await;
    assert_eq!(joined["pending"], N);
    let first_only = |i| i == 0;
    let got: Vec<String> = receive_chat(&mut bob, N, T, first_only)
        .await
        .iter()
        .map(id_of)
        .collect();
    let sent: Vec<String> = backlog.iter().map(|m| m.id.to_hex()).collect();
    assert_eq!(got, sent, "all, oldest first, each once");
    let counts = wait_for("every message recorded delivered", T, || async {
        let c = store.counts().await.ok()?;
        (c.delivered == N as u64).then_some(c)
    })
    .await;
    assert_eq!(counts.unacked, N as u64 - 1, "only the first was acked");
}

#[tokio::test]
async fn unacknowledged_pushes_are_redelivered_after_the_ack_timeout() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("redelivery");
    let mut config = test_config(&rs, &db, "A");
    config.ack_timeout = Duration::from_secs(1);
    let a = Instance::start(config).await;
    let (mut bob, _) = a.join("bob").await;
    let (mut alice, _) = a.join("alice").await;
    let id = send(&mut alice, "bob", "ack me", None).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let first = bob.expect("chat_message", T).await.expect("live").data;
    assert_eq!(first["redelivery"], Value::Null);
    // No ack: the sweep re-sends it, marked, on the same socket.
    let again = bob
        .expect("chat_message", T)
        .await
        .expect("redelivered")
        .data;
    assert_eq!(
        (again["id"].as_str(), again["redelivery"].as_bool()),
        (Some(id.as_str()), Some(true))
    );
    bob.ack(std::slice::from_ref(&id)).await.expect("ack");
    let coll = messages(&rs, &db).await;
    let oid = ObjectId::parse_str(&id).expect("oid");
    wait_for("the ack", T, || async {
        coll.find_one(doc! {"_id": oid, "ackedAt": {"$ne": null}})
            .await
            .ok()
            .flatten()
    })
    .await;
    let docs: Vec<Document> = coll
        .find(doc! {})
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("docs");
    assert_eq!(docs.len(), 1);
}

/// Command monitoring: what msgbuf actually sends to MongoDB.
#[tokio::test]
async fn inserts_and_claims_use_majority_write_concern_and_drains_majority_reads() {
    use mongodb::event::command::CommandEvent;
    use std::sync::{Arc, Mutex};
    let rs = ReplicaSet::start(1).await;
    let db = db_name("concern_audit");
    let seen: Arc<Mutex<Vec<Document>>> = Arc::default();
    let sink = seen.clone();
    let mut options = mongodb::options::ClientOptions::parse(&rs.uri)
        .await
        .expect("options");
    options.command_event_handler = Some(mongodb::event::EventHandler::callback(
        move |ev: CommandEvent| {
            if let CommandEvent::Started(s) = ev {
                if let Ok(mut v) = sink.lock() {
                    v.push(s.command);
                }
            }
        },
    ));
    let client = mongodb::Client::with_options(options).expect("client");
    let config = test_config(&rs, &db, "A");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = msgbuf::Server::start(config, client, shutdown.clone())
        .await
        .expect("start");
    let addr = server.local_addr();
    let task = tokio::spawn(server.run());
    let url = format!("ws://{addr}/ws");
    let mut alice = WsClient::connect(&url, &token("alice"))
        .await
        .expect("alice");
    for i in 0..3 {
        alice
            .chat("bob", "c", &format!("offline {i}"), None)
            .await
            .expect("send");
        alice.expect("message_accepted", T).await.expect("accepted");
    }
    let mut bob = WsClient::connect(&url, &token("bob")).await.expect("bob");
    bob.join(T).await.expect("join");
    for _ in 0..3 {
        bob.expect("chat_message", T).await.expect("drained");
    }
    alice.join(T).await.expect("join");
    bob.chat("alice", "c", "live", None).await.expect("send");
    alice.expect("chat_message", T).await.expect("live");
    let coll = messages(&rs, &db).await;
    wait_for("all claimed", T, || async {
        (coll.count_documents(doc! {"delivered": false}).await.ok()? == 0).then_some(())
    })
    .await;
    shutdown.cancel();
    task.await.expect("join").expect("exit");

    let commands = seen.lock().expect("commands").clone();
    let on_messages = |name: &str| -> Vec<Document> {
        commands
            .iter()
            .filter(|c| c.get_str(name).ok() == Some(msgbuf::MESSAGES))
            .cloned()
            .collect()
    };
    let majority = |c: &Document| {
        c.get_document("writeConcern")
            .ok()
            .and_then(|w| w.get_str("w").ok())
            == Some("majority")
    };
    let inserts = on_messages("insert");
    let claims: Vec<Document> = on_messages("update")
        .into_iter()
        .chain(on_messages("findAndModify"))
        .collect();
    let finds = on_messages("find");
    assert!(
        inserts.len() >= 4 && inserts.iter().all(majority),
        "inserts with w:majority: {inserts:?}"
    );
    assert!(
        !claims.is_empty() && claims.iter().all(majority),
        "claims with w:majority: {claims:?}"
    );
    let drains: Vec<&Document> = finds
        .iter()
        .filter(|f| {
            f.get_document("filter")
                .is_ok_and(|d| d.get_str("receiver").ok() == Some("bob"))
        })
        .collect();
    assert!(!drains.is_empty(), "a drain query ran");
    for d in drains {
        assert_eq!(
            d.get_document("readConcern")
                .ok()
                .and_then(|r| r.get_str("level").ok()),
            Some("majority"),
            "{d:?}"
        );
    }
}
