//! Host free-memory levels (ESX: high, soft, hard, low) with hysteresis: dropping to a worse
//! level happens at its threshold, climbing back needs the better level's threshold plus a
//! margin, so a host hovering at a threshold does not flip every tick.

use super::PolicyConfig;
use crate::model::HostState;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostLevel {
    #[default]
    High,
    Soft,
    Hard,
    Low,
}

impl HostLevel {
    /// Best to worst.
    pub const ALL: [HostLevel; 4] = [
        HostLevel::High,
        HostLevel::Soft,
        HostLevel::Hard,
        HostLevel::Low,
    ];
}

impl std::fmt::Display for HostLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostLevel::High => "high",
            HostLevel::Soft => "soft",
            HostLevel::Hard => "hard",
            HostLevel::Low => "low",
        })
    }
}

/// Hysteresis margin, as a fraction of host memory.
const MARGIN: f64 = 0.01;

#[derive(Debug, Clone, Default)]
pub struct HostLevelTracker {
    pub level: HostLevel,
}

impl HostLevelTracker {
    /// The host's free fraction (MemAvailable over total).
    pub fn free_fraction(host: &HostState) -> f64 {
        if host.total_bytes == 0 {
            return 1.0;
        }
        host.available_bytes as f64 / host.total_bytes as f64
    }

    pub fn update(&mut self, config: &PolicyConfig, host: &HostState) -> HostLevel {
        let free = Self::free_fraction(host);
        let threshold = |l: HostLevel| match l {
            HostLevel::High => config.high_free,
            HostLevel::Soft => config.soft_free,
            HostLevel::Hard => config.hard_free,
            HostLevel::Low => config.low_free,
        };
        // The level the free fraction alone gives.
        let raw = if free >= config.high_free {
            HostLevel::High
        } else if free >= config.soft_free {
            HostLevel::Soft
        } else if free >= config.hard_free {
            HostLevel::Hard
        } else {
            HostLevel::Low
        };
        if raw > self.level {
            self.level = raw;
        } else if raw < self.level {
            // Climb one level at a time, and only with the margin.
            let better = match self.level {
                HostLevel::Low => HostLevel::Hard,
                HostLevel::Hard => HostLevel::Soft,
                HostLevel::Soft | HostLevel::High => HostLevel::High,
            };
            if free >= threshold(better) + MARGIN {
                self.level = better;
            }
        }
        self.level
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(free_pct: f64) -> HostState {
        HostState {
            total_bytes: 100 << 30,
            available_bytes: ((100u64 << 30) as f64 * free_pct / 100.0) as u64,
            budget_bytes: 90 << 30,
        }
    }

    #[test]
    fn levels_fall_at_thresholds_and_climb_with_hysteresis() {
        let c = PolicyConfig::default();
        let mut t = HostLevelTracker::default();
        let steps = [
            (10.0, HostLevel::High),
            (5.0, HostLevel::Soft),
            (6.5, HostLevel::Soft), // not 7% yet
            (7.5, HostLevel::High),
            (0.5, HostLevel::Low),
            (8.0, HostLevel::Hard), // one level at a time
            (8.0, HostLevel::Soft),
            (8.0, HostLevel::High),
            (3.0, HostLevel::Hard),
            (3.9, HostLevel::Hard),
            (5.1, HostLevel::Soft),
        ];
        for (i, (free, want)) in steps.iter().enumerate() {
            assert_eq!(t.update(&c, &host(*free)), *want, "step {i} at {free}%");
        }
    }
}
