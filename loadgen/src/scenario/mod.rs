//! One module per scenario: its arguments and its run.

pub mod devices;
pub mod drain;
pub mod floor;
pub mod idle;
pub mod latency;
pub mod throughput;
