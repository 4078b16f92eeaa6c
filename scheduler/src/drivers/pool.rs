//! Every guest's driver on a thread of its own, so that a tick asks all guests at once and waits
//! for them against one deadline: a VMM that stops answering holds up its own thread only.
//!
//! Each guest has one persistent worker thread that owns its driver and runs the jobs it is sent
//! (a read or a balloon write), one at a time. A worker still busy with an earlier job (one
//! that outlived its tick's deadline) is not sent another, so a hung VMM costs one thread,
//! never a pile of them, and its guest is reported unreachable until the worker is free again.
//!
//! A guest whose driver missed a deadline is still asked every tick its worker is free, but the
//! tick no longer waits for it: its answer is used if it comes while the tick waits for the
//! others, and one successful answer, in time or late, makes the ticks wait for it again. So a
//! VMM that hangs costs the tick one deadline when it starts hanging, not one every time its
//! driver gives up and tries again. A write that succeeds after its tick ended still counts: it
//! is reported with the next round, so the engine learns the target the guest really has.

use super::{BalloonDriver, DriverError, DriverReading};
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("starting the driver thread of guest {guest:?}: {source}")]
    Spawn {
        guest: String,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy)]
enum JobKind {
    Read,
    Set(u64),
}

struct Job {
    round: u64,
    kind: JobKind,
}

enum Outcome {
    Read(Result<DriverReading, DriverError>),
    Set(u64, Result<(), DriverError>),
}

struct Done {
    guest: usize,
    round: u64,
    outcome: Outcome,
}

/// The job a worker is running.
#[derive(Debug, Clone, Copy)]
struct Running {
    round: u64,
    /// Whether its round waits for it (the guest had not missed a deadline).
    awaited: bool,
}

struct Worker {
    name: String,
    jobs: Sender<Job>,
    running: Option<Running>,
    /// False after a missed deadline, until the driver answers successfully.
    awaited: bool,
    /// The balloon's actual size in the latest successful reading.
    last_actual: Option<u64>,
}

/// What one round of reads or writes gave.
#[derive(Debug, Default)]
pub struct Round {
    /// Per guest, reads only: this round's reading; `None` for a guest that did not answer in
    /// time, failed, or whose driver was still busy.
    pub readings: Vec<Option<DriverReading>>,
    /// Balloon targets the drivers accepted, (guest, bytes): this round's writes, and writes of
    /// earlier rounds that were accepted after their round ended.
    pub accepted: Vec<(usize, u64)>,
    /// A guest for every driver error and every missed deadline (each logged once).
    pub errors: Vec<usize>,
}

pub struct DriverPool {
    workers: Vec<Worker>,
    done: Receiver<Done>,
    round: u64,
}

impl DriverPool {
    /// Starts one worker thread per guest, `(name, driver)`, in guest order.
    pub fn new(drivers: Vec<(String, Box<dyn BalloonDriver>)>) -> Result<Self, PoolError> {
        let (done_tx, done) = mpsc::channel();
        let mut workers = Vec::with_capacity(drivers.len());
        for (index, (name, driver)) in drivers.into_iter().enumerate() {
            let (jobs, jobs_rx) = mpsc::channel();
            let done_tx = done_tx.clone();
            std::thread::Builder::new()
                .name(format!("driver-{name}"))
                .spawn(move || work(index, driver, jobs_rx, done_tx))
                .map_err(|source| PoolError::Spawn {
                    guest: name.clone(),
                    source,
                })?;
            workers.push(Worker {
                name,
                jobs,
                running: None,
                awaited: true,
                last_actual: None,
            });
        }
        Ok(DriverPool {
            workers,
            done,
            round: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// The balloon's actual size from guest `i`'s latest successful reading (this round's or
    /// an earlier one), if it ever answered.
    pub fn last_actual(&self, i: usize) -> Option<u64> {
        self.workers.get(i).and_then(|w| w.last_actual)
    }

    /// Whether rounds wait for guest `i` (it has not missed a deadline since it last answered).
    pub fn is_awaited(&self, i: usize) -> bool {
        self.workers.get(i).is_some_and(|w| w.awaited)
    }

    /// Whether guest `i`'s driver is still running a job.
    pub fn is_busy(&self, i: usize) -> bool {
        self.workers.get(i).is_some_and(|w| w.running.is_some())
    }

    /// Reads every guest whose driver is free, waiting until `deadline` at most.
    pub fn read(&mut self, deadline: Instant) -> Round {
        let mut round = Round {
            readings: vec![None; self.workers.len()],
            ..Default::default()
        };
        self.run(|_| Some(JobKind::Read), deadline, &mut round);
        round
    }

    /// Sends the balloon targets (per guest; `None` sends nothing), waiting until `deadline`
    /// at most.
    pub fn write(&mut self, targets: &[Option<u64>], deadline: Instant) -> Round {
        let mut round = Round::default();
        self.run(
            |i| targets.get(i).copied().flatten().map(JobKind::Set),
            deadline,
            &mut round,
        );
        round
    }

    fn run(&mut self, job: impl Fn(usize) -> Option<JobKind>, deadline: Instant, out: &mut Round) {
        self.round += 1;
        let round = self.round;
        // Answers that came after their round ended.
        self.collect(round, out);
        let mut waiting = 0usize;
        for (i, w) in self.workers.iter_mut().enumerate() {
            let Some(kind) = job(i) else { continue };
            if w.running.is_some() {
                log::debug!(
                    "{}: its driver is still busy with an earlier request; not asked again",
                    w.name
                );
                continue;
            }
            if w.jobs.send(Job { round, kind }).is_err() {
                // Only if the thread died, which catching panics should prevent.
                log::error!("{}: its driver thread has stopped", w.name);
                out.errors.push(i);
                continue;
            }
            w.running = Some(Running {
                round,
                awaited: w.awaited,
            });
            waiting += usize::from(w.awaited);
        }
        while waiting > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.done.recv_timeout(left) {
                Ok(done) => {
                    if self.finish(done, round, out) {
                        waiting -= 1;
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // What else has come in meanwhile (from guests not waited for).
        self.collect(round, out);
        for (i, w) in self.workers.iter_mut().enumerate() {
            match w.running {
                Some(r) if r.round == round && r.awaited => {
                    w.awaited = false;
                    log::warn!(
                        "{}: no answer by the tick's deadline; unreachable until its driver answers",
                        w.name
                    );
                    out.errors.push(i);
                }
                _ => {}
            }
        }
    }

    /// Takes every answer already there.
    fn collect(&mut self, round: u64, out: &mut Round) {
        loop {
            match self.done.try_recv() {
                Ok(done) => {
                    self.finish(done, round, out);
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return,
            }
        }
    }

    /// Records one answer; true if it is one that `round` waits for.
    fn finish(&mut self, done: Done, round: u64, out: &mut Round) -> bool {
        let Some(w) = self.workers.get_mut(done.guest) else {
            return false;
        };
        let running = w.running.take();
        let current = done.round == round;
        let waited_for = current && running.is_some_and(|r| r.awaited);
        let late = if current { "" } else { " (late)" };
        match done.outcome {
            Outcome::Read(Ok(reading)) => {
                w.awaited = true;
                w.last_actual = Some(reading.actual_bytes);
                if current {
                    if let Some(slot) = out.readings.get_mut(done.guest) {
                        *slot = Some(reading);
                    }
                } else {
                    log::debug!("{}: a late reading, not used", w.name);
                }
            }
            Outcome::Set(bytes, Ok(())) => {
                w.awaited = true;
                if !current {
                    log::info!(
                        "{}: balloon {} MiB accepted after its tick",
                        w.name,
                        bytes >> 20
                    );
                }
                out.accepted.push((done.guest, bytes));
            }
            Outcome::Read(Err(e)) => {
                log::warn!("{}: {e}{late}", w.name);
                out.errors.push(done.guest);
            }
            Outcome::Set(bytes, Err(e)) => {
                log::warn!(
                    "{}: setting the balloon to {} MiB: {e}{late}",
                    w.name,
                    bytes >> 20
                );
                out.errors.push(done.guest);
            }
        }
        waited_for
    }
}

/// A worker: runs its guest's jobs until the pool is dropped.
fn work(index: usize, mut driver: Box<dyn BalloonDriver>, jobs: Receiver<Job>, done: Sender<Done>) {
    for job in jobs {
        let run = std::panic::catch_unwind(AssertUnwindSafe(|| match job.kind {
            JobKind::Read => Outcome::Read(driver.read()),
            JobKind::Set(b) => Outcome::Set(b, driver.set_balloon(b)),
        }));
        let outcome = run.unwrap_or_else(|_| {
            let e = || DriverError::Protocol(format!("the {} driver panicked", driver.describe()));
            match job.kind {
                JobKind::Read => Outcome::Read(Err(e())),
                JobKind::Set(b) => Outcome::Set(b, Err(e())),
            }
        });
        let answer = Done {
            guest: index,
            round: job.round,
            outcome,
        };
        if done.send(answer).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A driver that answers at once, or, while its gate is closed, blocks until it opens; it
    /// fails (as a driver timing out would) while `fail` is set.
    #[derive(Clone, Default)]
    struct Gated {
        closed: Arc<(Mutex<bool>, std::sync::Condvar)>,
        fail: Arc<std::sync::atomic::AtomicBool>,
        calls: Arc<Mutex<Vec<String>>>,
    }

    impl Gated {
        fn close(&self) {
            *self.closed.0.lock().unwrap() = true;
        }
        fn open(&self) {
            *self.closed.0.lock().unwrap() = false;
            self.closed.1.notify_all();
        }
        fn fail(&self, fail: bool) {
            self.fail.store(fail, std::sync::atomic::Ordering::SeqCst);
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
        fn pass(&self, call: String) -> Result<(), DriverError> {
            self.calls.lock().unwrap().push(call);
            let (m, c) = &*self.closed;
            let mut closed = m.lock().unwrap();
            while *closed {
                closed = c.wait(closed).unwrap();
            }
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(DriverError::Io {
                    what: "reading".into(),
                    source: std::io::ErrorKind::TimedOut.into(),
                });
            }
            Ok(())
        }
    }

    impl BalloonDriver for Gated {
        fn read(&mut self) -> Result<DriverReading, DriverError> {
            self.pass("read".into())?;
            Ok(DriverReading {
                target_bytes: Some(0),
                actual_bytes: 4096,
                stats: None,
            })
        }
        fn set_balloon(&mut self, b: u64) -> Result<(), DriverError> {
            self.pass(format!("set {b}"))
        }
        fn describe(&self) -> String {
            "gated".into()
        }
    }

    struct Panicky;

    impl BalloonDriver for Panicky {
        fn read(&mut self) -> Result<DriverReading, DriverError> {
            panic!("a driver bug")
        }
        fn set_balloon(&mut self, _: u64) -> Result<(), DriverError> {
            Err(DriverError::Refused("no".into()))
        }
        fn describe(&self) -> String {
            "panicky".into()
        }
    }

    fn pool(drivers: &[Gated]) -> DriverPool {
        DriverPool::new(
            drivers
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    (
                        format!("g{i}"),
                        Box::new(d.clone()) as Box<dyn BalloonDriver>,
                    )
                })
                .collect(),
        )
        .unwrap()
    }

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    /// Waits (with a deadline) until guest `i`'s worker is free, taking what it answers.
    fn until_free(p: &mut DriverPool, i: usize) -> Round {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Round::default();
        while p.is_busy(i) {
            assert!(Instant::now() < deadline, "the worker never finished");
            if let Ok(done) = p.done.recv_timeout(Duration::from_millis(50)) {
                p.finish(done, 0, &mut out);
            }
        }
        out
    }

    #[test]
    fn a_stuck_driver_is_not_asked_again_and_costs_one_deadline_only() {
        let d = [Gated::default(), Gated::default()];
        let mut p = pool(&d);
        d[1].close();
        let t = Instant::now();
        let r = p.read(soon(300));
        let first = t.elapsed();
        assert!(r.readings[0].is_some() && r.readings[1].is_none());
        assert_eq!(r.errors, vec![1], "the missed deadline is an error");
        assert!(first >= Duration::from_millis(300), "{first:?}");
        assert!(!p.is_awaited(1) && p.is_busy(1));
        // Still stuck: not asked again (no second call, no second thread), and not waited for.
        for _ in 0..3 {
            let t = Instant::now();
            let r = p.read(soon(5_000));
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
            assert!(r.readings[0].is_some() && r.readings[1].is_none());
            assert!(r.errors.is_empty(), "{:?}", r.errors);
        }
        assert_eq!(d[1].calls(), vec!["read"]);
        assert_eq!(d[0].calls().len(), 4);
        // It answers late: not used, but the ticks wait for it again.
        d[1].open();
        let late = until_free(&mut p, 1);
        assert!(late.errors.is_empty());
        assert!(p.is_awaited(1));
        let r = p.read(soon(5_000));
        assert!(r.readings.iter().all(Option::is_some));
        assert_eq!(p.last_actual(1), Some(4096));
    }

    #[test]
    fn a_guest_that_missed_a_deadline_is_asked_but_not_waited_for() {
        let d = [Gated::default(), Gated::default()];
        let mut p = pool(&d);
        d[1].close();
        d[1].fail(true);
        p.read(soon(100));
        assert!(!p.is_awaited(1));
        // Its driver gives up (its own timeout): an error, late, and still not waited for.
        d[1].open();
        let late = until_free(&mut p, 1);
        assert_eq!(late.errors, vec![1]);
        assert!(!p.is_awaited(1));
        // Asked again now that it is free, and it hangs again: the tick does not wait.
        d[1].close();
        let t = Instant::now();
        let r = p.read(soon(5_000));
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(r.readings[0].is_some() && r.readings[1].is_none());
        assert!(
            r.errors.is_empty(),
            "no second missed deadline: {:?}",
            r.errors
        );
        // (The worker may not have started on it yet when the round ends.)
        let deadline = Instant::now() + Duration::from_secs(10);
        while d[1].calls().len() < 2 {
            assert!(Instant::now() < deadline, "never asked again");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(d[1].calls(), vec!["read", "read"]);
        // It recovers: one good answer, even late, and the ticks wait for it again.
        d[1].fail(false);
        d[1].open();
        until_free(&mut p, 1);
        assert!(p.is_awaited(1));
        let r = p.read(soon(5_000));
        assert!(r.readings[1].is_some());
    }

    #[test]
    fn writes_share_the_deadline_and_late_acceptances_are_reported() {
        let d = [Gated::default(), Gated::default()];
        let mut p = pool(&d);
        p.read(soon(5_000));
        d[1].close();
        let t = Instant::now();
        let w = p.write(&[Some(8192), Some(12288)], soon(300));
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(w.accepted, vec![(0, 8192)]);
        assert_eq!(w.errors, vec![1]);
        d[1].open();
        // The next round reports the late acceptance first; the driver is free again.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = p.read(soon(5_000));
            if r.accepted.contains(&(1, 12288)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the late write was never reported"
            );
        }
        assert_eq!(d[1].calls()[..2], ["read".to_string(), "set 12288".into()]);
    }

    #[test]
    fn a_panicking_driver_is_an_error_not_a_dead_guest() {
        let mut p = DriverPool::new(vec![(
            "p".into(),
            Box::new(Panicky) as Box<dyn BalloonDriver>,
        )])
        .unwrap();
        for _ in 0..2 {
            let r = p.read(soon(5_000));
            assert!(r.readings[0].is_none());
            assert_eq!(r.errors, vec![0]);
            assert!(p.is_awaited(0));
        }
    }
}
