//! A fake cloud-hypervisor API server for tests without KVM, answering as cloud-hypervisor v53
//! does (read from its source: vmm/src/api/http/mod.rs, http_endpoint.rs, vmm/src/lib.rs
//! `vm_info`, vmm/src/config.rs `MemoryConfig`):
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

fn vm_info(st: &State) -> String {
    let m = st.memory;
    let mut memory = json!({"size": m.size, "shared": true, "hotplug_method": "Acpi"});
    if m.hotplugged > 0 {
        memory["hotplug_method"] = json!("VirtioMem");
        memory["hotplug_size"] = json!(m.hotplugged);
        memory["hotplugged_size"] = json!(m.hotplugged);
    }
    if m.zone > 0 {
        memory["zones"] = json!([{"id": "mem0", "size": m.zone, "shared": true}]);
    }
    let mut config = json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": memory,
        "payload": {"kernel": "/vmlinux"},
    });
    if st.balloon_enabled {
        config["balloon"] =
            json!({"size": st.target, "deflate_on_oom": false, "free_page_reporting": false});
    }
    let actual_size = (m.size + m.zone).saturating_sub(st.actual) + m.hotplugged;
    json!({"config": config, "state": "Running", "memory_actual_size": actual_size}).to_string()
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
    let (status, reply) = match (parts.next(), parts.next()) {
        (Some("GET"), Some("/api/v1/vm.info")) => (200, vm_info(&st)),
        (Some("PUT"), Some("/api/v1/vm.resize")) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            match v.get("desired_balloon").and_then(|b| b.as_u64()) {
                Some(_) if !st.balloon_enabled => (
                    500,
                    json!([
                        "Error from API",
                        "The VM could not be resized",
                        "Error resizing VM: no balloon device"
                    ])
                    .to_string(),
                ),
                Some(b) => {
                    st.target = b;
                    (204, String::new())
                }
                None => (400, json!(["Failed to deserialize JSON"]).to_string()),
            }
        }
        _ => (404, json!(["Not Found"]).to_string()),
    };
    st.requests.push(format!("{} -> {status}", line.trim()));
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Internal Server Error",
    };
    write!(
        w,
        "HTTP/1.1 {status} {reason}\r\nServer: Cloud Hypervisor API\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
        reply.len()
    )
}
