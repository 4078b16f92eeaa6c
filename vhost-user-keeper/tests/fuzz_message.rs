//! Fuzzing the keeper's vhost-user message parser (`message::recv`) over real Unix socket
//! pairs: arbitrary bytes, in arbitrary pieces, with descriptors on arbitrary pieces, are read
//! exactly as the wire format says (a 12-byte header, at most MAX_PAYLOAD bytes of payload,
//! at most MAX_FDS descriptors), never panic and never hang; what `send` writes comes back.
//! Also the journal's reading of payloads (`Journal::record`, `regions`).
//!
//! Cases per property: `PROPTEST_CASES` when set (`make fuzz` sets a large number), else the
//! small default below, so that `cargo test` stays quick.

#[path = "../../vhost-balloon-backend/protocol/tests/support/cases.rs"]
mod cases;

use cases::config;
use proptest::collection::vec;
use proptest::prelude::*;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use vhost_user_keeper::journal::Journal;
use vhost_user_keeper::message::{
    self, request, Message, MessageError, HEADER_SIZE, MAX_FDS, MAX_PAYLOAD,
};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// A read that waits longer than this is a hang (the writer always closes its end).
const READ_TIMEOUT: Duration = Duration::from_secs(10);

fn header(request: u32, flags: u32, size: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_SIZE);
    h.extend_from_slice(&request.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h
}

/// A piece of what the peer writes.
#[derive(Debug, Clone)]
enum Piece {
    /// A well-formed message.
    Message {
        request: u32,
        flags: u32,
        payload: Vec<u8>,
    },
    /// A header announcing more than MAX_PAYLOAD bytes.
    Oversized { request: u32, size: u32 },
    /// Anything.
    Raw(Vec<u8>),
}

impl Piece {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Piece::Message {
                request,
                flags,
                payload,
            } => {
                let mut b = header(*request, *flags, payload.len() as u32);
                b.extend_from_slice(payload);
                b
            }
            Piece::Oversized { request, size } => header(*request, 1, *size),
            Piece::Raw(b) => b.clone(),
        }
    }
}

fn piece() -> impl Strategy<Value = Piece> {
    let payload = prop_oneof![
        8 => vec(any::<u8>(), 0..64),
        1 => vec(any::<u8>(), (MAX_PAYLOAD - 16)..=MAX_PAYLOAD),
    ];
    prop_oneof![
        8 => (0u32..48, any::<u32>(), payload).prop_map(|(request, flags, payload)| Piece::Message {
            request,
            flags,
            payload
        }),
        1 => (any::<u32>(), (MAX_PAYLOAD as u32 + 1)..=u32::MAX)
            .prop_map(|(request, size)| Piece::Oversized { request, size }),
        2 => vec(any::<u8>(), 0..40).prop_map(Piece::Raw),
    ]
}

/// How the bytes go out: cut into writes at these lengths, with this many descriptors on
/// each write.
#[derive(Debug, Clone)]
struct Writes {
    cuts: Vec<(usize, usize)>,
}

fn writes() -> impl Strategy<Value = Writes> {
    vec(
        (
            prop_oneof![1usize..16, 1usize..5000],
            prop_oneof![6 => Just(0usize), 2 => 1usize..4, 1 => 1usize..=40],
        ),
        1..12,
    )
    .prop_map(|cuts| Writes { cuts })
}

/// One write: its bytes and how many descriptors come with its first byte.
fn split(bytes: &[u8], w: &Writes) -> Vec<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    let mut i = 0;
    while !rest.is_empty() {
        let (len, fds) = w.cuts[i % w.cuts.len()];
        let n = len.min(rest.len());
        out.push((rest[..n].to_vec(), fds));
        rest = &rest[n..];
        i += 1;
    }
    out
}

/// What `recv` must give, read by read: a message (request, flags, payload, descriptors), the
/// end, or an error of this kind.
#[derive(Debug, PartialEq)]
enum Expected {
    Message(u32, u32, Vec<u8>, usize),
    End,
    Truncated,
    TooLarge(u32),
    TooManyFds,
}

/// The wire format, from the spec: messages one after another; descriptors arrive with the
/// first read that touches the bytes of the write that carried them, i.e. with the message
/// holding that write's first byte. More than MAX_FDS for one message is an error as soon as
/// they have arrived: after the header, or before the end of a message cut short.
fn model(bytes: &[u8], fds_at: &[(usize, usize)]) -> Vec<Expected> {
    let fds_in = |from: usize, to: usize| -> usize {
        fds_at
            .iter()
            .filter(|(at, _)| (from..to).contains(at))
            .map(|(_, n)| n)
            .sum()
    };
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &bytes[pos..];
        let too_many = |to: usize| fds_in(pos, pos + to) > MAX_FDS;
        if rest.is_empty() {
            out.push(Expected::End);
            return out;
        }
        if rest.len() < HEADER_SIZE {
            out.push(if too_many(rest.len()) {
                Expected::TooManyFds
            } else {
                Expected::Truncated
            });
            return out;
        }
        if too_many(HEADER_SIZE) {
            out.push(Expected::TooManyFds);
            return out;
        }
        let word = |i: usize| u32::from_le_bytes(rest[i..i + 4].try_into().unwrap());
        let (req, flags, size) = (word(0), word(4), word(8));
        if size as usize > MAX_PAYLOAD {
            out.push(Expected::TooLarge(size));
            return out;
        }
        let end = HEADER_SIZE + size as usize;
        if too_many(end.min(rest.len())) {
            out.push(Expected::TooManyFds);
            return out;
        }
        if rest.len() < end {
            out.push(Expected::Truncated);
            return out;
        }
        out.push(Expected::Message(
            req,
            flags,
            rest[HEADER_SIZE..end].to_vec(),
            fds_in(pos, pos + end),
        ));
        pos += end;
    }
}

fn is_cloexec(fd: &impl AsFd) -> bool {
    rustix::io::fcntl_getfd(fd).is_ok_and(|flags| flags.contains(rustix::io::FdFlags::CLOEXEC))
}

/// Writes `writes` from a thread (descriptors: `file`, repeated), then closes that end; reads
/// with `recv` until the end or an error.
fn exchange(
    writes: Vec<(Vec<u8>, usize)>,
    file: &File,
) -> Result<Vec<Result<Option<Message>, MessageError>>, TestCaseError> {
    let (mut tx, rx) = UnixStream::pair().unwrap();
    rx.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    // `file` stays open until the writer is joined.
    let raw = file.as_raw_fd();
    let writer = std::thread::spawn(move || {
        for (bytes, nfds) in writes {
            let fds = vec![raw; nfds];
            let sent = if fds.is_empty() {
                0
            } else {
                match tx.send_with_fds(&[&bytes[..]], &fds) {
                    Ok(n) => n,
                    // The reader stopped (an error) and closed its end.
                    Err(_) => return,
                }
            };
            if tx.write_all(&bytes[sent..]).is_err() {
                return;
            }
        }
        // Dropping `tx` ends the stream.
    });
    let mut got = Vec::new();
    loop {
        let r = message::recv(&rx);
        let done = !matches!(r, Ok(Some(_)));
        got.push(r);
        if done {
            break;
        }
        prop_assert!(got.len() < 10_000, "no end");
    }
    drop(rx);
    writer.join().unwrap();
    Ok(got)
}

fn check(
    got: &[Result<Option<Message>, MessageError>],
    want: &[Expected],
) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len(), "got {:?}, want {:?}", got, want);
    for (g, w) in got.iter().zip(want) {
        match (g, w) {
            (Ok(Some(m)), Expected::Message(req, flags, payload, nfds)) => {
                prop_assert_eq!(m.request, *req);
                prop_assert_eq!(m.flags, *flags);
                prop_assert_eq!(&m.payload, payload);
                prop_assert_eq!(m.fds.len(), *nfds);
                for fd in &m.fds {
                    prop_assert!(is_cloexec(fd), "descriptor without CLOEXEC");
                }
            }
            (Ok(None), Expected::End) => {}
            (Err(MessageError::Truncated), Expected::Truncated) => {}
            (Err(MessageError::TooLarge(s)), Expected::TooLarge(w)) => prop_assert_eq!(s, w),
            (Err(MessageError::TooManyFds), Expected::TooManyFds) => {}
            _ => prop_assert!(false, "got {:?}, want {:?}", g, w),
        }
    }
    Ok(())
}

fn dev_null() -> File {
    File::open("/dev/null").unwrap()
}

fn same_file(a: &OwnedFd, b: &File) -> bool {
    let a = File::from(a.try_clone().unwrap()).metadata().unwrap();
    let b = b.metadata().unwrap();
    a.dev() == b.dev() && a.ino() == b.ino()
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_bytes_in_arbitrary_pieces_read_as_the_wire_format_says(
        bytes in vec(any::<u8>(), 0..200),
        w in writes(),
    ) {
        let pieces = split(&bytes, &w);
        let mut at = 0;
        let fds_at: Vec<(usize, usize)> = pieces.iter().map(|(b, n)| { let p = (at, *n); at += b.len(); p }).collect();
        let got = exchange(pieces, &dev_null())?;
        check(&got, &model(&bytes, &fds_at))?;
    }

    #[test]
    fn message_streams_with_junk_read_as_the_wire_format_says(
        pieces in vec(piece(), 0..6),
        w in writes(),
    ) {
        let bytes: Vec<u8> = pieces.iter().flat_map(Piece::bytes).collect();
        let writes = split(&bytes, &w);
        let mut at = 0;
        let fds_at: Vec<(usize, usize)> = writes.iter().map(|(b, n)| { let p = (at, *n); at += b.len(); p }).collect();
        let got = exchange(writes, &dev_null())?;
        check(&got, &model(&bytes, &fds_at))?;
    }

    #[test]
    fn sent_messages_come_back(
        msgs in vec((any::<u32>(), any::<u32>(), prop_oneof![
            8 => vec(any::<u8>(), 0..64),
            1 => vec(any::<u8>(), 0..=MAX_PAYLOAD + 64),
        ], prop_oneof![4 => 0usize..3, 1 => 0usize..=MAX_FDS + 2]), 1..5),
    ) {
        let (tx, rx) = UnixStream::pair().unwrap();
        rx.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        let file = dev_null();
        let mut sent = Vec::new();
        for (req, flags, payload, nfds) in &msgs {
            let mut m = Message::new(*req, *flags, payload.clone());
            for _ in 0..*nfds {
                m.fds.push(file.as_fd().try_clone_to_owned().unwrap());
            }
            let r = message::send(&tx, &m);
            if *nfds > MAX_FDS {
                // Refused before anything is written.
                prop_assert!(r.is_err());
                continue;
            }
            prop_assert!(r.is_ok(), "{:?}", r);
            sent.push(m);
            if payload.len() > MAX_PAYLOAD {
                // `send` writes what `recv` refuses: it must stop there.
                break;
            }
        }
        drop(tx);
        for m in &sent {
            match message::recv(&rx) {
                Ok(Some(got)) => {
                    prop_assert!(m.payload.len() <= MAX_PAYLOAD);
                    prop_assert_eq!((got.request, got.flags), (m.request, m.flags));
                    prop_assert_eq!(&got.payload, &m.payload);
                    prop_assert_eq!(got.fds.len(), m.fds.len());
                    for fd in &got.fds {
                        prop_assert!(same_file(fd, &file));
                    }
                }
                Err(MessageError::TooLarge(n)) => {
                    prop_assert!(m.payload.len() > MAX_PAYLOAD);
                    prop_assert_eq!(n as usize, m.payload.len());
                    return Ok(());
                }
                other => prop_assert!(false, "{:?} for {:?}", other, m),
            }
        }
        prop_assert!(matches!(message::recv(&rx), Ok(None)));
    }

    #[test]
    fn payload_words_are_read_only_inside(payload in vec(any::<u8>(), 0..40), offset in 0usize..48) {
        let m = Message::new(request::SET_CONFIG, 1, payload.clone());
        let want32 = payload.get(offset..offset + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
        let want64 = payload.get(offset..offset + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
        prop_assert_eq!(m.u32_at(offset), want32);
        prop_assert_eq!(m.u64_at(offset), want64);
    }

    #[test]
    fn the_journal_reads_any_payload(
        msgs in vec((
            prop_oneof![
                4 => proptest::sample::select(vec![
                    request::SET_MEM_TABLE, request::ADD_MEM_REG, request::REM_MEM_REG,
                    request::SET_VRING_ADDR, request::SET_VRING_KICK, request::SET_VRING_CALL,
                    request::SET_VRING_NUM, request::SET_VRING_BASE, request::GET_VRING_BASE,
                    request::SET_CONFIG, request::SET_PROTOCOL_FEATURES, request::RESET_OWNER,
                    request::RESET_DEVICE, request::SET_FEATURES,
                ]),
                1 => 0u32..64,
            ],
            prop_oneof![vec(any::<u8>(), 0..48), vec(any::<u8>(), 0..300)],
            0usize..10,
            any::<(u32, u64, u64)>(),
        ), 0..24),
    ) {
        let file = dev_null();
        let mut journal = Journal::default();
        for (req, payload, nfds, (ring, addr, len)) in msgs {
            let mut m = Message::new(req, 1, payload);
            for _ in 0..nfds {
                m.fds.push(file.as_fd().try_clone_to_owned().unwrap());
            }
            journal.record(m, None);
            let regions = journal.regions();
            let table_fds: usize = journal
                .entries()
                .iter()
                .filter(|e| matches!(e.msg.request, request::SET_MEM_TABLE | request::ADD_MEM_REG))
                .map(|e| e.msg.fds.len())
                .sum();
            prop_assert!(regions.len() <= table_fds, "{} regions from {} descriptors", regions.len(), table_fds);
            for r in &regions {
                if let Some(off) = r.file_offset(addr, len) {
                    // Inside the region, at the right place in its file.
                    prop_assert!(addr >= r.frontend_addr);
                    let rel = addr - r.frontend_addr;
                    prop_assert!(rel.checked_add(len).is_some_and(|e| e <= r.size));
                    prop_assert_eq!(Some(off), r.mmap_offset.checked_add(rel));
                }
            }
            let _ = journal.used_ring_addr(ring);
            prop_assert!(journal.ring_eventfds().len() <= journal.entries().iter().map(|e| e.msg.fds.len()).sum::<usize>());
        }
    }
}
