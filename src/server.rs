//! Builds the [`Router`] from [`AppState`] (apart from serving, so tests can drive it) and
//! runs an instance: background tasks and every socket on one [`TaskTracker`], all
//! watching one [`CancellationToken`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::config::Config;
use crate::delivery::{self, Delivery};
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::store::Store;
use crate::stream::Tailer;
use crate::{api, cleanup, web, ws};

/// Everything a request or task of this instance shares.
pub struct AppState {
    pub config: Config,
    pub instance: Arc<str>,
    pub store: Store,
    pub auth: Auth,
    pub presence: Arc<Presence>,
    pub delivery: Arc<Delivery>,
    pub metrics: Arc<Metrics>,
    /// True while the change stream is open (`/readyz`).
    pub stream_running: Arc<AtomicBool>,
    /// Cancelled once, on shutdown; every task watches it.
    pub shutdown: CancellationToken,
    /// Background tasks and WebSocket sessions, awaited on shutdown.
    pub tasks: TaskTracker,
}

impl AppState {
    pub fn stream_running(&self) -> bool {
        self.stream_running.load(Ordering::Relaxed)
    }
}

/// The HTTP surface of an instance.
pub fn app(state: Arc<AppState>) -> Router {
    let mut router = Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/api/messages", post(api::send_message))
        .route(
            "/api/messages/buffered/{user_id}",
            get(api::list_buffered).delete(api::clear_buffered),
        )
        .route("/api/messages/buffer-stats", get(api::buffer_stats))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .merge(web::routes());
    if state.config.insecure_dev {
        router = router
            .route("/dev/status", get(api::dev_status))
            .route("/dev/token", post(api::dev_token));
    }
    router
        .fallback(api::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

async fn count_requests(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(req).await;
    state
        .metrics
        .http_request(&route, response.status().as_u16());
    response
}

/// A started instance: listening, background tasks running.
pub struct Server {
    state: Arc<AppState>,
    listener: TcpListener,
    local_addr: SocketAddr,
}

impl Server {
    /// Prepares the collection (indexes, TTL), starts the change stream, the redelivery
    /// sweep and the cleanup loop, and binds the listener. `shutdown` stops it all.
    pub async fn start(
        config: Config,
        client: mongodb::Client,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Server> {
        let auth = config.verifier()?;
        let instance: Arc<str> = config.instance_id().into();
        let store = Store::new(client.database(&config.db));
        store
            .ensure_indexes()
            .await
            .context("creating indexes on buffered_messages")?;
        cleanup::ensure_ttl_index(&store, config.retention)
            .await
            .context("creating the TTL index on deliveredAt")?;

        let tasks = TaskTracker::new();
        let metrics = Arc::new(Metrics::new());
        let presence = Arc::new(Presence::new());
        let delivery = Delivery::start(
            store.clone(),
            instance.clone(),
            presence.clone(),
            metrics.clone(),
            config.ack_timeout,
            &tasks,
            &shutdown,
        );
        let stream_running = Arc::new(AtomicBool::new(false));
        let tailer = Tailer {
            store: store.clone(),
            instance: instance.clone(),
            delivery: delivery.clone(),
            metrics: metrics.clone(),
            running: stream_running.clone(),
        };
        tasks.spawn(tailer.run(shutdown.clone()));
        tasks.spawn(delivery::sweep_loop(delivery.clone(), shutdown.clone()));

        let listener = TcpListener::bind(config.bind)
            .await
            .with_context(|| format!("binding {} (MSGBUF_BIND)", config.bind))?;
        let local_addr = listener.local_addr()?;
        let state = Arc::new(AppState {
            config,
            instance,
            store,
            auth,
            presence,
            delivery,
            metrics,
            stream_running,
            shutdown,
            tasks,
        });
        state.tasks.spawn(cleanup::run(state.clone()));
        tracing::info!(addr = %local_addr, instance = %state.instance, "msgbuf listening");
        Ok(Server {
            state,
            listener,
            local_addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves until the shutdown token is cancelled, then stops accepting, lets sockets
    /// close (1001) and background tasks finish (checkpoint included), within
    /// `MSGBUF_SHUTDOWN_TIMEOUT`.
    pub async fn run(self) -> anyhow::Result<()> {
        let Server {
            state, listener, ..
        } = self;
        let router = app(state.clone());
        let shutdown = state.shutdown.clone();
        let mut http1 = hyper::server::conn::http1::Builder::new();
        // Slow-loris: a client must finish its request head within the handshake timeout.
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(state.config.handshake_timeout);
        loop {
            let (tcp, _) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of fds and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let service = TowerToHyperService::new(router.clone());
            let conn = http1
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            let shutdown = shutdown.clone();
            state.tasks.spawn(async move {
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
        drop(listener);
        state.tasks.close();
        if tokio::time::timeout(state.config.shutdown_timeout, state.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = state.tasks.len(),
                "shutdown timeout: some tasks did not finish"
            );
        }
        tracing::info!(instance = %state.instance, "msgbuf stopped");
        Ok(())
    }
}
