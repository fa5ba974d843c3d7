//! Who is online on this instance: user id -> that user's sessions (tabs, devices).
//!
//! Each session owns a bounded outbound queue. Pushing never waits: a full queue means
//! the client stopped reading, so the session is told to close (4001) and its messages
//! stay in MongoDB for its next join. DashMap guards are only held for non-async work.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;

use dashmap::DashMap;
use mongodb::bson::oid::ObjectId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A frame queued for one socket. Frames are serialised once and shared by every socket
/// of the receiver.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A `chat_message`; `id` lets the socket skip one it already sent.
    Chat { id: ObjectId, frame: Utf8Bytes },
    /// Any other frame (`receipt`).
    Frame(Utf8Bytes),
}

/// The handle other tasks use to reach a socket.
#[derive(Clone)]
pub struct SessionHandle {
    pub id: u64,
    tx: mpsc::Sender<Outbound>,
    /// Cancelled when the queue overflowed: the socket task closes with 4001.
    overflow: CancellationToken,
    /// Raised while the session drains its backlog: the sweep leaves it alone then (the
    /// drain delivers what the sweep would, and its held frames are bounded).
    draining: Arc<AtomicBool>,
}

impl SessionHandle {
    /// Queues without waiting; on a full queue, tells the session to close.
    fn push(&self, item: Outbound) -> bool {
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflow.cancel();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

#[derive(Default)]
struct UserEntry {
    /// Open WebSocket connections of the user (joined or not), for the per-user limit.
    connections: usize,
    /// Joined sessions.
    sessions: Vec<SessionHandle>,
}

#[derive(Default)]
pub struct Presence {
    users: DashMap<String, UserEntry>,
    next_id: AtomicU64,
    connections: AtomicUsize,
    online_users: AtomicUsize,
}

/// Per-user connection limit reached.
#[derive(Debug, thiserror::Error)]
#[error("too many connections for this user on this instance (limit {0})")]
pub struct TooManyConnections(pub usize);

impl Presence {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts a new connection of `user`; dropped guard uncounts it (and leaves).
    pub fn connect(
        self: &Arc<Self>,
        user: &str,
        limit: usize,
    ) -> Result<ConnectionGuard, TooManyConnections> {
        let mut entry = self.users.entry(user.to_owned()).or_default();
        if entry.connections >= limit {
            return Err(TooManyConnections(limit));
        }
        entry.connections += 1;
        drop(entry);
        self.connections.fetch_add(1, Ordering::Relaxed);
        Ok(ConnectionGuard {
            presence: self.clone(),
            user: user.to_owned(),
            session: None,
            draining: Arc::default(),
        })
    }

    /// Users with at least one joined session here.
    pub fn online_users(&self) -> usize {
        self.online_users.load(Ordering::Relaxed)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn is_online(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|e| !e.sessions.is_empty())
    }

    /// Users with joined sessions here (for sweeps).
    pub fn joined_users(&self) -> Vec<String> {
        self.users
            .iter()
            .filter(|e| !e.sessions.is_empty())
            .map(|e| e.key().clone())
            .collect()
    }

    /// Queues `item` for every joined session of `user`; returns how many took it.
    pub fn push(&self, user: &str, item: &Outbound) -> usize {
        self.push_where(user, item, |_| true)
    }

    /// Like [`Presence::push`], but not to sessions that are draining their backlog.
    pub fn push_to_settled(&self, user: &str, item: &Outbound) -> usize {
        self.push_where(user, item, |s| !s.draining.load(Ordering::Relaxed))
    }

    fn push_where(
        &self,
        user: &str,
        item: &Outbound,
        to: impl Fn(&SessionHandle) -> bool,
    ) -> usize {
        let Some(entry) = self.users.get(user) else {
            return 0;
        };
        entry
            .sessions
            .iter()
            .filter(|s| to(s) && s.push(item.clone()))
            .count()
    }

    fn leave(&self, user: &str, session: u64) {
        if let Some(mut entry) = self.users.get_mut(user) {
            let before = entry.sessions.len();
            entry.sessions.retain(|s| s.id != session);
            if before > 0 && entry.sessions.is_empty() {
                self.online_users.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn disconnect(&self, user: &str) {
        self.users.remove_if_mut(user, |_, entry| {
            entry.connections = entry.connections.saturating_sub(1);
            entry.connections == 0 && entry.sessions.is_empty()
        });
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One open connection; joins at most one session. Leaves and uncounts on drop.
pub struct ConnectionGuard {
    presence: Arc<Presence>,
    user: String,
    session: Option<u64>,
    draining: Arc<AtomicBool>,
}

impl ConnectionGuard {
    /// Makes this connection one of the user's online sessions, with a queue of `capacity`
    /// whose overflow cancels `overflow`. Joining twice keeps the first session (`None`).
    pub fn join(
        &mut self,
        capacity: usize,
        overflow: CancellationToken,
    ) -> Option<mpsc::Receiver<Outbound>> {
        if self.session.is_some() {
            return None;
        }
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let id = self.presence.next_id.fetch_add(1, Ordering::Relaxed);
        let handle = SessionHandle {
            id,
            tx,
            overflow,
            draining: self.draining.clone(),
        };
        let mut entry = self.presence.users.entry(self.user.clone()).or_default();
        if entry.sessions.is_empty() {
            self.presence.online_users.fetch_add(1, Ordering::Relaxed);
        }
        entry.sessions.push(handle);
        drop(entry);
        self.session = Some(id);
        Some(rx)
    }

    /// Marks the session as draining its backlog (or done with it).
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Some(id) = self.session.take() {
            self.presence.leave(&self.user, id);
        }
        self.presence.disconnect(&self.user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_counts_and_overflow() {
        let p = Arc::new(Presence::new());
        let mut a = p.connect("bob", 2).expect("first");
        let mut b = p.connect("bob", 2).expect("second");
        assert!(p.connect("bob", 2).is_err(), "limit of 2");
        let overflow_a = CancellationToken::new();
        let _qa = a.join(1, overflow_a.clone()).expect("join a");
        let _qb = b.join(4, CancellationToken::new()).expect("join b");
        assert_eq!((p.online_users(), p.connections()), (1, 2));
        let item = Outbound::Frame(Utf8Bytes::from_static("x"));
        assert_eq!(p.push("bob", &item), 2);
        assert_eq!(p.push("bob", &item), 1, "a's queue of 1 is full");
        assert!(overflow_a.is_cancelled());
        drop(a);
        drop(b);
        assert_eq!((p.online_users(), p.connections()), (0, 0));
        assert!(p.users.is_empty(), "no entry left behind");
    }
}
