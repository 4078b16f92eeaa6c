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

use super::http::{self, HttpResponse};
use super::{BalloonDriver, DriverError, DriverReading, RawGuestStats};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

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
        http::request(&self.socket, "GET", path, None, self.timeout)
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
                info.text().trim()
            )));
        }
        let info: Value = serde_json::from_slice(&info.body)
            .map_err(|e| DriverError::Protocol(format!("vm.info: {e}")))?;
        let target = as_u64(&info, &["config", "balloon", "size"]).ok_or_else(|| {
            DriverError::Refused("the VM has no balloon device (--balloon)".into())
        })?;
        let stats = self
            .get("/api/v1/vm.balloon-stats")
            .ok()
            .filter(|r| r.status == 200);
        let stats: Option<Value> = stats.and_then(|r| serde_json::from_slice(&r.body).ok());
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
            split: None,
            size_disputed: false,
        })
    }

    fn set_balloon(&mut self, balloon_bytes: u64) -> Result<(), DriverError> {
        let body = serde_json::json!({ "desired_balloon": balloon_bytes }).to_string();
        let r = http::request(
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
                r.text().trim()
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
