//! What the scheduler knows about guests and the host at one tick, and what it decides. The
//! policies are pure functions from a `Snapshot` to `Decision`s, so the daemon and the simulator
//! run the same code.
//!
//! Sizes are bytes. A guest's *allocation* is the memory it may use: its configured memory size
//! minus its balloon. Policies decide allocations; drivers move balloons.

use serde::{Deserialize, Serialize};

/// One guest as configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestSpec {
    pub name: String,
    /// Memory the guest was started with (its allocation with an empty balloon).
    pub memory_bytes: u64,
    /// Never give the guest less than this.
    pub min_bytes: u64,
    /// Never give the guest more than this (at most `memory_bytes`).
    pub max_bytes: u64,
    /// Relative weight in the `shares` policy.
    pub shares: u64,
    /// The `static` policy's allocation (defaults to `max_bytes`).
    pub static_bytes: Option<u64>,
}

impl GuestSpec {
    /// A guest from its configured sizes: no `min` means 0, no `max` (or one above the memory
    /// size) means the memory size.
    pub fn from_sizes(
        name: &str,
        memory_bytes: u64,
        min: Option<u64>,
        max: Option<u64>,
        shares: u64,
        static_bytes: Option<u64>,
    ) -> Self {
        GuestSpec {
            name: name.to_string(),
            memory_bytes,
            min_bytes: min.unwrap_or(0),
            max_bytes: max.map_or(memory_bytes, |m| m.min(memory_bytes)),
            shares,
            static_bytes,
        }
    }
}

impl GuestSpec {
    /// The least memory the guest may be given: its `min`, capped at its max and memory size.
    pub fn min_allocation(&self) -> u64 {
        self.min_bytes.min(self.max_bytes.min(self.memory_bytes))
    }
}

/// What a guest's statistics say (virtio-balloon stats or the guest app's PSI), when known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestMemoryStats {
    /// MemAvailable as the guest sees it (free plus easily reclaimable).
    pub available_bytes: u64,
    /// Total memory the guest sees (shrinks with the balloon unless DEFLATE_ON_OOM).
    pub total_bytes: u64,
    /// Swap-ins since the previous tick (pages).
    pub swap_in_delta: u64,
    /// Major faults since the previous tick.
    pub major_faults_delta: u64,
}

/// One guest as observed at a tick.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestState {
    pub spec: GuestSpec,
    /// The driver answered this tick.
    pub reachable: bool,
    /// Balloon size asked for and reached, in bytes.
    pub balloon_target_bytes: u64,
    pub balloon_actual_bytes: u64,
    pub stats: Option<GuestMemoryStats>,
    /// Excluded from policy (an operator set its size by hand).
    pub pinned: bool,
    /// The balloon could not go further: no larger balloon than this until the hold expires.
    pub balloon_limit_bytes: Option<u64>,
}

impl GuestState {
    /// Memory the guest may use now.
    pub fn allocation_bytes(&self) -> u64 {
        self.spec
            .memory_bytes
            .saturating_sub(self.balloon_actual_bytes)
    }

    /// Memory the guest actively uses: what it holds minus what it could give up easily.
    /// Without statistics, all of its allocation counts as used.
    pub fn used_bytes(&self) -> u64 {
        match self.stats {
            Some(s) => {
                let total = if s.total_bytes > 0 {
                    s.total_bytes.min(self.allocation_bytes())
                } else {
                    self.allocation_bytes()
                };
                total.saturating_sub(s.available_bytes)
            }
            None => self.allocation_bytes(),
        }
    }

    /// Lower and upper bounds for the allocation, from min/max and the stall limit.
    pub fn bounds(&self) -> (u64, u64) {
        let max = self.spec.max_bytes.min(self.spec.memory_bytes);
        let mut min = self.spec.min_bytes.min(max);
        if let Some(limit) = self.balloon_limit_bytes {
            min = min
                .max(self.spec.memory_bytes.saturating_sub(limit))
                .min(max);
        }
        (min, max)
    }
}

/// The host at a tick.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct HostState {
    pub total_bytes: u64,
    /// MemAvailable.
    pub available_bytes: u64,
    /// Memory the guests together may use (the configured budget).
    pub budget_bytes: u64,
}

/// Everything a policy sees.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Seconds since the scheduler started (virtual time in the simulator).
    pub time_s: f64,
    pub host: HostState,
    pub guests: Vec<GuestState>,
}

impl Snapshot {
    pub fn total_allocation(&self) -> u64 {
        self.guests.iter().map(GuestState::allocation_bytes).sum()
    }
}
