//! How the store fails, and the MongoDB server error codes msgbuf reacts to, named once.

use mongodb::error::{ErrorKind, WriteFailure};

use crate::error::{Error, ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("mongodb: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("bson: {0}")]
    Bson(#[from] mongodb::bson::de::Error),
    #[error("the store is shutting down")]
    ShuttingDown,
    /// One statement of a multi-statement write failed, or its write concern did
    /// (`transient`: retry later).
    #[error("write statement failed: {message}")]
    Statement { message: String, transient: bool },
    /// A new device would pass the user's device limit.
    #[error("too many devices for this user (limit {0})")]
    TooManyDevices(usize),
}

impl StoreError {
    /// True for errors a client should retry (no primary, network, timeouts).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Mongo(e) => is_transient(e),
            StoreError::Bson(_) | StoreError::TooManyDevices(_) => false,
            StoreError::Statement { transient, .. } => *transient,
            StoreError::ShuttingDown => true,
        }
    }

    /// A copy for each waiter of a batch that failed as a whole.
    pub(crate) fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Mongo(e) => StoreError::Mongo(e.clone()),
            StoreError::TooManyDevices(n) => StoreError::TooManyDevices(*n),
            StoreError::Statement { message, transient } => StoreError::Statement {
                message: message.clone(),
                transient: *transient,
            },
            _ => StoreError::ShuttingDown,
        }
    }
}

impl From<StoreError> for Error {
    /// Retryable failures tell the client to retry; a device past the limit is forbidden;
    /// anything else is internal. The
    /// driver's text stays in the cause (logged), never in the answer.
    fn from(e: StoreError) -> Self {
        if let StoreError::TooManyDevices(limit) = e {
            return Error::forbidden(format!(
                "too many devices for this user (limit {limit}): forget one with DELETE /api/users/{{userId}}/devices/{{deviceId}}"
            ));
        }
        if e.is_unavailable() {
            Error::new(
                ErrorCode::Unavailable,
                "the message store is unavailable, retry later",
            )
            .with_cause(e)
        } else {
            Error::internal(e)
        }
    }
}

/// Server error codes (`src/mongo/base/error_codes.yml` in the server's source).
pub(crate) mod code {
    pub const HOST_UNREACHABLE: i32 = 6;
    pub const HOST_NOT_FOUND: i32 = 7;
    pub const NETWORK_TIMEOUT: i32 = 89;
    pub const SHUTDOWN_IN_PROGRESS: i32 = 91;
    pub const PRIMARY_STEPPED_DOWN: i32 = 189;
    pub const EXCEEDED_TIME_LIMIT: i32 = 262;
    pub const WRITE_CONCERN_FAILED: i32 = 64;
    pub const NOT_WRITABLE_PRIMARY: i32 = 10107;
    pub const INTERRUPTED_AT_SHUTDOWN: i32 = 11600;
    pub const INTERRUPTED_DUE_TO_REPL_STATE_CHANGE: i32 = 11602;
    pub const NOT_PRIMARY_NO_SECONDARY_OK: i32 = 13435;
    pub const NOT_PRIMARY_OR_SECONDARY: i32 = 13436;
    pub const DUPLICATE_KEY: i32 = 11000;
    pub const CAPPED_POSITION_LOST: i32 = 136;
    pub const INVALID_RESUME_TOKEN: i32 = 260;
    pub const CHANGE_STREAM_FATAL_ERROR: i32 = 280;
    pub const CHANGE_STREAM_HISTORY_LOST: i32 = 286;
}

/// Codes that pass with time: the network, elections, shutdowns, write concern waits.
const TRANSIENT: [i32; 12] = [
    code::HOST_UNREACHABLE,
    code::HOST_NOT_FOUND,
    code::NETWORK_TIMEOUT,
    code::SHUTDOWN_IN_PROGRESS,
    code::PRIMARY_STEPPED_DOWN,
    code::EXCEEDED_TIME_LIMIT,
    code::WRITE_CONCERN_FAILED,
    code::NOT_WRITABLE_PRIMARY,
    code::INTERRUPTED_AT_SHUTDOWN,
    code::INTERRUPTED_DUE_TO_REPL_STATE_CHANGE,
    code::NOT_PRIMARY_NO_SECONDARY_OK,
    code::NOT_PRIMARY_OR_SECONDARY,
];

/// Errors that pass with time: network, server selection, elections, write concern waits.
pub(crate) fn is_transient(e: &mongodb::error::Error) -> bool {
    if e.contains_label("RetryableWriteError") || e.contains_label("TransientTransactionError") {
        return true;
    }
    match e.kind.as_ref() {
        ErrorKind::ServerSelection { .. } => true,
        ErrorKind::Command(c) => TRANSIENT.contains(&c.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(_)) => true,
        ErrorKind::InsertMany(m) => m.write_concern_error.is_some(),
        ErrorKind::ConnectionPoolCleared { .. } | ErrorKind::Io(_) => true,
        _ => false,
    }
}

/// The message of a duplicate-key error (it names the index), if `e` is one.
pub(crate) fn duplicate_key_message(e: &mongodb::error::Error) -> Option<&str> {
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == code::DUPLICATE_KEY => {
            Some(&w.message)
        }
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .and_then(|errs| errs.first())
            .filter(|w| w.code == code::DUPLICATE_KEY)
            .map(|w| w.message.as_str()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_failure_keeps_its_cause_but_not_in_the_message() {
        let e = Error::from(StoreError::ShuttingDown);
        assert_eq!(e.code(), ErrorCode::Unavailable);
        assert_eq!(e.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(std::error::Error::source(&e).is_some());
        assert!(!e.message().contains("shutting"));
    }
}
