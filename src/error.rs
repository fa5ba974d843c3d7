//! The error policy at the HTTP/protocol edge.
//!
//! Modules return their own `thiserror` enums ([`crate::store::StoreError`],
//! [`crate::auth::AuthError`], [`crate::protocol::ProtocolError`]). They meet here, in one
//! [`AppError`] that knows the wire: a stable `code` (the protocol's error codes), a status,
//! and a message fit for a client. Internal details (driver errors, server addresses) are
//! logged, never sent: an `internal` or `unavailable` body says only what the client can act
//! on.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::auth::AuthError;
use crate::protocol::ErrorCode;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("too many requests")]
    RateLimited,
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal,
}

impl AppError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AppError::BadRequest(_) | AppError::NotFound(_) => ErrorCode::BadRequest,
            AppError::Unauthorized(_) => ErrorCode::Unauthorized,
            AppError::Forbidden(_) => ErrorCode::Forbidden,
            AppError::TooLarge(_) => ErrorCode::TooLarge,
            AppError::RateLimited => ErrorCode::RateLimited,
            AppError::Unavailable(_) => ErrorCode::Unavailable,
            AppError::Internal => ErrorCode::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            AppError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: ErrorCode,
    message: &'a str,
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: &message,
            },
        };
        (self.status(), Json(body)).into_response()
    }
}

impl From<AuthError> for AppError {
    fn from(e: AuthError) -> Self {
        AppError::Unauthorized(e.to_string())
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            tracing::warn!(error = %e, "MongoDB unavailable");
            AppError::Unavailable("the message store is unavailable, retry later".into())
        } else {
            tracing::error!(error = %e, "store error");
            AppError::Internal
        }
    }
}

impl From<crate::protocol::ProtocolError> for AppError {
    fn from(e: crate::protocol::ProtocolError) -> Self {
        match e.code {
            ErrorCode::TooLarge => AppError::TooLarge(e.message),
            ErrorCode::Forbidden => AppError::Forbidden(e.message),
            ErrorCode::Unauthorized => AppError::Unauthorized(e.message),
            ErrorCode::RateLimited => AppError::RateLimited,
            ErrorCode::Unavailable => AppError::Unavailable(e.message),
            ErrorCode::Internal => AppError::Internal,
            ErrorCode::BadRequest => AppError::BadRequest(e.message),
        }
    }
}

impl From<AppError> for crate::protocol::ProtocolError {
    fn from(e: AppError) -> Self {
        crate::protocol::ProtocolError::new(e.code(), e.to_string())
    }
}
