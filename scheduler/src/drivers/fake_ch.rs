//! A fake cloud-hypervisor API server for tests and benchmarks without KVM: `vm.info`,
//! `vm.balloon-stats` and `vm.resize` as the published OpenAPI description gives them, with a
//! balloon that moves 64 MiB toward its target on every request.

use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

const STEP: u64 = 64 << 20;

#[derive(Default)]
struct State {
    memory: u64,
    balloon_enabled: bool,
    stats_enabled: bool,
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
    /// Starts a fake VM of `memory` bytes, with or without a balloon device and statistics.
    pub fn start(memory: u64, balloon: bool, stats: bool) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("fake-ch").tempdir()?;
        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket)?;
        let state = Arc::new(Mutex::new(State {
            memory,
            balloon_enabled: balloon,
            stats_enabled: stats,
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

    /// Request lines received, oldest first.
    pub fn requests(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|s| s.requests.clone())
            .unwrap_or_default()
    }
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
    st.requests.push(line.trim().to_string());
    // The guest moves its balloon a step per request.
    if st.actual < st.target {
        st.actual = (st.actual + STEP).min(st.target);
    } else {
        st.actual = st.actual.saturating_sub(STEP).max(st.target);
    }
    let mut parts = line.split_whitespace();
    let (status, reply) = match (parts.next(), parts.next()) {
        (Some("GET"), Some("/api/v1/vm.info")) => {
            let mut config = json!({
                "payload": {"kernel": "/vmlinux"},
                "memory": {"size": st.memory, "shared": true},
            });
            if st.balloon_enabled {
                config["balloon"] = json!({"size": st.target, "deflate_on_oom": false, "free_page_reporting": true});
            }
            (200, json!({"config": config, "state": "Running", "memory_actual_size": st.memory - st.actual}).to_string())
        }
        (Some("GET"), Some("/api/v1/vm.balloon-stats"))
            if st.balloon_enabled && st.stats_enabled =>
        {
            let total = st.memory - st.actual;
            (200, json!({
                "balloon_actual": st.actual,
                "last_update": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
                "stats": {"total_memory": total, "available_memory": total / 2, "free_memory": total / 3, "swap_in": 0, "major_faults": 1}
            }).to_string())
        }
        (Some("GET"), Some("/api/v1/vm.balloon-stats")) => {
            (500, "statistics not available".to_string())
        }
        (Some("PUT"), Some("/api/v1/vm.resize")) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            match v.get("desired_balloon").and_then(|b| b.as_u64()) {
                Some(_) if !st.balloon_enabled => {
                    (500, "Error resizing VM: no balloon device".to_string())
                }
                Some(b) if b <= st.memory => {
                    st.target = b;
                    (204, String::new())
                }
                Some(_) => (500, "balloon larger than the VM".to_string()),
                None => (400, "bad resize request".to_string()),
            }
        }
        _ => (404, "not found".to_string()),
    };
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Internal Server Error",
    };
    write!(
        w,
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\n",
        reply.len()
    )?;
    if status == 200 {
        write!(w, "Content-Type: application/json\r\n")?;
    }
    write!(w, "\r\n{reply}")
}
