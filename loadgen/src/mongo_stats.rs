//! `mongo-stats`: selected serverStatus counters of a mongod, or their deltas since a
//! baseline — what each scenario asked of MongoDB.

use std::path::PathBuf;

use clap::Args;
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
];

pub async fn mongo_stats(args: MongoStatsArgs) -> anyhow::Result<()> {
    use mongodb::bson::{doc, Bson, Document};
    fn num(d: &Document, path: &str) -> Option<f64> {
        // Keys may contain spaces but not dots: split on '.' only up to the known depth.
        let mut cur = d;
        let parts: Vec<&str> = path.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            cur = cur.get_document(p).ok()?;
        }
        match cur.get(parts[parts.len() - 1])? {
            Bson::Int32(i) => Some(*i as f64),
            Bson::Int64(i) => Some(*i as f64),
            Bson::Double(x) => Some(*x),
            _ => None,
        }
    }
    let client = crate::mongo::connect(&args.mongodb_uri).await?;
    let status = client
        .database("admin")
        .run_command(doc! {"serverStatus": 1})
        .await?;
    let mut out = serde_json::Map::new();
    for path in MONGO_STATS {
        if let Some(v) = num(&status, path) {
            out.insert((*path).to_owned(), json!(v));
        }
    }
    if let Some(base) = &args.baseline {
        let base: serde_json::Map<String, Value> =
            serde_json::from_str(&std::fs::read_to_string(base)?)?;
        for (k, v) in out.iter_mut() {
            let gauge = k.contains("bytes currently") || k.contains("maximum bytes");
            if let (Some(now), Some(then)) = (v.as_f64(), base.get(k).and_then(|b| b.as_f64())) {
                if !gauge {
                    *v = json!(now - then);
                }
            }
        }
    }
    let text = serde_json::to_string_pretty(&out)? + "\n";
    match &args.out {
        Some(p) => std::fs::write(p, text)?,
        None => print!("{text}"),
    }
    Ok(())
}
