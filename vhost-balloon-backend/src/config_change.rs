//! Telling the frontend that the config changed (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG), which
//! vhost 0.18 cannot do: its `Backend` (the backend-to-frontend request channel) leaves
//! `handle_config_change` at the trait default (ENOSYS) and keeps its send path private. Without
//! the message the guest driver never learns a new target, since Linux reads `num_pages` on
//! the config interrupt.
//!
//! The workaround: the channel is a socket the frontend passes with SET_BACKEND_REQ_FD. We take
//! the set of this process's Unix stream sockets before that message and again when
//! `set_backend_req_fd` runs; the channel is the new socket that has no local name (a socketpair
//! end, unlike the named sockets this process accepts on). We keep a duplicate of it and write
//! the 12-byte message ourselves. The proper fix for the vhost crate is in
//! docs/upstream-vhost-config-change.md.
//!
//! "Before" must not depend on which messages a frontend sends: QEMU sends SET_BACKEND_REQ_FD
//! right after GET/SET_PROTOCOL_FEATURES, cloud-hypervisor after SET_FEATURES and SET_MEM_TABLE,
//! and on its own reconnect without GET_PROTOCOL_FEATURES at all. So the set is taken afresh at
//! every negotiation message the backend sees (GET_FEATURES, SET_FEATURES,
//! GET_PROTOCOL_FEATURES, SET_MEM_TABLE): the last one before the channel arrives is the one
//! compared with. Sockets are told apart by inode, not only by number, so a descriptor closed
//! and reused in between (the previous connection's channel) is still seen as new.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (backend-to-frontend request 2).
pub const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;
/// Header flags: protocol version 1.
pub const FLAG_VERSION_1: u32 = 0x1;
pub const FLAG_REPLY: u32 = 0x4;
pub const FLAG_NEED_REPLY: u32 = 0x8;
const HEADER_SIZE: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum ConfigChangeError {
    #[error("no backend request channel: the frontend did not send SET_BACKEND_REQ_FD")]
    NoChannel,
    #[error("found {0} candidate sockets for the backend request channel, expected 1")]
    Ambiguous(usize),
    #[error("I/O on the backend request channel: {0}")]
    Io(#[from] io::Error),
    #[error("the frontend replied {0} to the config-change message")]
    Refused(u64),
    #[error("malformed reply header from the frontend: request {request}, flags {flags:#x}, size {size}")]
    BadReply { request: u32, flags: u32, size: u32 },
}

/// One open socket: its descriptor number and its inode (which a reused number does not share).
pub type SocketId = (RawFd, u64);

/// Unix stream sockets without a local name that this process has open.
pub fn unnamed_unix_stream_sockets() -> BTreeSet<SocketId> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return BTreeSet::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
        .filter(|&fd| is_unnamed_unix_stream(fd))
        .filter_map(|fd| {
            // SAFETY: used only for the query, right away.
            let listed = unsafe { borrow_listed(fd) };
            rustix::fs::fstat(listed).ok().map(|st| (fd, st.st_ino))
        })
        .collect()
}

/// Borrows descriptor number `fd`, which this process had open when /proc/self/fd was read a
/// moment ago.
///
/// # Safety
/// The caller uses the borrow only at once, for queries and a dup that fail on a closed
/// descriptor (one reused meanwhile answers for the new one, which the before/after
/// difference of the caller tolerates). Borrowing a descriptor by its number, with no owning
/// handle, is unsafe in any crate.
unsafe fn borrow_listed(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: as the caller promised.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

fn is_unnamed_unix_stream(fd: RawFd) -> bool {
    use rustix::net::{sockopt, AddressFamily, SocketType};
    // SAFETY: used only for the queries below, right away.
    let fd = unsafe { borrow_listed(fd) };
    sockopt::socket_domain(fd).is_ok_and(|d| d == AddressFamily::UNIX)
        && sockopt::socket_type(fd).is_ok_and(|t| t == SocketType::STREAM)
        // An unnamed socket's address is only the family (the kernel's length, not a name
        // rustix would decode).
        && rustix::net::getsockname(fd).is_ok_and(|a| {
            a.addr_len() as usize <= std::mem::size_of::<libc::sa_family_t>()
        })
}

/// Finds the backend request channel among the sockets that appeared since `before`, and
/// duplicates it so it outlives whatever the vhost crate does with its own copy.
pub fn find_new_channel(
    before: &BTreeSet<SocketId>,
) -> Result<ConfigChangeChannel, ConfigChangeError> {
    let new: Vec<SocketId> = unnamed_unix_stream_sockets()
        .difference(before)
        .copied()
        .collect();
    match new.as_slice() {
        [] => Err(ConfigChangeError::NoChannel),
        [(fd, _)] => {
            // SAFETY: used only for the dup, right away.
            let listed = unsafe { borrow_listed(*fd) };
            let dup = rustix::io::fcntl_dupfd_cloexec(listed, 0).map_err(io::Error::from)?;
            Ok(ConfigChangeChannel::new(dup))
        }
        many => Err(ConfigChangeError::Ambiguous(many.len())),
    }
}

/// The backend-to-frontend request channel, used only for config-change messages.
#[derive(Debug)]
pub struct ConfigChangeChannel {
    sock: UnixStream,
}

impl ConfigChangeChannel {
    pub fn new(fd: OwnedFd) -> Self {
        ConfigChangeChannel {
            sock: UnixStream::from(fd),
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG. With `need_reply` (allowed when REPLY_ACK
    /// was negotiated) it waits for the frontend's u64 status, 0 meaning success.
    pub fn notify(&mut self, need_reply: bool) -> Result<(), ConfigChangeError> {
        let flags = FLAG_VERSION_1 | if need_reply { FLAG_NEED_REPLY } else { 0 };
        let mut msg = [0u8; HEADER_SIZE];
        msg[0..4].copy_from_slice(&BACKEND_CONFIG_CHANGE_MSG.to_le_bytes());
        msg[4..8].copy_from_slice(&flags.to_le_bytes());
        // size (bytes 8..12) is 0: the message has no payload.
        self.sock.write_all(&msg)?;
        if !need_reply {
            return Ok(());
        }
        self.sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reply = [0u8; HEADER_SIZE + 8];
        self.sock.read_exact(&mut reply)?;
        let word =
            |i: usize| u32::from_le_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
        let (request, flags, size) = (word(0), word(4), word(8));
        if request != BACKEND_CONFIG_CHANGE_MSG || flags & FLAG_REPLY == 0 || size != 8 {
            return Err(ConfigChangeError::BadReply {
                request,
                flags,
                size,
            });
        }
        let mut status = [0u8; 8];
        status.copy_from_slice(&reply[HEADER_SIZE..]);
        match u64::from_le_bytes(status) {
            0 => Ok(()),
            other => Err(ConfigChangeError::Refused(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::Mutex;

    /// The tests here open sockets; discovery must not see another test's.
    static SOCKETS: Mutex<()> = Mutex::new(());

    #[test]
    fn finds_only_the_new_unnamed_socket() {
        let _guard = SOCKETS.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("s")).unwrap();
        let _client = UnixStream::connect(dir.path().join("s")).unwrap();
        let (ours, mut frontend) = UnixStream::pair().unwrap();
        let before = unnamed_unix_stream_sockets();
        // Between the two snapshots: a connection accepted on a named socket (as on the
        // vhost-user or control socket), which is not a candidate, and the channel's end
        // arriving (here as a duplicate of a socketpair end), which is.
        let (_accepted, _) = listener.accept().unwrap();
        let arrived = ours.try_clone().unwrap();
        drop(ours);
        let mut chan = find_new_channel(&before).unwrap();
        drop(arrived);
        chan.notify(false).unwrap();
        let mut header = [0u8; 12];
        frontend.read_exact(&mut header).unwrap();
        assert_eq!(header, [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    }

    /// A frontend end that answers one config-change message with `status`.
    fn answering_frontend(status: u64, flags: u32) -> ConfigChangeChannel {
        let _guard = SOCKETS.lock().unwrap_or_else(|e| e.into_inner());
        let (ours, mut frontend) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut header = [0u8; 12];
            frontend.read_exact(&mut header).unwrap();
            assert_eq!(&header[0..4], &2u32.to_le_bytes());
            assert_eq!(
                &header[4..8],
                &(FLAG_VERSION_1 | FLAG_NEED_REPLY).to_le_bytes()
            );
            let mut reply = Vec::new();
            reply.extend_from_slice(&2u32.to_le_bytes());
            reply.extend_from_slice(&flags.to_le_bytes());
            reply.extend_from_slice(&8u32.to_le_bytes());
            reply.extend_from_slice(&status.to_le_bytes());
            frontend.write_all(&reply).unwrap();
        });
        ConfigChangeChannel::new(OwnedFd::from(ours))
    }

    #[test]
    fn need_reply_reads_the_status() {
        answering_frontend(0, FLAG_VERSION_1 | FLAG_REPLY)
            .notify(true)
            .unwrap();
        assert!(matches!(
            answering_frontend(1, FLAG_VERSION_1 | FLAG_REPLY).notify(true),
            Err(ConfigChangeError::Refused(1))
        ));
        assert!(matches!(
            answering_frontend(0, FLAG_VERSION_1).notify(true),
            Err(ConfigChangeError::BadReply { .. })
        ));
    }

    #[test]
    fn a_closed_frontend_is_an_error_not_a_hang() {
        let _guard = SOCKETS.lock().unwrap_or_else(|e| e.into_inner());
        let (ours, frontend) = UnixStream::pair().unwrap();
        drop(frontend);
        let mut chan = ConfigChangeChannel::new(OwnedFd::from(ours));
        assert!(chan.notify(true).is_err());
    }
}
