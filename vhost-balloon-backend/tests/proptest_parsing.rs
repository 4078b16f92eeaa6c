//! Property tests over what a hostile guest controls: descriptor contents (PFN arrays,
//! statistics, config writes, report ranges) and the merging of pages into discards.

use proptest::prelude::*;
use std::collections::BTreeSet;
use vhost_balloon_backend::device::config::BalloonConfig;
use vhost_balloon_backend::device::pfn::parse_pfns;
use vhost_balloon_backend::device::stats::{parse_stats, ENTRY_SIZE};
use vhost_balloon_backend::memory::{merge_pfns, pages_within, DiscardMode, GuestMemoryMap};

proptest! {
    #[test]
    fn merged_ranges_cover_exactly_the_input(mut pfns in proptest::collection::vec(any::<u32>(), 0..600)) {
        let want: BTreeSet<u64> = pfns.iter().map(|p| u64::from(*p)).collect();
        let ranges = merge_pfns(&mut pfns);
        let mut got = BTreeSet::new();
        for w in ranges.windows(2) {
            // Sorted, disjoint and not touching (else they would have been merged).
            prop_assert!(w[0].end() < w[1].start);
        }
        for r in &ranges {
            prop_assert!(r.count > 0);
            got.extend(r.start..r.end());
        }
        prop_assert_eq!(got, want);
    }

    #[test]
    fn clustered_pfns_merge_into_few_ranges(start in 0u32..1_000_000, len in 1u32..2048) {
        let mut pfns: Vec<u32> = (start..start + len).rev().collect();
        prop_assert_eq!(merge_pfns(&mut pfns).len(), 1);
    }

    #[test]
    fn pfn_parsing_never_panics_and_counts_right(bytes in proptest::collection::vec(any::<u8>(), 0..4100)) {
        let mut out = Vec::new();
        let rest = parse_pfns(&bytes, &mut out);
        prop_assert_eq!(rest, bytes.len() % 4);
        prop_assert_eq!(out.len(), bytes.len() / 4);
    }

    #[test]
    fn stats_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let (stats, err) = parse_stats(&bytes);
        prop_assert_eq!(err.is_some(), bytes.len() % ENTRY_SIZE != 0);
        prop_assert!(stats.values.len() + stats.unknown.len() <= bytes.len() / ENTRY_SIZE);
    }

    #[test]
    fn config_writes_never_touch_the_target(
        num_pages in any::<u32>(),
        offset in any::<u32>(),
        data in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut c = BalloonConfig { num_pages, actual: 0 };
        c.write(offset, &data);
        prop_assert_eq!(c.num_pages, num_pages);
        let read = c.read(offset, data.len() as u32);
        prop_assert_eq!(read.len(), data.len());
    }

    #[test]
    fn report_ranges_stay_inside_their_bytes(gpa in any::<u64>(), len in any::<u32>()) {
        if let Some(r) = pages_within(gpa, u64::from(len)) {
            prop_assert!(r.gpa() >= gpa);
            prop_assert!(r.gpa() + r.bytes() <= gpa + u64::from(len));
        }
    }

    #[test]
    fn tracking_counts_distinct_pages_inside_ram(mut pfns in proptest::collection::vec(0u32..600, 0..300)) {
        // 512 pages of guest RAM with no backing (DiscardMode::Off: tracking only).
        let mut map = GuestMemoryMap::default();
        map.replace_regions(vec![vhost_balloon_backend::memory::GuestRegion::new(
            0,
            512 * 4096,
            vhost_balloon_backend::memory::Backing { host_addr: 0, file: None },
            4096,
        )]);
        let inside: BTreeSet<u32> = pfns.iter().copied().filter(|p| *p < 512).collect();
        let outside = pfns.iter().filter(|p| **p >= 512).collect::<BTreeSet<_>>().len();
        let ranges = merge_pfns(&mut pfns);
        let out = map.inflate(&ranges, DiscardMode::Off);
        prop_assert_eq!(map.ballooned_pages(), inside.len() as u64);
        prop_assert_eq!(out.outside_pages, outside as u64);
        prop_assert_eq!(out.discarded_bytes, 0);
    }
}
