//! msgbuf: real-time chat delivery over WebSocket with a MongoDB replica set as the
//! durable buffer for offline users — and as the only moving part (no broker).
//!
//! Data flow: senders only insert [`BufferedMessage`]s; every instance tails one change
//! stream (`stream`) and pushes inserts to the receiver's sockets joined on it
//! (`presence`); the `delivered` flip is claimed atomically (`delivery`); a user who joins
//! later is drained oldest first (`session`, behind the transports: `ws` for protocol v1 on
//! `/ws`, `socketio` for Socket.IO on `/socket.io/`). See
//! `docs/ARCHITECTURE.md` for the modules and `docs/PROTOCOL.md` for the contract.
//!
//! The public surface is what the binaries and the tests use; everything else is private.

mod api;
mod auth;
mod cleanup;
pub mod client;
mod config;
mod delivery;
mod device;
mod error;
mod limits;
mod metrics;
pub mod mongo;
mod presence;
pub mod protocol;
mod server;
mod session;
mod socketio;
mod state;
mod store;
mod stream;
mod web;
mod ws;

pub use auth::{unix_now, Auth, Claims, INSECURE_DEV_SECRET};
pub use cleanup::{Cleanup, Sweep};
pub use config::{parse_duration, Config};
pub use device::DeviceId;
pub use error::{Error, ErrorCode, WireError};
pub use server::{app, Server};
pub use state::AppState;
pub use store::{
    BufferedMessage, CatchUpSource, DeviceBounds, DevicePolicy, Store, CHECKPOINTS, DEVICES,
    LEASES, MESSAGES, TTL_INDEX,
};
