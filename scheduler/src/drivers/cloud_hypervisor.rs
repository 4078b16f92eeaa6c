//! cloud-hypervisor's built-in virtio-balloon, through its REST API on a Unix socket.
//!
//! `driver = { kind = "cloud-hypervisor", api_socket = "/run/cloud-hypervisor/vm3.sock" }`
//!
//! As cloud-hypervisor v53 answers (its vmm/src/api/openapi/cloud-hypervisor.yaml, and the
//! source behind it: vmm/src/lib.rs `vm_info`, vmm/src/config.rs `MemoryConfig::total_size`):
//! - `PUT /api/v1/vm.resize` with `{"desired_balloon": bytes}` sets the balloon (204). It takes
//!   any size, a balloon larger than the VM's RAM included, so the driver never asks for more
//!   than the RAM `vm.info` describes.
//! - `GET /api/v1/vm.info` gives `config.balloon.size` (the balloon asked for; absent without a
//!   balloon device), `config.memory` (`size`, `hotplugged_size`, and `zones`, each with its
//!   `size` and `hotplugged_size`) and `memory_actual_size`, which is the boot RAM (`size` and
//!   the zones' sizes) less the balloon the guest reports, plus the virtio-mem memory plugged.
//!   So the balloon is the RAM (boot RAM and hotplugged sizes, taken as plugged) less
//!   `memory_actual_size`. `--memory size=0 --memory-zone id=mem0,size=512M` is 512 MiB of RAM.
//! - There is no statistics endpoint (`vm.balloon-stats` is a 404), and cloud-hypervisor's own
//!   balloon offers the guest no statistics queue: a guest here has no figures, and policies
//!   that need them see none (put our backend and the guest app in its place for those).
//!
//! The balloon's size is what the guest driver reports (cloud-hypervisor's `get_actual`): a
//! guest's word, which the engine bounds like every reading.

use super::http::{self, HttpResponse};
use super::{BalloonDriver, DriverError, DriverReading};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

pub struct CloudHypervisorDriver {
    socket: PathBuf,
    timeout: Duration,
    /// The VM's RAM as the last `vm.info` gave it: no balloon larger than this is asked for.
    ram_bytes: Option<u64>,
}

impl CloudHypervisorDriver {
    pub fn new(socket: PathBuf) -> Self {
        CloudHypervisorDriver {
            socket,
            timeout: Duration::from_secs(10),
            ram_bytes: None,
        }
    }

    fn get(&self, path: &str) -> Result<HttpResponse, DriverError> {
        http::request(&self.socket, "GET", path, None, self.timeout)
    }

    fn vm_info(&mut self) -> Result<Value, DriverError> {
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
        self.ram_bytes = Some(ram_bytes(&info));
        Ok(info)
    }
}

fn as_u64(v: &Value, path: &[&str]) -> Option<u64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_u64()
}

/// The VM's RAM from `vm.info`'s `config.memory`: `size`, the zones' sizes and every hotplugged
/// size (saturating: the figures are another process's).
fn ram_bytes(info: &Value) -> u64 {
    let memory = info.get("config").and_then(|c| c.get("memory"));
    let field = |v: Option<&Value>, k: &str| v.and_then(|v| v.get(k)).and_then(Value::as_u64);
    let zones = memory
        .and_then(|m| m.get("zones"))
        .and_then(Value::as_array)
        .map_or(0u64, |zones| {
            zones.iter().fold(0u64, |sum, z| {
                sum.saturating_add(field(Some(z), "size").unwrap_or(0))
                    .saturating_add(field(Some(z), "hotplugged_size").unwrap_or(0))
            })
        });
    field(memory, "size")
        .unwrap_or(0)
        .saturating_add(field(memory, "hotplugged_size").unwrap_or(0))
        .saturating_add(zones)
}

impl BalloonDriver for CloudHypervisorDriver {
    fn read(&mut self) -> Result<DriverReading, DriverError> {
        let info = self.vm_info()?;
        let target = as_u64(&info, &["config", "balloon", "size"]).ok_or_else(|| {
            DriverError::Refused("the VM has no balloon device (--balloon)".into())
        })?;
        let now = as_u64(&info, &["memory_actual_size"])
            .ok_or_else(|| DriverError::Protocol("vm.info lacks memory_actual_size".into()))?;
        Ok(DriverReading {
            target_bytes: Some(target),
            actual_bytes: ram_bytes(&info).saturating_sub(now),
            stats: None,
            split: None,
            size_disputed: false,
        })
    }

    fn set_balloon(&mut self, balloon_bytes: u64) -> Result<(), DriverError> {
        let ram = match self.ram_bytes {
            Some(ram) => ram,
            None => {
                self.vm_info()?;
                self.ram_bytes.unwrap_or(0)
            }
        };
        if ram == 0 {
            // Clamping to nothing would pin the balloon at 0 without a word.
            return Err(DriverError::Protocol(
                "vm.info describes no memory (config.memory): no balloon size can be checked"
                    .into(),
            ));
        }
        let body = serde_json::json!({ "desired_balloon": balloon_bytes.min(ram) }).to_string();
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
    use super::super::fake_ch::{FakeCloudHypervisor, FakeMemory};
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Reads until the fake's balloon has reached `want`.
    fn read_until(d: &mut CloudHypervisorDriver, want: u64) -> DriverReading {
        let mut r = d.read().unwrap();
        for _ in 0..64 {
            if r.actual_bytes == want {
                return r;
            }
            r = d.read().unwrap();
        }
        panic!("the balloon stopped at {} MiB", r.actual_bytes / MIB);
    }

    #[test]
    fn sizes_through_the_rest_api_and_no_route_cloud_hypervisor_lacks() {
        let fake = FakeCloudHypervisor::start(FakeMemory::plain(1024 * MIB), true).unwrap();
        let mut d = CloudHypervisorDriver::new(fake.socket.clone());
        let r = d.read().unwrap();
        assert_eq!((r.target_bytes, r.actual_bytes), (Some(0), 0));
        d.set_balloon(256 * MIB).unwrap();
        let r = read_until(&mut d, 256 * MIB);
        assert_eq!(r.target_bytes, Some(256 * MIB));
        // cloud-hypervisor's balloon has no statistics, and nothing asks for them.
        assert_eq!(r.stats, None);
        let requests = fake.requests();
        assert!(requests.iter().all(|l| !l.ends_with("404")), "{requests:?}");
        assert!(requests
            .iter()
            .any(|l| l.starts_with("PUT /api/v1/vm.resize")));
    }

    /// `--memory size=0 --memory-zone id=mem0,size=512M` holding a 192 MiB balloon: the RAM is
    /// the zone's (before, the driver took `size`, 0, and read the balloon as 0, judged it
    /// stalled and deflated it), and virtio-mem memory plugged counts as RAM.
    #[test]
    fn zones_and_virtio_mem_are_guest_ram() {
        for memory in [
            FakeMemory {
                size: 0,
                zone: 512 * MIB,
                hotplugged: 0,
            },
            FakeMemory {
                size: 256 * MIB,
                zone: 0,
                hotplugged: 256 * MIB,
            },
        ] {
            let fake = FakeCloudHypervisor::start(memory, true).unwrap();
            let mut d = CloudHypervisorDriver::new(fake.socket.clone());
            d.set_balloon(192 * MIB).unwrap();
            let r = read_until(&mut d, 192 * MIB);
            assert_eq!(fake.actual(), 192 * MIB, "{memory:?}");
            assert_eq!(r.actual_bytes, 192 * MIB, "{memory:?}");
        }
    }

    /// cloud-hypervisor takes a balloon larger than the VM; the driver never asks for one.
    #[test]
    fn a_balloon_is_never_asked_larger_than_the_vms_ram() {
        let memory = FakeMemory {
            size: 0,
            zone: 512 * MIB,
            hotplugged: 0,
        };
        let fake = FakeCloudHypervisor::start(memory, true).unwrap();
        let mut d = CloudHypervisorDriver::new(fake.socket.clone());
        d.set_balloon(2048 * MIB).unwrap();
        let r = d.read().unwrap();
        assert_eq!(r.target_bytes, Some(512 * MIB));
    }

    /// The sizes cloud-hypervisor v53 itself reported, recorded: a zone-backed VM of 512 MiB
    /// (`--memory size=0`) holding 192 MiB, then asked for 2 GiB and stopped at 448 MiB.
    #[test]
    fn recorded_vm_info_reads_as_the_guest_held_it() {
        use super::super::fake_ch::{recorded_body, RECORDED_VM_INFO, RECORDED_VM_INFO_AFTER_2GIB};
        for (answer, target, balloon) in [
            (RECORDED_VM_INFO, 192 * MIB, 192 * MIB),
            (RECORDED_VM_INFO_AFTER_2GIB, 2048 * MIB, 448 * MIB),
        ] {
            let info: Value = serde_json::from_str(recorded_body(answer)).unwrap();
            assert_eq!(ram_bytes(&info), 512 * MIB);
            assert_eq!(as_u64(&info, &["config", "balloon", "size"]), Some(target));
            let now = as_u64(&info, &["memory_actual_size"]).unwrap();
            assert_eq!(ram_bytes(&info) - now, balloon);
        }
    }

    /// What the fake answers is what cloud-hypervisor answered, byte for byte where nothing
    /// varies.
    #[test]
    fn the_fake_answers_as_the_recordings() {
        use super::super::fake_ch::{RECORDED_NOT_FOUND, RECORDED_RESIZE};
        use std::io::{Read, Write};
        let fake = FakeCloudHypervisor::start(FakeMemory::plain(512 * MIB), true).unwrap();
        let ask = |request: &str| {
            let mut s = std::os::unix::net::UnixStream::connect(&fake.socket).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            answer
        };
        assert_eq!(
            ask("GET /api/v1/vm.balloon-stats HTTP/1.1\r\nHost: localhost\r\n\r\n"),
            RECORDED_NOT_FOUND
        );
        let body = r#"{"desired_balloon":201326592}"#;
        assert_eq!(
            ask(&format!(
                "PUT /api/v1/vm.resize HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )),
            RECORDED_RESIZE
        );
    }

    /// A vm.info without a memory size is an error, not a balloon pinned at 0.
    #[test]
    fn no_memory_size_is_an_error_not_a_zero_balloon() {
        let fake = FakeCloudHypervisor::start(FakeMemory::plain(512 * MIB), true).unwrap();
        let mut d = CloudHypervisorDriver::new(fake.socket.clone());
        d.ram_bytes = Some(0);
        assert!(matches!(
            d.set_balloon(128 * MIB),
            Err(DriverError::Protocol(_))
        ));
        assert!(!fake.requests().iter().any(|l| l.starts_with("PUT")));
    }

    #[test]
    fn errors_are_reported_not_guessed() {
        let fake = FakeCloudHypervisor::start(FakeMemory::plain(1024 * MIB), false).unwrap();
        let mut d = CloudHypervisorDriver::new(fake.socket.clone());
        assert!(matches!(d.read(), Err(DriverError::Refused(m)) if m.contains("no balloon")));
        assert!(matches!(d.set_balloon(MIB), Err(DriverError::Refused(m)) if m.contains("500")));
        let mut gone = CloudHypervisorDriver::new(fake.socket.with_extension("missing"));
        assert!(matches!(gone.read(), Err(DriverError::Io { .. })));
    }
}
