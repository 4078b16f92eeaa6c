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

/// Page frame numbers beyond this name no byte a 64-bit guest address can reach.
pub const MAX_PFN: u64 = u64::MAX / PAGE_SIZE;

impl PfnRange {
    /// A range from untrusted input: `None` unless it is non-empty and every one of its pages
    /// has a 64-bit guest address (so `end`, `gpa` and `bytes` cannot overflow).
    pub fn checked(start: u64, count: u64) -> Option<PfnRange> {
        let end = start.checked_add(count)?;
        (count > 0 && end <= MAX_PFN).then_some(PfnRange { start, count })
    }

    /// Saturates, so a range built without `checked` never wraps to a low page.
    pub fn end(self) -> u64 {
        self.start.saturating_add(self.count)
    }

    pub fn gpa(self) -> u64 {
        self.start.saturating_mul(PAGE_SIZE)
    }

    pub fn bytes(self) -> u64 {
        self.count.saturating_mul(PAGE_SIZE)
    }
}

/// Sorts ranges and joins those that overlap or touch, so each page is counted once.
pub fn merge_ranges(mut ranges: Vec<PfnRange>) -> Vec<PfnRange> {
    ranges.sort_unstable();
    let mut out: Vec<PfnRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end() => {
                last.count = last.end().max(r.end()) - last.start;
            }
            _ => out.push(r),
        }
    }
    out
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
    fn untrusted_ranges_cannot_wrap() {
        assert_eq!(PfnRange::checked(0, u64::MAX), None);
        assert_eq!(PfnRange::checked(u64::MAX, 1), None);
        assert_eq!(PfnRange::checked(MAX_PFN, 1), None);
        assert_eq!(PfnRange::checked(5, 0), None);
        assert_eq!(PfnRange::checked(MAX_PFN - 1, 1), Some(r(MAX_PFN - 1, 1)));
        let huge = r(u64::MAX - 1, 10);
        assert_eq!(huge.end(), u64::MAX);
        assert_eq!(huge.gpa(), u64::MAX);
        assert_eq!(huge.bytes(), 10 * 4096);
    }

    #[test]
    fn overlapping_ranges_merge_once() {
        assert_eq!(
            merge_ranges(vec![r(10, 5), r(0, 3), r(12, 10), r(3, 1), r(40, 1)]),
            vec![r(0, 4), r(10, 12), r(40, 1)]
        );
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
