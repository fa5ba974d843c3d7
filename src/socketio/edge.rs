//! In front of socketioxide, for every `/socket.io/` request: the origin check, CORS for
//! the allowed origins, and the request head copied out of hyper's read buffer.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::PATH;
use crate::error::Error;
use crate::state::AppState;

/// In front of socketioxide: `MSGBUF_ALLOWED_ORIGINS` for every `/socket.io/` request
/// (handshake, polling, WebSocket upgrade: 403 outside the list), and CORS for the
/// allowed origins, whose pages long-poll across origins.
pub(super) async fn edge(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let ours = path
        .strip_prefix(PATH)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    if !ours {
        return next.run(req).await;
    }
    let req = detach_head(req);
    let allowed = &state.config.allowed_origins;
    let origin = req.headers().get(header::ORIGIN).cloned();
    let origin_ok = allowed.is_empty()
        || origin
            .as_ref()
            .and_then(|o| o.to_str().ok())
            .is_some_and(|o| allowed.iter().any(|a| a == o));
    if !origin_ok {
        return Error::forbidden("origin not allowed").into_response();
    }
    // No `Origin`: not a cross-origin browser request, nothing to add.
    let Some(origin) = origin else {
        return next.run(req).await;
    };
    let mut response = if req.method() == Method::OPTIONS {
        let mut preflight = StatusCode::NO_CONTENT.into_response();
        let headers = preflight.headers_mut();
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        let requested = req
            .headers()
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("content-type, authorization"));
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested);
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        preflight
    } else {
        next.run(req).await
    };
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    response
}

/// The request with its URI and header values copied out of hyper's read buffer.
///
/// hyper parses a request head without copying: the URI and every header value are slices
/// of the connection's 8 KiB read buffer, which stays allocated while any of them lives.
/// engineioxide keeps the head of the request that opened an Engine.IO session for the
/// socket's whole life (`Socket::req_parts`), so every Socket.IO connection pinned a whole
/// read buffer: heaptrack of 4,000 idle joined WebSocket connections showed 8,192 bytes
/// each still held from hyper's `poll_read_head`, of 35.6 KiB per connection in all (a v1
/// socket drops its request after the handshake, 11.4 KiB). The copies cost the bytes of
/// the head.
fn detach_head(req: Request) -> Request {
    let (mut parts, body) = req.into_parts();
    if let Ok(uri) = parts.uri.to_string().parse() {
        // `Uri: FromStr` copies; a URI that does not print back (none hyper accepts) stays.
        parts.uri = uri;
    }
    let mut headers = axum::http::HeaderMap::with_capacity(parts.headers.len());
    for (name, value) in &parts.headers {
        // Header names are already owned (hyper copies them); values hyper accepted are
        // valid for `from_bytes`, and one that were not would stay as it is.
        let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        copy.set_sensitive(value.is_sensitive());
        headers.append(name.clone(), copy);
    }
    parts.headers = headers;
    Request::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;

    #[test]
    fn a_detached_head_shares_no_bytes_with_the_read_buffer() {
        // A head as hyper builds it: URI and values are slices of one buffer.
        const URI: &[u8] = b"/socket.io/?EIO=4&transport=websocket&token=t";
        let buffer =
            Bytes::from_static(b"/socket.io/?EIO=4&transport=websocket&token=t abc a\xffb");
        let at = |from: usize, len: usize| buffer.slice(URI.len() + from..URI.len() + from + len);
        let mut req = Request::new(axum::body::Body::empty());
        *req.uri_mut() =
            axum::http::Uri::from_maybe_shared(buffer.slice(0..URI.len())).expect("uri");
        let value = |b: Bytes| HeaderValue::from_maybe_shared(b).expect("a header value");
        req.headers_mut().append(header::COOKIE, value(at(1, 1)));
        req.headers_mut().append(header::COOKIE, value(at(2, 2)));
        let mut secret = value(at(5, 3));
        secret.set_sensitive(true);
        req.headers_mut().insert(header::AUTHORIZATION, secret);
        let within = |p: *const u8| buffer.as_ptr_range().contains(&p);
        assert!(within(
            req.headers()[header::AUTHORIZATION].as_bytes().as_ptr()
        ));

        let req = detach_head(req);
        assert_eq!(req.uri(), "/socket.io/?EIO=4&transport=websocket&token=t");
        assert_eq!(req.uri().query(), Some("EIO=4&transport=websocket&token=t"));
        let cookies: Vec<_> = req.headers().get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a", "bc"]);
        let auth = &req.headers()[header::AUTHORIZATION];
        assert_eq!(auth.as_bytes(), b"a\xffb");
        assert!(auth.is_sensitive());
        for (_, v) in req.headers() {
            assert!(
                !within(v.as_bytes().as_ptr()),
                "{v:?} still points into the buffer"
            );
        }
        let query = req.uri().query().expect("query");
        assert!(!within(query.as_ptr()));
    }
}
