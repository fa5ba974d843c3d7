//! Connecting users: tokens, the WebSocket handshake, joining, run ids.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use futures::StreamExt;
use msgbuf::client::{ClientConfig, Proto, WsClient};
use msgbuf::parse_duration;
use msgbuf::protocol::ServerFrame;
use msgbuf::Auth;

use crate::frames::{self, classify, code_name, Incoming};

#[derive(Args, Clone)]
pub struct Common {
    /// Comma-separated WebSocket URLs of the instances (ws://127.0.0.1:PORT/ws).
    #[arg(long, value_delimiter = ',', required = true)]
    pub urls: Vec<String>,
    /// Wire protocol: `v1` (the URLs as given) or `socketio` (Socket.IO v5 over a raw
    /// WebSocket on each instance's /socket.io/, token in the namespace CONNECT; a URL on
    /// another path is taken for its host and port).
    #[arg(long, default_value = "v1")]
    pub proto: Proto,
    /// HS256 secret the instances verify tokens with.
    #[arg(long, env = "MSGBUF_JWT_SECRET", hide_env_values = true)]
    pub secret: String,
    /// Write the result as one JSON object to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Prefix of user names (default: lg-<pid>-<unix seconds>), so runs do not mix.
    #[arg(long)]
    pub run_id: Option<String>,
    /// After sending stops: how long to wait for outstanding replies and deliveries.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub grace: Duration,
    /// Bytes of each message text (the timestamp header is padded up to this).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Receivers send an `ack` at least this often (batched ids); 0 (the default) acks each
    /// message as soon as it is read, as an interactive client would (the server batches).
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub ack_interval: Duration,
    /// Diagnostics only: receivers never ack (no ack writes, no receipts; messages are
    /// re-sent after the server's ack timeout).
    #[arg(long)]
    pub no_ack: bool,
    /// Devices per receiving user (latency, throughput): N ≥ 1 sockets, each joined as its
    /// own device (`deviceId` d0, d1, …, spread over the URLs), so every message reaches
    /// every device; 0 (the default): one socket without a device.
    #[arg(long, default_value_t = 0)]
    pub devices: usize,
    /// Diagnostics (with `--devices N`): the N sockets per receiver join without a
    /// `deviceId` (each still gets every live push and acks it), to tell the cost of the
    /// fan-out from that of the devices' bookkeeping.
    #[arg(long)]
    pub plain_sockets: bool,
}

impl Common {
    /// Receiver sockets per receiving user.
    pub fn sockets(&self) -> usize {
        self.devices.max(1)
    }

    /// The `deviceId` receiver socket `k` of a user joins as, if any.
    pub fn device_id(&self, k: usize) -> Option<String> {
        (self.devices >= 1 && !self.plain_sockets).then(|| format!("d{k}"))
    }
}

pub struct Connector {
    auth: Auth,
    proto: Proto,
}

impl Connector {
    pub fn new(common: &Common) -> Self {
        Connector {
            auth: Auth::new(&common.secret, None, None),
            proto: common.proto,
        }
    }

    /// A token for `user` (minted here with the instances' secret), TCP (bound to
    /// `source` when given), the WebSocket handshake and for Socket.IO the namespace
    /// connect, on `url`'s endpoint for the protocol.
    pub async fn connect(
        &self,
        url: &str,
        user: &str,
        source: Option<IpAddr>,
        read_buffer: usize,
    ) -> anyhow::Result<WsClient> {
        let token = self.auth.mint(user, false, Duration::from_secs(4 * 3600))?;
        let config = ClientConfig {
            proto: self.proto,
            read_buffer,
            local_addr: source,
            ..ClientConfig::default()
        };
        Ok(WsClient::connect_with(&self.proto.endpoint(url), &token, &config).await?)
    }

    /// Connects and joins; returns the socket and the `joined` data's `pending`.
    pub async fn connect_joined(
        &self,
        url: &str,
        user: &str,
        source: Option<IpAddr>,
        read_buffer: usize,
        timeout: Duration,
        device: Option<&str>,
    ) -> anyhow::Result<(WsClient, u64)> {
        let fut = async {
            let mut ws = self.connect(url, user, source, read_buffer).await?;
            let pending = join(&mut ws, device).await?;
            Ok::<_, anyhow::Error>((ws, pending))
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| anyhow::anyhow!("connect+join timed out after {timeout:?}"))?
    }
}

/// Sends `join_chat` and waits for `joined` (its `pending`); an `error` fails it.
pub async fn join(ws: &mut WsClient, device: Option<&str>) -> anyhow::Result<u64> {
    let frame = match device {
        Some(device) => frames::join_device(device)?,
        None => frames::join(),
    };
    ws.send_frame(&frame).await?;
    loop {
        match classify(ws.recv().await) {
            Incoming::Frame(ServerFrame::Joined(j)) => return Ok(j.pending),
            Incoming::Frame(ServerFrame::Error(e)) => {
                bail!("join refused: {} {}", code_name(&e.code), e.message)
            }
            Incoming::Frame(_) | Incoming::Other => continue,
            Incoming::Closed(why) => bail!("closed before joined: {why}"),
        }
    }
}

/// Connects and joins many users at once (bounded concurrency), in input order.
pub async fn connect_all(
    connector: &Arc<Connector>,
    targets: Vec<(String, String)>,
    read_buffer: usize,
) -> anyhow::Result<Vec<WsClient>> {
    let targets = targets
        .into_iter()
        .map(|(u, user)| (u, user, None))
        .collect();
    connect_all_as(connector, targets, read_buffer).await
}

/// [`connect_all`], each socket joined as the device given beside it (if any).
pub async fn connect_all_as(
    connector: &Arc<Connector>,
    targets: Vec<(String, String, Option<String>)>,
    read_buffer: usize,
) -> anyhow::Result<Vec<WsClient>> {
    let results: Vec<anyhow::Result<WsClient>> = futures::stream::iter(targets)
        .map(|(url, user, device)| {
            let c = connector.clone();
            async move {
                let timeout = Duration::from_secs(30);
                c.connect_joined(&url, &user, None, read_buffer, timeout, device.as_deref())
                    .await
                    .map(|(ws, _)| ws)
                    .with_context(|| format!("{user} on {url}"))
            }
        })
        .buffered(64)
        .collect()
        .await;
    results.into_iter().collect()
}

pub fn run_id(common: &Common) -> String {
    common.run_id.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("lg{}-{}", std::process::id(), secs % 1_000_000)
    })
}
