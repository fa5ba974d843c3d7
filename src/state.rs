//! What every request and socket of an instance shares. Below every module that uses it
//! (the server builds it; the routes, sockets and background tasks read it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::config::Config;
use crate::delivery::Delivery;
use crate::metrics::Metrics;
use crate::presence::{ConnectionGuard, Presence, QueueBounds, TooManyConnections};
use crate::store::Store;

/// Shared by the routes and the sessions. The store, the presence map and the metrics
/// are the delivery's (one of each per instance); reach them through it.
pub struct AppState {
    pub(crate) config: Config,
    pub(crate) auth: Auth,
    pub(crate) delivery: Arc<Delivery>,
    /// Whether the change stream is open: the tailer sets it, `/readyz` reads it.
    pub(crate) stream: StreamStatus,
    /// Cancelled once, on shutdown; every task watches it.
    pub(crate) shutdown: CancellationToken,
    /// Permits for request bodies being read (see `api::read_body`).
    pub(crate) bodies: tokio::sync::Semaphore,
    /// Permits for buffered-message pages being read (each up to 1 MiB).
    pub(crate) page_reads: tokio::sync::Semaphore,
    /// Background tasks and sockets, awaited on shutdown.
    pub(crate) tasks: TaskTracker,
}

/// Pages of `GET /api/messages/buffered/{userId}` read at once, at most; more wait.
pub const MAX_PAGE_READS: usize = 4;

/// Request bodies read at once, at most, on one instance.
pub const MAX_BODIES_IN_FLIGHT: usize = 64;

impl AppState {
    /// This instance's metrics in the Prometheus text format (`/metrics`).
    pub fn metrics_text(&self) -> String {
        let presence = self.presence();
        self.metrics()
            .render(presence.connections(), presence.online_users())
    }

    /// Counts a new connection of `user` against the per-user limit, with the queue bounds
    /// of the configuration.
    pub(crate) fn connect(&self, user: &str) -> Result<ConnectionGuard, TooManyConnections> {
        let config = &self.config;
        let bounds = QueueBounds {
            frames: config.queue_capacity,
            bytes: config.queue_bytes,
            user_bytes: config.user_buffer_bytes,
        };
        self.presence()
            .connect(user, config.max_connections_per_user, bounds)
    }

    pub(crate) fn store(&self) -> &Store {
        self.delivery.store()
    }

    pub(crate) fn presence(&self) -> &Arc<Presence> {
        self.delivery.presence()
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        self.delivery.metrics()
    }

    pub(crate) fn instance(&self) -> &str {
        self.delivery.instance()
    }
}

/// A flag the tailer raises while its stream is open.
#[derive(Clone, Default)]
pub struct StreamStatus(Arc<AtomicBool>);

impl StreamStatus {
    pub fn set(&self, running: bool) {
        self.0.store(running, Ordering::Relaxed);
    }

    pub fn is_running(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}
