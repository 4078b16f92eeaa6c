//! A guest that lies about its balloon cannot move memory away from its neighbours, under any
//! policy: two 2 GiB guests with 512 MiB minimums on a 3 GiB budget, one of them lying, run
//! tick by tick through the scheduler's own reading path (our backend's status, or any driver's
//! reading) and engine, beside the same run with that guest honest. The neighbour gets the same
//! memory at every tick, never less than its minimum once it has been fitted, and the memory
//! the guests really hold stays within the budget once the honest run is.

use balloon_protocol::control::{BackendStatus, GuestStatsSnapshot};
use scheduler::actuator::ActuatorConfig;
use scheduler::drivers::backend::reading_from_status;
use scheduler::drivers::DriverReading;
use scheduler::engine::Engine;
use scheduler::model::{GuestSpec, HostState};
use scheduler::policy::{PolicyConfig, PolicyKind};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const MEMORY: u64 = 2 * GIB;
const MIN: u64 = 512 * MIB;
const BUDGET: u64 = 3 * GIB;
const TICK_S: f64 = 2.0;
const TICKS: usize = 60;

/// How the first guest lies.
#[derive(Debug, Clone, Copy)]
enum Lie {
    /// Honest.
    None,
    /// Through our backend: the driver writes `actual` = u32::MAX pages (16 TiB) and inflates
    /// nothing.
    HugeWordNoPages,
    /// Through our backend: the driver writes its memory less its minimum and inflates nothing.
    AtItsMinimumWordNoPages,
    /// Through our backend: the driver inflates as asked and writes 0.
    NoBalloonWordWithPages,
    /// Through a driver that passes the guest's word on (QEMU's built-in balloon): a balloon of
    /// 16 TiB while it inflates nothing.
    HugeReading,
}

impl Lie {
    /// Whether the liar's balloon really follows its target (else it stays empty).
    fn inflates(self) -> bool {
        matches!(self, Lie::NoBalloonWordWithPages)
    }
}

struct Guest {
    spec: GuestSpec,
    /// Memory the guest really uses.
    used: u64,
    target: u64,
    /// The balloon the host really has.
    balloon: u64,
}

impl Guest {
    fn new(name: &str, used: u64) -> Self {
        Guest {
            spec: GuestSpec::from_sizes(name, MEMORY, Some(MIN), None, 1000, None),
            used,
            target: 0,
            balloon: 0,
        }
    }

    fn holds(&self) -> u64 {
        MEMORY - self.balloon
    }

    /// Our backend's status for this guest, with the driver's word `word`.
    fn status(&self, word: u64) -> BackendStatus {
        let held = self.holds();
        BackendStatus {
            device_started: true,
            guest_ram_bytes: MEMORY,
            target_bytes: self.target,
            actual_bytes: self.balloon,
            ballooned_bytes: self.balloon,
            actual_from_driver: true,
            driver_actual_bytes: Some(word),
            driver_claim_disputed: word.abs_diff(self.balloon) > 4 * MIB,
            stats_interval_seconds: 2,
            stats: Some(GuestStatsSnapshot {
                age_seconds: 1.0,
                values: [
                    (
                        "available_memory".to_string(),
                        held.saturating_sub(self.used),
                    ),
                    ("total_memory".to_string(), held),
                ]
                .into_iter()
                .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The reading the scheduler gets, and whether the guest's word in it is false.
    fn reading(&self, lie: Lie) -> (DriverReading, bool) {
        let word = match lie {
            Lie::None => self.balloon,
            Lie::HugeWordNoPages | Lie::HugeReading => u64::from(u32::MAX) << 12,
            Lie::AtItsMinimumWordNoPages => MEMORY - MIN,
            Lie::NoBalloonWordWithPages => 0,
        };
        let reading = match lie {
            Lie::None => reading_from_status(&self.status(self.balloon)),
            Lie::HugeWordNoPages => reading_from_status(&self.status(u64::from(u32::MAX) << 12)),
            Lie::AtItsMinimumWordNoPages => reading_from_status(&self.status(MEMORY - MIN)),
            Lie::NoBalloonWordWithPages => reading_from_status(&self.status(0)),
            Lie::HugeReading => DriverReading {
                actual_bytes: u64::from(u32::MAX) << 12,
                ..reading_from_status(&self.status(self.balloon))
            },
        };
        (reading, word.abs_diff(self.balloon) > 4 * MIB)
    }
}

struct Tick {
    /// The neighbour's allocation as the scheduler saw it, and the memory both guests hold.
    neighbour: u64,
    held: u64,
    liar_disputed: bool,
    liar_lied: bool,
}

fn run(kind: PolicyKind, lie: Lie, liar_inflates: bool) -> Vec<Tick> {
    let policy = PolicyConfig {
        kind,
        ..Default::default()
    };
    let mut engine = Engine::new(policy, ActuatorConfig::default());
    // The liar uses little; the neighbour needs nearly all it has.
    let mut guests = [
        Guest::new("liar", 300 * MIB),
        Guest::new("neighbour", 1900 * MIB),
    ];
    let host = |guests: &[Guest]| HostState {
        total_bytes: 8 * GIB,
        available_bytes: 8 * GIB - guests.iter().map(Guest::holds).sum::<u64>(),
        budget_bytes: BUDGET,
    };
    let mut ticks = Vec::new();
    for i in 0..TICKS {
        let (liar, liar_lied) = guests[0].reading(lie);
        let inputs = [
            (guests[0].spec.clone(), Some(liar)),
            (guests[1].spec.clone(), Some(guests[1].reading(Lie::None).0)),
        ];
        let out = engine.tick(i as f64 * TICK_S, host(&guests), &inputs);
        for (n, (g, send)) in guests.iter_mut().zip(&out.send).enumerate() {
            if let Some(b) = send {
                engine.sent(&g.spec.name, *b);
                g.target = *b;
            }
            // Balloons move within a tick, except the liar's when it inflates nothing (it
            // still gives memory back when asked to deflate).
            if n > 0 || liar_inflates || g.target < g.balloon {
                g.balloon = g.target.min(MEMORY);
            }
        }
        ticks.push(Tick {
            neighbour: out.trace.guests[1].allocation_bytes,
            held: guests.iter().map(Guest::holds).sum(),
            liar_disputed: out.trace.guests[0].size_disputed,
            liar_lied,
        });
    }
    ticks
}

#[test]
fn a_lying_guest_moves_no_memory_from_its_neighbour_under_any_policy() {
    for kind in PolicyKind::ALL {
        for lie in [
            Lie::HugeWordNoPages,
            Lie::AtItsMinimumWordNoPages,
            Lie::NoBalloonWordWithPages,
            Lie::HugeReading,
        ] {
            let honest = run(kind, Lie::None, lie.inflates());
            let lying = run(kind, lie, lie.inflates());
            let fitted = honest.iter().position(|t| t.held <= BUDGET);
            for (i, (h, l)) in honest.iter().zip(&lying).enumerate() {
                assert_eq!(
                    h.neighbour, l.neighbour,
                    "{kind:?} {lie:?} tick {i}: the neighbour's memory"
                );
                assert!(
                    !h.liar_disputed,
                    "{kind:?} {lie:?} tick {i}: honest is not disputed"
                );
                assert_eq!(
                    l.liar_disputed, l.liar_lied,
                    "{kind:?} {lie:?} tick {i}: a lie is flagged, the truth is not"
                );
                if fitted.is_some_and(|f| i >= f) {
                    assert!(
                        l.held <= BUDGET,
                        "{kind:?} {lie:?} tick {i}: {} MiB held on a {} MiB budget",
                        l.held / MIB,
                        BUDGET / MIB
                    );
                    assert!(
                        l.neighbour >= MIN,
                        "{kind:?} {lie:?} tick {i}: neighbour at {} MiB",
                        l.neighbour / MIB
                    );
                }
            }
        }
    }
}
