//! `--trace FILE`: one JSON line per tick with its inputs and decisions, for `balloonctl plot`
//! and for checking a run after the fact.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceGuest {
    pub name: String,
    pub memory_bytes: u64,
    /// Memory the guest may use (memory minus the balloon's actual size).
    pub allocation_bytes: u64,
    /// Used memory (allocation minus available), when statistics exist.
    pub used_bytes: Option<u64>,
    pub available_bytes: Option<u64>,
    pub balloon_target_bytes: u64,
    pub balloon_actual_bytes: u64,
    /// The allocation the policy chose this tick (before rate limiting).
    pub decided_allocation_bytes: u64,
    /// The balloon target sent this tick, if any was sent.
    pub sent_balloon_bytes: Option<u64>,
    /// ok, pinned, stalled, unreachable.
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceRecord {
    pub time_s: f64,
    pub policy: String,
    /// high, soft, hard, low.
    pub host_state: String,
    pub host_total_bytes: u64,
    pub host_available_bytes: u64,
    pub budget_bytes: u64,
    /// The sum of the guests' minimums.
    #[serde(default)]
    pub minimums_bytes: u64,
    /// The budget cannot hold the minimums: every guest is held at its minimum.
    #[serde(default)]
    pub budget_infeasible: bool,
    pub guests: Vec<TraceGuest>,
}
