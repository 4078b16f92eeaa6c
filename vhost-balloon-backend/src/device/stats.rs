//! The statistics buffer: packed entries of a little-endian u16 tag and u64 value
//! (struct virtio_balloon_stat, 10 bytes each).

use std::collections::BTreeMap;

pub const ENTRY_SIZE: usize = 10;

/// Tag numbers and names (virtio spec 5.5.6.3; Linux uapi virtio_balloon.h).
pub const TAG_NAMES: &[(u16, &str)] = &[
    (0, "swap_in"),
    (1, "swap_out"),
    (2, "major_faults"),
    (3, "minor_faults"),
    (4, "free_memory"),
    (5, "total_memory"),
    (6, "available_memory"),
    (7, "disk_caches"),
    (8, "hugetlb_allocations"),
    (9, "hugetlb_failures"),
    (10, "oom_kills"),
    (11, "alloc_stalls"),
    (12, "async_scans"),
    (13, "direct_scans"),
    (14, "async_reclaims"),
    (15, "direct_reclaims"),
];

pub fn tag_name(tag: u16) -> Option<&'static str> {
    TAG_NAMES.iter().find(|(t, _)| *t == tag).map(|(_, n)| *n)
}

/// One parsed statistics buffer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestStats {
    pub values: BTreeMap<&'static str, u64>,
    pub unknown: BTreeMap<u16, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatsError {
    #[error("statistics buffer of {0} bytes is not a whole number of 10-byte entries")]
    PartialEntry(usize),
}

/// Parses a statistics buffer. Entries before a trailing partial entry are still returned with
/// the error, since a partial buffer says nothing about the whole entries before it.
pub fn parse_stats(bytes: &[u8]) -> (GuestStats, Option<StatsError>) {
    let mut stats = GuestStats::default();
    let chunks = bytes.chunks_exact(ENTRY_SIZE);
    let err = (!chunks.remainder().is_empty()).then_some(StatsError::PartialEntry(bytes.len()));
    for c in chunks {
        let tag = u16::from_le_bytes([c[0], c[1]]);
        let mut v = [0u8; 8];
        v.copy_from_slice(&c[2..10]);
        let value = u64::from_le_bytes(v);
        match tag_name(tag) {
            Some(name) => {
                stats.values.insert(name, value);
            }
            None => {
                stats.unknown.insert(tag, value);
            }
        }
    }
    (stats, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tag: u16, value: u64) -> Vec<u8> {
        let mut e = tag.to_le_bytes().to_vec();
        e.extend_from_slice(&value.to_le_bytes());
        e
    }

    #[test]
    fn known_unknown_and_partial() {
        let mut buf = entry(4, 123 << 20);
        buf.extend(entry(6, 456 << 20));
        buf.extend(entry(999, 7));
        let (s, err) = parse_stats(&buf);
        assert_eq!(err, None);
        assert_eq!(s.values["free_memory"], 123 << 20);
        assert_eq!(s.values["available_memory"], 456 << 20);
        assert_eq!(s.unknown[&999], 7);
        buf.extend([1, 2, 3]);
        let (s2, err) = parse_stats(&buf);
        assert_eq!(err, Some(StatsError::PartialEntry(33)));
        assert_eq!(s2, s);
        assert_eq!(parse_stats(&[]), (GuestStats::default(), None));
    }
}
