//! Guests and snapshots for the policy and actuator tests, sizes in MiB.

use crate::model::{GuestMemoryStats, GuestSpec, GuestState, HostState, Snapshot};

pub const MIB: u64 = 1 << 20;

/// A reachable guest of `memory_mib` with an empty balloon, no statistics, no minimum, its
/// memory as its maximum and 1000 shares.
pub fn guest(name: &str, memory_mib: u64) -> GuestState {
    GuestState {
        spec: GuestSpec {
            name: name.into(),
            memory_bytes: memory_mib * MIB,
            min_bytes: 0,
            max_bytes: memory_mib * MIB,
            shares: 1000,
            static_bytes: None,
        },
        reachable: true,
        balloon_target_bytes: 0,
        balloon_actual_bytes: 0,
        stats: None,
        pinned: false,
        balloon_limit_bytes: None,
    }
}

impl GuestState {
    pub fn bounded(mut self, min_mib: u64, max_mib: u64) -> Self {
        self.spec.min_bytes = min_mib * MIB;
        self.spec.max_bytes = max_mib * MIB;
        self
    }

    pub fn shares(mut self, shares: u64) -> Self {
        self.spec.shares = shares;
        self
    }

    pub fn balloon(mut self, target_mib: u64, actual_mib: u64) -> Self {
        self.balloon_target_bytes = target_mib * MIB;
        self.balloon_actual_bytes = actual_mib * MIB;
        self
    }

    /// Statistics: `available_mib` of MemAvailable, MemTotal the allocation (no
    /// DEFLATE_ON_OOM). Set the balloon first.
    pub fn available(mut self, available_mib: u64) -> Self {
        self.stats = Some(GuestMemoryStats {
            available_bytes: available_mib * MIB,
            total_bytes: self.allocation_bytes(),
            ..Default::default()
        });
        self
    }
}

pub fn snapshot(
    total_mib: u64,
    available_mib: u64,
    budget_mib: u64,
    guests: Vec<GuestState>,
) -> Snapshot {
    Snapshot {
        time_s: 0.0,
        host: HostState {
            total_bytes: total_mib * MIB,
            available_bytes: available_mib * MIB,
            budget_bytes: budget_mib * MIB,
        },
        guests,
    }
}
