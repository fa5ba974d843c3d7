//! The result of one scenario: printed as a table, written as one JSON object.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::histogram::LatencyMs;

#[derive(Serialize, Deserialize, Default, Clone)]
pub struct Report {
    pub scenario: String,
    pub params: Value,
    pub sent: u64,
    pub accepted: u64,
    pub errors: u64,
    pub error_codes: BTreeMap<String, u64>,
    pub received: u64,
    /// Accepted (or, for floor, acknowledged) but never received.
    pub lost: u64,
    /// The same id twice on one socket (or stream).
    pub duplicates: u64,
    /// Of those and others: frames flagged `"redelivery": true`.
    pub redeliveries: u64,
    /// Received, but no `message_accepted` for it was seen.
    pub unexpected: u64,
    pub order_violations: u64,
    /// Seconds over which `throughput_msgs_per_s` is computed.
    pub duration_s: f64,
    pub throughput_msgs_per_s: f64,
    /// What the latency numbers measure.
    pub latency_basis: String,
    pub latency_ms: LatencyMs,
    pub loadgen_cpu_s: f64,
    pub extra: BTreeMap<String, Value>,
}

impl Report {
    pub fn new(scenario: &str, params: Value) -> Self {
        Report {
            scenario: scenario.to_owned(),
            params,
            ..Default::default()
        }
    }

    pub fn print(&self) {
        let row = |k: &str, v: String| println!("  {k:<22} {v}");
        println!("== {} ==", self.scenario);
        row("params", self.params.to_string());
        row("sent", self.sent.to_string());
        row("accepted", self.accepted.to_string());
        row("errors", format!("{} {:?}", self.errors, self.error_codes));
        row("received", self.received.to_string());
        row("lost", self.lost.to_string());
        row("duplicates", self.duplicates.to_string());
        row("redeliveries", self.redeliveries.to_string());
        row("unexpected", self.unexpected.to_string());
        row("order violations", self.order_violations.to_string());
        row(
            "throughput",
            format!(
                "{:.1} msg/s over {:.1} s",
                self.throughput_msgs_per_s, self.duration_s
            ),
        );
        let l = &self.latency_ms;
        row("latency basis", self.latency_basis.clone());
        row(
            "latency ms",
            format!(
                "n={} p50={:.2} p90={:.2} p99={:.2} p99.9={:.2} max={:.2} mean={:.2}",
                l.count, l.p50, l.p90, l.p99, l.p999, l.max, l.mean
            ),
        );
        row("loadgen cpu", format!("{:.2} s", self.loadgen_cpu_s));
        for (k, v) in &self.extra {
            if !v.is_array() {
                row(k, v.to_string());
            }
        }
    }

    pub fn finish(mut self, json_path: Option<&Path>) -> anyhow::Result<()> {
        self.loadgen_cpu_s = self_cpu_seconds();
        self.print();
        self.write_json(json_path)
    }

    pub fn write_json(&self, json_path: Option<&Path>) -> anyhow::Result<()> {
        if let Some(path) = json_path {
            std::fs::write(path, serde_json::to_string_pretty(self)? + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

pub fn self_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct we hand it.
    unsafe {
        let mut r: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut r) != 0 {
            return 0.0;
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(r.ru_utime) + tv(r.ru_stime)
    }
}
