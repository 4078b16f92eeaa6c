//! The guest's memory figures from /proc/meminfo and /proc/vmstat: the app's reserve check,
//! and what it reports for a host scheduler that has no balloon driver statistics.

use balloon_protocol::app::GuestMemInfo;

/// A `/proc/meminfo` field ("MemAvailable", "MemTotal"), in bytes.
fn meminfo_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.split(':').next() == Some(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// A `/proc/vmstat` counter ("pswpin", "pgmajfault").
fn vmstat_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// The figures from the two files' text.
pub fn parse(meminfo: &str, vmstat: &str) -> Option<GuestMemInfo> {
    Some(GuestMemInfo {
        available_bytes: meminfo_field(meminfo, "MemAvailable")?,
        total_bytes: meminfo_field(meminfo, "MemTotal")?,
        // In bytes, as the balloon driver reports SWAP_IN (pages_to_bytes(PSWPIN)): a
        // scheduler that switches between the two sources sees one counter.
        swap_in: vmstat_field(vmstat, "pswpin")
            .unwrap_or(0)
            .saturating_mul(crate::pagemap::PAGE),
        major_faults: vmstat_field(vmstat, "pgmajfault").unwrap_or(0),
    })
}

/// The guest's figures now.
pub fn read() -> Option<GuestMemInfo> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let vmstat = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
    parse(&meminfo, &vmstat)
}

/// MemAvailable now, in bytes.
pub fn mem_available() -> Option<u64> {
    meminfo_field(
        &std::fs::read_to_string("/proc/meminfo").ok()?,
        "MemAvailable",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_four_figures() {
        let meminfo = "MemTotal:        1000000 kB\nMemFree:          500000 kB\nMemAvailable:     600000 kB\n";
        let vmstat = "nr_free_pages 125000\npswpin 42\npswpout 7\npgmajfault 1234\n";
        assert_eq!(
            parse(meminfo, vmstat),
            Some(GuestMemInfo {
                available_bytes: 600_000 * 1024,
                total_bytes: 1_000_000 * 1024,
                swap_in: 42 * 4096,
                major_faults: 1234,
            })
        );
        // Without swap the counter may be missing; without MemAvailable nothing is usable.
        assert_eq!(parse(meminfo, "").unwrap().swap_in, 0);
        assert_eq!(parse("MemTotal: 1 kB\n", vmstat), None);
    }
}
