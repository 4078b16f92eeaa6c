//! Discards waiting for the worker: per region, one bit per host page, in chunks allocated as
//! pages arrive and freed as they leave. Whatever order a guest hands its pages over in, the
//! ones that neighbour each other by the time the worker comes leave in one discard; and the set
//! never holds more than a bit per host page of guest RAM (32 KiB per GiB of 4 KiB pages), so a
//! guest that floods scattered pages faster than they can be discarded cannot grow it further.
//! (A list of jobs grew by 64 bytes a page in such a flood, and a bound on it meant discarding
//! the rest on the vring thread, under the device lock.)

use super::bitmap::PageBitmap;
use super::DiscardJob;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Host pages per chunk: 4 KiB of bits, 128 MiB of guest RAM in 4 KiB pages.
const CHUNK_PAGES: u64 = 32 * 1024;

/// Whether two jobs are in the same region: the same region start (guest address minus offset
/// into the region), the same mapping and the same file at the same offset. Regions that
/// touch in guest addresses may lie anywhere in their file (or in different files), and
/// regions of a guest memory file are not mapped at all (address 0), so no one of these
/// alone names a region.
fn same_region(a: &DiscardJob, b: &DiscardJob) -> bool {
    let file_of = |j: &DiscardJob| j.backing.file.as_ref().map(|(f, o)| (Arc::as_ptr(f), *o));
    a.gpa.wrapping_sub(a.offset) == b.gpa.wrapping_sub(b.offset)
        && a.backing.host_addr == b.backing.host_addr
        && file_of(a) == file_of(b)
        && a.host_page_size == b.host_page_size
}

struct PendingRegion {
    /// A job of no length at the region's start: the region's backing, guest address and host
    /// page size.
    start: DiscardJob,
    /// Chunk number -> its bits (host page `n` is bit `n % CHUNK_PAGES` of chunk
    /// `n / CHUNK_PAGES`); only chunks with a bit set exist.
    chunks: BTreeMap<u64, PageBitmap>,
}

impl PendingRegion {
    fn host_page(&self) -> u64 {
        self.start.host_page_size.max(1)
    }

    /// Sets host pages `[first, end)`; returns how many were not set.
    fn set(&mut self, first: u64, end: u64) -> u64 {
        let mut changed = 0;
        let mut page = first;
        while page < end {
            let (chunk, bit) = (page / CHUNK_PAGES, page % CHUNK_PAGES);
            let count = (CHUNK_PAGES - bit).min(end - page);
            let bits = self
                .chunks
                .entry(chunk)
                .or_insert_with(|| PageBitmap::new(CHUNK_PAGES));
            changed += bits.set_range(bit, count);
            page += count;
        }
        changed
    }

    /// Clears host pages `[first, end)`, visiting only the chunks that exist (a guest's deflate
    /// may name any range); returns how many were set.
    fn clear(&mut self, first: u64, end: u64) -> u64 {
        if first >= end {
            return 0;
        }
        let mut changed = 0;
        let mut emptied = Vec::new();
        for (&chunk, bits) in self
            .chunks
            .range_mut(first / CHUNK_PAGES..=(end - 1) / CHUNK_PAGES)
        {
            let base = chunk * CHUNK_PAGES;
            let (lo, hi) = (first.max(base) - base, end.min(base + CHUNK_PAGES) - base);
            changed += bits.clear_range(lo, hi - lo);
            if bits.count() == 0 {
                emptied.push(chunk);
            }
        }
        for chunk in emptied {
            self.chunks.remove(&chunk);
        }
        changed
    }

    /// The first pending host page at or after `from`.
    fn next_set(&self, from: u64) -> Option<u64> {
        let first_chunk = from / CHUNK_PAGES;
        self.chunks.range(first_chunk..).find_map(|(&chunk, bits)| {
            let from_bit = if chunk == first_chunk {
                from % CHUNK_PAGES
            } else {
                0
            };
            bits.next_set(from_bit).map(|bit| chunk * CHUNK_PAGES + bit)
        })
    }

    /// The end of the run of pending host pages from `start` (pending), at most `max` long.
    fn run_end(&self, start: u64, max: u64) -> u64 {
        let limit = start.saturating_add(max);
        let mut page = start;
        while page < limit {
            let Some(bits) = self.chunks.get(&(page / CHUNK_PAGES)) else {
                break;
            };
            let end = (page / CHUNK_PAGES) * CHUNK_PAGES + bits.next_clear(page % CHUNK_PAGES);
            // The run goes on into the next chunk only if it filled this one to its end.
            let filled = end > page && end.is_multiple_of(CHUNK_PAGES);
            page = end;
            if !filled {
                break;
            }
        }
        page.min(limit)
    }

    /// A job for host pages `[first, end)`.
    fn job(&self, first: u64, end: u64) -> DiscardJob {
        let hp = self.host_page();
        DiscardJob {
            offset: first * hp,
            gpa: self.start.gpa + first * hp,
            len: (end - first) * hp,
            ..self.start.clone()
        }
    }
}

/// The pending discards of every region.
#[derive(Default)]
pub struct PendingSet {
    regions: Vec<PendingRegion>,
    bytes: u64,
    /// Where the worker's sweep goes on: a region's index and a host page in it.
    cursor: (usize, u64),
}

impl PendingSet {
    /// Bytes pending.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Adds the whole host pages of `job`; returns the bytes that were not pending yet.
    pub fn add(&mut self, job: &DiscardJob) -> u64 {
        let index = match self
            .regions
            .iter()
            .rposition(|r| same_region(&r.start, job))
        {
            Some(index) => index,
            None => {
                self.regions.push(PendingRegion {
                    start: DiscardJob {
                        offset: 0,
                        gpa: job.gpa.wrapping_sub(job.offset),
                        len: 0,
                        ..job.clone()
                    },
                    chunks: BTreeMap::new(),
                });
                self.regions.len() - 1
            }
        };
        let region = &mut self.regions[index];
        let hp = region.host_page();
        // Jobs are whole host pages; should one not be, only its whole pages are discarded.
        let (first, end) = (job.offset.div_ceil(hp), (job.offset + job.len) / hp);
        if first >= end {
            self.drop_if_empty(index);
            return 0;
        }
        let added = region.set(first, end) * hp;
        self.bytes += added;
        added
    }

    /// Drops what is pending in the guest physical range `[start, end)`: every host page it
    /// touches, even in part (a host page the guest took a 4 KiB page of back stays).
    pub fn remove(&mut self, start: u64, end: u64) {
        for index in (0..self.regions.len()).rev() {
            let region = &mut self.regions[index];
            let (base, hp) = (region.start.gpa, region.host_page());
            if end <= base {
                continue;
            }
            let first = start.saturating_sub(base) / hp;
            let last = (end - base).div_ceil(hp);
            let removed = region.clear(first, last) * hp;
            self.bytes -= removed;
            self.drop_if_empty(index);
        }
    }

    /// Drops everything pending.
    pub fn clear(&mut self) {
        *self = PendingSet::default();
    }

    /// Takes the next run of pending host pages, at most `max_bytes` long (at least one host
    /// page), sweeping on through the regions from where the last one ended.
    pub fn take(&mut self, max_bytes: u64) -> Option<DiscardJob> {
        if self.regions.is_empty() {
            return None;
        }
        let (mut index, mut from) = self.cursor;
        if index >= self.regions.len() {
            (index, from) = (0, 0);
        }
        // Every region from the cursor on, then the cursor's region again from its start.
        for step in 0..=self.regions.len() {
            let region = &self.regions[index];
            if let Some(first) = region.next_set(from) {
                let hp = region.host_page();
                let end = region.run_end(first, (max_bytes / hp).max(1));
                let job = region.job(first, end);
                let removed = self.regions[index].clear(first, end) * hp;
                self.bytes -= removed;
                self.cursor = (index, end);
                self.drop_if_empty(index);
                return Some(job);
            }
            if step == self.regions.len() {
                break;
            }
            (index, from) = ((index + 1) % self.regions.len(), 0);
        }
        None
    }

    /// Forgets a region with nothing pending (it holds its backing file open).
    fn drop_if_empty(&mut self, index: usize) {
        if !self.regions[index].chunks.is_empty() {
            return;
        }
        self.regions.remove(index);
        let (cursor, from) = self.cursor;
        self.cursor = match cursor.cmp(&index) {
            std::cmp::Ordering::Greater => (cursor - 1, from),
            std::cmp::Ordering::Equal => (index, 0),
            std::cmp::Ordering::Less => (cursor, from),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Backing;

    const MIB: u64 = 1 << 20;
    const PAGE: u64 = 4096;

    fn job(
        file: &Arc<std::fs::File>,
        region_gpa: u64,
        offset: u64,
        len: u64,
        hp: u64,
    ) -> DiscardJob {
        DiscardJob {
            backing: Backing {
                host_addr: 0,
                file: Some((file.clone(), region_gpa)),
            },
            offset,
            len,
            gpa: region_gpa + offset,
            host_page_size: hp,
        }
    }

    fn spans(set: &mut PendingSet, max: u64) -> Vec<(u64, u64)> {
        std::iter::from_fn(|| set.take(max))
            .map(|j| (j.gpa, j.len))
            .collect()
    }

    #[test]
    fn pages_arriving_in_any_order_leave_as_runs() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let mut set = PendingSet::default();
        // Every page of 1 MiB, in a scattered order, then one page apart from them.
        for i in 0..256u64 {
            let page = (i * 97) % 256;
            assert_eq!(set.add(&job(&file, 0, page * PAGE, PAGE, PAGE)), PAGE);
        }
        assert_eq!(set.add(&job(&file, 0, 300 * PAGE, PAGE, PAGE)), PAGE);
        // Twice is once.
        assert_eq!(set.add(&job(&file, 0, 0, PAGE, PAGE)), 0);
        assert_eq!(set.bytes(), 257 * PAGE);
        assert_eq!(spans(&mut set, 32 * MIB), [(0, MIB), (300 * PAGE, PAGE)]);
        assert!(set.is_empty());
        assert!(
            set.regions.is_empty(),
            "an empty region keeps its file open"
        );
    }

    #[test]
    fn runs_cross_chunks_and_are_cut_at_the_piece_size() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let mut set = PendingSet::default();
        // 200 MiB from 100 MiB: across the chunk boundary at 128 MiB.
        set.add(&job(&file, 0, 100 * MIB, 200 * MIB, PAGE));
        assert_eq!(
            spans(&mut set, 64 * MIB),
            [
                (100 * MIB, 64 * MIB),
                (164 * MIB, 64 * MIB),
                (228 * MIB, 64 * MIB),
                (292 * MIB, 8 * MIB)
            ]
        );
        // The bits of a whole guest's chunks are freed as they leave.
        assert!(set.regions.is_empty());
    }

    #[test]
    fn a_run_that_ends_where_a_chunk_ends_ends_there() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let mut set = PendingSet::default();
        // The last page of the first chunk, and a page of the second that is not its first.
        // (The worker spun here: the run's end, at the chunk boundary, led into a chunk whose
        // first bit is clear, and the run went on from the same page for ever.)
        set.add(&job(&file, 0, (CHUNK_PAGES - 1) * PAGE, PAGE, PAGE));
        set.add(&job(&file, 0, (CHUNK_PAGES + 5) * PAGE, PAGE, PAGE));
        let taken = within_30_s(move || spans(&mut set, 32 * MIB));
        assert_eq!(
            taken,
            [
                ((CHUNK_PAGES - 1) * PAGE, PAGE),
                ((CHUNK_PAGES + 5) * PAGE, PAGE)
            ]
        );
    }

    /// Runs `f` on a thread of its own, so that a spin fails the test instead of hanging it.
    fn within_30_s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(std::time::Duration::from_secs(30))
            .expect("done within 30 s")
    }

    #[test]
    fn a_withdrawal_of_any_range_visits_only_what_is_pending() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let mut set = PendingSet::default();
        set.add(&job(&file, 0, 5 * MIB, MIB, PAGE));
        // Every address there is: 2^37 chunks, were they all visited.
        let set = within_30_s(move || {
            set.remove(0, u64::MAX);
            set
        });
        assert!(set.is_empty());
    }

    #[test]
    fn regions_are_kept_apart_even_where_they_touch() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let mut set = PendingSet::default();
        // Two regions of one file that touch at gpa 1 GiB but lie apart in the file.
        let low = |offset, len| DiscardJob {
            backing: Backing {
                host_addr: 0,
                file: Some((file.clone(), 0)),
            },
            offset,
            len,
            gpa: offset,
            host_page_size: PAGE,
        };
        let high = |offset, len| DiscardJob {
            backing: Backing {
                host_addr: 0,
                file: Some((file.clone(), 2 << 30)),
            },
            offset,
            len,
            gpa: (1 << 30) + offset,
            host_page_size: PAGE,
        };
        set.add(&low((1 << 30) - MIB, MIB));
        set.add(&high(0, MIB));
        let jobs: Vec<DiscardJob> = std::iter::from_fn(|| set.take(32 * MIB)).collect();
        assert_eq!(jobs.len(), 2);
        for j in jobs {
            let file_offset = j.backing.file.as_ref().unwrap().1 + j.offset;
            let expected = if j.gpa < 1 << 30 {
                (1 << 30) - MIB
            } else {
                2 << 30
            };
            assert_eq!((file_offset, j.len), (expected, MIB), "{j:?}");
        }
    }

    #[test]
    fn a_removed_range_takes_every_host_page_it_touches() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let mut set = PendingSet::default();
        // 8 MiB of 2 MiB host pages in a region at gpa 1 GiB.
        set.add(&job(&file, 1 << 30, 0, 8 * MIB, 2 * MIB));
        // One 4 KiB page in the second huge page, and ranges outside the region.
        set.remove((1 << 30) + 3 * MIB, (1 << 30) + 3 * MIB + PAGE);
        set.remove(0, 1 << 30);
        set.remove((1 << 30) + 8 * MIB, 2 << 30);
        assert_eq!(set.bytes(), 6 * MIB);
        assert_eq!(
            spans(&mut set, 32 * MIB),
            [(1 << 30, 2 * MIB), ((1 << 30) + 4 * MIB, 4 * MIB)]
        );
        // A part of a host page is no page at all.
        assert_eq!(set.add(&job(&file, 1 << 30, 0, MIB, 2 * MIB)), 0);
        assert!(set.regions.is_empty());
    }

    #[test]
    fn the_sweep_goes_on_from_where_it_ended() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let mut set = PendingSet::default();
        set.add(&job(&file, 0, 0, 4 * MIB, PAGE));
        assert_eq!(set.take(MIB).map(|j| j.gpa), Some(0));
        // Pages behind the sweep wait for it to come round again.
        set.add(&job(&file, 0, 0, MIB, PAGE));
        assert_eq!(
            spans(&mut set, MIB),
            [(MIB, MIB), (2 * MIB, MIB), (3 * MIB, MIB), (0, MIB)]
        );
    }

    #[test]
    fn a_flood_of_scattered_pages_holds_a_bit_per_page() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        let mut set = PendingSet::default();
        // Every other page of 1 GiB: half a million jobs that cannot join, 32 KiB of bits.
        for page in (0..(1u64 << 30) / PAGE).step_by(2) {
            set.add(&job(&file, 0, page * PAGE, PAGE, PAGE));
        }
        let chunks = set.regions[0].chunks.len() as u64;
        assert_eq!(chunks * CHUNK_PAGES / 8, 32 * 1024);
        assert_eq!(set.bytes(), 512 * MIB);
    }
}

#[cfg(test)]
mod model_tests {
    use super::*;
    use crate::memory::Backing;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const PAGE: u64 = 4096;

    #[derive(Debug, Clone)]
    enum Op {
        Add(u64, u64),
        Remove(u64, u64),
        Take(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Pages anywhere in three chunks, and often right around their boundaries.
        let page = prop_oneof![
            0..3 * CHUNK_PAGES,
            (1..3u64, 0..8u64).prop_map(|(chunk, d)| chunk * CHUNK_PAGES - 4 + d),
        ];
        prop_oneof![
            (page.clone(), prop_oneof![1..8u64, 1..3000u64]).prop_map(|(p, n)| Op::Add(p, n)),
            (page, prop_oneof![1..8u64, 1..3000u64]).prop_map(|(p, n)| Op::Remove(p, n)),
            (1..20000u64).prop_map(Op::Take),
        ]
    }

    proptest! {
        #[test]
        fn the_set_behaves_as_a_set_of_pages(ops in proptest::collection::vec(op(), 1..200)) {
            let file = Arc::new(tempfile::tempfile().unwrap());
            let mut set = PendingSet::default();
            let mut model = BTreeSet::new();
            let job = |p: u64, n: u64| DiscardJob {
                backing: Backing { host_addr: 0, file: Some((file.clone(), 0)) },
                offset: p * PAGE,
                len: n * PAGE,
                gpa: p * PAGE,
                host_page_size: PAGE,
            };
            for op in ops {
                match op {
                    Op::Add(p, n) => {
                        let new = (p..p + n).filter(|x| model.insert(*x)).count() as u64;
                        prop_assert_eq!(set.add(&job(p, n)), new * PAGE);
                    }
                    Op::Remove(p, n) => {
                        set.remove(p * PAGE, (p + n) * PAGE);
                        for x in p..p + n { model.remove(&x); }
                    }
                    Op::Take(max) => {
                        match set.take(max * PAGE) {
                            None => prop_assert!(model.is_empty()),
                            Some(j) => {
                                prop_assert!(j.len > 0 && j.len <= max * PAGE);
                                for x in j.gpa / PAGE..(j.gpa + j.len) / PAGE {
                                    prop_assert!(model.remove(&x), "page {} taken but not pending", x);
                                }
                            }
                        }
                    }
                }
                prop_assert_eq!(set.bytes(), model.len() as u64 * PAGE);
            }
            // Everything pending comes out.
            while let Some(j) = set.take(u64::MAX) {
                for x in j.gpa / PAGE..(j.gpa + j.len) / PAGE {
                    prop_assert!(model.remove(&x));
                }
            }
            prop_assert!(model.is_empty(), "left behind: {:?}", model.iter().take(5).collect::<Vec<_>>());
        }
    }
}
