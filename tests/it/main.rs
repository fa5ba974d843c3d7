//! Integration tests against real MongoDB replica sets (see tests/common for the harness).

#[path = "../common/mod.rs"]
mod common;

mod api;
mod delivery;
mod faults;
mod harness;
mod hostile;
mod session;
mod socketio;
