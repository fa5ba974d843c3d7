//! `latency`: open loop at a fixed total rate; send → receive latency.

use std::time::Duration;

use clap::Args;
use msgbuf::parse_duration;
use serde_json::json;

use crate::conn::Common;
use crate::pairs::{finish_pairs, setup_pairs, start_pairs, Pace};
use crate::report::Report;
use crate::stamp::{instant_of, now_us};

#[derive(Args)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub load: LatencyLoad,
}

/// The load of a latency run (also the `devices` scenario's latency parts).
#[derive(Args, Clone, Copy)]
pub struct LatencyLoad {
    /// Users in all: half senders, half receivers (sender i → receiver i).
    #[arg(long, default_value_t = 200)]
    pub users: usize,
    /// Total messages per second (open loop, spread evenly over the senders).
    #[arg(long, default_value_t = 500.0)]
    pub rate: f64,
    /// Duration of the run.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
}

pub async fn latency(args: LatencyArgs) -> anyhow::Result<()> {
    run(&args).await?.finish(args.common.json.as_deref())
}

/// The run, its report not yet printed (the `devices` scenario runs it several times).
pub async fn run(args: &LatencyArgs) -> anyhow::Result<Report> {
    let c = &args.common;
    let load = &args.load;
    let pairs = (load.users / 2).max(1);
    let mut report = Report::new(
        "latency",
        json!({"proto": c.proto.to_string(), "users": pairs * 2, "senders": pairs, "receivers": pairs, "rate": load.rate,
               "duration_s": load.duration.as_secs_f64(), "size": c.size, "urls": c.urls}),
    );
    report.latency_basis =
        "scheduled send time (open loop, no coordinated omission) → chat_message read by the receiver"
            .into();
    let (senders, receivers, run) = setup_pairs(c, pairs, 8 * 1024).await?;
    eprintln!(
        "latency: {pairs} senders and {pairs} receivers joined; sending {} msg/s for {:?}",
        load.rate, load.duration
    );
    let per_sender = load.rate / pairs as f64;
    let interval_us = (1e6 / per_sender) as u64;
    let count = (per_sender * load.duration.as_secs_f64()).round() as u64;
    let start_us = now_us() + 200_000;
    let run_state = start_pairs(
        c,
        senders,
        receivers,
        &run,
        start_us,
        |i| Pace::Open {
            start_us,
            offset_us: interval_us * i as u64 / pairs as u64,
            interval_us,
            count,
        },
        &[],
    );
    tokio::time::sleep_until(instant_of(start_us) + load.duration + Duration::from_millis(50))
        .await;
    finish_pairs(run_state, c.grace, &mut report, None, start_us).await?;
    // Throughput of an open loop: what was received over the send phase.
    report.duration_s = load.duration.as_secs_f64();
    // (messages, not deliveries: with several devices each message is received by each.)
    report.throughput_msgs_per_s = report.received as f64 / c.sockets() as f64 / report.duration_s;
    Ok(report)
}
