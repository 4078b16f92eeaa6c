//! Serves the control API (api.rs) on a Unix socket through the project's one JSON-lines
//! server (balloon_protocol::lines: bounded lines, idle timeouts, a connection cap, replies
//! that never block the daemon): one JSON line per request, one per reply; `watch` streams a
//! status line after every tick. Bad requests get an error reply and the daemon stays up.

use crate::api::{ApiMessage, ApiReply, ApiRequest, API_VERSION};
use crate::daemon::Shared;
use balloon_protocol::lines::{
    decode_versioned, json_line, DecodeError, Flow, Framing, Limits, LineServer, Outbox, Service,
    Session,
};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The API's limits: operators and `balloonctl watch` (which streams and is never idle).
fn limits() -> Limits {
    Limits {
        max_line_bytes: MAX_REQUEST_BYTES,
        ..Limits::default()
    }
}

struct Api(Arc<Shared>);

struct ApiSession {
    shared: Arc<Shared>,
    outbox: Outbox,
    /// Set while a watch streams to this connection.
    watching: Arc<AtomicBool>,
}

impl Service for Api {
    type Session = ApiSession;

    fn open(&self, outbox: Outbox) -> ApiSession {
        ApiSession {
            shared: self.0.clone(),
            outbox,
            watching: Arc::new(AtomicBool::new(false)),
        }
    }

    fn refusal(&self, reason: &str) -> String {
        json_line(&ApiReply::error(reason))
    }
}

impl Session for ApiSession {
    fn line(&mut self, text: &str) -> Flow {
        match parse(text) {
            Ok(ApiRequest::Watch {}) => {
                if !self.watching.swap(true, Ordering::Relaxed) {
                    let (shared, outbox, watching) = (
                        self.shared.clone(),
                        self.outbox.clone(),
                        self.watching.clone(),
                    );
                    let spawned =
                        std::thread::Builder::new()
                            .name("api-watch".into())
                            .spawn(move || {
                                watch(&shared, &outbox);
                                watching.store(false, Ordering::Relaxed);
                            });
                    if spawned.is_err() {
                        self.watching.store(false, Ordering::Relaxed);
                        let _ = self
                            .outbox
                            .send(json_line(&ApiReply::error("cannot start the watch")));
                    }
                }
                Flow::Continue
            }
            Ok(request) => self.reply(&self.shared.handle(request)),
            Err(e) => self.reply(&ApiReply::error(e)),
        }
    }

    fn streaming(&self) -> bool {
        self.watching.load(Ordering::Relaxed)
    }
}

impl ApiSession {
    fn reply(&self, reply: &ApiReply) -> Flow {
        match self.outbox.send(json_line(reply)) {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Close,
        }
    }
}

/// Serves the API until the listener fails.
pub fn serve(listener: UnixListener, shared: Arc<Shared>) {
    Arc::new(LineServer::new("api", Arc::new(Api(shared)), limits())).serve(listener);
}

fn parse(line: &str) -> Result<ApiRequest, String> {
    let framing = Framing {
        version_key: "version",
        tag_key: "cmd",
        version: API_VERSION,
    };
    decode_versioned::<ApiMessage>(line, framing)
        .map(|m| m.request)
        .map_err(|e| match e {
            DecodeError::Version(v) => {
                format!("unsupported API version {v} (this is {API_VERSION})")
            }
            other => other.to_string(),
        })
}

/// Sends the status now and after every tick until the connection ends (a watcher that does
/// not read is dropped by its outbox, never waited on).
fn watch(shared: &Shared, outbox: &Outbox) {
    let mut seen = u64::MAX;
    while outbox.is_open() {
        let status = {
            let mut s = shared.status.lock().unwrap_or_else(|e| e.into_inner());
            while s.ticks == seen && !shared.stop.load(Ordering::Relaxed) && outbox.is_open() {
                s = shared
                    .ticked
                    .wait_timeout(s, std::time::Duration::from_secs(1))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            s.clone()
        };
        if shared.stop.load(Ordering::Relaxed) || status.ticks == seen {
            return;
        }
        seen = status.ticks;
        if outbox.send(json_line(&ApiReply::status(status))).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actuator::ActuatorConfig;
    use crate::daemon::{tick, Budget};
    use crate::engine::Engine;
    use crate::policy::PolicyConfig;
    use balloon_protocol::lines::LineClient;
    use std::time::{Duration, Instant};

    fn reply(text: &str) -> ApiReply {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn serves_requests_streams_watch_and_refuses_long_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let engine = Engine::new(PolicyConfig::default(), ActuatorConfig::default());
        let shared = Shared::new(engine, Vec::new(), Duration::from_millis(100)).unwrap();
        let s = shared.clone();
        std::thread::spawn(move || serve(listener, s));
        let timeout = Duration::from_secs(5);
        let mut c = LineClient::connect(&path, timeout).unwrap();
        assert!(reply(&c.exchange("{\"version\":1,\"cmd\":\"status\"}\n").unwrap()).ok);
        let bad = reply(&c.exchange("{\"version\":9,\"cmd\":\"status\"}\n").unwrap());
        assert!(bad.error.unwrap().contains("version 9"));
        // A watch gets the status now and after every tick.
        let mut w = LineClient::connect(&path, timeout).unwrap();
        let first = reply(&w.exchange("{\"version\":1,\"cmd\":\"watch\"}\n").unwrap());
        let ticks = first.status.unwrap().ticks;
        let budget = Budget {
            fixed: Some(1 << 30),
            reserve: 0,
        };
        tick(&shared, budget, Instant::now()).expect("a tick");
        let next = reply(&w.read_line().unwrap());
        assert_eq!(next.status.unwrap().ticks, ticks + 1);
        // An endless line ends only its own connection.
        let long = "x".repeat(MAX_REQUEST_BYTES + 10) + "\n";
        let refused = reply(&c.exchange(&long).unwrap());
        assert!(refused.error.unwrap().contains("longer than"));
        let mut c2 = LineClient::connect(&path, timeout).unwrap();
        assert!(reply(&c2.exchange("{\"version\":1,\"cmd\":\"status\"}\n").unwrap()).ok);
    }

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse(r#"{"version":1,"cmd":"status"}"#),
            Ok(ApiRequest::Status {})
        );
        assert_eq!(
            parse(r#"{"version":1,"cmd":"set","guest":"a","memory_bytes":5}"#),
            Ok(ApiRequest::Set {
                guest: "a".into(),
                memory_bytes: 5
            })
        );
        for (line, want) in [
            ("nope", "not JSON"),
            (r#"{"cmd":"status"}"#, "missing"),
            (r#"{"version":7,"cmd":"status"}"#, "version 7"),
            (r#"{"version":1,"cmd":"launch"}"#, "bad request"),
            (r#"{"version":1,"cmd":"set","guest":"a"}"#, "bad request"),
            // Commands without fields refuse unknown ones too.
            (
                r#"{"version":1,"cmd":"status","guest":"a"}"#,
                "unknown field",
            ),
            (r#"{"version":1,"cmd":"watch","x":1}"#, "unknown field"),
            (
                r#"{"version":1,"cmd":"policy_show","kind":"mom"}"#,
                "unknown field",
            ),
        ] {
            let err = parse(line).unwrap_err();
            assert!(err.contains(want), "{line}: {err}");
        }
    }
}
