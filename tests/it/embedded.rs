//! The embedded default (`msgbuf serve` without `MSGBUF_MONGODB_URI`): the binary manages its
//! own mongod, refuses a port it does not own, and supervises the child.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use msgbuf::client::{ClientError, WsClient};
use msgbuf::{Auth, INSECURE_DEV_SECRET};

use crate::common::*;
use crate::harness::sigterm_and_wait;

/// `msgbuf serve --insecure-dev` in `dir`, managing a mongod on `mongo_port` with its data in
/// `dir/mongo`; stderr goes to `dir/msgbuf.log`.
struct Embedded {
    child: Child,
    base: String,
    data: PathBuf,
    log: PathBuf,
}

impl Embedded {
    fn spawn(dir: &Path, mongo_port: u16) -> Embedded {
        let port = free_port();
        let data = dir.join("mongo");
        let log = dir.join("msgbuf.log");
        let child = msgbuf_command()
            .args(["serve", "--insecure-dev"])
            .current_dir(dir)
            .env("MSGBUF_MONGOD", mongod_path())
            .env("MSGBUF_DATA_DIR", &data)
            .env("MSGBUF_EMBEDDED_PORT", mongo_port.to_string())
            .env("MSGBUF_BIND", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("msgbuf serve");
        Embedded {
            child,
            base: format!("http://127.0.0.1:{port}"),
            data,
            log,
        }
    }

    async fn readyz(&self) -> u16 {
        http_get(&format!("{}/readyz", self.base), None).await.0
    }

    async fn wait_ready(&self, what: &str) {
        wait_for(what, Duration::from_secs(90), || async {
            (self.readyz().await == 200).then_some(())
        })
        .await;
    }

    /// The managed mongod's pid, from the lock file mongod writes into its data directory.
    fn mongod_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.data.join("mongod.lock"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn ws_url(&self) -> String {
        format!("{}/ws", self.base.replace("http://", "ws://"))
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit within `limit`.
    async fn exit_status(&mut self, limit: Duration) -> std::process::ExitStatus {
        let child = &mut self.child;
        wait_for("msgbuf to exit", limit, || {
            let s = child.try_wait().expect("try_wait");
            async move { s }
        })
        .await
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        // SIGKILL: PR_SET_PDEATHSIG takes the managed mongod down with it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dev_token(user: &str) -> String {
    Auth::new(INSECURE_DEV_SECRET, None, None)
        .mint(user, false, Duration::from_secs(600))
        .expect("token")
}

/// True while `pid` exists (a zombie counts: it was not reaped).
fn process_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn embedded_default_runs_stops_cleanly_and_keeps_its_data() {
    let dir = tempfile::tempdir().expect("tmp");
    let mongo_port = free_port();
    let bob = dev_token("bob");

    let mut first = Embedded::spawn(dir.path(), mongo_port);
    first.wait_ready("embedded /readyz").await;
    assert_eq!(
        http_get(&format!("{}/healthz", first.base), None).await.0,
        200
    );
    let (status, _) = http(
        "POST",
        &format!("{}/api/messages", first.base),
        Some(&dev_token("alice")),
        Some(r#"{"to":"bob","chatId":"c","message":"kept"}"#),
    )
    .await;
    assert_eq!(status, 201);
    sigterm_and_wait(&mut first.child, Duration::from_secs(20)).await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", mongo_port)).is_err(),
        "managed mongod stopped with msgbuf"
    );

    let mut second = Embedded::spawn(dir.path(), mongo_port);
    second.wait_ready("embedded /readyz after restart").await;
    let (status, body) = http_get(
        &format!("{}/api/messages/buffered/bob", second.base),
        Some(&bob),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        json(&body)["messages"][0]["message"],
        "kept",
        "data survived the restart"
    );
    sigterm_and_wait(&mut second.child, Duration::from_secs(20)).await;
}

#[tokio::test]
async fn a_second_embedded_instance_refuses_a_taken_port_and_runs_on_its_own_port_and_data() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let port_a = free_port();
    let mut a = Embedded::spawn(dir_a.path(), port_a);
    a.wait_ready("instance A ready").await;

    // Same port, other folder: refused before any mongod is started or contacted.
    let mut clash = Embedded::spawn(dir_b.path(), port_a);
    let status = clash.exit_status(Duration::from_secs(30)).await;
    let stderr = clash.stderr();
    assert!(!status.success(), "exit status {status}; stderr: {stderr}");
    assert!(
        stderr.contains(&port_a.to_string()) && stderr.contains("MSGBUF_EMBEDDED_PORT"),
        "names the port and the setting: {stderr}"
    );
    assert!(
        !stderr.contains("running a managed single-node replica set"),
        "never reported ready on the other mongod: {stderr}"
    );
    assert_eq!(a.readyz().await, 200, "A is unaffected");

    // Another port: its own mongod and its own data.
    let mut b = Embedded::spawn(dir_b.path(), free_port());
    b.wait_ready("instance B ready").await;
    let (pid_a, pid_b) = (a.mongod_pid(), b.mongod_pid());
    assert!(
        pid_a.is_some() && pid_b.is_some() && pid_a != pid_b,
        "{pid_a:?} {pid_b:?}"
    );
    let (status, _) = http(
        "POST",
        &format!("{}/api/messages", a.base),
        Some(&dev_token("alice")),
        Some(r#"{"to":"bob","chatId":"c","message":"only in A"}"#),
    )
    .await;
    assert_eq!(status, 201);
    let buffered = |base: String| async move {
        let (status, body) = http_get(
            &format!("{base}/api/messages/buffered/bob"),
            Some(&dev_token("bob")),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        json(&body)["messages"].as_array().expect("messages").len()
    };
    assert_eq!(buffered(a.base.clone()).await, 1);
    assert_eq!(buffered(b.base.clone()).await, 0, "B has its own data");
    sigterm_and_wait(&mut b.child, Duration::from_secs(20)).await;
    sigterm_and_wait(&mut a.child, Duration::from_secs(20)).await;
}

/// Sends until accepted, retrying the same clientMsgId through outages; returns the id.
async fn send(url: &str, tx: &mut WsClient, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    let client_id = format!("m-{n}");
    loop {
        assert!(Instant::now() < deadline, "message {n} never accepted");
        let attempt = async {
            tx.chat("bob", "c", &format!("message {n}"), Some(&client_id))
                .await?;
            tx.next_event(Duration::from_secs(20)).await
        }
        .await;
        match attempt {
            Ok(ev) if ev.event == "message_accepted" => return id_of(&ev.data),
            Ok(ev) if ev.data["code"] == "unavailable" => {
                // Retry pacing while MongoDB restarts (not a synchronisation).
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Ok(ev) => panic!("unexpected answer: {} {}", ev.event, ev.data),
            Err(_) => {
                *tx = WsClient::connect(url, &dev_token("alice"))
                    .await
                    .expect("reconnect");
            }
        }
    }
}

#[tokio::test]
async fn kill_9_of_the_managed_mongod_during_traffic_restarts_it_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = Embedded::spawn(dir.path(), free_port());
    a.wait_ready("embedded ready").await;
    let url = a.ws_url();
    let mut rx = WsClient::connect(&url, &dev_token("bob"))
        .await
        .expect("bob");
    rx.join(T).await.expect("joined");
    let mut tx = WsClient::connect(&url, &dev_token("alice"))
        .await
        .expect("alice");

    let mut accepted = Vec::new();
    for n in 0..5 {
        accepted.push(send(&url, &mut tx, n).await);
    }
    let old = a.mongod_pid().expect("mongod pid");
    assert_eq!(unsafe { libc::kill(old, libc::SIGKILL) }, 0);
    wait_for("/readyz 503 while mongod is down", T, || async {
        (a.readyz().await == 503).then_some(())
    })
    .await;
    // Sent during the outage: accepted once the restarted mongod is there.
    for n in 5..10 {
        accepted.push(send(&url, &mut tx, n).await);
    }
    a.wait_ready("/readyz 200 after the restart").await;
    let new = a.mongod_pid().expect("new mongod pid");
    assert_ne!(new, old, "a new mongod");
    assert!(process_exists(new));
    assert!(
        !process_exists(old),
        "the killed mongod was reaped (no zombie)"
    );
    for n in 10..15 {
        accepted.push(send(&url, &mut tx, n).await);
    }

    let mut received = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !accepted.iter().all(|id| received.contains(id)) {
        assert!(
            Instant::now() < deadline,
            "missing: {:?}; log: {}",
            accepted
                .iter()
                .filter(|id| !received.contains(*id))
                .collect::<Vec<_>>(),
            a.stderr()
        );
        match rx.expect("chat_message", Duration::from_secs(5)).await {
            Ok(ev) => {
                let id = id_of(&ev.data);
                rx.ack(std::slice::from_ref(&id)).await.expect("ack");
                received.insert(id);
            }
            Err(ClientError::Timeout(_)) => {}
            Err(_) => {
                // The socket went away: a new join drains what is pending.
                rx = WsClient::connect(&url, &dev_token("bob"))
                    .await
                    .expect("bob again");
                rx.join(T).await.expect("joined again");
            }
        }
    }
    assert!(
        a.stderr().contains("managed mongod exited"),
        "the exit was noticed and logged"
    );
}

#[tokio::test]
async fn a_managed_mongod_that_cannot_come_back_stops_msgbuf_with_its_log() {
    let dir = tempfile::tempdir().expect("tmp");
    let mongo_port = free_port();
    let mut a = Embedded::spawn(dir.path(), mongo_port);
    a.wait_ready("embedded ready").await;
    let pid = a.mongod_pid().expect("mongod pid");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    // Take the port before the first restart (after 500 ms of backoff): every restart fails.
    let _squatter = wait_for("the port to be free", T, || async {
        std::net::TcpListener::bind(("127.0.0.1", mongo_port)).ok()
    })
    .await;
    let status = a.exit_status(Duration::from_secs(90)).await;
    let stderr = a.stderr();
    assert!(!status.success(), "exit status {status}; stderr: {stderr}");
    assert!(
        stderr.contains("failed 5 times") && stderr.contains("mongod.log"),
        "says why: {stderr}"
    );
    assert!(
        stderr.contains("\"msg\""),
        "quotes mongod's log (JSON lines): {stderr}"
    );
    assert!(!process_exists(pid), "reaped");
}
