//! Whose the tracked pages are, and whether the device runs: the backend's lifecycle.
//!
//! A vhost-user backend never sees a guest reboot as such. It sees the rings stop and, once
//! the new driver starts, a new negotiation: exactly what it sees for a VM that is paused and
//! resumed, or for a backend restarted behind the keeper, both of which still hold their
//! balloon. So from a ring stop (or a negotiation, a reset, tracking taken over from a previous
//! process) until the inflate queue is seen running again, the tracked pages may be the
//! guest's: nothing may discard them. Where the inflate queue resumes then decides: at index 0
//! the driver is a new instance and the pages are the guest's again; anywhere else they are
//! still the balloon's, and discards dropped meanwhile are redone.
//!
//! Config-change messages go out only while the device runs: QEMU 11.1 dereferences a null
//! device on one that arrives while its vhost device is stopped. So one goes out at each
//! start, whatever the target.

/// The backend's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lifecycle {
    /// Not started yet, and nothing says the tracked pages (a new process has none) are
    /// anyone's but the balloon's.
    #[default]
    Idle,
    /// The rings stopped, the driver negotiated, or tracking was taken over: the tracked pages
    /// may be the guest's again, so nothing discards them. `rediscard`: discards were dropped
    /// or switched on meanwhile; redo them once the pages prove to be the balloon's.
    OwnerUnknown { rediscard: bool },
    /// The inflate queue runs for the current driver: the tracked pages are the balloon's.
    Running,
}

/// What happened to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A ring stopped, the driver negotiated features, or the device was reset.
    /// `dropped_discards`: pending discards were dropped for it while discards are on.
    OwnerInDoubt { dropped_discards: bool },
    /// A restarted backend took over the tracking a previous one persisted; `rediscard` when
    /// discards are on and pages were taken over (a discard may have been interrupted).
    TrackingAdopted { rediscard: bool },
    /// Discards were switched on (from off).
    DiscardOn,
    /// Discards were switched off.
    DiscardOff,
    /// The inflate queue was seen ready; `new_driver` when its next index is 0 (the driver
    /// has inflated nothing since it started the device).
    InflateQueueRunning { new_driver: bool },
}

/// What the backend must do on a transition, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The tracked pages are the guest's again: forget them (no discard of them is queued: the
    /// way into `OwnerUnknown` dropped those).
    ForgetTracked,
    /// Discard the tracked pages again (they are the balloon's and some discards were lost).
    DiscardTracked,
    /// Tell the driver to read the config (the device just started).
    NotifyConfigChange,
}

impl Lifecycle {
    /// The state after `event`, and what to do for it.
    pub fn on(self, event: Event) -> (Lifecycle, Vec<Action>) {
        use Lifecycle::*;
        let pending = match self {
            OwnerUnknown { rediscard } => rediscard,
            Idle | Running => false,
        };
        match event {
            Event::OwnerInDoubt { dropped_discards } => (
                OwnerUnknown {
                    rediscard: pending || dropped_discards,
                },
                vec![],
            ),
            Event::TrackingAdopted { rediscard } => (
                OwnerUnknown {
                    rediscard: pending || rediscard,
                },
                vec![],
            ),
            Event::DiscardOn => match self {
                OwnerUnknown { .. } => (OwnerUnknown { rediscard: true }, vec![]),
                Idle | Running => (self, vec![Action::DiscardTracked]),
            },
            Event::DiscardOff => match self {
                OwnerUnknown { .. } => (OwnerUnknown { rediscard: false }, vec![]),
                Idle | Running => (self, vec![]),
            },
            Event::InflateQueueRunning { new_driver } => match self {
                Running => (Running, vec![]),
                Idle => (Running, vec![Action::NotifyConfigChange]),
                OwnerUnknown { rediscard } => {
                    let first = if new_driver {
                        Some(Action::ForgetTracked)
                    } else {
                        rediscard.then_some(Action::DiscardTracked)
                    };
                    let actions = first
                        .into_iter()
                        .chain([Action::NotifyConfigChange])
                        .collect();
                    (Running, actions)
                }
            },
        }
    }

    /// Whether the device runs (config changes may go out).
    pub fn running(self) -> bool {
        self == Lifecycle::Running
    }

    /// Whether the inflate queue still has something to tell (it has not once the device
    /// runs: the common case, on every kick).
    pub fn watching_inflate_queue(self) -> bool {
        !self.running()
    }
}

#[cfg(test)]
mod tests {
    use super::Action::*;
    use super::Event::*;
    use super::Lifecycle::{self, *};
    use super::*;

    const UNKNOWN: Lifecycle = OwnerUnknown { rediscard: false };
    const UNKNOWN_REDISCARD: Lifecycle = OwnerUnknown { rediscard: true };

    /// Every state with every event.
    #[test]
    fn transition_table() {
        let table: &[(Lifecycle, Event, Lifecycle, &[Action])] = &[
            // A ring stops, a negotiation, a reset: nothing discards until the queue runs.
            (
                Idle,
                OwnerInDoubt {
                    dropped_discards: false,
                },
                UNKNOWN,
                &[],
            ),
            (
                Idle,
                OwnerInDoubt {
                    dropped_discards: true,
                },
                UNKNOWN_REDISCARD,
                &[],
            ),
            (
                Running,
                OwnerInDoubt {
                    dropped_discards: false,
                },
                UNKNOWN,
                &[],
            ),
            (
                Running,
                OwnerInDoubt {
                    dropped_discards: true,
                },
                UNKNOWN_REDISCARD,
                &[],
            ),
            (
                UNKNOWN,
                OwnerInDoubt {
                    dropped_discards: false,
                },
                UNKNOWN,
                &[],
            ),
            (
                UNKNOWN,
                OwnerInDoubt {
                    dropped_discards: true,
                },
                UNKNOWN_REDISCARD,
                &[],
            ),
            // A second stop keeps what the first dropped.
            (
                UNKNOWN_REDISCARD,
                OwnerInDoubt {
                    dropped_discards: false,
                },
                UNKNOWN_REDISCARD,
                &[],
            ),
            (
                UNKNOWN_REDISCARD,
                OwnerInDoubt {
                    dropped_discards: true,
                },
                UNKNOWN_REDISCARD,
                &[],
            ),
            // Tracking taken over from a previous process.
            (Idle, TrackingAdopted { rediscard: false }, UNKNOWN, &[]),
            (
                Idle,
                TrackingAdopted { rediscard: true },
                UNKNOWN_REDISCARD,
                &[],
            ),
            (Running, TrackingAdopted { rediscard: false }, UNKNOWN, &[]),
            (
                Running,
                TrackingAdopted { rediscard: true },
                UNKNOWN_REDISCARD,
                &[],
            ),
            (UNKNOWN, TrackingAdopted { rediscard: false }, UNKNOWN, &[]),
            (
                UNKNOWN,
                TrackingAdopted { rediscard: true },
                UNKNOWN_REDISCARD,
                &[],
            ),
            (
                UNKNOWN_REDISCARD,
                TrackingAdopted { rediscard: false },
                UNKNOWN_REDISCARD,
                &[],
            ),
            (
                UNKNOWN_REDISCARD,
                TrackingAdopted { rediscard: true },
                UNKNOWN_REDISCARD,
                &[],
            ),
            // Discards on: now if the pages are known to be the balloon's, else once they are.
            (Idle, DiscardOn, Idle, &[DiscardTracked]),
            (Running, DiscardOn, Running, &[DiscardTracked]),
            (UNKNOWN, DiscardOn, UNKNOWN_REDISCARD, &[]),
            (UNKNOWN_REDISCARD, DiscardOn, UNKNOWN_REDISCARD, &[]),
            // Discards off: nothing is redone.
            (Idle, DiscardOff, Idle, &[]),
            (Running, DiscardOff, Running, &[]),
            (UNKNOWN, DiscardOff, UNKNOWN, &[]),
            (UNKNOWN_REDISCARD, DiscardOff, UNKNOWN, &[]),
            // The inflate queue runs: the device starts; where it resumed decides the pages.
            (
                Idle,
                InflateQueueRunning { new_driver: true },
                Running,
                &[NotifyConfigChange],
            ),
            (
                Idle,
                InflateQueueRunning { new_driver: false },
                Running,
                &[NotifyConfigChange],
            ),
            (
                Running,
                InflateQueueRunning { new_driver: true },
                Running,
                &[],
            ),
            (
                Running,
                InflateQueueRunning { new_driver: false },
                Running,
                &[],
            ),
            (
                UNKNOWN,
                InflateQueueRunning { new_driver: true },
                Running,
                &[ForgetTracked, NotifyConfigChange],
            ),
            (
                UNKNOWN,
                InflateQueueRunning { new_driver: false },
                Running,
                &[NotifyConfigChange],
            ),
            (
                UNKNOWN_REDISCARD,
                InflateQueueRunning { new_driver: true },
                Running,
                &[ForgetTracked, NotifyConfigChange],
            ),
            (
                UNKNOWN_REDISCARD,
                InflateQueueRunning { new_driver: false },
                Running,
                &[DiscardTracked, NotifyConfigChange],
            ),
        ];
        for (from, event, to, actions) in table {
            assert_eq!(
                from.on(*event),
                (*to, actions.to_vec()),
                "{from:?} on {event:?}"
            );
        }
        // The table is complete: every state with every event.
        let states = [Idle, UNKNOWN, UNKNOWN_REDISCARD, Running];
        let events = [
            OwnerInDoubt {
                dropped_discards: false,
            },
            OwnerInDoubt {
                dropped_discards: true,
            },
            TrackingAdopted { rediscard: false },
            TrackingAdopted { rediscard: true },
            DiscardOn,
            DiscardOff,
            InflateQueueRunning { new_driver: false },
            InflateQueueRunning { new_driver: true },
        ];
        let missing: Vec<(Lifecycle, Event)> = states
            .iter()
            .flat_map(|s| events.iter().map(move |e| (*s, *e)))
            .filter(|(s, e)| !table.iter().any(|(f, ev, ..)| f == s && ev == e))
            .collect();
        assert!(missing.is_empty(), "untested: {missing:?}");
    }

    #[test]
    fn only_running_stops_watching_the_inflate_queue() {
        assert!(Idle.watching_inflate_queue());
        assert!(UNKNOWN.watching_inflate_queue());
        assert!(UNKNOWN_REDISCARD.watching_inflate_queue());
        assert!(!Running.watching_inflate_queue());
        assert!(Running.running() && !Idle.running() && !UNKNOWN.running());
    }
}
