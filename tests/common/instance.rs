//! msgbuf instances for tests: [`Instance`] runs in this process, [`ProcInstance`] as a
//! child process (so it can be killed, frozen, restarted). Neither sees the developer's
//! `MSGBUF_*` variables: settings come from the test alone.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mongodb::bson::Document;
use msgbuf::client::WsClient;
use msgbuf::{Config, Server};
use tokio_util::sync::CancellationToken;

use super::{free_port, http_get, token, wait_for, ReplicaSet, SECRET, T};

/// `msgbuf` (the binary under test) with every `MSGBUF_*` variable of this process removed;
/// the caller sets the ones the test means.
pub fn msgbuf_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_msgbuf"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MSGBUF_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// The settings tests start from (defaults, not the environment).
pub fn test_config(rs: &ReplicaSet, db: &str, instance: &str) -> Config {
    let mut c = Config::with_uri(&rs.uri, db);
    c.bind = "127.0.0.1:0".parse().expect("addr");
    c.jwt_secret = Some(SECRET.to_owned());
    c.instance_id = Some(instance.to_owned());
    c
}

/// An msgbuf instance running in this process.
pub struct Instance {
    pub addr: std::net::SocketAddr,
    pub state: Arc<msgbuf::AppState>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Instance {
    pub async fn start(config: Config) -> Instance {
        let client = msgbuf::mongo::connect_replica_set(
            config.mongodb_uri.as_deref().expect("uri"),
            config.mongodb_timeout,
        )
        .await
        .expect("connect");
        let shutdown = CancellationToken::new();
        let server = Server::start(config, client, shutdown.clone())
            .await
            .expect("start msgbuf");
        let addr = server.local_addr();
        let state = server.state().clone();
        let task = tokio::spawn(server.run());
        let instance = Instance {
            addr,
            state,
            shutdown,
            task: Some(task),
        };
        let url = instance.http("/readyz");
        wait_for("the instance to be ready", T, || async {
            let (status, _) = http_get(&url, None).await;
            (status == 200).then_some(())
        })
        .await;
        instance
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn connect(&self, user: &str) -> WsClient {
        WsClient::connect(&self.ws_url(), &token(user))
            .await
            .expect("ws connect")
    }

    /// Connects with a token of the test's making.
    pub async fn connect_with(&self, token: &str) -> Result<WsClient, msgbuf::client::ClientError> {
        WsClient::connect(&self.ws_url(), token).await
    }

    /// Connects and joins `user`.
    pub async fn join(&self, user: &str) -> (WsClient, serde_json::Value) {
        let mut c = self.connect(user).await;
        let joined = c.join(T).await.expect("joined");
        (c, joined)
    }

    /// Graceful stop; waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("join").expect("clean exit");
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The messages collection of a test database, as plain documents.
pub async fn messages(rs: &ReplicaSet, db: &str) -> mongodb::Collection<Document> {
    rs.client().await.database(db).collection(msgbuf::MESSAGES)
}

/// `n` messages from alice to `receiver` in chat `chat`, stored straight into the test
/// database (with msgbuf's indexes) before any instance runs: all pending, none of them
/// streamed. Returns the store and the messages, oldest first.
pub async fn stored_backlog(
    rs: &ReplicaSet,
    db: &str,
    receiver: &str,
    chat: &str,
    n: usize,
) -> (msgbuf::Store, Vec<msgbuf::BufferedMessage>) {
    let store = msgbuf::Store::new(rs.client().await.database(db));
    store.ensure_indexes().await.expect("indexes");
    let mut stored = Vec::with_capacity(n);
    for start in (0..n).step_by(1000) {
        let batch: Vec<_> = (start..n.min(start + 1000))
            .map(|i| msgbuf::BufferedMessage::new("alice", receiver, chat, &format!("m{i}"), None))
            .collect();
        for r in store.insert_batch(&batch).await {
            r.expect("insert");
        }
        stored.extend(batch);
    }
    (store, stored)
}

/// An msgbuf instance as a child process of the test (so it can be killed, frozen, restarted).
pub struct ProcInstance {
    pub id: String,
    pub port: u16,
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ProcInstance {
    /// Starts `msgbuf serve` against `uri`/`db` as instance `id`, with extra `MSGBUF_*` settings.
    pub async fn start(uri: &str, db: &str, id: &str, extra: &[(&str, &str)]) -> ProcInstance {
        let dir = tempfile::tempdir().expect("tmp");
        let port = free_port();
        let mut env: Vec<(String, String)> = vec![
            ("MSGBUF_MONGODB_URI".into(), uri.into()),
            ("MSGBUF_DB".into(), db.into()),
            ("MSGBUF_BIND".into(), format!("127.0.0.1:{port}")),
            ("MSGBUF_JWT_SECRET".into(), SECRET.into()),
            ("MSGBUF_INSTANCE_ID".into(), id.into()),
            ("MSGBUF_LOG".into(), "info,mongodb=warn".into()),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let log = dir.path().join(format!("{id}.log"));
        let mut p = ProcInstance {
            id: id.into(),
            port,
            env,
            child: None,
            log,
            _dir: dir,
        };
        p.spawn().await;
        p
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = msgbuf_command()
            .arg("serve")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn msgbuf");
        self.child = Some(child);
        let url = self.http("/readyz");
        wait_for(
            &format!("instance {} ready", self.id),
            Duration::from_secs(60),
            || async { (http_get(&url, None).await.0 == 200).then_some(()) },
        )
        .await;
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).expect("running")
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// `kill -9`, reaped.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; returns the exit status and how long the exit took.
    pub async fn terminate(&mut self, limit: Duration) -> (std::process::ExitStatus, Duration) {
        let mut c = self.child.take().expect("running");
        let started = Instant::now();
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let status = wait_for("the instance to exit", limit, || {
            let s = c.try_wait().expect("try_wait");
            async move { s }
        })
        .await;
        (status, started.elapsed())
    }

    /// Starts it again with the same id, port and settings.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn().await;
    }

    /// A metric's value from `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, text) = http_get(&self.http("/metrics"), None).await;
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Resident memory now, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// User + system CPU time so far.
    pub fn cpu_time(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        let ticks: u64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
            + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
        // SAFETY: sysconf only reads a constant of the system.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let per_second = u64::try_from(per_second)
            .ok()
            .filter(|&t| t > 0)
            .expect("CLK_TCK");
        Duration::from_millis(ticks * 1000 / per_second)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ProcInstance {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
        }
        self.kill9();
    }
}
