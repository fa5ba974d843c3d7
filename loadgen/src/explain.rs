//! `explain` (executionStats) of a join's reads of a user's pending messages, built from
//! the documented collection (README: fields, the drain indexes) rather than msgbuf's
//! query code: which plan MongoDB runs for a backlog, and what it reads.

use std::time::Duration;

use mongodb::bson::{doc, Bson, DateTime, Document};
use serde_json::{json, Value};

use crate::mongo::{self, MESSAGES};

/// msgbuf's default `MSGBUF_ACK_TIMEOUT` (scripts/bench keeps it): a pushed message
/// older than this without an ack is pending again.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// The two halves of "pending" (docs/PROTOCOL.md) and the index each is read from in
/// `_id` order: undelivered, and pushed but not acknowledged within the ack timeout.
fn pending_halves(user: &str) -> [(&'static str, Document, &'static str); 2] {
    let cutoff = DateTime::from_system_time(std::time::SystemTime::now() - ACK_TIMEOUT);
    [
        (
            "undelivered",
            doc! {"receiver": user, "delivered": false},
            "receiver_1_delivered_1__id_1",
        ),
        (
            "overdue",
            doc! {"receiver": user, "delivered": true, "ackedAt": {"$type": "null"},
            "pushedAt": {"$lt": cutoff}},
            "receiver_1__id_1_unacked",
        ),
    ]
}

/// For each half: the find (oldest first) and the count, as MongoDB executes them.
pub async fn explain_pending(uri: &str, db: &str, user: &str) -> anyhow::Result<Value> {
    let client = mongo::connect(uri).await?;
    let database = client.database(db);
    let mut out = serde_json::Map::new();
    for (half, filter, index) in pending_halves(user) {
        let find = database
            .run_command(doc! {
            "explain": {"find": MESSAGES, "filter": filter.clone(), "sort": {"_id": 1},
                        "hint": index, "batchSize": 1000},
            "verbosity": "executionStats"})
            .await?;
        let count = database
            .run_command(doc! {
            "explain": {"count": MESSAGES, "query": filter, "hint": index},
            "verbosity": "executionStats"})
            .await?;
        out.insert(format!("{half}_find"), summarize(&find));
        out.insert(format!("{half}_count"), summarize(&count));
    }
    Ok(Value::Object(out))
}

/// The plan's stages (with index names) and the execution counters.
fn summarize(r: &Document) -> Value {
    let stats = r.get_document("executionStats").ok();
    let mut plan = Vec::new();
    if let Some(root) = stats.and_then(|s| s.get_document("executionStages").ok()) {
        stages(root, &mut plan);
    }
    let num = |k: &str| {
        stats
            .and_then(|s| s.get(k))
            .and_then(|b| match b {
                Bson::Int32(i) => Some(*i as i64),
                Bson::Int64(i) => Some(*i),
                Bson::Double(d) => Some(*d as i64),
                _ => None,
            })
            .unwrap_or(-1)
    };
    json!({"stages": plan, "nReturned": num("nReturned"),
           "totalKeysExamined": num("totalKeysExamined"),
           "totalDocsExamined": num("totalDocsExamined"),
           "executionTimeMillis": num("executionTimeMillis")})
}

fn stages(d: &Document, out: &mut Vec<String>) {
    if let Ok(name) = d.get_str("stage") {
        let mut s = name.to_owned();
        if let Ok(ix) = d.get_str("indexName") {
            s.push_str(&format!("({ix})"));
        }
        out.push(s);
    }
    for key in ["inputStage", "inputStages"] {
        match d.get(key) {
            Some(Bson::Document(c)) => stages(c, out),
            Some(Bson::Array(a)) => {
                for c in a {
                    if let Bson::Document(c) = c {
                        stages(c, out)
                    }
                }
            }
            _ => {}
        }
    }
}

/// A device's join as MongoDB runs it: its document (floor and acked set), then
/// `explain` of each catch-up source (`msgbuf::Store::catch_up_filters`), with the
/// sources' `executionTimeMillis` summed. `None` while the device has acked ids above its
/// floor (it is not up to date yet: its floor moves once they are older than the skew).
pub async fn explain_device_join(
    uri: &str,
    db: &str,
    user: &str,
    device: &str,
) -> anyhow::Result<Option<Value>> {
    let client = mongo::connect(uri).await?;
    let database = client.database(db);
    let key = doc! {"user": user, "device": device};
    let Some(state) = database
        .collection::<Document>(msgbuf::DEVICES)
        .find_one(key.clone())
        .await?
    else {
        return Ok(None);
    };
    let acked = state.get_array("acked").map(Vec::len).unwrap_or(0);
    if acked > 0 {
        return Ok(None);
    }
    let floor = state.get_object_id("floor")?;
    let lookup = database
        .run_command(doc! {
        "explain": {"find": msgbuf::DEVICES, "filter": key, "limit": 1},
        "verbosity": "executionStats"})
        .await?;
    let mut sources = vec![json!({"source": "device", "explain": summarize(&lookup)})];
    let filters = msgbuf::Store::catch_up_filters(user, ACK_TIMEOUT, Some((device, floor)));
    for (filter, index) in filters {
        let find = database
            .run_command(doc! {
            "explain": {"find": MESSAGES, "filter": filter.clone(), "sort": {"_id": 1},
                        "hint": index},
            "verbosity": "executionStats"})
            .await?;
        sources.push(
            json!({"source": index, "filter": filter.to_string(), "explain": summarize(&find)}),
        );
    }
    let total_ms: i64 = sources
        .iter()
        .map(|s| {
            s["explain"]["executionTimeMillis"]
                .as_i64()
                .unwrap_or(0)
                .max(0)
        })
        .sum();
    Ok(Some(
        json!({"floor": floor.to_hex(), "sources": sources, "execution_ms_total": total_ms}),
    ))
}
