//! The control socket: a Unix socket (mode 0600) speaking JSON lines (balloon_protocol::control).
//! Every request gets one reply; a bad request gets an error reply and the connection and the
//! daemon stay up.

use balloon_protocol::control::{ControlMessage, ControlReply, ControlRequest};
use balloon_protocol::lines::{
    decode_versioned, json_line, DecodeError, Flow, Framing, Limits, LineServer, Outbox, Service,
    Session,
};
#[cfg(test)]
use balloon_protocol::ControlClient;
use balloon_protocol::CONTROL_PROTOCOL_VERSION;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

/// The longest request line accepted; longer ones are refused and the connection closed.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What the control socket drives.
pub trait ControlHandler: Send + Sync + 'static {
    fn handle(&self, request: ControlRequest) -> ControlReply;
}

/// The control socket's limits: short requests, a scheduler that asks every tick, operators
/// now and then.
pub fn limits() -> Limits {
    Limits {
        max_line_bytes: MAX_REQUEST_BYTES,
        ..Limits::default()
    }
}

struct ControlService(Arc<dyn ControlHandler>);

struct ControlSession {
    handler: Arc<dyn ControlHandler>,
    outbox: Outbox,
}

impl Service for ControlService {
    type Session = ControlSession;

    fn open(&self, outbox: Outbox) -> ControlSession {
        ControlSession {
            handler: self.0.clone(),
            outbox,
        }
    }

    fn refusal(&self, reason: &str) -> String {
        json_line(&ControlReply::error(reason))
    }
}

impl Session for ControlSession {
    fn line(&mut self, line: &str) -> Flow {
        let reply = reply_to_line(line, &*self.handler);
        match self.outbox.send(json_line(&reply)) {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Close,
        }
    }
}

/// Serves the control socket until the listener fails.
pub fn serve(listener: UnixListener, handler: Arc<dyn ControlHandler>) {
    let server = Arc::new(LineServer::new(
        "control",
        Arc::new(ControlService(handler)),
        limits(),
    ));
    server.serve(listener);
}

/// Parses one request line and runs it.
pub fn reply_to_line(line: &str, handler: &dyn ControlHandler) -> ControlReply {
    let framing = Framing {
        version_key: "version",
        tag_key: "cmd",
        version: CONTROL_PROTOCOL_VERSION,
    };
    match decode_versioned::<ControlMessage>(line, framing) {
        Ok(msg) => handler.handle(msg.request),
        Err(DecodeError::Version(v)) => ControlReply::error(format!(
            "unsupported protocol version {v} (this backend speaks {CONTROL_PROTOCOL_VERSION})"
        )),
        Err(e) => ControlReply::error(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use balloon_protocol::BackendStatus;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Mutex;

    struct Recorder(Mutex<Vec<ControlRequest>>);

    impl ControlHandler for Recorder {
        fn handle(&self, request: ControlRequest) -> ControlReply {
            self.0.lock().unwrap().push(request.clone());
            match request {
                ControlRequest::SetTarget { target_bytes } if target_bytes % 4096 != 0 => {
                    ControlReply::error("not page aligned")
                }
                _ => ControlReply::status(BackendStatus::default()),
            }
        }
    }

    #[test]
    fn bad_requests_get_error_replies_and_the_connection_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let (listener, _socket) =
            balloon_protocol::socket::bind(&path, balloon_protocol::socket::Access::OWNER_ONLY)
                .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let handler = Arc::new(Recorder(Mutex::new(Vec::new())));
        let h: Arc<dyn ControlHandler> = handler.clone();
        std::thread::spawn(move || serve(listener, h));
        let mut c = ControlClient::connect(&path).unwrap();
        for bad in [
            "garbage\n",
            "{\"cmd\":\"status\"}\n",
            "{\"version\":99,\"cmd\":\"status\"}\n",
            "{\"version\":1,\"cmd\":\"explode\"}\n",
            "{\"version\":1,\"cmd\":\"set_target\",\"target_bytes\":\"lots\"}\n",
            "[1,2,3]\n",
        ] {
            let reply = c.send_raw(bad).unwrap();
            assert!(!reply.ok && reply.error.is_some(), "{bad}: {reply:?}");
        }
        let reply = c.request(ControlRequest::Status {}).unwrap();
        assert!(reply.ok);
        let reply = c
            .request(ControlRequest::SetTarget { target_bytes: 5 })
            .unwrap();
        assert!(!reply.ok);
        assert_eq!(handler.0.lock().unwrap().len(), 2);
        // An endless line closes that connection only.
        let long = "x".repeat(MAX_REQUEST_BYTES + 10) + "\n";
        let reply = c.send_raw(&long).unwrap();
        assert!(!reply.ok);
        let mut c2 = ControlClient::connect(&path).unwrap();
        assert!(c2.request(ControlRequest::Status {}).unwrap().ok);
    }
}
