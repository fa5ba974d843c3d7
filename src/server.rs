//! Builds the [`Router`] from [`AppState`] (apart from serving, so tests can drive it) and
//! runs an instance: the three background tasks (tailer, redelivery sweep, cleanup) and
//! every socket on one [`TaskTracker`], all watching one [`CancellationToken`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cleanup::Cleanup;
use crate::config::Config;
use crate::delivery::{self, Delivery, Sweeper};
use crate::error::{Error, ErrorCode};
use crate::limits::SendLimit;
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::state::{AppState, StreamStatus};
use crate::store::Store;
use crate::stream::Tailer;
use crate::{api, socketio, web, ws};

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
        .route("/api/users/{user_id}/devices", get(api::list_devices))
        .route(
            "/api/users/{user_id}/devices/{device_id}",
            delete(api::forget_device),
        )
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .merge(web::routes());
    if state.config.insecure_dev {
        router = router
            .route("/dev/status", get(api::dev_status))
            .route("/dev/token", post(api::dev_token));
    }
    let router = router
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state.clone());
    socketio::mount(router, &state).layer(axum::middleware::from_fn(limit_head))
}

/// A request head (request line and headers) past this is refused with 431 and the JSON
/// error body. Heads over [`HEAD_BUFFER`] never reach the router: hyper answers those 431
/// itself, without a body.
const MAX_HEAD_BYTES: usize = 32 * 1024;
/// What hyper buffers of a request head: room for a head well past `MAX_HEAD_BYTES` (a
/// 1 MB token, say) to get msgbuf's answer, bounded so a slow head costs at most this
/// for `MSGBUF_HANDSHAKE_TIMEOUT`.
const HEAD_BUFFER: usize = (1 << 20) + (64 << 10);

async fn limit_head(req: Request, next: Next) -> Response {
    let headers: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    // The request line: method, target (origin form, or absolute with an authority) and
    // version, measured without printing the URI.
    let uri = req.uri();
    let target = uri.authority().map_or(0, |a| a.as_str().len() + 8)
        + uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    if headers + line > MAX_HEAD_BYTES {
        return Error::new(ErrorCode::TooLarge, "request head over 32 KiB")
            .with_status(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
            .into_response();
    }
    next.run(req).await
}

async fn count_requests(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(req).await;
    state
        .metrics()
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
        prepare_collection(&store, &config).await?;

        let tasks = TaskTracker::new();
        let delivery = Delivery::start(
            delivery::Parts {
                store,
                instance,
                presence: Arc::new(Presence::new()),
                metrics: Arc::new(Metrics::new()),
                ack_timeout: config.ack_timeout,
                send_limit: SendLimit::new(config.rate_limit, config.rate_burst),
                devices: config.device_policy(),
            },
            &tasks,
            &shutdown,
        );
        let listener = TcpListener::bind(config.bind)
            .await
            .with_context(|| format!("binding {} (MSGBUF_BIND)", config.bind))?;
        let local_addr = listener.local_addr()?;
        let state = Arc::new(AppState {
            config,
            auth,
            delivery,
            stream: StreamStatus::default(),
            bodies: tokio::sync::Semaphore::new(crate::state::MAX_BODIES_IN_FLIGHT),
            page_reads: tokio::sync::Semaphore::new(crate::state::MAX_PAGE_READS),
            shutdown,
            tasks,
        });
        spawn_background_tasks(&state);
        tracing::info!(addr = %local_addr, instance = %state.instance(), "msgbuf listening");
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
            .header_read_timeout(state.config.handshake_timeout)
            .max_buf_size(HEAD_BUFFER);
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
        tracing::info!(instance = %state.instance(), "msgbuf stopped");
        Ok(())
    }
}

/// Indexes and the TTL, before anything reads or writes.
async fn prepare_collection(store: &Store, config: &Config) -> anyhow::Result<()> {
    store
        .ensure_indexes()
        .await
        .context("creating indexes on buffered_messages")?;
    store
        .ensure_ttl_index(config.retention)
        .await
        .context("creating the TTL index on deliveredAt")?;
    store
        .ensure_device_indexes()
        .await
        .context("creating the indexes of devices")?;
    Ok(())
}

/// The change-stream tailer, the redelivery sweep and the cleanup: each a value with
/// `run(self, token)`, spawned on the tracker the shutdown waits for.
fn spawn_background_tasks(state: &Arc<AppState>) {
    let token = || state.shutdown.clone();
    let tailer = Tailer {
        delivery: state.delivery.clone(),
        status: state.stream.clone(),
    };
    state.tasks.spawn(tailer.run(token()));
    let sweeper = Sweeper {
        delivery: state.delivery.clone(),
    };
    state.tasks.spawn(sweeper.run(token()));
    state.tasks.spawn(Cleanup::new(state).run(token()));
}
