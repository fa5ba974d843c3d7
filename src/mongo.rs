//! Connecting to MongoDB: the replica-set check, replica-set initiation through the driver
//! (no shell needed), and the managed local `mongod` of the embedded default.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mongodb::bson::{doc, Document};
use mongodb::options::ClientOptions;
use mongodb::Client;

/// Connects and refuses anything that is not a replica set member: change streams need one.
pub async fn connect_replica_set(uri: &str) -> anyhow::Result<Client> {
    let mut options = ClientOptions::parse(uri)
        .await
        .with_context(|| "parsing MSGBUF_MONGODB_URI")?;
    options.app_name = Some("msgbuf".into());
    options
        .server_selection_timeout
        .get_or_insert(Duration::from_secs(15));
    let client = Client::with_options(options)?;
    let hello = client
        .database("admin")
        .run_command(doc! {"hello": 1})
        .await
        .with_context(|| format!("MongoDB at {} did not answer", redact(uri)))?;
    if hello.get_str("setName").is_err() {
        bail!(
            "MongoDB at {} is not a replica set member (its `hello` has no setName). msgbuf needs a replica set: \
             change streams do not exist on a standalone server. Start mongod with --replSet and initiate it \
             (`msgbuf init-replica-set`), or unset MSGBUF_MONGODB_URI to use the embedded default.",
            redact(uri)
        );
    }
    Ok(client)
}

/// The URI without credentials, for messages.
fn redact(uri: &str) -> String {
    match (uri.find("://"), uri.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &uri[..scheme], &uri[at + 1..])
        }
        _ => uri.to_owned(),
    }
}

async fn direct_client(host: &str) -> anyhow::Result<Client> {
    let mut options =
        ClientOptions::parse(format!("mongodb://{host}/?directConnection=true")).await?;
    options.server_selection_timeout = Some(Duration::from_secs(2));
    options.connect_timeout = Some(Duration::from_secs(2));
    Ok(Client::with_options(options)?)
}

/// Initiates a replica set of `members` (`host:port`), idempotently, and waits until it has
/// a PRIMARY. Members that are not up yet are waited for, up to `timeout`.
pub async fn init_replica_set(
    members: &[String],
    set_name: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let first = members.first().context("no members given")?;
    let deadline = Instant::now() + timeout;
    let client = direct_client(first).await?;
    let admin = client.database("admin");
    let config = doc! {
        "_id": set_name,
        "members": members.iter().enumerate().map(|(i, host)| doc! {"_id": i as i32, "host": host}).collect::<Vec<_>>(),
    };
    loop {
        match admin
            .run_command(doc! {"replSetInitiate": config.clone()})
            .await
        {
            Ok(_) => break,
            // AlreadyInitialized
            Err(e) if command_code(&e) == Some(23) => break,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "replSetInitiate not possible yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context("replSetInitiate"),
        }
    }
    wait_for_primary(&admin, deadline).await
}

async fn wait_for_primary(admin: &mongodb::Database, deadline: Instant) -> anyhow::Result<()> {
    loop {
        if let Ok(status) = admin.run_command(doc! {"replSetGetStatus": 1}).await {
            let has_primary = status
                .get_array("members")
                .map(|ms| {
                    ms.iter().any(|m| {
                        m.as_document().and_then(|d| d.get_str("stateStr").ok()) == Some("PRIMARY")
                    })
                })
                .unwrap_or(false);
            if has_primary {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!("the replica set has no PRIMARY yet (timed out)");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `host:port` of the current primary, as the members see it.
pub async fn primary_of(uri: &str) -> anyhow::Result<String> {
    let client = connect_replica_set(uri).await?;
    let hello = client
        .database("admin")
        .run_command(doc! {"hello": 1})
        .await?;
    Ok(hello.get_str("primary").context("no primary")?.to_owned())
}

fn command_code(e: &mongodb::error::Error) -> Option<i32> {
    match e.kind.as_ref() {
        mongodb::error::ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}

/// Finds a `mongod`: `MSGBUF_MONGOD`, then `PATH`, then the project-local install.
pub fn find_mongod(configured: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = configured {
        return p.is_file().then(|| p.to_owned());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("mongod");
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    let local = PathBuf::from(".local/mongodb/fiftyone/db/bin/mongod");
    local.is_file().then_some(local)
}

/// The managed single-node replica set of the embedded default.
pub struct EmbeddedMongod {
    child: tokio::process::Child,
    uri: String,
}

pub const EMBEDDED_SET: &str = "msgbuf";

impl EmbeddedMongod {
    /// Starts `mongod` on 127.0.0.1:`port` with data in `data_dir` (kept across runs),
    /// initiates the set on first use and waits for PRIMARY.
    pub async fn start(mongod: &Path, data_dir: &Path, port: u16) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let log = data_dir.join("mongod.log");
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
        .arg(&log)
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
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", mongod.display()))?;
        let host = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = direct_client(&host).await?;
        let admin = client.database("admin");
        // Wait until it answers (or exits: a data dir locked by another mongod, a bad port).
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("mongod exited ({status}) at start; see {}", log.display());
            }
            if admin.run_command(doc! {"ping": 1}).await.is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                bail!("mongod did not answer on {host}; see {}", log.display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        match admin.run_command(doc! {"replSetGetConfig": 1}).await {
            Ok(reply) => {
                // Initiated before: if the port changed, the member's host must follow.
                let mut config: Document = reply.get_document("config")?.clone();
                let stored = config
                    .get_array("members")
                    .ok()
                    .and_then(|m| m.first())
                    .and_then(|m| m.as_document())
                    .and_then(|m| m.get_str("host").ok())
                    .map(str::to_owned);
                if stored.as_deref() != Some(host.as_str()) {
                    let version = config.get_i32("version").unwrap_or(1);
                    config.insert("version", version + 1);
                    config.insert("members", vec![doc! {"_id": 0, "host": &host}]);
                    admin
                        .run_command(doc! {"replSetReconfig": config, "force": true})
                        .await
                        .context("re-pointing the embedded replica set at the new port")?;
                }
            }
            Err(e) if command_code(&e) == Some(94) => {
                admin
                    .run_command(doc! {"replSetInitiate": {"_id": EMBEDDED_SET, "members": [{"_id": 0, "host": &host}]}})
                    .await
                    .context("replSetInitiate")?;
            }
            Err(e) => return Err(e).context("replSetGetConfig"),
        }
        // PRIMARY in the status is not yet writable (drain mode): wait for `hello` to say so.
        loop {
            let writable = admin
                .run_command(doc! {"hello": 1})
                .await
                .map(|h| h.get_bool("isWritablePrimary").unwrap_or(false))
                .unwrap_or(false);
            if writable {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "the embedded replica set did not become writable; see {}",
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(EmbeddedMongod {
            child,
            uri: format!("mongodb://{host}/?directConnection=true"),
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Clean shutdown through the `shutdown` command; killed if it does not exit in time.
    pub async fn stop(mut self) {
        if let Ok(client) = direct_client(
            self.uri
                .trim_start_matches("mongodb://")
                .trim_end_matches("/?directConnection=true"),
        )
        .await
        {
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
