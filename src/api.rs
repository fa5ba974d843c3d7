//! REST routes of protocol v1, health, readiness, metrics and the dev-only token route.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use mongodb::bson::oid::ObjectId;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::auth::{bearer_token, is_valid_user_id, AuthError, Claims};
use crate::device::DeviceId;
use crate::error::{Error, ErrorCode};
use crate::protocol::{rfc3339, SendMessage};
use crate::state::AppState;
use crate::store::{BufferedMessage, Receivers};

/// The caller, from `Authorization: Bearer <jwt>`.
pub struct AuthUser(pub Claims);

impl FromRequestParts<Arc<AppState>> for AuthUser {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Error> {
        let token = bearer_token(&parts.headers, None).ok_or(AuthError::Missing)?;
        Ok(AuthUser(state.auth.verify(token)?))
    }
}

/// A JSON object body, refused with the protocol's error body: 413 `too_large` over the
/// body limit, 400 for anything but one JSON object (an array is never read by position,
/// a repeated key is an error).
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Error> {
        let is_json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !is_json {
            return Err(Error::bad_request(
                "the body must be JSON (Content-Type: application/json)",
            ));
        }
        let body = read_body(req, state).await?;
        if body.trim_ascii_start().first() != Some(&b'{') {
            return Err(Error::bad_request("the body must be one JSON object"));
        }
        serde_json::from_slice(&body)
            .map(ApiJson)
            .map_err(|e| Error::bad_request(format!("invalid body: {e}")))
    }
}

/// Reads a request body: at most [`crate::state::MAX_BODIES_IN_FLIGHT`] at a time on the instance, each
/// within `MSGBUF_HANDSHAKE_TIMEOUT` (a client announcing a large body and sending it a
/// byte at a time holds a permit only that long).
async fn read_body(req: Request, state: &Arc<AppState>) -> Result<Bytes, Error> {
    let Ok(_permit) = state.bodies.try_acquire() else {
        return Err(Error::new(
            ErrorCode::Unavailable,
            "too many requests in flight; retry later",
        ));
    };
    let read = Bytes::from_request(req, state);
    match tokio::time::timeout(state.config.handshake_timeout, read).await {
        Err(_) => Err(
            Error::bad_request("the request body did not arrive in time")
                .with_status(StatusCode::REQUEST_TIMEOUT),
        ),
        Ok(Err(r)) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(Error::new(
            ErrorCode::TooLarge,
            "the body is larger than the limit",
        )),
        Ok(Err(r)) => Err(Error::bad_request(r.body_text())),
        Ok(Ok(body)) => Ok(body),
    }
}

/// `Path` whose rejection (a segment that is not UTF-8, say) is the protocol's error body.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(ApiPath(v)),
            Err(r) => Err(Error::bad_request(r.body_text())),
        }
    }
}

/// `Query` whose rejection is the protocol's error body.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ApiQuery(v)),
            Err(r) => Err(Error::bad_request(r.body_text())),
        }
    }
}

fn require_admin(claims: &Claims) -> Result<(), Error> {
    if claims.is_admin() {
        Ok(())
    } else {
        Err(Error::forbidden(
            "this route needs an admin token (role: admin)",
        ))
    }
}

/// `POST /api/messages`: the same acceptance as a `chat_message` frame.
pub async fn send_message(
    State(state): State<Arc<AppState>>,
    AuthUser(claims): AuthUser,
    ApiJson(body): ApiJson<SendMessage>,
) -> Result<Response, Error> {
    body.validate()?;
    state.delivery.check_send(&claims.sub)?;
    let msg = BufferedMessage::new(
        &claims.sub,
        &body.to,
        &body.chat_id,
        &body.message,
        body.client_msg_id,
    );
    let accepted = state.delivery.accept(msg).await?;
    state.metrics().accepted_rest.increment(1);
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": accepted.id, "timestamp": accepted.timestamp})),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    limit: Option<i64>,
    after: Option<String>,
}

/// A buffered message as REST shows it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MessageView {
    id: String,
    from: String,
    to: String,
    chat_id: String,
    message: String,
    timestamp: String,
    client_msg_id: Option<String>,
    delivered: bool,
    delivered_at: Option<String>,
    delivered_by: Option<String>,
    acked_at: Option<String>,
}

impl From<BufferedMessage> for MessageView {
    fn from(m: BufferedMessage) -> Self {
        MessageView {
            id: m.id.to_hex(),
            from: m.sender,
            to: m.receiver,
            chat_id: m.chat_id,
            message: m.message,
            timestamp: rfc3339(m.timestamp),
            client_msg_id: m.client_msg_id,
            delivered: m.delivered,
            delivered_at: m.delivered_at.map(rfc3339),
            delivered_by: m.delivered_by,
            acked_at: m.acked_at.map(rfc3339),
        }
    }
}

fn check_user_path(user: &str) -> Result<(), Error> {
    if is_valid_user_id(user) {
        Ok(())
    } else {
        Err(Error::bad_request(
            "user ids are 1..=128 characters of [A-Za-z0-9_.@:-]",
        ))
    }
}

/// `GET /api/messages/buffered/{userId}`: that user's undelivered messages, oldest first.
pub async fn list_buffered(
    State(state): State<Arc<AppState>>,
    AuthUser(claims): AuthUser,
    ApiPath(user): ApiPath<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<serde_json::Value>, Error> {
    check_user_path(&user)?;
    if claims.sub != user && !claims.is_admin() {
        return Err(Error::forbidden("you can only read your own buffer"));
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Error::bad_request("`limit` must be between 1 and 1000"));
    }
    let after = match q.after.as_deref() {
        None => None,
        Some(a) => Some(
            ObjectId::parse_str(a)
                .map_err(|_| Error::bad_request("`after` must be a 24-hex message id"))?,
        ),
    };
    // Pages are up to 1 MiB each; a few at once bound what reads hold in memory.
    let _permit = state.page_reads.acquire().await.map_err(Error::internal)?;
    let page = state
        .store()
        .undelivered(Receivers::One(&user), after, limit)
        .await?;
    let next = match page.messages.last() {
        Some(last) if page.more => Some(last.id.to_hex()),
        _ => None,
    };
    let messages: Vec<MessageView> = page.messages.into_iter().map(MessageView::from).collect();
    Ok(Json(
        json!({"userId": user, "messages": messages, "next": next}),
    ))
}

/// `DELETE /api/messages/buffered/{userId}` (admin): removes that user's undelivered messages.
pub async fn clear_buffered(
    State(state): State<Arc<AppState>>,
    AuthUser(claims): AuthUser,
    ApiPath(user): ApiPath<String>,
) -> Result<Json<serde_json::Value>, Error> {
    require_admin(&claims)?;
    check_user_path(&user)?;
    let deleted = state.store().delete_undelivered(&user).await?;
    tracing::info!(admin = %claims.sub, user = %user, deleted, "buffer cleared");
    Ok(Json(json!({"userId": user, "deleted": deleted})))
}

/// Who may see and forget a user's devices: that user, or an admin.
fn check_devices_reader(claims: &Claims, user: &str) -> Result<(), Error> {
    check_user_path(user)?;
    if claims.sub != user && !claims.is_admin() {
        return Err(Error::forbidden("you can only see your own devices"));
    }
    Ok(())
}

/// `GET /api/users/{userId}/devices` (that user or admin): each current device, with when
/// it was first and last seen and how many messages it has not received.
pub async fn list_devices(
    State(state): State<Arc<AppState>>,
    AuthUser(claims): AuthUser,
    ApiPath(user): ApiPath<String>,
) -> Result<Json<serde_json::Value>, Error> {
    check_devices_reader(&claims, &user)?;
    let policy = state.config.device_policy();
    let devices = state.store().devices_of(&user, policy).await?;
    Ok(Json(json!({"userId": user, "devices": devices})))
}

/// `DELETE /api/users/{userId}/devices/{deviceId}` (that user or admin): forgets the
/// device; its next join registers it anew (getting only what is undelivered and the
/// skew window's messages).
pub async fn forget_device(
    State(state): State<Arc<AppState>>,
    AuthUser(claims): AuthUser,
    ApiPath((user, device)): ApiPath<(String, String)>,
) -> Result<StatusCode, Error> {
    check_devices_reader(&claims, &user)?;
    let device = DeviceId::parse(&device).ok_or_else(|| Error::bad_request(DeviceId::RULE))?;
    if !state.store().forget_device(&user, device.as_str()).await? {
        return Err(Error::not_found("no such device"));
    }
    tracing::info!(by = %claims.sub, user = %user, device = %device, "device forgotten");
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/messages/buffer-stats` (admin).
pub async fn buffer_stats(
    State(state): State<Arc<AppState>>,
    AuthUser(claims): AuthUser,
) -> Result<Json<serde_json::Value>, Error> {
    require_admin(&claims)?;
    let store = state.store();
    let (counts, devices) = futures::try_join!(
        store.counts(),
        store.count_devices(state.config.device_policy())
    )?;
    let mut body = serde_json::to_value(counts).map_err(Error::internal)?;
    if let Some(obj) = body.as_object_mut() {
        obj.insert("devices".into(), devices.into());
        obj.insert("onlineUsers".into(), state.presence().online_users().into());
        obj.insert("connections".into(), state.presence().connections().into());
        obj.insert("instance".into(), state.instance().to_owned().into());
    }
    Ok(Json(body))
}

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// 200 when MongoDB answers and the change stream runs, else 503.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let ping = tokio::time::timeout(Duration::from_secs(2), state.store().ping()).await;
    let mongo = matches!(ping, Ok(Ok(_)));
    let stream = state.stream.is_running();
    let status = if mongo && stream {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"ready": status == StatusCode::OK, "mongodb": mongo, "changeStream": stream, "instance": state.instance()})),
    )
        .into_response()
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let body = state.metrics().render(
        state.presence().connections(),
        state.presence().online_users(),
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
        .into_response()
}

pub async fn not_found() -> Error {
    Error::not_found("no such route")
}

pub async fn method_not_allowed() -> Error {
    Error::bad_request("method not allowed on this route")
        .with_status(StatusCode::METHOD_NOT_ALLOWED)
}

pub async fn dev_status() -> Json<serde_json::Value> {
    Json(json!({"insecureDev": true}))
}

#[derive(Deserialize)]
pub struct DevTokenRequest {
    #[serde(rename = "userId")]
    user_id: String,
    #[serde(default)]
    admin: bool,
}

/// `POST /dev/token` (only with `--insecure-dev`): a 24 h token for any valid name.
pub async fn dev_token(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<DevTokenRequest>,
) -> Result<Json<serde_json::Value>, Error> {
    check_user_path(&req.user_id)?;
    let token = state
        .auth
        .mint(&req.user_id, req.admin, Duration::from_secs(24 * 3600))
        .map_err(|e| Error::bad_request(e.to_string()))?;
    Ok(Json(json!({"token": token})))
}
