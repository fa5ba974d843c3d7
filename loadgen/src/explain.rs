//! `explain` (executionStats) of a join's reads of a user's pending messages, built from
//! the documented collection (README: fields, the drain indexes) rather than msgbuf's
//! query code: which plan MongoDB runs for a backlog, and what it reads.

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use mongodb::options::{CollectionOptions, Hint, ReadConcern, WriteConcern};
use mongodb::Database;
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

/// A device's catch-up state as its document holds it.
pub struct DeviceState {
    pub origin: ObjectId,
    pub floor: ObjectId,
    /// How many acked ids lie above the floor.
    pub acked: usize,
}

/// The device's state (`None`: no such device).
pub async fn device_state(
    database: &Database,
    user: &str,
    device: &str,
) -> anyhow::Result<Option<DeviceState>> {
    let Some(state) = database
        .collection::<Document>(msgbuf::DEVICES)
        .find_one(doc! {"user": user, "device": device})
        .await?
    else {
        return Ok(None);
    };
    let acked = state.get_array("acked").map(Vec::len).unwrap_or(0);
    let floor = state.get_object_id("floor")?;
    let origin = state.get_object_id("origin").unwrap_or(floor);
    Ok(Some(DeviceState {
        origin,
        floor,
        acked,
    }))
}

/// What a join reads per catch-up source at most when the backlog is small and the
/// device acked nothing above its floor (msgbuf's `SMALL_BACKLOG` + 1).
const SMALL_READ: i64 = 33;
/// Round trips timed per read (the median is kept).
const ROUND_TRIPS: usize = 21;

/// A device's join as MongoDB runs it, once the device is up to date (its acked set is
/// empty): `explain` (executionStats) of the `findAndModify` of its document and of each
/// catch-up source (`msgbuf::Store::catch_up_sources`), their `executionTimeMillis`
/// summed; and the same reads timed from here (majority read concern as msgbuf reads,
/// loopback round trips in µs: an upper bound of MongoDB's time below the explain's
/// millisecond resolution). `None` while the device has acked ids above its floor.
pub async fn explain_device_join(
    uri: &str,
    db: &str,
    user: &str,
    device: &str,
) -> anyhow::Result<Option<Value>> {
    let client = mongo::connect(uri).await?;
    let database = client.database(db);
    let key = doc! {"user": user, "device": device};
    let Some(DeviceState {
        origin,
        floor,
        acked: 0,
    }) = device_state(&database, user, device).await?
    else {
        return Ok(None);
    };
    // The join's update of its document (lastSeen, expireAt), explained: not written.
    let now = DateTime::now();
    let lookup = database
        .run_command(doc! {
        "explain": {"findAndModify": msgbuf::DEVICES, "query": key.clone(),
                    "update": {"$set": {"lastSeen": now, "expireAt": now}}},
        "verbosity": "executionStats"})
        .await?;
    let options = CollectionOptions::builder()
        .write_concern(WriteConcern::majority())
        .read_concern(ReadConcern::majority())
        .build();
    let devices = database.collection_with_options::<Document>(msgbuf::DEVICES, options.clone());
    let messages = database.collection_with_options::<Document>(MESSAGES, options);
    let device_rt = median_us(ROUND_TRIPS, || async {
        devices.find_one(key.clone()).await.map(|_| ())
    })
    .await?;
    let mut sources = vec![json!({"source": "device", "index": "user_1_device_1",
        "filter": key.to_string(), "explain": summarize(&lookup), "round_trip_us": device_rt})];
    let bounds = msgbuf::DeviceBounds {
        device,
        origin,
        floor,
    };
    let filters: Vec<(Document, &str)> =
        msgbuf::Store::catch_up_sources(user, ACK_TIMEOUT, Some(bounds))
            .into_iter()
            .map(|s| (s.filter, s.index))
            .collect();
    for (filter, index) in &filters {
        let find = database
            .run_command(doc! {
            "explain": {"find": MESSAGES, "filter": filter.clone(), "sort": {"_id": 1},
                        "hint": *index, "limit": SMALL_READ},
            "verbosity": "executionStats"})
            .await?;
        let rt = median_us(ROUND_TRIPS, || read(&messages, filter, index)).await?;
        sources.push(json!({"source": source_name(filter), "index": index,
            "filter": filter.to_string(), "explain": summarize(&find), "round_trip_us": rt}));
    }
    // The join reads its sources at once, after its document.
    let together_us = median_us(ROUND_TRIPS, || async {
        futures::future::try_join_all(filters.iter().map(|(f, i)| read(&messages, f, i)))
            .await
            .map(|_| ())
    })
    .await?;
    let sum = |key: &str| -> i64 {
        sources
            .iter()
            .map(|s| s["explain"][key].as_i64().unwrap_or(0).max(0))
            .sum()
    };
    let round_trips_us: f64 = sources
        .iter()
        .filter_map(|s| s["round_trip_us"].as_f64())
        .sum();
    Ok(Some(json!({
        "floor": floor.to_hex(),
        "origin": origin.to_hex(),
        "sources": sources,
        "execution_ms_total": sum("executionTimeMillis"),
        "keys_examined_total": sum("totalKeysExamined"),
        "docs_examined_total": sum("totalDocsExamined"),
        "round_trips_us_total": (round_trips_us * 10.0).round() / 10.0,
        "device_then_sources_us": device_rt + together_us,
    })))
}

/// What each catch-up filter is (docs/PROTOCOL.md, "Devices").
fn source_name(filter: &Document) -> &'static str {
    let above = filter
        .get_document("_id")
        .is_ok_and(|id| id.contains_key("$gt"));
    match (
        filter.contains_key("sender"),
        above,
        filter.contains_key("pushedAt"),
    ) {
        (true, _, _) => "sent from elsewhere, above the floor",
        (false, true, _) => "received above the floor",
        (false, false, true) => "overdue at or below the origin",
        (false, false, false) => "undelivered at or below the origin",
    }
}

/// One catch-up source read as the join reads a small one.
async fn read(
    messages: &mongodb::Collection<Document>,
    filter: &Document,
    index: &str,
) -> mongodb::error::Result<()> {
    let cursor = messages
        .find(filter.clone())
        .sort(doc! {"_id": 1})
        .hint(Hint::Name(index.to_owned()))
        .limit(SMALL_READ)
        .batch_size(SMALL_READ as u32)
        .await?;
    cursor.try_collect::<Vec<_>>().await.map(|_| ())
}

/// The median time of `n` runs of `op`, µs.
async fn median_us<F, Fut>(n: usize, mut op: F) -> mongodb::error::Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = mongodb::error::Result<()>>,
{
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        op().await?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[n / 2] * 10.0).round() / 10.0)
}

/// The database profiler (level 2) on msgbuf's database for a short window: what a real
/// join ran, as mongod timed it.
pub struct Profiler {
    database: Database,
    since: DateTime,
}

impl Profiler {
    pub async fn start(uri: &str, db: &str) -> anyhow::Result<Self> {
        let client = mongo::connect(uri).await?;
        let database = client.database(db);
        let since = DateTime::now();
        database.run_command(doc! {"profile": 2}).await?;
        Ok(Profiler { database, since })
    }

    /// Profiling off; the operations since the start on the messages and devices
    /// collections whose command names `user` (the join's, not other users' traffic).
    pub async fn stop(self, user: &str) -> anyhow::Result<Value> {
        self.database.run_command(doc! {"profile": 0}).await?;
        let db = self.database.name().to_owned();
        let namespaces = [
            format!("{db}.{MESSAGES}"),
            format!("{db}.{}", msgbuf::DEVICES),
        ];
        let entries: Vec<Document> = self
            .database
            .collection::<Document>("system.profile")
            .find(doc! {"ts": {"$gte": self.since}, "ns": {"$in": namespaces.to_vec()}})
            .sort(doc! {"ts": 1})
            .await?
            .try_collect()
            .await?;
        let int = |d: &Document, k: &str| match d.get(k) {
            Some(Bson::Int32(i)) => *i as i64,
            Some(Bson::Int64(i)) => *i,
            Some(Bson::Double(x)) => *x as i64,
            _ => -1,
        };
        let ops: Vec<Value> = entries
            .iter()
            .filter(|e| {
                e.get_document("command")
                    .is_ok_and(|c| c.to_string().contains(&format!("\"{user}\"")))
            })
            .map(|e| {
                let command = e.get_document("command").ok();
                let name = command
                    .and_then(|c| c.keys().next().cloned())
                    .unwrap_or_default();
                json!({
                    "ns": e.get_str("ns").unwrap_or_default(),
                    "command": name,
                    "filter": command
                        .and_then(|c| c.get_document("filter").or_else(|_| c.get_document("query")).ok())
                        .map(|f| f.to_string()),
                    "planSummary": e.get_str("planSummary").unwrap_or_default(),
                    "keysExamined": int(e, "keysExamined"),
                    "docsExamined": int(e, "docsExamined"),
                    "nreturned": int(e, "nreturned"),
                    "millis": int(e, "millis"),
                })
            })
            .collect();
        let total: i64 = ops
            .iter()
            .map(|o| o["millis"].as_i64().unwrap_or(0).max(0))
            .sum();
        Ok(json!({"ops": ops, "millis_total": total}))
    }
}
