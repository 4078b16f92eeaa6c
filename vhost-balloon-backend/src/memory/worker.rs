//! Discarding off the queue's path. The inflate handler hands its discards to this worker and
//! returns the buffer at once, so the guest driver goes on allocating its next pages while the
//! host frees the previous ones (on another core). Pending pages are kept as bits (see
//! pending.rs), so those of neighbouring buffers, or of scattered pages that come to neighbour
//! each other, leave in one discard. The worker lets them gather for a moment first (`GATHER`):
//! every discard call, however small, ends in a TLB-shootdown round on each CPU that runs the
//! VMM's vCPUs, and buffer by buffer those rounds were 35% of the backend's CPU under a TCG
//! guest inflating 1 MiB at a time.
//!
//! Safety: a ballooned page is the guest's again only after it deflates it and the device
//! acknowledges that. `withdraw` runs in the deflate handler before that acknowledgement: it
//! drops pending discards of those pages and waits for the one in flight if it touches them.
//! So a discard never lands on a page the guest got back. This relies on the driver telling the
//! host before reusing a page (MUST_TELL_HOST); without it the backend discards synchronously.

use super::pending::PendingSet;
use super::DiscardJob;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long pending discards may gather before the worker runs them: memory leaving the host
/// this much later costs nothing, one call instead of many saves their shootdown rounds.
/// Measured side by side on TCG guests inflating 75% (vm_scaling, 3 runs each): 100 ms made
/// 45% fewer calls than 20 ms on an 8 GiB guest (10.9 MiB each, against 5.5-6.8) and 25%
/// fewer on a 1 GiB guest.
const GATHER: Duration = Duration::from_millis(100);

/// The largest single discard: what a deflate may have to wait for.
const MAX_JOB_BYTES: u64 = 32 << 20;

#[derive(Default)]
struct Queue {
    pending: PendingSet,
    /// Callers waiting in `flush`, which must not wait for the gathering too.
    flushers: usize,
    /// The balloon reached its target: nothing more is coming to gather with.
    complete: bool,
    /// The guest physical range [start, end) being discarded right now (one executor: the
    /// worker thread, or `process_pending` on a worker without one).
    running: Option<(u64, u64)>,
    shutdown: bool,
}

/// Totals of the worker's discards.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    pub discarded_bytes: AtomicU64,
    pub discard_calls: AtomicU64,
    pub discard_errors: AtomicU64,
}

pub struct DiscardWorker {
    queue: Mutex<Queue>,
    changed: Condvar,
    pub counters: WorkerCounters,
    /// How long discards gather (`GATHER`; zero for a worker without a thread).
    gather: Duration,
}

impl Default for DiscardWorker {
    fn default() -> Self {
        DiscardWorker {
            queue: Mutex::default(),
            changed: Condvar::new(),
            counters: WorkerCounters::default(),
            gather: Duration::ZERO,
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

    /// Queues `jobs` for the worker. Never discards on the caller's thread, whatever the guest
    /// sends: the pending set holds at most a bit per host page of guest RAM.
    pub fn submit(&self, jobs: Vec<DiscardJob>) {
        if jobs.is_empty() {
            return;
        }
        let mut q = self.lock();
        let (was_idle, was_short) = (q.pending.is_empty(), q.pending.bytes() < MAX_JOB_BYTES);
        for job in &jobs {
            q.pending.add(job);
        }
        // Only the worker waits for jobs, and only these end its wait: the first job, or a
        // piece's worth gathered. (A wake per 1 MiB buffer would switch to it for nothing.)
        let wake = (was_idle && !q.pending.is_empty())
            || (was_short && q.pending.bytes() >= MAX_JOB_BYTES);
        drop(q);
        if wake {
            self.changed.notify_all();
        }
    }

    /// The balloon that submitted the pending pages reached its target: no more are coming, so
    /// they go now instead of waiting out the gathering (up to `GATHER` of memory kept from
    /// the host for nothing).
    pub fn balloon_complete(&self) {
        let mut q = self.lock();
        if q.pending.is_empty() {
            return;
        }
        q.complete = true;
        drop(q);
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
    /// pending discards and wait until none of them is being discarded. A host page with any of
    /// them in it is not discarded; the other host pages stay pending.
    pub fn withdraw(&self, gpa_ranges: &[(u64, u64)]) {
        let mut q = self.lock();
        for &(start, end) in gpa_ranges {
            q.pending.remove(start, end);
        }
        while q
            .running
            .is_some_and(|r| gpa_ranges.iter().any(|g| overlaps(r, *g)))
        {
            q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Forgets every pending discard and waits for the one in flight (discards switched off, or
    /// the pages' owner unknown). Returns whether any pending one was dropped.
    pub fn cancel_all(&self) -> bool {
        let mut q = self.lock();
        let dropped = !q.pending.is_empty();
        q.pending.clear();
        while q.running.is_some() {
            q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        dropped
    }

    /// Waits until every submitted discard is done.
    pub fn flush(&self) {
        let mut q = self.lock();
        q.flushers += 1;
        self.changed.notify_all();
        while !q.pending.is_empty() || q.running.is_some() {
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
            let batch = {
                let mut q = self.lock();
                while q.pending.is_empty() && !q.shutdown {
                    q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                let started = Instant::now();
                q = self.gather(q);
                if q.shutdown {
                    return;
                }
                log::debug!(
                    "discarding {} KiB gathered for {:?}",
                    q.pending.bytes() >> 10,
                    started.elapsed()
                );
                q.pending.bytes()
            };
            self.execute(batch);
        }
    }

    /// Lets pending discards gather for up to `self.gather`, or until they fill a piece of
    /// `MAX_JOB_BYTES`, the balloon is complete, someone flushes, or the worker shuts down.
    fn gather<'a>(&self, mut q: MutexGuard<'a, Queue>) -> MutexGuard<'a, Queue> {
        let deadline = Instant::now() + self.gather;
        while !q.shutdown && !q.complete && q.flushers == 0 && q.pending.bytes() < MAX_JOB_BYTES {
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
        q.complete = false;
        q
    }

    /// Runs whatever is pending now, on the caller's thread.
    pub fn process_pending(&self) {
        self.execute(u64::MAX);
    }

    /// Discards about `budget` bytes of what is pending (what gathered; pages that arrive
    /// meanwhile join the runs they continue), one piece of at most `MAX_JOB_BYTES` at a time,
    /// each in flight only while it runs: a deflate (which waits for an in-flight discard of
    /// its pages, under the device lock) waits for one bounded piece at most, and pages it
    /// withdraws before their piece is taken are never discarded.
    fn execute(&self, mut budget: u64) {
        while budget > 0 {
            let job = {
                let mut q = self.lock();
                let Some(job) = q.pending.take(MAX_JOB_BYTES) else {
                    break;
                };
                q.running = Some((job.gpa, job.gpa + job.len));
                job
            };
            self.discard(&job);
            self.lock().running = None;
            self.changed.notify_all();
            budget = budget.saturating_sub(job.len);
        }
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
    fn scattered_pages_are_never_discarded_by_submit_and_leave_as_runs_once_they_neighbour() {
        const LEN: u64 = 256 * MIB;
        let ram = TestRam::new(LEN);
        let mut map = GuestMemoryMap::default();
        map.replace_regions(vec![ram.region(0, 0, LEN, PAGE_SIZE)]);
        let worker = DiscardWorker::new();
        // Every even page, then every odd one: a flood of 64 Ki pages that cannot join as
        // they arrive (a list of jobs held 64 bytes each, and past its bound of 16 Ki the rest
        // was discarded by submit).
        for parity in [0, 1] {
            let pages: Vec<PfnRange> = (0..LEN / PAGE_SIZE / 2)
                .map(|i| PfnRange {
                    start: 2 * i + parity,
                    count: 1,
                })
                .collect();
            worker.submit(jobs_for(&mut map, &pages));
        }
        // Nothing was discarded on the caller's thread (the vring handler, under the device
        // lock), and the pending set is one bit a page.
        assert_eq!(ram.allocated(), LEN);
        assert_eq!(worker.lock().pending.bytes(), LEN);
        worker.process_pending();
        assert_eq!(ram.allocated(), 0);
        // 32 MiB pieces.
        assert_eq!(worker.counters.discard_calls.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn runs_that_continue_each_other_are_discarded_together() {
        let (ram, mut map, worker) = setup();
        // Buffers 2, 3 (after it), 1 (before it), then 6 (a gap): two discards.
        for b in [2, 3, 1, 6] {
            worker.submit(jobs_for(
                &mut map,
                &[PfnRange {
                    start: b * 256,
                    count: 256,
                }],
            ));
        }
        assert_eq!(worker.lock().pending.bytes(), 4 * MIB);
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
    fn gathering_ends_once_the_balloon_is_complete() {
        let (ram, mut map, _) = setup();
        let worker = DiscardWorker::start_gathering(Duration::from_secs(600)).unwrap();
        // The last MiB of an inflation: far less than a piece, and no more is coming.
        submit_driver_buffers(&worker, &mut map, 1);
        worker.balloon_complete();
        let deadline = Instant::now() + Duration::from_secs(60);
        while ram.allocated() > 7 * MIB {
            assert!(
                Instant::now() < deadline,
                "the last MiB waited for the gathering"
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

    #[test]
    fn a_deflate_waits_for_the_discard_in_flight_over_its_pages() {
        let (ram, mut map, worker) = setup();
        let worker = Arc::new(worker);
        let mut jobs = jobs_for(
            &mut map,
            &[PfnRange {
                start: 0,
                count: 256,
            }],
        );
        // The worker took the first MiB and is discarding it.
        let job = jobs.remove(0);
        worker.lock().running = Some((job.gpa, job.gpa + job.len));
        let (done_tx, done) = std::sync::mpsc::channel();
        let w = worker.clone();
        let deflate = std::thread::spawn(move || {
            w.withdraw(&[(0, PAGE_SIZE)]);
            // The guest reuses its page only now.
            ram.write::<u8>(0, 7);
            done_tx.send(()).unwrap();
            ram
        });
        // Not acknowledged while the discard runs (a withdraw that did not wait would have
        // been long done).
        assert!(done.recv_timeout(Duration::from_millis(300)).is_err());
        worker.discard(&job);
        worker.lock().running = None;
        worker.changed.notify_all();
        let ram = deflate.join().unwrap();
        // The MiB is gone but for the page the guest wrote after its deflate.
        assert_eq!(ram.byte(0), 7);
        assert_eq!(ram.allocated(), 7 * MIB + PAGE_SIZE);
    }

    #[test]
    fn a_withdrawal_while_pending_keeps_the_pages_of_the_others() {
        let (ram, mut map, worker) = setup();
        worker.submit(jobs_for(
            &mut map,
            &[PfnRange {
                start: 0,
                count: 2048,
            }],
        ));
        // A deflate of 10 pages in the middle, then the worker comes: two discards around them.
        worker.withdraw(&[(1000 * PAGE_SIZE, 1010 * PAGE_SIZE)]);
        worker.process_pending();
        assert_eq!(ram.allocated(), 10 * PAGE_SIZE);
        assert_eq!(worker.counters.discard_calls.load(Ordering::Relaxed), 2);
    }
}
