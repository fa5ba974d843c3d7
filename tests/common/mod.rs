//! The one test harness: replica sets ([`replica_set`]), msgbuf instances in-process or as
//! child processes ([`instance`]), an HTTP client ([`http`]) and tokens ([`tokens`]).
//! Everything started here is stopped and removed when its handle drops. Nothing here
//! reads the developer's `MSGBUF_*` variables except the harness's own knobs
//! (`MSGBUF_TEST_*`, `MSGBUF_MONGOD`).
#![allow(dead_code)]

pub mod http;
pub mod instance;
pub mod replica_set;
pub mod tokens;
pub mod traffic;

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use http::{http, http_get, json};
pub use instance::{messages, msgbuf_command, stored_backlog, test_config, Instance, ProcInstance};
pub use replica_set::{skip_external, ReplicaSet};
pub use tokens::{admin_token, auth, expired_token, token, SECRET};

pub const T: Duration = Duration::from_secs(20);

/// A free loopback port (bound, then released for the child to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A database name unique to a test, so tests can share an external replica set.
pub fn db_name(test: &str) -> String {
    let n: String = test
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(40)
        .collect();
    format!("t_{n}_{}", std::process::id())
}

/// The message id in an event's data (`message_accepted`, `chat_message`, REST bodies).
pub fn id_of(data: &serde_json::Value) -> String {
    data["id"].as_str().expect("an id").to_owned()
}

/// The next `n` chat messages on `c`, each within `timeout`; the `i`-th is acked as it is
/// read when `ack(i)`.
pub async fn receive_chat(
    c: &mut msgbuf::client::WsClient,
    n: usize,
    timeout: Duration,
    ack: impl Fn(usize) -> bool,
) -> Vec<serde_json::Value> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let m = c
            .expect("chat_message", timeout)
            .await
            .expect("chat_message")
            .data;
        if ack(got.len()) {
            c.ack(&[id_of(&m)]).await.expect("ack");
        }
        got.push(m);
    }
    got
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `MSGBUF_MONGOD`, else the project-local install of `scripts/setup-mongod`.
pub fn mongod_path() -> PathBuf {
    if let Some(p) = std::env::var_os("MSGBUF_MONGOD") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".local/mongodb/fiftyone/db/bin/mongod")
}
