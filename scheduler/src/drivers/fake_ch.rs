//! A fake cloud-hypervisor API server for tests without KVM, answering as cloud-hypervisor v53
//! does: from its answers recorded in the lab (scheduler/testdata/cloud-hypervisor-v53: the
//! status lines, headers and bodies, vm.info's shape), and its source for what those do not
//! show (vmm/src/api/http/mod.rs, vmm/src/lib.rs `vm_info`, vmm/src/config.rs `MemoryConfig`):
//! - `GET /api/v1/vm.info`: `config.memory` with `size`, `hotplugged_size` and `zones` (each
//!   with its `size`), `config.balloon.size` (the balloon asked for; absent without `--balloon`)
//!   and `memory_actual_size` = size + zones - the balloon the guest reports + virtio-mem
//!   plugged (here: the hotplugged sizes, as if all plugged);
//! - `PUT /api/v1/vm.resize` `{"desired_balloon": bytes}`: 204, whatever the size (a balloon
//!   larger than the VM's RAM is accepted), 500 without a balloon device;
//! - every other route, `vm.balloon-stats` among them (cloud-hypervisor has none): 404 with a
//!   JSON body, `["Not Found"]`.
//!
//! Its balloon moves 64 MiB toward its target on every request, as a guest inflating.

use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

const STEP: u64 = 64 << 20;

/// Recorded answers (see scheduler/testdata/cloud-hypervisor-v53/README.md).
pub const RECORDED_VM_INFO: &str =
    include_str!("../../testdata/cloud-hypervisor-v53/get-vm.info-balloon-192MiB.http");
pub const RECORDED_VM_INFO_AFTER_2GIB: &str =
    include_str!("../../testdata/cloud-hypervisor-v53/get-vm.info-after-2GiB.http");
pub const RECORDED_RESIZE: &str =
    include_str!("../../testdata/cloud-hypervisor-v53/put-vm.resize-192MiB.http");
pub const RECORDED_NOT_FOUND: &str =
    include_str!("../../testdata/cloud-hypervisor-v53/get-no-such-route.http");

/// The body of a recorded answer.
pub fn recorded_body(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// A fake VM's memory as cloud-hypervisor's `--memory` and `--memory-zone` options give it.
#[derive(Debug, Clone, Copy, Default)]
pub struct FakeMemory {
    /// `--memory size=`.
    pub size: u64,
    /// One `--memory-zone size=` (0: none).
    pub zone: u64,
    /// `--memory hotplugged_size=` (virtio-mem), counted as plugged.
    pub hotplugged: u64,
}

impl FakeMemory {
    /// `--memory size=BYTES`.
    pub fn plain(size: u64) -> Self {
        FakeMemory {
            size,
            ..Default::default()
        }
    }

    fn ram(self) -> u64 {
        self.size + self.zone + self.hotplugged
    }
}

#[derive(Default)]
struct State {
    memory: FakeMemory,
    balloon_enabled: bool,
    target: u64,
    actual: u64,
    requests: Vec<String>,
}

pub struct FakeCloudHypervisor {
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
    state: Arc<Mutex<State>>,
}

impl FakeCloudHypervisor {
    /// Starts a fake VM with `memory`, with or without a balloon device.
    pub fn start(memory: FakeMemory, balloon: bool) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("fake-ch").tempdir()?;
        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket)?;
        let state = Arc::new(Mutex::new(State {
            memory,
            balloon_enabled: balloon,
            ..Default::default()
        }));
        let s = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let _ = serve(conn, &s);
            }
        });
        Ok(FakeCloudHypervisor {
            socket,
            _dir: dir,
            state,
        })
    }

    /// Request lines received, oldest first, and the status of each answer.
    pub fn requests(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|s| s.requests.clone())
            .unwrap_or_default()
    }

    /// The balloon the guest has reached.
    pub fn actual(&self) -> u64 {
        self.state.lock().map(|s| s.actual).unwrap_or_default()
    }
}

/// vm.info for the fake VM: the recorded answer's body with the fake's sizes.
fn vm_info(st: &State) -> String {
    let m = st.memory;
    let mut info: serde_json::Value =
        serde_json::from_str(recorded_body(RECORDED_VM_INFO)).unwrap_or_default();
    let config = &mut info["config"];
    let memory = &mut config["memory"];
    memory["size"] = json!(m.size);
    let zones = memory["zones"].as_array().cloned().unwrap_or_default();
    match (m.zone, zones.first()) {
        (0, _) | (_, None) => {
            if let Some(o) = memory.as_object_mut() {
                o.remove("zones");
            }
        }
        (size, Some(zone)) => {
            let mut zone = zone.clone();
            zone["size"] = json!(size);
            memory["zones"] = json!([zone]);
        }
    }
    if m.hotplugged > 0 {
        memory["hotplug_method"] = json!("VirtioMem");
        memory["hotplug_size"] = json!(m.hotplugged);
        memory["hotplugged_size"] = json!(m.hotplugged);
    }
    if st.balloon_enabled {
        config["balloon"]["size"] = json!(st.target);
    } else if let Some(o) = config.as_object_mut() {
        o.remove("balloon");
    }
    info["memory_actual_size"] = json!((m.size + m.zone).saturating_sub(st.actual) + m.hotplugged);
    info.to_string()
}

fn serve(conn: std::os::unix::net::UnixStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length.min(1 << 20)];
    r.read_exact(&mut body)?;
    let mut st = state
        .lock()
        .map_err(|_| std::io::Error::other("poisoned"))?;
    // The guest moves its balloon a step per request (never past its RAM).
    let goal = st.target.min(st.memory.ram());
    if st.actual < goal {
        st.actual = (st.actual + STEP).min(goal);
    } else {
        st.actual = st.actual.saturating_sub(STEP).max(goal);
    }
    let mut parts = line.split_whitespace();
    let answer = match (parts.next(), parts.next()) {
        (Some("GET"), Some("/api/v1/vm.info")) => Some(vm_info(&st)).map(|body| {
            format!(
                "HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        }),
        (Some("PUT"), Some("/api/v1/vm.resize")) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            match v.get("desired_balloon").and_then(|b| b.as_u64()) {
                Some(_) if !st.balloon_enabled => None,
                Some(b) => {
                    st.target = b;
                    Some(RECORDED_RESIZE.to_string())
                }
                None => None,
            }
        }
        _ => Some(RECORDED_NOT_FOUND.to_string()),
    };
    // Not recorded: cloud-hypervisor's error answer from its source (a JSON array of the error's
    // chain of messages; 500 for a failed API request).
    let answer = answer.unwrap_or_else(|| {
        let body = json!(["Error from API", "The VM could not be resized", "Error resizing VM: no balloon device"]).to_string();
        format!(
            "HTTP/1.1 500 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    });
    let status = answer.get(9..12).unwrap_or("?").to_string();
    st.requests.push(format!("{} -> {status}", line.trim()));
    w.write_all(answer.as_bytes())
}
