//! The `msgbuf` binary: loads configuration, sets up tracing, runs a subcommand.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use msgbuf::client::{ClientError, WsClient};
use msgbuf::mongo::{self, EmbeddedMongod};
use msgbuf::Auth;
use msgbuf::Server;
use msgbuf::{parse_duration, Config};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "msgbuf",
    version,
    about = "Real-time chat delivery with a MongoDB-backed offline buffer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve(Box<Config>),
    /// Print a JWT for USER signed with MSGBUF_JWT_SECRET.
    Token {
        user: String,
        #[arg(long)]
        admin: bool,
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
        #[arg(long, env = "MSGBUF_JWT_SECRET", hide_env_values = true)]
        secret: String,
        #[arg(long, env = "MSGBUF_JWT_AUDIENCE")]
        audience: Option<String>,
        #[arg(long, env = "MSGBUF_JWT_ISSUER")]
        issuer: Option<String>,
    },
    /// Initiate a replica set through the driver (idempotent) and wait for a PRIMARY.
    InitReplicaSet {
        /// Comma-separated host:port list; the first is contacted.
        #[arg(long, value_delimiter = ',', required = true)]
        members: Vec<String>,
        #[arg(long, default_value = "rs0")]
        set_name: String,
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Print host:port of the replica set's primary.
    MongoPrimary {
        #[arg(long, env = "MSGBUF_MONGODB_URI")]
        uri: String,
        #[arg(long, env = "MSGBUF_MONGODB_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Exit 0 when the URL answers HTTP 200 (container health checks).
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
    },
    /// Send COUNT messages through one instance to a user joined on another; exit 0 when all arrived.
    Smoke {
        #[arg(long)]
        sender_url: String,
        #[arg(long)]
        receiver_url: String,
        #[arg(long, env = "MSGBUF_JWT_SECRET", hide_env_values = true)]
        secret: String,
        #[arg(long, default_value_t = 5)]
        count: usize,
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MSGBUF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,mongodb=warn"));
    let json = std::env::var("MSGBUF_LOG_FORMAT").is_ok_and(|f| f == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Change events, BSON and JSON frames make for many small short-lived allocations on
/// every message; mimalloc serves them with less CPU than glibc's allocator (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Serve(config) => serve(*config).await,
        Command::Token {
            user,
            admin,
            ttl,
            secret,
            audience,
            issuer,
        } => {
            println!(
                "{}",
                Auth::new(&secret, audience, issuer).mint(&user, admin, ttl)?
            );
            Ok(())
        }
        Command::InitReplicaSet {
            members,
            set_name,
            timeout,
        } => {
            mongo::init_replica_set(&members, &set_name, timeout).await?;
            println!("replica set {set_name} has a PRIMARY");
            Ok(())
        }
        Command::MongoPrimary { uri, timeout } => {
            println!("{}", mongo::primary_of(&uri, timeout).await?);
            Ok(())
        }
        Command::Healthcheck { url } => healthcheck(&url),
        Command::Smoke {
            sender_url,
            receiver_url,
            secret,
            count,
            timeout,
        } => smoke(&sender_url, &receiver_url, &secret, count, timeout).await,
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let (uri, supervisor) = match &config.mongodb_uri {
        Some(uri) => (uri.clone(), None),
        None => {
            let managed = start_embedded(&config).await?;
            (managed.uri(), Some(managed.supervise(shutdown.clone())))
        }
    };
    let result = async {
        let client = mongo::connect_replica_set(&uri, config.mongodb_timeout).await?;
        let server = Server::start(config, client, shutdown.clone()).await?;
        let signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received");
            signal.cancel();
        });
        server.run().await
    }
    .await;
    // mongod stops after the service: the final checkpoint still needs it.
    let supervised = match supervisor {
        Some(supervisor) => supervisor.stop().await,
        None => Ok(()),
    };
    // A supervisor that gave up is why the service stopped: report that first.
    supervised.and(result)
}

async fn start_embedded(config: &Config) -> anyhow::Result<EmbeddedMongod> {
    let Some(mongod) = mongo::find_mongod(config.mongod.as_deref()) else {
        bail!(
            "no MSGBUF_MONGODB_URI and no mongod found (MSGBUF_MONGOD, PATH, .local/mongodb): \
             run scripts/setup-mongod, or point MSGBUF_MONGODB_URI at a replica set"
        );
    };
    let managed = EmbeddedMongod::start(&mongod, &config.data_dir, config.embedded_port).await?;
    tracing::info!(
        mongod = %mongod.display(),
        pid = managed.pid(),
        data = %config.data_dir.display(),
        uri = %managed.uri(),
        "no MSGBUF_MONGODB_URI: running a managed single-node replica set"
    );
    Ok(managed)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A plain HTTP/1.0 GET; enough for a health check and needs no client library in the image.
fn healthcheck(url: &str) -> anyhow::Result<()> {
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream =
        std::net::TcpStream::connect(host).with_context(|| format!("connecting {host}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut response = String::new();
    stream.take(4096).read_to_string(&mut response)?;
    if response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        bail!(
            "unhealthy: {}",
            response.lines().next().unwrap_or("no answer")
        )
    }
}

async fn smoke(
    sender_url: &str,
    receiver_url: &str,
    secret: &str,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let auth = Auth::new(secret, None, None);
    // Unique per run (a container's pid is always the same): fresh users and clientMsgIds.
    let run = mongodb::bson::oid::ObjectId::new().to_hex();
    let (alice, bob) = (format!("smoke-alice-{run}"), format!("smoke-bob-{run}"));
    let ttl = Duration::from_secs(600);
    let deadline = tokio::time::Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    let mut rx = WsClient::connect(receiver_url, &auth.mint(&bob, false, ttl)?).await?;
    let joined = rx.join(left()).await?;
    let mut tx = WsClient::connect(sender_url, &auth.mint(&alice, false, ttl)?).await?;
    let mut accepted = HashSet::new();
    for i in 0..count {
        // Retry with the same clientMsgId until accepted (an election may be under way).
        loop {
            tx.chat(
                &bob,
                "smoke",
                &format!("smoke message {i}"),
                Some(&format!("smoke-{run}-{i}")),
            )
            .await?;
            let ev = tx.next_event(left()).await?;
            match ev.event.as_str() {
                "message_accepted" => {
                    accepted.insert(ev.data["id"].as_str().unwrap_or_default().to_owned());
                    break;
                }
                "error" if ev.data["code"] == "unavailable" => {
                    tokio::time::sleep(Duration::from_millis(250)).await
                }
                _ => bail!("unexpected answer to a send: {} {}", ev.event, ev.data),
            }
        }
    }
    let mut received = HashSet::new();
    while received.len() < accepted.len() {
        match rx.expect("chat_message", left()).await {
            Ok(ev) => {
                let id = ev.data["id"].as_str().unwrap_or_default().to_owned();
                rx.ack(std::slice::from_ref(&id)).await?;
                received.insert(id);
            }
            Err(ClientError::Timeout(_)) => break,
            Err(e) => return Err(e.into()),
        }
    }
    let missing = accepted.difference(&received).count();
    println!(
        "smoke: receiver on instance {} got {}/{} messages sent through {sender_url}",
        joined["instance"],
        received.len(),
        accepted.len()
    );
    if missing > 0 {
        bail!("{missing} accepted messages did not arrive");
    }
    tx.close().await;
    rx.close().await;
    Ok(())
}
