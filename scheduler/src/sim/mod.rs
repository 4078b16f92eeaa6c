//! `balloon-scheduler simulate SCENARIO.toml`: the same engine and policies against modelled
//! guests in virtual time, for policy tests and for scales far past one machine.
//!
//! A modelled guest has a working set that follows a piecewise-linear trace, some swap, and a
//! balloon that moves at a bounded rate. The balloon can only take memory the guest has free
//! (the Linux driver allocates with __GFP_NORETRY and stalls rather than forcing reclaim); a
//! working set larger than the allocation runs slower (it pages the excess back in at its
//! paging rate every second) and, beyond the swap, is an OOM event. Work completed counts
//! seconds of full-speed progress, as balloon-workload does on real guests.

use crate::actuator::ActuatorConfig;
use crate::config::{GuestConfig, Size};
use crate::drivers::{DriverReading, RawGuestStats};
use crate::engine::Engine;
use crate::model::{GuestSpec, HostState};
use crate::policy::PolicyConfig;
use crate::trace::GuestCondition;
use crate::trace::TraceRecord;
use serde::{Deserialize, Serialize};

const MIB: u64 = 1 << 20;

/// A scenario's guest: a guest entry as in the daemon's config, whose driver is the model.
pub type SimGuest = GuestConfig<ModelledGuest>;

/// What stands in for a guest and its balloon driver (`[guest.driver]` in a scenario).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelledGuest {
    /// Swap space; 0 means a working set beyond the allocation is an OOM at once.
    #[serde(default)]
    pub swap: Option<Size>,
    /// How fast the balloon moves (bytes/s), both ways.
    #[serde(default)]
    pub balloon_rate: Option<Size>,
    /// How fast the guest brings back what it paged out (swap-ins, page cache re-reads),
    /// bytes/s; default `DEFAULT_PAGING_RATE`.
    #[serde(default)]
    pub paging_rate: Option<Size>,
    /// The share of the working set that is page cache (0 to 1, default 0): the guest
    /// counts it as available memory, and it is the first to go when memory is short, at
    /// no cost (re-read from a disk the host caches; the policy_vm guests' data disks).
    #[serde(default)]
    pub file_share: f64,
    /// (time_s, bytes) points; linear between them, constant after the last.
    pub working_set: Vec<(f64, Size)>,
    /// Whether the driver negotiated DEFLATE_ON_OOM (our backend offers it unless told not
    /// to): then a guest out of memory and swap takes pages back from its balloon before its
    /// OOM killer runs, and only with an empty balloon is it an OOM event.
    #[serde(default = "offered")]
    pub deflate_on_oom: bool,
}

fn offered() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub duration_s: f64,
    #[serde(default = "default_tick")]
    pub tick_s: f64,
    pub host_memory: Size,
    /// What the host itself uses besides the guests.
    #[serde(default)]
    pub host_overhead: Option<Size>,
    pub budget: Size,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub actuator: ActuatorConfig,
    #[serde(rename = "guest")]
    pub guests: Vec<SimGuest>,
}

fn default_tick() -> f64 {
    2.0
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GuestOutcome {
    pub name: String,
    /// Seconds of full-speed work done.
    pub work_s: f64,
    pub oom_events: u64,
    /// Seconds its balloon reported stalled.
    pub stalled_s: f64,
    /// Seconds its working set exceeded its allocation (paging or OOM).
    pub starved_s: f64,
    /// Memory its driver took back from the balloon on OOM (DEFLATE_ON_OOM).
    pub deflated_on_oom_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SimOutcome {
    pub policy: String,
    pub guests: Vec<GuestOutcome>,
    pub work_s: f64,
    pub oom_events: u64,
    /// Seconds the guests' allocations together exceeded the budget.
    pub over_budget_s: f64,
    /// When the guests first fit the budget (`None`: never).
    pub fit_s: Option<f64>,
    /// Seconds over the budget after that.
    pub over_budget_after_fit_s: f64,
    /// Largest excess over the budget seen.
    pub max_over_budget_bytes: u64,
    /// Seconds the host had less than 0 bytes available (would have swapped or OOM-killed).
    pub host_short_s: f64,
    #[serde(skip)]
    pub trace: Vec<TraceRecord>,
}

impl SimOutcome {
    /// Whether the guests fit the budget and never left it after.
    pub fn kept_budget(&self) -> bool {
        self.fit_s.is_some() && self.over_budget_after_fit_s == 0.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("reading {0}: {1}")]
    Read(String, std::io::Error),
    #[error("scenario: {0}")]
    Parse(Box<toml::de::Error>),
    #[error("scenario: {0}")]
    Invalid(String),
}

impl Scenario {
    pub fn parse(text: &str) -> Result<Self, SimError> {
        let s: Scenario = toml::from_str(text).map_err(|e| SimError::Parse(Box::new(e)))?;
        if s.tick_s.is_nan() || s.tick_s <= 0.0 || s.duration_s.is_nan() || s.duration_s < 0.0 {
            return Err(SimError::Invalid(
                "tick_s must be > 0 and duration_s >= 0".into(),
            ));
        }
        s.policy.validate().map_err(SimError::Invalid)?;
        for g in &s.guests {
            if !(0.0..=1.0).contains(&g.driver.file_share) {
                return Err(SimError::Invalid(format!(
                    "guest {}: file_share must be in [0, 1]",
                    g.name
                )));
            }
            if g.driver.working_set.is_empty() {
                return Err(SimError::Invalid(format!(
                    "guest {}: empty working_set",
                    g.name
                )));
            }
        }
        let specs: Vec<GuestSpec> = s.guests.iter().map(SimGuest::spec).collect();
        crate::config::check_minimums(s.budget.0, &specs).map_err(SimError::Invalid)?;
        Ok(s)
    }

    pub fn load(path: &std::path::Path) -> Result<Self, SimError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SimError::Read(path.display().to_string(), e))?;
        Self::parse(&text)
    }
}

impl ModelledGuest {
    fn working_set_at(&self, t: f64) -> u64 {
        piecewise_linear(&self.working_set, t)
    }

    /// The largest working set of its schedule.
    pub fn peak(&self) -> u64 {
        self.working_set.iter().map(|p| p.1 .0).max().unwrap_or(0)
    }
}

/// A working-set schedule's size at `t`: linear between its (time_s, bytes) points, the first
/// point's before it, the last one's after. The VM workload (balloon-workload) follows the
/// same schedule with this function, so the simulator and the VM benchmark run one schedule.
pub fn piecewise_linear(pts: &[(f64, Size)], t: f64) -> u64 {
    let Some(first) = pts.first() else { return 0 };
    if t <= first.0 {
        return first.1 .0;
    }
    for w in pts.windows(2) {
        let ((t0, a), (t1, b)) = (w[0], w[1]);
        if t <= t1 {
            let f = if t1 > t0 { (t - t0) / (t1 - t0) } else { 1.0 };
            return (a.0 as f64 + (b.0 as f64 - a.0 as f64) * f) as u64;
        }
    }
    pts[pts.len() - 1].1 .0
}

/// A modelled guest's moving parts.
#[derive(Debug, Clone, Default)]
struct Model {
    target: u64,
    actual: u64,
    swapped_in_pages: u64,
    in_oom: bool,
}

/// The paging rate of the lab's TCG guests, fitted to policy_vm's static run: a guest whose
/// working set is 110-160 MiB over its allocation for 30-70 s got almost no work done.
pub const DEFAULT_PAGING_RATE: u64 = 4 * MIB;

/// The share of full speed of a guest whose working set is `excess` bytes over its memory:
/// every second it touches its whole working set, so the excess is paged back in each time.
fn paging_speed(excess: u64, paging_rate: u64) -> f64 {
    1.0 / (1.0 + excess as f64 / paging_rate.max(1) as f64)
}

/// Free memory a guest keeps that the balloon cannot take (kernel reserves).
const GUEST_FLOOR: u64 = 16 * MIB;

pub fn run(scenario: &Scenario) -> SimOutcome {
    let mut engine = Engine::new(scenario.policy.clone(), scenario.actuator.clone());
    let specs: Vec<GuestSpec> = scenario.guests.iter().map(SimGuest::spec).collect();
    let mut models = vec![Model::default(); specs.len()];
    let mut out = SimOutcome {
        policy: scenario.policy.kind.to_string(),
        guests: scenario
            .guests
            .iter()
            .map(|g| GuestOutcome {
                name: g.name.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let dt = scenario.tick_s;
    let overhead = scenario.host_overhead.map_or(0, |s| s.0);
    let mut t = 0.0;
    while t < scenario.duration_s {
        // The guests move for one tick.
        for (i, g) in scenario.guests.iter().enumerate() {
            let m = &mut models[i];
            let rate = (g.driver.balloon_rate.map_or(200 * MIB, |s| s.0) as f64 * dt) as u64;
            let ws = g.driver.working_set_at(t);
            let file = (ws as f64 * g.driver.file_share) as u64;
            let memory = g.memory.0;
            if m.target > m.actual {
                // The driver's allocations reclaim clean page cache, not anonymous memory.
                let free = (memory - m.actual).saturating_sub(ws - file + GUEST_FLOOR);
                m.actual += rate.min(m.target - m.actual).min(free);
            } else {
                m.actual -= rate.min(m.actual - m.target);
            }
            let o = &mut out.guests[i];
            let swap = g.driver.swap.map_or(0, |s| s.0);
            // Out of memory only once swap and the page cache are spent: the kernel calls the
            // balloon's OOM notifier when reclaim has failed.
            let short = ws.saturating_sub(memory - m.actual + swap + file);
            if g.driver.deflate_on_oom && short > 0 {
                // The driver's OOM notifier gives balloon pages back until the guest fits.
                let back = short.min(m.actual);
                m.actual -= back;
                o.deflated_on_oom_bytes += back;
            }
            let alloc = memory - m.actual;
            if ws <= alloc {
                o.work_s += dt;
                m.in_oom = false;
            } else if ws - alloc <= swap + file {
                let paging_rate = g.driver.paging_rate.map_or(DEFAULT_PAGING_RATE, |s| s.0);
                o.work_s += dt * paging_speed((ws - alloc).saturating_sub(file), paging_rate);
                o.starved_s += dt;
                m.swapped_in_pages += (ws - alloc) / 4096;
                m.in_oom = false;
            } else {
                o.starved_s += dt;
                if !m.in_oom {
                    o.oom_events += 1;
                    m.in_oom = true;
                }
            }
        }
        let total_alloc: u64 = specs
            .iter()
            .zip(&models)
            .map(|(s, m)| s.memory_bytes - m.actual)
            .sum();
        if total_alloc > scenario.budget.0 {
            out.over_budget_s += dt;
            if out.fit_s.is_some() {
                out.over_budget_after_fit_s += dt;
            }
            out.max_over_budget_bytes = out
                .max_over_budget_bytes
                .max(total_alloc - scenario.budget.0);
        } else if out.fit_s.is_none() {
            out.fit_s = Some(t);
        }
        let host_used = total_alloc + overhead;
        if host_used > scenario.host_memory.0 {
            out.host_short_s += dt;
        }
        let host = HostState {
            total_bytes: scenario.host_memory.0,
            available_bytes: scenario.host_memory.0.saturating_sub(host_used),
            budget_bytes: scenario.budget.0,
        };
        let inputs: Vec<(GuestSpec, Option<DriverReading>)> = scenario
            .guests
            .iter()
            .zip(&specs)
            .zip(&models)
            .map(|((g, s), m)| {
                let alloc = s.memory_bytes - m.actual;
                let ws = g.driver.working_set_at(t);
                // The page cache still held counts as available, as MemAvailable has it.
                let file = (ws as f64 * g.driver.file_share) as u64;
                let anon = ws - file;
                let reading = DriverReading {
                    target_bytes: Some(m.target),
                    actual_bytes: m.actual,
                    stats: Some(RawGuestStats {
                        available_bytes: alloc.saturating_sub(anon),
                        total_bytes: alloc,
                        swap_in: m.swapped_in_pages,
                        major_faults: m.swapped_in_pages,
                        age_seconds: Some(0.0),
                    }),
                    split: None,
                    size_disputed: false,
                };
                (s.clone(), Some(reading))
            })
            .collect();
        let tick = engine.tick(t, host, &inputs);
        for (i, send) in tick.send.iter().enumerate() {
            if let Some(b) = send {
                models[i].target = (*b).min(specs[i].memory_bytes);
                engine.sent(&specs[i].name, models[i].target);
            }
            if tick.trace.guests[i].state == GuestCondition::Stalled {
                out.guests[i].stalled_s += dt;
            }
        }
        out.trace.push(tick.trace);
        t += dt;
    }
    out.work_s = out.guests.iter().map(|g| g.work_s).sum();
    out.oom_events = out.guests.iter().map(|g| g.oom_events).sum();
    out
}

/// Policies ranked by the work their guests did, those that kept the budget after their
/// first fit ahead of those that did not (work done by breaking the budget is no win); the
/// latter are marked. `runs` is (policy, work, kept the budget).
pub fn rank(runs: &[(String, f64, bool)]) -> Vec<String> {
    let mut sorted: Vec<&(String, f64, bool)> = runs.iter().collect();
    sorted.sort_by(|a, b| b.2.cmp(&a.2).then(b.1.total_cmp(&a.1)));
    sorted
        .iter()
        .map(|(name, _, kept)| {
            if *kept {
                name.clone()
            } else {
                format!("{name} (over budget)")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
