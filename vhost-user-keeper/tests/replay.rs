//! The keeper between a scripted frontend and scripted backends over real Unix sockets: what
//! the frontend may negotiate, which acknowledgements it sees, and what a new backend is told.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;
use vhost_user_keeper::keeper::Keeper;
use vhost_user_keeper::message::{
    self, request::*, Message, FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION_1, PROTOCOL_FEATURES_KEPT,
    PROTOCOL_F_REPLY_ACK, VIRTIO_F_RING_PACKED,
};

const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;

struct Sockets {
    dir: PathBuf,
    frontend: PathBuf,
    backend: PathBuf,
}

fn start_keeper(name: &str) -> Sockets {
    let dir = std::env::temp_dir().join(format!("keeper-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let s = Sockets {
        frontend: dir.join("fe.sock"),
        backend: dir.join("be.sock"),
        dir,
    };
    let mut keeper = Keeper::bind(&s.frontend, &s.backend).unwrap();
    std::thread::spawn(move || loop {
        keeper.step().unwrap();
    });
    s
}

fn u64_msg(request: u32, flags: u32, v: u64) -> Message {
    Message::new(request, flags, v.to_le_bytes().to_vec())
}

fn ring_state(request: u32, index: u32, num: u32) -> Message {
    let mut p = index.to_le_bytes().to_vec();
    p.extend_from_slice(&num.to_le_bytes());
    Message::new(request, FLAG_VERSION_1, p)
}

/// A backend that answers every question and acknowledges what asks for it, refusing a ring
/// size of 0; it reports every request it saw (with the flags it came with).
struct FakeBackend {
    seen: mpsc::Receiver<(u32, u32, Vec<u8>)>,
    stream: UnixStream,
}

impl FakeBackend {
    /// As a crash: the connection closes.
    fn kill(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

fn fake_backend(socket: &std::path::Path) -> FakeBackend {
    let stream = UnixStream::connect(socket).unwrap();
    let own = stream.try_clone().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        while let Ok(Some(m)) = message::recv(&stream) {
            let reply =
                |payload: Vec<u8>| Message::new(m.request, FLAG_VERSION_1 | FLAG_REPLY, payload);
            let answer = match m.request {
                GET_FEATURES => Some(reply(
                    (PROTOCOL_FEATURES_BIT | VIRTIO_F_RING_PACKED | 1)
                        .to_le_bytes()
                        .to_vec(),
                )),
                GET_PROTOCOL_FEATURES => Some(reply(u64::MAX.to_le_bytes().to_vec())),
                GET_CONFIG => Some(reply(m.payload.clone())),
                _ if m.flags & FLAG_NEED_REPLY != 0 => {
                    let refused = m.request == SET_VRING_NUM && m.u32_at(4) == Some(0);
                    Some(reply(u64::from(refused).to_le_bytes().to_vec()))
                }
                _ => None,
            };
            let _ = tx.send((m.request, m.flags, m.payload.clone()));
            if let Some(a) = answer {
                if message::send(&stream, &a).is_err() {
                    return;
                }
            }
        }
    });
    FakeBackend {
        seen: rx,
        stream: own,
    }
}

fn ask(fe: &UnixStream, m: &Message) -> Message {
    message::send(fe, m).unwrap();
    message::recv(fe).unwrap().unwrap()
}

fn seen_until(b: &FakeBackend, last: u32) -> Vec<(u32, u32, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let m = b
            .seen
            .recv_timeout(Duration::from_secs(10))
            .expect("the backend saw too little");
        let done = m.0 == last;
        out.push(m);
        if done {
            return out;
        }
    }
}

#[test]
fn the_frontend_sees_only_what_can_be_replayed_and_a_new_backend_only_what_was_accepted() {
    let s = start_keeper("replay");
    let first = fake_backend(&s.backend);
    let fe = UnixStream::connect(&s.frontend).unwrap();
    fe.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

    // Packed rings and protocol features the journal cannot replay are hidden.
    let features = ask(&fe, &Message::new(GET_FEATURES, FLAG_VERSION_1, Vec::new()));
    assert_eq!(features.u64_at(0), Some(PROTOCOL_FEATURES_BIT | 1));
    let pf = ask(
        &fe,
        &Message::new(GET_PROTOCOL_FEATURES, FLAG_VERSION_1, Vec::new()),
    );
    assert_eq!(pf.u64_at(0), Some(PROTOCOL_FEATURES_KEPT));

    // REPLY_ACK: the keeper asks for acknowledgements the frontend did not, and keeps them to
    // itself; the next reply the frontend reads is the answer to its next question.
    message::send(
        &fe,
        &u64_msg(SET_PROTOCOL_FEATURES, FLAG_VERSION_1, PROTOCOL_F_REPLY_ACK),
    )
    .unwrap();
    message::send(
        &fe,
        &u64_msg(SET_FEATURES, FLAG_VERSION_1, PROTOCOL_FEATURES_BIT | 1),
    )
    .unwrap();
    message::send(&fe, &ring_state(SET_VRING_NUM, 0, 64)).unwrap();
    // Refused by the backend: not kept.
    message::send(&fe, &ring_state(SET_VRING_NUM, 1, 0)).unwrap();
    // An acknowledgement the frontend asked for reaches it.
    let mut asked = ring_state(SET_VRING_BASE, 0, 5);
    asked.flags |= FLAG_NEED_REPLY;
    let ack = ask(&fe, &asked);
    assert_eq!((ack.request, ack.u64_at(0)), (SET_VRING_BASE, Some(0)));
    let config = ask(&fe, &Message::new(GET_CONFIG, FLAG_VERSION_1, vec![7; 20]));
    assert_eq!((config.request, config.payload), (GET_CONFIG, vec![7; 20]));
    let seen = seen_until(&first, GET_CONFIG);
    assert!(
        seen.iter()
            .filter(|(r, ..)| *r != GET_FEATURES && *r != GET_PROTOCOL_FEATURES && *r != GET_CONFIG)
            .all(|(_, flags, _)| flags & FLAG_NEED_REPLY != 0),
        "every message after REPLY_ACK asked for an acknowledgement: {seen:?}"
    );

    // The backend dies; a new one is told what the old one accepted, in order, and answers
    // the frontend's next question on the same connection.
    first.kill();
    let second = fake_backend(&s.backend);
    let config = ask(&fe, &Message::new(GET_CONFIG, FLAG_VERSION_1, vec![9; 20]));
    assert_eq!(config.payload, vec![9; 20]);
    let replayed: Vec<(u32, Option<u32>)> = seen_until(&second, GET_CONFIG)
        .iter()
        .map(|(r, _, p)| {
            (
                *r,
                p.get(4..8)
                    .map(|b| u32::from_le_bytes(b.try_into().unwrap())),
            )
        })
        .collect();
    let requests: Vec<u32> = replayed.iter().map(|(r, _)| *r).collect();
    assert_eq!(
        requests,
        vec![
            GET_FEATURES,
            GET_PROTOCOL_FEATURES,
            SET_PROTOCOL_FEATURES,
            SET_FEATURES,
            SET_VRING_NUM,
            SET_VRING_BASE,
            GET_CONFIG
        ]
    );
    assert_eq!(replayed[4].1, Some(64), "only the accepted ring size");
    std::fs::remove_dir_all(&s.dir).unwrap();
}

#[test]
fn a_backend_that_answers_differently_is_not_attached() {
    let s = start_keeper("different");
    let first = fake_backend(&s.backend);
    let fe = UnixStream::connect(&s.frontend).unwrap();
    fe.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    ask(&fe, &Message::new(GET_FEATURES, FLAG_VERSION_1, Vec::new()));
    first.kill();
    // A backend offering other features: the keeper waits for one that matches.
    let odd = UnixStream::connect(&s.backend).unwrap();
    let m = message::recv(&odd).unwrap().unwrap();
    assert_eq!(m.request, GET_FEATURES);
    message::send(
        &odd,
        &Message::new(
            GET_FEATURES,
            FLAG_VERSION_1 | FLAG_REPLY,
            2u64.to_le_bytes().to_vec(),
        ),
    )
    .unwrap();
    assert!(matches!(message::recv(&odd), Ok(None) | Err(_)), "refused");
    let _good = fake_backend(&s.backend);
    let config = ask(&fe, &Message::new(GET_CONFIG, FLAG_VERSION_1, vec![3; 20]));
    assert_eq!(config.payload, vec![3; 20]);
    std::fs::remove_dir_all(&s.dir).unwrap();
}
