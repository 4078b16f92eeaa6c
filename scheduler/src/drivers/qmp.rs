//! QEMU's built-in virtio-balloon over QMP.
//!
//! `driver = { kind = "qmp", socket = "/run/qemu/vm2.qmp", device = "/machine/peripheral/balloon0" }`
//!
//! QMP counts the guest's memory, not the balloon: `balloon {"value": N}` asks for N bytes of
//! guest memory and `query-balloon` reports `actual` as the guest's memory now. The driver turns
//! both into balloon sizes with the guest's configured memory. QEMU cannot report the target it
//! was given, so `target_bytes` is `None` (the scheduler remembers what it sent). Statistics come
//! from the balloon device's `guest-stats` QOM property once `guest-stats-polling-interval` is
//! set; a value of -1 there means the guest did not report it.

use super::{BalloonDriver, DriverError, DriverReading, RawGuestStats};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A QMP connection in command mode.
pub struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Asynchronous events received while waiting for replies, oldest first.
    pub events: Vec<Value>,
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> DriverError {
    move |source| DriverError::Io { what, source }
}

impl QmpClient {
    /// Connects, reads the greeting and enters command mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, DriverError> {
        let stream = UnixStream::connect(path)
            .map_err(io_err(format!("connecting to QMP at {}", path.display())))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(io_err("QMP read timeout".into()))?;
        let writer = stream.try_clone().map_err(io_err("QMP socket".into()))?;
        let mut qmp = QmpClient {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(DriverError::Protocol(format!(
                "unexpected QMP greeting {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, DriverError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(io_err("reading from QMP".into()))?;
        if n == 0 {
            return Err(DriverError::Protocol("QEMU closed the QMP socket".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| DriverError::Protocol(format!("bad QMP JSON {line:?}: {e}")))
    }

    /// Runs a command and returns its `return` value; a QMP error is `DriverError::Refused`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, DriverError> {
        let mut request = json!({ "execute": command });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut text = request.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(io_err(format!("sending QMP {command}")))?;
        loop {
            let msg = self.read_message()?;
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                return Err(DriverError::Refused(format!("{command}: {err}")));
            }
            if msg.get("event").is_some() {
                self.events.push(msg);
            }
        }
    }

    /// Asks for `memory_bytes` of guest memory (`balloon`).
    pub fn balloon(&mut self, memory_bytes: u64) -> Result<(), DriverError> {
        self.execute("balloon", json!({ "value": memory_bytes }))
            .map(|_| ())
    }

    /// The guest's memory as the balloon reports it (`query-balloon`'s `actual`).
    pub fn balloon_actual(&mut self) -> Result<u64, DriverError> {
        let ret = self.execute("query-balloon", Value::Null)?;
        ret.get("actual")
            .and_then(Value::as_u64)
            .ok_or_else(|| DriverError::Protocol(format!("query-balloon returned {ret}")))
    }

    pub fn qom_get(&mut self, path: &str, property: &str) -> Result<Value, DriverError> {
        self.execute("qom-get", json!({ "path": path, "property": property }))
    }

    pub fn qom_set(&mut self, path: &str, property: &str, value: Value) -> Result<(), DriverError> {
        self.execute(
            "qom-set",
            json!({ "path": path, "property": property, "value": value }),
        )
        .map(|_| ())
    }
}

pub const DEFAULT_DEVICE: &str = "/machine/peripheral/balloon0";

pub struct QmpDriver {
    socket: PathBuf,
    device: String,
    memory_bytes: u64,
    stats_interval_s: u64,
    timeout: Duration,
    client: Option<QmpClient>,
}

impl QmpDriver {
    pub fn new(socket: PathBuf, device: Option<String>, memory_bytes: u64) -> Self {
        QmpDriver {
            socket,
            device: device.unwrap_or_else(|| DEFAULT_DEVICE.into()),
            memory_bytes,
            stats_interval_s: 2,
            timeout: Duration::from_secs(10),
            client: None,
        }
    }

    fn client(&mut self) -> Result<&mut QmpClient, DriverError> {
        if self.client.is_none() {
            let mut c = QmpClient::connect(&self.socket, self.timeout)?;
            // Statistics are optional: a device without them still balloons.
            if let Err(e) = c.qom_set(
                &self.device,
                "guest-stats-polling-interval",
                json!(self.stats_interval_s),
            ) {
                log::warn!("{}: no guest statistics: {e}", self.socket.display());
            }
            self.client = Some(c);
        }
        self.client
            .as_mut()
            .ok_or_else(|| DriverError::Protocol("no QMP connection".into()))
    }

    /// Runs `f` on the connection; an I/O failure drops it so the next call reconnects.
    fn with_client<T>(
        &mut self,
        f: impl FnOnce(&mut QmpClient) -> Result<T, DriverError>,
    ) -> Result<T, DriverError> {
        let result = f(self.client()?);
        if matches!(
            result,
            Err(DriverError::Io { .. }) | Err(DriverError::Protocol(_))
        ) {
            self.client = None;
        }
        result
    }

    fn stats(&mut self) -> Option<RawGuestStats> {
        let device = self.device.clone();
        let value = self
            .with_client(|c| c.qom_get(&device, "guest-stats"))
            .ok()?;
        parse_guest_stats(&value)
    }
}

/// Reads QEMU's `guest-stats` value; `None` until the guest has reported.
pub fn parse_guest_stats(value: &Value) -> Option<RawGuestStats> {
    let stats = value.get("stats")?;
    let get = |k: &str| {
        stats
            .get(k)
            .and_then(Value::as_i64)
            .filter(|v| *v >= 0)
            .map(|v| v as u64)
    };
    let updated = value
        .get("last-update")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if updated == 0 {
        return None;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Some(RawGuestStats {
        available_bytes: get("stat-available-memory")?,
        total_bytes: get("stat-total-memory").unwrap_or(0),
        swap_in: get("stat-swap-in").unwrap_or(0),
        major_faults: get("stat-major-faults").unwrap_or(0),
        age_seconds: Some(now.saturating_sub(updated) as f64),
    })
}

impl BalloonDriver for QmpDriver {
    fn read(&mut self) -> Result<DriverReading, DriverError> {
        let actual_memory = self.with_client(|c| c.balloon_actual())?;
        let stats = self.stats();
        Ok(DriverReading {
            target_bytes: None,
            actual_bytes: self.memory_bytes.saturating_sub(actual_memory),
            stats,
        })
    }

    fn set_balloon(&mut self, balloon_bytes: u64) -> Result<(), DriverError> {
        let memory = self.memory_bytes.saturating_sub(balloon_bytes);
        self.with_client(|c| c.balloon(memory))
    }

    fn describe(&self) -> String {
        format!("qmp {}", self.socket.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake QEMU: greeting, capabilities, a balloon, an event before some replies.
    fn fake_qemu(path: &Path, memory: u64) {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let mut actual = memory;
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                let _ = w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n");
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 0 {
                    let req: Value = serde_json::from_str(&line).unwrap();
                    line.clear();
                    let reply = match req["execute"].as_str().unwrap() {
                        "qmp_capabilities" => json!({"return": {}}),
                        "query-balloon" => {
                            let _ = w.write_all(b"{\"event\": \"BALLOON_CHANGE\", \"data\": {}}\n");
                            json!({"return": {"actual": actual}})
                        }
                        "balloon" => {
                            actual = req["arguments"]["value"].as_u64().unwrap();
                            json!({"return": {}})
                        }
                        "qom-set" => json!({"return": {}}),
                        "qom-get" => json!({"return": {"stats": {
                            "stat-available-memory": 300u64 << 20,
                            "stat-total-memory": 900u64 << 20,
                            "stat-swap-in": -1,
                            "stat-major-faults": 7
                        }, "last-update": 1_700_000_000u64}}),
                        other => json!({"error": {"class": "CommandNotFound", "desc": other}}),
                    };
                    let _ = w.write_all(format!("{reply}\n").as_bytes());
                }
            }
        });
    }

    #[test]
    fn balloon_sizes_and_stats_through_qmp() {
        let dir = std::env::temp_dir().join(format!("qmp-drv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&sock);
        fake_qemu(&sock, 1 << 30);
        let mut d = QmpDriver::new(sock, None, 1 << 30);
        let r = d.read().unwrap();
        assert_eq!((r.target_bytes, r.actual_bytes), (None, 0));
        d.set_balloon(256 << 20).unwrap();
        let r = d.read().unwrap();
        assert_eq!(r.actual_bytes, 256 << 20);
        let s = r.stats.unwrap();
        assert_eq!(s.available_bytes, 300 << 20);
        assert_eq!(s.swap_in, 0, "-1 means not reported");
        assert_eq!(s.major_faults, 7);
        let mut c = d.client.take().unwrap();
        assert!(matches!(
            c.execute("nonsense", Value::Null),
            Err(DriverError::Refused(_))
        ));
        assert!(
            !c.events.is_empty(),
            "events are kept, not mistaken for replies"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unreachable_qemu_is_an_error_and_reconnects_later() {
        let dir = std::env::temp_dir().join(format!("qmp-drv2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&sock);
        let mut d = QmpDriver::new(sock.clone(), None, 1 << 30);
        assert!(matches!(d.read(), Err(DriverError::Io { .. })));
        fake_qemu(&sock, 1 << 30);
        assert!(d.read().is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn guest_stats_without_an_update_are_none() {
        assert_eq!(
            parse_guest_stats(&json!({"stats": {}, "last-update": 0})),
            None
        );
        assert_eq!(parse_guest_stats(&json!("garbage")), None);
    }
}
