//! `throughput`: closed loop, a bounded window of undelivered messages per sender.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use msgbuf::parse_duration;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::conn::Common;
use crate::pairs::{finish_pairs, setup_pairs, start_pairs, Pace};
use crate::report::Report;
use crate::stamp::{instant_of, now_us};

#[derive(Args)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub common: Common,
    /// Senders (and as many receivers).
    #[arg(long, default_value_t = 32)]
    pub senders: usize,
    /// Messages per sender sent but not yet received by its receiver.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Measured time.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unmeasured time before it (load already on).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub warmup: Duration,
}

pub async fn throughput(args: ThroughputArgs) -> anyhow::Result<()> {
    run(&args).await?.finish(args.common.json.as_deref())
}

/// The run, its report not yet printed (the `devices` scenario runs it several times).
/// With several devices per receiver, a window slot comes back once every device got
/// the message, and the rate counts messages that reached all of them.
pub async fn run(args: &ThroughputArgs) -> anyhow::Result<Report> {
    let c = &args.common;
    let pairs = args.senders.max(1);
    let mut report = Report::new(
        "throughput",
        json!({"proto": c.proto.to_string(), "senders": pairs, "receivers": pairs, "window": args.window,
               "warmup_s": args.warmup.as_secs_f64(), "duration_s": args.duration.as_secs_f64(),
               "size": c.size, "urls": c.urls}),
    );
    report.latency_basis =
        "send → chat_message read by the receiver (closed loop: includes waiting in the window)"
            .into();
    let (senders, receivers, run) = setup_pairs(c, pairs, 8 * 1024).await?;
    let permits: Vec<Arc<Semaphore>> = (0..pairs)
        .map(|_| Arc::new(Semaphore::new(args.window)))
        .collect();
    let t0_us = now_us();
    let until_us = t0_us + (args.warmup + args.duration).as_micros() as u64;
    eprintln!(
        "throughput: {pairs} senders × window {} for {:?} (+{:?} warm-up)",
        args.window, args.duration, args.warmup
    );
    let run_state = start_pairs(
        c,
        senders,
        receivers,
        &run,
        t0_us,
        |i| Pace::Window {
            permits: permits[i].clone(),
            until_us,
        },
        &permits,
    );
    tokio::time::sleep_until(instant_of(until_us)).await;
    let window = (
        args.warmup.as_secs(),
        args.warmup.as_secs() + args.duration.as_secs(),
    );
    finish_pairs(run_state, c.grace, &mut report, Some(window), t0_us).await?;
    Ok(report)
}
