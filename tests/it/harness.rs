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
    if skip_external(
        &rs,
        "three_member_set_streams_inserts_and_elects_a_new_primary",
    ) {
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
    let output = msgbuf_command()
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
async fn srv_uris_are_parsed_and_fail_only_on_dns() {
    // No DNS here: the resolver is built in, so the lookup itself is what fails.
    let uri = "mongodb+srv://cluster0.example.invalid/?retryWrites=true";
    let err = mongodb::options::ClientOptions::parse(uri)
        .await
        .expect_err("no DNS");
    assert!(
        matches!(*err.kind, mongodb::error::ErrorKind::DnsResolve { .. }),
        "a DNS error, not a disabled feature: {err}"
    );
    let err = msgbuf::mongo::connect_replica_set(uri, Duration::from_secs(2))
        .await
        .expect_err("no DNS");
    let text = format!("{err:#}");
    assert!(
        text.contains("MSGBUF_MONGODB_URI") && !text.contains("dns-resolver"),
        "msgbuf names the setting and the lookup failure: {text}"
    );
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
