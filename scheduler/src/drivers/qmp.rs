//! QEMU's built-in virtio-balloon over QMP (a Unix socket, one JSON object per line).
//!
//! ```toml
//! [[guest]]
//! name = "vm2"
//! memory = "1G"    # QEMU's -m: the driver needs it (below)
//! driver = { kind = "qmp", socket = "/run/qemu/vm2.qmp", device = "/machine/peripheral/balloon0", stats_interval_seconds = 5 }
//! ```
//!
//! Each QMP command must be answered within 10 s (`DEFAULT_TIMEOUT`); a tick does not wait
//! that long, only until its driver deadline (`driver_deadline_seconds`), see `pool`.
//!
//! QMP counts the guest's memory, not the balloon: `balloon {"value": N}` asks for N bytes of
//! guest memory and `query-balloon` reports `actual` as the guest's memory now. The driver turns
//! both into balloon sizes with the guest's configured memory (balloon = memory - value). QEMU
//! cannot report the target it was given, so `target_bytes` is `None`. Statistics come from the
//! balloon device's `guest-stats` QOM property once `guest-stats-polling-interval` is set on it
//! (done on every connect); a statistic the guest did not report reads -1 (QEMU's uint64
//! visitor prints it as 18446744073709551615).
//!
//! The device path is the QOM path of the balloon device: `/machine/peripheral/ID` for
//! `-device virtio-balloon-pci,id=ID`.

use super::unix::{read_line_bounded, TimedStream};
use super::{BalloonDriver, DriverError, DriverReading, RawGuestStats};
use serde_json::{json, Value};
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_DEVICE: &str = "/machine/peripheral/balloon0";
pub const DEFAULT_STATS_INTERVAL_SECONDS: u64 = 5;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest QMP message accepted.
const MAX_MESSAGE: usize = 1 << 20;
/// Events kept (the newest).
const MAX_EVENTS: usize = 64;

/// A QMP connection in command mode. Each command, with whatever events arrive before its
/// reply, must complete within the timeout given to `connect`.
pub struct QmpClient {
    conn: BufReader<TimedStream>,
    path: PathBuf,
    next_id: u64,
    /// Asynchronous events received while waiting for replies, oldest first (the newest 64).
    pub events: Vec<Value>,
}

fn short(text: &str) -> String {
    let text = text.trim_end();
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}

impl QmpClient {
    /// Connects, reads the greeting and enters command mode (`qmp_capabilities`).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, DriverError> {
        let stream = TimedStream::connect(path, timeout).map_err(|source| DriverError::Io {
            what: format!("connecting to QMP at {}", path.display()),
            source,
        })?;
        let mut qmp = QmpClient {
            conn: BufReader::new(stream),
            path: path.to_path_buf(),
            next_id: 1,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(DriverError::Protocol(format!(
                "QMP at {}: not a QMP greeting: {}",
                path.display(),
                short(&greeting.to_string())
            )));
        }
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, DriverError> {
        let line =
            read_line_bounded(&mut self.conn, MAX_MESSAGE).map_err(|source| DriverError::Io {
                what: format!("reading from QMP at {}", self.path.display()),
                source,
            })?;
        serde_json::from_str(&line).map_err(|e| {
            DriverError::Protocol(format!(
                "QMP at {}: not JSON ({e}): {}",
                self.path.display(),
                short(&line)
            ))
        })
    }

    /// Runs a command and returns its `return` value. A QMP error reply is `Refused` (the
    /// connection stays usable); events that arrive meanwhile are kept in `events`; replies
    /// to earlier commands (after a timeout) are skipped by their `id`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, DriverError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let mut text = request.to_string();
        text.push('\n');
        self.conn.get_mut().start();
        self.conn
            .get_mut()
            .write_all(text.as_bytes())
            .map_err(|source| DriverError::Io {
                what: format!("sending {command} to QMP at {}", self.path.display()),
                source,
            })?;
        loop {
            let Value::Object(mut msg) = self.read_message()? else {
                return Err(DriverError::Protocol(format!(
                    "QMP at {}: a message that is not an object",
                    self.path.display()
                )));
            };
            if msg.contains_key("event") {
                if self.events.len() >= MAX_EVENTS {
                    self.events.remove(0);
                }
                self.events.push(Value::Object(msg));
                continue;
            }
            if msg.get("id").is_some_and(|i| *i != json!(id)) {
                continue;
            }
            if let Some(ret) = msg.remove("return") {
                return Ok(ret);
            }
            if let Some(err) = msg.get("error") {
                let class = err.get("class").and_then(Value::as_str).unwrap_or("Error");
                let desc = err.get("desc").and_then(Value::as_str).unwrap_or("");
                return Err(DriverError::Refused(format!(
                    "QMP {command}: {class}: {desc}"
                )));
            }
            return Err(DriverError::Protocol(format!(
                "QMP at {}: unexpected message {}",
                self.path.display(),
                short(&Value::Object(msg).to_string())
            )));
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
        ret.get("actual").and_then(Value::as_u64).ok_or_else(|| {
            DriverError::Protocol(format!(
                "QMP at {}: query-balloon returned {}",
                self.path.display(),
                short(&ret.to_string())
            ))
        })
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

/// Reads QEMU's `guest-stats` value (`{"stats": {"stat-available-memory": .., ...},
/// "last-update": unix seconds}`) at `now` (unix seconds). `None` until the guest has reported
/// (`last-update` 0) or without `stat-available-memory`; other unknown figures read 0.
pub fn parse_guest_stats(value: &Value, now: u64) -> Option<RawGuestStats> {
    let stats = value.get("stats")?;
    let stat = |k: &str| {
        stats
            .get(k)
            .and_then(Value::as_u64)
            .filter(|v| *v != u64::MAX)
    };
    let updated = value.get("last-update").and_then(Value::as_u64)?;
    if updated == 0 {
        return None;
    }
    Some(RawGuestStats {
        available_bytes: stat("stat-available-memory")?,
        total_bytes: stat("stat-total-memory").unwrap_or(0),
        swap_in: stat("stat-swap-in").unwrap_or(0),
        major_faults: stat("stat-major-faults").unwrap_or(0),
        age_seconds: Some(now.saturating_sub(updated) as f64),
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub struct QmpDriver {
    socket: PathBuf,
    device: String,
    memory_bytes: u64,
    stats_interval_s: u64,
    timeout: Duration,
    client: Option<QmpClient>,
    /// Whether this connection's device accepted the polling interval (no `qom-get` if not).
    stats_enabled: bool,
}

impl QmpDriver {
    /// A driver for the QMP socket of a guest of `memory_bytes` (QEMU's `-m`), with the balloon
    /// at `device` (default [`DEFAULT_DEVICE`]) and the default interval and timeout.
    pub fn new(socket: PathBuf, device: Option<String>, memory_bytes: u64) -> Self {
        let d = Self::with_timeout(socket, memory_bytes, DEFAULT_TIMEOUT);
        match device {
            Some(device) => d.with_device(device),
            None => d,
        }
    }

    /// Each QMP command (and connecting, with the greeting and the statistics setup) must be
    /// answered within `timeout`.
    pub fn with_timeout(socket: PathBuf, memory_bytes: u64, timeout: Duration) -> Self {
        QmpDriver {
            socket,
            device: DEFAULT_DEVICE.into(),
            memory_bytes,
            stats_interval_s: DEFAULT_STATS_INTERVAL_SECONDS,
            timeout,
            client: None,
            stats_enabled: false,
        }
    }

    /// The balloon device's QOM path.
    pub fn with_device(mut self, device: impl Into<String>) -> Self {
        self.device = device.into();
        self
    }

    /// How often QEMU asks the guest for statistics; 0 leaves the device alone and reads none.
    pub fn with_stats_interval(mut self, seconds: u64) -> Self {
        self.stats_interval_s = seconds;
        self
    }

    /// Whether a QMP connection is open (it is dropped after a failure).
    pub fn is_connected(&self) -> bool {
        self.client.is_some()
    }

    fn connect(&mut self) -> Result<&mut QmpClient, DriverError> {
        if self.client.is_none() {
            let mut client = QmpClient::connect(&self.socket, self.timeout)?;
            self.stats_enabled = false;
            if self.stats_interval_s > 0 {
                match client.qom_set(
                    &self.device,
                    "guest-stats-polling-interval",
                    json!(self.stats_interval_s),
                ) {
                    Ok(()) => self.stats_enabled = true,
                    // Statistics are optional: a balloon without them still balloons.
                    Err(DriverError::Refused(e)) => {
                        log::warn!("{}: no guest statistics: {e}", self.socket.display())
                    }
                    Err(e) => return Err(e),
                }
            }
            self.client = Some(client);
        }
        self.client
            .as_mut()
            .ok_or_else(|| DriverError::Protocol("no QMP connection".into()))
    }

    /// Runs `f` on the connection; an I/O or protocol failure drops the connection so that the
    /// next call reconnects (a QMP error reply does not).
    fn with_client<T>(
        &mut self,
        f: impl FnOnce(&mut QmpClient, &str) -> Result<T, DriverError>,
    ) -> Result<T, DriverError> {
        let device = self.device.clone();
        let result = self.connect().and_then(|c| f(c, &device));
        if matches!(
            result,
            Err(DriverError::Io { .. }) | Err(DriverError::Protocol(_))
        ) {
            self.client = None;
        }
        result
    }
}

impl BalloonDriver for QmpDriver {
    fn read(&mut self) -> Result<DriverReading, DriverError> {
        let memory_bytes = self.memory_bytes;
        let socket = self.socket.display().to_string();
        let actual_memory = self.with_client(|c, _| c.balloon_actual())?;
        if actual_memory > memory_bytes {
            // The configured memory is wrong (or memory was hotplugged): every balloon size
            // would be off by the difference, so say so instead of guessing.
            return Err(DriverError::Protocol(format!(
                "QMP at {socket}: QEMU reports {actual_memory} bytes of guest memory, more than \
                 the {memory_bytes} configured for this guest"
            )));
        }
        let stats = if self.stats_enabled {
            match self.with_client(|c, device| c.qom_get(device, "guest-stats")) {
                Ok(v) => parse_guest_stats(&v, unix_now()),
                Err(DriverError::Refused(e)) => {
                    log::debug!("{socket}: guest-stats: {e}");
                    None
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        Ok(DriverReading {
            target_bytes: None,
            actual_bytes: memory_bytes - actual_memory,
            stats,
            split: None,
            size_disputed: false,
        })
    }

    fn set_balloon(&mut self, balloon_bytes: u64) -> Result<(), DriverError> {
        if balloon_bytes >= self.memory_bytes {
            return Err(DriverError::Refused(format!(
                "a balloon of {balloon_bytes} bytes would leave a guest of {} bytes no memory \
                 (QEMU's balloon command takes the guest's memory, which must be above 0)",
                self.memory_bytes
            )));
        }
        let memory = self.memory_bytes - balloon_bytes;
        self.with_client(|c, _| c.balloon(memory))
    }

    fn describe(&self) -> String {
        format!("qmp {}", self.socket.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_stats_unknown_values_and_missing_updates() {
        let v = json!({"stats": {
            "stat-available-memory": 300u64 << 20,
            "stat-total-memory": 900u64 << 20,
            "stat-swap-in": -1,
            "stat-major-faults": u64::MAX,
        }, "last-update": 1000});
        let s = parse_guest_stats(&v, 1004).unwrap();
        assert_eq!(
            s,
            RawGuestStats {
                available_bytes: 300 << 20,
                total_bytes: 900 << 20,
                swap_in: 0,
                major_faults: 0,
                age_seconds: Some(4.0),
            }
        );
        assert_eq!(
            parse_guest_stats(&json!({"stats": {}, "last-update": 0}), 5),
            None
        );
        assert_eq!(
            parse_guest_stats(
                &json!({"stats": {"stat-available-memory": -1}, "last-update": 9}),
                10
            ),
            None,
            "no available memory, no statistics"
        );
        assert_eq!(parse_guest_stats(&json!("garbage"), 5), None);
        assert_eq!(
            parse_guest_stats(&json!({"stats": [], "last-update": -3}), 5),
            None
        );
    }
}
