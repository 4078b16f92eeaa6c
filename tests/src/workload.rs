//! What balloon-workload (the guest workload of the policy_vm benchmark) reports, in one place
//! for the program in the guest and the harness that reads it.

use serde::{Deserialize, Serialize};

/// Where the mini image's workload writes its status (a tmpfs, read with `cat`).
pub const STATUS_PATH: &str = "/run/workload.json";

/// The workload's counters, rewritten after every pass. They carry over a restart (an OOM
/// kill, after which its supervisor starts it again): the schedule's clock and the work done
/// go on from the file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadStatus {
    /// CLOCK_MONOTONIC seconds at the first start: time 0 of the schedule.
    pub epoch_s: f64,
    /// CLOCK_MONOTONIC seconds of this write.
    pub updated_s: f64,
    /// Seconds of full-speed work: one period per completed pass over the working set.
    pub work_s: f64,
    pub passes: u64,
    /// Passes that took longer than a period (the guest reclaimed or swapped under them).
    pub slow_passes: u64,
    /// Starts after the first: each followed a kill or an error (its supervisor starts it
    /// again either way).
    pub restarts: u64,
    /// The working set of the last pass.
    pub size_bytes: u64,
    /// How long the last pass took.
    pub last_pass_s: f64,
}
