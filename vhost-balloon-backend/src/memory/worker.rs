//! Discarding off the queue's path. The inflate handler hands its discards to this worker and
//! returns the buffer at once, so the guest driver goes on allocating its next pages while the
//! host frees the previous ones (on another core), and pending discards of neighbouring buffers
//! merge into fewer, larger ones. The worker lets them gather for a moment first (`GATHER`):
//! every discard call, however small, ends in a TLB-shootdown round on each CPU that runs the
//! VMM's vCPUs, and buffer by buffer those rounds were 35% of the backend's CPU under a TCG
//! guest inflating 1 MiB at a time.
//!
//! Safety: a ballooned page is the guest's again only after it deflates it and the device
//! acknowledges that. `withdraw` runs in the deflate handler before that acknowledgement: it
//! drops pending discards of those pages and waits for any in-flight discard touching them. So
//! a discard never lands on a page the guest got back. This relies on the driver telling the
//! host before reusing a page (MUST_TELL_HOST); without it the backend discards synchronously.

use super::DiscardJob;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long pending discards may gather before the worker runs them: memory leaving the host
/// this much later costs nothing, one call instead of many saves their shootdown rounds.
/// Measured side by side on TCG guests inflating 75% (vm_scaling, 3 runs each): 100 ms made
/// 45% fewer calls than 20 ms on an 8 GiB guest (10.9 MiB each, against 5.5-6.8) and 25%
/// fewer on a 1 GiB guest.
const GATHER: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Queue {
    pending: Vec<DiscardJob>,
    /// Bytes in `pending` (before merging): enough of them end the gathering at once.
    pending_bytes: u64,
    /// Callers waiting in `flush`, which must not wait for the gathering too.
    flushers: usize,
    /// The batch being worked through, one piece at a time (withdrawals cut it too).
    taken: std::collections::VecDeque<DiscardJob>,
    /// The guest physical range [start, end) the worker is discarding right now (one executor:
    /// the worker thread, or `process_pending` on a worker without one).
    running: Option<(u64, u64)>,
    /// Ranges `submit` is discarding on its caller's thread, past the queue's bound.
    in_flight: Vec<(u64, u64)>,
    shutdown: bool,
}

impl Queue {
    /// Every range being discarded right now.
    fn busy(&self) -> impl Iterator<Item = &(u64, u64)> {
        self.running.iter().chain(&self.in_flight)
    }
}

/// Totals of the worker's discards.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    pub discarded_bytes: AtomicU64,
    pub discard_calls: AtomicU64,
    pub discard_errors: AtomicU64,
}

/// The most jobs the worker queues (pending and taken together). A guest that hands over
/// scattered pages, one job each, faster than they can be discarded would otherwise grow the
/// queue without bound (64 bytes a page: 1.6% of its RAM, which the allocator keeps after the
/// queue drains); past this, `submit` discards the rest (but jobs of 2 MiB or more) at once, as
/// a backend without the worker does, and the guest's inflation waits for those discards. 16 Ki
/// jobs are 1 MiB: after discard_native's scattered gigabytes the backend's heap held 2.5 MiB,
/// against 22.5 unbounded.
/// (Those run under the device lock, as the caller holds it: a driver buffer's 256 scattered
/// pages take about a millisecond, an app message's 16 Ki ranges up to 80 ms; neither waits on
/// the guest or a peer, and the app channel admits only what the guest's root lets in. Switching
/// discards on over a balloon the guest left as scattered pages costs about 5 us a page past the
/// bound, once.)
const MAX_QUEUED_JOBS: usize = 16 * 1024;

/// Jobs this long are queued past `MAX_QUEUED_JOBS` too.
const ALWAYS_QUEUED_BYTES: u64 = 2 << 20;

pub struct DiscardWorker {
    queue: Mutex<Queue>,
    changed: Condvar,
    pub counters: WorkerCounters,
    /// How long discards gather (`GATHER`; zero for a worker without a thread).
    gather: Duration,
    /// `MAX_QUEUED_JOBS` (smaller in tests).
    max_queued: usize,
}

impl Default for DiscardWorker {
    fn default() -> Self {
        DiscardWorker {
            queue: Mutex::default(),
            changed: Condvar::new(),
            counters: WorkerCounters::default(),
            gather: Duration::ZERO,
            max_queued: MAX_QUEUED_JOBS,
        }
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl DiscardWorker {
    /// A worker without a thread (tests drive it with `process_pending`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the worker thread.
    pub fn start() -> std::io::Result<Arc<Self>> {
        Self::start_gathering(GATHER)
    }

    fn start_gathering(gather: Duration) -> std::io::Result<Arc<Self>> {
        let worker = Arc::new(DiscardWorker {
            gather,
            ..DiscardWorker::new()
        });
        let w = worker.clone();
        std::thread::Builder::new()
            .name("discard".into())
            .spawn(move || w.run())?;
        Ok(worker)
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `jobs` for the worker; past `MAX_QUEUED_JOBS`, discards the small ones here.
    pub fn submit(&self, jobs: Vec<DiscardJob>) {
        if jobs.is_empty() {
            return;
        }
        let mut q = self.lock();
        let (was_idle, was_short) = (q.pending.is_empty(), q.pending_bytes < MAX_JOB_BYTES);
        let mut now = Vec::new();
        for job in jobs {
            // A large job always gets a place: there are few of them (one per 2 MiB of guest at
            // most), and one made here would hold the caller's lock for its whole length.
            let room =
                job.len >= ALWAYS_QUEUED_BYTES || q.pending.len() + q.taken.len() < self.max_queued;
            let len = job.len;
            match append(&mut q.pending, job, room) {
                None => q.pending_bytes += len,
                Some(job) => now.push(job),
            }
        }
        // Only the worker waits for jobs, and only these end its wait: the first job, or a
        // piece's worth gathered. (A wake per 1 MiB buffer would switch to it for nothing.)
        let wake = was_idle || (was_short && q.pending_bytes >= MAX_JOB_BYTES);
        // Discards made here are in flight too: a deflate of their pages waits for them.
        let ranges: Vec<(u64, u64)> = now.iter().map(|j| (j.gpa, j.gpa + j.len)).collect();
        q.in_flight.extend_from_slice(&ranges);
        drop(q);
        if wake {
            self.changed.notify_all();
        }
        if now.is_empty() {
            return;
        }
        for job in &now {
            self.discard(job);
        }
        // Out of flight all at once (a search per job would be quadratic in a flood).
        let mut done: HashMap<(u64, u64), usize> = HashMap::new();
        for r in ranges {
            *done.entry(r).or_default() += 1;
        }
        self.lock().in_flight.retain(|r| match done.get_mut(r) {
            Some(n) if *n > 0 => {
                *n -= 1;
                false
            }
            _ => true,
        });
        self.changed.notify_all();
    }

    /// Runs `job` and counts it.
    fn discard(&self, job: &DiscardJob) {
        self.counters.discard_calls.fetch_add(1, Ordering::Relaxed);
        match job.run() {
            Ok(()) => {
                self.counters
                    .discarded_bytes
                    .fetch_add(job.len, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters.discard_errors.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "discard of {} bytes at gpa {:#x} failed: {e}",
                    job.len,
                    job.gpa
                );
            }
        }
    }

    /// The guest takes back the pages in `gpa_ranges` ([start, end) byte ranges): forget their
    /// pending discards and wait until none of them is being discarded. Pending discards that
    /// only partly overlap keep their other host pages.
    pub fn withdraw(&self, gpa_ranges: &[(u64, u64)]) {
        let mut q = self.lock();
        let mut kept = Vec::with_capacity(q.pending.len());
        for job in q.pending.drain(..) {
            split_around(job, gpa_ranges, &mut kept);
        }
        q.pending_bytes = kept.iter().map(|j| j.len).sum();
        q.pending = kept;
        let mut kept = Vec::with_capacity(q.taken.len());
        for job in q.taken.drain(..) {
            split_around(job, gpa_ranges, &mut kept);
        }
        q.taken = kept.into();
        while q
            .busy()
            .any(|f| gpa_ranges.iter().any(|r| overlaps(*f, *r)))
        {
            q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Forgets every pending discard and waits for those in flight (discards switched off, or
    /// the pages' owner unknown). Returns whether any pending one was dropped.
    pub fn cancel_all(&self) -> bool {
        let mut q = self.lock();
        let dropped = !q.pending.is_empty() || !q.taken.is_empty();
        q.pending.clear();
        q.pending_bytes = 0;
        q.taken.clear();
        while q.busy().next().is_some() {
            q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        dropped
    }

    /// Waits until every submitted discard is done.
    pub fn flush(&self) {
        let mut q = self.lock();
        q.flushers += 1;
        self.changed.notify_all();
        while !q.pending.is_empty() || !q.taken.is_empty() || q.busy().next().is_some() {
            q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        q.flushers -= 1;
    }

    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        self.changed.notify_all();
    }

    fn run(&self) {
        // At the backend's own priority, not below it: at nice 19 the worker hardly ran while
        // the guest's buffers kept arriving (their two threads' wakeups preempted it), so the
        // discards waited for the inflation to end. Measured with discard_native (1 GiB,
        // alternating invocations): 3-17% of the memory discarded by the end of the feed at nice
        // 19, 6-22% at nice 0; 0.79-0.81 of one fallocate's speed at nice 19, 0.82-0.86 at
        // nice 0. A 1 GiB TCG guest inflated no slower (vm_scaling, alternating: 2.70 and 2.20
        // s/GiB at nice 0, 2.11 and 2.57 at nice 19).
        loop {
            {
                let mut q = self.lock();
                while q.pending.is_empty() && !q.shutdown {
                    q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                q = self.gather(q);
                if q.shutdown {
                    return;
                }
                Self::take(&mut q);
            }
            self.execute();
        }
    }

    /// Lets pending discards gather for up to `self.gather`, or until they fill a piece of
    /// `MAX_JOB_BYTES`, someone flushes, or the worker shuts down.
    fn gather<'a>(&self, mut q: MutexGuard<'a, Queue>) -> MutexGuard<'a, Queue> {
        let deadline = Instant::now() + self.gather;
        while !q.shutdown && q.flushers == 0 && q.pending_bytes < MAX_JOB_BYTES {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            q = self
                .changed
                .wait_timeout(q, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        q
    }

    /// Runs whatever is pending now, on the caller's thread.
    pub fn process_pending(&self) {
        Self::take(&mut self.lock());
        self.execute();
    }

    /// Moves the pending jobs, merged, then cut into pieces of at most `MAX_JOB_BYTES`, to
    /// the batch being worked through.
    fn take(q: &mut Queue) {
        let jobs = split(merge(std::mem::take(&mut q.pending)));
        q.pending_bytes = 0;
        q.taken.extend(jobs);
    }

    /// Runs the jobs one at a time, each in flight only while it runs: a deflate (which waits
    /// for in-flight discards of its pages, under the device lock) waits for one bounded piece
    /// at most, and pieces not started yet that it withdraws are dropped.
    fn execute(&self) {
        loop {
            let job = {
                let mut q = self.lock();
                let Some(job) = q.taken.pop_front() else {
                    break;
                };
                q.running = Some((job.gpa, job.gpa + job.len));
                job
            };
            self.discard(&job);
            self.lock().running = None;
            self.changed.notify_all();
        }
    }
}

/// The largest single discard: what a deflate may have to wait for.
const MAX_JOB_BYTES: u64 = 32 << 20;

/// Cuts jobs into pieces of at most `MAX_JOB_BYTES`, at host page boundaries.
fn split(jobs: Vec<DiscardJob>) -> Vec<DiscardJob> {
    let mut out = Vec::with_capacity(jobs.len());
    for job in jobs {
        let hp = job.host_page_size.max(1);
        let piece = (MAX_JOB_BYTES / hp).max(1) * hp;
        let mut done = 0;
        while done < job.len {
            let len = piece.min(job.len - done);
            out.push(DiscardJob {
                offset: job.offset + done,
                gpa: job.gpa + done,
                len,
                ..job.clone()
            });
            done += len;
        }
    }
    out
}

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
}

/// Adds `job` to `pending`, joined to the last one when it continues it (either way) in the
/// same region: a driver hands its pages over in runs, buffer after buffer, so what gathers
/// for `GATHER` stays a few jobs instead of one per buffer's run. A job that needs a place of
/// its own gets one only if there is `room`; otherwise it is given back.
fn append(pending: &mut Vec<DiscardJob>, job: DiscardJob, room: bool) -> Option<DiscardJob> {
    if let Some(last) = pending.last_mut() {
        if same_region(last, &job) {
            if job.gpa == last.gpa + last.len {
                last.len += job.len;
                return None;
            }
            if job.gpa + job.len == last.gpa {
                last.gpa = job.gpa;
                last.offset = job.offset;
                last.len += job.len;
                return None;
            }
        }
    }
    if !room {
        return Some(job);
    }
    pending.push(job);
    None
}

/// Sorts jobs by guest address and joins neighbours (or overlaps) in the same region.
fn merge(mut jobs: Vec<DiscardJob>) -> Vec<DiscardJob> {
    jobs.sort_by_key(|j| j.gpa);
    let mut out: Vec<DiscardJob> = Vec::with_capacity(jobs.len());
    for job in jobs {
        if let Some(last) = out.last_mut() {
            let last_end = last.gpa + last.len;
            if same_region(last, &job) && job.gpa <= last_end {
                last.len = last_end.max(job.gpa + job.len) - last.gpa;
                continue;
            }
        }
        out.push(job);
    }
    out
}

/// Keeps the parts of `job` outside `ranges`, cut at host page boundaries (a host page with
/// any withdrawn 4 KiB page in it is not discarded).
fn split_around(job: DiscardJob, ranges: &[(u64, u64)], kept: &mut Vec<DiscardJob>) {
    let hp = job.host_page_size.max(1);
    let mut pieces = vec![(job.gpa, job.gpa + job.len)];
    for &(rs, re) in ranges {
        let (cut_start, cut_end) = (rs - rs % hp, re.div_ceil(hp) * hp);
        let mut next = Vec::with_capacity(pieces.len() + 1);
        for (s, e) in pieces {
            if !overlaps((s, e), (cut_start, cut_end)) {
                next.push((s, e));
                continue;
            }
            if s < cut_start {
                next.push((s, cut_start));
            }
            if cut_end < e {
                next.push((cut_end, e));
            }
        }
        pieces = next;
    }
    for (s, e) in pieces {
        kept.push(DiscardJob {
            backing: job.backing.clone(),
            offset: job.offset + (s - job.gpa),
            len: e - s,
            gpa: s,
            host_page_size: job.host_page_size,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::tests::TestRam;
    use crate::memory::{DiscardMode, GuestMemoryMap, PfnRange};
    use balloon_protocol::PAGE_SIZE;

    const MIB: u64 = 1 << 20;

    fn jobs_for(map: &mut GuestMemoryMap, ranges: &[PfnRange]) -> Vec<DiscardJob> {
        let mut jobs = Vec::new();
        map.inflate(ranges, DiscardMode::Defer(&mut jobs));
        jobs
    }

    fn setup() -> (TestRam, GuestMemoryMap, DiscardWorker) {
        let ram = TestRam::new(8 * MIB);
        let mut map = GuestMemoryMap::default();
        map.replace_regions(vec![ram.region(0, 0, 8 * MIB, PAGE_SIZE)]);
        (ram, map, DiscardWorker::new())
    }

    /// `count` buffers of 256 neighbouring PFNs (1 MiB), one after another, as the Linux
    /// driver sends them.
    fn submit_driver_buffers(worker: &DiscardWorker, map: &mut GuestMemoryMap, count: u64) {
        for b in 0..count {
            worker.submit(jobs_for(
                map,
                &[PfnRange {
                    start: b * 256,
                    count: 256,
                }],
            ));
        }
    }

    #[test]
    fn deferred_discards_merge_and_complete() {
        let (ram, mut map, worker) = setup();
        // Eight driver-sized buffers queue up (the guest was faster than the worker).
        submit_driver_buffers(&worker, &mut map, 8);
        worker.process_pending();
        assert_eq!(ram.allocated(), 0);
        assert_eq!(
            worker.counters.discarded_bytes.load(Ordering::Relaxed),
            8 * MIB
        );
        assert_eq!(worker.counters.discard_calls.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_flood_of_scattered_pages_queues_a_bounded_number_of_jobs_and_discards_the_rest_at_once() {
        let (ram, mut map, _) = setup();
        let worker = DiscardWorker {
            max_queued: 4,
            ..DiscardWorker::new()
        };
        // Every other page of the first 64: 32 jobs that cannot be joined.
        let scattered: Vec<PfnRange> = (0..32)
            .map(|i| PfnRange {
                start: 2 * i,
                count: 1,
            })
            .collect();
        worker.submit(jobs_for(&mut map, &scattered));
        // Four are queued; the other 28 pages are gone already.
        assert_eq!(worker.lock().pending.len(), 4);
        assert_eq!(ram.allocated(), 8 * MIB - 28 * PAGE_SIZE);
        assert!(worker.lock().in_flight.is_empty());
        // A page that continues a queued job (page 6) still joins it.
        worker.submit(jobs_for(&mut map, &[PfnRange { start: 7, count: 1 }]));
        assert_eq!(worker.lock().pending.len(), 4);
        assert_eq!(worker.lock().pending[3].len, 2 * PAGE_SIZE);
        assert_eq!(ram.allocated(), 8 * MIB - 28 * PAGE_SIZE);
        // A run of 2 MiB is queued all the same: made here it would hold the caller's lock.
        worker.submit(jobs_for(
            &mut map,
            &[PfnRange {
                start: 1024,
                count: 512,
            }],
        ));
        assert_eq!(worker.lock().pending.len(), 5);
        assert_eq!(ram.allocated(), 8 * MIB - 28 * PAGE_SIZE);
        worker.process_pending();
        assert_eq!(ram.allocated(), 8 * MIB - (33 + 512) * PAGE_SIZE);
        assert_eq!(
            worker.counters.discarded_bytes.load(Ordering::Relaxed),
            (33 + 512) * PAGE_SIZE
        );
    }

    #[test]
    fn runs_that_continue_each_other_are_joined_as_they_arrive() {
        let (ram, mut map, worker) = setup();
        // Buffers 2, 3 (after it), 1 (before it), then 6 (a gap): two pending jobs.
        for b in [2, 3, 1, 6] {
            worker.submit(jobs_for(
                &mut map,
                &[PfnRange {
                    start: b * 256,
                    count: 256,
                }],
            ));
        }
        let spans: Vec<(u64, u64)> = worker
            .lock()
            .pending
            .iter()
            .map(|j| (j.gpa / MIB, j.len / MIB))
            .collect();
        assert_eq!(spans, [(1, 3), (6, 1)]);
        assert_eq!(worker.lock().pending_bytes, 4 * MIB);
        worker.process_pending();
        assert_eq!(ram.allocated(), 4 * MIB);
        assert_eq!(worker.counters.discard_calls.load(Ordering::Relaxed), 2);
        // The very pages named are gone, and only those.
        for mib in 0..8 {
            let gone = matches!(mib, 1..=3 | 6);
            assert_eq!(ram.byte(mib * MIB) == 0, gone, "MiB {mib}");
            assert_eq!(
                ram.byte((mib + 1) * MIB - PAGE_SIZE) == 0,
                gone,
                "MiB {mib}"
            );
        }
    }

    #[test]
    fn buffers_arriving_one_by_one_gather_into_one_discard_and_flush_does_not_wait() {
        let (ram, mut map, _) = setup();
        // Far longer than the test: only the flush can end the gathering.
        let worker = DiscardWorker::start_gathering(Duration::from_secs(600)).unwrap();
        submit_driver_buffers(&worker, &mut map, 8);
        let t = Instant::now();
        worker.flush();
        assert!(t.elapsed() < Duration::from_secs(60));
        assert_eq!(ram.allocated(), 0);
        assert_eq!(worker.counters.discard_calls.load(Ordering::Relaxed), 1);
        worker.shutdown();
    }

    #[test]
    fn gathering_ends_once_a_piece_is_full() {
        let ram = TestRam::new(64 * MIB);
        let mut map = GuestMemoryMap::default();
        map.replace_regions(vec![ram.region(0, 0, 64 * MIB, PAGE_SIZE)]);
        let worker = DiscardWorker::start_gathering(Duration::from_secs(600)).unwrap();
        worker.submit(jobs_for(
            &mut map,
            &[PfnRange {
                start: 0,
                count: MAX_JOB_BYTES / PAGE_SIZE,
            }],
        ));
        // No flush: the worker goes as soon as a whole piece is pending.
        let deadline = Instant::now() + Duration::from_secs(60);
        while ram.allocated() > 64 * MIB - MAX_JOB_BYTES {
            assert!(
                Instant::now() < deadline,
                "the full piece was not discarded"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        worker.shutdown();
    }

    #[test]
    fn withdrawn_pages_are_never_discarded() {
        let (ram, mut map, worker) = setup();
        worker.submit(jobs_for(
            &mut map,
            &[PfnRange {
                start: 0,
                count: 512,
            }],
        ));
        worker.withdraw(&[(100 * PAGE_SIZE, 110 * PAGE_SIZE)]);
        worker.process_pending();
        assert_eq!(ram.allocated(), 8 * MIB - 502 * PAGE_SIZE);
        assert_eq!(ram.byte(100 * PAGE_SIZE), 0xa5);
        assert_eq!(ram.byte(109 * PAGE_SIZE), 0xa5);
        assert_eq!(ram.byte(110 * PAGE_SIZE), 0);
        assert_eq!(ram.byte(99 * PAGE_SIZE), 0);
    }

    /// A job that is only split, never run: `len` bytes at `gpa`, `offset` into a file of
    /// 2 MiB host pages.
    fn job_on_2m_pages(gpa: u64, offset: u64, len: u64) -> DiscardJob {
        DiscardJob {
            backing: crate::memory::Backing {
                host_addr: 0,
                file: None,
            },
            offset,
            len,
            gpa,
            host_page_size: 2 * MIB,
        }
    }

    #[test]
    fn jobs_in_regions_that_touch_are_never_joined() {
        // Two regions of one guest memory file (unmapped: address 0) that touch at gpa 1 GiB
        // but lie apart in the file: one discard over both would free the wrong bytes.
        let file = Arc::new(tempfile::tempfile().unwrap());
        let job = |gpa: u64, offset: u64| DiscardJob {
            backing: crate::memory::Backing {
                host_addr: 0,
                file: Some((file.clone(), if gpa < 1 << 30 { 0 } else { 2 << 30 })),
            },
            offset,
            len: MIB,
            gpa,
            host_page_size: PAGE_SIZE,
        };
        let merged = merge(vec![job((1 << 30) - MIB, (1 << 30) - MIB), job(1 << 30, 0)]);
        assert_eq!(merged.len(), 2, "{merged:?}");
        // Neighbours in one region still join.
        let merged = merge(vec![job(0, 0), job(MIB, MIB)]);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].len, 2 * MIB);
    }

    #[test]
    fn jobs_run_in_bounded_pieces() {
        let pieces = split(vec![job_on_2m_pages(1 << 30, 4096, 70 * MIB)]);
        let spans: Vec<(u64, u64, u64)> = pieces.iter().map(|j| (j.gpa, j.offset, j.len)).collect();
        assert_eq!(
            spans,
            vec![
                (1 << 30, 4096, 32 * MIB),
                ((1 << 30) + 32 * MIB, 4096 + 32 * MIB, 32 * MIB),
                ((1 << 30) + 64 * MIB, 4096 + 64 * MIB, 6 * MIB),
            ]
        );
    }

    #[test]
    fn a_withdrawn_page_is_never_discarded_once_taken() {
        let (ram, mut map, worker) = setup();
        let worker = Arc::new(worker);
        worker.submit(jobs_for(
            &mut map,
            &[PfnRange {
                start: 0,
                count: 2048,
            }],
        ));
        // The worker has taken the jobs but not run them yet.
        DiscardWorker::take(&mut worker.lock());
        let w = worker.clone();
        let deflate = std::thread::spawn(move || {
            w.withdraw(&[(0, PAGE_SIZE)]);
            // The guest reuses its page only now.
            ram.write::<u8>(0, 7);
            ram
        });
        // The deflate cut its page out of the taken batch (or waited for it in flight): the
        // guest's write survives the batch.
        let ram = deflate.join().unwrap();
        worker.execute();
        assert_eq!(ram.byte(0), 7);
        assert_eq!(ram.allocated(), PAGE_SIZE);
    }

    #[test]
    fn huge_host_pages_are_withdrawn_whole() {
        let mut kept = Vec::new();
        let job = job_on_2m_pages(0, 0, 8 * MIB);
        split_around(job, &[(3 * MIB, 3 * MIB + PAGE_SIZE)], &mut kept);
        let spans: Vec<(u64, u64)> = kept.iter().map(|j| (j.gpa, j.len)).collect();
        assert_eq!(spans, vec![(0, 2 * MIB), (4 * MIB, 4 * MIB)]);
    }
}
