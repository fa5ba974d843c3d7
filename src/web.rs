//! The chat page and the operator view: static files compiled into the binary.

use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::state::AppState;

fn page(body: &'static str, content_type: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/",
            get(|| async { page(include_str!("../web/index.html"), HTML) }),
        )
        .route(
            "/admin",
            get(|| async { page(include_str!("../web/admin.html"), HTML) }),
        )
        .route(
            "/static/chat.js",
            get(|| async { page(include_str!("../web/chat.js"), JS) }),
        )
        .route(
            "/static/admin.js",
            get(|| async { page(include_str!("../web/admin.js"), JS) }),
        )
        .route(
            "/static/common.js",
            get(|| async { page(include_str!("../web/common.js"), JS) }),
        )
        .route(
            "/static/style.css",
            get(|| async { page(include_str!("../web/style.css"), "text/css; charset=utf-8") }),
        )
}
