//! The /metrics HTTP server: GET /metrics answered with the exposition, everything else with
//! a clear status. Written here rather than taken from tiny_http, whose server has no read
//! timeout at all (tiny-http issue 143): a scrape must not be starved by clients that drip a
//! byte now and then, so every request has one deadline for all its reads and writes, and the
//! connections answered at once are capped, in all and per local user (peer.rs): one user's
//! connections, however many and however slow, leave room for the scraper's.

use super::CONTENT_TYPE;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod peer;
#[cfg(test)]
mod tests;

/// The most a request line and its headers may take together.
const MAX_REQUEST_HEAD: u64 = 16 * 1024;
/// Connections answered at once; more are refused with 503.
const MAX_CONNECTIONS: usize = 16;
/// Connections answered at once for one local user (a remote peer counts only toward the
/// total): a user who opens more gets 503, and cannot hold the others' slots.
const MAX_PER_USER: usize = 4;
/// How long a client may take, in all, to send its request and take the answer: one deadline
/// per request, not per read, so that a client sending a byte now and then cannot hold a
/// connection slot for longer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// After answering, what is left of the request is read and dropped (so that closing does not
/// reset the connection under the answer), up to this much and this long in all.
const MAX_DRAIN: u64 = 64 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection whose reads and writes must all be done by one deadline: before each, the
/// socket's timeout is set to the time left.
struct Deadlined {
    stream: TcpStream,
    deadline: Instant,
}

impl Deadlined {
    fn left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the request's deadline passed",
            ))
        } else {
            Ok(left)
        }
    }
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for Deadlined {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let left = self.left()?;
        self.stream.set_write_timeout(Some(left))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

#[derive(Debug, PartialEq)]
enum Head {
    Request {
        method: String,
        target: String,
    },
    /// The peer closed before sending anything.
    Closed,
    Malformed,
    TooLarge,
}

fn parse_request_line(line: &[u8]) -> Option<(String, String)> {
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let method_ok = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase());
    let target_ok = target.starts_with('/') && target.bytes().all(|b| b.is_ascii_graphic());
    let version_ok = version == "HTTP/1.1" || version == "HTTP/1.0";
    (parts.next().is_none() && method_ok && target_ok && version_ok)
        .then(|| (method.to_string(), target.to_string()))
}

/// Reads the request line and the headers (which it checks for form and drops).
fn read_head(reader: &mut impl BufRead) -> std::io::Result<Head> {
    let mut limited = reader.take(MAX_REQUEST_HEAD);
    let mut line = Vec::new();
    let mut request = None;
    loop {
        line.clear();
        let n = limited.read_until(b'\n', &mut line)?;
        if n == 0 {
            // The peer stopped sending (or the size limit was reached).
            return Ok(match request {
                _ if limited.limit() == 0 => Head::TooLarge,
                None => Head::Closed,
                // A request without the blank line that ends its headers, from a client that
                // half-closed its side: answer it anyway.
                Some((method, target)) => Head::Request { method, target },
            });
        }
        if line.last() != Some(&b'\n') {
            if limited.limit() == 0 {
                return Ok(Head::TooLarge);
            }
            // The peer closed in the middle of a line.
            return Ok(Head::Malformed);
        }
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        match &request {
            None => match parse_request_line(&line) {
                Some(r) => request = Some(r),
                None => return Ok(Head::Malformed),
            },
            Some(_) if line.is_empty() => break,
            Some(_) => {
                // A header is `name: value`, the name a non-empty token.
                let colon = line.iter().position(|&b| b == b':');
                let name_ok = colon.is_some_and(|c| {
                    c > 0 && line[..c].iter().all(|b| b.is_ascii_graphic() && *b != b':')
                });
                if !name_ok {
                    return Ok(Head::Malformed);
                }
            }
        }
    }
    let (method, target) = request.expect("the loop only ends after the request line");
    Ok(Head::Request { method, target })
}

fn respond(
    writer: &mut impl Write,
    status: &str,
    extra_headers: &str,
    body: &str,
    send_body: bool,
) -> std::io::Result<()> {
    let content_type = if status.starts_with("200") {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra_headers}Connection: close\r\n\r\n",
        body.len()
    );
    if send_body {
        response.push_str(body);
    }
    writer.write_all(response.as_bytes())?;
    writer.flush()
}

fn answer(stream: TcpStream, render: &(dyn Fn() -> String + Send + Sync)) -> std::io::Result<()> {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut writer = Deadlined {
        stream: stream.try_clone()?,
        deadline,
    };
    let mut reader = BufReader::new(Deadlined { stream, deadline });
    match read_head(&mut reader)? {
        Head::Closed => return Ok(()),
        Head::Malformed => respond(&mut writer, "400 Bad Request", "", "bad request\n", true)?,
        Head::TooLarge => respond(
            &mut writer,
            "431 Request Header Fields Too Large",
            "",
            "request header too large\n",
            true,
        )?,
        Head::Request { method, target } => {
            let path = target.split('?').next().unwrap_or_default();
            match (method.as_str(), path) {
                ("GET" | "HEAD", "/metrics") => {
                    respond(&mut writer, "200 OK", "", &render(), method == "GET")?
                }
                (_, "/metrics") => respond(
                    &mut writer,
                    "405 Method Not Allowed",
                    "Allow: GET, HEAD\r\n",
                    "method not allowed\n",
                    method != "HEAD",
                )?,
                _ => respond(
                    &mut writer,
                    "404 Not Found",
                    "",
                    "not found\n",
                    method != "HEAD",
                )?,
            }
        }
    }
    // Lingering close: the answer is sent; read what else the client sent until it closes.
    writer.stream.shutdown(Shutdown::Write)?;
    reader.get_mut().deadline = Instant::now() + DRAIN_TIMEOUT;
    std::io::copy(&mut reader.take(MAX_DRAIN), &mut std::io::sink())?;
    Ok(())
}

/// Connections being answered, in all and per local user (`None`: a remote peer).
#[derive(Default)]
struct Active {
    total: usize,
    per_user: HashMap<Option<u32>, usize>,
}

impl Active {
    /// Takes a slot for a peer of `user`, unless the server or that user is at its cap.
    fn take(&mut self, user: Option<u32>) -> bool {
        let mine = self.per_user.get(&user).copied().unwrap_or(0);
        if self.total >= MAX_CONNECTIONS || (user.is_some() && mine >= MAX_PER_USER) {
            return false;
        }
        self.total += 1;
        *self.per_user.entry(user).or_default() += 1;
        true
    }

    fn give_back(&mut self, user: Option<u32>) {
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.per_user.get_mut(&user) {
            *n -= 1;
            if *n == 0 {
                self.per_user.remove(&user);
            }
        }
    }
}

/// Gives a connection's slot back when the thread answering it ends (also if it panics, or
/// if it could not be started).
struct Slot {
    active: Arc<Mutex<Active>>,
    user: Option<u32>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .give_back(self.user);
    }
}

/// Serves GET /metrics until the listener fails, one thread per connection (at most
/// `MAX_CONNECTIONS` at once, `MAX_PER_USER` for one local user), so that a slow client does
/// not hold up the others.
pub fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    let active = Arc::new(Mutex::new(Active::default()));
    for conn in listener.incoming() {
        let mut stream = match conn {
            Ok(stream) => stream,
            Err(e) => {
                log::warn!("metrics: accept: {e}");
                // Out of file descriptors and similar: do not spin on the error.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let user = peer::peer_uid(&stream);
        let admitted = active.lock().unwrap_or_else(|e| e.into_inner()).take(user);
        if !admitted {
            // Best effort, without waiting for the client.
            let _ = stream.set_nonblocking(true);
            let _ = stream.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            continue;
        }
        let slot = Slot {
            active: active.clone(),
            user,
        };
        let render = render.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-conn".into())
            .spawn(move || {
                let _slot = slot;
                if let Err(e) = answer(stream, &*render) {
                    log::debug!("metrics: {e}");
                }
            });
        if let Err(e) = spawned {
            log::warn!("metrics: starting a connection thread: {e}");
        }
    }
}
