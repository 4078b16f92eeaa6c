//! From a policy's decision to the balloon target actually sent: per-guest rate limiting (the
//! host-side half of the patent's adaptive rate control) and stall handling. A balloon that
//! stops moving toward its target (the guest cannot give more) is not pushed forever: as
//! ChromeOS's concierge does, when inflation runs below a rate for a while, the balloon is
//! deflated a little and held at what the guest could give, and the guest is reported stalled.

use crate::model::GuestState;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActuatorConfig {
    /// Largest change of one guest's balloon target per tick, in bytes.
    pub max_step_bytes: u64,
    /// Inflation slower than this (bytes/s) over `stall_window_s` is a stall.
    pub stall_rate_bytes_per_s: u64,
    pub stall_window_s: f64,
    /// On a stall, deflate this much below what the balloon reached...
    pub stall_backoff_bytes: u64,
    /// ...and hold the balloon there for this long.
    pub stall_hold_s: f64,
    /// After the balloon changed hands, no stall is judged for this long. The app does not
    /// inflate while the guest's PSI "some avg10" is over its threshold (10%), and that
    /// average decays with a 10 s time constant: a guest that was just reclaiming hard to fill
    /// the old holder's part reads as under pressure for up to 10 s x ln(100/10) = 23 s after
    /// it has had that part back. The default covers that and one stall window.
    pub handover_grace_s: f64,
}

impl Default for ActuatorConfig {
    fn default() -> Self {
        ActuatorConfig {
            max_step_bytes: 256 << 20,
            stall_rate_bytes_per_s: 15_000_000,
            stall_window_s: 4.0,
            stall_backoff_bytes: 128 << 20,
            stall_hold_s: 60.0,
            handover_grace_s: 30.0,
        }
    }
}

/// Per-guest state of the actuator.
#[derive(Debug, Clone, Default)]
pub struct GuestActuator {
    /// (time, balloon actual) while inflating, oldest first.
    progress: VecDeque<(f64, u64)>,
    /// After a stall: the largest balloon allowed, and until when.
    pub limit: Option<(u64, f64)>,
    /// When the balloon last changed hands.
    handed_over_at: Option<f64>,
}

/// What the actuator decided for one guest this tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actuation {
    /// The balloon target to send, if it changes.
    pub send_bytes: Option<u64>,
    pub stalled: bool,
}

impl GuestActuator {
    /// The balloon changed hands at `now` (our backend's driver to its app, or back): the new
    /// holder starts from nothing, so its progress is judged afresh, and only once
    /// `handover_grace_s` has passed, not from the old holder's.
    pub fn restart_progress(&mut self, now: f64) {
        self.progress.clear();
        self.handed_over_at = Some(now);
    }

    /// The stall limit in force at `now`, for the policy's bounds.
    pub fn limit_at(&mut self, now: f64) -> Option<u64> {
        match self.limit {
            Some((_, until)) if now >= until => {
                self.limit = None;
                None
            }
            Some((bytes, _)) => Some(bytes),
            None => None,
        }
    }

    pub fn plan(
        &mut self,
        config: &ActuatorConfig,
        guest: &GuestState,
        decided_allocation: u64,
        now: f64,
    ) -> Actuation {
        let memory = guest.spec.memory_bytes;
        let current = guest.balloon_target_bytes;
        let actual = guest.balloon_actual_bytes;
        let in_grace = self
            .handed_over_at
            .is_some_and(|at| now - at < config.handover_grace_s);
        // Stall detection while the balloon is below its target.
        if actual + (1 << 20) < current {
            self.progress.push_back((now, actual));
            while self
                .progress
                .front()
                .is_some_and(|(t, _)| now - t > config.stall_window_s)
            {
                self.progress.pop_front();
            }
            if let Some(&(t0, a0)) = self.progress.front() {
                let span = now - t0;
                let rate = actual.saturating_sub(a0) as f64 / span.max(1e-9);
                if !in_grace
                    && span >= config.stall_window_s * 0.99
                    && rate < config.stall_rate_bytes_per_s as f64
                {
                    let settle = actual.saturating_sub(config.stall_backoff_bytes);
                    self.limit = Some((settle, now + config.stall_hold_s));
                    self.progress.clear();
                    log::warn!(
                        "{}: balloon stalled at {} MiB (target {} MiB); settling at {} MiB",
                        guest.spec.name,
                        actual >> 20,
                        current >> 20,
                        settle >> 20
                    );
                    return Actuation {
                        send_bytes: Some(settle),
                        stalled: true,
                    };
                }
            }
        } else {
            self.progress.clear();
        }
        let mut wanted = memory.saturating_sub(decided_allocation);
        if let Some((limit, _)) = self.limit {
            wanted = wanted.min(limit);
        }
        let step = config.max_step_bytes.max(1);
        let next = if wanted > current {
            current + (wanted - current).min(step)
        } else {
            current - (current - wanted).min(step)
        };
        Actuation {
            send_bytes: (next != current).then_some(next),
            stalled: self.limit.is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::MIB;

    /// A 2 GiB guest whose balloon is asked for `target` MiB and holds `actual` MiB.
    fn guest(target: u64, actual: u64) -> GuestState {
        crate::fixtures::guest("g", 2048).balloon(target, actual)
    }

    #[test]
    fn steps_are_rate_limited_both_ways() {
        let c = ActuatorConfig::default();
        let mut a = GuestActuator::default();
        // Decided allocation 1 GiB of 2 GiB: balloon 1 GiB, reached in 256 MiB steps.
        let plan = a.plan(&c, &guest(0, 0), 1024 * MIB, 0.0);
        assert_eq!(plan.send_bytes, Some(256 * MIB));
        let plan = a.plan(&c, &guest(900, 900), 1024 * MIB, 1.0);
        assert_eq!(plan.send_bytes, Some(1024 * MIB));
        let plan = a.plan(&c, &guest(1024, 1024), 1024 * MIB, 2.0);
        assert_eq!(plan.send_bytes, None);
        let plan = a.plan(&c, &guest(1024, 1024), 2048 * MIB, 3.0);
        assert_eq!(plan.send_bytes, Some(768 * MIB));
    }

    #[test]
    fn a_stalled_balloon_settles_and_is_held() {
        let c = ActuatorConfig::default();
        let mut a = GuestActuator::default();
        // Target 1 GiB, stuck at 600 MiB for 4 s.
        for t in 0..4 {
            let plan = a.plan(&c, &guest(1024, 600), 1024 * MIB, t as f64);
            assert!(!plan.stalled, "tick {t}");
        }
        let plan = a.plan(&c, &guest(1024, 600), 1024 * MIB, 4.0);
        assert!(plan.stalled);
        assert_eq!(plan.send_bytes, Some(472 * MIB));
        // Held: the policy asking for more does not push past the settled size.
        let plan = a.plan(&c, &guest(472, 472), 0, 5.0);
        assert_eq!(plan.send_bytes, None);
        assert!(plan.stalled);
        assert_eq!(a.limit_at(30.0), Some(472 * MIB));
        // After the hold, it may try again.
        assert_eq!(a.limit_at(70.0), None);
        let plan = a.plan(&c, &guest(472, 472), 0, 70.0);
        assert_eq!(plan.send_bytes, Some(728 * MIB));
    }

    #[test]
    fn after_a_hand_over_the_new_holder_has_a_grace_before_a_stall_is_judged() {
        let c = ActuatorConfig::default();
        let mut a = GuestActuator::default();
        // The driver held 624 MiB of a 624 MiB target, then went away: its part fell to zero
        // and the app was handed the whole target at t = 10.
        a.plan(&c, &guest(624, 624), 1424 * MIB, 9.0);
        a.restart_progress(10.0);
        // The guest reads as under pressure for a while (PSI's 10 s average): the app holds
        // nothing for 25 s, and that is no stall.
        for t in 10..35 {
            let plan = a.plan(&c, &guest(624, 0), 1424 * MIB, t as f64);
            assert!(!plan.stalled, "tick {t}");
            assert_eq!(plan.send_bytes, None, "tick {t}");
        }
        // Then it inflates at 50 MB/s, past the grace's end, without a stall.
        for (i, t) in (35..48).enumerate() {
            let actual = (50 * i as u64).min(624);
            let plan = a.plan(&c, &guest(624, actual), 1424 * MIB, t as f64);
            assert!(!plan.stalled, "tick {t}");
        }
        // The grace is no exemption: a holder that still does not move once it is over is
        // judged as before.
        let mut a = GuestActuator::default();
        a.restart_progress(10.0);
        let stalled_at = (10..100)
            .find(|&t| a.plan(&c, &guest(624, 0), 1424 * MIB, t as f64).stalled)
            .expect("a stall once the grace is over");
        assert_eq!(stalled_at as f64, 10.0 + c.handover_grace_s);
    }

    #[test]
    fn a_slow_but_moving_balloon_is_not_a_stall() {
        let c = ActuatorConfig::default();
        let mut a = GuestActuator::default();
        for t in 0..10 {
            // 20 MB/s of progress.
            let actual = 100 + t * 20;
            let plan = a.plan(&c, &guest(1024, actual), 1024 * MIB, t as f64);
            assert!(!plan.stalled, "tick {t}");
        }
    }
}
