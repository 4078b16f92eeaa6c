//! Reading and writing lines by a deadline, for the server and the client alike: a peer that
//! sends or takes a byte now and then cannot stretch either.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// Writes `line` within `deadline`, however the peer takes it (a byte at a time included).
pub(super) fn write_by(stream: &UnixStream, line: &[u8], deadline: Instant) -> io::Result<()> {
    let mut rest = line;
    let mut w = stream;
    while !rest.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        w.set_write_timeout(Some(left))?;
        match w.write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How reading a line ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LineRead {
    /// `buf` ends with a newline.
    Line,
    /// The peer closed (a partial line is left in `buf`).
    End,
    /// More than `max` bytes without a newline.
    TooLong,
    /// `deadline` passed (a partial line stays in `buf`, to be continued).
    TimedOut,
}

/// Reads into `buf` until a newline, the end, `max` bytes, or `deadline`, whichever comes
/// first. One read at a time, each bounded by what is left of the deadline: a peer sending a
/// byte now and then cannot stretch it.
pub(super) fn read_line_by(
    reader: &mut BufReader<UnixStream>,
    buf: &mut Vec<u8>,
    max: usize,
    deadline: Instant,
) -> io::Result<LineRead> {
    loop {
        if buf.len() > max {
            return Ok(LineRead::TooLong);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(LineRead::TimedOut);
        }
        reader.get_ref().set_read_timeout(Some(left))?;
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::TimedOut
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(LineRead::End);
        }
        let (n, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        let n = n.min(max + 1 - buf.len());
        buf.extend_from_slice(&available[..n]);
        reader.consume(n);
        if done && buf.last() == Some(&b'\n') {
            return Ok(LineRead::Line);
        }
    }
}
