//! vhost-user messages as bytes: a 12-byte header (request, flags, payload size), the payload,
//! and the file descriptors that came with it (SCM_RIGHTS). The keeper forwards messages
//! without interpreting most of them; it only needs to know which ones the backend answers.

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};

pub const HEADER_SIZE: usize = 12;
/// The largest payload accepted (the vhost crate's MAX_MSG_SIZE; QEMU's largest message, a
/// memory table of 8 regions, is 264 bytes).
pub const MAX_PAYLOAD: usize = 0x1000;
/// The most descriptors accepted with one message (the vhost crate's limit).
pub const MAX_FDS: usize = 32;

/// Header flags (vhost-user spec, "Header"), from the vhost crate.
pub const FLAG_VERSION_1: u32 = 0x1;
pub const FLAG_REPLY: u32 = VhostUserHeaderFlag::REPLY.bits();
pub const FLAG_NEED_REPLY: u32 = VhostUserHeaderFlag::NEED_REPLY.bits();

/// Frontend request codes the keeper treats specially (vhost-user spec, "Front-end message
/// types"): the vhost crate's numbers (FrontendReq), as the u32 of the wire header.
pub mod request {
    use vhost::vhost_user::message::FrontendReq as R;
    pub const GET_FEATURES: u32 = R::GET_FEATURES as u32;
    pub const SET_FEATURES: u32 = R::SET_FEATURES as u32;
    pub const SET_OWNER: u32 = R::SET_OWNER as u32;
    pub const RESET_OWNER: u32 = R::RESET_OWNER as u32;
    pub const SET_MEM_TABLE: u32 = R::SET_MEM_TABLE as u32;
    pub const SET_LOG_BASE: u32 = R::SET_LOG_BASE as u32;
    pub const SET_LOG_FD: u32 = R::SET_LOG_FD as u32;
    pub const SET_VRING_NUM: u32 = R::SET_VRING_NUM as u32;
    pub const SET_VRING_ADDR: u32 = R::SET_VRING_ADDR as u32;
    pub const SET_VRING_BASE: u32 = R::SET_VRING_BASE as u32;
    pub const GET_VRING_BASE: u32 = R::GET_VRING_BASE as u32;
    pub const SET_VRING_KICK: u32 = R::SET_VRING_KICK as u32;
    pub const SET_VRING_CALL: u32 = R::SET_VRING_CALL as u32;
    pub const SET_VRING_ERR: u32 = R::SET_VRING_ERR as u32;
    pub const GET_PROTOCOL_FEATURES: u32 = R::GET_PROTOCOL_FEATURES as u32;
    pub const SET_PROTOCOL_FEATURES: u32 = R::SET_PROTOCOL_FEATURES as u32;
    pub const GET_QUEUE_NUM: u32 = R::GET_QUEUE_NUM as u32;
    pub const SET_VRING_ENABLE: u32 = R::SET_VRING_ENABLE as u32;
    pub const SEND_RARP: u32 = R::SEND_RARP as u32;
    pub const SET_BACKEND_REQ_FD: u32 = R::SET_BACKEND_REQ_FD as u32;
    pub const SET_VRING_ENDIAN: u32 = R::SET_VRING_ENDIAN as u32;
    pub const GET_CONFIG: u32 = R::GET_CONFIG as u32;
    pub const SET_CONFIG: u32 = R::SET_CONFIG as u32;
    pub const POSTCOPY_ADVISE: u32 = R::POSTCOPY_ADVISE as u32;
    pub const POSTCOPY_END: u32 = R::POSTCOPY_END as u32;
    pub const GET_INFLIGHT_FD: u32 = R::GET_INFLIGHT_FD as u32;
    pub const RESET_DEVICE: u32 = R::RESET_DEVICE as u32;
    pub const VRING_KICK: u32 = R::VRING_KICK as u32;
    pub const GET_MAX_MEM_SLOTS: u32 = R::GET_MAX_MEM_SLOTS as u32;
    pub const ADD_MEM_REG: u32 = R::ADD_MEM_REG as u32;
    pub const REM_MEM_REG: u32 = R::REM_MEM_REG as u32;
    pub const SET_STATUS: u32 = R::SET_STATUS as u32;
    pub const GET_STATUS: u32 = R::GET_STATUS as u32;
    pub const GET_SHARED_OBJECT: u32 = R::GET_SHARED_OBJECT as u32;
    pub const SET_DEVICE_STATE_FD: u32 = R::SET_DEVICE_STATE_FD as u32;
    pub const CHECK_DEVICE_STATE: u32 = R::CHECK_DEVICE_STATE as u32;
    pub const GET_SHMEM_CONFIG: u32 = R::GET_SHMEM_CONFIG as u32;
}

/// Protocol feature bits (vhost-user spec, "Protocol features"), from the vhost crate.
pub const PROTOCOL_F_MQ: u64 = VhostUserProtocolFeatures::MQ.bits();
pub const PROTOCOL_F_LOG_SHMFD: u64 = VhostUserProtocolFeatures::LOG_SHMFD.bits();
pub const PROTOCOL_F_REPLY_ACK: u64 = VhostUserProtocolFeatures::REPLY_ACK.bits();
pub const PROTOCOL_F_BACKEND_REQ: u64 = VhostUserProtocolFeatures::BACKEND_REQ.bits();
pub const PROTOCOL_F_CONFIG: u64 = VhostUserProtocolFeatures::CONFIG.bits();

/// The protocol features a frontend may negotiate through the keeper: the ones whose state the
/// journal can replay. Others (postcopy, inflight tracking, memory slots, device state, shared
/// memory, guest-physical ring addresses...) are hidden from the frontend.
pub const PROTOCOL_FEATURES_KEPT: u64 =
    PROTOCOL_F_MQ | PROTOCOL_F_REPLY_ACK | PROTOCOL_F_BACKEND_REQ | PROTOCOL_F_CONFIG;

/// VIRTIO_F_RING_PACKED: hidden, resuming a ring at its used index only works for split rings.
pub const VIRTIO_F_RING_PACKED: u64 = 1 << 34;

#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection in the middle of a message")]
    Truncated,
    #[error("a payload of {0} bytes (the limit is {MAX_PAYLOAD})")]
    TooLarge(u32),
    #[error("more than {MAX_FDS} descriptors with one message")]
    TooManyFds,
}

/// One message with its descriptors.
#[derive(Debug)]
pub struct Message {
    pub request: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Message {
    pub fn new(request: u32, flags: u32, payload: Vec<u8>) -> Self {
        Message {
            request,
            flags,
            payload,
            fds: Vec::new(),
        }
    }

    /// A copy with duplicated descriptors (the journal keeps its own).
    pub fn try_clone(&self) -> io::Result<Message> {
        Ok(Message {
            request: self.request,
            flags: self.flags,
            payload: self.payload.clone(),
            fds: self
                .fds
                .iter()
                .map(OwnedFd::try_clone)
                .collect::<io::Result<_>>()?,
        })
    }

    /// The little-endian u32 at `offset` of the payload.
    pub fn u32_at(&self, offset: usize) -> Option<u32> {
        let b = self.payload.get(offset..offset + 4)?;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    }

    /// The little-endian u64 at `offset` of the payload.
    pub fn u64_at(&self, offset: usize) -> Option<u64> {
        let b = self.payload.get(offset..offset + 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    fn header(&self) -> [u8; HEADER_SIZE] {
        let mut h = [0u8; HEADER_SIZE];
        h[0..4].copy_from_slice(&self.request.to_le_bytes());
        h[4..8].copy_from_slice(&self.flags.to_le_bytes());
        h[8..12].copy_from_slice(&(self.payload.len() as u32).to_le_bytes());
        h
    }
}

/// Whether `msg` asks for something, so the backend always answers it with a reply of the
/// same request code.
pub fn has_inherent_reply(msg: &Message, protocol_features: u64) -> bool {
    use request::*;
    match msg.request {
        GET_FEATURES
        | GET_VRING_BASE
        | GET_PROTOCOL_FEATURES
        | GET_QUEUE_NUM
        | GET_CONFIG
        | POSTCOPY_ADVISE
        | POSTCOPY_END
        | GET_INFLIGHT_FD
        | GET_MAX_MEM_SLOTS
        | GET_STATUS
        | GET_SHARED_OBJECT
        | SET_DEVICE_STATE_FD
        | CHECK_DEVICE_STATE
        | GET_SHMEM_CONFIG => true,
        SET_LOG_BASE => protocol_features & PROTOCOL_F_LOG_SHMFD != 0,
        _ => false,
    }
}

/// The protocol features in force once `msg` is handled: a SET_PROTOCOL_FEATURES takes effect
/// before its own acknowledgement.
pub fn features_after(msg: &Message, protocol_features: u64) -> u64 {
    if msg.request == request::SET_PROTOCOL_FEATURES {
        msg.u64_at(0).unwrap_or(0)
    } else {
        protocol_features
    }
}

/// Whether a backend would acknowledge `msg` (a u64 status, 0 for success) if it carried
/// NEED_REPLY: any message without an inherent reply, once REPLY_ACK is negotiated.
pub fn can_be_acked(msg: &Message, protocol_features: u64) -> bool {
    !has_inherent_reply(msg, protocol_features)
        && features_after(msg, protocol_features) & PROTOCOL_F_REPLY_ACK != 0
}

/// Whether the backend answers `msg` as the frontend sent it (vhost-user spec,
/// "Communication" and "REPLY_ACK").
pub fn expects_reply(msg: &Message, protocol_features: u64) -> bool {
    has_inherent_reply(msg, protocol_features)
        || (msg.flags & FLAG_NEED_REPLY != 0 && can_be_acked(msg, protocol_features))
}

/// Whether `reply` answers `msg`.
pub fn is_reply_to(reply: &Message, msg: &Message) -> bool {
    reply.request == msg.request && reply.flags & FLAG_REPLY != 0
}

/// One recvmsg into `buf`, keeping any descriptors that came with it (close-on-exec from
/// the start). Room for one more than MAX_FDS: a peer sending more in one write gets
/// MSG_CTRUNC, an error (the kernel closes what did not fit).
fn recv_some(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<usize, MessageError> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS + 1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = loop {
        match rustix::net::recvmsg(
            stream,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(msg) => break msg,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(io::Error::from(e).into()),
        }
    };
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(MessageError::TooManyFds);
    }
    Ok(msg.bytes)
}

/// Fills `buf` completely; `Ok(false)` if the stream ended before the first byte.
fn recv_exact(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<bool, MessageError> {
    let mut done = 0;
    while done < buf.len() {
        let n = recv_some(stream, &mut buf[done..], fds)?;
        // Checked at every read, not once the message is complete: a peer sending a few
        // descriptors with every byte would otherwise have them all held here first.
        if fds.len() > MAX_FDS {
            return Err(MessageError::TooManyFds);
        }
        if n == 0 {
            return if done == 0 {
                Ok(false)
            } else {
                Err(MessageError::Truncated)
            };
        }
        done += n;
    }
    Ok(true)
}

/// Reads one message; `None` when the peer closed the connection between messages.
pub fn recv(stream: &UnixStream) -> Result<Option<Message>, MessageError> {
    let mut header = [0u8; HEADER_SIZE];
    let mut fds = Vec::new();
    if !recv_exact(stream, &mut header, &mut fds)? {
        return Ok(None);
    }
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8));
    if size as usize > MAX_PAYLOAD {
        return Err(MessageError::TooLarge(size));
    }
    let mut payload = vec![0u8; size as usize];
    if size > 0 && !recv_exact(stream, &mut payload, &mut fds)? {
        return Err(MessageError::Truncated);
    }
    Ok(Some(Message {
        request,
        flags,
        payload,
        fds,
    }))
}

fn too_many_fds(n: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{n} descriptors with one message (at most {MAX_FDS})"),
    )
}

/// Writes one message, its descriptors with the first byte.
pub fn send(stream: &UnixStream, msg: &Message) -> io::Result<()> {
    if msg.fds.len() > MAX_FDS {
        return Err(too_many_fds(msg.fds.len()));
    }
    let header = msg.header();
    let mut bytes = Vec::with_capacity(HEADER_SIZE + msg.payload.len());
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&msg.payload);
    let fds: Vec<BorrowedFd<'_>> = msg.fds.iter().map(AsFd::as_fd).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut sent = 0;
    while sent < bytes.len() {
        let mut control = SendAncillaryBuffer::new(&mut space);
        if sent == 0 && !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            // Room for MAX_FDS was made, and more were refused above.
            return Err(too_many_fds(fds.len()));
        }
        match rustix::net::sendmsg(
            stream,
            &[IoSlice::new(&bytes[sent..])],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) => sent += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::{AsRawFd, RawFd};

    fn memfd(content: &[u8]) -> std::fs::File {
        let fd = rustix::fs::memfd_create(c"keeper-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let mut f = std::fs::File::from(fd);
        f.write_all(content).unwrap();
        f
    }

    #[test]
    fn too_many_descriptors_are_refused_as_they_arrive() {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let header = Message::new(request::SET_CONFIG, FLAG_VERSION_1, vec![0; 64]).header();
        let file = memfd(b"");
        let fds = [file.as_raw_fd(); 20];
        // The header in two writes with 20 descriptors each, then nothing: the peer keeps the
        // connection open and the payload never comes. The error must not wait for it.
        a.send_with_fds(&[&header[..6]], &fds).unwrap();
        a.send_with_fds(&[&header[6..]], &fds).unwrap();
        // (Waiting for the payload would end in the read timeout, an I/O error.)
        assert!(matches!(recv(&b), Err(MessageError::TooManyFds)));
        drop(a);
    }

    #[test]
    fn messages_and_their_descriptors_cross_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut msg = Message::new(
            request::SET_VRING_KICK,
            FLAG_VERSION_1,
            1u64.to_le_bytes().to_vec(),
        );
        msg.fds.push(memfd(b"kick").into());
        send(&a, &msg).unwrap();
        send(
            &a,
            &Message::new(request::GET_FEATURES, FLAG_VERSION_1, Vec::new()),
        )
        .unwrap();
        let got = recv(&b).unwrap().unwrap();
        assert_eq!((got.request, got.flags, got.u64_at(0)), (12, 1, Some(1)));
        assert_eq!(got.fds.len(), 1);
        let mut f = std::fs::File::from(got.fds.into_iter().next().unwrap());
        f.rewind().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "kick");
        let got = recv(&b).unwrap().unwrap();
        assert_eq!((got.request, got.payload.len(), got.fds.len()), (1, 0, 0));
        drop(a);
        assert!(recv(&b).unwrap().is_none());
    }

    #[test]
    fn oversized_and_truncated_messages_are_errors() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut h = [0u8; HEADER_SIZE];
        h[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        a.write_all(&h).unwrap();
        assert!(matches!(recv(&b), Err(MessageError::TooLarge(_))));
        let (mut a, b) = UnixStream::pair().unwrap();
        h[8..12].copy_from_slice(&8u32.to_le_bytes());
        a.write_all(&h).unwrap();
        a.write_all(&[1, 2, 3]).unwrap();
        drop(a);
        assert!(matches!(recv(&b), Err(MessageError::Truncated)));
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&h[..5]).unwrap();
        drop(a);
        assert!(matches!(recv(&b), Err(MessageError::Truncated)));
    }

    #[test]
    fn too_many_descriptors_are_refused_both_ways() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut msg = Message::new(request::SET_MEM_TABLE, FLAG_VERSION_1, vec![0; 8]);
        for _ in 0..MAX_FDS + 1 {
            msg.fds.push(memfd(b"").into());
        }
        assert!(send(&a, &msg).is_err());
        // Descriptors spread over the header and the payload count together.
        let header = Message::new(request::SET_MEM_TABLE, FLAG_VERSION_1, vec![0; 8]).header();
        let files: Vec<std::fs::File> = (0..MAX_FDS).map(|_| memfd(b"")).collect();
        let raw: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        a.send_with_fds(&[&header[..]], &raw[..20]).unwrap();
        a.send_with_fds(&[&[0u8; 8][..]], &raw[..20]).unwrap();
        assert!(recv(&b).is_err());
    }

    #[test]
    fn which_messages_are_answered() {
        let m = |r, f| Message::new(r, f, Vec::new());
        assert!(expects_reply(&m(request::GET_FEATURES, 1), 0));
        assert!(expects_reply(&m(request::GET_VRING_BASE, 1), 0));
        assert!(expects_reply(&m(request::GET_CONFIG, 1), 0));
        assert!(!expects_reply(&m(request::SET_VRING_KICK, 1), 0));
        // NEED_REPLY counts only once REPLY_ACK is negotiated.
        assert!(!expects_reply(
            &m(request::SET_MEM_TABLE, 1 | FLAG_NEED_REPLY),
            0
        ));
        assert!(expects_reply(
            &m(request::SET_MEM_TABLE, 1 | FLAG_NEED_REPLY),
            PROTOCOL_F_REPLY_ACK
        ));
        // SET_PROTOCOL_FEATURES switching REPLY_ACK on is itself acknowledged.
        let mut set = Message::new(
            request::SET_PROTOCOL_FEATURES,
            1 | FLAG_NEED_REPLY,
            PROTOCOL_F_REPLY_ACK.to_le_bytes().to_vec(),
        );
        assert!(expects_reply(&set, 0));
        set.flags = 1;
        assert!(!expects_reply(&set, 0) && can_be_acked(&set, 0));
        assert!(!can_be_acked(
            &m(request::GET_FEATURES, 1),
            PROTOCOL_F_REPLY_ACK
        ));
        assert!(!expects_reply(&m(request::SET_LOG_BASE, 1), 0));
        assert!(expects_reply(
            &m(request::SET_LOG_BASE, 1),
            PROTOCOL_F_LOG_SHMFD
        ));
    }
}
