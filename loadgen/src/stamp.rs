//! The one clock of a run and the message text that carries it.
//!
//! Every message's text starts `t=<µs>;p=<pair>;n=<seq>;`: its (scheduled) send time in
//! microseconds since this process started, so send → receive is measured on one
//! monotonic clock (senders and receivers live in this process).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static EPOCH: OnceLock<Instant> = OnceLock::new();

pub fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// Microseconds since this process started (monotonic).
pub fn now_us() -> u64 {
    epoch().elapsed().as_micros() as u64
}

pub fn instant_of(us: u64) -> tokio::time::Instant {
    tokio::time::Instant::from_std(epoch() + Duration::from_micros(us))
}

pub fn body(t_us: u64, pair: usize, seq: u64, size: usize) -> String {
    let mut s = format!("t={t_us};p={pair};n={seq};");
    if s.len() < size {
        s.extend(std::iter::repeat_n('x', size - s.len()));
    }
    s
}

/// (t, pair, seq) from a message text written by [`body`].
pub fn parse_body(s: &str) -> Option<(u64, usize, u64)> {
    let mut it = s.split(';');
    let t = it.next()?.strip_prefix("t=")?.parse().ok()?;
    let p = it.next()?.strip_prefix("p=")?.parse().ok()?;
    let n = it.next()?.strip_prefix("n=")?.parse().ok()?;
    Some((t, p, n))
}

pub async fn sleep_until_us(due: Option<u64>) {
    if let Some(us) = due {
        tokio::time::sleep_until(instant_of(us)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_carries_time_pair_and_sequence_at_the_asked_size() {
        let text = body(123_456, 7, 89, 100);
        assert_eq!(text.len(), 100);
        assert_eq!(parse_body(&text), Some((123_456, 7, 89)));
        assert_eq!(parse_body("hello"), None);
    }
}
