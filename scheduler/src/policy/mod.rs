//! Policies: pure functions from a snapshot of the host and guests to the allocation each guest
//! should have (memory it may use). The daemon and the simulator run the same code; rate
//! limiting and stall handling come after, in `actuator`.

pub mod host_level;
pub mod mom;
pub mod pressure;
pub mod proxmox;
pub mod shares;

use crate::model::Snapshot;
pub use host_level::{HostLevel, HostLevelTracker};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Fixed allocations (each guest's `static` size, else its max).
    Static,
    /// Proportional share with an idle memory tax (VMware ESX).
    Shares,
    /// Reactive to host and guest pressure (oVirt MoM style, ESX host levels).
    Pressure,
    /// oVirt MoM's shipped balloon policy, for comparisons.
    Mom,
    /// Proxmox VE's auto-ballooning (pvestatd), for comparisons.
    Proxmox,
}

impl PolicyKind {
    /// Every policy, the baselines first (the order the benchmarks run them in).
    pub const ALL: [PolicyKind; 5] = [
        PolicyKind::Static,
        PolicyKind::Mom,
        PolicyKind::Proxmox,
        PolicyKind::Shares,
        PolicyKind::Pressure,
    ];
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PolicyKind::Static => "static",
            PolicyKind::Shares => "shares",
            PolicyKind::Pressure => "pressure",
            PolicyKind::Mom => "mom",
            PolicyKind::Proxmox => "proxmox",
        })
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PolicyKind::ALL
            .into_iter()
            .find(|k| k.to_string() == s)
            .ok_or_else(|| {
                let names: Vec<String> = PolicyKind::ALL.iter().map(|k| k.to_string()).collect();
                format!("unknown policy {s:?} ({})", names.join(", "))
            })
    }
}

/// The knobs of every policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    pub kind: PolicyKind,
    /// `shares`: the idle memory tax rate (ESX's default 0.75: an idle page costs 4 active).
    pub tax_rate: f64,
    /// Memory every guest keeps above what it uses, so it is not squeezed to nothing free.
    pub guest_reserve_bytes: u64,
    /// Host free-memory levels as fractions of host memory (ESX: 6%, 4%, 2%, 1%).
    pub high_free: f64,
    pub soft_free: f64,
    pub hard_free: f64,
    pub low_free: f64,
    /// `pressure`: a guest whose available memory is under this fraction of its allocation,
    /// or that swaps in or takes major faults, is under pressure.
    pub guest_pressure_free: f64,
    /// `pressure`: major faults per tick above which a guest counts as under pressure.
    pub major_faults_per_tick: u64,
    /// `mom`: host free fraction below which it shrinks guests, and its step (of guest size).
    pub mom_pressure_threshold: f64,
    pub mom_step: f64,
    /// `mom`: seconds between its decisions.
    pub mom_interval_s: f64,
    /// `proxmox`: the share of host memory (here: of the budget) it aims to have in use
    /// (pvestatd: 80%), the most one guest moves per decision, and seconds between decisions.
    pub proxmox_target_used: f64,
    pub proxmox_max_change_bytes: u64,
    pub proxmox_interval_s: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            kind: PolicyKind::Shares,
            tax_rate: 0.75,
            guest_reserve_bytes: 64 << 20,
            high_free: 0.06,
            soft_free: 0.04,
            hard_free: 0.02,
            low_free: 0.01,
            guest_pressure_free: 0.10,
            major_faults_per_tick: 100,
            mom_pressure_threshold: 0.20,
            mom_step: 0.05,
            mom_interval_s: 10.0,
            proxmox_target_used: 0.80,
            proxmox_max_change_bytes: 100 << 20,
            proxmox_interval_s: 10.0,
        }
    }
}

impl PolicyConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..1.0).contains(&self.tax_rate) {
            return Err(format!("tax_rate {} must be in [0, 1)", self.tax_rate));
        }
        let levels = [
            self.high_free,
            self.soft_free,
            self.hard_free,
            self.low_free,
        ];
        if levels.iter().any(|l| !(0.0..1.0).contains(l)) || levels.windows(2).any(|w| w[0] < w[1])
        {
            return Err("free levels must satisfy 1 > high >= soft >= hard >= low >= 0".into());
        }
        if !(0.0..=1.0).contains(&self.mom_step) || self.mom_interval_s < 0.0 {
            return Err("mom_step must be in [0, 1] and mom_interval_s >= 0".into());
        }
        if !(0.0..=1.0).contains(&self.proxmox_target_used) || self.proxmox_interval_s < 0.0 {
            return Err("proxmox_target_used must be in [0, 1] and proxmox_interval_s >= 0".into());
        }
        Ok(())
    }
}

/// State a policy keeps between ticks.
#[derive(Debug, Clone, Default)]
pub struct PolicyState {
    pub host_level: HostLevelTracker,
    /// `mom`: when it last acted.
    pub mom_last_s: Option<f64>,
    /// `proxmox`: when it last acted.
    pub proxmox_last_s: Option<f64>,
}

/// Whether a baseline that decides every `interval_s` acts at `now_s`; records it if so.
pub(crate) fn due(last_s: &mut Option<f64>, now_s: f64, interval_s: f64) -> bool {
    if last_s.is_some_and(|t| now_s - t < interval_s) {
        return false;
    }
    *last_s = Some(now_s);
    true
}

/// The host's free fraction as the baselines (mom, proxmox) see it. They were written for a
/// host whose RAM is the guests' to share; here that RAM is the budget, so the budget's unused
/// share counts as free memory too, and the lower of the two is taken.
pub(crate) fn baseline_free_fraction(snap: &Snapshot) -> f64 {
    let host = HostLevelTracker::free_fraction(&snap.host);
    let budget = snap.host.budget_bytes;
    if budget == 0 {
        return host;
    }
    let allocated: u64 = snap.guests.iter().map(planned).sum();
    let in_budget = budget.saturating_sub(allocated) as f64 / budget as f64;
    host.min(in_budget)
}

/// Memory the guest asked to have: its size minus the balloon target (what it will have once
/// the balloon gets there), so a slow balloon is not pushed twice.
pub(crate) fn planned(g: &crate::model::GuestState) -> u64 {
    g.spec.memory_bytes.saturating_sub(g.balloon_target_bytes)
}

/// Whether a guest shows memory pressure: little available memory, swap-ins, major faults.
pub fn under_pressure(config: &PolicyConfig, g: &crate::model::GuestState) -> bool {
    let Some(s) = g.stats else { return false };
    let alloc = g.allocation_bytes() as f64;
    (s.available_bytes as f64) < config.guest_pressure_free * alloc
        || s.swap_in_delta > 0
        || s.major_faults_delta > config.major_faults_per_tick
}

/// How much a guest under pressure grows in one tick, from an allocation of `alloc`. Its used
/// memory says nothing of its demand then (it cannot use more than it has), so growth is a
/// quarter of what it has: a working set that doubles in a few seconds is followed within a
/// few ticks, which the actuator's step then bounds.
pub fn pressure_growth(config: &PolicyConfig, alloc: u64) -> u64 {
    config.guest_reserve_bytes.max(alloc / 4)
}

/// The allocation each guest (in snapshot order) should have. Pinned guests keep theirs.
pub fn decide(config: &PolicyConfig, snap: &Snapshot, state: &mut PolicyState) -> Vec<u64> {
    let level = state.host_level.update(config, &snap.host);
    let mut out = match config.kind {
        PolicyKind::Static => snap
            .guests
            .iter()
            .map(|g| {
                let (lo, hi) = g.bounds();
                g.spec.static_bytes.unwrap_or(hi).clamp(lo, hi)
            })
            .collect(),
        PolicyKind::Shares => shares::allocate(config, snap),
        PolicyKind::Pressure => pressure::allocate(config, snap, level),
        PolicyKind::Mom => mom::allocate(config, snap, state),
        PolicyKind::Proxmox => proxmox::allocate(config, snap, state),
    };
    for (alloc, g) in out.iter_mut().zip(&snap.guests) {
        if g.pinned || !g.reachable {
            // Keep what it has been asked for; an unreachable guest is reported, not guessed.
            *alloc = g.spec.memory_bytes.saturating_sub(g.balloon_target_bytes);
        }
    }
    out
}
