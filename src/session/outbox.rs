//! Frames on their way to one socket, written while the session goes on reading.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures::Sink;

use super::Out;
use crate::presence::UserBudget;

/// Frames the session queues before it stops taking more (drained messages, live pushes
/// and replies wait where they are: in the cursor, the presence queue, the in-flight set).
const MAX_FRAMES: usize = 256;
const MAX_BYTES: usize = 1 << 20;

/// The session's write side: a bounded queue and the state of the sink it feeds.
pub struct Outbox {
    frames: VecDeque<Out>,
    bytes: usize,
    /// What the user's outboxes hold together (this one's `bytes` included).
    budget: Arc<UserBudget>,
    /// Frames were handed to the sink since its last flush.
    unflushed: bool,
    /// The sink took a frame or finished a flush since [`Outbox::take_progress`] last looked.
    progressed: bool,
}

impl Outbox {
    pub fn new(budget: Arc<UserBudget>) -> Self {
        Outbox {
            frames: VecDeque::new(),
            bytes: 0,
            budget,
            unflushed: false,
            progressed: false,
        }
    }

    pub fn push(&mut self, out: Out) {
        self.bytes += out.len();
        self.budget.add(out.len());
        self.frames.push_back(out);
    }

    /// Whether the session may queue more.
    pub fn has_room(&self) -> bool {
        self.has_own_room() && self.budget.has_room()
    }

    /// Whether only the user's budget holds the session back: other sockets of the user
    /// must write first, and nothing here says when they have.
    pub fn waits_for_user(&self) -> bool {
        self.has_own_room() && !self.budget.has_room()
    }

    fn has_own_room(&self) -> bool {
        self.frames.len() < MAX_FRAMES && self.bytes < MAX_BYTES
    }

    /// Whether the sink moved since the last call (and forgets it).
    pub fn take_progress(&mut self) -> bool {
        std::mem::take(&mut self.progressed)
    }

    pub fn has_work(&self) -> bool {
        !self.frames.is_empty() || self.unflushed
    }

    /// Writes queued frames into `sink` and flushes it; `Err` once the socket is gone.
    ///
    /// Cancel-safe: a frame leaves the queue only when the sink has taken it, so the
    /// session can race this against its reads and drop it whenever a read wins.
    pub async fn pump<S: Sink<Out> + Unpin>(&mut self, sink: &mut S) -> Result<(), ()> {
        std::future::poll_fn(|cx| self.poll_pump(Pin::new(&mut *sink), cx)).await
    }

    fn poll_pump<S: Sink<Out>>(
        &mut self,
        mut sink: Pin<&mut S>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), ()>> {
        while !self.frames.is_empty() {
            ready!(sink.as_mut().poll_ready(cx)).map_err(|_| ())?;
            if let Some(out) = self.frames.pop_front() {
                self.bytes -= out.len();
                self.budget.release(out.len());
                sink.as_mut().start_send(out).map_err(|_| ())?;
                self.unflushed = true;
                self.progressed = true;
            }
        }
        ready!(sink.poll_flush(cx)).map_err(|_| ())?;
        self.unflushed = false;
        self.progressed = true;
        Poll::Ready(Ok(()))
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(bytes: usize) -> Out {
        Out::Frame("x".repeat(bytes).into())
    }

    #[test]
    fn a_users_outboxes_share_one_byte_budget_until_they_are_written_or_dropped() {
        let budget = Arc::new(UserBudget::new(1000));
        let mut a = Outbox::new(budget.clone());
        let b = Outbox::new(budget.clone());
        a.push(frame(600));
        assert!(a.has_room() && b.has_room());
        a.push(frame(600));
        assert!(!b.has_room(), "1200 bytes held for the user");
        assert!(b.waits_for_user(), "b itself holds nothing");
        assert!(!a.has_room());
        drop(a);
        assert!(b.has_room(), "a dropped socket gives its bytes back");
    }
}
