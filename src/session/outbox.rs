//! Frames on their way to one socket, written while the session goes on reading.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::Sink;

use super::Out;

/// Frames the session queues before it stops taking more (drained messages, live pushes
/// and replies wait where they are: in the cursor, the presence queue, the in-flight set).
const MAX_FRAMES: usize = 256;
const MAX_BYTES: usize = 1 << 20;

/// The session's write side: a bounded queue and the state of the sink it feeds.
#[derive(Default)]
pub struct Outbox {
    frames: VecDeque<Out>,
    bytes: usize,
    /// Frames were handed to the sink since its last flush.
    unflushed: bool,
    /// The sink took a frame or finished a flush since [`Outbox::take_progress`] last looked.
    progressed: bool,
}

impl Outbox {
    pub fn push(&mut self, out: Out) {
        self.bytes += out.len();
        self.frames.push_back(out);
    }

    /// Whether the session may queue more.
    pub fn has_room(&self) -> bool {
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
