//! A client for the backend's control socket, for the scheduler, `balloonctl`, tests and
//! benchmarks.

use crate::control::{ControlMessage, ControlReply, ControlRequest};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// A client for the control socket (used by tests, the benchmarks and the scheduler's driver).
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    pub fn connect(path: &Path) -> std::io::Result<Self> {
        let stream = UnixStream::connect(path)?;
        Ok(ControlClient {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    pub fn request(&mut self, request: ControlRequest) -> std::io::Result<ControlReply> {
        let mut text = serde_json::to_string(&ControlMessage::new(request))?;
        text.push('\n');
        self.send_raw(&text)
    }

    /// Sends a raw line (for tests of bad input) and reads one reply.
    pub fn send_raw(&mut self, line: &str) -> std::io::Result<ControlReply> {
        self.writer.write_all(line.as_bytes())?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(serde_json::from_str(&reply)?)
    }
}
