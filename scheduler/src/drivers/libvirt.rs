//! A libvirt domain's balloon (QEMU's built-in virtio-balloon, which libvirt owns), through
//! `virsh` (see virsh.rs for why the command and not the library).
//!
//! ```toml
//! driver = { kind = "libvirt", uri = "qemu:///system", domain = "web-1" }
//! ```
//!
//! - Reading: `virsh domstats --balloon DOMAIN`. `balloon.maximum` is the domain's memory and
//!   `balloon.current` what the guest has now (KiB), so the balloon is their difference.
//!   The guest's statistics: `balloon.usable` (the guest's MemAvailable), `balloon.available`
//!   (its MemTotal), `balloon.swap_in` (KiB), `balloon.major_fault`, `balloon.last-update`
//!   (host UNIX seconds). Without them the statistics period is off: the driver sets it once
//!   (`virsh dommemstat --period N --live`).
//! - Setting: `virsh setmem DOMAIN KiB --live`, virDomainSetMemory: the memory the guest is to
//!   keep, i.e. the maximum minus the balloon.
//! - libvirt reports no target apart from the actual size (it updates the domain's current
//!   memory from the balloon's change events), so `target_bytes` is `None`, as for QMP.
//! - A domain that stopped or was undefined makes virsh fail: the guest is unreachable.

use super::virsh::Virsh;
use super::{BalloonDriver, DriverError, DriverReading, RawGuestStats};
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

pub const DEFAULT_STATS_INTERVAL_SECONDS: u64 = 5;

pub struct LibvirtDriver {
    virsh: Virsh,
    domain: String,
    stats_interval: u64,
    /// Whether the statistics period was set on this domain (once per driver; 0: never).
    stats_period_set: bool,
    /// The domain's memory (KiB) in the latest reading: what a balloon size is taken from.
    maximum_kib: Option<u64>,
}

fn kib(stats: &BTreeMap<String, String>, key: &str) -> Option<u64> {
    stats.get(key)?.trim().parse().ok()
}

/// The reading from a domain's `domstats --balloon` figures, at host time `now` (UNIX s).
fn reading_of(stats: &BTreeMap<String, String>, now: u64) -> Result<DriverReading, DriverError> {
    let (Some(maximum), Some(current)) =
        (kib(stats, "balloon.maximum"), kib(stats, "balloon.current"))
    else {
        return Err(DriverError::Protocol(
            "domstats has no balloon.maximum or balloon.current (no balloon device?)".into(),
        ));
    };
    let guest = match (
        kib(stats, "balloon.usable"),
        kib(stats, "balloon.last-update"),
    ) {
        (Some(usable), Some(updated)) if updated > 0 => Some(RawGuestStats {
            available_bytes: usable.saturating_mul(1024),
            total_bytes: kib(stats, "balloon.available")
                .unwrap_or(0)
                .saturating_mul(1024),
            swap_in: kib(stats, "balloon.swap_in")
                .unwrap_or(0)
                .saturating_mul(1024),
            major_faults: kib(stats, "balloon.major_fault").unwrap_or(0),
            age_seconds: Some(now.saturating_sub(updated) as f64),
        }),
        _ => None,
    };
    Ok(DriverReading {
        target_bytes: None,
        actual_bytes: maximum.saturating_sub(current).saturating_mul(1024),
        stats: guest,
    })
}

impl LibvirtDriver {
    pub fn new(virsh: Virsh, domain: String) -> Self {
        LibvirtDriver {
            virsh,
            domain,
            stats_interval: DEFAULT_STATS_INTERVAL_SECONDS,
            stats_period_set: false,
            maximum_kib: None,
        }
    }

    /// How often libvirt has QEMU ask the guest for statistics; 0 leaves it as it is.
    pub fn with_stats_interval(mut self, seconds: u64) -> Self {
        self.stats_interval = seconds;
        self
    }

    fn set_stats_period(&mut self) -> Result<(), DriverError> {
        let period = self.stats_interval.to_string();
        self.virsh.run(&[
            "dommemstat",
            "--period",
            &period,
            "--live",
            "--",
            &self.domain,
        ])?;
        self.stats_period_set = true;
        log::info!(
            "libvirt domain {}: balloon statistics every {period} s",
            self.domain
        );
        Ok(())
    }
}

impl BalloonDriver for LibvirtDriver {
    fn read(&mut self) -> Result<DriverReading, DriverError> {
        let stats = self.virsh.balloon_stats(&self.domain)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let reading = reading_of(&stats, now)?;
        self.maximum_kib = kib(&stats, "balloon.maximum");
        if reading.stats.is_none() && !self.stats_period_set && self.stats_interval > 0 {
            self.set_stats_period()?;
        }
        Ok(reading)
    }

    fn set_balloon(&mut self, balloon_bytes: u64) -> Result<(), DriverError> {
        let maximum = match self.maximum_kib {
            Some(m) => m,
            None => {
                self.read()?;
                self.maximum_kib.ok_or_else(|| {
                    DriverError::Protocol("the domain's maximum memory is unknown".into())
                })?
            }
        };
        let keep_kib = maximum.saturating_sub(balloon_bytes / 1024);
        self.virsh.run(&[
            "setmem",
            "--live",
            "--",
            &self.domain,
            &keep_kib.to_string(),
        ])?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("libvirt {} domain {}", self.virsh.uri, self.domain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_balloon_is_the_maximum_minus_what_the_guest_has_and_statistics_are_bytes() {
        let s = stats(&[
            ("balloon.current", "786432"),
            ("balloon.maximum", "1048576"),
            ("balloon.usable", "500000"),
            ("balloon.available", "760000"),
            ("balloon.swap_in", "8"),
            ("balloon.major_fault", "77"),
            ("balloon.last-update", "1000"),
        ]);
        let r = reading_of(&s, 1004).unwrap();
        assert_eq!(r.target_bytes, None);
        assert_eq!(r.actual_bytes, 256 << 20);
        let g = r.stats.unwrap();
        assert_eq!(g.available_bytes, 500000 * 1024);
        assert_eq!(g.total_bytes, 760000 * 1024);
        assert_eq!(g.swap_in, 8192);
        assert_eq!(g.major_faults, 77);
        assert_eq!(g.age_seconds, Some(4.0));
    }

    #[test]
    fn without_statistics_or_without_a_balloon() {
        let r = reading_of(
            &stats(&[
                ("balloon.current", "1048576"),
                ("balloon.maximum", "1048576"),
            ]),
            9,
        )
        .unwrap();
        assert_eq!((r.actual_bytes, r.stats), (0, None));
        // last-update 0: QEMU never got figures from the guest.
        let r = reading_of(
            &stats(&[
                ("balloon.current", "1"),
                ("balloon.maximum", "2"),
                ("balloon.usable", "1"),
                ("balloon.last-update", "0"),
            ]),
            9,
        )
        .unwrap();
        assert_eq!(r.stats, None);
        assert!(reading_of(&stats(&[("balloon.current", "x")]), 9).is_err());
        // A current above the maximum (a hot-plugged DIMM) is no negative balloon.
        let r = reading_of(
            &stats(&[("balloon.current", "3"), ("balloon.maximum", "2")]),
            9,
        )
        .unwrap();
        assert_eq!(r.actual_bytes, 0);
    }
}
