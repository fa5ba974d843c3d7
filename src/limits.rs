//! Rate limits that a client cannot reset by reconnecting: sends are limited per user
//! on this instance (WebSocket and REST together), and each socket has caps on the
//! frames that cost MongoDB work without storing anything (joins, acked ids).

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::Error;

/// `join_chat` per socket: a join costs two queries; a client needs one per connection.
const JOINS_PER_SECOND: u32 = 2;
const JOIN_BURST: u32 = 10;
/// Acknowledged ids per socket: well above what a client acking every message of a fast
/// drain sends, far below what 1,000-id frames in a loop would make MongoDB match.
const ACK_IDS_PER_SECOND: u32 = 20_000;
const ACK_ID_BURST: u32 = 40_000;

fn quota(per_second: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(per_second.max(1)).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(burst)
}

/// Sends per user on this instance (`MSGBUF_RATE_LIMIT` / `MSGBUF_RATE_BURST`).
pub struct SendLimit(DefaultKeyedRateLimiter<String>);

impl SendLimit {
    pub fn new(per_second: u32, burst: u32) -> Self {
        SendLimit(RateLimiter::keyed(quota(per_second, burst)))
    }

    pub fn check(&self, user: &str) -> Result<(), Error> {
        // Allocates the key only to look it up; a send allocates far more than this.
        self.0
            .check_key(&user.to_owned())
            .map_err(|_| Error::rate_limited("too many messages; slow down and retry"))
    }

    /// Forgets users whose budget is full again (called by the sweep), so the map holds
    /// only recent senders.
    pub fn forget_idle(&self) {
        self.0.retain_recent();
    }
}

/// A socket's caps on joins and acknowledged ids.
pub struct SocketLimits {
    joins: DefaultDirectRateLimiter,
    ack_ids: DefaultDirectRateLimiter,
}

impl Default for SocketLimits {
    fn default() -> Self {
        SocketLimits {
            joins: RateLimiter::direct(quota(JOINS_PER_SECOND, JOIN_BURST)),
            ack_ids: RateLimiter::direct(quota(ACK_IDS_PER_SECOND, ACK_ID_BURST)),
        }
    }
}

impl SocketLimits {
    pub fn check_join(&self) -> Result<(), Error> {
        self.joins
            .check()
            .map_err(|_| Error::rate_limited("too many joins on this socket; slow down"))
    }

    pub fn check_acks(&self, n: usize) -> Result<(), Error> {
        let Some(n) = NonZeroU32::new(n.min(u32::MAX as usize) as u32) else {
            return Ok(());
        };
        match self.ack_ids.check_n(n) {
            Ok(Ok(())) => Ok(()),
            _ => Err(Error::rate_limited(
                "too many acknowledged ids; slow down and ack them again",
            )),
        }
    }
}
