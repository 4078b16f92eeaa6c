//! Our vhost-balloon-backend, through its control socket (JSON lines; the types are
//! balloon-protocol's `ControlMessage` / `ControlReply` / `BackendStatus`).
//!
//! ```toml
//! driver = { kind = "backend", control_socket = "/run/vhost-balloon/vm1.control" }
//! ```
//!
//! Each request must be answered within 10 s (`DEFAULT_TIMEOUT`); a tick does not wait that
//! long, only until its driver deadline (`driver_deadline_seconds`), see `pool`.
//!
//! The backend speaks balloon sizes, so no conversion is needed: `target_bytes` and
//! `actual_bytes` are the status's, and the guest's virtio-balloon statistics come from
//! `status.stats.values` (`available_memory`, `total_memory` in bytes; `swap_in` and
//! `major_faults` as the guest reported them) with their age.
//!
//! The driver keeps one connection and drops it after any I/O or framing failure, so the next
//! call reconnects (a restarted backend is picked up on the following tick). It does not use
//! `balloon_protocol::ControlClient`: that client has no timeouts and reads reply lines without
//! a length limit, and one backend that stops answering must not stall the scheduler's tick.

use super::split::{BalloonMechanism, BalloonSplit, Splitter, Targets};
use super::unix::{read_line_bounded, TimedStream};
use super::{BalloonDriver, DriverError, DriverReading, RawGuestStats};
use balloon_protocol::control::{BackendStatus, ControlMessage};
use balloon_protocol::{ControlReply, ControlRequest};
use std::io::{BufReader, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest reply line accepted (a status is about 1 KiB).
const MAX_REPLY: usize = 1 << 20;

pub struct BackendDriver {
    path: PathBuf,
    timeout: Duration,
    conn: Option<BufReader<TimedStream>>,
    splitter: Splitter,
    /// The last status read, for splitting the next size.
    last: Option<BackendStatus>,
    /// Hand-overs between the mechanisms so far (see `BalloonSplit::handovers`).
    handovers: u64,
}

impl BackendDriver {
    /// A driver for the control socket at `path`, with the default timeout. Nothing is
    /// connected until the first call.
    pub fn new(path: PathBuf) -> Self {
        Self::with_timeout(path, DEFAULT_TIMEOUT)
    }

    /// Each request (connecting included) must be answered within `timeout`.
    pub fn with_timeout(path: PathBuf, timeout: Duration) -> Self {
        BackendDriver {
            path,
            timeout,
            conn: None,
            splitter: Splitter::new(BalloonMechanism::Auto),
            last: None,
            handovers: 0,
        }
    }

    /// Which of the backend's mechanisms hold the balloon (see split.rs).
    pub fn with_mechanism(mut self, mode: BalloonMechanism) -> Self {
        self.splitter = Splitter::new(mode);
        self
    }

    fn status(&mut self) -> Result<BackendStatus, DriverError> {
        let reply = self.request(ControlRequest::Status {})?;
        reply.status.ok_or_else(|| {
            DriverError::Protocol(format!(
                "the backend at {} answered status without one",
                self.path.display()
            ))
        })
    }

    /// Sends the two targets, the one that shrinks first, so that together they never
    /// exceed the size asked for. The driver's is always sent (a resend is how a size is
    /// retried); the app's only when it changes or is not zero, so a backend without an app
    /// is asked nothing about one.
    fn send_targets(&mut self, s: &BackendStatus, t: Targets) -> Result<(), DriverError> {
        let driver = ControlRequest::SetTarget {
            target_bytes: t.driver_bytes,
        };
        let app = (t.app_bytes != s.app.target_bytes || t.app_bytes > 0).then_some(
            ControlRequest::SetAppTarget {
                target_bytes: t.app_bytes,
            },
        );
        let driver_first = t.driver_bytes < s.target_bytes;
        if driver_first {
            self.request(driver.clone())?;
        }
        if let Some(app) = app {
            self.request(app)?;
        }
        if !driver_first {
            self.request(driver)?;
        }
        Ok(())
    }

    /// Whether a connection is open (it is dropped after a failure).
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    fn io(&self, what: &str) -> impl FnOnce(std::io::Error) -> DriverError {
        let what = format!(
            "{what} the backend's control socket {}",
            self.path.display()
        );
        move |source| DriverError::Io { what, source }
    }

    /// Sends one request and reads its reply; an error reply is `Refused`. The connection is
    /// kept after a reply of either kind and dropped after anything else.
    fn request(&mut self, request: ControlRequest) -> Result<ControlReply, DriverError> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => BufReader::new(
                TimedStream::connect(&self.path, self.timeout).map_err(self.io("connecting to"))?,
            ),
        };
        conn.get_mut().start();
        let mut line = serde_json::to_string(&ControlMessage::new(request))
            .map_err(|e| DriverError::Protocol(format!("encoding a control request: {e}")))?;
        line.push('\n');
        conn.get_mut()
            .write_all(line.as_bytes())
            .map_err(self.io("writing to"))?;
        let text = read_line_bounded(&mut conn, MAX_REPLY).map_err(self.io("reading from"))?;
        let reply: ControlReply = serde_json::from_str(&text).map_err(|e| {
            DriverError::Protocol(format!(
                "the backend at {} sent a bad reply ({e}): {:.200}",
                self.path.display(),
                text.trim_end()
            ))
        })?;
        self.conn = Some(conn);
        if reply.ok {
            Ok(reply)
        } else {
            Err(DriverError::Refused(reply.error.unwrap_or_else(|| {
                "an error reply without a message".into()
            })))
        }
    }
}

/// The reading a backend status gives.
pub fn reading_from_status(status: &BackendStatus) -> DriverReading {
    let driver_stats = status.stats.as_ref().and_then(|s| {
        let value = |k: &str| s.values.get(k).copied();
        // Without MemAvailable the figures say nothing a policy can use.
        Some(RawGuestStats {
            available_bytes: value("available_memory")?,
            total_bytes: value("total_memory").unwrap_or(0),
            swap_in: value("swap_in").unwrap_or(0),
            major_faults: value("major_faults").unwrap_or(0),
            age_seconds: s.age_seconds.is_finite().then_some(s.age_seconds.max(0.0)),
        })
    });
    // A guest without a balloon driver has no statistics queue, and a driver that went away
    // leaves its last figures behind: the app's stand in then. Only then: the driver's are
    // the guest kernel's own, and flipping between sources tick by tick would mix counters.
    let app_stats = status.app.meminfo.map(|(m, age)| RawGuestStats {
        available_bytes: m.available_bytes,
        total_bytes: m.total_bytes,
        swap_in: m.swap_in,
        major_faults: m.major_faults,
        age_seconds: age.is_finite().then_some(age.max(0.0)),
    });
    let stale_after = (3 * status.stats_interval_seconds).max(10) as f64;
    let driver_stale = driver_stats
        .and_then(|s| s.age_seconds)
        .is_some_and(|age| age > stale_after);
    let stats = match (driver_stats, app_stats) {
        (Some(_), Some(_)) if driver_stale => app_stats,
        (None, _) => app_stats,
        _ => driver_stats,
    };
    DriverReading {
        // Saturating: the figures come from another process (the engine bounds them after).
        target_bytes: Some(status.target_bytes.saturating_add(status.app.target_bytes)),
        actual_bytes: status
            .actual_bytes
            .saturating_add(status.app.ballooned_bytes),
        stats,
        split: None,
        size_disputed: status.driver_claim_disputed,
    }
}

impl BalloonDriver for BackendDriver {
    fn read(&mut self) -> Result<DriverReading, DriverError> {
        let mut status = self.status()?;
        let now = Instant::now();
        self.splitter.observe(&status, now);
        let handed_over = self.splitter.hand_over_due(&status);
        if handed_over {
            self.handovers += 1;
            // The driver stalled short of its share: the app takes the rest of the same size.
            let total = status.target_bytes.saturating_add(status.app.target_bytes);
            let targets = self.splitter.targets(total, &status, now);
            log::info!(
                "{}: the driver stalled at {} MiB; the app is asked for {} MiB",
                self.describe(),
                status.actual_bytes >> 20,
                targets.app_bytes >> 20
            );
            self.send_targets(&status, targets)?;
            status = self.status()?;
        }
        let mut reading = reading_from_status(&status);
        reading.split = Some(BalloonSplit {
            handovers: self.handovers,
            ..self.splitter.split_of(&status)
        });
        self.last = Some(status);
        Ok(reading)
    }

    fn set_balloon(&mut self, balloon_bytes: u64) -> Result<(), DriverError> {
        let status = match self.last.take() {
            Some(s) => s,
            None => self.status()?,
        };
        let targets = self
            .splitter
            .targets(balloon_bytes, &status, Instant::now());
        self.send_targets(&status, targets)
    }

    fn describe(&self) -> String {
        format!("backend {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use balloon_protocol::app::GuestMemInfo;
    use balloon_protocol::control::GuestStatsSnapshot;

    const MIB: u64 = 1 << 20;

    fn status(driver_age: Option<f64>, app_age: Option<f64>) -> BackendStatus {
        let mut s = BackendStatus {
            target_bytes: 100 * MIB,
            actual_bytes: 90 * MIB,
            ..Default::default()
        };
        s.stats = driver_age.map(|age_seconds| GuestStatsSnapshot {
            age_seconds,
            values: [("available_memory".to_string(), 46 * MIB)]
                .into_iter()
                .collect(),
            ..Default::default()
        });
        s.app.target_bytes = 50 * MIB;
        s.app.ballooned_bytes = 40 * MIB;
        s.app.meminfo = app_age.map(|age| {
            (
                GuestMemInfo {
                    available_bytes: 300 * MIB,
                    total_bytes: 1000 * MIB,
                    ..Default::default()
                },
                age,
            )
        });
        s
    }

    /// A backend's reply is another process's word: sizes at u64::MAX panicked the driver
    /// thread in debug builds and wrapped in release.
    #[test]
    fn sizes_at_the_limit_neither_panic_nor_wrap() {
        let mut s = status(Some(0.5), None);
        s.target_bytes = u64::MAX;
        s.actual_bytes = u64::MAX;
        let r = reading_from_status(&s);
        assert_eq!(r.target_bytes, Some(u64::MAX));
        assert_eq!(r.actual_bytes, u64::MAX);
        let mut split = Splitter::new(BalloonMechanism::Both);
        let t0 = Instant::now();
        split.observe(&s, t0);
        s.actual_bytes = u64::MAX - 1;
        split.observe(&s, t0 + Duration::from_secs(60));
        let _ = split.hand_over_due(&s);
        let t = split.targets(1 << 30, &s, t0 + Duration::from_secs(61));
        assert!(t.driver_bytes.checked_add(t.app_bytes).is_some(), "{t:?}");
    }

    #[test]
    fn the_balloon_is_both_parts_and_the_app_stands_in_for_missing_or_stale_figures() {
        let r = reading_from_status(&status(Some(0.5), None));
        assert_eq!(r.target_bytes, Some(150 * MIB));
        assert_eq!(r.actual_bytes, 130 * MIB);
        assert_eq!(r.stats.unwrap().available_bytes, 46 * MIB);
        // A guest without a driver: the app's figures.
        let r = reading_from_status(&status(None, Some(1.0)));
        assert_eq!(r.stats.unwrap().available_bytes, 300 * MIB);
        // A driver that went away left figures that only age: the app's stand in.
        let r = reading_from_status(&status(Some(120.0), Some(1.0)));
        assert_eq!(r.stats.unwrap().available_bytes, 300 * MIB);
        // A driver reporting at its interval keeps the source, however fresh the app's are.
        let r = reading_from_status(&status(Some(4.0), Some(0.5)));
        assert_eq!(r.stats.unwrap().available_bytes, 46 * MIB);
    }
}
