//! `msgbuf-loadgen`: load generator and measurement tool for msgbuf (see BENCHMARKS.md).
//!
//! Scenarios (each prints a table and, with `--json FILE`, writes one JSON object):
//! - `latency`: open loop at a fixed total rate; send → receive latency (HDR histogram).
//! - `throughput`: closed loop, a bounded window of undelivered messages per sender.
//! - `drain`: K messages buffered for an offline user, then the user joins; time to the last.
//! - `devices`: a user's several devices: catch-up, latency and throughput with 1 and 3
//!   devices per receiver, the join of an up-to-date device.
//! - `idle`: C joined connections held open, for the server's memory per connection.
//! - `floor`: MongoDB alone: insert → change event latency and the insert+notify rate.
//!
//! Helpers for `scripts/bench`: `summary DIR` (targets table), `mongo-stats`, `free-port`.
//! All load is bounded in count and time.

mod conn;
mod curves;
mod explain;
mod frames;
mod histogram;
mod mongo;
mod mongo_stats;
mod pairs;
mod plot;
mod procfs;
mod report;
mod scenario;
mod server_metrics;
mod stamp;
mod summary;

use clap::{Parser, Subcommand};

use scenario::{devices, drain, floor, idle, latency, throughput};

#[derive(Parser)]
#[command(
    name = "msgbuf-loadgen",
    about = "Load generator for msgbuf: latency, throughput, drain, devices, idle, floor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open loop at a fixed total rate; send → receive latency.
    Latency(latency::LatencyArgs),
    /// Closed loop: as fast as the system sustains with a window per sender.
    Throughput(throughput::ThroughputArgs),
    /// K messages buffered for an offline user, then the user joins.
    Drain(drain::DrainArgs),
    /// A user's devices: catch-up, latency and throughput with 1 and N devices, the join
    /// of an up-to-date device.
    Devices(devices::DevicesArgs),
    /// C joined connections held open (server memory per connection).
    Idle(idle::IdleArgs),
    /// MongoDB alone: insert → change-event latency and max insert+notify rate.
    Floor(floor::FloorArgs),
    /// Reads the JSON results in DIR and prints (and writes) the targets table.
    Summary(summary::SummaryArgs),
    /// Selected serverStatus counters of a mongod (deltas with `--baseline`), as JSON.
    MongoStats(mongo_stats::MongoStatsArgs),
    /// Prints a free TCP port on 127.0.0.1.
    FreePort,
    /// Draws the SVG charts and prints the tables of a scripts/bench-curves run.
    Plot(plot::PlotArgs),
    /// Whether a rate-sweep point (its latency JSON) is past saturation (scripts/bench-curves).
    Saturation(curves::SaturationArgs),
}

fn main() -> anyhow::Result<()> {
    stamp::epoch();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Latency(a) => latency::latency(a).await,
            Command::Throughput(a) => throughput::throughput(a).await,
            Command::Drain(a) => drain::drain(a).await,
            Command::Devices(a) => devices::devices(a).await,
            Command::Idle(a) => idle::idle(a).await,
            Command::Floor(a) => floor::floor(a).await,
            Command::Summary(a) => summary::summary(a),
            Command::MongoStats(a) => mongo_stats::mongo_stats(a).await,
            Command::Plot(a) => plot::plot(a),
            Command::Saturation(a) => curves::saturation(a),
            Command::FreePort => {
                let l = std::net::TcpListener::bind("127.0.0.1:0")?;
                println!("{}", l.local_addr()?.port());
                Ok(())
            }
        }
    })
}
