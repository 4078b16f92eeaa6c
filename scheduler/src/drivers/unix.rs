//! The drivers' Unix-socket transport: a stream whose reads and writes share one deadline per
//! request (connecting through balloon_protocol::socket::connect, which never hangs), and
//! bounded line reads.
//!
//! The scheduler asks every guest's driver at once, each on its own thread (drivers/pool.rs),
//! and stops waiting at the tick's deadline; a request still ends within its timeout here, so a
//! VMM that stops answering holds its driver's thread for that long at most, and nothing a peer
//! sends can make the driver allocate without bound or panic.

use std::io::{self, BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// The shortest timeout used: a zero timeout would mean "none" to the socket options.
const MIN_TIMEOUT: Duration = Duration::from_millis(1);

fn timed_out(what: &str, timeout: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{what}: no answer within {timeout:?}"),
    )
}

/// A Unix stream whose reads and writes share one deadline, set per request with
/// [`TimedStream::start`]: a peer that answers a byte at a time cannot stretch a request past
/// its timeout.
pub struct TimedStream {
    stream: UnixStream,
    timeout: Duration,
    deadline: Instant,
}

impl TimedStream {
    /// Connects; the connection and whatever is read or written before the next
    /// [`TimedStream::start`] share one `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = balloon_protocol::socket::connect(path)?;
        Ok(TimedStream {
            stream,
            timeout,
            deadline,
        })
    }

    /// Starts a request: everything until the next `start` must happen within the timeout.
    pub fn start(&mut self) {
        self.deadline = Instant::now() + self.timeout;
    }

    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(timed_out("request", self.timeout))
        } else {
            Ok(left)
        }
    }

    /// A socket timeout shows as EAGAIN (`WouldBlock`); call it what it is.
    fn map_timeout(&self, e: io::Error) -> io::Error {
        if e.kind() == io::ErrorKind::WouldBlock {
            timed_out("request", self.timeout)
        } else {
            e
        }
    }
}

impl Read for TimedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.set_read_timeout(Some(left.max(MIN_TIMEOUT)))?;
        self.stream.read(buf).map_err(|e| self.map_timeout(e))
    }
}

impl Write for TimedStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.set_write_timeout(Some(left.max(MIN_TIMEOUT)))?;
        self.stream.write(buf).map_err(|e| self.map_timeout(e))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads one line ending in `\n`, of at most `max` bytes with the newline. End of stream before
/// the first byte is `UnexpectedEof`; a longer line or one that is not UTF-8 is `InvalidData`.
pub fn read_line_bounded<R: BufRead>(reader: &mut R, max: usize) -> io::Result<String> {
    let mut buf = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX);
    let n = reader.by_ref().take(limit).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the connection",
        ));
    }
    if buf.last() != Some(&b'\n') {
        return Err(if buf.len() >= max {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a line longer than {max} bytes"),
            )
        } else {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection in the middle of a line",
            )
        });
    }
    String::from_utf8(buf).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn bounded_lines() {
        let mut c = Cursor::new(b"abc\ndefgh\nij".to_vec());
        assert_eq!(read_line_bounded(&mut c, 4).unwrap(), "abc\n");
        assert_eq!(
            read_line_bounded(&mut c, 4).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let mut c = Cursor::new(b"ij".to_vec());
        assert_eq!(
            read_line_bounded(&mut c, 4).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert_eq!(
            read_line_bounded(&mut Cursor::new(Vec::new()), 4)
                .unwrap_err()
                .kind(),
            io::ErrorKind::UnexpectedEof
        );
        let mut c = Cursor::new(b"\xff\xfe\n".to_vec());
        assert_eq!(
            read_line_bounded(&mut c, 4).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
