//! The instances' own counters (`GET /metrics`) around a part of a run: what the server
//! says it did (claims written with their ack, receipts, …) beside what the client saw.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};

/// The Prometheus series of the instances behind `ws_urls`, summed over them (an
/// instance that does not answer adds nothing).
pub async fn read(ws_urls: &[String]) -> HashMap<String, f64> {
    let mut metrics = HashMap::new();
    for url in ws_urls {
        if let Ok(text) = scrape(url).await {
            for (k, v) in parse_metrics(&text) {
                *metrics.entry(k).or_default() += v;
            }
        }
    }
    metrics
}

/// `GET /metrics` of the instance whose WebSocket URL is `ws_url` (same host and port).
async fn scrape(ws_url: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = ws_url
        .strip_prefix("ws://")
        .ok_or_else(|| anyhow::anyhow!("not a ws:// URL: {ws_url}"))?;
    let host = rest.split('/').next().unwrap_or(rest);
    let get = async {
        let mut tcp = tokio::net::TcpStream::connect(host).await?;
        tcp.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .await?;
        let mut body = String::new();
        tcp.read_to_string(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let text = tokio::time::timeout(Duration::from_secs(5), get).await??;
    Ok(text
        .split_once("\r\n\r\n")
        .map_or(text.as_str(), |(_, b)| b)
        .to_owned())
}

/// `series value` lines of a Prometheus text page (comments skipped).
fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| l.starts_with("msgbuf_"))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// The server histograms and counters of a part: for each histogram, how many, the mean
/// and the p99 (the upper bound of the bucket that holds it), from the deltas.
const SERVER_HISTOGRAMS: [&str; 4] = [
    "msgbuf_insert_batch_seconds",
    "msgbuf_accept_latency_seconds",
    "msgbuf_stream_lag_seconds",
    "msgbuf_delivery_latency_seconds",
];
const SERVER_COUNTERS: [&str; 5] = [
    "msgbuf_acks_total",
    "msgbuf_claims_with_ack_total",
    "msgbuf_claims_lost_total",
    "msgbuf_receipts_sent_total",
    "msgbuf_late_accepts_total",
];

pub fn deltas(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> Value {
    if after.is_empty() {
        return Value::Null;
    }
    let d = |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    let mut out = serde_json::Map::new();
    for h in SERVER_HISTOGRAMS {
        let count = d(&format!("{h}_count"));
        let sum = d(&format!("{h}_sum"));
        let prefix = format!("{h}_bucket{{le=\"");
        let mut buckets: Vec<(f64, f64)> = after
            .keys()
            .filter_map(|k| {
                let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, d(k)))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let p99 = buckets
            .iter()
            .find(|(_, n)| count > 0.0 && *n >= 0.99 * count)
            .map(|(le, _)| *le * 1000.0);
        out.insert(
            h.trim_start_matches("msgbuf_")
                .trim_end_matches("_seconds")
                .to_owned(),
            json!({"count": count,
                   "mean_ms": (count > 0.0).then(|| round2(sum / count * 1000.0)),
                   "p99_le_ms": p99.filter(|x| x.is_finite())}),
        );
    }
    for c in SERVER_COUNTERS {
        out.insert(c.trim_start_matches("msgbuf_").to_owned(), json!(d(c)));
    }
    Value::Object(out)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
