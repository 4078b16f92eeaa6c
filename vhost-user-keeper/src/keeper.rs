//! The keeper: the frontend (QEMU, cloud-hypervisor) connects to the keeper's socket, the
//! backend to a second one, and the keeper passes messages between them. When the backend
//! process dies, the frontend's connection stays open (nothing on the frontend's side notices);
//! the next backend to connect is told everything the frontend told the old one (the journal),
//! with each started ring resuming where the guest's used ring says the old backend stopped,
//! and then a kick and an interrupt on every ring make both sides look at their rings again.
//!
//! The main channel is strictly request and reply, so the keeper handles one request at a
//! time: a request that was on its way when the backend died is sent again to the next one.
//! With REPLY_ACK negotiated the keeper asks for an acknowledgement of every message (and
//! passes it on only when the frontend asked), so only what the backend accepted is kept, and
//! a replay is checked message by message: the new backend must accept what the old one did
//! and answer the questions the same way.
//!
//! Resuming at the used index is right for devices that complete requests in order, or that
//! may see a request again: the balloon (an inflate or deflate repeated is harmless; the
//! statistics buffer is taken again). Devices that need in-flight tracking are not served.
//!
//! The backend request channel (SET_BACKEND_REQ_FD) is handed to each new backend as it is: a
//! backend that died in the middle of writing a message there would leave the frontend a torn
//! one (our balloon writes 12-byte messages in one call and never waits for replies there).

use crate::config_space::{Answer, ConfigSpace};
use crate::journal::Journal;
use crate::message::{
    self, can_be_acked, expects_reply, features_after, has_inherent_reply, is_reply_to, request,
    Message, MessageError, FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION_1, PROTOCOL_FEATURES_KEPT,
    VIRTIO_F_RING_PACKED,
};
use balloon_protocol::socket::{Access, SocketPath};
use rustix::event::{PollFd, PollFlags};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a backend may take to answer before it counts as gone.
const BACKEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How many backends one request may be sent to before it is given up.
const MAX_ATTEMPTS: u32 = 3;

/// SIGTERM and SIGINT end `Keeper::run` cleanly, wherever it waits: signal-hook sets
/// `terminate` and then writes to a socket pair whose read end every wait polls. Returns that
/// read end.
fn handle_termination(terminate: &Arc<AtomicBool>) -> io::Result<OwnedFd> {
    let (read, write) = UnixStream::pair()?;
    read.set_nonblocking(true)?;
    write.set_nonblocking(true)?;
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, terminate.clone())?;
        signal_hook::low_level::pipe::register(sig, write.try_clone()?)?;
    }
    Ok(read.into())
}

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("{0}")]
    Bind(balloon_protocol::socket::BindError),
    #[error("poll: {0}")]
    Poll(io::Error),
    #[error("signal setup: {0}")]
    Signals(io::Error),
}

/// Why a request could not be carried.
#[derive(Debug, thiserror::Error)]
enum CarryError {
    #[error("the frontend went away: {0}")]
    Frontend(String),
    #[error("no backend took it in {MAX_ATTEMPTS} attempts")]
    GaveUp,
    #[error("shutting down")]
    Terminated,
}

/// What the backend made of a request.
enum Outcome {
    /// Accepted; the reply's payload if the request asked for something.
    Accepted(Option<Vec<u8>>),
    /// Refused (a non-zero acknowledgement).
    Refused(u64),
}

#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error("{0}")]
    Message(#[from] MessageError),
    #[error("request {0}: the reply does not answer it")]
    BadReply(u32),
    #[error("request {0} refused")]
    Refused(u32),
    #[error("request {0} answered differently than by the previous backend")]
    Different(u32),
}

pub struct Keeper {
    frontend_listener: UnixListener,
    backend_listener: UnixListener,
    /// The two socket paths, removed at shutdown while they are still ours.
    sockets: [SocketPath; 2],
    frontend: Option<UnixStream>,
    backend: Option<UnixStream>,
    journal: Journal,
    /// The config space as last seen, for reads while no backend is attached.
    config: ConfigSpace,
    /// Whether a read during this outage was answered with bytes never seen (logged once).
    warned_unknown_config: bool,
    wake: Option<OwnedFd>,
    /// Set by SIGTERM or SIGINT: the loop ends and the sockets are removed.
    terminate: Arc<AtomicBool>,
}

/// Binds a Unix socket as every daemon of the project does (balloon_protocol::socket: never
/// over a file or a live socket, owner only from the start).
fn bind(path: &Path) -> Result<(UnixListener, SocketPath), KeeperError> {
    balloon_protocol::socket::bind(path, Access::OWNER_ONLY).map_err(KeeperError::Bind)
}

const HANGUP: PollFlags = PollFlags::HUP.union(PollFlags::ERR).union(PollFlags::RDHUP);

/// Waits for any of `fds` (with its events) to be ready; returns their revents (empty for an
/// absent one).
fn poll(fds: &[(Option<BorrowedFd<'_>>, PollFlags)]) -> Result<Vec<PollFlags>, KeeperError> {
    let present: Vec<usize> = (0..fds.len()).filter(|&i| fds[i].0.is_some()).collect();
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .filter_map(|(fd, events)| fd.map(|fd| PollFd::from_borrowed_fd(fd, *events)))
        .collect();
    loop {
        match rustix::event::poll(&mut pfds, None) {
            Ok(_) => {
                let mut revents = vec![PollFlags::empty(); fds.len()];
                for (&i, p) in present.iter().zip(&pfds) {
                    revents[i] = p.revents();
                }
                return Ok(revents);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(KeeperError::Poll(e.into())),
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
    let n = rustix::io::pread(region.fd.as_fd(), &mut idx, offset).ok()?;
    (n == 2).then(|| u16::from_le_bytes(idx))
}

/// Writes 1 to an eventfd (a kick or an interrupt).
fn nudge(fd: BorrowedFd<'_>) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

/// Hides from the frontend what the journal cannot replay (see PROTOCOL_FEATURES_KEPT).
fn filter_reply(msg: &Message, reply: &mut Message) {
    let mask = match msg.request {
        request::GET_FEATURES => !VIRTIO_F_RING_PACKED,
        request::GET_PROTOCOL_FEATURES => PROTOCOL_FEATURES_KEPT,
        _ => return,
    };
    if let (Some(v), Some(bytes)) = (reply.u64_at(0), reply.payload.get_mut(0..8)) {
        bytes.copy_from_slice(&(v & mask).to_le_bytes());
    }
}

fn set_timeouts(stream: &UnixStream) -> io::Result<()> {
    stream.set_read_timeout(Some(BACKEND_TIMEOUT))?;
    stream.set_write_timeout(Some(BACKEND_TIMEOUT))
}

impl Keeper {
    /// Listens for the frontend on `frontend_socket` and for backends on `backend_socket`.
    pub fn bind(frontend_socket: &Path, backend_socket: &Path) -> Result<Self, KeeperError> {
        let (frontend_listener, frontend_path) = bind(frontend_socket)?;
        let (backend_listener, backend_path) = bind(backend_socket)?;
        Ok(Keeper {
            frontend_listener,
            backend_listener,
            sockets: [frontend_path, backend_path],
            frontend: None,
            backend: None,
            journal: Journal::default(),
            config: ConfigSpace::default(),
            warned_unknown_config: false,
            wake: None,
            terminate: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Removes the keeper's socket paths (those still its own).
    pub fn remove_sockets(&self) {
        for s in &self.sockets {
            s.remove();
        }
    }

    /// Serves until SIGTERM or SIGINT (`Ok`) or an error on the keeper's own sockets.
    pub fn run(&mut self) -> Result<(), KeeperError> {
        self.wake = Some(handle_termination(&self.terminate).map_err(KeeperError::Signals)?);
        while !self.terminate.load(Ordering::SeqCst) {
            self.step()?;
        }
        log::info!("signal: shutting down");
        Ok(())
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        self.wake.as_ref().map(|w| w.as_fd())
    }

    /// Waits for one event and handles it.
    pub fn step(&mut self) -> Result<(), KeeperError> {
        let revents = poll(&[
            (Some(self.backend_listener.as_fd()), PollFlags::IN),
            (
                self.frontend
                    .is_none()
                    .then(|| self.frontend_listener.as_fd()),
                PollFlags::IN,
            ),
            (self.frontend.as_ref().map(|s| s.as_fd()), PollFlags::IN),
            (self.backend.as_ref().map(|s| s.as_fd()), PollFlags::IN),
            (self.wake_fd(), PollFlags::IN),
        ])?;
        if self.terminate.load(Ordering::SeqCst) {
            return Ok(());
        }
        // A backend that went away first, so that a new one can take its place at once.
        if !revents[3].is_empty() {
            self.check_backend();
        }
        if !revents[0].is_empty() {
            self.accept_backend();
        }
        if !revents[1].is_empty() {
            match self.frontend_listener.accept() {
                Ok((stream, _)) => {
                    log::info!("frontend connected");
                    self.frontend = Some(stream);
                }
                Err(e) => log::warn!("accepting a frontend: {e}"),
            }
        }
        if !revents[2].is_empty() {
            self.frontend_request();
        }
        Ok(())
    }

    fn accept_backend(&mut self) {
        match self.backend_listener.accept() {
            Ok((stream, _)) if self.backend.is_some() => {
                drop(stream);
                log::warn!("a second backend connected while one is attached: refused");
            }
            Ok((stream, _)) => self.attach_backend(stream),
            Err(e) => log::warn!("accepting a backend: {e}"),
        }
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
        if let Err(e) = set_timeouts(&stream) {
            log::warn!("backend socket: {e}; refused");
            return;
        }
        if self.journal.entries().is_empty() {
            log::info!("backend connected");
            self.backend = Some(stream);
            return;
        }
        match self.replay(&stream) {
            Ok(count) => {
                log::info!("backend connected: replayed {count} messages of the frontend's");
                self.warned_unknown_config = false;
                for fd in self.journal.ring_eventfds() {
                    nudge(fd);
                }
                self.backend = Some(stream);
            }
            Err(e) => log::error!("replay to the new backend failed ({e}); waiting for another"),
        }
    }

    fn replay(&self, stream: &UnixStream) -> Result<usize, ReplayError> {
        let mut features = 0;
        for entry in self.journal.entries() {
            let mut m = entry.msg.try_clone().map_err(MessageError::from)?;
            if m.request == request::SET_VRING_BASE {
                self.resume_ring(&mut m);
            }
            let inherent = has_inherent_reply(&m, features);
            let acked = can_be_acked(&m, features);
            if acked {
                m.flags |= FLAG_NEED_REPLY;
            }
            message::send(stream, &m).map_err(MessageError::from)?;
            if inherent || acked {
                let mut reply = message::recv(stream)?.ok_or(MessageError::Truncated)?;
                if !is_reply_to(&reply, &m) {
                    return Err(ReplayError::BadReply(m.request));
                }
                if inherent {
                    filter_reply(&m, &mut reply);
                    if entry.reply.as_ref().is_some_and(|r| *r != reply.payload) {
                        return Err(ReplayError::Different(m.request));
                    }
                } else if reply.u64_at(0) != Some(0) {
                    return Err(ReplayError::Refused(m.request));
                }
            }
            features = features_after(&m, features);
        }
        Ok(self.journal.entries().len())
    }

    /// A started ring resumes where its used index stands in guest memory (VhostUserVringState:
    /// index u32, num u32).
    fn resume_ring(&self, m: &mut Message) {
        let Some(ring) = m.u32_at(0) else { return };
        let Some(used) = used_index(&self.journal, ring) else {
            return;
        };
        let from = m.u32_at(4).unwrap_or(0);
        if let Some(num) = m.payload.get_mut(4..8) {
            num.copy_from_slice(&u32::from(used).to_le_bytes());
            log::info!("ring {ring} resumes at {used} (the frontend started it at {from})");
        }
    }

    /// Blocks until a backend is attached, the frontend hangs up, or a signal.
    fn wait_for_backend(&mut self) -> Result<(), CarryError> {
        while self.backend.is_none() {
            let revents = poll(&[
                (Some(self.backend_listener.as_fd()), PollFlags::IN),
                (self.frontend.as_ref().map(|s| s.as_fd()), PollFlags::RDHUP),
                (self.wake_fd(), PollFlags::IN),
            ])
            .map_err(|e| CarryError::Frontend(e.to_string()))?;
            if self.terminate.load(Ordering::SeqCst) {
                return Err(CarryError::Terminated);
            }
            if revents[1].intersects(HANGUP) {
                return Err(CarryError::Frontend("it hung up".into()));
            }
            if !revents[0].is_empty() {
                self.accept_backend();
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
        match self.carry(&msg) {
            Ok(Outcome::Accepted(reply)) => {
                self.journal.record(msg, reply);
            }
            Ok(Outcome::Refused(status)) => log::warn!(
                "the backend refused request {} (status {status}): not kept for replays",
                msg.request
            ),
            Err(CarryError::Terminated) => {}
            Err(CarryError::Frontend(e)) => self.frontend_gone(&e),
            Err(e @ CarryError::GaveUp) => {
                log::error!("request {}: {e}", msg.request);
                if expects_reply(&msg, self.journal.protocol_features()) {
                    // The frontend waits for an answer that will not come.
                    self.frontend_gone("its request could not be answered");
                }
            }
        }
    }

    fn carry(&mut self, msg: &Message) -> Result<Outcome, CarryError> {
        let features = self.journal.protocol_features();
        let inherent = has_inherent_reply(msg, features);
        let frontend_wants_ack = !inherent && expects_reply(msg, features);
        // Asking for every acknowledgement the backend can give tells the keeper what it
        // accepted; the frontend sees only those it asked for.
        let ack = can_be_acked(msg, features);
        let asked;
        let to_send = if ack && msg.flags & FLAG_NEED_REPLY == 0 {
            let mut m = msg
                .try_clone()
                .map_err(|e| CarryError::Frontend(e.to_string()))?;
            m.flags |= FLAG_NEED_REPLY;
            asked = m;
            &asked
        } else {
            msg
        };
        for attempt in 0..MAX_ATTEMPTS {
            if self.backend.is_none() {
                if let Some(outcome) = self.answer_without_backend(msg, frontend_wants_ack)? {
                    return Ok(outcome);
                }
            }
            self.wait_for_backend()?;
            if attempt > 0 {
                log::info!("request {} sent again to the new backend", msg.request);
            }
            let Some(backend) = self.backend.as_ref() else {
                continue;
            };
            if let Err(e) = message::send(backend, to_send) {
                self.backend_gone(&e.to_string());
                continue;
            }
            if !inherent && !ack {
                self.note_config(msg, None);
                return Ok(Outcome::Accepted(None));
            }
            let mut reply = match message::recv(backend) {
                Ok(Some(r)) if is_reply_to(&r, msg) => r,
                Ok(Some(r)) => {
                    self.backend_gone(&format!(
                        "it answered request {} with {}",
                        msg.request, r.request
                    ));
                    continue;
                }
                Ok(None) => {
                    self.backend_gone("it closed the connection before replying");
                    continue;
                }
                Err(e) => {
                    self.backend_gone(&e.to_string());
                    continue;
                }
            };
            if inherent {
                filter_reply(msg, &mut reply);
            }
            self.note_config(msg, Some(&reply));
            if inherent || frontend_wants_ack {
                self.reply_to_frontend(&reply)?;
            }
            return Ok(if inherent {
                Outcome::Accepted(Some(reply.payload))
            } else {
                match reply.u64_at(0) {
                    Some(0) => Outcome::Accepted(None),
                    other => Outcome::Refused(other.unwrap_or(u64::MAX)),
                }
            });
        }
        Err(CarryError::GaveUp)
    }

    fn reply_to_frontend(&self, reply: &Message) -> Result<(), CarryError> {
        let frontend = self
            .frontend
            .as_ref()
            .ok_or_else(|| CarryError::Frontend("gone".into()))?;
        message::send(frontend, reply).map_err(|e| CarryError::Frontend(e.to_string()))
    }

    /// Keeps what a config access the backend answered shows of the config space: the bytes
    /// it read, or (once accepted) the bytes the frontend wrote.
    /// (`reply`: none when the backend was not asked for one.)
    fn note_config(&mut self, msg: &Message, reply: Option<&Message>) {
        let carried = match (msg.request, reply) {
            (request::GET_CONFIG, Some(reply)) => &reply.payload,
            (request::SET_CONFIG, None) => &msg.payload,
            (request::SET_CONFIG, Some(ack)) if ack.u64_at(0) == Some(0) => &msg.payload,
            _ => return,
        };
        if let Err(e) = self.config.learn(carried) {
            // Debug: a frontend that always words its accesses so would fill the log.
            log::debug!(
                "request {}: {e}; not kept for reads while no backend is attached",
                msg.request
            );
        }
    }

    /// While no backend is attached, config reads are answered from what the keeper saw and
    /// config writes go into the journal for the next backend (and are acknowledged if asked):
    /// neither may wait, a VMM waits for them in the guest's vCPU. `None`: the request waits
    /// for a backend (everything else, and anything before the first backend set the device
    /// up).
    fn answer_without_backend(
        &mut self,
        msg: &Message,
        frontend_wants_ack: bool,
    ) -> Result<Option<Outcome>, CarryError> {
        if self.journal.entries().is_empty() {
            return Ok(None);
        }
        let reply = match msg.request {
            request::GET_CONFIG => match self.config.answer(msg) {
                Ok((reply, how)) => {
                    if how == Answer::PartlyUnknown && !self.warned_unknown_config {
                        self.warned_unknown_config = true;
                        log::warn!(
                            "config read while no backend is attached, of bytes no backend \
                             showed: they read as zeros"
                        );
                    }
                    Some(reply)
                }
                Err(e) => {
                    log::warn!("config read while no backend is attached: {e}; it waits");
                    return Ok(None);
                }
            },
            request::SET_CONFIG => {
                if let Err(e) = self.config.learn(&msg.payload) {
                    log::warn!("config write while no backend is attached: {e}; it waits");
                    return Ok(None);
                }
                frontend_wants_ack.then(|| {
                    Message::new(
                        request::SET_CONFIG,
                        FLAG_VERSION_1 | FLAG_REPLY,
                        0u64.to_le_bytes().to_vec(),
                    )
                })
            }
            _ => return Ok(None),
        };
        if let Some(reply) = reply {
            self.reply_to_frontend(&reply)?;
        }
        // A write is journalled by the caller (replayed to the next backend); a read is not.
        Ok(Some(Outcome::Accepted(None)))
    }

    /// The frontend closed: forget its device state and let the backend reset too.
    fn frontend_gone(&mut self, why: &str) {
        log::info!("frontend disconnected ({why}); the backend connection is closed so it resets");
        self.frontend = None;
        self.backend = None;
        self.journal.clear();
        self.config.clear();
    }
}
