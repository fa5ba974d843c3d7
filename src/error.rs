//! The error policy, written once.
//!
//! Modules return their own `thiserror` enums ([`crate::store::StoreError`],
//! [`crate::auth::AuthError`]); each says next to itself how it becomes the one edge
//! [`Error`] (`From`), so this module depends on none of them. An [`Error`] is: a stable [`ErrorCode`]
//! (the protocol's), an HTTP status, a message fit for a client and, kept apart from it, the
//! cause. The same value answers an HTTP request ([`IntoResponse`]) and a socket (an `error`
//! frame built from [`Error::to_wire`]). It is logged once, where the answer is produced
//! ([`Error::report`]): internal details (driver errors, server addresses) go to the log,
//! never to the client — an `internal` or `unavailable` answer says only what the client
//! can act on.

use std::borrow::Cow;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

/// The `code` of an `error` frame and of a REST error body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    TooLarge,
    RateLimited,
    Unavailable,
    Internal,
}

impl ErrorCode {
    fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

type Cause = Box<dyn std::error::Error + Send + Sync>;

/// A request or frame that could not be served.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    code: ErrorCode,
    /// Usually the code's; a REST route may be more precise (404 with `bad_request`).
    status: StatusCode,
    message: Cow<'static, str>,
    /// Echoed in the `error` frame, so a client can match it to its send.
    client_msg_id: Option<String>,
    #[source]
    cause: Option<Cause>,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Error {
            code,
            status: code.status(),
            message: message.into(),
            client_msg_id: None,
            cause: None,
        }
    }

    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    pub fn rate_limited(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::RateLimited, message)
    }

    /// Something that should not fail did; the cause goes to the log only.
    pub fn internal(cause: impl Into<Cause>) -> Self {
        Self::new(ErrorCode::Internal, "internal error").with_cause(cause)
    }

    /// An unknown REST route: status 404, code `bad_request` (the protocol has no
    /// `not_found` code).
    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorCode::BadRequest, message).with_status(StatusCode::NOT_FOUND)
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn with_client_msg_id(mut self, id: Option<String>) -> Self {
        self.client_msg_id = id;
        self
    }

    pub(crate) fn with_cause(mut self, cause: impl Into<Cause>) -> Self {
        self.cause = Some(cause.into());
        self
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn client_msg_id(&self) -> Option<&str> {
        self.client_msg_id.as_deref()
    }

    /// Logs the error with its cause: call once, where the answer goes out.
    pub fn report(&self) {
        let cause = self.cause.as_ref().map(|c| c.to_string());
        match self.code {
            ErrorCode::Internal => {
                tracing::error!(message = %self.message, cause = ?cause, "internal error")
            }
            ErrorCode::Unavailable => {
                tracing::warn!(message = %self.message, cause = ?cause, "MongoDB unavailable")
            }
            _ => {
                tracing::debug!(code = ?self.code, message = %self.message, cause = ?cause, "request refused")
            }
        }
    }

    /// The body of an `error` frame.
    pub fn to_wire(&self) -> WireError {
        WireError {
            code: self.code,
            message: self.message.to_string(),
            client_msg_id: self.client_msg_id.clone(),
        }
    }
}

/// `error` frame data: `{"code", "message", "clientMsgId"?}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(
        rename = "clientMsgId",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub client_msg_id: Option<String>,
}

impl PartialEq for Error {
    /// Equal answers: what the client sees (the cause is the log's business).
    fn eq(&self, other: &Self) -> bool {
        self.code == other.code
            && self.status == other.status
            && self.message == other.message
            && self.client_msg_id == other.client_msg_id
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    code: ErrorCode,
    message: &'a str,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        self.report();
        let body = Body {
            error: Detail {
                code: self.code,
                message: &self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_internal_error_keeps_its_cause_out_of_the_message() {
        let e = Error::internal("connection to 10.0.0.7:27017 refused");
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(e.message(), "internal error");
    }

    #[test]
    fn the_frame_body_carries_the_client_msg_id() {
        let e = Error::rate_limited("slow down").with_client_msg_id(Some("k".into()));
        let v = serde_json::to_value(e.to_wire()).ok();
        assert_eq!(
            v,
            Some(
                serde_json::json!({"code": "rate_limited", "message": "slow down", "clientMsgId": "k"})
            )
        );
    }
}
