//! The host's memory figures.

use crate::model::HostState;

/// Reads MemTotal and MemAvailable (bytes) from /proc/meminfo-formatted text.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
            Some(kib * 1024)
        })
    };
    Some((field("MemTotal")?, field("MemAvailable")?))
}

/// The host now, with the guests' budget: fixed, or the guests' current allocations plus what
/// the host still has available, minus a reserve.
pub fn read_host(
    fixed_budget: Option<u64>,
    reserve: u64,
    guests_allocated: u64,
) -> std::io::Result<HostState> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let (total, available) = parse_meminfo(&text)
        .ok_or_else(|| std::io::Error::other("/proc/meminfo lacks MemTotal or MemAvailable"))?;
    Ok(HostState {
        total_bytes: total,
        available_bytes: available,
        budget_bytes: fixed_budget
            .unwrap_or_else(|| (guests_allocated + available).saturating_sub(reserve)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields() {
        let t = "MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(
            parse_meminfo(t),
            Some((24_000_000 * 1024, 12_000_000 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
        assert!(read_host(None, 0, 0).unwrap().total_bytes > 0);
    }
}
