//! `--trace FILE`: one JSON line per tick with its inputs and decisions, for `balloonctl plot`
//! and for checking a run after the fact.

use crate::policy::host_level::HostLevel;
use crate::policy::PolicyKind;
use serde::{Deserialize, Serialize};

/// How a guest stands in a tick, as the trace, the table and the metrics show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestCondition {
    /// Reachable and following the policy.
    #[default]
    Ok,
    /// An operator pinned its allocation.
    Pinned,
    /// Its balloon stopped moving toward the target.
    Stalled,
    /// Its driver did not answer this tick.
    Unreachable,
}

impl std::fmt::Display for GuestCondition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GuestCondition::Ok => "ok",
            GuestCondition::Pinned => "pinned",
            GuestCondition::Stalled => "stalled",
            GuestCondition::Unreachable => "unreachable",
        })
    }
}

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
    pub state: GuestCondition,
    /// Our backend's driver and app shares of the balloon, their progress and stalls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon_split: Option<crate::drivers::split::BalloonSplit>,
    /// The guest's word for its size disagreed with the host's view, or its reading was out of
    /// range: it was budgeted by the host's view (see `DriverReading::size_disputed`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub size_disputed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceRecord {
    pub time_s: f64,
    pub policy: PolicyKind,
    pub host_state: HostLevel,
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
