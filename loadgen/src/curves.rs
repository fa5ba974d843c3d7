//! The data of a scale-curves run (`scripts/bench-curves`): one directory, one file set per
//! point, named `<curve>-<value>`:
//! - `<curve>-<value>.json`: the load generator's report (`latency`, `drain` or `idle`);
//! - `<curve>-<value>.procs.json`: what the script sampled from /proc over the point's
//!   measured window (CPU seconds and RSS per process, the machine's busy time);
//! - `<curve>-<value>.mongo.json`: mongod serverStatus deltas (latency points only).
//!
//! Curves: `instances`, `rate`, `backlog`, `idle`. Every derived number (achieved rate, CPU
//! per message, the saturation verdict) is computed here, so the script's stop rule, the
//! tables and the charts agree. `msgbuf-loadgen saturation FILE` is that stop rule.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde_json::Value;

/// The four curves, in the order the script runs them.
pub const CURVES: [&str; 4] = ["instances", "rate", "backlog", "idle"];

/// One point of a curve.
pub struct Point {
    /// The swept value: instances, offered msg/s, pending messages, connections.
    pub value: f64,
    pub report: Value,
    pub procs: Option<Value>,
    pub mongo: Option<Value>,
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn read_optional(path: PathBuf) -> anyhow::Result<Option<Value>> {
    if path.exists() {
        read_json(&path).map(Some)
    } else {
        Ok(None)
    }
}

/// The points of `curve` in `dir`, by increasing value. A directory without any is an empty
/// curve (the run may have been limited to some curves with `CURVES=`).
pub fn load_curve(dir: &Path, curve: &str) -> anyhow::Result<Vec<Point>> {
    let mut points = Vec::new();
    let prefix = format!("{curve}-");
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        // Only the report itself: `<curve>-<number>.json`, not `.procs.json`/`.mongo.json`.
        let Some(value) = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".json"))
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        let stem = &name[..name.len() - ".json".len()];
        points.push(Point {
            value,
            report: read_json(&dir.join(name))?,
            procs: read_optional(dir.join(format!("{stem}.procs.json")))?,
            mongo: read_optional(dir.join(format!("{stem}.mongo.json")))?,
        });
    }
    points.sort_by(|a, b| a.value.total_cmp(&b.value));
    Ok(points)
}

/// A number at a JSON pointer (`/latency_ms/p99`).
pub fn num(v: &Value, pointer: &str) -> Option<f64> {
    v.pointer(pointer).and_then(Value::as_f64)
}

impl Point {
    pub fn r(&self, pointer: &str) -> Option<f64> {
        num(&self.report, pointer)
    }

    pub fn received(&self) -> f64 {
        self.r("/received").unwrap_or(0.0)
    }

    /// A latency quantile of the report, in ms (`p50`, `p99`, `p999`, `max`).
    pub fn latency(&self, q: &str) -> Option<f64> {
        self.r(&format!("/latency_ms/{q}"))
            .filter(|_| self.r("/latency_ms/count").unwrap_or(0.0) > 0.0)
    }

    fn procs_num(&self, pointer: &str) -> Option<f64> {
        self.procs.as_ref().and_then(|p| num(p, pointer))
    }

    /// CPU seconds of one sampled process over the measured window.
    pub fn cpu_s(&self, process: &str) -> Option<f64> {
        self.procs_num(&format!("/processes/{process}/cpu_s"))
    }

    /// The msgbuf instances' entries (`msgbuf-1`, `msgbuf-2`, …) of the procs file.
    fn instances(&self) -> Vec<&Value> {
        self.procs
            .as_ref()
            .and_then(|p| p.get("processes"))
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| k.starts_with("msgbuf-"))
                    .map(|(_, v)| v)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// CPU seconds of all instances together.
    pub fn instances_cpu_s(&self) -> Option<f64> {
        let all = self.instances();
        if all.is_empty() {
            return None;
        }
        Some(all.iter().filter_map(|v| num(v, "/cpu_s")).sum())
    }

    /// Peak RSS (MiB) of each instance over the point.
    pub fn instance_peak_rss_mib(&self) -> Vec<f64> {
        self.instances()
            .iter()
            .filter_map(|v| num(v, "/peak_rss_kib"))
            .map(|k| k / 1024.0)
            .collect()
    }

    pub fn window_s(&self) -> Option<f64> {
        self.procs_num("/window_s")
    }

    fn capacity_s(&self) -> Option<f64> {
        let cap = self.window_s()? * self.procs_num("/nproc")?;
        (cap > 0.0).then_some(cap)
    }

    /// The load generator's CPU seconds: over the window when the script sampled it, else
    /// its own figure for its whole run (joins included).
    pub fn loadgen_cpu_s(&self) -> Option<f64> {
        // A negative figure is a sample of a process already gone (runs before the script
        // wrote null for it).
        self.cpu_s("loadgen")
            .filter(|s| *s >= 0.0)
            .or_else(|| self.r("/loadgen_cpu_s"))
    }

    /// Share (0–1) of the machine's CPU capacity that mongod, the instances and the load
    /// generator used over the window (per-process figures, exact).
    pub fn measured_cpu_share(&self) -> Option<f64> {
        let ours = self.cpu_s("mongod")? + self.instances_cpu_s()? + self.loadgen_cpu_s()?;
        Some(ours / self.capacity_s()?)
    }

    /// Share (0–1) of the capacity that other processes used — the machine's busy time
    /// (/proc/stat) less ours. /proc/stat is sampled at the timer tick, which misses some of
    /// a load that runs in short bursts, so a few percent either way is noise; tens of
    /// percent mean the point was measured while something else ran.
    pub fn others_cpu_share(&self) -> Option<f64> {
        let busy = self.procs_num("/machine_busy_s")? / self.capacity_s()?;
        Some((busy - self.measured_cpu_share()?).max(0.0))
    }

    /// What an idle mongod would have used over the window (backlog points measure its idle
    /// rate for 3 s before the fill).
    pub fn mongod_idle_cpu_s(&self) -> Option<f64> {
        Some(self.procs_num("/mongod_idle_cpu_per_s")? * self.window_s()?)
    }

    /// mongod's CPU seconds over the window less its idle share, when that is known.
    pub fn mongod_cpu_above_idle_s(&self) -> Option<f64> {
        let cpu = self.cpu_s("mongod")?;
        Some(
            self.mongod_idle_cpu_s()
                .map_or(cpu, |idle| (cpu - idle).max(0.0)),
        )
    }

    /// CPU ms of `cpu_s` per delivered message.
    pub fn ms_per_message(&self, cpu_s: Option<f64>) -> Option<f64> {
        let n = self.received();
        cpu_s.filter(|_| n > 0.0).map(|s| s * 1000.0 / n)
    }

    /// A serverStatus delta per delivered message.
    pub fn mongo_per_message(&self, key: &str) -> Option<f64> {
        let n = self.received();
        let v = self.mongo.as_ref()?.get(key)?.as_f64()?;
        (n > 0.0).then(|| v / n)
    }

    /// Messages received during the send phase itself, per second. A latency report's
    /// `throughput_msgs_per_s` also counts what arrived in the grace period after sending
    /// stopped, which hides a backlog building up; this does not.
    pub fn achieved_rate(&self) -> Option<f64> {
        let secs = self.r("/params/duration_s")?;
        let per_second = self
            .report
            .pointer("/extra/received_per_second")?
            .as_array()?;
        let whole = secs.floor() as usize;
        let mut n: f64 = per_second
            .iter()
            .take(whole)
            .filter_map(Value::as_f64)
            .sum();
        // A fractional duration: that share of the next second.
        if let Some(next) = per_second.get(whole).and_then(Value::as_f64) {
            n += next * (secs - whole as f64);
        }
        (secs > 0.0).then(|| n / secs)
    }

    /// Accepted but not received by the time the load generator stopped waiting (its grace).
    /// Not a loss: the messages stay buffered and undelivered, as they would for an offline
    /// user.
    pub fn undelivered(&self) -> f64 {
        self.r("/lost").unwrap_or(0.0)
    }
}

/// The sweep's stop rule.
pub struct SaturationRule {
    /// Saturated when the achieved rate is below this share of the offered one.
    pub min_ratio: f64,
    /// … or when the p99 is above this.
    pub p99_limit_ms: f64,
}

/// `Some(reason)` when a rate-sweep point is past saturation.
pub fn saturated(p: &Point, rule: &SaturationRule) -> Option<String> {
    let offered = p.r("/params/rate").unwrap_or(p.value);
    let achieved = p.achieved_rate().unwrap_or(0.0);
    if achieved < rule.min_ratio * offered {
        return Some(format!(
            "achieved {achieved:.0} msg/s of {offered:.0} offered ({:.0} % < {:.0} %)",
            100.0 * achieved / offered.max(1e-9),
            100.0 * rule.min_ratio
        ));
    }
    match p.latency("p99") {
        Some(p99) if p99 > rule.p99_limit_ms => Some(format!(
            "p99 {p99:.0} ms > {:.0} ms at {offered:.0} msg/s",
            rule.p99_limit_ms
        )),
        Some(_) => None,
        None => Some(format!("no message received at {offered:.0} msg/s")),
    }
}

#[derive(Args)]
pub struct SaturationArgs {
    /// A rate-sweep point's report (`rate-<msg/s>.json`).
    pub file: PathBuf,
    /// Saturated when the achieved rate is below this share of the offered one.
    #[arg(long, default_value_t = 0.9)]
    pub min_ratio: f64,
    /// Saturated when the p99 is above this many ms.
    #[arg(long, default_value_t = 1000.0)]
    pub p99_limit_ms: f64,
}

/// Prints `saturated: <why>` or `below saturation: <achieved, p99>`; exits 0 either way
/// (non-zero only when the file cannot be read), so the script can branch on the text.
pub fn saturation(args: SaturationArgs) -> anyhow::Result<()> {
    let report = read_json(&args.file)?;
    let p = Point {
        value: num(&report, "/params/rate").unwrap_or(0.0),
        report,
        procs: None,
        mongo: None,
    };
    let rule = SaturationRule {
        min_ratio: args.min_ratio,
        p99_limit_ms: args.p99_limit_ms,
    };
    match saturated(&p, &rule) {
        Some(why) => println!("saturated: {why}"),
        None => println!(
            "below saturation: achieved {:.0} of {:.0} msg/s, p99 {:.1} ms",
            p.achieved_rate().unwrap_or(0.0),
            p.value,
            p.latency("p99").unwrap_or(f64::NAN)
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn point(rate: f64, per_second: &[u64], p99: f64) -> Point {
        Point {
            value: rate,
            report: json!({
                "params": {"rate": rate, "duration_s": per_second.len() as f64},
                "received": per_second.iter().sum::<u64>(),
                "latency_ms": {"count": 1, "p99": p99},
                "extra": {"received_per_second": per_second},
            }),
            procs: None,
            mongo: None,
        }
    }

    const RULE: SaturationRule = SaturationRule {
        min_ratio: 0.9,
        p99_limit_ms: 1000.0,
    };

    #[test]
    fn achieved_rate_counts_the_send_phase_only() {
        let mut p = point(100.0, &[100, 100, 100], 5.0);
        // What arrives in the grace second after the 3 s of sending is not achieved rate.
        if let Some(a) = p.report.pointer_mut("/extra/received_per_second") {
            *a = json!([100, 100, 100, 250]);
        }
        assert_eq!(p.achieved_rate(), Some(100.0));
        assert!(saturated(&p, &RULE).is_none());
    }

    #[test]
    fn shortfall_or_exploding_p99_is_saturation() {
        let short = point(1000.0, &[800, 850, 820], 50.0);
        assert!(saturated(&short, &RULE).is_some_and(|w| w.starts_with("achieved")));
        let slow = point(1000.0, &[1000, 1000, 1000], 2500.0);
        assert!(saturated(&slow, &RULE).is_some_and(|w| w.starts_with("p99")));
    }
}
