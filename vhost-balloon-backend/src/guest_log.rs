//! Logging what a guest causes. A guest decides how often it sends out-of-RAM pages, broken
//! statistics, a broken ring or malformed app messages, so each kind is logged at most once per
//! `INTERVAL`, with the count of those not logged, and every message goes through
//! `balloon_protocol::lines::printable` (no control characters, bounded length). Without this,
//! one guest could write tens of thousands of lines a second, and under journald's rate limit
//! the host's own messages would be the ones lost. The counters in the status count every one.

use balloon_protocol::lines::RateLimitedLog;
use std::time::Duration;

pub const INTERVAL: Duration = Duration::from_secs(10);

/// A kind of guest-caused event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestEvent {
    /// Page numbers outside guest RAM (inflate, deflate, free page reports).
    PagesOutsideRam,
    /// A statistics buffer that is not whole tag/value entries.
    BadStatistics,
    /// A ring the backend cannot use (indices past the queue size, unreadable addresses).
    BrokenRing,
    /// An authenticated app's message that does not decode.
    BadAppMessage,
}

impl GuestEvent {
    const COUNT: usize = 4;

    fn index(self) -> usize {
        match self {
            GuestEvent::PagesOutsideRam => 0,
            GuestEvent::BadStatistics => 1,
            GuestEvent::BrokenRing => 2,
            GuestEvent::BadAppMessage => 3,
        }
    }
}

pub struct GuestLog {
    kinds: [RateLimitedLog; GuestEvent::COUNT],
}

impl Default for GuestLog {
    fn default() -> Self {
        GuestLog {
            kinds: std::array::from_fn(|_| RateLimitedLog::new(INTERVAL)),
        }
    }
}

impl GuestLog {
    /// Logs `message` for `event` unless one of its kind was logged within the interval.
    pub fn warn(&mut self, event: GuestEvent, message: impl FnOnce() -> String) {
        self.kinds[event.index()].warn(message);
    }
}
