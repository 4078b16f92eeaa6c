//! Serves the control API (api.rs) on a Unix socket: one JSON line per request, one per reply;
//! `watch` streams a status line after every tick. Bad requests get an error reply and the
//! daemon stays up.

use crate::api::{ApiMessage, ApiReply, ApiRequest, API_VERSION};
use crate::daemon::Shared;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const MAX_REQUEST_BYTES: u64 = 64 * 1024;

pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub fn serve(listener: UnixListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let shared = shared.clone();
                if let Err(e) = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || connection(stream, &shared))
                {
                    log::error!("api: cannot start a connection thread: {e}");
                }
            }
            Err(e) => log::warn!("api: accept: {e}"),
        }
    }
}

fn parse(line: &str) -> Result<ApiRequest, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(API_VERSION) => {}
        Some(v) => {
            return Err(format!(
                "unsupported API version {v} (this is {API_VERSION})"
            ))
        }
        None => return Err("missing \"version\"".into()),
    }
    serde_json::from_value::<ApiMessage>(value)
        .map(|m| m.request)
        .map_err(|e| format!("bad request: {e}"))
}

fn send(w: &mut UnixStream, reply: &ApiReply) -> std::io::Result<()> {
    let mut text = serde_json::to_string(reply).map_err(std::io::Error::from)?;
    text.push('\n');
    w.write_all(text.as_bytes())
}

fn connection(stream: UnixStream, shared: &Shared) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match (&mut reader)
            .take(MAX_REQUEST_BYTES + 1)
            .read_line(&mut line)
        {
            Ok(0) => return,
            Ok(n) if n as u64 > MAX_REQUEST_BYTES => {
                let _ = send(&mut writer, &ApiReply::error("request too long"));
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let _ = send(&mut writer, &ApiReply::error(format!("unreadable: {e}")));
                return;
            }
        }
        if line.trim().is_empty() {
            continue;
        }
        match parse(line.trim()) {
            Ok(ApiRequest::Watch) => {
                watch(&mut writer, shared);
                return;
            }
            Ok(request) => {
                if send(&mut writer, &shared.handle(request)).is_err() {
                    return;
                }
            }
            Err(e) => {
                if send(&mut writer, &ApiReply::error(e)).is_err() {
                    return;
                }
            }
        }
    }
}

/// Sends the status now and after every tick until the client goes away.
fn watch(writer: &mut UnixStream, shared: &Shared) {
    let mut seen = u64::MAX;
    loop {
        let status = {
            let mut s = shared.status.lock().unwrap_or_else(|e| e.into_inner());
            while s.ticks == seen && !shared.stop.load(Ordering::Relaxed) {
                s = shared.ticked.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.clone()
        };
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        seen = status.ticks;
        if send(writer, &ApiReply::status(status)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse;
    use crate::api::ApiRequest;

    #[test]
    fn requests_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse(r#"{"version":1,"cmd":"status"}"#),
            Ok(ApiRequest::Status)
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
        ] {
            let err = parse(line).unwrap_err();
            assert!(err.contains(want), "{line}: {err}");
        }
    }
}
