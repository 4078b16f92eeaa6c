//! The control socket: a Unix socket (mode 0600) speaking JSON lines (balloon_protocol::control).
//! Every request gets one reply; a bad request gets an error reply and the connection and the
//! daemon stay up.

use balloon_protocol::control::{ControlMessage, ControlReply, ControlRequest};
#[cfg(test)]
use balloon_protocol::ControlClient;
use balloon_protocol::CONTROL_PROTOCOL_VERSION;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

/// The longest request line accepted; longer ones are refused and the connection closed.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// What the control socket drives.
pub trait ControlHandler: Send + Sync + 'static {
    fn handle(&self, request: ControlRequest) -> ControlReply;
}

/// Binds the control socket, replacing a stale one, with mode 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves connections until the listener fails; each connection on its own thread.
pub fn serve(listener: UnixListener, handler: Arc<dyn ControlHandler>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let handler = handler.clone();
                let spawned = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || serve_connection(stream, &*handler));
                if let Err(e) = spawned {
                    log::error!("control: cannot start a connection thread: {e}");
                }
            }
            Err(e) => log::warn!("control: accept failed: {e}"),
        }
    }
}

/// Parses one request line and runs it.
pub fn reply_to_line(line: &str, handler: &dyn ControlHandler) -> ControlReply {
    let value: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return ControlReply::error(format!("not JSON: {e}")),
    };
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(CONTROL_PROTOCOL_VERSION) => {}
        Some(v) => {
            return ControlReply::error(format!(
                "unsupported protocol version {v} (this backend speaks {CONTROL_PROTOCOL_VERSION})"
            ))
        }
        None => return ControlReply::error("missing \"version\""),
    }
    match serde_json::from_value::<ControlMessage>(value) {
        Ok(msg) => handler.handle(msg.request),
        Err(e) => ControlReply::error(format!("bad request: {e}")),
    }
}

fn serve_connection(stream: UnixStream, handler: &dyn ControlHandler) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = match (&mut reader)
            .take(MAX_REQUEST_BYTES + 1)
            .read_line(&mut line)
        {
            Ok(n) => n,
            Err(e) => {
                let reply = ControlReply::error(format!("unreadable request: {e}"));
                let _ = send(&mut writer, &reply);
                return;
            }
        };
        if n == 0 {
            return;
        }
        if n as u64 > MAX_REQUEST_BYTES {
            let _ = send(
                &mut writer,
                &ControlReply::error(format!("request longer than {MAX_REQUEST_BYTES} bytes")),
            );
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        let reply = reply_to_line(line.trim(), handler);
        if send(&mut writer, &reply).is_err() {
            return;
        }
    }
}

fn send(writer: &mut UnixStream, reply: &ControlReply) -> std::io::Result<()> {
    let mut text = serde_json::to_string(reply).map_err(std::io::Error::from)?;
    text.push('\n');
    writer.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use balloon_protocol::BackendStatus;
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
        let dir = std::env::temp_dir().join(format!("control-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let listener = bind(&path).unwrap();
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
        let reply = c.request(ControlRequest::Status).unwrap();
        assert!(reply.ok);
        let reply = c
            .request(ControlRequest::SetTarget { target_bytes: 5 })
            .unwrap();
        assert!(!reply.ok);
        assert_eq!(handler.0.lock().unwrap().len(), 2);
        // An endless line closes that connection only.
        let long = "x".repeat(MAX_REQUEST_BYTES as usize + 10) + "\n";
        let reply = c.send_raw(&long).unwrap();
        assert!(!reply.ok);
        let mut c2 = ControlClient::connect(&path).unwrap();
        assert!(c2.request(ControlRequest::Status).unwrap().ok);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
