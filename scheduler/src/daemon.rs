//! The live scheduler: every tick, read the host and every guest's driver, run the engine, send
//! the new balloon targets, write the trace, and publish the status for the API and metrics.

use crate::api::{ApiReply, ApiRequest, SchedulerStatus};
use crate::config::Config;
use crate::drivers::{BalloonDriver, DriverReading};
use crate::engine::Engine;
use crate::model::GuestSpec;
use crate::policy::PolicyKind;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub struct Guest {
    pub spec: GuestSpec,
    pub driver: Mutex<Box<dyn BalloonDriver>>,
}

/// State shared by the tick loop, the API and the metrics.
pub struct Shared {
    pub engine: Mutex<Engine>,
    pub status: Mutex<SchedulerStatus>,
    /// Notified after every tick (for `watch`) and on shutdown.
    pub ticked: Condvar,
    pub stop: AtomicBool,
    pub guests: Vec<Guest>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn new(engine: Engine, guests: Vec<Guest>) -> Arc<Self> {
        let drivers = guests
            .iter()
            .map(|g| (g.spec.name.clone(), lock(&g.driver).describe()))
            .collect();
        Arc::new(Shared {
            engine: Mutex::new(engine),
            status: Mutex::new(SchedulerStatus {
                drivers,
                ..Default::default()
            }),
            ticked: Condvar::new(),
            stop: AtomicBool::new(false),
            guests,
        })
    }

    pub fn status(&self) -> SchedulerStatus {
        lock(&self.status).clone()
    }

    fn guest(&self, name: &str) -> Result<&Guest, String> {
        self.guests
            .iter()
            .find(|g| g.spec.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.guests.iter().map(|g| g.spec.name.as_str()).collect();
                format!("no guest {name:?} (guests: {})", names.join(", "))
            })
    }

    /// Handles one API request (except `watch`, which the server streams).
    pub fn handle(&self, request: ApiRequest) -> ApiReply {
        let result = match request {
            ApiRequest::Status | ApiRequest::Watch => Ok(()),
            ApiRequest::Set {
                guest,
                memory_bytes,
            } => self.guest(&guest).and_then(|g| {
                let (lo, hi) = (g.spec.min_bytes, g.spec.max_bytes.min(g.spec.memory_bytes));
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
                    .unwrap_or(g.spec.max_bytes);
                lock(&self.engine).pin(&guest, Some(alloc));
            }),
            ApiRequest::Unpin { guest } => self.guest(&guest).map(|_| {
                lock(&self.engine).pin(&guest, None);
            }),
            ApiRequest::PolicyShow => return ApiReply::policy(lock(&self.engine).policy.clone()),
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
            .filter_map(|g| {
                engine
                    .pinned(&g.spec.name)
                    .map(|p| (g.spec.name.clone(), p))
            })
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

/// Runs one tick: returns the trace record's JSON line.
pub fn tick(shared: &Shared, budget: Budget, started: Instant) -> String {
    let now = started.elapsed().as_secs_f64();
    let mut readings: Vec<(GuestSpec, Option<DriverReading>)> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    for g in &shared.guests {
        let reading = match lock(&g.driver).read() {
            Ok(r) => Some(r),
            Err(e) => {
                log::warn!("{}: {e}", g.spec.name);
                errors.push(g.spec.name.clone());
                None
            }
        };
        readings.push((g.spec.clone(), reading));
    }
    let allocated: u64 = readings
        .iter()
        .filter_map(|(s, r)| r.map(|r| s.memory_bytes.saturating_sub(r.actual_bytes)))
        .sum();
    let host = match crate::host::read_host(budget.fixed, budget.reserve, allocated) {
        Ok(h) => h,
        Err(e) => {
            log::error!("reading the host's memory: {e}");
            return String::new();
        }
    };
    let outcome = lock(&shared.engine).tick(now, host, &readings);
    for (g, send) in shared.guests.iter().zip(&outcome.send) {
        let Some(balloon) = send else { continue };
        match lock(&g.driver).set_balloon(*balloon) {
            Ok(()) => {
                log::debug!("{}: balloon {} MiB", g.spec.name, balloon >> 20);
                lock(&shared.engine).sent(&g.spec.name, *balloon);
            }
            Err(e) => {
                log::warn!("{}: setting the balloon: {e}", g.spec.name);
                errors.push(g.spec.name.clone());
            }
        }
    }
    let line = serde_json::to_string(&outcome.trace).unwrap_or_default();
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
    line
}

/// The tick loop, until `shared.stop`.
pub fn run_loop(shared: Arc<Shared>, tick_seconds: f64, budget: Budget, trace: Option<PathBuf>) {
    let mut trace_file = trace.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(|e| log::error!("trace {}: {e}", p.display()))
            .ok()
    });
    let started = Instant::now();
    let period = Duration::from_secs_f64(tick_seconds);
    let mut next = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        let line = tick(&shared, budget, started);
        if let (Some(f), false) = (trace_file.as_mut(), line.is_empty()) {
            if let Err(e) = writeln!(f, "{line}") {
                log::error!("writing the trace: {e}");
            }
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
