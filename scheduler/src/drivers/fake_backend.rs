//! A fake vhost-balloon-backend control socket for tests and benchmarks: it answers `status` and
//! `set_target` as the backend does (JSON lines of balloon-protocol's types), with a balloon
//! that reaches its target at once. Switched to `hang`, it accepts connections and reads
//! requests but never answers, as a VMM that stopped responding (with `hang_writes`, only
//! `set_target` requests go unanswered): the connections stay open until the fake is dropped.

use balloon_protocol::control::{BackendStatus, ControlMessage, GuestStatsSnapshot};
use balloon_protocol::{ControlReply, ControlRequest};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Default)]
struct State {
    guest_ram: u64,
    target: u64,
    /// Requests answered.
    answered: u64,
    /// Requests read and left unanswered (while hanging).
    ignored: u64,
    /// Every target set, oldest first.
    targets: Vec<u64>,
    /// Connections held open without an answer.
    held: Vec<UnixStream>,
}

struct Inner {
    state: Mutex<State>,
    hang: AtomicBool,
    hang_writes: AtomicBool,
    closed: AtomicBool,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct FakeBackend {
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
    inner: Arc<Inner>,
}

impl FakeBackend {
    /// A backend whose guest has `guest_ram` bytes, answering every request.
    pub fn start(guest_ram: u64) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("fake-backend").tempdir()?;
        let socket = dir.path().join("control.sock");
        let listener = UnixListener::bind(&socket)?;
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                guest_ram,
                ..Default::default()
            }),
            hang: AtomicBool::new(false),
            hang_writes: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        let i = inner.clone();
        std::thread::Builder::new()
            .name("fake-backend".into())
            .spawn(move || accept(listener, i))?;
        Ok(FakeBackend {
            socket,
            _dir: dir,
            inner,
        })
    }

    /// A control socket that accepts and never answers.
    pub fn hung() -> std::io::Result<Self> {
        let b = Self::start(1 << 30)?;
        b.set_hang(true);
        Ok(b)
    }

    /// Stops (true) or resumes (false) answering. Connections held while hanging stay
    /// unanswered; new requests are answered again.
    pub fn set_hang(&self, hang: bool) {
        self.inner.hang.store(hang, Ordering::SeqCst);
    }

    /// Stops (true) or resumes (false) answering `set_target` requests only.
    pub fn set_hang_writes(&self, hang: bool) {
        self.inner.hang_writes.store(hang, Ordering::SeqCst);
    }

    /// The balloon target last set.
    pub fn target(&self) -> u64 {
        self.inner.state().target
    }

    /// Every target set, oldest first.
    pub fn targets(&self) -> Vec<u64> {
        self.inner.state().targets.clone()
    }

    /// Requests answered so far.
    pub fn answered(&self) -> u64 {
        self.inner.state().answered
    }

    /// Requests read and left unanswered so far.
    pub fn ignored(&self) -> u64 {
        self.inner.state().ignored
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        // Wakes the accepting thread so that it sees `closed` and ends.
        let _ = UnixStream::connect(&self.socket);
        self.inner.state().held.clear();
    }
}

fn accept(listener: UnixListener, inner: Arc<Inner>) {
    for conn in listener.incoming() {
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        let i = inner.clone();
        let _ = std::thread::Builder::new()
            .name("fake-backend-conn".into())
            .spawn(move || serve(conn, &i));
    }
}

fn status(s: &State) -> BackendStatus {
    let allocation = s.guest_ram.saturating_sub(s.target);
    BackendStatus {
        device_started: true,
        guest_ram_bytes: s.guest_ram,
        target_bytes: s.target,
        actual_bytes: s.target,
        ballooned_bytes: s.target,
        actual_from_driver: true,
        driver_actual_bytes: Some(s.target),
        stats: Some(GuestStatsSnapshot {
            age_seconds: 0.5,
            values: [
                ("available_memory".to_string(), allocation / 2),
                ("total_memory".to_string(), allocation),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn serve(conn: UnixStream, inner: &Inner) {
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        let request = serde_json::from_str::<ControlMessage>(line.trim());
        let is_write = matches!(
            &request,
            Ok(ControlMessage {
                request: ControlRequest::SetTarget { .. },
                ..
            })
        );
        let mut s = inner.state();
        if inner.hang.load(Ordering::SeqCst)
            || (is_write && inner.hang_writes.load(Ordering::SeqCst))
        {
            // Read, never answered: the connection stays open until the fake is dropped.
            s.ignored += 1;
            s.held.push(writer);
            return;
        }
        let reply = match request {
            Ok(m) => match m.request {
                ControlRequest::Status {} => ControlReply::status(status(&s)),
                ControlRequest::SetTarget { target_bytes } if target_bytes <= s.guest_ram => {
                    s.target = target_bytes;
                    s.targets.push(target_bytes);
                    ControlReply::status(status(&s))
                }
                ControlRequest::SetTarget { .. } => {
                    ControlReply::error("target beyond the guest's RAM")
                }
                _ => ControlReply::error("not supported by the fake"),
            },
            Err(e) => ControlReply::error(format!("bad request: {e}")),
        };
        s.answered += 1;
        drop(s);
        let mut text = serde_json::to_string(&reply).unwrap_or_default();
        text.push('\n');
        if writer.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}
