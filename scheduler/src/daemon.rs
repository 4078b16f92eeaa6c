//! The live scheduler: every tick, read the host and every guest's driver, run the engine, send
//! the new balloon targets, write the trace, and publish the status for the API and metrics.
//!
//! The drivers are asked all at once, each on its own thread (drivers/pool.rs), against one
//! deadline per tick (`driver_deadline_seconds`, by default half the tick period): reads must
//! answer within its first half, balloon writes by its end. A guest that does not answer in
//! time is unreachable for this tick and costs the others nothing; a driver still stuck from an
//! earlier tick is not asked again until it is free.

use crate::api::{ApiReply, ApiRequest, SchedulerStatus};
use crate::config::Config;
use crate::drivers::pool::{DriverPool, PoolError};
use crate::drivers::{BalloonDriver, DriverReading};
use crate::engine::Engine;
use crate::model::GuestSpec;
use crate::policy::PolicyKind;
use crate::trace::TraceRecord;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A guest and its driver, as the daemon is started with them.
pub struct Guest {
    pub spec: GuestSpec,
    pub driver: Box<dyn BalloonDriver>,
}

/// State shared by the tick loop, the API and the metrics.
pub struct Shared {
    pub engine: Mutex<Engine>,
    pub status: Mutex<SchedulerStatus>,
    /// Notified after every tick (for `watch`) and on shutdown.
    pub ticked: Condvar,
    pub stop: AtomicBool,
    /// The guests, in config order.
    pub guests: Vec<GuestSpec>,
    /// Their drivers, one thread each; used by the tick loop only.
    drivers: Mutex<DriverPool>,
    /// How long a tick waits for the drivers.
    driver_deadline: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Starts every guest's driver thread; a tick waits `driver_deadline` at most for them.
    pub fn new(
        engine: Engine,
        guests: Vec<Guest>,
        driver_deadline: Duration,
    ) -> Result<Arc<Self>, PoolError> {
        let drivers = guests
            .iter()
            .map(|g| (g.spec.name.clone(), g.driver.describe()))
            .collect();
        let (specs, drivers_by_guest): (Vec<GuestSpec>, Vec<_>) = guests
            .into_iter()
            .map(|g| (g.spec.clone(), (g.spec.name, g.driver)))
            .unzip();
        let pool = DriverPool::new(drivers_by_guest)?;
        Ok(Arc::new(Shared {
            engine: Mutex::new(engine),
            status: Mutex::new(SchedulerStatus {
                drivers,
                ..Default::default()
            }),
            ticked: Condvar::new(),
            stop: AtomicBool::new(false),
            guests: specs,
            drivers: Mutex::new(pool),
            driver_deadline,
        }))
    }

    pub fn status(&self) -> SchedulerStatus {
        lock(&self.status).clone()
    }

    fn guest(&self, name: &str) -> Result<&GuestSpec, String> {
        self.guests.iter().find(|g| g.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.guests.iter().map(|g| g.name.as_str()).collect();
            format!("no guest {name:?} (guests: {})", names.join(", "))
        })
    }

    /// Handles one API request (except `watch`, which the server streams).
    pub fn handle(&self, request: ApiRequest) -> ApiReply {
        let result = match request {
            ApiRequest::Status {} | ApiRequest::Watch {} => Ok(()),
            ApiRequest::Set {
                guest,
                memory_bytes,
            } => self.guest(&guest).and_then(|g| {
                let (lo, hi) = (g.min_bytes, g.max_bytes.min(g.memory_bytes));
                if memory_bytes < lo || memory_bytes > hi {
                    return Err(format!(
                        "{guest}: {} MiB is outside its bounds [{} MiB, {} MiB]",
                        memory_bytes >> 20,
                        lo >> 20,
                        hi >> 20
                    ));
                }
                lock(&self.engine).pin(&guest, Some(memory_bytes));
                Ok(())
            }),
            ApiRequest::Pin { guest } => self.guest(&guest).map(|g| {
                let last = lock(&self.status).last.clone();
                let alloc = last
                    .and_then(|r| r.guests.into_iter().find(|t| t.name == guest))
                    .map(|t| t.memory_bytes.saturating_sub(t.balloon_target_bytes))
                    .unwrap_or(g.max_bytes);
                lock(&self.engine).pin(&guest, Some(alloc));
            }),
            ApiRequest::Unpin { guest } => self.guest(&guest).map(|_| {
                lock(&self.engine).pin(&guest, None);
            }),
            ApiRequest::PolicyShow {} => {
                return ApiReply::policy(lock(&self.engine).policy.clone())
            }
            ApiRequest::PolicySet { kind } => kind
                .parse::<PolicyKind>()
                .map(|k| lock(&self.engine).policy.kind = k),
        };
        match result {
            Ok(()) => {
                self.refresh_pins();
                ApiReply::status(self.status())
            }
            Err(e) => ApiReply::error(e),
        }
    }

    fn refresh_pins(&self) {
        let engine = lock(&self.engine);
        let pinned: BTreeMap<String, u64> = self
            .guests
            .iter()
            .filter_map(|g| engine.pinned(&g.name).map(|p| (g.name.clone(), p)))
            .collect();
        lock(&self.status).pinned = pinned;
    }
}

/// Budget settings resolved from the config.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub fixed: Option<u64>,
    pub reserve: u64,
}

impl Budget {
    pub fn from_config(config: &Config) -> Self {
        Budget {
            fixed: config.budget.bytes.map(|s| s.0),
            reserve: config.budget.reserve.map_or(0, |s| s.0),
        }
    }
}

/// Runs one tick: returns its trace record. The drivers are asked at once and waited for until
/// the tick's driver deadline at most: reads for its first half, balloon writes until its end.
/// Without the host's figures there is no tick.
pub fn tick(shared: &Shared, budget: Budget, started: Instant) -> std::io::Result<TraceRecord> {
    let begun = Instant::now();
    let now = started.elapsed().as_secs_f64();
    let mut drivers = lock(&shared.drivers);
    let name = |i: usize| shared.guests.get(i).map(|g| g.name.clone());
    let reads = drivers.read(begun + shared.driver_deadline / 2);
    let mut errors: Vec<String> = reads.errors.iter().filter_map(|&i| name(i)).collect();
    {
        // Writes accepted after their tick ended: the engine must know the targets now held.
        let mut engine = lock(&shared.engine);
        for &(i, bytes) in &reads.accepted {
            if let Some(g) = shared.guests.get(i) {
                engine.sent(&g.name, bytes);
            }
        }
    }
    let readings: Vec<(GuestSpec, Option<DriverReading>)> =
        shared.guests.iter().cloned().zip(reads.readings).collect();
    // The guests' memory now; an unreachable guest still holds what it had when last read.
    let allocated: u64 = shared
        .guests
        .iter()
        .enumerate()
        .filter_map(|(i, g)| {
            let actual = drivers.last_actual(i)?;
            Some(g.memory_bytes.saturating_sub(actual))
        })
        .sum();
    let host = crate::host::read_host(budget.fixed, budget.reserve, allocated)?;
    let outcome = lock(&shared.engine).tick(now, host, &readings);
    let writes = drivers.write(&outcome.send, begun + shared.driver_deadline);
    drop(drivers);
    {
        let mut engine = lock(&shared.engine);
        for &(i, bytes) in &writes.accepted {
            if let Some(g) = shared.guests.get(i) {
                log::debug!("{}: balloon {} MiB", g.name, bytes >> 20);
                engine.sent(&g.name, bytes);
            }
        }
    }
    errors.extend(writes.errors.iter().filter_map(|&i| name(i)));
    let record = outcome.trace.clone();
    {
        let mut status = lock(&shared.status);
        status.ticks += 1;
        status.uptime_s = now;
        status.last = Some(outcome.trace);
        for name in errors {
            *status.driver_errors.entry(name).or_default() += 1;
        }
    }
    shared.refresh_pins();
    shared.ticked.notify_all();
    Ok(record)
}

/// The tick loop, until `shared.stop`.
pub fn run_loop(
    shared: Arc<Shared>,
    tick_seconds: f64,
    budget: Budget,
    trace: Option<(PathBuf, u64)>,
) {
    let mut trace_file = trace.and_then(|(p, max_bytes)| {
        crate::trace_file::TraceFile::open(&p, max_bytes)
            .map_err(|e| log::error!("trace {}: {e}", p.display()))
            .ok()
    });
    let started = Instant::now();
    let period = Duration::from_secs_f64(tick_seconds);
    let mut next = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        match tick(&shared, budget, started) {
            Ok(record) => {
                if let Some(f) = trace_file.as_mut() {
                    // One line per record; a reply's error stand-in has no place in a trace.
                    let written = serde_json::to_string(&record)
                        .map_err(std::io::Error::from)
                        .and_then(|line| f.append_line(&line));
                    if let Err(e) = written {
                        log::error!("writing the trace: {e}");
                    }
                }
            }
            Err(e) => log::error!("reading the host's memory: {e}"),
        }
        next += period;
        // Sleep until the next tick, waking at once on shutdown.
        let mut status = lock(&shared.status);
        while !shared.stop.load(Ordering::Relaxed) {
            let left = next.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            status = shared
                .ticked
                .wait_timeout(status, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actuator::ActuatorConfig;
    use crate::drivers::backend::BackendDriver;
    use crate::drivers::fake_backend::FakeBackend;
    use crate::policy::PolicyConfig;
    use crate::trace::GuestCondition;

    const MIB: u64 = 1 << 20;
    const DEADLINE: Duration = Duration::from_secs(1);

    fn spec(name: &str) -> GuestSpec {
        GuestSpec {
            name: name.into(),
            memory_bytes: 2048 * MIB,
            min_bytes: 256 * MIB,
            max_bytes: 2048 * MIB,
            shares: 1000,
            static_bytes: Some(1024 * MIB),
        }
    }

    /// The static policy with a 1 GiB allocation each: balloons grow by 256 MiB per tick.
    fn shared(backends: &[(&str, &FakeBackend)]) -> Arc<Shared> {
        // The drivers as `run` makes them, with their own 10 s timeout.
        shared_with(backends, crate::drivers::backend::DEFAULT_TIMEOUT)
    }

    fn shared_with(backends: &[(&str, &FakeBackend)], driver_timeout: Duration) -> Arc<Shared> {
        let guests = backends
            .iter()
            .map(|(name, b)| Guest {
                spec: spec(name),
                driver: Box::new(BackendDriver::with_timeout(
                    b.socket.clone(),
                    driver_timeout,
                )),
            })
            .collect();
        let policy = PolicyConfig {
            kind: PolicyKind::Static,
            ..Default::default()
        };
        Shared::new(
            Engine::new(policy, ActuatorConfig::default()),
            guests,
            DEADLINE,
        )
        .unwrap()
    }

    const BUDGET: Budget = Budget {
        fixed: Some(64 << 30),
        reserve: 0,
    };

    fn state(shared: &Shared, guest: &str) -> GuestCondition {
        let last = shared.status().last.unwrap();
        last.guests
            .iter()
            .find(|g| g.name == guest)
            .map(|g| g.state)
            .unwrap()
    }

    fn timed_tick(shared: &Shared, started: Instant) -> Duration {
        let t = Instant::now();
        tick(shared, BUDGET, started).expect("a tick");
        t.elapsed()
    }

    #[test]
    fn hung_guests_are_unreachable_and_cost_the_others_nothing() {
        let healthy: Vec<FakeBackend> = (0..3)
            .map(|_| FakeBackend::start(2048 * MIB).unwrap())
            .collect();
        // Two control sockets that accept and never answer: asked one after another with a
        // 10 s timeout each, they would stretch the tick to 20 s.
        let hung = [FakeBackend::hung().unwrap(), FakeBackend::hung().unwrap()];
        let names = ["a", "b", "c", "h1", "h2"];
        let all: Vec<&FakeBackend> = healthy.iter().chain(hung.iter()).collect();
        let s = shared(
            &names
                .iter()
                .copied()
                .zip(all.iter().copied())
                .collect::<Vec<_>>(),
        );
        let started = Instant::now();

        // The first tick waits for the hung ones until the end of the read window only.
        let took = timed_tick(&s, started);
        assert!(took >= DEADLINE / 2, "{took:?}");
        assert!(
            took < DEADLINE + Duration::from_millis(500),
            "the tick took {took:?}"
        );
        for (name, b) in names.iter().zip(&healthy) {
            assert_eq!(state(&s, name), GuestCondition::Ok, "{name}");
            // The reading was used (the fake's statistics) and the first step was sent.
            let last = s.status().last.unwrap();
            let g = last.guests.iter().find(|g| g.name == *name).unwrap();
            assert_eq!(g.available_bytes, Some(1024 * MIB));
            assert_eq!(b.targets(), vec![256 * MIB], "{name}");
        }
        for (name, b) in names[3..].iter().zip(&hung) {
            assert_eq!(state(&s, name), GuestCondition::Unreachable, "{name}");
            assert_eq!(b.ignored(), 1);
            assert!(b.targets().is_empty());
        }
        let errors = s.status().driver_errors;
        assert_eq!(errors.get("h1"), Some(&1));
        assert_eq!(errors.get("a"), None);

        // Their drivers are still stuck: not asked again (no pile-up) and not waited for.
        for step in 2..=3u64 {
            let took = timed_tick(&s, started);
            assert!(took < DEADLINE / 2, "tick {step} took {took:?}");
            for b in &healthy {
                assert_eq!(b.target(), step * 256 * MIB);
            }
            for (name, b) in names[3..].iter().zip(&hung) {
                assert_eq!(state(&s, name), GuestCondition::Unreachable);
                assert_eq!(b.ignored(), 1, "{name} was asked again");
            }
        }
        assert_eq!(s.status().driver_errors.get("h1"), Some(&1));
    }

    #[test]
    fn a_hung_balloon_write_does_not_stall_the_tick_and_a_recovered_guest_comes_back() {
        let backends = [
            FakeBackend::start(2048 * MIB).unwrap(),
            FakeBackend::start(2048 * MIB).unwrap(),
        ];
        // A driver timeout shorter than the test, so that w's driver gives up on its own.
        let s = shared_with(
            &[("ok", &backends[0]), ("w", &backends[1])],
            Duration::from_millis(1500),
        );
        let started = Instant::now();
        // w answers reads but never takes a target.
        backends[1].set_hang_writes(true);
        let took = timed_tick(&s, started);
        assert!(took < DEADLINE + Duration::from_millis(500), "{took:?}");
        assert_eq!(backends[0].targets(), vec![256 * MIB]);
        assert_eq!(state(&s, "w"), GuestCondition::Ok, "it answered its read");
        assert_eq!(s.status().driver_errors.get("w"), Some(&1));
        // Its driver is stuck in the write: w is unreachable and the tick does not wait.
        let took = timed_tick(&s, started);
        assert!(took < DEADLINE / 2, "{took:?}");
        assert_eq!(state(&s, "w"), GuestCondition::Unreachable);
        assert_eq!(backends[0].targets(), vec![256 * MIB, 512 * MIB]);
        assert_eq!(backends[1].ignored(), 1);
        // w's backend recovers; its driver gives up on the hung write (its own timeout) and w
        // is back within a tick or two after: asked again, read, and given its first step
        // (the write that hung never took effect, so the engine still has w at 0).
        backends[1].set_hang_writes(false);
        let deadline = Instant::now() + Duration::from_secs(10);
        while state(&s, "w") != GuestCondition::Ok {
            assert!(Instant::now() < deadline, "w never came back");
            std::thread::sleep(Duration::from_millis(100));
            let took = timed_tick(&s, started);
            assert!(took < DEADLINE / 2, "{took:?}: w must not be waited for");
        }
        assert_eq!(backends[1].targets(), vec![256 * MIB]);
    }
}
