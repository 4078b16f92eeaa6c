//! The one JSON-lines server and client behind every local socket of the project: the
//! backend's control socket and guest app channel, and the scheduler's API.
//!
//! A peer is untrusted however it got in, so the server bounds what one can cost:
//! - **Lines** are at most `max_line_bytes`; a longer one gets a refusal and the connection ends.
//! - **Idle peers** are dropped: a connection that completes no line within `idle_timeout` is
//!   closed (a byte now and then does not keep it: the deadline is for a whole line, and a
//!   blank line is no line).
//! - **Peers that must prove who they are** (a session that is not yet `authenticated`) have
//!   `hello_within` from their accept to do so, and lines of at most the session's
//!   `max_line_bytes` until they have: a peer that has not said who it is costs a few hundred
//!   bytes and a few seconds, however it behaves.
//! - **Connections** are capped. At the cap, a connection that has said nothing since it
//!   connected, or else the one idle longest, is closed to make room (each after its own
//!   grace time); if none may be, the new one gets a refusal line and is closed at once. The
//!   cap also stays below what the process's descriptor limit allows.
//! - **Replies** go through a bounded outbox written by the connection's own writer thread
//!   with a deadline: whoever replies (a session, or another thread pushing a message such as
//!   a new target) never blocks on a peer; a peer that does not read is dropped.
//! - **Accept errors** (EMFILE at the descriptor limit, among others) are backed off, not
//!   spun on, and logged once per interval with the number suppressed; at EMFILE the longest
//!   idle connection is closed to free descriptors.
//!
//! Threads, not an event loop: sessions call into code that takes locks (the device state),
//! and a connection's blocking there must not hold up the others. The cap bounds the threads
//! (two per connection).

mod client;
mod codec;
mod line_io;
mod outbox;

pub use client::LineClient;
pub use codec::{decode_versioned, json_line, DecodeError, Framing};
use line_io::{read_line_by, LineRead};
use outbox::writer_thread;
pub use outbox::{Outbox, SendError};

use std::io::{self, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What one connection may cost.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_line_bytes: usize,
    /// A connection that completes no line for this long is closed.
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// At the cap, a connection that has sent no line since it was accepted this long ago is
    /// closed first to make room for a new one (a peer that connects and says nothing)...
    pub evict_silent_after: Duration,
    /// ... then one that has sent no line for this long (`Duration::MAX`: never).
    pub evict_idle_after: Duration,
    /// A line not taken by the peer within this is the end of the connection.
    pub write_timeout: Duration,
    /// Lines queued for a peer before it counts as not reading.
    pub outbox_lines: usize,
    /// A session not `authenticated` this long after its accept is closed.
    pub hello_within: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_bytes: 64 * 1024,
            idle_timeout: Duration::from_secs(60),
            max_connections: 64,
            // An honest client sends its line as it connects; one that has said nothing makes
            // room at once, oldest first, so a flood of silent connections only ever evicts
            // itself.
            evict_silent_after: Duration::ZERO,
            evict_idle_after: Duration::from_secs(1),
            write_timeout: Duration::from_secs(5),
            outbox_lines: 64,
            // Sockets whose sessions need no hello (owner-only sockets) never time one out.
            hello_within: Duration::MAX,
        }
    }
}

/// What a session tells the connection after a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Close,
}

/// One connection's handler.
pub trait Session: Send + 'static {
    /// A complete line (without its newline, never empty after trimming).
    fn line(&mut self, line: &str) -> Flow;
    /// The connection ended (peer closed, dropped, evicted or idle).
    fn closed(&mut self) {}
    /// Whether the session streams to the peer without expecting lines (then it is not idle
    /// while it does, and not evicted).
    fn streaming(&self) -> bool {
        false
    }
    /// Whether the peer has shown who it is (an app after its hello). Until then the connection
    /// has `Limits::hello_within` and lines of at most `max_line_bytes`.
    fn authenticated(&self) -> bool {
        true
    }
    /// The longest line the session takes now, if shorter than the server's limit: checked as
    /// the line is read, before anything parses it.
    fn max_line_bytes(&self) -> Option<usize> {
        None
    }
}

/// A protocol served on a socket.
pub trait Service: Send + Sync + 'static {
    type Session: Session;
    /// A new connection; replies go to `outbox`.
    fn open(&self, outbox: Outbox) -> Self::Session;
    /// The line (with its newline) that tells a peer why the server ends its connection.
    fn refusal(&self, reason: &str) -> String;
}

/// A connection as the accept loop sees it (for the cap and eviction).
struct Slot {
    id: u64,
    outbox: Outbox,
    /// Milliseconds since the server started, of the last complete line (or of the accept).
    last_line_ms: Arc<AtomicU64>,
    /// No line completed yet.
    silent: Arc<AtomicBool>,
    streaming: Arc<AtomicBool>,
}

struct Registry {
    slots: Vec<Slot>,
    next_id: u64,
}

/// `text` as a log line may carry it when a peer wrote part of it: control characters (a
/// newline would forge a log entry of its own) escaped, and at most `MAX_LOGGED_CHARS`
/// characters.
pub fn printable(text: &str) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == MAX_LOGGED_CHARS {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The most characters of one logged message (see `printable`).
pub const MAX_LOGGED_CHARS: usize = 400;

/// Logs the first of a kind of event, then at most once per interval with how many were not
/// logged. Messages go through `printable`: they may quote a peer.
pub struct RateLimitedLog {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn new(interval: Duration) -> Self {
        RateLimitedLog {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// Logs `message` unless one was logged within the interval.
    pub fn warn(&mut self, message: impl FnOnce() -> String) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.interval)
        {
            self.suppressed += 1;
            return;
        }
        let msg = printable(&message());
        if self.suppressed > 0 {
            log::warn!("{msg} ({} more like it not logged)", self.suppressed);
        } else {
            log::warn!("{msg}");
        }
        self.suppressed = 0;
        self.last = Some(now);
    }
}

/// The soft limit on open descriptors.
fn descriptor_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

/// The cap that fits the descriptor limit: each connection holds two descriptors (the
/// stream, shared by its writer, and the reader's clone), and the process keeps room for
/// everything else it opens (guest memory regions, eventfds, the state files).
pub fn connection_cap(wanted: usize) -> usize {
    const RESERVED_FDS: u64 = 128;
    let fit = descriptor_limit().saturating_sub(RESERVED_FDS) / 2;
    wanted.min(fit.max(1) as usize)
}

/// A JSON-lines server on one listening socket.
pub struct LineServer<S: Service> {
    name: &'static str,
    service: Arc<S>,
    limits: Limits,
    registry: Arc<Mutex<Registry>>,
    epoch: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<S: Service> LineServer<S> {
    /// `name` appears in log lines ("control", "app channel", "api").
    pub fn new(name: &'static str, service: Arc<S>, mut limits: Limits) -> Self {
        limits.max_connections = connection_cap(limits.max_connections);
        LineServer {
            name,
            service,
            limits,
            registry: Arc::new(Mutex::new(Registry {
                slots: Vec::new(),
                next_id: 0,
            })),
            epoch: Instant::now(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        lock(&self.registry).slots.len()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Closes one connection to make room: the longest silent one (no line yet) silent at
    /// least `silent_after`, or else the one idle longest, idle at least `idle_after`.
    /// Streaming sessions are never closed. Returns whether one was.
    fn evict(&self, silent_after: Duration, idle_after: Duration) -> bool {
        let now = self.now_ms();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let mut reg = lock(&self.registry);
        let victim = reg
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.streaming.load(Ordering::Relaxed))
            .map(|(i, s)| {
                let idle = now.saturating_sub(s.last_line_ms.load(Ordering::Relaxed));
                (i, s.silent.load(Ordering::Relaxed), idle)
            })
            .filter(|&(_, silent, idle)| {
                if silent {
                    idle >= ms(silent_after)
                } else {
                    idle >= ms(idle_after)
                }
            })
            .max_by_key(|&(_, silent, idle)| (silent, idle))
            .map(|(i, _, _)| i);
        let Some(i) = victim else {
            return false;
        };
        let slot = reg.slots.swap_remove(i);
        drop(reg);
        let _ = slot.outbox.send(
            self.service
                .refusal("closed to make room for a new connection"),
        );
        slot.outbox.close();
        true
    }

    /// Accepts and serves connections until the listener is closed.
    pub fn serve(self: Arc<Self>, listener: UnixListener) {
        let mut accept_errors = RateLimitedLog::new(Duration::from_secs(10));
        let mut refusals = RateLimitedLog::new(Duration::from_secs(10));
        let mut backoff = Duration::from_millis(5);
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    backoff = Duration::from_millis(5);
                    if let Err(reason) = self.admit(stream) {
                        refusals.warn(|| format!("{}: connection refused: {reason}", self.name));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    let out_of_fds = matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE)
                            | Some(libc::ENFILE)
                            | Some(libc::ENOBUFS)
                            | Some(libc::ENOMEM)
                    );
                    accept_errors.warn(|| format!("{}: accept: {e}; backing off", self.name));
                    if out_of_fds && self.evict(Duration::ZERO, Duration::ZERO) {
                        continue;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// A second handle of the stream for the reader. At the descriptor limit, idle
    /// connections are closed to free descriptors, a few times at most.
    fn clone_stream(&self, stream: &UnixStream) -> Result<UnixStream, String> {
        let mut tries = 0;
        loop {
            match stream.try_clone() {
                Ok(s) => return Ok(s),
                Err(e) if e.raw_os_error() == Some(libc::EMFILE) && tries < 10 => {
                    tries += 1;
                    self.evict(Duration::ZERO, Duration::ZERO);
                    // Evicted connections' threads close their descriptors as they end.
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    fn admit(self: &Arc<Self>, stream: UnixStream) -> Result<(), String> {
        let full = lock(&self.registry).slots.len() >= self.limits.max_connections;
        if full && !self.evict(self.limits.evict_silent_after, self.limits.evict_idle_after) {
            let reason = format!(
                "too many connections ({} open, all busy); try again later",
                self.limits.max_connections
            );
            let _ = stream.set_nonblocking(true);
            let _ = (&stream).write(self.service.refusal(&reason).as_bytes());
            return Err(reason);
        }
        let reader = self.clone_stream(&stream)?;
        let stream = Arc::new(stream);
        let (queue, lines) = sync_channel(self.limits.outbox_lines);
        let dead = Arc::new(AtomicBool::new(false));
        let outbox = Outbox {
            queue,
            stream: stream.clone(),
            dead: dead.clone(),
        };
        let last_line_ms = Arc::new(AtomicU64::new(self.now_ms()));
        let silent = Arc::new(AtomicBool::new(true));
        let streaming = Arc::new(AtomicBool::new(false));
        let id = {
            let mut reg = lock(&self.registry);
            let id = reg.next_id;
            reg.next_id += 1;
            reg.slots.push(Slot {
                id,
                outbox: outbox.clone(),
                last_line_ms: last_line_ms.clone(),
                silent: silent.clone(),
                streaming: streaming.clone(),
            });
            id
        };
        let timeout = self.limits.write_timeout;
        let writer = std::thread::Builder::new()
            .name(format!("{}-write", self.name))
            .spawn(move || writer_thread(stream, lines, dead, timeout));
        let server = self.clone();
        let session = self.service.open(outbox.clone());
        let conn = Connection {
            outbox: outbox.clone(),
            last_line_ms,
            silent,
            streaming,
        };
        let spawned = writer.and_then(|_| {
            std::thread::Builder::new()
                .name(format!("{}-conn", self.name))
                .spawn(move || {
                    server.read_loop(reader, conn, session);
                    lock(&server.registry).slots.retain(|s| s.id != id);
                })
        });
        if let Err(e) = spawned {
            outbox.kill();
            lock(&self.registry).slots.retain(|s| s.id != id);
            return Err(format!("cannot start a connection thread: {e}"));
        }
        Ok(())
    }

    fn read_loop(&self, stream: UnixStream, conn: Connection, mut session: S::Session) {
        let limits = self.limits;
        let mut reader = BufReader::new(stream);
        let mut buf: Vec<u8> = Vec::new();
        let accepted = Instant::now();
        let hello_deadline = accepted.checked_add(limits.hello_within);
        let mut line_deadline = accepted + limits.idle_timeout;
        let end = loop {
            if !conn.outbox.is_open() {
                break "dropped";
            }
            let streaming = session.streaming();
            conn.streaming.store(streaming, Ordering::Relaxed);
            if streaming {
                line_deadline = Instant::now() + limits.idle_timeout;
            }
            let authenticated = session.authenticated();
            if let Some(hello_by) = hello_deadline.filter(|_| !authenticated) {
                if Instant::now() >= hello_by {
                    let _ = conn.outbox.send(self.service.refusal(&format!(
                        "no hello within {} s: closing",
                        limits.hello_within.as_secs_f64()
                    )));
                    break "no hello";
                }
                line_deadline = line_deadline.min(hello_by);
            }
            let max_line = session
                .max_line_bytes()
                .map_or(limits.max_line_bytes, |m| m.min(limits.max_line_bytes));
            let left = line_deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let _ = conn.outbox.send(self.service.refusal(&format!(
                    "no complete request within {} s: closing",
                    limits.idle_timeout.as_secs()
                )));
                break "idle";
            }
            // Wake at least once a second to see a streaming session end or a drop.
            let wake = line_deadline.min(Instant::now() + Duration::from_secs(1));
            match read_line_by(&mut reader, &mut buf, max_line, wake) {
                Ok(LineRead::TimedOut) => {}
                Ok(LineRead::End) => break "closed",
                Ok(LineRead::TooLong) => {
                    let _ = conn.outbox.send(
                        self.service
                            .refusal(&format!("line longer than {max_line} bytes")),
                    );
                    break "line too long";
                }
                Ok(LineRead::Line) => {
                    let line = std::mem::take(&mut buf);
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim();
                    // A blank line is no line: it neither keeps the connection nor makes it
                    // one that has spoken (which would protect it from eviction).
                    if text.is_empty() {
                        continue;
                    }
                    line_deadline = Instant::now() + limits.idle_timeout;
                    conn.last_line_ms.store(self.now_ms(), Ordering::Relaxed);
                    conn.silent.store(false, Ordering::Relaxed);
                    if session.line(text) == Flow::Close {
                        break "closed by the session";
                    }
                }
                Err(_) => break "read error",
            }
        };
        log::debug!("{}: connection ended ({end})", self.name);
        session.closed();
        // Queued replies (a refusal) still go out; then the writer ends the connection.
        conn.outbox.close();
    }
}

struct Connection {
    outbox: Outbox,
    last_line_ms: Arc<AtomicU64>,
    silent: Arc<AtomicBool>,
    streaming: Arc<AtomicBool>,
}

#[cfg(test)]
mod tests;
