//! One module per scenario: its arguments and its run.

pub mod floor;
