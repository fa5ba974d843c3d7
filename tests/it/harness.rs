//! The harness itself and the binary's start-up rules.

use std::process::{Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use mongodb::bson::{doc, Document};
use mongodb::options::WriteConcern;

use crate::common::*;

async fn insert_and_stream_then_step_down(rs: ReplicaSet) {
    let coll = rs
        .client()
        .await
        .database(&db_name("harness"))
        .collection::<Document>("c");
    let mut stream = coll.watch().await.expect("change stream");
    coll.insert_one(doc! {"x": 1})
        .write_concern(WriteConcern::majority())
        .await
        .expect("insert");
    let event = tokio::time::timeout(T, stream.next())
        .await
        .expect("event in time")
        .expect("event")
        .expect("ok");
    assert_eq!(
        event.full_document.and_then(|d| d.get_i32("x").ok()),
        Some(1)
    );
    let before = rs.wait_for_primary().await;
    let after = rs.step_down().await;
    assert_ne!(before, after, "a new primary was elected");
}

#[tokio::test]
async fn three_member_set_streams_inserts_and_elects_a_new_primary() {
    let rs = ReplicaSet::start(3).await;
    if rs.is_external() {
        return;
    }
    insert_and_stream_then_step_down(rs).await;
}

#[tokio::test]
async fn process_backend_three_member_set_streams_and_elects() {
    let rs = ReplicaSet::start_process(3, &[]).await;
    insert_and_stream_then_step_down(rs).await;
}

#[tokio::test]
async fn serve_refuses_a_standalone_mongod() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let mut mongod = Command::new(mongod_path())
        .args([
            "--bind_ip",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--dbpath",
        ])
        .arg(dir.path())
        .stdout(Stdio::null())
        .spawn()
        .expect("mongod");
    let output = Command::new(env!("CARGO_BIN_EXE_msgbuf"))
        .arg("serve")
        .env(
            "MSGBUF_MONGODB_URI",
            format!("mongodb://127.0.0.1:{port}/?directConnection=true"),
        )
        .env("MSGBUF_JWT_SECRET", SECRET)
        .env("MSGBUF_BIND", format!("127.0.0.1:{}", free_port()))
        .output()
        .expect("run msgbuf");
    let _ = mongod.kill();
    let _ = mongod.wait();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "must exit non-zero");
    assert!(
        stderr.contains("not a replica set member"),
        "says why: {stderr}"
    );
}

#[tokio::test]
async fn embedded_default_runs_stops_cleanly_and_keeps_its_data() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("mongo");
    let mongo_port = free_port();
    let start = || {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_msgbuf"))
            .args(["serve", "--insecure-dev"])
            .env_remove("MSGBUF_MONGODB_URI")
            .env("MSGBUF_MONGOD", mongod_path())
            .env("MSGBUF_DATA_DIR", &data)
            .env("MSGBUF_EMBEDDED_PORT", mongo_port.to_string())
            .env("MSGBUF_BIND", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("msgbuf serve");
        (child, format!("http://127.0.0.1:{port}"))
    };
    let dev = msgbuf::Auth::new(msgbuf::INSECURE_DEV_SECRET, None, None);
    let alice = dev
        .mint("alice", false, Duration::from_secs(600))
        .expect("token");
    let bob = dev
        .mint("bob", false, Duration::from_secs(600))
        .expect("token");

    let (mut child, base) = start();
    wait_for("embedded /readyz", Duration::from_secs(90), || async {
        (http_get(&format!("{base}/readyz"), None).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(http_get(&format!("{base}/healthz"), None).await.0, 200);
    let (status, _) = http(
        "POST",
        &format!("{base}/api/messages"),
        Some(&alice),
        Some(r#"{"to":"bob","chatId":"c","message":"kept"}"#),
    )
    .await;
    assert_eq!(status, 201);
    sigterm_and_wait(&mut child, Duration::from_secs(20)).await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", mongo_port)).is_err(),
        "managed mongod stopped with msgbuf"
    );

    let (mut child, base) = start();
    wait_for(
        "embedded /readyz after restart",
        Duration::from_secs(90),
        || async { (http_get(&format!("{base}/readyz"), None).await.0 == 200).then_some(()) },
    )
    .await;
    let (status, body) = http_get(&format!("{base}/api/messages/buffered/bob"), Some(&bob)).await;
    assert_eq!(status, 200);
    assert_eq!(
        json(&body)["messages"][0]["message"],
        "kept",
        "data survived the restart"
    );
    sigterm_and_wait(&mut child, Duration::from_secs(20)).await;
}

/// SIGTERM, then waits for a zero exit within `limit`.
pub async fn sigterm_and_wait(child: &mut std::process::Child, limit: Duration) {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_for("the process to exit", limit, || {
        let s = child.try_wait().expect("try_wait");
        async move { s }
    })
    .await;
    assert!(status.success(), "exit status {status}");
}
