//! In front of socketioxide, for every `/socket.io/` request: the origin check, CORS for
//! the allowed origins, and the request head cut to what is read of it, copied out of
//! hyper's read buffer.

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
        return next.run(kept_head(req)).await;
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
        next.run(kept_head(req)).await
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

/// The headers of a `/socket.io/` request that anything reads: msgbuf's token
/// (`authorization`), engineioxide's (`content-type` of a polling request, the WebSocket
/// upgrade's `sec-websocket-key`) and the upgrade's own. The URI is kept whole: it holds
/// the Engine.IO parameters and the `?token=` some clients send.
const KEPT_HEADERS: [header::HeaderName; 6] = [
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::CONNECTION,
    header::UPGRADE,
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
];

/// The request with only [`KEPT_HEADERS`], their values and the URI copied out of
/// hyper's read buffer.
///
/// engineioxide keeps the head of the request that opened an Engine.IO session for the
/// socket's whole life (`Socket::req_parts`). hyper parses a head without copying: the URI
/// and every header value are slices of the connection's 8 KiB read buffer, which stays
/// allocated while any of them lives, so every Socket.IO connection pinned a whole read
/// buffer (heaptrack of 4,000 idle joined WebSocket connections: 8,192 bytes each still
/// held from hyper's `poll_read_head`, of 35.6 KiB per connection in all; a v1 socket
/// drops its request after the handshake, 11.4 KiB). Copies of every header would still
/// keep a browser's cookies and the rest of its head, up to `MAX_HEAD_BYTES`, for as long
/// as the socket lives; nothing reads them after the handshake.
fn kept_head(req: Request) -> Request {
    let (mut parts, body) = req.into_parts();
    if let Ok(uri) = parts.uri.to_string().parse() {
        // `Uri: FromStr` copies; a URI that does not print back (none hyper accepts) stays.
        parts.uri = uri;
    }
    let mut headers = axum::http::HeaderMap::new();
    for name in KEPT_HEADERS {
        for value in parts.headers.get_all(&name) {
            // Values hyper accepted are valid for `from_bytes`; one that were not would
            // stay as it is.
            let mut copy =
                HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
            copy.set_sensitive(value.is_sensitive());
            headers.append(name.clone(), copy);
        }
    }
    parts.headers = headers;
    Request::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;

    #[test]
    fn the_kept_head_is_what_is_read_and_shares_no_bytes_with_the_read_buffer() {
        // A head as hyper builds it: URI and values are slices of one buffer.
        const URI: &[u8] = b"/socket.io/?EIO=4&transport=websocket&token=t";
        let buffer = Bytes::from_static(
            b"/socket.io/?EIO=4&transport=websocket&token=t abc a\xffb dGhlIHNhbXBsZQ== 13",
        );
        let at = |from: usize, len: usize| buffer.slice(URI.len() + from..URI.len() + from + len);
        let mut req = Request::new(axum::body::Body::empty());
        *req.uri_mut() =
            axum::http::Uri::from_maybe_shared(buffer.slice(0..URI.len())).expect("uri");
        let value = |b: Bytes| HeaderValue::from_maybe_shared(b).expect("a header value");
        req.headers_mut().append(header::COOKIE, value(at(1, 1)));
        req.headers_mut().append(header::COOKIE, value(at(2, 2)));
        req.headers_mut()
            .insert(header::USER_AGENT, value(at(1, 3)));
        let mut secret = value(at(5, 3));
        secret.set_sensitive(true);
        req.headers_mut().insert(header::AUTHORIZATION, secret);
        req.headers_mut()
            .insert(header::SEC_WEBSOCKET_KEY, value(at(9, 16)));
        req.headers_mut()
            .insert(header::SEC_WEBSOCKET_VERSION, value(at(26, 2)));
        req.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let within = |p: *const u8| buffer.as_ptr_range().contains(&p);
        assert!(within(
            req.headers()[header::AUTHORIZATION].as_bytes().as_ptr()
        ));

        let req = kept_head(req);
        assert_eq!(req.uri(), "/socket.io/?EIO=4&transport=websocket&token=t");
        assert_eq!(req.uri().query(), Some("EIO=4&transport=websocket&token=t"));
        let mut names: Vec<_> = req.headers().keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "authorization",
                "sec-websocket-key",
                "sec-websocket-version",
                "upgrade"
            ]
        );
        let auth = &req.headers()[header::AUTHORIZATION];
        assert_eq!(auth.as_bytes(), b"a\xffb");
        assert!(auth.is_sensitive());
        assert_eq!(req.headers()[header::SEC_WEBSOCKET_KEY], "dGhlIHNhbXBsZQ==");
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
