//! Typed configuration: every setting is a `MSGBUF_*` environment variable with a
//! command-line twin, parsed once at start-up so a bad value fails fast and names its
//! variable (clap reports `--flag` and the help shows `[env: MSGBUF_…]`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Settings of `msgbuf serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    /// MongoDB replica set to use. Unset: start and supervise a local single-node replica
    /// set (the embedded default) from the `mongod` found by `scripts/setup-mongod`.
    #[arg(long, env = "MSGBUF_MONGODB_URI")]
    pub mongodb_uri: Option<String>,

    /// Database holding `buffered_messages` and msgbuf's bookkeeping collections.
    #[arg(long, env = "MSGBUF_DB", default_value = "msgbuf")]
    pub db: String,

    /// HTTP/WebSocket listen address.
    #[arg(long, env = "MSGBUF_BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,

    /// HS256 secret for JWTs. Required unless `--insecure-dev`.
    #[arg(long, env = "MSGBUF_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// When set, tokens must carry this `aud`.
    #[arg(long, env = "MSGBUF_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// When set, tokens must carry this `iss`.
    #[arg(long, env = "MSGBUF_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Identity of this instance, reported in `joined` and stored as `deliveredBy`.
    /// Default: host name + pid. Must be unique among running instances (it also names
    /// the change-stream checkpoint).
    #[arg(long, env = "MSGBUF_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Development mode: a well-known JWT secret when none is set, and `/dev/token`
    /// mints tokens for any name. Never in production.
    #[arg(long, env = "MSGBUF_INSECURE_DEV")]
    pub insecure_dev: bool,

    /// A pushed message not acknowledged within this time is re-sent (`redelivery`).
    #[arg(long, env = "MSGBUF_ACK_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub ack_timeout: Duration,

    /// Delivered messages are kept this long (TTL index on `deliveredAt`).
    #[arg(long, env = "MSGBUF_RETENTION", default_value = "7days", value_parser = parse_duration)]
    pub retention: Duration,

    /// Period of the leased cleanup sweep.
    #[arg(long, env = "MSGBUF_CLEANUP_INTERVAL", default_value = "24h", value_parser = parse_duration)]
    pub cleanup_interval: Duration,

    /// Delay of the first cleanup sweep after start.
    #[arg(long, env = "MSGBUF_CLEANUP_FIRST_RUN", default_value = "30s", value_parser = parse_duration)]
    pub cleanup_first_run: Duration,

    /// When set, undelivered messages older than this are deleted by the cleanup sweep.
    #[arg(long, env = "MSGBUF_UNDELIVERED_MAX_AGE", value_parser = parse_duration)]
    pub undelivered_max_age: Option<Duration>,

    /// Comma-separated list of allowed WebSocket `Origin`s. Unset: any origin.
    #[arg(long, env = "MSGBUF_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Largest WebSocket frame/message accepted; larger closes the socket with 1009.
    #[arg(long, env = "MSGBUF_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub max_frame_bytes: usize,

    /// Outbound queue per socket, in frames. A socket whose queue fills up (a client that
    /// stopped reading) is closed with 4001; its messages stay in MongoDB.
    #[arg(long, env = "MSGBUF_QUEUE_CAPACITY", default_value_t = 1024)]
    pub queue_capacity: usize,

    /// Open WebSocket connections per user on one instance.
    #[arg(long, env = "MSGBUF_MAX_CONNECTIONS_PER_USER", default_value_t = 32)]
    pub max_connections_per_user: usize,

    /// Sustained send rate per user on this instance, WebSocket and REST together
    /// (messages/second).
    #[arg(long, env = "MSGBUF_RATE_LIMIT", default_value_t = 200)]
    pub rate_limit: u32,

    /// Burst allowance on top of the sustained rate.
    #[arg(long, env = "MSGBUF_RATE_BURST", default_value_t = 400)]
    pub rate_burst: u32,

    /// Time a client has to send its HTTP request head (slow-loris protection).
    #[arg(long, env = "MSGBUF_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// A socket whose writes make no progress for this long is closed with 4001 (its
    /// client stopped reading; its messages wait in MongoDB).
    #[arg(long, env = "MSGBUF_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// Upper bound on graceful shutdown.
    #[arg(long, env = "MSGBUF_SHUTDOWN_TIMEOUT", default_value = "8s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// `mongod` binary for the embedded default (else `PATH`, then `.local/mongodb`).
    #[arg(long, env = "MSGBUF_MONGOD")]
    pub mongod: Option<PathBuf>,

    /// Port of the embedded mongod (kept stable: it is part of the replica set config).
    #[arg(long, env = "MSGBUF_EMBEDDED_PORT", default_value_t = 27117)]
    pub embedded_port: u16,

    /// Data directory of the embedded mongod.
    #[arg(long, env = "MSGBUF_DATA_DIR", default_value = "data/mongo")]
    pub data_dir: PathBuf,
}

impl Config {
    /// Settings with every default and the given replica set; the base of tests and tools.
    pub fn with_uri(uri: &str, db: &str) -> Self {
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            config: Config,
        }
        let mut config = <Wrap as clap::Parser>::parse_from(["msgbuf"]).config;
        config.mongodb_uri = Some(uri.to_owned());
        config.db = db.to_owned();
        config
    }

    /// The instance id, defaulting to host name + pid.
    pub fn instance_id(&self) -> String {
        self.instance_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "msgbuf".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// Durations are written like `30s`, `250ms`, `7days`, `24h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{e} (write durations like 30s, 5m, 24h, 7days)"))
}
