//! A libvirt domain's balloon (QEMU's built-in virtio-balloon, which libvirt owns), through
//! `virsh` (see virsh.rs for why the command and not the library).
//!
//! ```toml
//! driver = { kind = "libvirt", uri = "qemu:///system", domain = "web-1" }
//! ```
//!
//! - Reading: `virsh dommemstat DOMAIN` (libvirt asks QEMU there and then: `actual`, what the
//!   guest has now in KiB, and the guest's statistics), and once `virsh domstats --balloon
//!   DOMAIN` for `balloon.maximum`, the domain's memory (its `balloon.current` trails
//!   dommemstat by seconds after a change). The balloon is the maximum minus `actual`. The
//!   statistics: `usable` (the guest's MemAvailable), `available` (its MemTotal), `swap_in`
//!   (KiB), `major_fault`, `last_update` (host UNIX seconds). The statistics period is set once
//!   (`virsh dommemstat --period N --live`): without it QEMU keeps the guest's first figures.
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

/// Parses `virsh dommemstat` output: one `name value` pair a line.
pub fn parse_dommemstat(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.trim().split_once(' '))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// The reading from a domain's `dommemstat` figures and its memory (`maximum_kib`), at host
/// time `now` (UNIX s).
fn reading_of(
    memstat: &BTreeMap<String, String>,
    maximum_kib: u64,
    now: u64,
) -> Result<DriverReading, DriverError> {
    let Some(actual) = kib(memstat, "actual") else {
        return Err(DriverError::Protocol(
            "dommemstat has no `actual` (no balloon device?)".into(),
        ));
    };
    let guest = match (kib(memstat, "usable"), kib(memstat, "last_update")) {
        (Some(usable), Some(updated)) if updated > 0 => Some(RawGuestStats {
            available_bytes: usable.saturating_mul(1024),
            total_bytes: kib(memstat, "available").unwrap_or(0).saturating_mul(1024),
            swap_in: kib(memstat, "swap_in").unwrap_or(0).saturating_mul(1024),
            major_faults: kib(memstat, "major_fault").unwrap_or(0),
            age_seconds: Some(now.saturating_sub(updated) as f64),
        }),
        _ => None,
    };
    Ok(DriverReading {
        target_bytes: None,
        actual_bytes: maximum_kib.saturating_sub(actual).saturating_mul(1024),
        stats: guest,
        split: None,
        size_disputed: false,
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

    /// The domain's memory, read once (it changes only with memory hot-plug).
    fn maximum_kib(&mut self) -> Result<u64, DriverError> {
        if let Some(m) = self.maximum_kib {
            return Ok(m);
        }
        let m = self.virsh.memory_kib(&self.domain)?.ok_or_else(|| {
            DriverError::Protocol("domstats has no balloon.maximum (no balloon device?)".into())
        })?;
        self.maximum_kib = Some(m);
        Ok(m)
    }
}

impl BalloonDriver for LibvirtDriver {
    fn read(&mut self) -> Result<DriverReading, DriverError> {
        let maximum = self.maximum_kib()?;
        if !self.stats_period_set && self.stats_interval > 0 {
            self.set_stats_period()?;
        }
        let out = self.virsh.run(&["dommemstat", "--", &self.domain])?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        reading_of(&parse_dommemstat(&out), maximum, now)
    }

    fn set_balloon(&mut self, balloon_bytes: u64) -> Result<(), DriverError> {
        let keep_kib = self.maximum_kib()?.saturating_sub(balloon_bytes / 1024);
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

    /// What `virsh dommemstat` printed for a 1 GiB lab domain after `setmem 786432`.
    const MEMSTAT: &str = "actual 786432\nswap_in 8\nswap_out 0\nmajor_fault 77\n\
                           minor_fault 1322\nunused 665196\navailable 729040\nusable 594232\n\
                           last_update 1000\ndisk_caches 20200\nrss 280024\n";

    #[test]
    fn the_balloon_is_the_maximum_minus_what_the_guest_has_and_statistics_are_bytes() {
        let r = reading_of(&parse_dommemstat(MEMSTAT), 1048576, 1004).unwrap();
        assert_eq!(r.target_bytes, None);
        assert_eq!(r.actual_bytes, 256 << 20);
        let g = r.stats.unwrap();
        assert_eq!(g.available_bytes, 594232 * 1024);
        assert_eq!(g.total_bytes, 729040 * 1024);
        assert_eq!(g.swap_in, 8192);
        assert_eq!(g.major_faults, 77);
        assert_eq!(g.age_seconds, Some(4.0));
    }

    #[test]
    fn without_statistics_or_without_a_balloon() {
        // Only `actual` and `rss`: the guest sent no statistics (yet).
        let r = reading_of(&parse_dommemstat("actual 1048576\nrss 1\n"), 1048576, 9).unwrap();
        assert_eq!((r.actual_bytes, r.stats), (0, None));
        // last_update 0: QEMU never got figures from the guest.
        let r = reading_of(
            &parse_dommemstat("actual 1\nusable 1\nlast_update 0\n"),
            2,
            9,
        )
        .unwrap();
        assert_eq!(r.stats, None);
        // No balloon device: only rss.
        assert!(reading_of(&parse_dommemstat("rss 276088\n"), 2, 9).is_err());
        assert!(reading_of(&parse_dommemstat("actual x\n"), 2, 9).is_err());
        // More than the maximum (a hot-plugged DIMM) is no negative balloon.
        let r = reading_of(&parse_dommemstat("actual 3\n"), 2, 9).unwrap();
        assert_eq!(r.actual_bytes, 0);
    }
}
