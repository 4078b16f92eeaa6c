//! The guest memory map as the backend sees it, the pages the balloon holds, and discards.
//!
//! Every page the guest names is checked against the memory table first: pages outside guest
//! RAM are counted and skipped, never discarded. Pages are tracked in a bitmap per region, so
//! accounting is exact and a repeated page is harmless.

pub mod bitmap;
pub mod discard;
pub mod file;
pub mod pending;
pub mod persist;
pub mod ranges;
pub mod worker;

use balloon_protocol::PAGE_SIZE;
use bitmap::PageBitmap;
pub use discard::Backing;
pub use ranges::{merge_pfns, merge_ranges, pages_within, PfnRange};

/// One region of guest RAM from the vhost-user memory table.
#[derive(Debug)]
pub struct GuestRegion {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    pub len: u64,
    pub backing: Backing,
    /// Discards happen in whole host pages (larger than 4 KiB on hugetlbfs).
    pub host_page_size: u64,
    /// Balloon pages held, indexed from the region's first whole page.
    ballooned: PageBitmap,
}

impl GuestRegion {
    pub fn new(gpa: u64, len: u64, backing: Backing, host_page_size: u64) -> Self {
        let host_page_size = host_page_size.max(PAGE_SIZE);
        GuestRegion {
            gpa,
            len,
            backing,
            host_page_size,
            ballooned: PageBitmap::new(len / PAGE_SIZE),
        }
    }

    /// The first page frame number of the region and the number of whole pages in it.
    fn pages(&self) -> PfnRange {
        pages_within(self.gpa, self.len).unwrap_or(PfnRange {
            start: self.gpa / PAGE_SIZE,
            count: 0,
        })
    }

    fn page_offset(&self, pfn: u64) -> u64 {
        pfn * PAGE_SIZE - self.gpa
    }

    /// Byte ranges (offset into the region, length) to discard for the pages `[start, end)`
    /// (region-relative page indices): the whole range with base pages; with huge host pages,
    /// only host pages entirely inside the range and, if `need_ballooned`, entirely ballooned.
    fn discard_spans(&self, start: u64, end: u64, need_ballooned: bool) -> Vec<(u64, u64)> {
        let per_host_page = self.host_page_size / PAGE_SIZE;
        if per_host_page <= 1 {
            return vec![(start * PAGE_SIZE, (end - start) * PAGE_SIZE)];
        }
        let mut spans: Vec<(u64, u64)> = Vec::new();
        let first = if need_ballooned {
            start / per_host_page
        } else {
            start.div_ceil(per_host_page)
        };
        let last = if need_ballooned {
            end.div_ceil(per_host_page)
        } else {
            end / per_host_page
        };
        for hp in first..last {
            let p = hp * per_host_page;
            if p + per_host_page > self.ballooned_capacity() {
                break;
            }
            if need_ballooned && !self.ballooned.all_set(p, per_host_page) {
                continue;
            }
            let (offset, len) = (p * PAGE_SIZE, self.host_page_size);
            match spans.last_mut() {
                Some(last) if last.0 + last.1 == offset => last.1 += len,
                _ => spans.push((offset, len)),
            }
        }
        spans
    }

    fn ballooned_capacity(&self) -> u64 {
        self.len / PAGE_SIZE
    }
}

/// What one batch of pages did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageOutcome {
    /// Pages whose ballooned state changed (newly held on inflate, released on deflate).
    pub changed_pages: u64,
    /// Pages outside guest RAM: skipped.
    pub outside_pages: u64,
    /// Bytes discarded.
    pub discarded_bytes: u64,
    /// Discard system calls made.
    pub discard_calls: u64,
    pub discard_errors: u64,
}

impl PageOutcome {
    pub fn add(&mut self, other: PageOutcome) {
        self.changed_pages += other.changed_pages;
        self.outside_pages += other.outside_pages;
        self.discarded_bytes += other.discarded_bytes;
        self.discard_calls += other.discard_calls;
        self.discard_errors += other.discard_errors;
    }
}

/// Guest RAM as mapped in this process, with the balloon's pages.
#[derive(Debug, Default)]
pub struct GuestMemoryMap {
    /// Sorted by `gpa`, not overlapping.
    regions: Vec<GuestRegion>,
    /// The tracking already lives in a file: a later table must not adopt the file's bits.
    persisting: bool,
}

/// What to do with the memory behind newly ballooned pages.
pub enum DiscardMode<'a> {
    /// Track only (discarding switched off).
    Off,
    /// Discard before returning.
    Now,
    /// Hand the discards to the caller (for the discard worker).
    Defer(&'a mut Vec<DiscardJob>),
}

/// One discard to make later: a span of a region in whole host pages.
#[derive(Debug, Clone)]
pub struct DiscardJob {
    pub backing: Backing,
    /// Offset into the region.
    pub offset: u64,
    pub len: u64,
    /// Guest physical address of the span's first byte.
    pub gpa: u64,
    pub host_page_size: u64,
}

impl DiscardJob {
    pub fn run(&self) -> std::io::Result<()> {
        self.backing.discard(self.offset, self.len)
    }
}

enum Op<'a> {
    Inflate(DiscardMode<'a>),
    Deflate,
    FreeReport,
}

/// Whether two regions are backed by the same file at the same offset (so the pages named by
/// one are the pages of the other), or neither has a file to tell.
fn same_backing(a: &GuestRegion, b: &GuestRegion) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (&a.backing.file, &b.backing.file) {
        (Some((fa, oa)), Some((fb, ob))) => {
            oa == ob
                && match (fa.metadata(), fb.metadata()) {
                    (Ok(ma), Ok(mb)) => ma.dev() == mb.dev() && ma.ino() == mb.ino(),
                    _ => false,
                }
        }
        (None, None) => true,
        _ => false,
    }
}

impl GuestMemoryMap {
    /// Builds the map from the memory table. Ballooned pages of a region that was already known
    /// (same address and size) carry over, so a re-sent table does not lose the accounting.
    pub fn replace_regions(&mut self, mut regions: Vec<GuestRegion>) {
        regions.sort_by_key(|r| r.gpa);
        regions.dedup_by(|b, a| b.gpa < a.gpa + a.len);
        for r in regions.iter_mut() {
            if let Some(old) = self
                .regions
                .iter_mut()
                .find(|o| o.gpa == r.gpa && o.len == r.len && same_backing(o, r))
            {
                std::mem::swap(&mut r.ballooned, &mut old.ballooned);
            }
        }
        self.regions = regions;
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    pub fn ram_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    pub fn ballooned_pages(&self) -> u64 {
        self.regions.iter().map(|r| r.ballooned.count()).sum()
    }

    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// Pages of `ranges` (merged: no page twice) that lie outside guest RAM.
    pub fn pages_outside(&self, ranges: &[PfnRange]) -> u64 {
        ranges
            .iter()
            .map(|range| range.count - self.regions_in(*range).map(|(_, _, n)| n).sum::<u64>())
            .sum()
    }

    /// Pages of `ranges` (merged) this map tracks as ballooned.
    pub fn tracked_pages(&self, ranges: &[PfnRange]) -> u64 {
        ranges
            .iter()
            .flat_map(|range| self.regions_in(*range))
            .map(|(region, rs, n)| region.ballooned.count_range(rs, n))
            .sum()
    }

    /// The regions `range` touches, with the region-relative first page and page count.
    fn regions_in(&self, range: PfnRange) -> impl Iterator<Item = (&GuestRegion, u64, u64)> {
        self.regions.iter().filter_map(move |region| {
            let pages = region.pages();
            let start = range.start.max(pages.start);
            let end = range.end().min(pages.end());
            (start < end).then(|| (region, start - pages.start, end - start))
        })
    }

    /// The guest gave these pages to the balloon: track them and return their memory to the
    /// host as `mode` says.
    pub fn inflate(&mut self, ranges: &[PfnRange], mode: DiscardMode) -> PageOutcome {
        self.apply(ranges, Op::Inflate(mode))
    }

    /// The guest takes these pages back.
    pub fn deflate(&mut self, ranges: &[PfnRange]) -> PageOutcome {
        self.apply(ranges, Op::Deflate)
    }

    /// The guest reported these pages free (free page reporting): discard them without
    /// tracking; the guest may use them again at any time.
    pub fn discard_free(&mut self, ranges: &[PfnRange]) -> PageOutcome {
        self.apply(ranges, Op::FreeReport)
    }

    /// Forgets every ballooned page (their owner went away and the guest has them back).
    /// Returns the pages that were tracked.
    pub fn clear_tracking(&mut self) -> Vec<PfnRange> {
        let ranges = self.tracked_ranges();
        for r in self.regions.iter_mut() {
            r.ballooned.clear_all();
        }
        ranges
    }

    /// The ballooned pages, as runs.
    fn tracked_ranges(&self) -> Vec<PfnRange> {
        self.regions
            .iter()
            .flat_map(|r| {
                let base = r.pages().start;
                r.ballooned.runs().into_iter().map(move |(s, c)| PfnRange {
                    start: base + s,
                    count: c,
                })
            })
            .collect()
    }

    /// Keeps the tracking in the file at `path` from now on (see persist.rs). Only the first
    /// table of this process, and only while it tracks nothing, may take over a file that
    /// describes the same guest RAM: returns the pages taken over. Regions without a backing
    /// file cannot be named, so nothing is persisted then.
    pub fn persist_to(&mut self, path: &std::path::Path) -> std::io::Result<Option<u64>> {
        let may_adopt = !self.persisting && self.ballooned_pages() == 0;
        // Once tried, never again: a later table must not take stale bits over live ones.
        self.persisting = true;
        let mut ids = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            let Some((file, offset)) = &r.backing.file else {
                return Ok(None);
            };
            ids.push(persist::RegionIdentity::of(r.gpa, r.len, file, *offset)?);
        }
        let current: Vec<&[u64]> = self.regions.iter().map(|r| r.ballooned.words()).collect();
        let (mapped, adopted) = persist::open(path, &ids, &current, may_adopt)?;
        for (r, m) in self.regions.iter_mut().zip(mapped) {
            r.ballooned.move_to(m);
        }
        Ok(adopted.then(|| self.ballooned_pages()))
    }

    /// Discards every ballooned page again (after discarding was switched back on, or to
    /// complete discards a restart or a stop interrupted), now or handed over as jobs.
    pub fn discard_all_ballooned(&mut self, mode: DiscardMode) -> PageOutcome {
        let ranges = self.tracked_ranges();
        let mut out = self.apply(&ranges, Op::Inflate(mode));
        out.changed_pages = 0;
        out
    }

    fn apply(&mut self, ranges: &[PfnRange], mut op: Op) -> PageOutcome {
        let mut out = PageOutcome::default();
        for range in ranges {
            let mut inside = 0;
            for region in self.regions.iter_mut() {
                let pages = region.pages();
                let start = range.start.max(pages.start);
                let end = range.end().min(pages.end());
                if start >= end {
                    continue;
                }
                inside += end - start;
                let (rs, re) = (start - pages.start, end - pages.start);
                let discard_spans = match &mut op {
                    Op::Inflate(mode) => {
                        out.changed_pages += region.ballooned.set_range(rs, re - rs);
                        match mode {
                            DiscardMode::Off => Vec::new(),
                            DiscardMode::Now => region.discard_spans(rs, re, true),
                            DiscardMode::Defer(jobs) => {
                                let first_offset = region.page_offset(pages.start);
                                for (offset, len) in region.discard_spans(rs, re, true) {
                                    jobs.push(DiscardJob {
                                        backing: region.backing.clone(),
                                        offset: first_offset + offset,
                                        len,
                                        gpa: region.gpa + first_offset + offset,
                                        host_page_size: region.host_page_size,
                                    });
                                }
                                Vec::new()
                            }
                        }
                    }
                    Op::Deflate => {
                        out.changed_pages += region.ballooned.clear_range(rs, re - rs);
                        Vec::new()
                    }
                    Op::FreeReport => region.discard_spans(rs, re, false),
                };
                let first_offset = region.page_offset(pages.start);
                for (offset, len) in discard_spans {
                    out.discard_calls += 1;
                    match region.backing.discard(first_offset + offset, len) {
                        Ok(()) => out.discarded_bytes += len,
                        Err(e) => {
                            out.discard_errors += 1;
                            log::warn!(
                                "discard of {len} bytes at gpa {:#x} failed: {e}",
                                region.gpa + first_offset + offset
                            );
                        }
                    }
                }
            }
            out.outside_pages += range.count - inside;
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests;
