//! A connection's replies: a bounded queue that a writer thread of the connection's own sends,
//! each line within a deadline. Whoever sends never blocks; a peer that does not read is
//! dropped.

use super::line_io::write_by;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a connection's replies go. Cheap to clone; `send` never blocks.
#[derive(Clone)]
pub struct Outbox {
    pub(super) queue: SyncSender<String>,
    pub(super) stream: Arc<UnixStream>,
    pub(super) dead: Arc<AtomicBool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("the peer is gone")]
    Gone,
    #[error("the peer does not read its replies: connection dropped")]
    NotReading,
}

impl Outbox {
    /// Queues a line (with its newline) for the peer. A full queue means the peer stopped
    /// reading: the connection is dropped.
    pub fn send(&self, line: String) -> Result<(), SendError> {
        if self.dead.load(Ordering::Relaxed) {
            return Err(SendError::Gone);
        }
        match self.queue.try_send(line) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.kill();
                Err(SendError::NotReading)
            }
            Err(TrySendError::Disconnected(_)) => Err(SendError::Gone),
        }
    }

    pub fn is_open(&self) -> bool {
        !self.dead.load(Ordering::Relaxed)
    }

    /// Ends the connection (both directions) at once.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::Relaxed);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Ends the connection after what is queued went out (or the write deadline passed): no
    /// more lines are taken, and the reader sees the end at once.
    pub fn close(&self) {
        self.dead.store(true, Ordering::Relaxed);
        // An empty line after the queued ones wakes the writer to end at once (a full queue
        // means it is busy writing anyway).
        let _ = self.queue.try_send(String::new());
        let _ = self.stream.shutdown(std::net::Shutdown::Read);
    }
}

/// Writes the queued lines, each within `timeout`, until the connection is closed and its
/// queue empty; then ends the connection.
pub(super) fn writer_thread(
    stream: Arc<UnixStream>,
    lines: Receiver<String>,
    dead: Arc<AtomicBool>,
    timeout: Duration,
) {
    use std::sync::mpsc::RecvTimeoutError;
    loop {
        match lines.recv_timeout(Duration::from_millis(250)) {
            Ok(line) if line.is_empty() => {
                if dead.load(Ordering::Relaxed) {
                    break;
                }
            }
            Ok(line) => {
                if write_by(&stream, line.as_bytes(), Instant::now() + timeout).is_err() {
                    break;
                }
            }
            Err(RecvTimeoutError::Timeout) if dead.load(Ordering::Relaxed) => break,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    dead.store(true, Ordering::Relaxed);
    let _ = stream.shutdown(std::net::Shutdown::Both);
}
