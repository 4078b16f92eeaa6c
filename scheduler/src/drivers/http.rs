//! A small HTTP/1.1 client over the drivers' Unix-socket transport (unix.rs), for
//! cloud-hypervisor's REST API: bounded status line, headers and body, chunked bodies decoded,
//! every request within its deadline.

use super::unix::{read_line_bounded, TimedStream};
use super::DriverError;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;
use std::time::Duration;

/// Limits on what a response may hold.
pub const MAX_HEADER_LINE: usize = 8 << 10;
pub const MAX_HEADERS: usize = 100;
pub const MAX_BODY: usize = 8 << 20;

/// An HTTP response: status, the headers the client needs and the body (decoded from chunks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Why a response could not be read.
#[derive(Debug)]
pub enum ResponseError {
    Io(io::Error),
    Malformed(String),
}

impl From<io::Error> for ResponseError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::InvalidData {
            ResponseError::Malformed(e.to_string())
        } else {
            ResponseError::Io(e)
        }
    }
}

fn malformed<T>(what: impl Into<String>) -> Result<T, ResponseError> {
    Err(ResponseError::Malformed(what.into()))
}

fn read_header_line<R: BufRead>(reader: &mut R) -> Result<String, ResponseError> {
    let line = read_line_bounded(reader, MAX_HEADER_LINE)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Reads one response to a request made with `method` (RFC 9112 section 6.3 for where the
/// body ends). Interim 1xx responses are skipped. The body ends at the end of the chunks, at
/// Content-Length, or at the end of the stream when neither is given; 204, 304 and responses
/// to HEAD have none, even when the server keeps the connection open (cloud-hypervisor's
/// micro_http sends `Connection: keep-alive` and no Content-Length with its 204s).
pub fn read_response<R: BufRead>(
    reader: &mut R,
    method: &str,
) -> Result<HttpResponse, ResponseError> {
    loop {
        let status_line = read_header_line(reader)?;
        // "HTTP/1.1 204 " (micro_http leaves the reason phrase empty) or "HTTP/1.1 200 OK".
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        let code = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/1.") || code.len() != 3 {
            return malformed(format!("bad status line {status_line:?}"));
        }
        let Ok(status) = code.parse::<u16>() else {
            return malformed(format!("bad status line {status_line:?}"));
        };
        let mut content_length: Option<usize> = None;
        let mut chunked = false;
        let mut content_type = None;
        let mut count = 0;
        loop {
            let line = read_header_line(reader)?;
            if line.is_empty() {
                break;
            }
            count += 1;
            if count > MAX_HEADERS {
                return malformed(format!("more than {MAX_HEADERS} header lines"));
            }
            let Some((name, value)) = line.split_once(':') else {
                return malformed(format!("bad header line {line:?}"));
            };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => {
                    let Ok(n) = value.parse::<usize>() else {
                        return malformed(format!("bad Content-Length {value:?}"));
                    };
                    if content_length.is_some_and(|m| m != n) {
                        return malformed("conflicting Content-Length headers");
                    }
                    content_length = Some(n);
                }
                "transfer-encoding" => {
                    let last = value.rsplit(',').next().unwrap_or("").trim();
                    if !last.eq_ignore_ascii_case("chunked") {
                        return malformed(format!("unsupported Transfer-Encoding {value:?}"));
                    }
                    chunked = true;
                }
                "content-type" => content_type = Some(value.to_string()),
                _ => {}
            }
        }
        if (100..200).contains(&status) {
            // An interim response (100 Continue): the real one follows.
            continue;
        }
        let body = if method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304 {
            Vec::new()
        } else if chunked {
            read_chunked(reader)?
        } else if let Some(n) = content_length {
            if n > MAX_BODY {
                return malformed(format!("a body of {n} bytes (the limit is {MAX_BODY})"));
            }
            let mut body = vec![0; n];
            reader.read_exact(&mut body)?;
            body
        } else {
            let mut body = Vec::new();
            reader
                .by_ref()
                .take(MAX_BODY as u64 + 1)
                .read_to_end(&mut body)?;
            if body.len() > MAX_BODY {
                return malformed(format!("a body over {MAX_BODY} bytes"));
            }
            body
        };
        return Ok(HttpResponse {
            status,
            content_type,
            body,
        });
    }
}

fn read_chunked<R: BufRead>(reader: &mut R) -> Result<Vec<u8>, ResponseError> {
    let mut body = Vec::new();
    loop {
        let line = read_header_line(reader)?;
        let size = line.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size, 16) else {
            return malformed(format!("bad chunk size line {line:?}"));
        };
        if size == 0 {
            // Trailer fields, up to the empty line.
            let mut count = 0;
            while !read_header_line(reader)?.is_empty() {
                count += 1;
                if count > MAX_HEADERS {
                    return malformed(format!("more than {MAX_HEADERS} trailer lines"));
                }
            }
            return Ok(body);
        }
        if size > MAX_BODY.saturating_sub(body.len()) {
            return malformed(format!("a chunked body over {MAX_BODY} bytes"));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        if !read_header_line(reader)?.is_empty() {
            return malformed("a chunk not followed by CRLF");
        }
    }
}

/// One request on a new connection to `socket`: `Host: localhost`, a JSON body with its
/// Content-Length, `Connection: close`. Connecting, sending and reading the answer together
/// take at most `timeout`.
pub fn request(
    socket: &Path,
    method: &str,
    target: &str,
    json_body: Option<&str>,
    timeout: Duration,
) -> Result<HttpResponse, DriverError> {
    let io = |e: io::Error| DriverError::Io {
        what: format!("HTTP {method} {target} on {}", socket.display()),
        source: e,
    };
    let mut stream = TimedStream::connect(socket, timeout).map_err(io)?;
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    match json_body {
        Some(body) => head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )),
        None => head.push_str("\r\n"),
    }
    stream.write_all(head.as_bytes()).map_err(io)?;
    let mut reader = BufReader::new(stream);
    read_response(&mut reader, method).map_err(|e| match e {
        ResponseError::Io(e) => io(e),
        ResponseError::Malformed(m) => DriverError::Protocol(format!(
            "HTTP {method} {target} on {}: {m}",
            socket.display()
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn parse(raw: &str, method: &str) -> Result<HttpResponse, ResponseError> {
        read_response(&mut Cursor::new(raw.as_bytes().to_vec()), method)
    }

    #[test]
    fn content_length_body_and_an_empty_reason_phrase() {
        let r = parse(
            "HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\
             Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}NEXT",
            "GET",
        )
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"{\"a\":1}");
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
    }

    #[test]
    fn no_content_has_no_body_even_with_bytes_behind_it() {
        let mut c =
            Cursor::new(b"HTTP/1.1 204 \r\nConnection: keep-alive\r\n\r\nHTTP/1.1".to_vec());
        let r = read_response(&mut c, "PUT").unwrap();
        assert_eq!((r.status, r.body.len()), (204, 0));
        assert_eq!(c.position(), 41, "nothing after the head is read");
        let r = parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "HEAD").unwrap();
        assert!(r.body.is_empty());
    }

    #[test]
    fn chunked_bodies_with_extensions_and_trailers() {
        let r = parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n\
             4;ext=1\r\nWiki\r\n6\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\n",
            "GET",
        )
        .unwrap();
        assert_eq!(r.text(), "Wikipedia in \r\n\r\nchunks.");
    }

    #[test]
    fn interim_responses_are_skipped_and_bodies_may_run_to_the_end() {
        let r = parse(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 500 Internal Server Error\r\n\r\nno balloon",
            "PUT",
        )
        .unwrap();
        assert_eq!((r.status, r.text().as_str()), (500, "no balloon"));
    }

    #[test]
    fn malformed_responses_are_errors_not_panics() {
        for raw in [
            "",
            "SSH-2.0-OpenSSH\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 abc OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab",
        ] {
            assert!(parse(raw, "GET").is_err(), "{raw:?}");
        }
        let huge = format!(
            "HTTP/1.1 200 OK\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEADER_LINE)
        );
        assert!(matches!(
            parse(&huge, "GET"),
            Err(ResponseError::Malformed(_))
        ));
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "X: 1\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(matches!(
            parse(&many, "GET"),
            Err(ResponseError::Malformed(_))
        ));
        let big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert!(matches!(
            parse(&big, "GET"),
            Err(ResponseError::Malformed(_))
        ));
    }
}
