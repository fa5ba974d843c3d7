//! Integration tests against real MongoDB replica sets (see tests/common for the harness).
// The fault tests signal the processes they started (libc::kill).
#![allow(unsafe_code)]

#[path = "../common/mod.rs"]
mod common;

mod api;
mod auth;
mod contract;
mod delivery;
mod devices;
mod embedded;
mod faults;
mod harness;
mod hostile;
mod limits;
mod session;
mod socketio;
