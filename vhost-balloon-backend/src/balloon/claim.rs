//! The driver's word against the host's. The driver writes its balloon size (`actual`) into the
//! config space, and a hostile guest kernel can write anything there: 16 TiB on a 64 MiB guest,
//! or its whole RAM less its minimum while it inflates nothing. A scheduler that budgeted by that
//! word would grow the neighbours into memory the liar still holds. So the size the backend
//! reports as the balloon is what it tracks (the pages the driver handed over, which it
//! discards), and the word is only compared with it: a gap wider than an honest driver's lag that
//! lasts longer than that lag is a dispute, reported in the status and logged once.

use std::time::{Duration, Instant};

/// The widest gap an honest driver leaves: Linux writes `actual` after each buffer of up to 256
/// pages (`update_balloon_size` after every `fill_balloon`/`leak_balloon`), so its word trails
/// the tracked pages by one buffer. Four buffers leave room for a frontend that forwards the
/// write late.
pub const TOLERANCE_PAGES: u64 = 1024;

/// How long a gap may last before it is a dispute: an honest driver closes it with its next
/// write, within a buffer's round trip (milliseconds, seconds on a loaded TCG guest).
pub const GRACE: Duration = Duration::from_secs(5);

/// How the driver's word compares with the tracked pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DriverClaim {
    /// The driver has written no `actual` (or a new one has started and not yet written).
    #[default]
    Silent,
    /// Within the tolerance.
    Agrees,
    /// Outside the tolerance since `since`, not yet for longer than the grace.
    Differs { since: Instant },
    /// Outside the tolerance for longer than the grace, since `since`.
    Disputed { since: Instant },
}

impl DriverClaim {
    /// The state after comparing the driver's word (`claimed`, pages; `None` if it wrote none)
    /// with the `tracked` pages at `now`.
    pub fn observe(self, claimed: Option<u64>, tracked: u64, now: Instant) -> Self {
        use DriverClaim::*;
        let Some(claimed) = claimed else {
            return Silent;
        };
        if claimed.abs_diff(tracked) <= TOLERANCE_PAGES {
            return Agrees;
        }
        match self {
            Silent | Agrees => Differs { since: now },
            Differs { since } if now.saturating_duration_since(since) > GRACE => Disputed { since },
            Differs { .. } | Disputed { .. } => self,
        }
    }

    pub fn disputed(self) -> bool {
        matches!(self, DriverClaim::Disputed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DriverClaim::*;

    #[test]
    fn an_honest_drivers_lag_is_no_dispute_and_a_lasting_gap_is() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Inflating: the word trails by one buffer.
        let c = Silent.observe(Some(0), 256, at(0));
        assert_eq!(c, Agrees);
        // A gap opens and closes within the grace.
        let c = c.observe(Some(1 << 20), 256, at(1));
        assert_eq!(c, Differs { since: at(1) });
        let c = c.observe(Some(1 << 20), 256, at(1 + GRACE.as_secs()));
        assert!(!c.disputed(), "{c:?}");
        assert_eq!(c.observe(Some(300), 256, at(7)), Agrees);
        // One that lasts becomes a dispute, in either direction, and stays until it closes.
        for claimed in [u64::from(u32::MAX), 0] {
            let tracked = 100_000;
            let c = Agrees.observe(Some(claimed), tracked, at(10));
            let c = c.observe(Some(claimed), tracked, at(16));
            assert_eq!(c, Disputed { since: at(10) });
            assert!(c.observe(Some(claimed), tracked, at(100)).disputed());
            assert_eq!(c.observe(Some(tracked), tracked, at(101)), Agrees);
        }
        // No word at all is no dispute.
        assert_eq!(Disputed { since: at(0) }.observe(None, 5, at(200)), Silent);
    }
}
