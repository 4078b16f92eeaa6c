//! cloud-hypervisor's built-in virtio-balloon, through its REST API on a Unix socket.
//!
//! `driver = { kind = "cloud-hypervisor", api_socket = "/run/cloud-hypervisor/vm3.sock" }`
//!
//! From the published OpenAPI description (vmm/src/api/openapi/cloud-hypervisor.yaml):
//! - `PUT /api/v1/vm.resize` with `{"desired_balloon": bytes}` sets the balloon (204);
//! - `GET /api/v1/vm.info` gives `config.balloon.size` (the balloon asked for; absent without a
//!   balloon device), `config.memory.size` (+ `hotplugged_size`) and `memory_actual_size`;
//! - `GET /api/v1/vm.balloon-stats` gives `balloon_actual` (bytes), `last_update` (host UNIX
//!   milliseconds, 0 before the first sample) and `stats` (`available_memory`, `total_memory`,
//!   `swap_in` in bytes, `major_faults`, ...); 500 when the guest did not negotiate statistics.
//!
//! The balloon's actual size comes from balloon-stats when it answers, else from vm.info as
//! configured memory minus `memory_actual_size`.
//!
//! cloud-hypervisor needs KVM and cannot run a guest on the lab machines; this driver is tested
//! against `fake_ch`, a server that follows the same description.

use super::{BalloonDriver, DriverError, DriverReading, RawGuestStats};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// The most bytes accepted in one response.
const MAX_RESPONSE: u64 = 4 << 20;

pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// One HTTP/1.1 request over a Unix socket (a new connection each time, `Connection: close`).
pub fn http_request(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<HttpResponse, DriverError> {
    let io = |what: &str| {
        let what = format!("{what} {}", socket.display());
        move |source| DriverError::Io { what, source }
    };
    let mut stream = UnixStream::connect(socket).map_err(io("connecting to"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(io("timeout on"))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(io("timeout on"))?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    match body {
        Some(b) => request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
        None => request.push_str("\r\n"),
    }
    stream
        .write_all(request.as_bytes())
        .map_err(io("writing to"))?;
    let mut reader = BufReader::new(stream.take(MAX_RESPONSE));
    let mut status_line = String::new();
    reader
        .read_line(&mut status_line)
        .map_err(io("reading from"))?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| DriverError::Protocol(format!("bad HTTP status line {status_line:?}")))?;
    let (mut length, mut chunked) = (None, false);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).map_err(io("reading from"))? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse::<u64>().ok(),
                "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
                _ => {}
            }
        }
    }
    let mut raw = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).map_err(io("reading from"))?;
            let n = u64::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| DriverError::Protocol(format!("bad chunk size {size:?}")))?;
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n as usize];
            reader.read_exact(&mut chunk).map_err(io("reading from"))?;
            raw.extend_from_slice(&chunk);
            let mut crlf = String::new();
            reader.read_line(&mut crlf).map_err(io("reading from"))?;
        }
    } else if let Some(n) = length {
        raw.resize(n as usize, 0);
        reader.read_exact(&mut raw).map_err(io("reading from"))?;
    } else {
        reader.read_to_end(&mut raw).map_err(io("reading from"))?;
    }
    Ok(HttpResponse {
        status,
        body: String::from_utf8_lossy(&raw).into_owned(),
    })
}

pub struct CloudHypervisorDriver {
    socket: PathBuf,
    timeout: Duration,
}

impl CloudHypervisorDriver {
    pub fn new(socket: PathBuf) -> Self {
        CloudHypervisorDriver {
            socket,
            timeout: Duration::from_secs(10),
        }
    }

    fn get(&self, path: &str) -> Result<HttpResponse, DriverError> {
        http_request(&self.socket, "GET", path, None, self.timeout)
    }
}

fn as_u64(v: &Value, path: &[&str]) -> Option<u64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_u64()
}

impl BalloonDriver for CloudHypervisorDriver {
    fn read(&mut self) -> Result<DriverReading, DriverError> {
        let info = self.get("/api/v1/vm.info")?;
        if info.status != 200 {
            return Err(DriverError::Refused(format!(
                "vm.info: HTTP {}: {}",
                info.status,
                info.body.trim()
            )));
        }
        let info: Value = serde_json::from_str(&info.body)
            .map_err(|e| DriverError::Protocol(format!("vm.info: {e}")))?;
        let target = as_u64(&info, &["config", "balloon", "size"]).ok_or_else(|| {
            DriverError::Refused("the VM has no balloon device (--balloon)".into())
        })?;
        let stats = self
            .get("/api/v1/vm.balloon-stats")
            .ok()
            .filter(|r| r.status == 200);
        let stats: Option<Value> = stats.and_then(|r| serde_json::from_str(&r.body).ok());
        let actual = match stats.as_ref().and_then(|s| as_u64(s, &["balloon_actual"])) {
            Some(a) => a,
            None => {
                let memory = as_u64(&info, &["config", "memory", "size"]).unwrap_or(0)
                    + as_u64(&info, &["config", "memory", "hotplugged_size"]).unwrap_or(0);
                let now = as_u64(&info, &["memory_actual_size"]).ok_or_else(|| {
                    DriverError::Protocol("vm.info lacks memory_actual_size".into())
                })?;
                memory.saturating_sub(now)
            }
        };
        let stats = stats.and_then(|s| {
            let updated_ms = as_u64(&s, &["last_update"]).filter(|t| *t > 0)?;
            let get = |k: &str| as_u64(&s, &["stats", k]);
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            Some(RawGuestStats {
                available_bytes: get("available_memory")?,
                total_bytes: get("total_memory").unwrap_or(0),
                swap_in: get("swap_in").unwrap_or(0),
                major_faults: get("major_faults").unwrap_or(0),
                age_seconds: Some(now_ms.saturating_sub(updated_ms) as f64 / 1000.0),
            })
        });
        Ok(DriverReading {
            target_bytes: Some(target),
            actual_bytes: actual,
            stats,
        })
    }

    fn set_balloon(&mut self, balloon_bytes: u64) -> Result<(), DriverError> {
        let body = serde_json::json!({ "desired_balloon": balloon_bytes }).to_string();
        let r = http_request(
            &self.socket,
            "PUT",
            "/api/v1/vm.resize",
            Some(&body),
            self.timeout,
        )?;
        match r.status {
            200 | 204 => Ok(()),
            s => Err(DriverError::Refused(format!(
                "vm.resize: HTTP {s}: {}",
                r.body.trim()
            ))),
        }
    }

    fn describe(&self) -> String {
        format!("cloud-hypervisor {}", self.socket.display())
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake_ch::FakeCloudHypervisor;
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn sizes_and_statistics_through_the_rest_api() {
        let fake = FakeCloudHypervisor::start(1024 * MIB, true, true).unwrap();
        let mut d = CloudHypervisorDriver::new(fake.socket.clone());
        let r = d.read().unwrap();
        assert_eq!((r.target_bytes, r.actual_bytes), (Some(0), 0));
        d.set_balloon(256 * MIB).unwrap();
        // The fake's balloon moves 64 MiB per request, as a guest inflating over time.
        let mut r = d.read().unwrap();
        assert_eq!(r.target_bytes, Some(256 * MIB));
        while r.actual_bytes < 256 * MIB {
            let next = d.read().unwrap();
            assert!(next.actual_bytes > r.actual_bytes, "the balloon must move");
            r = next;
        }
        let s = r.stats.unwrap();
        assert_eq!(s.total_bytes, 768 * MIB);
        assert!(s.available_bytes < s.total_bytes);
        assert!(fake
            .requests()
            .iter()
            .any(|l| l.starts_with("PUT /api/v1/vm.resize")));
    }

    #[test]
    fn without_statistics_the_actual_size_comes_from_vm_info() {
        let fake = FakeCloudHypervisor::start(1024 * MIB, true, false).unwrap();
        let mut d = CloudHypervisorDriver::new(fake.socket.clone());
        d.set_balloon(128 * MIB).unwrap();
        let mut r = d.read().unwrap();
        while r.actual_bytes < 128 * MIB {
            r = d.read().unwrap();
        }
        assert_eq!(r.stats, None);
        assert_eq!(r.actual_bytes, 128 * MIB);
    }

    #[test]
    fn errors_are_reported_not_guessed() {
        let fake = FakeCloudHypervisor::start(1024 * MIB, false, false).unwrap();
        let mut d = CloudHypervisorDriver::new(fake.socket.clone());
        assert!(matches!(d.read(), Err(DriverError::Refused(m)) if m.contains("no balloon")));
        assert!(matches!(d.set_balloon(MIB), Err(DriverError::Refused(m)) if m.contains("500")));
        let mut gone = CloudHypervisorDriver::new(fake.socket.with_extension("missing"));
        assert!(matches!(gone.read(), Err(DriverError::Io { .. })));
    }
}
