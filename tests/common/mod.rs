//! The one test harness: replica sets (testcontainers by default, `mongod` processes with
//! `MSGBUF_TEST_BACKEND=process`, or an external set with `MSGBUF_TEST_MONGODB_URI`) and
//! msgbuf instances, in-process or as child processes. Everything started here is
//! stopped and removed when its handle drops.
#![allow(dead_code)]

pub mod traffic;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};
use mongodb::Client;
use msgbuf::auth::Auth;
use msgbuf::client::WsClient;
use msgbuf::{Config, Server};
use testcontainers::core::WaitFor;
use testcontainers::{clients::Cli, Container, GenericImage, RunnableImage};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret";
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

pub fn mongod_path() -> PathBuf {
    if let Some(p) = std::env::var_os("MSGBUF_MONGOD") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".local/mongodb/fiftyone/db/bin/mongod")
}

fn docker() -> &'static Cli {
    static CLI: OnceLock<Cli> = OnceLock::new();
    CLI.get_or_init(Cli::default)
}

enum Member {
    Container {
        container: Box<Container<'static, GenericImage>>,
    },
    Process {
        child: Option<Child>,
        args: Vec<String>,
        _dir: tempfile::TempDir,
    },
}

/// A replica set for one test.
pub struct ReplicaSet {
    pub uri: String,
    pub hosts: Vec<String>,
    members: Vec<Member>,
}

impl ReplicaSet {
    /// A fresh replica set of `n` members (1 or 3).
    pub async fn start(n: usize) -> ReplicaSet {
        Self::start_with(n, &[]).await
    }

    /// Like [`ReplicaSet::start`], with extra `mongod` arguments (e.g. `--oplogSize 1`).
    pub async fn start_with(n: usize, extra: &[&str]) -> ReplicaSet {
        if let Ok(uri) = std::env::var("MSGBUF_TEST_MONGODB_URI") {
            return ReplicaSet {
                uri,
                hosts: vec![],
                members: vec![],
            };
        }
        let process = std::env::var("MSGBUF_TEST_BACKEND").is_ok_and(|b| b == "process");
        Self::start_backend(n, extra, process).await
    }

    /// A set of `mongod` processes whatever the configured backend (fault tests that need
    /// fail points or signals, and the process backend's self-test).
    pub async fn start_process(n: usize, extra: &[&str]) -> ReplicaSet {
        Self::start_backend(n, extra, true).await
    }

    async fn start_backend(n: usize, extra: &[&str], process: bool) -> ReplicaSet {
        let set = format!("rs{}", free_port());
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut members = Vec::new();
        for port in &ports {
            let mut args: Vec<String> = [
                "--replSet",
                &set,
                "--bind_ip",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--wiredTigerCacheSizeGB",
                "0.25",
                "--setParameter",
                "enableTestCommands=1",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            args.extend(extra.iter().map(|s| s.to_string()));
            members.push(if process {
                start_process(args)
            } else {
                start_container(args)
            });
        }
        let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        msgbuf::mongo::init_replica_set(&hosts, &set, Duration::from_secs(60))
            .await
            .expect("replSetInitiate");
        let uri = format!("mongodb://{}/?replicaSet={set}", hosts.join(","));
        let rs = ReplicaSet {
            uri,
            hosts,
            members,
        };
        rs.wait_for_primary().await;
        rs
    }

    pub fn is_external(&self) -> bool {
        self.members.is_empty()
    }

    pub async fn client(&self) -> Client {
        msgbuf::mongo::connect_replica_set(&self.uri, Duration::from_secs(5))
            .await
            .expect("connect")
    }

    /// Index of the current primary.
    pub async fn wait_for_primary(&self) -> usize {
        wait_for("a PRIMARY", Duration::from_secs(60), || async {
            for (i, host) in self.hosts.iter().enumerate() {
                if let Ok(hello) = direct(host)
                    .await
                    .database("admin")
                    .run_command(doc! {"hello": 1})
                    .await
                {
                    if hello.get_bool("isWritablePrimary").unwrap_or(false) {
                        return Some(i);
                    }
                }
            }
            None
        })
        .await
    }

    /// `kill -9` of member `i`.
    pub fn kill(&mut self, i: usize) {
        match &mut self.members[i] {
            Member::Container { container } => {
                let status = Command::new("docker")
                    .args(["kill", "--signal", "KILL", container.id()])
                    .status()
                    .expect("docker kill");
                assert!(status.success());
            }
            Member::Process { child, .. } => {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
    }

    /// Clean stop of member `i`.
    pub fn stop(&mut self, i: usize) {
        match &mut self.members[i] {
            Member::Container { container } => container.stop(),
            Member::Process { child, .. } => {
                if let Some(mut c) = child.take() {
                    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                    let _ = c.wait();
                }
            }
        }
    }

    /// Starts member `i` again with its data, and waits until it answers.
    pub async fn restart(&mut self, i: usize) {
        match &mut self.members[i] {
            Member::Container { container } => container.start(),
            Member::Process { child, args, .. } => {
                *child = Some(spawn_mongod(args));
            }
        }
        let host = self.hosts[i].clone();
        wait_for("the member to answer", Duration::from_secs(60), || async {
            direct(&host)
                .await
                .database("admin")
                .run_command(doc! {"ping": 1})
                .await
                .ok()
        })
        .await;
    }

    /// Steps the primary down and waits for a PRIMARY again; returns the new primary's index.
    pub async fn step_down(&self) -> usize {
        let old = self.wait_for_primary().await;
        // The primary closes connections while stepping down: an error here is expected.
        let _ = direct(&self.hosts[old])
            .await
            .database("admin")
            .run_command(doc! {"replSetStepDown": 30, "secondaryCatchUpPeriodSecs": 10})
            .await;
        self.wait_for_primary().await
    }
}

async fn direct(host: &str) -> Client {
    let mut o =
        mongodb::options::ClientOptions::parse(format!("mongodb://{host}/?directConnection=true"))
            .await
            .expect("options");
    o.server_selection_timeout = Some(Duration::from_millis(1500));
    o.connect_timeout = Some(Duration::from_millis(1500));
    Client::with_options(o).expect("client")
}

fn start_container(mut args: Vec<String>) -> Member {
    let image = std::env::var("MSGBUF_TEST_MONGO_IMAGE").unwrap_or_else(|_| "mongo:7.0".to_owned());
    let (name, tag) = image.rsplit_once(':').unwrap_or((&image, "latest"));
    let generic = GenericImage::new(name, tag)
        .with_wait_for(WaitFor::message_on_stdout("Waiting for connections"));
    // The scratch image's entrypoint is mongod itself; the official image's entrypoint
    // prefixes `mongod` to arguments that start with `--`.
    args.extend(["--dbpath".to_owned(), "/data/db".to_owned()]);
    let runnable = RunnableImage::from((generic, args)).with_network("host");
    Member::Container {
        container: Box::new(docker().run(runnable)),
    }
}

fn spawn_mongod(args: &[String]) -> Child {
    Command::new(mongod_path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("run mongod (scripts/setup-mongod installs it)")
}

fn start_process(mut args: Vec<String>) -> Member {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("db");
    std::fs::create_dir_all(&data).expect("data dir");
    args.extend([
        "--dbpath".to_owned(),
        data.display().to_string(),
        "--logpath".to_owned(),
        dir.path().join("mongod.log").display().to_string(),
    ]);
    let child = spawn_mongod(&args);
    Member::Process {
        child: Some(child),
        args,
        _dir: dir,
    }
}

impl Drop for ReplicaSet {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Member::Process { child: Some(c), .. } = m {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Tokens for tests.
pub fn auth() -> Auth {
    Auth::new(SECRET, None, None)
}

pub fn token(user: &str) -> String {
    auth()
        .mint(user, false, Duration::from_secs(3600))
        .expect("token")
}

pub fn admin_token(user: &str) -> String {
    auth()
        .mint(user, true, Duration::from_secs(3600))
        .expect("token")
}

/// A correctly signed token whose `exp` is an hour ago.
pub fn expired_token(user: &str) -> String {
    let claims = serde_json::json!({"sub": user, "exp": msgbuf::auth::unix_now() - 3600});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode")
}

/// The settings tests start from.
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

/// A minimal HTTP/1.1 client over a TCP stream (status, body).
pub async fn http(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    // Status 0: nothing listens (yet).
    let Ok(mut s) = tokio::net::TcpStream::connect(host).await else {
        return (0, String::new());
    };
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let mut out = Vec::new();
    if s.write_all(req.as_bytes()).await.is_err() || s.read_to_end(&mut out).await.is_err() {
        return (0, String::new());
    }
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

pub async fn http_get(url: &str, token: Option<&str>) -> (u16, String) {
    http("GET", url, token, None).await
}

pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The messages collection of a test database, as plain documents.
pub async fn messages(rs: &ReplicaSet, db: &str) -> mongodb::Collection<Document> {
    rs.client()
        .await
        .database(db)
        .collection(msgbuf::store::MESSAGES)
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
        let child = Command::new(env!("CARGO_BIN_EXE_msgbuf"))
            .arg("serve")
            .env_remove("MSGBUF_MONGODB_URI")
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
        Duration::from_millis(ticks * 10)
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
