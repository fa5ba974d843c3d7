//! msgbuf: real-time chat delivery over WebSocket with a MongoDB replica set as the
//! durable buffer for offline users — and as the only moving part (no broker).
//!
//! Data flow: senders only insert [`store::BufferedMessage`]s; every instance tails one
//! change stream ([`stream`]) and pushes inserts to the receiver's sockets joined on it
//! ([`presence`]); the `delivered` flip is claimed atomically ([`delivery`]); a user who
//! joins later is drained oldest first ([`ws`]). See `docs/PROTOCOL.md` for the contract.

pub mod api;
pub mod auth;
pub mod cleanup;
pub mod client;
pub mod config;
pub mod delivery;
pub mod error;
pub mod metrics;
pub mod mongo;
pub mod presence;
pub mod protocol;
pub mod server;
pub mod store;
pub mod stream;
pub mod web;
pub mod ws;

pub use config::Config;
pub use server::{app, AppState, Server};
