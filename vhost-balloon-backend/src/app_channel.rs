//! The guest app channel: serves the user-level balloon app (balloon-guest) of this VM. The
//! backend listens on a Unix socket; QEMU's virtio-serial port connects to it
//! (`-chardev socket,path=APP_SOCKET,reconnect-ms=...` + `virtserialport,name=...`), or the
//! VMM's hybrid vsock socket does (`UDS_PATH_PORT`), and in tests a plain client does. Page
//! ranges from the app are validated (Balloon::app_inflated) and discarded off the device lock,
//! and tracked apart from the driver's.
//!
//! Trust: a connection is nobody until its first line, a hello, passes authentication (the
//! per-VM secret, when the backend has one: required for every transport an unprivileged
//! guest process can open). Anything else first ends the connection. Only the authenticated
//! connection is the app; a later authenticated hello replaces it.
//!
//! A virtio-serial connection outlives the app (the host side stays connected when the guest
//! process dies), so the app's pages count as given back when a new app says hello, when the
//! connection closes, or when the app has been silent for `SILENCE` (it reports its state every
//! second; the server closes a connection that sends no line for that long).

use crate::balloon::{refresh_app_file, Balloon};
use crate::guest_log::GuestEvent;
use crate::memory::file::MemoryFile;
use crate::vhu_balloon::lock;
use balloon_protocol::app::{decode, encode, AppMessage, HostMessage, MAX_LINE_BYTES};
use balloon_protocol::lines::{Flow, Limits, LineServer, Outbox, RateLimitedLog, Service, Session};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An app silent this long is gone.
pub const SILENCE: Duration = Duration::from_secs(5);

/// The shortest secret accepted (bytes).
pub const MIN_SECRET_BYTES: usize = 16;
/// The longest secret accepted (bytes), so that a hello stays short.
pub const MAX_SECRET_BYTES: usize = 1024;
/// The longest line taken before a hello has passed: a hello with the longest secret fits, even
/// with every byte of it escaped in JSON (`\u00XX`, 6 bytes); a peer that has not said who it is
/// cannot make the backend hold a megabyte line (or parse one).
pub const MAX_HELLO_LINE_BYTES: usize = 6 * MAX_SECRET_BYTES + 1024;

/// The per-VM secret an app must present.
#[derive(Clone)]
pub struct AppSecret(Vec<u8>);

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("app secret file {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("app secret file {path}: {len} bytes; at least {MIN_SECRET_BYTES} are needed")]
    TooShort {
        path: std::path::PathBuf,
        len: usize,
    },
    #[error("app secret file {path}: {len} bytes; at most {MAX_SECRET_BYTES} are accepted")]
    TooLong {
        path: std::path::PathBuf,
        len: usize,
    },
    #[error("app secret file {path}: readable by group or others (mode {mode:o}); chmod 600 it")]
    Exposed { path: std::path::PathBuf, mode: u32 },
}

impl AppSecret {
    /// Reads the secret (surrounding whitespace ignored) from a file only its owner can read.
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        use std::os::unix::fs::PermissionsExt;
        let err = |source| SecretError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(err)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(SecretError::Exposed {
                path: path.to_path_buf(),
                mode: mode & 0o777,
            });
        }
        let bytes = std::fs::read(path).map_err(err)?;
        let secret = bytes.trim_ascii().to_vec();
        if secret.len() < MIN_SECRET_BYTES {
            return Err(SecretError::TooShort {
                path: path.to_path_buf(),
                len: secret.len(),
            });
        }
        if secret.len() > MAX_SECRET_BYTES {
            return Err(SecretError::TooLong {
                path: path.to_path_buf(),
                len: secret.len(),
            });
        }
        Ok(AppSecret(secret))
    }

    #[cfg(test)]
    pub fn from_bytes(b: &[u8]) -> Self {
        AppSecret(b.to_vec())
    }

    /// Compares in time independent of where the first difference is.
    fn matches(&self, presented: &str) -> bool {
        let p = presented.trim().as_bytes();
        let differ = self.0.iter().zip(p).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        differ == 0 && p.len() == self.0.len()
    }
}

/// What a connection has shown so far.
enum PeerState {
    /// Nothing yet: the first line must be a hello that authenticates.
    Unauthenticated,
    /// The app's connection (unless a later one replaced it).
    App { pid: u32 },
}

pub struct AppChannel {
    balloon: Arc<Mutex<Balloon>>,
    secret: Option<AppSecret>,
    memory_file: Option<Arc<Mutex<MemoryFile>>>,
    next_session: AtomicU64,
    refusals: Arc<Mutex<RateLimitedLog>>,
}

pub struct AppSession {
    balloon: Arc<Mutex<Balloon>>,
    secret: Option<AppSecret>,
    memory_file: Option<Arc<Mutex<MemoryFile>>>,
    outbox: Outbox,
    id: u64,
    state: PeerState,
    refusals: Arc<Mutex<RateLimitedLog>>,
}

impl AppChannel {
    pub fn new(
        balloon: Arc<Mutex<Balloon>>,
        secret: Option<AppSecret>,
        memory_file: Option<Arc<Mutex<MemoryFile>>>,
    ) -> Self {
        AppChannel {
            balloon,
            secret,
            memory_file,
            next_session: AtomicU64::new(1),
            refusals: Arc::new(Mutex::new(RateLimitedLog::new(Duration::from_secs(10)))),
        }
    }
}

/// The app channel's limits: an app line may carry many ranges; a few connections at most
/// (one app, plus room for its restart), and a connection that has not said hello makes room
/// for a new one (blank lines do not count as saying anything) and has `SILENCE` to say it.
/// The app itself is never evicted.
pub fn limits() -> Limits {
    Limits {
        max_line_bytes: MAX_LINE_BYTES,
        idle_timeout: SILENCE,
        max_connections: 4,
        evict_silent_after: Duration::ZERO,
        evict_idle_after: Duration::MAX,
        write_timeout: Duration::from_secs(2),
        outbox_lines: 32,
        hello_within: SILENCE,
    }
}

impl Service for AppChannel {
    type Session = AppSession;

    fn open(&self, outbox: Outbox) -> AppSession {
        AppSession {
            balloon: self.balloon.clone(),
            secret: self.secret.clone(),
            memory_file: self.memory_file.clone(),
            outbox,
            id: self.next_session.fetch_add(1, Ordering::Relaxed),
            state: PeerState::Unauthenticated,
            refusals: self.refusals.clone(),
        }
    }

    fn refusal(&self, reason: &str) -> String {
        encode(HostMessage::Refused {
            reason: reason.to_string(),
        })
    }
}

impl AppSession {
    fn refuse(&mut self, reason: &str) -> Flow {
        self.refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .warn(|| format!("app channel: connection refused: {reason}"));
        let _ = self.outbox.send(encode(HostMessage::Refused {
            reason: reason.to_string(),
        }));
        Flow::Close
    }

    fn reply(&self, msg: HostMessage) {
        let _ = self.outbox.send(encode(msg));
    }

    fn hello(&mut self, pid: u32, secret: Option<String>) -> Flow {
        if let Some(expected) = &self.secret {
            if !secret.is_some_and(|s| expected.matches(&s)) {
                return self.refuse("authentication failed: wrong or missing secret");
            }
        }
        self.state = PeerState::App { pid };
        lock(&self.balloon).app_hello(self.id, pid, self.outbox.clone());
        // An app in a guest without a balloon driver names its pages in the memory file,
        // which its VMM has created (or recreated, for a new guest) by now. After the hello,
        // which dropped whatever an earlier app held, so a new file ends no connection; its
        // pages arrive later on this same connection.
        if let Some(file) = &self.memory_file {
            if let Err(e) = refresh_app_file(file, &self.balloon) {
                self.refusals
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .warn(|| format!("guest app (pid {pid}): {e}"));
            }
        }
        Flow::Continue
    }
}

impl Session for AppSession {
    fn authenticated(&self) -> bool {
        matches!(self.state, PeerState::App { .. })
    }

    fn max_line_bytes(&self) -> Option<usize> {
        (!self.authenticated()).then_some(MAX_HELLO_LINE_BYTES)
    }

    fn line(&mut self, line: &str) -> Flow {
        let msg = match decode::<AppMessage>(line) {
            Ok(msg) => msg,
            Err(e) => {
                if let PeerState::Unauthenticated = self.state {
                    return self.refuse(&format!("the first message must be a hello ({e})"));
                }
                let mut balloon = lock(&self.balloon);
                balloon.counters.rejected.bad_descriptors += 1;
                balloon
                    .guest_log
                    .warn(GuestEvent::BadAppMessage, || format!("guest app: {e}"));
                return Flow::Continue;
            }
        };
        let pid = match (&self.state, msg) {
            // A new app process on the same connection (virtio-serial outlives the process).
            (_, AppMessage::Hello { pid, secret }) => return self.hello(pid, secret),
            (PeerState::Unauthenticated, _) => return self.refuse("say hello first"),
            (PeerState::App { pid }, msg) => {
                let mut balloon = lock(&self.balloon);
                if !balloon.is_app_session(self.id) {
                    drop(balloon);
                    return self.refuse("another app connection replaced this one");
                }
                let inflate = matches!(msg, AppMessage::Inflated { .. });
                match msg {
                    AppMessage::Hello { .. } => unreachable!("handled above"),
                    AppMessage::Inflated { seq, ranges } | AppMessage::Deflate { seq, ranges } => {
                        let done = if inflate {
                            balloon.app_inflated(&ranges)
                        } else {
                            balloon.app_deflate(&ranges)
                        };
                        drop(balloon);
                        self.reply(match done {
                            Ok(()) => HostMessage::Ack { seq },
                            Err(e) => HostMessage::Nack {
                                seq,
                                reason: e.to_string(),
                            },
                        });
                    }
                    AppMessage::State {
                        held_bytes,
                        psi_some_avg10,
                        stalled,
                        meminfo,
                        ..
                    } => {
                        balloon.app.held_bytes = held_bytes;
                        balloon.app.psi_some_avg10 = psi_some_avg10.filter(is_pressure);
                        balloon.app.stalled = stalled;
                        // Figures no guest of this size could have are dropped, not passed
                        // on to the scheduler's policy.
                        let ram = balloon.guest_ram_bytes();
                        balloon.app.meminfo = meminfo
                            .filter(|m| m.plausible(ram))
                            .map(|m| (m, std::time::Instant::now()));
                    }
                }
                *pid
            }
        };
        log::trace!("guest app (pid {pid}): message handled");
        Flow::Continue
    }

    fn closed(&mut self) {
        lock(&self.balloon).app_closed(self.id);
    }
}

/// Serves the app channel on `listener` until it fails.
pub fn serve(
    listener: UnixListener,
    balloon: Arc<Mutex<Balloon>>,
    secret: Option<AppSecret>,
    memory_file: Option<Arc<Mutex<MemoryFile>>>,
) {
    let server = Arc::new(LineServer::new(
        "app channel",
        Arc::new(AppChannel::new(balloon, secret, memory_file)),
        limits(),
    ));
    server.serve(listener);
}

/// Whether `psi` can be a PSI average (a percentage of time stalled); anything else the app
/// says is dropped rather than handed to the scheduler's policy.
fn is_pressure(psi: &f64) -> bool {
    (0.0..=100.0).contains(psi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_percentages_are_pressure() {
        for p in [0.0, 0.5, 12.25, 100.0] {
            assert!(is_pressure(&p), "{p}");
        }
        for p in [
            -0.5,
            100.01,
            1.4e19,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            assert!(!is_pressure(&p), "{p}");
        }
    }

    #[test]
    fn secrets_match_exactly() {
        let s = AppSecret::from_bytes(b"0123456789abcdef");
        assert!(s.matches("0123456789abcdef"));
        assert!(s.matches("0123456789abcdef\n"));
        assert!(!s.matches("0123456789abcdeF"));
        assert!(!s.matches("0123456789abcde"));
        assert!(!s.matches("0123456789abcdef0"));
        assert!(!s.matches(""));
    }

    #[test]
    fn secret_files_must_be_private_and_long_enough() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        std::fs::write(&p, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            AppSecret::load(&p),
            Err(SecretError::Exposed { .. })
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(AppSecret::load(&p).unwrap().matches("0123456789abcdef0123"));
        std::fs::write(&p, "short\n").unwrap();
        assert!(matches!(
            AppSecret::load(&p),
            Err(SecretError::TooShort { len: 5, .. })
        ));
        // A hello must fit the line a peer may send before it has passed.
        std::fs::write(&p, "k".repeat(MAX_SECRET_BYTES + 1)).unwrap();
        assert!(matches!(
            AppSecret::load(&p),
            Err(SecretError::TooLong { .. })
        ));
    }
}
