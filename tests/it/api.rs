//! Issue: REST API, access control and operations.

use std::time::Duration;

use mongodb::bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use serde_json::Value;

use crate::common::*;
use crate::delivery::metric;

fn forged(header_b64: &str, payload: &str) -> String {
    // payload is given already base64url-encoded
    format!("{header_b64}.{payload}.")
}

#[tokio::test]
async fn every_route_answers_the_documented_status_for_each_caller() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("routes");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let bob = token("bob");
    let eve = token("eve");
    let admin = admin_token("ops");
    let expired = expired_token("bob");
    let wrong = msgbuf::Auth::new("other-secret", None, None)
        .mint("bob", false, Duration::from_secs(60))
        .expect("mint");
    let payload = bob.split('.').nth(1).expect("payload").to_owned();
    let alg_none = forged("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", &payload);

    let post = |t: Option<String>, body: &'static str| {
        let url = a.http("/api/messages");
        async move { http("POST", &url, t.as_deref(), Some(body)).await }
    };
    let (s, body) = post(
        Some(token("alice")),
        r#"{"to":"bob","chatId":"c","message":"hi","clientMsgId":"x1"}"#,
    )
    .await;
    assert_eq!(s, 201, "{body}");
    let id = id_of(&json(&body));
    assert!(json(&body)["timestamp"].as_str().is_some());
    assert_eq!(
        post(Some(token("alice")), r#"{"to":"bob","chatId":"c"}"#)
            .await
            .0,
        400
    );
    assert_eq!(post(Some(token("alice")), "not json").await.0, 400);
    let huge: &'static str = Box::leak(
        format!(
            r#"{{"to":"bob","chatId":"c","message":"{}"}}"#,
            "x".repeat(16385)
        )
        .into_boxed_str(),
    );
    let (s, body) = post(Some(token("alice")), huge).await;
    assert_eq!(
        (s, json(&body)["error"]["code"].as_str()),
        (413, Some("too_large"))
    );

    let buffered = a.http("/api/messages/buffered/bob");
    let (s, body) = http_get(&buffered, Some(&bob)).await;
    assert_eq!(s, 200);
    let v = json(&body);
    assert_eq!(
        (
            v["userId"].as_str(),
            v["messages"][0]["id"].as_str(),
            &v["next"]
        ),
        (Some("bob"), Some(id.as_str()), &Value::Null)
    );
    assert_eq!(http_get(&buffered, Some(&admin)).await.0, 200);
    for (t, status, code) in [
        (Some(eve.as_str()), 403, "forbidden"),
        (None, 401, "unauthorized"),
        (Some(wrong.as_str()), 401, "unauthorized"),
        (Some(alg_none.as_str()), 401, "unauthorized"),
        (Some(expired.as_str()), 401, "unauthorized"),
    ] {
        let (s, body) = http_get(&buffered, t).await;
        assert_eq!(
            (s, json(&body)["error"]["code"].as_str()),
            (status, Some(code)),
            "{t:?}: {body}"
        );
    }
    for q in ["?after=nope", "?limit=0", "?limit=1001", "?limit=x"] {
        let (s, body) = http_get(&format!("{buffered}{q}"), Some(&bob)).await;
        assert_eq!(
            (s, json(&body)["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{q}"
        );
    }
    let (s, body) = http_get(&format!("{buffered}?limit=1"), Some(&bob)).await;
    assert_eq!((s, json(&body)["next"].as_str()), (200, Some(id.as_str())));
    let (s, body) = http_get(&format!("{buffered}?after={id}"), Some(&bob)).await;
    assert_eq!(
        (s, json(&body)["messages"].as_array().map(Vec::len)),
        (200, Some(0))
    );

    let stats = a.http("/api/messages/buffer-stats");
    assert_eq!(http_get(&stats, Some(&bob)).await.0, 403);
    assert_eq!(http_get(&stats, None).await.0, 401);
    let (s, body) = http_get(&stats, Some(&admin)).await;
    assert_eq!(s, 200);
    let v = json(&body);
    assert_eq!(
        (
            v["undelivered"].as_u64(),
            v["total"].as_u64(),
            v["usersWithUndelivered"].as_u64(),
            v["instance"].as_str()
        ),
        (Some(1), Some(1), Some(1), Some("A"))
    );

    assert_eq!(http("DELETE", &buffered, Some(&bob), None).await.0, 403);
    assert_eq!(http("DELETE", &buffered, None, None).await.0, 401);
    assert_eq!(http_get(&a.http("/healthz"), None).await.0, 200);
    assert_eq!(http_get(&a.http("/readyz"), None).await.0, 200);
    assert_eq!(http_get(&a.http("/nope"), None).await.0, 404);
}

#[tokio::test]
async fn admin_delete_removes_exactly_that_users_undelivered_messages() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("admin_delete");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let alice = token("alice");
    for to in ["bob", "bob", "bob", "carol"] {
        let (s, _) = http(
            "POST",
            &a.http("/api/messages"),
            Some(&alice),
            Some(&format!(r#"{{"to":"{to}","chatId":"c","message":"m"}}"#)),
        )
        .await;
        assert_eq!(s, 201);
    }
    let (s, body) = http(
        "DELETE",
        &a.http("/api/messages/buffered/bob"),
        Some(&admin_token("ops")),
        None,
    )
    .await;
    assert_eq!(
        (
            s,
            json(&body)["deleted"].as_u64(),
            json(&body)["userId"].as_str()
        ),
        (200, Some(3), Some("bob"))
    );
    let coll = messages(&rs, &db).await;
    assert_eq!(
        coll.count_documents(doc! {"receiver": "bob"})
            .await
            .expect("count"),
        0
    );
    assert_eq!(
        coll.count_documents(doc! {"receiver": "carol"})
            .await
            .expect("count"),
        1
    );
}

#[tokio::test]
async fn buffer_stats_count_a_hundred_thousand_documents_quickly_from_indexes() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("stats_100k");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let coll = messages(&rs, &db).await;
    let now = DateTime::now();
    let docs: Vec<Document> = (0..100_000)
        .map(|i| {
            let delivered = i % 4 != 0;
            let mut d = doc! {"_id": ObjectId::new(), "receiver": format!("u{}", i % 1000), "sender": "s", "chatId": "c", "message": "m",
                "timestamp": now, "delivered": delivered, "updatedAt": now, "redeliveries": 0};
            if delivered {
                d.insert("deliveredAt", now);
                d.insert("pushedAt", now);
                // As a claim writes it: an explicit null until the ack.
                let acked = if i % 2 == 0 { Bson::DateTime(now) } else { Bson::Null };
                d.insert("ackedAt", acked);
            }
            d
        })
        .collect();
    coll.insert_many(docs).await.expect("seed");
    let started = std::time::Instant::now();
    let (s, body) = http_get(
        &a.http("/api/messages/buffer-stats"),
        Some(&admin_token("ops")),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(s, 200);
    let v = json(&body);
    assert_eq!(v["undelivered"], 25_000);
    assert_eq!(v["delivered"], 75_000);
    assert_eq!(v["unacked"], 50_000);
    assert_eq!(v["total"], 100_000);
    assert_eq!(v["usersWithUndelivered"], 250);
    assert!(v["oldestUndeliveredAt"].as_str().is_some());
    println!("buffer-stats over 100k documents answered in {took:?}");
    // Loose bound: the suite runs many replica sets on 2 cores at once; scripts/bench-stats
    // measures it on a quiet machine.
    assert!(took < Duration::from_secs(5), "stats took {took:?}");
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_move_with_traffic() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("metrics");
    let a = Instance::start(test_config(&rs, &db, "A")).await;
    let (mut bob, _) = a.join("bob").await;
    let (mut alice, _) = a.join("alice").await;
    for i in 0..5 {
        alice
            .chat("bob", "c", &format!("m{i}"), None)
            .await
            .expect("send");
        alice.expect("message_accepted", T).await.expect("accepted");
        let id = bob.expect("chat_message", T).await.expect("msg").data["id"]
            .as_str()
            .expect("id")
            .to_owned();
        bob.ack(&[id]).await.expect("ack");
    }
    let text = wait_for("the counters to move", T, || async {
        let (_, text) = http_get(&a.http("/metrics"), None).await;
        (metric(&text, "msgbuf_acks_total") >= 5.0
            && metric(&text, "msgbuf_messages_delivered_total{path=\"live\"}") >= 5.0)
            .then_some(text)
    })
    .await;
    for line in text.lines().filter(|l| !l.is_empty()) {
        if line.starts_with('#') {
            assert!(
                line.starts_with("# HELP ") || line.starts_with("# TYPE "),
                "{line}"
            );
            continue;
        }
        let (name, value) = line.rsplit_once(' ').expect("sample line");
        assert!(value.parse::<f64>().is_ok(), "numeric value: {line}");
        assert!(
            name.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_'),
            "{line}"
        );
    }
    assert_eq!(
        metric(&text, "msgbuf_messages_accepted_total{via=\"ws\"}"),
        5.0
    );
    assert_eq!(metric(&text, "msgbuf_connections"), 2.0);
    assert_eq!(metric(&text, "msgbuf_online_users"), 2.0);
    assert!(text.contains("msgbuf_delivery_latency_seconds_bucket"));
    assert!(text.contains("msgbuf_http_requests_total{route=\"/metrics\",status=\"200\"}"));
}

#[tokio::test]
async fn cleanup_removes_expired_delivered_messages_updates_ttl_and_holds_a_lease() {
    let rs = ReplicaSet::start(1).await;
    let db = db_name("cleanup");
    let mut config = test_config(&rs, &db, "A");
    config.retention = Duration::from_secs(2);
    config.cleanup_first_run = Duration::from_millis(100);
    config.cleanup_interval = Duration::from_millis(500);
    let a = Instance::start(config.clone()).await;
    let coll = messages(&rs, &db).await;
    let old = DateTime::from_millis(DateTime::now().timestamp_millis() - 60_000);
    coll.insert_many(vec![
        doc! {"_id": ObjectId::new(), "receiver": "bob", "sender": "s", "chatId": "c", "message": "delivered, ttl", "timestamp": old, "delivered": true, "deliveredAt": old, "updatedAt": old},
        doc! {"_id": ObjectId::new(), "receiver": "bob", "sender": "s", "chatId": "c", "message": "delivered, no deliveredAt", "timestamp": old, "delivered": true, "updatedAt": old},
        doc! {"_id": ObjectId::new(), "receiver": "bob", "sender": "s", "chatId": "c", "message": "undelivered", "timestamp": old, "delivered": false, "updatedAt": old},
    ])
    .await
    .expect("seed");
    wait_for("the sweep to remove delivered messages", T, || async {
        (coll.count_documents(doc! {"delivered": true}).await.ok()? == 0).then_some(())
    })
    .await;
    assert_eq!(
        coll.count_documents(doc! {"delivered": false})
            .await
            .expect("count"),
        1,
        "undelivered stay"
    );
    assert!(
        metric(
            &a.state.metrics_text(),
            "msgbuf_cleanup_deleted_total{kind=\"delivered\"}"
        ) >= 2.0
    );
    assert_eq!(ttl_seconds(&coll).await, Some(2));
    a.stop().await;

    // A new retention on restart: changed in place with collMod.
    config.retention = Duration::from_secs(3600);
    let a = Instance::start(config.clone()).await;
    assert_eq!(ttl_seconds(&coll).await, Some(3600));

    // Two instances racing for the same sweep: one runs it, the other is refused.
    let mut config_b = config.clone();
    config_b.instance_id = Some("B".into());
    config_b.cleanup_interval = Duration::from_secs(3600);
    let mut config_a = config;
    config_a.cleanup_interval = Duration::from_secs(3600);
    drop(a);
    let a = Instance::start(config_a).await;
    let b = Instance::start(config_b).await;
    rs.client()
        .await
        .database(&db)
        .collection::<Document>(msgbuf::LEASES)
        .delete_many(doc! {})
        .await
        .expect("reset lease");
    let (cleanup_a, cleanup_b) = (
        msgbuf::Cleanup::new(&a.state),
        msgbuf::Cleanup::new(&b.state),
    );
    let (ra, rb) = tokio::join!(cleanup_a.try_sweep(), cleanup_b.try_sweep());
    let ran = [ra.expect("a"), rb.expect("b")]
        .iter()
        .filter(|r| matches!(r, msgbuf::Sweep::Ran { .. }))
        .count();
    assert_eq!(ran, 1, "exactly one instance ran the sweep");
    let loser = if matches!(
        msgbuf::Cleanup::new(&a.state).try_sweep().await.expect("a"),
        msgbuf::Sweep::Ran { .. }
    ) {
        &b
    } else {
        &a
    };
    assert_eq!(
        msgbuf::Cleanup::new(&loser.state)
            .try_sweep()
            .await
            .expect("sweep"),
        msgbuf::Sweep::Skipped,
        "the lease is held"
    );
}

async fn ttl_seconds(coll: &mongodb::Collection<Document>) -> Option<i64> {
    use futures::TryStreamExt;
    let indexes: Vec<mongodb::IndexModel> =
        coll.list_indexes().await.ok()?.try_collect().await.ok()?;
    indexes
        .into_iter()
        .find(|i| i.options.as_ref().and_then(|o| o.name.as_deref()) == Some(msgbuf::TTL_INDEX))
        .and_then(|i| i.options?.expire_after.map(|d| d.as_secs() as i64))
}
