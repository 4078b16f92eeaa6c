//! One balloon size split between our backend's two mechanisms: the guest's virtio_balloon
//! driver and the user-level app (balloon-guest). The policy decides one size per guest; this
//! decides who holds it.
//!
//! With both, the driver goes first: it takes free pages without forcing reclaim. What it
//! cannot take (it stalls once free memory is gone, with the page cache full) goes to the app,
//! whose allocations make the guest reclaim page cache and swap with its own algorithms (the
//! patent's point). Deflating returns the app's share first: it is the one that pushed the
//! guest. The two targets always add up to the size asked for, so the mechanisms never race
//! for the same memory. Page numbers never pass here: only sizes.

use balloon_protocol::control::BackendStatus;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Which mechanisms balloon a guest (`balloon = ...` in a backend driver's config).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BalloonMechanism {
    /// Whatever the guest has: both when the driver started the device and an app is
    /// connected with pages it can name, else the one there is.
    #[default]
    Auto,
    Driver,
    App,
    Both,
}

impl std::fmt::Display for BalloonMechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BalloonMechanism::Auto => "auto",
            BalloonMechanism::Driver => "driver",
            BalloonMechanism::App => "app",
            BalloonMechanism::Both => "both",
        })
    }
}

/// What a guest's balloon consists of, as the trace, the status and /metrics show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonSplit {
    /// The mechanisms in use now (never `auto`).
    pub mechanism: BalloonMechanism,
    pub driver_target_bytes: u64,
    pub driver_actual_bytes: u64,
    pub app_target_bytes: u64,
    pub app_actual_bytes: u64,
    /// The driver is short of its target and has not moved for a while.
    pub driver_stalled: bool,
    /// The app says the guest cannot give it more.
    pub app_stalled: bool,
    /// How many times the balloon has changed hands between the mechanisms since the driver
    /// started. A count, not a flag on the reading that follows the hand-over: that reading
    /// may come past the tick's deadline and be dropped, and the hand-over with it.
    #[serde(default)]
    pub handovers: u64,
}

/// Two targets for the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Targets {
    pub driver_bytes: u64,
    pub app_bytes: u64,
}

impl Targets {
    fn total(self) -> u64 {
        self.driver_bytes.saturating_add(self.app_bytes)
    }
}

/// The driver has stalled when it grew by less than this within `DRIVER_STALL_WINDOW`: the
/// actuator's default stall rate (15 MB/s, over 4 s) over a shorter window, so that the app is
/// asked before the actuator gives up on the whole balloon.
const DRIVER_PROGRESS_FLOOR: u64 = 45_000_000;
pub const DRIVER_STALL_WINDOW: Duration = Duration::from_secs(3);
/// After a stall, growth goes to the app for this long before the driver is tried first again
/// (asking a driver that cannot move costs a stall window every time).
pub const DRIVER_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Follows the driver's progress and splits sizes.
#[derive(Debug)]
pub struct Splitter {
    mode: BalloonMechanism,
    window: Duration,
    /// The driver's actual size when the current window began, and when that was (a new
    /// driver target starts a new window).
    window_start: Option<(u64, Instant)>,
    driver_stalled: bool,
    /// When the driver last stalled: growth goes to the app until `DRIVER_RETRY_AFTER`.
    stalled_at: Option<Instant>,
}

impl Splitter {
    pub fn new(mode: BalloonMechanism) -> Self {
        Self::with_window(mode, DRIVER_STALL_WINDOW)
    }

    pub fn with_window(mode: BalloonMechanism, window: Duration) -> Self {
        Splitter {
            mode,
            window,
            window_start: None,
            driver_stalled: false,
            stalled_at: None,
        }
    }

    /// The mechanisms in use for a guest in this state: with `auto` and `both`, those the
    /// guest has (a `both` guest without its driver, or without its app, uses the other).
    pub fn mechanism(&self, s: &BackendStatus) -> BalloonMechanism {
        match self.mode {
            BalloonMechanism::Auto | BalloonMechanism::Both => {
                let app = s.app.connected && s.app.reclaimable;
                match (s.device_started, app) {
                    (true, true) => BalloonMechanism::Both,
                    (false, true) => BalloonMechanism::App,
                    _ => BalloonMechanism::Driver,
                }
            }
            fixed => fixed,
        }
    }

    /// Notes the driver's progress in a fresh status.
    pub fn observe(&mut self, s: &BackendStatus, now: Instant) {
        let short = s.actual_bytes < s.target_bytes;
        match self.window_start {
            Some((start, since)) if short => {
                if s.actual_bytes >= start.saturating_add(DRIVER_PROGRESS_FLOOR) {
                    self.window_start = Some((s.actual_bytes, now));
                    self.driver_stalled = false;
                } else if now.duration_since(since) >= self.window {
                    self.driver_stalled = true;
                    self.stalled_at = Some(now);
                }
            }
            _ => {
                self.window_start = short.then_some((s.actual_bytes, now));
                self.driver_stalled = false;
            }
        }
    }

    /// The split as the status shows it.
    pub fn split_of(&self, s: &BackendStatus) -> BalloonSplit {
        BalloonSplit {
            mechanism: self.mechanism(s),
            driver_target_bytes: s.target_bytes,
            driver_actual_bytes: s.actual_bytes,
            app_target_bytes: s.app.target_bytes,
            app_actual_bytes: s.app.ballooned_bytes,
            driver_stalled: self.driver_stalled,
            app_stalled: s.app.stalled,
            handovers: 0,
        }
    }

    /// The targets for a balloon of `total` bytes, from the backend's current ones.
    pub fn targets(&mut self, total: u64, s: &BackendStatus, now: Instant) -> Targets {
        let current = Targets {
            driver_bytes: s.target_bytes,
            app_bytes: s.app.target_bytes,
        };
        let next = match self.mechanism(s) {
            BalloonMechanism::Driver | BalloonMechanism::Auto => Targets {
                driver_bytes: total,
                app_bytes: 0,
            },
            BalloonMechanism::App => Targets {
                driver_bytes: 0,
                app_bytes: total,
            },
            BalloonMechanism::Both => self.both(total, current, s, now),
        };
        if next.driver_bytes < current.driver_bytes || s.actual_bytes >= next.driver_bytes {
            // A smaller driver target (a hand-over, a deflate), or one it has reached: its
            // progress is judged afresh. A larger one while it is still short keeps the window:
            // a ramp of growing targets must not hide a driver that does not move.
            self.window_start =
                (s.actual_bytes < next.driver_bytes).then_some((s.actual_bytes, now));
            self.driver_stalled = false;
        } else if self.window_start.is_none() && s.actual_bytes < next.driver_bytes {
            self.window_start = Some((s.actual_bytes, now));
        }
        next
    }

    fn both(&self, total: u64, current: Targets, s: &BackendStatus, now: Instant) -> Targets {
        if total < current.total() {
            // Deflate: the app's share goes first.
            let app = current.app_bytes.saturating_sub(current.total() - total);
            return Targets {
                driver_bytes: total - app,
                app_bytes: app,
            };
        }
        let stalled_lately = self
            .stalled_at
            .is_some_and(|at| now.duration_since(at) < DRIVER_RETRY_AFTER);
        if self.driver_stalled || stalled_lately {
            // The driver keeps what it has; the app takes the rest.
            let driver = s.actual_bytes.min(current.driver_bytes);
            return Targets {
                driver_bytes: driver,
                app_bytes: total - driver,
            };
        }
        Targets {
            driver_bytes: total - current.app_bytes,
            app_bytes: current.app_bytes,
        }
    }

    /// Whether the targets should move without a new size: the driver stalled short of its
    /// share while the app could take it, or one mechanism went away (the driver stopped the
    /// device, the app disconnected) and still has a part.
    pub fn hand_over_due(&self, s: &BackendStatus) -> bool {
        match self.mechanism(s) {
            BalloonMechanism::Both => self.driver_stalled && s.actual_bytes < s.target_bytes,
            BalloonMechanism::App => self.mode != BalloonMechanism::App && s.target_bytes > 0,
            BalloonMechanism::Driver => {
                self.mode != BalloonMechanism::Driver && s.app.target_bytes > 0
            }
            BalloonMechanism::Auto => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use balloon_protocol::control::AppStatus;

    const MIB: u64 = 1 << 20;

    fn status(driver: (u64, u64), app: (u64, u64)) -> BackendStatus {
        BackendStatus {
            device_started: true,
            target_bytes: driver.0 * MIB,
            actual_bytes: driver.1 * MIB,
            app: AppStatus {
                connected: true,
                reclaimable: true,
                target_bytes: app.0 * MIB,
                ballooned_bytes: app.1 * MIB,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn targets(t: Targets) -> (u64, u64) {
        (t.driver_bytes / MIB, t.app_bytes / MIB)
    }

    #[test]
    fn auto_uses_what_the_guest_has() {
        let split = Splitter::new(BalloonMechanism::Auto);
        let mut s = status((0, 0), (0, 0));
        assert_eq!(split.mechanism(&s), BalloonMechanism::Both);
        s.app.connected = false;
        assert_eq!(split.mechanism(&s), BalloonMechanism::Driver);
        s.app.connected = true;
        s.device_started = false;
        assert_eq!(split.mechanism(&s), BalloonMechanism::App);
        s.app.reclaimable = false;
        assert_eq!(split.mechanism(&s), BalloonMechanism::Driver);
    }

    #[test]
    fn a_single_mechanism_gets_the_whole_size() {
        let now = Instant::now();
        let s = status((0, 0), (0, 0));
        let mut app = Splitter::new(BalloonMechanism::App);
        assert_eq!(targets(app.targets(300 * MIB, &s, now)), (0, 300));
        let mut driver = Splitter::new(BalloonMechanism::Driver);
        assert_eq!(targets(driver.targets(300 * MIB, &s, now)), (300, 0));
    }

    #[test]
    fn with_both_the_driver_goes_first_and_the_app_takes_what_it_cannot() {
        let t0 = Instant::now();
        let mut split = Splitter::with_window(BalloonMechanism::Both, Duration::from_secs(3));
        let s = status((0, 0), (0, 0));
        assert_eq!(targets(split.targets(400 * MIB, &s, t0)), (400, 0));
        // The driver moves, then stops at 150 MiB.
        let at = |secs| t0 + Duration::from_secs(secs);
        split.observe(&status((400, 100), (0, 0)), at(1));
        split.observe(&status((400, 150), (0, 0)), at(2));
        assert!(!split.hand_over_due(&status((400, 150), (0, 0))));
        split.observe(&status((400, 151), (0, 0)), at(4));
        assert!(!split.hand_over_due(&status((400, 151), (0, 0))));
        split.observe(&status((400, 151), (0, 0)), at(5));
        let stalled = status((400, 151), (0, 0));
        assert!(split.hand_over_due(&stalled));
        assert!(split.split_of(&stalled).driver_stalled);
        // The driver keeps what it has, the app is asked for the rest.
        assert_eq!(
            targets(split.targets(400 * MIB, &stalled, at(5))),
            (151, 249)
        );
        let handed = status((151, 151), (249, 0));
        split.observe(&handed, at(6));
        assert!(!split.hand_over_due(&handed));
        // More, soon after: the app again (asking the driver would cost a stall window).
        assert_eq!(
            targets(split.targets(450 * MIB, &handed, at(7))),
            (151, 299)
        );
        // A minute later the driver is asked first again (it may have room by now).
        let later = status((151, 151), (299, 299));
        assert_eq!(
            targets(split.targets(500 * MIB, &later, at(66))),
            (201, 299)
        );
        // Less: the app gives back first, then the driver.
        let full = status((201, 201), (299, 299));
        assert_eq!(targets(split.targets(300 * MIB, &full, at(67))), (201, 99));
        assert_eq!(targets(split.targets(100 * MIB, &full, at(67))), (100, 0));
    }

    #[test]
    fn both_without_the_driver_or_without_the_app_uses_the_other() {
        let now = Instant::now();
        let mut split = Splitter::new(BalloonMechanism::Both);
        let mut s = status((300, 300), (0, 0));
        s.device_started = false;
        assert_eq!(split.mechanism(&s), BalloonMechanism::App);
        // The driver's part is handed over at the next reading, without a new size.
        assert!(split.hand_over_due(&s));
        assert_eq!(targets(split.targets(300 * MIB, &s, now)), (0, 300));
        assert!(!split.hand_over_due(&status((0, 0), (300, 0))));
        let mut s = status((0, 0), (300, 300));
        s.app.connected = false;
        assert_eq!(targets(split.targets(300 * MIB, &s, now)), (300, 0));
    }

    #[test]
    fn a_ramp_of_growing_targets_does_not_hide_a_driver_that_does_not_move() {
        let t0 = Instant::now();
        let mut split = Splitter::with_window(BalloonMechanism::Both, Duration::from_secs(3));
        let mut current = status((0, 0), (0, 0));
        let mut handed_at = None;
        for i in 0..6u64 {
            let t = t0 + Duration::from_secs(i);
            let next = split.targets((i + 1) * 128 * MIB, &current, t);
            if next.app_bytes > 0 && handed_at.is_none() {
                handed_at = Some(i);
                assert_eq!(next.driver_bytes, 10 * MIB, "it keeps what it has");
            }
            current = status((next.driver_bytes / MIB, 10), (next.app_bytes / MIB, 0));
            split.observe(&current, t);
        }
        // Stuck at 10 MiB from 0 s: stalled at 3 s, the app asked at the next size.
        assert_eq!(handed_at, Some(4));
    }

    #[test]
    fn a_driver_that_keeps_moving_is_not_stalled() {
        let t0 = Instant::now();
        let mut split = Splitter::with_window(BalloonMechanism::Both, Duration::from_secs(3));
        split.targets(400 * MIB, &status((0, 0), (0, 0)), t0);
        for i in 1..20u64 {
            let s = status((400, 20 * i), (0, 0));
            split.observe(&s, t0 + Duration::from_secs(i));
            assert!(!split.hand_over_due(&s), "at {i} s");
        }
        // At its target it is not stalled however long it stays.
        let done = status((400, 400), (0, 0));
        for i in 20..30u64 {
            split.observe(&done, t0 + Duration::from_secs(i));
        }
        assert!(!split.hand_over_due(&done));
    }
}
