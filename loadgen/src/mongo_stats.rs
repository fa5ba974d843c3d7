//! `mongo-stats`: selected serverStatus counters of a mongod, or their deltas since a
//! baseline — what each scenario asked of MongoDB.

use std::path::PathBuf;

use clap::Args;
use mongodb::bson::{doc, Bson, Document};
use serde_json::{json, Value};

#[derive(Args)]
pub struct MongoStatsArgs {
    #[arg(long, env = "MSGBUF_MONGODB_URI")]
    pub mongodb_uri: String,
    /// Write here (else stdout).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// An earlier output of this command: print the differences since then.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
}

/// serverStatus paths worth comparing between scenarios (counters unless noted).
pub const MONGO_STATS: &[&str] = &[
    "opcounters.insert",
    "opcounters.query",
    "opcounters.update",
    "opcounters.delete",
    "opcounters.getmore",
    "opcounters.command",
    "opLatencies.reads.latency",
    "opLatencies.reads.ops",
    "opLatencies.writes.latency",
    "opLatencies.writes.ops",
    "opLatencies.commands.latency",
    "opLatencies.commands.ops",
    "metrics.document.inserted",
    "metrics.document.updated",
    "metrics.document.returned",
    "metrics.document.deleted",
    "metrics.commands.insert.total",
    "metrics.commands.update.total",
    "metrics.commands.findAndModify.total",
    "metrics.commands.getMore.total",
    "metrics.commands.find.total",
    "metrics.commands.count.total",
    "metrics.commands.aggregate.total",
    "metrics.queryExecutor.scanned",
    "metrics.queryExecutor.scannedObjects",
    "wiredTiger.cache.pages evicted by application threads",
    "wiredTiger.cache.bytes currently in the cache",
    "wiredTiger.cache.maximum bytes configured",
    "wiredTiger.thread-yield.application thread time evicting (usecs)",
    "wiredTiger.thread-yield.application thread time waiting for cache (usecs)",
    "wiredTiger.log.log sync operations",
    "wiredTiger.log.log sync time duration (usecs)",
    "wiredTiger.transaction.transaction checkpoints",
    "wiredTiger.transaction.transaction checkpoint total time (msecs)",
    "wiredTiger.cache.tracked dirty bytes in the cache",
    "wiredTiger.cache.pages read into cache",
    "wiredTiger.cache.pages written from cache",
];

pub async fn mongo_stats(args: MongoStatsArgs) -> anyhow::Result<()> {
    let client = crate::mongo::connect(&args.mongodb_uri).await?;
    let mut out = snapshot(&client).await?;
    if let Some(base) = &args.baseline {
        let base: serde_json::Map<String, Value> =
            serde_json::from_str(&std::fs::read_to_string(base)?)?;
        out = delta(&out, &base);
    }
    let text = serde_json::to_string_pretty(&out)? + "\n";
    match &args.out {
        Some(p) => std::fs::write(p, text)?,
        None => print!("{text}"),
    }
    Ok(())
}

fn num(v: &Bson) -> Option<f64> {
    match v {
        Bson::Int32(i) => Some(*i as f64),
        Bson::Int64(i) => Some(*i as f64),
        Bson::Double(x) => Some(*x),
        _ => None,
    }
}

/// The [`MONGO_STATS`] counters of the mongod `client` talks to, now.
pub async fn snapshot(client: &mongodb::Client) -> anyhow::Result<serde_json::Map<String, Value>> {
    let status = client
        .database("admin")
        .run_command(doc! {"serverStatus": 1})
        .await?;
    let mut out = serde_json::Map::new();
    for path in MONGO_STATS {
        // Keys may contain spaces but not dots: split on '.' only up to the known depth.
        let parts: Vec<&str> = path.split('.').collect();
        let mut cur: Option<&Document> = Some(&status);
        for p in &parts[..parts.len() - 1] {
            cur = cur.and_then(|d| d.get_document(p).ok());
        }
        if let Some(v) = cur
            .and_then(|d| d.get(parts[parts.len() - 1]))
            .and_then(num)
        {
            out.insert((*path).to_owned(), json!(v));
        }
    }
    Ok(out)
}

/// `now` less `base`, counter by counter (gauges kept as they are now).
pub fn delta(
    now: &serde_json::Map<String, Value>,
    base: &serde_json::Map<String, Value>,
) -> serde_json::Map<String, Value> {
    let mut out = now.clone();
    for (k, v) in out.iter_mut() {
        let gauge = k.contains("bytes currently")
            || k.contains("maximum bytes")
            || k.contains("dirty bytes");
        if let (Some(n), Some(then)) = (v.as_f64(), base.get(k).and_then(|b| b.as_f64())) {
            if !gauge {
                *v = json!(n - then);
            }
        }
    }
    out
}

/// The `top` command's counters of the collections `namespaces` ("db.coll"): per
/// operation kind, the time mongod spent on it (µs) and how many there were — where its
/// time went, collection by collection. Keys "<ns> <kind> us" and "<ns> <kind> n".
pub async fn top(
    client: &mongodb::Client,
    namespaces: &[String],
) -> anyhow::Result<serde_json::Map<String, Value>> {
    let top = client
        .database("admin")
        .run_command(doc! {"top": 1})
        .await?;
    let totals = top.get_document("totals")?;
    let mut out = serde_json::Map::new();
    for ns in namespaces {
        let Ok(coll) = totals.get_document(ns) else {
            continue;
        };
        for kind in [
            "total", "queries", "getmore", "insert", "update", "commands",
        ] {
            let Ok(k) = coll.get_document(kind) else {
                continue;
            };
            let time = k.get("time").and_then(num).unwrap_or(0.0);
            let count = k.get("count").and_then(num).unwrap_or(0.0);
            out.insert(format!("{ns} {kind} us"), json!(time));
            out.insert(format!("{ns} {kind} n"), json!(count));
        }
    }
    Ok(out)
}
