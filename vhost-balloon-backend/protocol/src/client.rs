//! A client for the backend's control socket, for the scheduler, `balloonctl`, tests and
//! benchmarks: every exchange has a deadline and a bounded reply.

use crate::control::{ControlMessage, ControlReply, ControlRequest};
use crate::lines::LineClient;
use std::path::Path;
use std::time::Duration;

/// How long a request may take unless the caller says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ControlClient {
    inner: LineClient,
}

impl ControlClient {
    pub fn connect(path: &Path) -> std::io::Result<Self> {
        Self::connect_with_timeout(path, DEFAULT_TIMEOUT)
    }

    pub fn connect_with_timeout(path: &Path, timeout: Duration) -> std::io::Result<Self> {
        Ok(ControlClient {
            inner: LineClient::connect(path, timeout)?,
        })
    }

    pub fn request(&mut self, request: ControlRequest) -> std::io::Result<ControlReply> {
        let mut text = serde_json::to_string(&ControlMessage::new(request))?;
        text.push('\n');
        self.send_raw(&text)
    }

    /// Sends a raw line (for tests of bad input) and reads one reply.
    pub fn send_raw(&mut self, line: &str) -> std::io::Result<ControlReply> {
        let reply = self.inner.exchange(line)?;
        Ok(serde_json::from_str(&reply)?)
    }
}
