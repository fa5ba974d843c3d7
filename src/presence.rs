//! Who is online on this instance: user id -> that user's sessions (tabs, devices).
//!
//! Each session owns an outbound queue bounded in frames and in bytes. Pushing never
//! waits: a full queue means the client stopped reading, so the session is told to close
//! (4001) and its messages stay in MongoDB for its next join. Each user also has, on this
//! instance, a byte budget shared by that user's sessions ([`UserBudget`]) and one drain
//! turn ([`ConnectionGuard::drain_turn`]), so that many sockets of one user cost about
//! what one does. DashMap guards are only held for non-async work.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;

use dashmap::DashMap;
use mongodb::bson::oid::ObjectId;
use tokio::sync::{mpsc, Semaphore};
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

impl Outbound {
    /// Bytes of the frame, for the queue's byte bound.
    pub fn len(&self) -> usize {
        match self {
            Outbound::Chat { frame, .. } | Outbound::Frame(frame) => frame.len(),
        }
    }
}

/// A frame taken off a session's queue: it still counts against the queue's byte bound
/// (held during a drain, say) until the session takes its frame with [`Queued::take`].
#[derive(Debug)]
pub struct Queued {
    item: Outbound,
    queued: Arc<AtomicUsize>,
}

impl std::borrow::Borrow<Outbound> for Queued {
    fn borrow(&self) -> &Outbound {
        &self.item
    }
}

impl Queued {
    /// The frame, released from the queue's bound (frames are shared, so this is cheap).
    pub fn take(self) -> Outbound {
        self.item.clone()
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.queued.fetch_sub(self.item.len(), Ordering::Relaxed);
    }
}

/// The receiving end of a session's queue.
pub struct LiveQueue {
    rx: mpsc::Receiver<Outbound>,
    queued: Arc<AtomicUsize>,
}

impl LiveQueue {
    pub async fn recv(&mut self) -> Option<Queued> {
        let item = self.rx.recv().await?;
        Some(self.queued(item))
    }

    pub fn try_recv(&mut self) -> Option<Queued> {
        let item = self.rx.try_recv().ok()?;
        Some(self.queued(item))
    }

    fn queued(&self, item: Outbound) -> Queued {
        Queued {
            item,
            queued: self.queued.clone(),
        }
    }
}

/// Bytes waiting to be written to one user's sockets on this instance (their outboxes),
/// shared by that user's sessions: past `max`, the user's sessions stop taking more
/// (drained messages wait in MongoDB, live ones in their bounded queues) until their
/// sockets take what they hold.
#[derive(Debug)]
pub struct UserBudget {
    held: AtomicUsize,
    max: usize,
}

impl UserBudget {
    pub fn new(max: usize) -> Self {
        UserBudget {
            held: AtomicUsize::new(0),
            max,
        }
    }

    pub fn add(&self, bytes: usize) {
        self.held.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn release(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub fn has_room(&self) -> bool {
        self.held.load(Ordering::Relaxed) < self.max
    }
}

/// The bounds of one session's queue and of its user's budget.
#[derive(Debug, Clone, Copy)]
pub struct QueueBounds {
    /// Frames queued per session.
    pub frames: usize,
    /// Bytes queued per session (live frames, and those held during a drain).
    pub bytes: usize,
    /// Bytes waiting in the outboxes of one user's sessions together.
    pub user_bytes: usize,
}

/// The handle other tasks use to reach a socket.
#[derive(Clone)]
pub struct SessionHandle {
    pub id: u64,
    tx: mpsc::Sender<Outbound>,
    /// Bytes queued and not yet taken by the session, and their bound.
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
    /// Cancelled when the queue overflowed: the socket task closes with 4001.
    overflow: CancellationToken,
    /// Raised while the session drains its backlog: the sweep leaves it alone then (the
    /// drain delivers what the sweep would, and its held frames are bounded).
    draining: Arc<AtomicBool>,
    /// Raised once the session joined as a device: it also gets what its user sends from
    /// other sockets (the sent-message sync).
    device: Arc<AtomicBool>,
}

impl SessionHandle {
    /// Queues without waiting; on a full queue (in frames or bytes), tells the session
    /// to close.
    fn push(&self, item: Outbound) -> bool {
        let len = item.len();
        if self.queued.fetch_add(len, Ordering::Relaxed) + len > self.max_bytes {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            self.overflow.cancel();
            return false;
        }
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(e) => {
                self.queued.fetch_sub(len, Ordering::Relaxed);
                if matches!(e, mpsc::error::TrySendError::Full(_)) {
                    self.overflow.cancel();
                }
                false
            }
        }
    }
}

struct UserEntry {
    /// Open WebSocket connections of the user (joined or not), for the per-user limit.
    connections: usize,
    /// Joined sessions.
    sessions: Vec<SessionHandle>,
    /// Shared by the user's connections; made with the entry (the first connection) and
    /// dropped with it (the last one).
    budget: Option<Arc<UserBudget>>,
    drain_turn: Arc<Semaphore>,
}

impl Default for UserEntry {
    fn default() -> Self {
        UserEntry {
            connections: 0,
            sessions: Vec::new(),
            budget: None,
            // One drain at a time per user: a drain's read-ahead (its cursors' batches)
            // is the one cost that the user budget cannot see.
            drain_turn: Arc::new(Semaphore::new(1)),
        }
    }
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
        bounds: QueueBounds,
    ) -> Result<ConnectionGuard, TooManyConnections> {
        let mut entry = self.users.entry(user.to_owned()).or_default();
        if entry.connections >= limit {
            return Err(TooManyConnections(limit));
        }
        entry.connections += 1;
        let budget = entry
            .budget
            .get_or_insert_with(|| Arc::new(UserBudget::new(bounds.user_bytes)))
            .clone();
        let drain_turn = entry.drain_turn.clone();
        drop(entry);
        self.connections.fetch_add(1, Ordering::Relaxed);
        Ok(ConnectionGuard {
            presence: self.clone(),
            user: user.to_owned(),
            session: None,
            draining: Arc::default(),
            device: Arc::default(),
            bounds,
            budget,
            drain_turn,
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

    /// Queues `item` for the joined sessions of `user` that joined as devices.
    pub fn push_to_devices(&self, user: &str, item: &Outbound) -> usize {
        self.push_where(user, item, |s| s.device.load(Ordering::Relaxed))
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
    device: Arc<AtomicBool>,
    bounds: QueueBounds,
    budget: Arc<UserBudget>,
    drain_turn: Arc<Semaphore>,
}

impl ConnectionGuard {
    /// Makes this connection one of the user's online sessions, with a queue whose
    /// overflow cancels `overflow`. Joining twice keeps the first session (`None`).
    pub fn join(&mut self, overflow: CancellationToken) -> Option<LiveQueue> {
        if self.session.is_some() {
            return None;
        }
        let (tx, rx) = mpsc::channel(self.bounds.frames.max(1));
        let queued = Arc::new(AtomicUsize::new(0));
        let id = self.presence.next_id.fetch_add(1, Ordering::Relaxed);
        let handle = SessionHandle {
            id,
            tx,
            queued: queued.clone(),
            max_bytes: self.bounds.bytes,
            overflow,
            draining: self.draining.clone(),
            device: self.device.clone(),
        };
        let mut entry = self.presence.users.entry(self.user.clone()).or_default();
        if entry.sessions.is_empty() {
            self.presence.online_users.fetch_add(1, Ordering::Relaxed);
        }
        entry.sessions.push(handle);
        drop(entry);
        self.session = Some(id);
        Some(LiveQueue { rx, queued })
    }

    /// The byte budget this connection shares with the user's other connections here.
    pub fn budget(&self) -> &Arc<UserBudget> {
        &self.budget
    }

    /// The user's drain turn on this instance: a drain holds its one permit.
    pub fn drain_turn(&self) -> &Arc<Semaphore> {
        &self.drain_turn
    }

    /// Marks the session as one of its user's devices (or not, after a refused join).
    pub fn set_device(&self, device: bool) {
        self.device.store(device, Ordering::Relaxed);
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
        let small = bounds(1, 1024);
        let mut a = p.connect("bob", 2, small).expect("first");
        let mut b = p.connect("bob", 2, bounds(4, 1024)).expect("second");
        assert!(p.connect("bob", 2, small).is_err(), "limit of 2");
        assert!(Arc::ptr_eq(a.budget(), b.budget()), "one budget per user");
        let overflow_a = CancellationToken::new();
        let _qa = a.join(overflow_a.clone()).expect("join a");
        let _qb = b.join(CancellationToken::new()).expect("join b");
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

    fn bounds(frames: usize, bytes: usize) -> QueueBounds {
        QueueBounds {
            frames,
            bytes,
            user_bytes: 1 << 20,
        }
    }

    #[test]
    fn a_queue_is_bounded_in_bytes_until_its_frames_are_taken() {
        let p = Arc::new(Presence::new());
        let mut a = p.connect("bob", 1, bounds(100, 10)).expect("connect");
        let overflow = CancellationToken::new();
        let mut q = a.join(overflow.clone()).expect("join");
        let six = Outbound::Frame(Utf8Bytes::from_static("123456"));
        assert_eq!(p.push("bob", &six), 1);
        let held = q.try_recv().expect("queued");
        assert_eq!(p.push("bob", &six), 0, "a held frame still counts");
        assert!(overflow.is_cancelled());
        drop(held.take());
        let overflow = CancellationToken::new();
        let mut b = p.connect("carol", 1, bounds(100, 10)).expect("connect");
        let _qb = b.join(overflow.clone()).expect("join");
        assert_eq!(p.push("carol", &six), 1);
        assert_eq!(p.push("carol", &six), 0, "12 bytes over a bound of 10");
        assert!(overflow.is_cancelled());
        drop(q);
    }
}
