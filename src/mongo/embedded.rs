//! The managed single-node replica set of the embedded default: started on its own port
//! and data directory, then supervised — an exit is logged at once and the child reaped,
//! it is restarted with bounded backoff on the same data, and repeated failures stop the
//! service with the tail of mongod's log.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mongodb::bson::{doc, Document};
use mongodb::Database;
use tokio::process::Child;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{command_code, direct_client};

pub const EMBEDDED_SET: &str = "msgbuf";

/// How long one start (spawn → writable PRIMARY) may take.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// This many failures (exits or failed restarts) within [`FAILURE_WINDOW`] stop the service.
const MAX_FAILURES: usize = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(120);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Lines of mongod's log quoted when giving up.
const LOG_TAIL_LINES: usize = 15;

/// A running `mongod` this process started, on 127.0.0.1:`port` with data in `data_dir`.
pub struct EmbeddedMongod {
    mongod: PathBuf,
    data_dir: PathBuf,
    port: u16,
    child: Child,
}

impl EmbeddedMongod {
    /// Starts `mongod` with data in `data_dir` (kept across runs), initiates the set on first
    /// use and waits until it is a writable PRIMARY. Refuses a port that is already taken:
    /// whatever answers there is not ours.
    pub async fn start(mongod: &Path, data_dir: &Path, port: u16) -> anyhow::Result<Self> {
        let log = prepare_data_dir(data_dir)?;
        ensure_port_free(port)?;
        let mut child = spawn(mongod, data_dir, &log, port)?;
        let deadline = Instant::now() + START_TIMEOUT;
        if let Err(e) = bring_up(&mut child, port, &log, deadline).await {
            // Never leave it half-started or unreaped.
            let _ = child.kill().await;
            return Err(e);
        }
        Ok(EmbeddedMongod {
            mongod: mongod.to_owned(),
            data_dir: data_dir.to_owned(),
            port,
            child,
        })
    }

    pub fn uri(&self) -> String {
        uri_of(self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    fn log_path(&self) -> PathBuf {
        self.data_dir.join("mongod.log")
    }

    /// Hands the child to a background supervisor. A fatal failure cancels `shutdown` (the
    /// service stops) and is reported by [`Supervisor::stop`].
    pub fn supervise(self, shutdown: CancellationToken) -> Supervisor {
        let stop = CancellationToken::new();
        let task = tokio::spawn(self.supervision(shutdown, stop.clone()));
        Supervisor { stop, task }
    }

    async fn supervision(
        mut self,
        shutdown: CancellationToken,
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut failures: VecDeque<Instant> = VecDeque::new();
        loop {
            let status = tokio::select! {
                _ = stop.cancelled() => {
                    self.stop_child().await;
                    return Ok(());
                }
                status = self.child.wait() => status,
            };
            // wait() reaped it: no zombie, whatever comes next.
            let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
            tracing::error!(%status, log = %self.log_path().display(), "managed mongod exited");
            if shutdown.is_cancelled() {
                // The service is stopping anyway; nothing to restart for.
                stop.cancelled().await;
                return Ok(());
            }
            loop {
                let now = Instant::now();
                failures.push_back(now);
                while failures
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > FAILURE_WINDOW)
                {
                    failures.pop_front();
                }
                if failures.len() >= MAX_FAILURES {
                    shutdown.cancel();
                    bail!(
                        "the managed mongod failed {} times within {}s; giving up. Last lines of {}:\n{}",
                        failures.len(),
                        FAILURE_WINDOW.as_secs(),
                        self.log_path().display(),
                        log_tail(&self.log_path(), LOG_TAIL_LINES)
                    );
                }
                let backoff = FIRST_BACKOFF
                    .saturating_mul(1 << (failures.len() - 1).min(8))
                    .min(MAX_BACKOFF);
                tracing::warn!(
                    ?backoff,
                    attempt = failures.len(),
                    "restarting the managed mongod"
                );
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                let restarted = tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    r = EmbeddedMongod::start(&self.mongod, &self.data_dir, self.port) => r,
                };
                match restarted {
                    Ok(fresh) => {
                        tracing::info!(pid = fresh.pid(), "managed mongod restarted");
                        self = fresh;
                        break;
                    }
                    Err(e) => tracing::error!(error = %e, "restarting the managed mongod failed"),
                }
            }
        }
    }

    /// Clean shutdown through the `shutdown` command; killed if it does not exit in time.
    async fn stop_child(&mut self) {
        if let Ok(client) = direct_client(&host_of(self.port)).await {
            // The server closes the connection while answering; the error is expected.
            let _ = client
                .database("admin")
                .run_command(doc! {"shutdown": 1})
                .await;
        }
        match tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await {
            Ok(_) => tracing::info!("managed mongod stopped"),
            Err(_) => {
                tracing::warn!("managed mongod did not stop in time; killing it");
                let _ = self.child.kill().await;
            }
        }
    }
}

/// The supervisor task of a managed mongod.
pub struct Supervisor {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Supervisor {
    /// Stops mongod (call it once the service is done with MongoDB) and returns the
    /// supervisor's verdict: an error if it gave up on mongod.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await.context("the mongod supervisor panicked")?
    }
}

fn host_of(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

fn uri_of(port: u16) -> String {
    format!("mongodb://{}/?directConnection=true", host_of(port))
}

/// Creates the data directory; returns the log file's path.
fn prepare_data_dir(data_dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {} (MSGBUF_DATA_DIR)", data_dir.display()))?;
    Ok(data_dir.join("mongod.log"))
}

/// Whoever holds the port (another msgbuf's mongod, any server) is not ours to use.
fn ensure_port_free(port: u16) -> anyhow::Result<()> {
    match std::net::TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Ok(()),
        Err(e) => bail!(
            "port 127.0.0.1:{port} of the embedded mongod is already in use ({e}): another msgbuf or \
             mongod runs there; set MSGBUF_EMBEDDED_PORT to a free port (or stop the other one)"
        ),
    }
}

fn spawn(mongod: &Path, data_dir: &Path, log: &Path, port: u16) -> anyhow::Result<Child> {
    let mut cmd = tokio::process::Command::new(mongod);
    cmd.args([
        "--replSet",
        EMBEDDED_SET,
        "--bind_ip",
        "127.0.0.1",
        "--port",
        &port.to_string(),
    ])
    .arg("--dbpath")
    .arg(data_dir)
    .arg("--logpath")
    .arg(log)
    .args(["--logappend", "--wiredTigerCacheSizeGB", "0.5"])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .kill_on_drop(true);
    // If msgbuf dies without shutting down, the kernel stops mongod too: no orphan.
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting {}", mongod.display()))
}

/// From a spawned child to a writable PRIMARY that is provably that child.
async fn bring_up(
    child: &mut Child,
    port: u16,
    log: &Path,
    deadline: Instant,
) -> anyhow::Result<()> {
    let host = host_of(port);
    let admin = direct_client(&host).await?.database("admin");
    wait_until_answering(child, &admin, &host, log, deadline).await?;
    ensure_initiated(&admin, &host).await?;
    wait_until_writable(child, &admin, log, deadline).await
}

/// Waits until mongod answers on `host` — as the child's own process: a server that answers
/// with another pid took the port first, and our child is about to exit.
async fn wait_until_answering(
    child: &mut Child,
    admin: &Database,
    host: &str,
    log: &Path,
    deadline: Instant,
) -> anyhow::Result<()> {
    let ours = child.id().map(i64::from);
    loop {
        exited_at_start(child, log)?;
        if let Ok(status) = admin.run_command(doc! {"serverStatus": 1}).await {
            let pid = status.get_i64("pid").ok();
            if pid == ours {
                return Ok(());
            }
            bail!(
                "another mongod (pid {}) answers on {host}, not the one msgbuf started; set \
                 MSGBUF_EMBEDDED_PORT to a free port",
                pid.map_or("?".to_owned(), |p| p.to_string())
            );
        }
        if Instant::now() >= deadline {
            bail!("mongod did not answer on {host}; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A start-up exit: another mongod holds the data directory, the port was taken, bad flags.
fn exited_at_start(child: &mut Child, log: &Path) -> anyhow::Result<()> {
    if let Some(status) = child.try_wait()? {
        bail!(
            "mongod exited at start ({status}). Last lines of {}:\n{}",
            log.display(),
            log_tail(log, LOG_TAIL_LINES)
        );
    }
    Ok(())
}

/// Initiates the set on first use; on later runs re-points the member at the port if the
/// port changed (it is part of the stored config).
async fn ensure_initiated(admin: &Database, host: &str) -> anyhow::Result<()> {
    match admin.run_command(doc! {"replSetGetConfig": 1}).await {
        Ok(reply) => {
            let mut config: Document = reply.get_document("config")?.clone();
            let stored = config
                .get_array("members")
                .ok()
                .and_then(|m| m.first())
                .and_then(|m| m.as_document())
                .and_then(|m| m.get_str("host").ok())
                .map(str::to_owned);
            if stored.as_deref() != Some(host) {
                let version = config.get_i32("version").unwrap_or(1);
                config.insert("version", version + 1);
                config.insert("members", vec![doc! {"_id": 0, "host": host}]);
                admin
                    .run_command(doc! {"replSetReconfig": config, "force": true})
                    .await
                    .context("re-pointing the embedded replica set at the new port")?;
            }
            Ok(())
        }
        // NotYetInitialized
        Err(e) if command_code(&e) == Some(94) => {
            admin
                .run_command(doc! {"replSetInitiate": {"_id": EMBEDDED_SET, "members": [{"_id": 0, "host": host}]}})
                .await
                .context("replSetInitiate")?;
            Ok(())
        }
        Err(e) => Err(e).context("replSetGetConfig"),
    }
}

/// PRIMARY in the status is not yet writable (drain mode): waits for `hello` to say so.
async fn wait_until_writable(
    child: &mut Child,
    admin: &Database,
    log: &Path,
    deadline: Instant,
) -> anyhow::Result<()> {
    loop {
        exited_at_start(child, log)?;
        let writable = admin
            .run_command(doc! {"hello": 1})
            .await
            .map(|h| h.get_bool("isWritablePrimary").unwrap_or(false))
            .unwrap_or(false);
        if writable {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the embedded replica set did not become writable; see {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last `n` lines of mongod's log (JSON lines), for a message that explains a failure.
fn log_tail(log: &Path, n: usize) -> String {
    match std::fs::read_to_string(log) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read it: {e})"),
    }
}
