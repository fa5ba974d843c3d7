//! Connecting to MongoDB: the replica-set check, replica-set initiation through the driver
//! (no shell needed), and the managed local `mongod` of the embedded default ([`embedded`]).

mod embedded;

pub use embedded::{EmbeddedMongod, Supervisor, EMBEDDED_SET};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mongodb::bson::doc;
use mongodb::options::ClientOptions;
use mongodb::Client;

/// Connects and refuses anything that is not a replica set member: change streams need one.
///
/// `timeout` (`MSGBUF_MONGODB_TIMEOUT`) bounds how long an operation waits for a usable
/// server. The driver has no socket timeout: a frozen server is noticed by its monitor only
/// (a check that times out interrupts the operations in flight), so the monitor checks
/// every second and gives up after half of `timeout` — a send then answers `unavailable`
/// within about 1 s + timeout/2 + timeout. The URI's `heartbeatFrequencyMS` and
/// `connectTimeoutMS` win over these.
pub async fn connect_replica_set(uri: &str, timeout: Duration) -> anyhow::Result<Client> {
    let mut options = ClientOptions::parse(uri)
        .await
        .with_context(|| format!("parsing MSGBUF_MONGODB_URI {}", redact(uri)))?;
    options.app_name = Some("msgbuf".into());
    options.server_selection_timeout = Some(timeout);
    options
        .connect_timeout
        .get_or_insert((timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(10)));
    options.heartbeat_freq.get_or_insert(Duration::from_secs(1));
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

pub(crate) async fn direct_client(host: &str) -> anyhow::Result<Client> {
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
pub async fn primary_of(uri: &str, timeout: Duration) -> anyhow::Result<String> {
    let client = connect_replica_set(uri, timeout).await?;
    let hello = client
        .database("admin")
        .run_command(doc! {"hello": 1})
        .await?;
    Ok(hello.get_str("primary").context("no primary")?.to_owned())
}

pub(crate) fn command_code(e: &mongodb::error::Error) -> Option<i32> {
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
