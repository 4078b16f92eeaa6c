//! Page ranges: the guest sends page frame numbers one by one (256 per inflate message from
//! Linux), the host discards ranges. Sorting and merging here turns a message of contiguous
//! PFNs into one discard.

use balloon_protocol::PAGE_SIZE;

/// `count` 4 KiB pages from `start` (a page frame number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PfnRange {
    pub start: u64,
    pub count: u64,
}

impl PfnRange {
    pub fn end(self) -> u64 {
        self.start + self.count
    }

    pub fn gpa(self) -> u64 {
        self.start * PAGE_SIZE
    }

    pub fn bytes(self) -> u64 {
        self.count * PAGE_SIZE
    }
}

/// Sorts `pfns`, drops repeats, and merges runs of consecutive frames into ranges.
pub fn merge_pfns(pfns: &mut [u32]) -> Vec<PfnRange> {
    pfns.sort_unstable();
    let mut ranges: Vec<PfnRange> = Vec::new();
    for &pfn in pfns.iter() {
        let pfn = u64::from(pfn);
        match ranges.last_mut() {
            Some(last) if pfn < last.end() => {} // a repeat
            Some(last) if pfn == last.end() => last.count += 1,
            _ => ranges.push(PfnRange {
                start: pfn,
                count: 1,
            }),
        }
    }
    ranges
}

/// Byte ranges (guest physical address, length), e.g. from free page reports, as whole 4 KiB
/// pages: partial pages at either end are dropped, since only whole pages can be discarded.
pub fn pages_within(gpa: u64, len: u64) -> Option<PfnRange> {
    let start = gpa.checked_add(PAGE_SIZE - 1)? / PAGE_SIZE;
    let end = gpa.checked_add(len)? / PAGE_SIZE;
    (end > start).then(|| PfnRange {
        start,
        count: end - start,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, count: u64) -> PfnRange {
        PfnRange { start, count }
    }

    #[test]
    fn merges_sorted_runs_and_repeats() {
        let mut pfns = vec![10, 3, 4, 5, 11, 4, 20, 12, u32::MAX, 0];
        assert_eq!(
            merge_pfns(&mut pfns),
            vec![r(0, 1), r(3, 3), r(10, 3), r(20, 1), r(u32::MAX as u64, 1)]
        );
        assert!(merge_pfns(&mut []).is_empty());
        let mut run: Vec<u32> = (1000..1256).rev().collect();
        assert_eq!(merge_pfns(&mut run), vec![r(1000, 256)]);
    }

    #[test]
    fn byte_ranges_to_whole_pages() {
        assert_eq!(pages_within(0, 4096), Some(r(0, 1)));
        assert_eq!(pages_within(1, 8192), Some(r(1, 1)));
        assert_eq!(pages_within(4096, 4095), None);
        assert_eq!(pages_within(4 << 20, 4 << 20), Some(r(1024, 1024)));
        assert_eq!(pages_within(u64::MAX - 10, 100), None);
    }
}
