//! Devices (docs/PROTOCOL.md, "Devices"): each device of a user catches up on what it
//! missed, sees what its user sent from elsewhere, and joins cheaply when up to date.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use mongodb::bson::{doc, oid::ObjectId, DateTime, Document};
use msgbuf::client::{ClientConfig, Proto, WsClient};
use serde_json::Value;

use crate::common::*;

async fn two_instances(rs: &ReplicaSet, db: &str) -> (Instance, Instance) {
    let a = Instance::start(test_config(rs, db, "A")).await;
    let b = Instance::start(test_config(rs, db, "B")).await;
    (a, b)
}

/// `user`'s socket joined as `device`, and its `joined` data.
async fn join_device(at: &Instance, user: &str, device: &str) -> (WsClient, Value) {
    let mut c = at.connect(user).await;
    let joined = c.join_device(device, T).await.expect("joined");
    assert_eq!(joined["deviceId"], device, "joined names the device");
    (c, joined)
}

/// Sends `n` messages and returns their ids in sending order.
async fn send_n(c: &mut WsClient, to: &str, n: usize, prefix: &str) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        c.chat(to, "chat-1", &format!("{prefix} {i}"), None)
            .await
            .expect("send");
        ids.push(id_of(
            &c.expect("message_accepted", T)
                .await
                .expect("accepted")
                .data,
        ));
    }
    ids
}

/// The next `n` chat messages, each acked as it is read.
async fn receive_acking(c: &mut WsClient, n: usize) -> Vec<Value> {
    receive_chat(c, n, T, |_| true).await
}

fn ids(messages: &[Value]) -> Vec<String> {
    messages.iter().map(id_of).collect()
}

/// The device's document, if it has one.
async fn device_doc(rs: &ReplicaSet, db: &str, user: &str, device: &str) -> Option<Document> {
    rs.client()
        .await
        .database(db)
        .collection::<Document>(msgbuf::DEVICES)
        .find_one(doc! {"user": user, "device": device})
        .await
        .expect("find device")
}

#[tokio::test]
async fn a_device_catches_up_on_what_another_device_of_its_user_received() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("device_catch_up");
    let (a, b) = two_instances(&rs, &db).await;
    // The laptop registers, then goes offline.
    let (laptop, joined) = join_device(&a, "bob", "laptop").await;
    assert_eq!(joined["missedHistory"], false);
    laptop.close().await;

    let (mut phone, _) = join_device(&a, "bob", "phone").await;
    let (mut alice, _) = b.join("alice").await;
    let sent = send_n(&mut alice, "bob", 20, "m").await;
    let live = receive_acking(&mut phone, 20).await;
    assert_eq!(ids(&live), sent, "the phone gets all 20 live, in order");
    phone.close().await;

    let (mut laptop, joined) = join_device(&a, "bob", "laptop").await;
    assert_eq!(joined["pending"], 20, "{joined}");
    let caught_up = receive_acking(&mut laptop, 20).await;
    assert_eq!(ids(&caught_up), sent, "the same 20, oldest first");
    assert!(
        caught_up.iter().all(|m| m["redelivery"].is_null()),
        "acked by the phone: no repeat"
    );

    let messages = messages(&rs, &db).await;
    for id in &sent {
        let d = messages
            .find_one(doc! {"_id": ObjectId::parse_str(id).expect("oid")})
            .await
            .expect("find")
            .expect("stored");
        assert_eq!(
            (d.get_bool("delivered").ok(), d.get_str("deliveredBy").ok()),
            (Some(true), Some("A")),
            "claimed once, by the phone's instance"
        );
    }

    // The phone comes back: nothing again; the next message is the first it sees.
    let (mut phone, joined) = join_device(&b, "bob", "phone").await;
    assert_eq!(joined["pending"], 0, "{joined}");
    let marker = send_n(&mut alice, "bob", 1, "after").await;
    let next = phone.expect("chat_message", T).await.expect("marker").data;
    assert_eq!(id_of(&next), marker[0], "none of the 20 came again");
}

#[tokio::test]
async fn what_a_device_sends_reaches_its_users_other_devices_but_not_the_socket_that_sent_it() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("device_sync");
    let (a, b) = two_instances(&rs, &db).await;
    let (tablet, _) = join_device(&b, "bob", "tablet").await;
    tablet.close().await;
    let (mut laptop, _) = join_device(&b, "bob", "laptop").await;
    let (mut phone, _) = join_device(&a, "bob", "phone").await;
    let (mut ephemeral, _) = a.join("bob").await;
    let (mut alice, _) = a.join("alice").await;

    let mine = send_n(&mut phone, "alice", 1, "from the phone").await;
    let synced = laptop.expect("chat_message", T).await.expect("sync").data;
    assert_eq!(
        (
            id_of(&synced),
            synced["from"].as_str(),
            synced["to"].as_str()
        ),
        (mine[0].clone(), Some("bob"), Some("alice")),
        "the laptop sees what bob sent, from bob"
    );
    let got = alice.expect("chat_message", T).await.expect("alice").data;
    assert_eq!(id_of(&got), mine[0]);

    // A message to bob: the first chat_message the phone and the ephemeral socket see.
    let reply = send_n(&mut alice, "bob", 1, "reply").await;
    for (who, c) in [("phone", &mut phone), ("ephemeral socket", &mut ephemeral)] {
        let next = c.expect("chat_message", T).await.expect("reply").data;
        assert_eq!(id_of(&next), reply[0], "{who}: no echo of bob's own send");
    }

    // The tablet, registered before and offline, gets both when it joins, in order.
    let (mut tablet, joined) = join_device(&a, "bob", "tablet").await;
    assert_eq!(joined["pending"], 2, "{joined}");
    let caught_up = receive_acking(&mut tablet, 2).await;
    assert_eq!(ids(&caught_up), [mine[0].clone(), reply[0].clone()]);
    assert_eq!(caught_up[0]["from"], "bob");

    // The phone does not catch up on its own send.
    phone.ack(&reply).await.expect("ack");
    phone.close().await;
    let (_phone, joined) = join_device(&b, "bob", "phone").await;
    assert_eq!(joined["pending"], 0, "{joined}");
}

#[tokio::test]
async fn a_device_dropping_and_rejoining_on_alternate_instances_gets_every_message_sent_meanwhile()
{
    const PER_SENDER: usize = 100;
    let rs = ReplicaSet::start(1).await;
    let db = db_name("device_churn");
    let (a, b) = two_instances(&rs, &db).await;
    let (first, _) = join_device(&a, "bob", "phone").await;
    first.close().await;
    // A laptop joined all along receives and claims everything at once: what the phone
    // gets, it gets from its own catch-up state, not from what is still undelivered.
    let (mut laptop, _) = join_device(&a, "bob", "laptop").await;
    let laptop = tokio::spawn(async move {
        receive_acking(&mut laptop, 2 * PER_SENDER).await;
        laptop
    });
    let (alice, _) = a.join("alice").await;
    let (carol, _) = b.join("carol").await;
    // Both instances insert at once, paced so that the sends span many rejoins.
    let senders: Vec<_> = [alice, carol]
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(15));
                let mut ids = Vec::with_capacity(PER_SENDER);
                for _ in 0..PER_SENDER {
                    tick.tick().await;
                    ids.extend(send_n(&mut c, "bob", 1, "churn").await);
                }
                ids
            })
        })
        .collect();

    let mut got: HashMap<String, usize> = HashMap::new();
    let mut unflagged_repeats = Vec::new();
    let mut joins = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while got.len() < 2 * PER_SENDER {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} after {joins} joins",
            got.len(),
            2 * PER_SENDER
        );
        let at = if joins % 2 == 0 { &b } else { &a };
        joins += 1;
        let (mut phone, _) = join_device(at, "bob", "phone").await;
        // Each visit reads for a moment, acking as it reads, then drops.
        let visit = tokio::time::Instant::now() + Duration::from_millis(150);
        while let Ok(Ok(m)) = tokio::time::timeout_at(visit, phone.expect("chat_message", T)).await
        {
            let id = id_of(&m.data);
            phone.ack(std::slice::from_ref(&id)).await.expect("ack");
            let seen = got.entry(id.clone()).or_default();
            *seen += 1;
            if *seen > 1 && m.data["redelivery"] != true {
                unflagged_repeats.push(id);
            }
        }
        phone.close().await;
    }
    let mut sent = HashSet::new();
    for s in senders {
        sent.extend(s.await.expect("sender"));
    }
    let received: HashSet<String> = got.keys().cloned().collect();
    assert_eq!(received, sent, "all 200, after {joins} joins");
    laptop.await.expect("the laptop got all 200 too");
    assert!(
        unflagged_repeats.is_empty(),
        "repeats without the flag: {unflagged_repeats:?}"
    );
}

#[tokio::test]
async fn a_device_that_closes_without_acking_gets_the_message_again_flagged_at_once() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("device_unacked_rejoin");
    // The default ack timeout (30 s): the re-send below is the rejoin's, not the sweep's.
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let (mut phone, _) = join_device(&a, "bob", "phone").await;
    let (mut alice, _) = a.join("alice").await;
    let sent = send_n(&mut alice, "bob", 1, "read, not acked").await;
    let pushed = phone.expect("chat_message", T).await.expect("pushed").data;
    assert_eq!(id_of(&pushed), sent[0]);
    assert_eq!(pushed["redelivery"], Value::Null, "{pushed}");
    // Closed well inside the time a claim waits for its ack.
    phone.close().await;

    let (mut phone, joined) = join_device(&a, "bob", "phone").await;
    assert_eq!(joined["pending"], 1, "{joined}");
    let again = phone.expect("chat_message", T).await.expect("again").data;
    assert_eq!(
        (id_of(&again), again["redelivery"].as_bool()),
        (sent[0].clone(), Some(true)),
        "{again}"
    );
}

#[tokio::test]
async fn a_message_older_than_a_device_left_unacknowledged_elsewhere_reaches_it_by_the_sweep() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("device_sweep");
    let mut config = test_config(&rs, &db, "A");
    config.device_skew = Duration::from_secs(1);
    config.ack_timeout = Duration::from_secs(1);
    let a = Instance::start(config).await;
    let (mut tab, _) = a.join("bob").await;
    let (mut alice, _) = a.join("alice").await;
    let sent = send_n(&mut alice, "bob", 1, "before the phone").await;
    let pushed = tab.expect("chat_message", T).await.expect("pushed").data;
    assert_eq!(id_of(&pushed), sent[0]);
    tab.close().await;
    // The phone registers once the message is older than its origin (the skew window).
    let made = ObjectId::parse_str(&sent[0])
        .expect("id")
        .timestamp()
        .timestamp_millis();
    wait_for("the message to fall below a new origin", T, || async {
        (DateTime::now().timestamp_millis() - made >= 2_000).then_some(())
    })
    .await;

    let (mut phone, joined) = join_device(&a, "bob", "phone").await;
    let origin = device_doc(&rs, &db, "bob", "phone")
        .await
        .and_then(|d| d.get_object_id("origin").ok())
        .expect("origin");
    assert!(
        origin.to_hex() > sent[0],
        "the message is older than the phone"
    );
    assert_eq!(joined["pending"], 0, "not in the drain: {joined}");
    let resent = phone
        .expect("chat_message", T)
        .await
        .expect("re-sent by the sweep")
        .data;
    assert_eq!(id_of(&resent), sent[0]);
    assert_eq!(resent["redelivery"], true, "{resent}");
}

#[tokio::test]
async fn a_device_away_longer_than_the_retention_is_told_it_missed_history() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("device_missed");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let (phone, _) = join_device(&a, "bob", "phone").await;
    phone.close().await;
    // Last seen eight days ago (the retention is seven).
    let eight_days_ago = DateTime::from_millis(DateTime::now().timestamp_millis() - 8 * 86_400_000);
    rs.client()
        .await
        .database(&db)
        .collection::<Document>(msgbuf::DEVICES)
        .update_one(
            doc! {"user": "bob", "device": "phone"},
            doc! {"$set": {"lastSeen": eight_days_ago}},
        )
        .await
        .expect("age the device");
    let listed = a.http("/api/users/bob/devices");
    let (_, body) = http_get(&listed, Some(&token("bob"))).await;
    assert_eq!(
        json(&body)["devices"],
        serde_json::json!([]),
        "forgotten: {body}"
    );

    let (phone, joined) = join_device(&a, "bob", "phone").await;
    assert_eq!(joined["missedHistory"], true, "{joined}");
    phone.close().await;
    let (_phone, joined) = join_device(&a, "bob", "phone").await;
    assert_eq!(joined["missedHistory"], false, "seen again: {joined}");
}

#[tokio::test]
async fn devices_are_listed_with_what_they_miss_and_can_be_forgotten() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("device_rest");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let (laptop, _) = join_device(&a, "bob", "laptop").await;
    laptop.close().await;
    let (mut phone, _) = join_device(&a, "bob", "phone").await;
    let (mut alice, _) = a.join("alice").await;
    send_n(&mut alice, "bob", 3, "m").await;
    receive_acking(&mut phone, 3).await;
    phone.close().await;

    let url = a.http("/api/users/bob/devices");
    let listed = wait_for("the phone's acks to count", T, || async {
        let (status, body) = http_get(&url, Some(&token("bob"))).await;
        assert_eq!(status, 200, "{body}");
        let v = json(&body);
        (v["devices"][1]["pending"] == 0).then_some(v)
    })
    .await;
    let devices = listed["devices"].as_array().expect("devices");
    assert_eq!(
        devices
            .iter()
            .map(|d| (d["deviceId"].as_str(), d["pending"].as_u64()))
            .collect::<Vec<_>>(),
        [(Some("laptop"), Some(3)), (Some("phone"), Some(0))]
    );
    assert!(devices
        .iter()
        .all(|d| d["firstSeen"].is_string() && d["lastSeen"].is_string()));

    assert_eq!(
        http_get(&url, Some(&token("carol"))).await.0,
        403,
        "not carol's"
    );
    assert_eq!(
        http_get(&url, Some(&admin_token("ops"))).await.0,
        200,
        "an admin's"
    );
    let stats = a.http("/api/messages/buffer-stats");
    let (_, body) = http_get(&stats, Some(&admin_token("ops"))).await;
    assert_eq!(json(&body)["devices"], 2, "{body}");

    let laptop_url = a.http("/api/users/bob/devices/laptop");
    let forget = |t: String| {
        let u = laptop_url.clone();
        async move { http("DELETE", &u, Some(&t), None).await.0 }
    };
    assert_eq!(forget(token("carol")).await, 403);
    assert_eq!(forget(token("bob")).await, 204);
    assert_eq!(forget(token("bob")).await, 404, "already forgotten");
    let bad = a.http("/api/users/bob/devices/no%20spaces");
    assert_eq!(http("DELETE", &bad, Some(&token("bob")), None).await.0, 400);
    let (_, body) = http_get(&url, Some(&token("bob"))).await;
    assert_eq!(
        json(&body)["devices"].as_array().map(Vec::len),
        Some(1),
        "{body}"
    );
}

#[tokio::test]
async fn a_bad_device_id_or_a_second_device_on_one_socket_is_refused() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("device_bad");
    let mut config = test_config(&rs, &db, "A");
    config.max_devices = 2;
    let a = Instance::start(config).await;
    let mut c = a.connect("bob").await;
    for bad in [
        r#""""#,
        r#""a b""#,
        r#"7"#,
        &format!("\"{}\"", "x".repeat(65)),
    ] {
        let frame = format!(r#"{{"event":"join_chat","data":{{"deviceId":{bad}}}}}"#);
        c.send_raw(frame).await.expect("send");
        let e = c.expect("error", T).await.expect("error").data;
        assert_eq!(e["code"], "bad_request", "{bad}: {e}");
    }
    let joined = c.join_device("phone", T).await.expect("joined");
    assert_eq!(joined["deviceId"], "phone");
    let frame = r#"{"event":"join_chat","data":{"deviceId":"laptop"}}"#.to_owned();
    c.send_raw(frame).await.expect("send");
    let e = c.expect("error", T).await.expect("error").data;
    assert_eq!(e["code"], "bad_request", "{e}");

    // Past the device limit, a new device is refused with a clear error.
    join_device(&a, "bob", "laptop").await.0.close().await;
    let mut third = a.connect("bob").await;
    let frame = r#"{"event":"join_chat","data":{"deviceId":"tablet"}}"#.to_owned();
    third.send_raw(frame).await.expect("send");
    let e = third.expect("error", T).await.expect("error").data;
    assert_eq!(e["code"], "forbidden", "{e}");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("too many devices")),
        "{e}"
    );
}

#[tokio::test]
async fn a_socketio_device_catches_up_like_a_v1_one() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("device_socketio");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    // The original app's join, with the device added: `{userId, deviceId}`.
    let join_tablet = || async {
        let sio = ClientConfig {
            proto: Proto::SocketIo,
            ..ClientConfig::default()
        };
        let url = Proto::SocketIo.endpoint(&format!("ws://{}", a.addr));
        let mut tablet = WsClient::connect_with(&url, &token("bob"), &sio)
            .await
            .expect("socket.io connect");
        let join = serde_json::json!({"userId": "bob", "deviceId": "tablet"});
        tablet.send_event("join_chat", join).await.expect("join");
        let joined = tablet.expect("joined", T).await.expect("joined").data;
        assert_eq!(joined["deviceId"], "tablet");
        (tablet, joined)
    };
    join_tablet().await.0.close().await;

    let (mut phone, _) = join_device(&a, "bob", "phone").await;
    let (mut alice, _) = a.join("alice").await;
    let sent = send_n(&mut alice, "bob", 3, "m").await;
    receive_acking(&mut phone, 3).await;

    let (mut tablet, joined) = join_tablet().await;
    assert_eq!(joined["pending"], 3, "{joined}");
    let caught_up = receive_acking(&mut tablet, 3).await;
    assert_eq!(ids(&caught_up), sent);
}

#[tokio::test]
async fn joining_an_up_to_date_device_reads_a_bounded_range_of_indexes() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("device_explain");
    let mut config = test_config(&rs, &db, "A");
    config.device_skew = Duration::from_secs(1);
    let a = Instance::start(config).await;
    let (mut phone, _) = join_device(&a, "bob", "phone").await;
    let (mut alice, _) = a.join("alice").await;
    send_n(&mut alice, "bob", 300, "old").await;
    receive_acking(&mut phone, 300).await;
    phone.close().await;
    // The floor moves past the 300 once they are older than the skew window (each socket
    // end moves it): rejoin until it has.
    let device = wait_for("the floor to pass the acked history", T, || async {
        let (phone, _) = join_device(&a, "bob", "phone").await;
        phone.close().await;
        let d = device_doc(&rs, &db, "bob", "phone").await?;
        d.get_array("acked")
            .ok()
            .is_some_and(|a| a.is_empty())
            .then_some(d)
    })
    .await;
    let floor = device.get_object_id("floor").expect("floor");
    let origin = device.get_object_id("origin").expect("origin");
    assert!(origin < floor, "the floor moved past the 300: {device}");
    send_n(&mut alice, "bob", 2, "new").await;

    let bounds = msgbuf::DeviceBounds {
        device: "phone",
        origin,
        floor,
    };
    let sources = msgbuf::Store::catch_up_sources("bob", Duration::from_secs(30), Some(bounds));
    let client = rs.client().await;
    let database = client.database(&db);
    for msgbuf::CatchUpSource {
        filter,
        index: hint,
        above_floor,
    } in sources
    {
        let e = database
            .run_command(doc! {
                "explain": {"find": msgbuf::MESSAGES, "filter": filter.clone(), "sort": {"_id": 1}, "hint": hint},
                "verbosity": "executionStats",
            })
            .await
            .expect("explain");
        let plan = e
            .get_document("queryPlanner")
            .and_then(|p| p.get_document("winningPlan"))
            .expect("plan")
            .to_string();
        assert!(
            plan.contains("IXSCAN") && !plan.contains("\"SORT\""),
            "{hint}: {plan}"
        );
        let stats = e.get_document("executionStats").expect("stats");
        let keys = stats.get_i32("totalKeysExamined").expect("keys");
        let docs = stats.get_i32("totalDocsExamined").expect("docs");
        // Two new messages at most per source, plus the index's bound checks: the 300
        // below the floor are never read.
        assert!(keys <= 6 && docs <= 2, "{hint} {filter}: {stats}");
        // Below the floor only what precedes the device's registration is read (up to its
        // origin), and not from the unacked index, where the 300 acks left deleted entries
        // that a scan walks until the storage engine drops them.
        assert_ne!(hint, "receiver_1__id_1_unacked");
        if !above_floor {
            assert!(
                plan.contains(&origin.to_hex()) && !plan.contains(&floor.to_hex()),
                "{hint}: {plan}"
            );
        }
    }
}
