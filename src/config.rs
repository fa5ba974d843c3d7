//! Typed configuration: every setting is a `MSGBUF_*` environment variable with a
//! command-line twin, parsed once at start-up so a bad value fails fast and names its
//! variable (clap reports `--flag` and the help shows `[env: MSGBUF_…]`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::auth::{Auth, KeyError, INSECURE_DEV_SECRET};

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

    /// HS256 secret for JWTs. Required unless `--insecure-dev` or a public key is given.
    #[arg(long, env = "MSGBUF_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM public key of the identity provider that signs tokens (RSA → RS256, EC P-256 →
    /// ES256, Ed25519 → EdDSA), instead of `MSGBUF_JWT_SECRET`.
    #[arg(long, env = "MSGBUF_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

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

    /// How long after a send arrives its message may still commit; a device's catch-up
    /// floor stays this far behind the present (docs/PROTOCOL.md, "Devices"). A new device
    /// also gets the user's messages of this window before its first join.
    #[arg(long, env = "MSGBUF_DEVICE_SKEW", default_value = "30s", value_parser = parse_duration)]
    pub device_skew: Duration,

    /// Devices per user (a join with a new `deviceId` past it is refused).
    #[arg(long, env = "MSGBUF_MAX_DEVICES", default_value_t = 32)]
    pub max_devices: usize,

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

    /// Outbound queue per socket, in bytes (live frames, and those held while the socket
    /// drains its backlog); past it, as past `MSGBUF_QUEUE_CAPACITY`, the socket is closed
    /// with 4001.
    #[arg(long, env = "MSGBUF_QUEUE_BYTES", default_value_t = 4 << 20)]
    pub queue_bytes: usize,

    /// Bytes waiting to be written to one user's sockets on this instance, all of them
    /// together; past it, that user's sockets take nothing more (drained messages wait in
    /// MongoDB) until they write what they hold.
    #[arg(long, env = "MSGBUF_USER_BUFFER_BYTES", default_value_t = 8 << 20)]
    pub user_buffer_bytes: usize,

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
    /// How long a MongoDB operation waits for a usable server (the driver's server
    /// selection timeout): a frozen or unreachable MongoDB answers `unavailable` after this.
    #[arg(long, env = "MSGBUF_MONGODB_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub mongodb_timeout: Duration,

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
    /// Settings with every default and the given replica set, ignoring the environment (a
    /// developer's `MSGBUF_*` variables must not change what a test runs); the base of tests.
    pub fn with_uri(uri: &str, db: &str) -> Self {
        use clap::{CommandFactory, FromArgMatches};
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            config: Config,
        }
        let command = Wrap::command().mut_args(|arg| arg.env(None::<&str>));
        let matches = command
            .try_get_matches_from(["msgbuf"])
            .expect("every setting has a default");
        let mut config = Wrap::from_arg_matches(&matches)
            .expect("defaults parse")
            .config;
        config.mongodb_uri = Some(uri.to_owned());
        config.db = db.to_owned();
        config
    }

    /// What the device rules take from the settings.
    pub fn device_policy(&self) -> crate::store::DevicePolicy {
        crate::store::DevicePolicy {
            skew: self.device_skew,
            retention: self.retention,
            max_per_user: self.max_devices,
        }
    }

    /// The token verifier: the public key, the secret, or (dev mode only) the public
    /// development secret.
    pub fn verifier(&self) -> Result<Auth, ConfigError> {
        let (audience, issuer) = (self.jwt_audience.clone(), self.jwt_issuer.clone());
        let secret = self.jwt_secret.as_deref().filter(|s| !s.is_empty());
        match (&self.jwt_public_key_file, secret) {
            (Some(_), Some(_)) => Err(ConfigError::SecretAndPublicKey),
            (Some(_), None) if self.insecure_dev => Err(ConfigError::InsecureDevAndPublicKey),
            (Some(file), None) => {
                let path = file.display().to_string();
                let pem = std::fs::read(file).map_err(|source| ConfigError::KeyFile {
                    path: path.clone(),
                    source,
                })?;
                let auth = Auth::from_public_key_pem(&pem, audience, issuer)
                    .map_err(|source| ConfigError::BadKey { path, source })?;
                tracing::info!(algorithm = ?auth.algorithm(), key = %file.display(), "verifying tokens with a public key");
                Ok(auth)
            }
            (None, Some(secret)) => Ok(Auth::new(secret, audience, issuer)),
            (None, None) if self.insecure_dev => {
                tracing::warn!("--insecure-dev: using the public development JWT secret and enabling /dev/token; never use this in production");
                Ok(Auth::new(INSECURE_DEV_SECRET, audience, issuer))
            }
            (None, None) => Err(ConfigError::NoKey),
        }
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

/// A setting that parses but cannot be used; each names its variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "MSGBUF_JWT_SECRET and MSGBUF_JWT_PUBLIC_KEY_FILE are both set: tokens are verified with \
         exactly one key; unset one of them"
    )]
    SecretAndPublicKey,
    #[error(
        "--insecure-dev (MSGBUF_INSECURE_DEV) mints tokens with the public development secret and \
         cannot be combined with MSGBUF_JWT_PUBLIC_KEY_FILE"
    )]
    InsecureDevAndPublicKey,
    #[error(
        "MSGBUF_JWT_SECRET is not set: set it (e.g. `export MSGBUF_JWT_SECRET=$(openssl rand -hex 32)`), \
         or MSGBUF_JWT_PUBLIC_KEY_FILE to your identity provider's PEM public key, or pass \
         --insecure-dev for local development"
    )]
    NoKey,
    #[error("MSGBUF_JWT_PUBLIC_KEY_FILE={path}: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
    #[error("MSGBUF_JWT_PUBLIC_KEY_FILE={path}: {source}")]
    BadKey { path: String, source: KeyError },
}

/// Durations are written like `30s`, `250ms`, `7days`, `24h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{e} (write durations like 30s, 5m, 24h, 7days)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::with_uri("mongodb://127.0.0.1:1/", "t")
    }

    #[test]
    fn test_settings_ignore_the_environment() {
        // No other test reads this variable; the value would fail to parse if it were read.
        std::env::set_var("MSGBUF_CLEANUP_FIRST_RUN", "not a duration");
        let c = config();
        std::env::remove_var("MSGBUF_CLEANUP_FIRST_RUN");
        assert_eq!(c.cleanup_first_run, Duration::from_secs(30));
        assert_eq!(c.mongodb_timeout, Duration::from_secs(5));
    }

    #[test]
    fn the_verifier_is_the_secret_or_the_public_key_never_both() {
        let key = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/jwt/ec-public.pem"
        );
        let mut c = config();
        assert!(matches!(c.verifier(), Err(ConfigError::NoKey)));
        c.jwt_secret = Some("s3cret".into());
        assert_eq!(
            c.verifier().expect("secret").algorithm(),
            jsonwebtoken::Algorithm::HS256
        );
        c.jwt_public_key_file = Some(key.into());
        let both = c.verifier().err().expect("both set is refused");
        assert!(matches!(both, ConfigError::SecretAndPublicKey));
        assert!(both
            .to_string()
            .contains("MSGBUF_JWT_SECRET and MSGBUF_JWT_PUBLIC_KEY_FILE"));
        c.jwt_secret = None;
        assert_eq!(
            c.verifier().expect("public key").algorithm(),
            jsonwebtoken::Algorithm::ES256
        );
        c.insecure_dev = true;
        assert!(matches!(
            c.verifier(),
            Err(ConfigError::InsecureDevAndPublicKey)
        ));
        c.jwt_public_key_file = Some("/nonexistent/key.pem".into());
        c.insecure_dev = false;
        let missing = c.verifier().err().expect("unreadable file");
        assert!(missing
            .to_string()
            .starts_with("MSGBUF_JWT_PUBLIC_KEY_FILE=/nonexistent/key.pem"));
        c.jwt_public_key_file = None;
        c.insecure_dev = true;
        assert!(
            c.verifier().is_ok(),
            "dev mode: the public development secret"
        );
    }
}
