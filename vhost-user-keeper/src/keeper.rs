//! The keeper: the frontend (QEMU, cloud-hypervisor) connects to the keeper's socket, the
//! backend to a second one, and the keeper passes messages between them. When the backend
//! process dies, the frontend's connection stays open (nothing on the frontend's side notices);
//! the next backend to connect is told everything the frontend told the old one (the journal),
//! with each started ring resuming where the guest's used ring says the old backend stopped,
//! and then a kick and an interrupt on every ring make both sides look at their rings again.
//!
//! The main channel is strictly request and reply, so the keeper handles one request at a
//! time: a request that was on its way when the backend died is sent again to the next one.
//!
//! Resuming at the used index is right for devices that complete requests in order, or that
//! may see a request again: the balloon (an inflate or deflate repeated is harmless; the
//! statistics buffer is taken again). Devices that need in-flight tracking are not served.

use crate::journal::Journal;
use crate::message::{self, expects_reply, request, Message, MessageError};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by SIGTERM or SIGINT: the loop ends and the sockets are removed.
static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    TERMINATE.store(true, Ordering::SeqCst);
}

/// SIGTERM and SIGINT end `Keeper::run` cleanly. No SA_RESTART: a blocking poll or accept
/// returns EINTR so the loop sees the flag.
fn handle_termination() -> io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: sigaction with a handler that only stores to an atomic.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_terminate as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("poll: {0}")]
    Poll(io::Error),
    #[error("signal setup: {0}")]
    Signals(io::Error),
    #[error("accepting on {what}: {source}")]
    Accept {
        what: &'static str,
        source: io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
enum PeerError {
    #[error("the backend went away: {0}")]
    Backend(String),
    #[error("the frontend went away: {0}")]
    Frontend(String),
}

/// Totals, logged and used by the tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeeperCounters {
    pub backends_attached: u64,
    pub replays: u64,
    pub requests_forwarded: u64,
    pub requests_resent: u64,
}

pub struct Keeper {
    frontend_listener: UnixListener,
    backend_listener: UnixListener,
    frontend: Option<UnixStream>,
    backend: Option<UnixStream>,
    journal: Journal,
    pub counters: KeeperCounters,
}

/// Binds a Unix socket, replacing a stale one, readable and writable by the owner only.
fn bind(path: &Path) -> Result<UnixListener, KeeperError> {
    let err = |source| KeeperError::Listen {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Waits for any of `fds` to be readable (or hung up); returns their revents.
fn poll(fds: &[Option<BorrowedFd<'_>>]) -> Result<Vec<i16>, KeeperError> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.map_or(-1, |f| f.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: poll on an array we own; negative fds are ignored by the kernel.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if n >= 0 {
            return Ok(pfds.iter().map(|p| p.revents).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(KeeperError::Poll(e));
        }
        if TERMINATE.load(Ordering::SeqCst) {
            return Ok(vec![0; pfds.len()]);
        }
    }
}

/// Reads the used index of ring `index` from guest memory: where the old backend stopped.
fn used_index(journal: &Journal, index: u32) -> Option<u16> {
    let used = journal.used_ring_addr(index)?;
    // struct vring_used { le16 flags; le16 idx; ... }
    let at = used.checked_add(2)?;
    let regions = journal.regions();
    let (region, offset) = regions
        .iter()
        .find_map(|r| r.file_offset(at, 2).map(|o| (r, o)))?;
    let mut idx = [0u8; 2];
    // SAFETY: pread into a 2-byte buffer we own.
    let n = unsafe {
        libc::pread(
            region.fd.as_raw_fd(),
            idx.as_mut_ptr().cast(),
            2,
            i64::try_from(offset).ok()?,
        )
    };
    (n == 2).then(|| u16::from_le_bytes(idx))
}

/// Writes 1 to an eventfd (a kick or an interrupt).
fn nudge(fd: BorrowedFd<'_>) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: an 8-byte write from a buffer we own.
    let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
}

impl Keeper {
    /// Listens for the frontend on `frontend_socket` and for backends on `backend_socket`.
    pub fn bind(frontend_socket: &Path, backend_socket: &Path) -> Result<Self, KeeperError> {
        Ok(Keeper {
            frontend_listener: bind(frontend_socket)?,
            backend_listener: bind(backend_socket)?,
            frontend: None,
            backend: None,
            journal: Journal::default(),
            counters: KeeperCounters::default(),
        })
    }

    /// Serves until SIGTERM or SIGINT (`Ok`) or an error on the keeper's own sockets.
    pub fn run(&mut self) -> Result<(), KeeperError> {
        handle_termination().map_err(KeeperError::Signals)?;
        while !TERMINATE.load(Ordering::SeqCst) {
            self.step()?;
        }
        log::info!("signal: shutting down");
        Ok(())
    }

    /// Waits for one event and handles it.
    pub fn step(&mut self) -> Result<(), KeeperError> {
        let revents = poll(&[
            Some(self.backend_listener.as_fd_borrowed()),
            self.frontend
                .is_none()
                .then(|| self.frontend_listener.as_fd_borrowed()),
            self.frontend.as_ref().map(|s| s.as_fd_borrowed()),
            self.backend.as_ref().map(|s| s.as_fd_borrowed()),
        ])?;
        // A backend that went away first, so that a new one can take its place at once.
        if revents[3] != 0 {
            self.check_backend();
        }
        if revents[0] != 0 {
            let (stream, _) =
                self.backend_listener
                    .accept()
                    .map_err(|source| KeeperError::Accept {
                        what: "the backend socket",
                        source,
                    })?;
            if self.backend.is_some() {
                log::warn!("a second backend connected while one is attached: refused");
            } else {
                self.attach_backend(stream);
            }
        }
        if revents[1] != 0 {
            let (stream, _) =
                self.frontend_listener
                    .accept()
                    .map_err(|source| KeeperError::Accept {
                        what: "the frontend socket",
                        source,
                    })?;
            log::info!("frontend connected");
            self.frontend = Some(stream);
        }
        if revents[2] != 0 {
            self.frontend_request();
        }
        Ok(())
    }

    /// The attached backend's socket is readable: it closed (or sent something unasked).
    fn check_backend(&mut self) {
        let Some(backend) = self.backend.as_ref() else {
            return;
        };
        match message::recv(backend) {
            Ok(Some(m)) => log::warn!(
                "the backend sent request {} without being asked: dropped",
                m.request
            ),
            Ok(None) => self.backend_gone("it closed the connection"),
            Err(e) => self.backend_gone(&e.to_string()),
        }
    }

    fn backend_gone(&mut self, why: &str) {
        if self.backend.take().is_some() {
            log::warn!(
                "backend gone ({why}); the frontend's connection stays open until a backend connects again"
            );
        }
    }

    /// Tells a new backend what the frontend told the old one, then nudges every ring.
    fn attach_backend(&mut self, stream: UnixStream) {
        self.counters.backends_attached += 1;
        if self.journal.entries().is_empty() {
            log::info!("backend connected");
            self.backend = Some(stream);
            return;
        }
        match self.replay(&stream) {
            Ok(count) => {
                self.counters.replays += 1;
                log::info!("backend connected: replayed {count} messages of the frontend's");
                for fd in self.journal.ring_eventfds() {
                    nudge(fd);
                }
                self.backend = Some(stream);
            }
            Err(e) => log::warn!("replay to the new backend failed ({e}); waiting for another"),
        }
    }

    fn replay(&self, stream: &UnixStream) -> Result<usize, MessageError> {
        let mut protocol_features = 0;
        for entry in self.journal.entries() {
            let mut m = entry.try_clone()?;
            if m.request == request::SET_VRING_BASE {
                if let (Some(ring), Some(used)) = (
                    m.u32_at(0),
                    m.u32_at(0).and_then(|r| used_index(&self.journal, r)),
                ) {
                    log::info!(
                        "ring {ring} resumes at {used} (the frontend started it at {})",
                        m.u32_at(4).unwrap_or(0)
                    );
                    m.payload[4..8].copy_from_slice(&u32::from(used).to_le_bytes());
                }
            }
            message::send(stream, &m)?;
            if expects_reply(&m, protocol_features) && message::recv(stream)?.is_none() {
                return Err(MessageError::Truncated);
            }
            if m.request == request::SET_PROTOCOL_FEATURES {
                protocol_features = m.u64_at(0).unwrap_or(0);
            }
        }
        Ok(self.journal.entries().len())
    }

    /// Blocks until a backend is attached.
    fn wait_for_backend(&mut self) -> Result<(), PeerError> {
        while self.backend.is_none() {
            match self.backend_listener.accept() {
                Ok((stream, _)) => self.attach_backend(stream),
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        && !TERMINATE.load(Ordering::SeqCst) => {}
                Err(e) => return Err(PeerError::Backend(format!("accepting: {e}"))),
            }
        }
        Ok(())
    }

    /// Reads a request from the frontend and carries it to the backend (and its reply back).
    fn frontend_request(&mut self) {
        let Some(frontend) = self.frontend.as_ref() else {
            return;
        };
        let msg = match message::recv(frontend) {
            Ok(Some(m)) => m,
            Ok(None) => return self.frontend_gone("it closed the connection"),
            Err(e) => return self.frontend_gone(&e.to_string()),
        };
        match self.forward(&msg) {
            Ok(()) => {
                self.counters.requests_forwarded += 1;
                self.journal.record(msg);
            }
            Err(PeerError::Frontend(e)) => self.frontend_gone(&e),
            Err(PeerError::Backend(e)) => {
                log::error!("{e}");
                self.frontend_gone("no backend to serve it");
            }
        }
    }

    fn forward(&mut self, msg: &Message) -> Result<(), PeerError> {
        let mut attempt = 0;
        loop {
            self.wait_for_backend()?;
            if attempt > 0 {
                self.counters.requests_resent += 1;
                log::info!("request {} sent again to the new backend", msg.request);
            }
            attempt += 1;
            let Some(backend) = self.backend.as_ref() else {
                continue;
            };
            if let Err(e) = message::send(backend, msg) {
                self.backend_gone(&e.to_string());
                continue;
            }
            if !expects_reply(msg, self.journal.protocol_features()) {
                return Ok(());
            }
            let reply = match message::recv(backend) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    self.backend_gone("it closed the connection before replying");
                    continue;
                }
                Err(e) => {
                    self.backend_gone(&e.to_string());
                    continue;
                }
            };
            let frontend = self
                .frontend
                .as_ref()
                .ok_or_else(|| PeerError::Frontend("gone".into()))?;
            return message::send(frontend, &reply).map_err(|e| PeerError::Frontend(e.to_string()));
        }
    }

    /// The frontend closed: forget its device state and let the backend reset too.
    fn frontend_gone(&mut self, why: &str) {
        log::info!("frontend disconnected ({why}); the backend connection is closed so it resets");
        self.frontend = None;
        self.backend = None;
        self.journal.clear();
    }
}

/// `as_fd` under a name that does not clash with the listener's own traits in scope.
trait AsFdBorrowed {
    fn as_fd_borrowed(&self) -> BorrowedFd<'_>;
}

impl<T: std::os::fd::AsFd> AsFdBorrowed for T {
    fn as_fd_borrowed(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
}
