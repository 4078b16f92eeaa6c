//! The client side: every exchange within a deadline, replies bounded.

use super::line_io::{read_line_by, write_by, LineRead};
use std::io::{self, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A client for a JSON-lines socket with a deadline on every exchange and a bound on replies.
pub struct LineClient {
    reader: BufReader<UnixStream>,
    timeout: Duration,
    max_reply_bytes: usize,
}

impl LineClient {
    /// Connects at once (a server whose queue is full is an error, never a wait); every
    /// exchange then has `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<Self> {
        let stream = crate::socket::connect(path)?;
        Ok(LineClient {
            reader: BufReader::new(stream),
            timeout,
            max_reply_bytes: 16 << 20,
        })
    }

    pub fn with_max_reply_bytes(mut self, bytes: usize) -> Self {
        self.max_reply_bytes = bytes;
        self
    }

    /// Sends `line` (with its newline) and reads one reply line, all within the timeout.
    pub fn exchange(&mut self, line: &str) -> io::Result<String> {
        let deadline = Instant::now() + self.timeout;
        write_by(self.reader.get_ref(), line.as_bytes(), deadline)?;
        self.read_line_by(deadline)
    }

    /// Sends `line` (with its newline) within the timeout, reading nothing.
    pub fn send(&mut self, line: &str) -> io::Result<()> {
        write_by(
            self.reader.get_ref(),
            line.as_bytes(),
            Instant::now() + self.timeout,
        )
    }

    /// Reads one line within the timeout (for servers that push lines).
    pub fn read_line(&mut self) -> io::Result<String> {
        self.read_line_by(Instant::now() + self.timeout)
    }

    fn read_line_by(&mut self, deadline: Instant) -> io::Result<String> {
        let mut buf = Vec::new();
        match read_line_by(&mut self.reader, &mut buf, self.max_reply_bytes, deadline)? {
            LineRead::Line => {}
            LineRead::End => return Err(io::ErrorKind::UnexpectedEof.into()),
            LineRead::TooLong => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("reply longer than {} bytes", self.max_reply_bytes),
                ))
            }
            LineRead::TimedOut => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no reply in time"))
            }
        }
        String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}
