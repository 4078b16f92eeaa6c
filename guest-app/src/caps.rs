//! Privileges the app needs, checked up front so a missing one is named.

/// CAP_IPC_LOCK (mlock and pinning beyond RLIMIT_MEMLOCK) and CAP_SYS_ADMIN (PFNs in
/// /proc/self/pagemap).
const NEEDED: [(u32, &str); 2] = [(14, "CAP_IPC_LOCK"), (21, "CAP_SYS_ADMIN")];

/// The effective capability set from /proc/self/status.
pub fn effective(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// The names of the needed capabilities missing from `caps`.
pub fn missing(caps: u64) -> Vec<&'static str> {
    NEEDED
        .iter()
        .filter(|(bit, _)| caps & (1 << bit) == 0)
        .map(|(_, n)| *n)
        .collect()
}

/// vm.compact_unevictable_allowed: 1 lets compaction move mlocked pages. The app sets it to 0
/// while it runs and restores the old value on exit.
pub const COMPACT_UNEVICTABLE: &str = "/proc/sys/vm/compact_unevictable_allowed";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_is_missing() {
        assert_eq!(missing(u64::MAX), Vec::<&str>::new());
        assert_eq!(missing(1 << 14), vec!["CAP_SYS_ADMIN"]);
        assert_eq!(missing(0), vec!["CAP_IPC_LOCK", "CAP_SYS_ADMIN"]);
        assert_eq!(
            effective("Name: x\nCapEff:\t000001ffffffffff\n"),
            Some(0x1ff_ffff_ffff)
        );
    }
}
