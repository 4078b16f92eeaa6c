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
#[path = "pool_tests.rs"]
mod tests;
