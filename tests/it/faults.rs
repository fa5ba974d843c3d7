//! Fault injection: msgbuf instances as separate processes, real replica sets, continuous
//! traffic, and a count of every message. Each scenario passes only with 0 accepted
//! messages lost, and prints its row of docs/RELIABILITY.md.

use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};

use crate::common::traffic::{Report, Traffic};
use crate::common::*;

const ACK: (&str, &str) = ("MSGBUF_ACK_TIMEOUT", "2s");

/// Instances A and B as processes, with a 2 s ack timeout.
async fn pair(rs: &ReplicaSet, db: &str) -> (ProcInstance, ProcInstance) {
    let a = ProcInstance::start(&rs.uri, db, "A", &[ACK]).await;
    let b = ProcInstance::start(&rs.uri, db, "B", &[ACK]).await;
    (a, b)
}

fn check(report: Report) {
    println!("RELIABILITY {report}");
    assert_eq!(report.lost, 0, "accepted messages lost: {report}");
    assert_eq!(report.duplicates, 0, "duplicates on a socket: {report}");
    assert!(report.accepted > 0, "traffic flowed: {report}");
}

#[tokio::test]
async fn kill_9_of_one_of_two_instances_during_traffic_loses_nothing() {
    let rs = ReplicaSet::start(1).await;
    let (a, mut b) = pair(&rs, &db_name("fault_kill9")).await;
    let traffic = Traffic::start(
        "kill9",
        vec![a.ws_url(), b.ws_url()],
        4,
        4,
        Duration::from_millis(20),
    );
    for _ in 0..3 {
        traffic.progress(40, T).await;
        b.kill9();
        traffic.progress(40, T).await;
        b.restart().await;
    }
    traffic.progress(40, T).await;
    check(
        traffic
            .finish(
                "kill -9 of one of two instances, 3 times",
                Duration::from_secs(60),
            )
            .await,
    );
}

#[tokio::test]
async fn primary_step_down_and_kill_9_of_the_primary_during_traffic_loses_nothing() {
    let mut rs = ReplicaSet::start(3).await;
    if skip_external(
        &rs,
        "primary_step_down_and_kill_9_of_the_primary_during_traffic_loses_nothing",
    ) {
        return;
    }
    let (a, b) = pair(&rs, &db_name("fault_failover")).await;
    let traffic = Traffic::start(
        "failover",
        vec![a.ws_url(), b.ws_url()],
        4,
        4,
        Duration::from_millis(20),
    );
    traffic.progress(40, T).await;
    rs.step_down().await;
    traffic.progress(40, Duration::from_secs(60)).await;
    let primary = rs.wait_for_primary().await;
    rs.kill(primary);
    traffic.progress(40, Duration::from_secs(60)).await;
    rs.restart(primary).await;
    traffic.progress(40, Duration::from_secs(60)).await;
    check(
        traffic
            .finish(
                "primary step-down, then kill -9 of the primary (3 members)",
                Duration::from_secs(90),
            )
            .await,
    );
}

#[tokio::test]
async fn mongodb_down_for_ten_seconds_turns_readyz_503_then_200_and_loses_nothing() {
    let mut rs = ReplicaSet::start(1).await;
    if skip_external(
        &rs,
        "mongodb_down_for_ten_seconds_turns_readyz_503_then_200_and_loses_nothing",
    ) {
        return;
    }
    let db = db_name("fault_outage");
    let a = ProcInstance::start(&rs.uri, &db, "A", &[ACK]).await;
    let traffic = Traffic::start("outage", vec![a.ws_url()], 2, 2, Duration::from_millis(20));
    traffic.progress(30, T).await;
    rs.kill(0);
    let ready = a.http("/readyz");
    wait_for("/readyz 503", T, || async {
        (http_get(&ready, None).await.0 == 503).then_some(())
    })
    .await;
    let cpu_before = a.cpu_time();
    // The outage itself: MongoDB stays down for 10 s.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let cpu_used = a.cpu_time().saturating_sub(cpu_before);
    assert_eq!(
        http_get(&a.http("/healthz"), None).await.0,
        200,
        "the instance did not crash"
    );
    assert!(
        cpu_used < Duration::from_secs(3),
        "no spinning while MongoDB is down: {cpu_used:?} CPU in 10 s"
    );
    rs.restart(0).await;
    rs.wait_for_primary().await;
    wait_for("/readyz 200", Duration::from_secs(60), || async {
        (http_get(&ready, None).await.0 == 200).then_some(())
    })
    .await;
    traffic.progress(30, Duration::from_secs(60)).await;
    check(
        traffic
            .finish("MongoDB fully down for 10 s", Duration::from_secs(60))
            .await,
    );
}

#[tokio::test]
async fn every_instance_restarted_while_receivers_are_offline_then_all_is_drained() {
    let rs = ReplicaSet::start(1).await;
    let (mut a, mut b) = pair(&rs, &db_name("fault_restart_all")).await;
    // Senders only: the receivers are offline.
    let senders = Traffic::offline(
        "restartall",
        vec![a.ws_url(), b.ws_url()],
        4,
        4,
        Duration::from_millis(10),
    );
    senders.progress(100, T).await;
    let ledger = senders.ledger.clone();
    // Receivers never connected, so finish() cannot wait for them: stop sending first.
    let accepted: Vec<(String, String)> = {
        let report_ledger = ledger.clone();
        drop(senders_stop(senders).await);
        let l = report_ledger.lock().expect("ledger");
        l.accepted
            .iter()
            .map(|(id, to)| (id.clone(), to.clone()))
            .collect()
    };
    for p in [&mut a, &mut b] {
        let (status, took) = p.terminate(Duration::from_secs(10)).await;
        assert!(
            status.success() && took < Duration::from_secs(10),
            "{status} in {took:?}"
        );
    }
    a.restart().await;
    b.restart().await;
    let receivers = Traffic::start(
        "restartall",
        vec![b.ws_url(), a.ws_url()],
        0,
        4,
        Duration::from_millis(10),
    );
    {
        let mut l = receivers.ledger.lock().expect("ledger");
        l.accepted.extend(accepted.iter().cloned());
        l.sent = accepted.len();
    }
    check(
        receivers
            .finish(
                "every instance restarted while receivers were offline",
                Duration::from_secs(60),
            )
            .await,
    );
}

/// Stops a sender-only traffic without waiting for receivers.
async fn senders_stop(t: Traffic) -> Report {
    t.finish("-", Duration::ZERO).await
}

#[tokio::test]
async fn sigterm_during_traffic_exits_zero_within_ten_seconds_and_saves_the_token() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("fault_sigterm");
    let (mut a, b) = pair(&rs, &db).await;
    let checkpoints = rs
        .client()
        .await
        .database(&db)
        .collection::<Document>(msgbuf::CHECKPOINTS);
    let traffic = Traffic::start(
        "sigterm",
        vec![a.ws_url(), b.ws_url()],
        4,
        4,
        Duration::from_millis(10),
    );
    traffic.progress(100, T).await;
    let before = Instant::now();
    let (status, took) = a.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let saved = checkpoints
        .find_one(doc! {"_id": "A"})
        .await
        .expect("find")
        .expect("checkpoint saved");
    let at = saved
        .get_datetime("updatedAt")
        .expect("updatedAt")
        .to_system_time();
    let stopped_at = std::time::SystemTime::now() - before.elapsed();
    assert!(
        at + Duration::from_secs(2) >= stopped_at,
        "the token was saved at shutdown"
    );
    traffic.progress(50, T).await;
    a.restart().await;
    traffic.progress(50, T).await;
    check(
        traffic
            .finish(
                "SIGTERM of one instance during traffic, restarted",
                Duration::from_secs(60),
            )
            .await,
    );
}

#[tokio::test]
async fn a_resume_token_older_than_the_oplog_is_detected_rescanned_and_loses_nothing() {
    // Checkpoints every second and no snapshot history window, so the 1 MB oplog truncates promptly.
    let rs = ReplicaSet::start_with(
        1,
        &[
            "--oplogSize",
            "1",
            "--syncdelay",
            "1",
            "--setParameter",
            "minSnapshotHistoryWindowInSeconds=0",
        ],
    )
    .await;
    if skip_external(
        &rs,
        "a_resume_token_older_than_the_oplog_is_detected_rescanned_and_loses_nothing",
    ) {
        return;
    }
    let db = db_name("fault_history_lost");
    let mut a = ProcInstance::start(&rs.uri, &db, "A", &[ACK]).await;
    let client = rs.client().await;
    let checkpoints = client
        .database(&db)
        .collection::<Document>(msgbuf::CHECKPOINTS);
    wait_for("A's checkpoint", T, || async {
        checkpoints.find_one(doc! {"_id": "A"}).await.ok().flatten()
    })
    .await;
    let (status, _) = a.terminate(Duration::from_secs(10)).await;
    assert!(status.success());
    // Messages for an offline user while A is down, then far more than the oplog holds.
    let b = ProcInstance::start(&rs.uri, &db, "B", &[ACK]).await;
    let senders = Traffic::offline("histlost", vec![b.ws_url()], 2, 2, Duration::from_millis(5));
    senders.progress(50, T).await;
    let accepted: Vec<(String, String)> = {
        let ledger = senders.ledger.clone();
        senders_stop(senders).await;
        let l = ledger.lock().expect("ledger");
        l.accepted
            .iter()
            .map(|(i, t)| (i.clone(), t.clone()))
            .collect()
    };
    drop(b);
    let filler = client.database(&db).collection::<Document>("filler");
    let blob = "x".repeat(100_000);
    let oldest = || async {
        let local = client.database("local").collection::<Document>("oplog.rs");
        local
            .find_one(doc! {})
            .sort(doc! {"$natural": 1})
            .await
            .ok()
            .flatten()
            .and_then(|d| d.get_timestamp("ts").ok())
    };
    let first = oldest().await;
    let stats = client
        .database("local")
        .run_command(doc! {"collStats": "oplog.rs"})
        .await
        .expect("oplog stats");
    println!("oplog maxSize: {:?}", stats.get("maxSize"));
    // Bounded: the oplog's minimum size is 990 MB on some versions.
    for round in 0..1500 {
        let docs: Vec<Document> = (0..10)
            .map(|i| doc! {"round": round, "i": i, "blob": &blob})
            .collect();
        filler.insert_many(docs).await.expect("filler");
        if round % 50 == 49 && oldest().await != first {
            break;
        }
    }
    wait_for(
        "the oplog to roll over",
        Duration::from_secs(60),
        || async { (oldest().await != first).then_some(()) },
    )
    .await;
    a.restart().await;
    wait_for("history loss detected", T, || async {
        (a.metric("msgbuf_stream_history_lost_total").await >= 1.0).then_some(())
    })
    .await;
    let receivers = Traffic::start(
        "histlost",
        vec![a.ws_url()],
        2,
        2,
        Duration::from_millis(20),
    );
    {
        let mut l = receivers.ledger.lock().expect("ledger");
        l.sent += accepted.len();
        l.accepted.extend(accepted);
    }
    receivers.progress(30, T).await;
    check(
        receivers
            .finish(
                "resume token older than the oplog (--oplogSize 1)",
                Duration::from_secs(60),
            )
            .await,
    );
}

#[tokio::test]
async fn killed_cursors_and_failed_get_mores_resume_and_push_every_insert() {
    let rs = ReplicaSet::start(1).await;
    if skip_external(
        &rs,
        "killed_cursors_and_failed_get_mores_resume_and_push_every_insert",
    ) {
        return;
    }
    let db = db_name("fault_failpoints");
    let a = ProcInstance::start(&rs.uri, &db, "A", &[ACK]).await;
    let traffic = Traffic::start(
        "failpoints",
        vec![a.ws_url()],
        2,
        2,
        Duration::from_millis(20),
    );
    traffic.progress(30, T).await;
    let client = rs.client().await;
    let admin = client.database("admin");
    for _ in 0..3 {
        let mut cursor = admin
            .aggregate(vec![
                doc! {"$currentOp": {"allUsers": true, "idleCursors": true}},
                doc! {"$match": {"ns": format!("{db}.{}", msgbuf::MESSAGES), "cursor.originatingCommand.pipeline.0.$changeStream": {"$exists": true}}},
            ])
            .await
            .expect("currentOp");
        use futures::TryStreamExt;
        let mut killed = 0;
        while let Some(op) = cursor.try_next().await.expect("op") {
            if let Ok(id) = op
                .get_document("cursor")
                .and_then(|c| c.get_i64("cursorId"))
            {
                client
                    .database(&db)
                    .run_command(doc! {"killCursors": msgbuf::MESSAGES, "cursors": [id]})
                    .await
                    .expect("killCursors");
                killed += 1;
            }
        }
        traffic.progress(20, T).await;
        let _ = killed;
    }
    admin
        .run_command(doc! {"configureFailPoint": "failCommand", "mode": {"times": 3}, "data": {"failCommands": ["getMore"], "closeConnection": true}})
        .await
        .expect("failpoint");
    traffic.progress(40, T).await;
    admin
        .run_command(doc! {"configureFailPoint": "failCommand", "mode": "off"})
        .await
        .expect("off");
    let ledger = traffic.ledger.clone();
    let report = traffic
        .finish(
            "killCursors on the stream x3, failCommand getMore closeConnection x3",
            Duration::from_secs(60),
        )
        .await;
    let l = ledger.lock().expect("ledger");
    let pushed: std::collections::HashSet<&String> = l.received.values().flatten().collect();
    let inserted: std::collections::HashSet<&String> = l.accepted.keys().collect();
    assert_eq!(
        pushed, inserted,
        "the set of ids pushed equals the set inserted"
    );
    drop(l);
    check(report);
}

#[tokio::test]
async fn an_idle_stream_keeps_its_checkpoint_advancing_and_resumes_after_restart() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("fault_idle");
    let idle: u64 = std::env::var("MSGBUF_FAULT_IDLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let mut a = ProcInstance::start(&rs.uri, &db, "A", &[ACK]).await;
    let client = rs.client().await;
    let checkpoints = client
        .database(&db)
        .collection::<Document>(msgbuf::CHECKPOINTS);
    let first = wait_for("A's checkpoint", T, || async {
        checkpoints.find_one(doc! {"_id": "A"}).await.ok().flatten()
    })
    .await;
    let other = client.database(&db).collection::<Document>("other");
    let until = Instant::now() + Duration::from_secs(idle);
    let mut n = 0;
    while Instant::now() < until {
        other
            .insert_one(doc! {"n": n})
            .await
            .expect("write elsewhere");
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let later = checkpoints
        .find_one(doc! {"_id": "A"})
        .await
        .expect("find")
        .expect("checkpoint");
    assert_ne!(
        first.get("token"),
        later.get("token"),
        "the idle stream's token advanced"
    );
    let (status, _) = a.terminate(Duration::from_secs(10)).await;
    assert!(status.success());
    a.restart().await;
    let traffic = Traffic::start("idle", vec![a.ws_url()], 2, 2, Duration::from_millis(20));
    traffic.progress(30, T).await;
    assert_eq!(
        a.metric("msgbuf_stream_history_lost_total").await,
        0.0,
        "resumed without history loss"
    );
    check(
        traffic
            .finish(
                &format!(
                    "idle stream for {idle} s while other collections were written, then restart"
                ),
                Duration::from_secs(60),
            )
            .await,
    );
}

#[tokio::test]
async fn a_frozen_instance_is_covered_by_redelivery_and_its_late_claims_change_nothing() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("fault_sigstop");
    let (a, b) = pair(&rs, &db).await;
    let coll = messages(&rs, &db).await;
    let mut bob_a = msgbuf::client::WsClient::connect(&a.ws_url(), &token("bob"))
        .await
        .expect("connect");
    bob_a.join(T).await.expect("join A");
    let mut alice = msgbuf::client::WsClient::connect(&b.ws_url(), &token("alice"))
        .await
        .expect("connect");
    // Pushed to bob on A, claimed by A, never acknowledged (as if the screen never showed them).
    let mut first = Vec::new();
    for i in 0..5 {
        alice
            .chat("bob", "c", &format!("before {i}"), None)
            .await
            .expect("send");
        first.push(
            alice
                .expect("message_accepted", T)
                .await
                .expect("accepted")
                .data["id"]
                .as_str()
                .expect("id")
                .to_owned(),
        );
        bob_a.expect("chat_message", T).await.expect("pushed on A");
    }
    wait_for("A's claims", T, || async {
        (coll.count_documents(doc! {"deliveredBy": "A"}).await.ok()? == 5).then_some(())
    })
    .await;
    a.signal(libc::SIGSTOP);
    // Frozen longer than the ack timeout; meanwhile more messages while bob is only on A.
    let mut second = Vec::new();
    for i in 0..5 {
        alice
            .chat("bob", "c", &format!("during {i}"), None)
            .await
            .expect("send");
        second.push(
            alice
                .expect("message_accepted", T)
                .await
                .expect("accepted")
                .data["id"]
                .as_str()
                .expect("id")
                .to_owned(),
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut bob_b = msgbuf::client::WsClient::connect(&b.ws_url(), &token("bob"))
        .await
        .expect("connect");
    let joined = bob_b.join(T).await.expect("join B");
    assert_eq!(joined["pending"], 10, "5 overdue re-sends + 5 undelivered");
    let mut redelivered = Vec::new();
    let mut fresh = Vec::new();
    for _ in 0..10 {
        let ev = bob_b.expect("chat_message", T).await.expect("drained").data;
        let id = id_of(&ev);
        if ev["redelivery"] == true {
            redelivered.push(id.clone())
        } else {
            fresh.push(id.clone())
        }
        bob_b.ack(&[id]).await.expect("ack");
    }
    assert_eq!(
        (redelivered.clone(), fresh.clone()),
        (first.clone(), second.clone()),
        "re-sent and new, oldest first"
    );
    wait_for("B's claims", T, || async {
        (coll.count_documents(doc! {"deliveredBy": "B"}).await.ok()? == 5).then_some(())
    })
    .await;
    a.signal(libc::SIGCONT);
    // A catches up on its stream: its pushes to bob's old socket and its claims come late.
    wait_for("A's late claims to be refused", T, || async {
        (a.metric("msgbuf_claims_lost_total").await >= 5.0).then_some(())
    })
    .await;
    let by_b = coll
        .count_documents(doc! {"deliveredBy": "B"})
        .await
        .expect("count");
    let acked = coll
        .count_documents(doc! {"ackedAt": {"$ne": null}})
        .await
        .expect("count");
    assert_eq!(
        (by_b, acked),
        (5, 10),
        "A's late writes neither undid nor duplicated B's claims"
    );
    println!("RELIABILITY | SIGSTOP of an instance for 3 s (ack timeout 2 s), then SIGCONT | 10 | 10 | 10 | 0 | 0 | 0 | 1 | - |");
}

#[tokio::test]
async fn a_receiver_joining_while_hundreds_arrive_gets_each_once_in_order() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("fault_join_storm");
    let mut config = test_config(&rs, &db, "A");
    config.rate_limit = 10_000;
    config.rate_burst = 10_000;
    let a = Instance::start(config).await;
    let mut senders = Vec::new();
    for s in 0..3 {
        let (mut c, _) = a.join(&format!("storm{s}")).await;
        senders.push(tokio::spawn(async move {
            for i in 0..200 {
                c.chat("bob", "c", &format!("{s}:{i}"), None)
                    .await
                    .expect("send");
                c.expect("message_accepted", T).await.expect("accepted");
            }
        }));
    }
    let coll = messages(&rs, &db).await;
    wait_for("a hundred buffered", T, || async {
        (coll.count_documents(doc! {}).await.ok()? >= 100).then_some(())
    })
    .await;
    let (mut bob, _) = a.join("bob").await;
    let mut seen = std::collections::HashSet::new();
    let mut last = [-1i64; 3];
    while seen.len() < 600 {
        let ev = bob.expect("chat_message", T).await.expect("message").data;
        assert!(seen.insert(id_of(&ev)), "each message once on the socket");
        let (s, i) = ev["message"]
            .as_str()
            .expect("text")
            .split_once(':')
            .expect("s:i");
        let (s, i): (usize, i64) = (s.parse().expect("s"), i.parse().expect("i"));
        assert!(i > last[s], "per-sender order: {i} after {}", last[s]);
        last[s] = i;
    }
    for s in senders {
        s.await.expect("sender");
    }
    println!("RELIABILITY | receiver joins while 600 messages from 3 senders arrive | 600 | 600 | 600 | 0 | 0 | 0 | 0 | - |");
}

#[tokio::test]
async fn a_frozen_mongodb_answers_unavailable_within_seconds_and_the_retry_keeps_its_id() {
    let rs = ReplicaSet::start(1).await;
    if skip_external(
        &rs,
        "a_frozen_mongodb_answers_unavailable_within_seconds_and_the_retry_keeps_its_id",
    ) {
        return;
    }
    let db = db_name("fault_frozen");
    // The default MSGBUF_MONGODB_TIMEOUT (5 s).
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let mut alice = a.connect("alice").await;
    alice
        .chat("bob", "c", "warm-up", Some("w-1"))
        .await
        .expect("send");
    alice.expect("message_accepted", T).await.expect("accepted");

    rs.freeze(0).await;
    let started = Instant::now();
    alice
        .chat("bob", "c", "while frozen", Some("f-1"))
        .await
        .expect("send");
    let answer = alice
        .next_event(Duration::from_secs(30))
        .await
        .expect("an answer");
    let waited = started.elapsed();
    println!("frozen MongoDB: {} after {waited:?}", answer.data);
    assert_eq!(answer.event, "error", "{}", answer.data);
    assert_eq!(answer.data["code"], "unavailable");
    assert_eq!(answer.data["clientMsgId"], "f-1");
    assert!(
        waited < Duration::from_secs(10),
        "answered after {waited:?}"
    );
    let ready = a.http("/readyz");
    wait_for("/readyz 503 while frozen", T, || async {
        (http_get(&ready, None).await.0 == 503).then_some(())
    })
    .await;

    rs.thaw(0).await;
    // The frozen attempt may have been stored after all: the retry must find it, not add one.
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        assert!(Instant::now() < deadline, "the retry was never accepted");
        alice
            .chat("bob", "c", "while frozen", Some("f-1"))
            .await
            .expect("send");
        let ev = alice.next_event(T).await.expect("an answer");
        if ev.event == "message_accepted" {
            break id_of(&ev.data);
        }
        assert_eq!(ev.data["code"], "unavailable", "{}", ev.data);
        // Retry pacing until MongoDB answers again (not a synchronisation).
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let stored: Vec<Document> = {
        use futures::TryStreamExt;
        messages(&rs, &db)
            .await
            .find(doc! {"sender": "alice", "clientMsgId": "f-1"})
            .await
            .expect("find")
            .try_collect()
            .await
            .expect("docs")
    };
    assert_eq!(stored.len(), 1, "one document for the clientMsgId");
    assert_eq!(
        stored[0].get_object_id("_id").expect("_id").to_hex(),
        id,
        "the retry answers with the stored id"
    );
    wait_for("/readyz 200 after thaw", T, || async {
        (http_get(&ready, None).await.0 == 200).then_some(())
    })
    .await;
}
