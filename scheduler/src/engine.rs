//! One scheduling step, shared by the daemon and the simulator: readings in, balloon targets
//! and a trace record out.

use crate::actuator::{ActuatorConfig, GuestActuator};
use crate::drivers::{DriverReading, RawGuestStats};
use crate::model::{GuestMemoryStats, GuestSpec, GuestState, HostState, Snapshot};
use crate::policy::{self, PolicyConfig, PolicyState};
use crate::trace::{GuestCondition, TraceGuest, TraceRecord};
use std::collections::HashMap;

/// What the engine remembers about one guest between ticks.
#[derive(Debug, Clone, Default)]
struct GuestMemory {
    /// The balloon target last sent, or read from the driver when the scheduler started, so a
    /// restarted scheduler never jumps a target.
    target_bytes: Option<u64>,
    /// Cumulative counters from the previous reading, for deltas.
    last_swap_in: Option<u64>,
    last_major_faults: Option<u64>,
    actuator: GuestActuator,
    /// The driver's count of hand-overs between its mechanisms at the last reading.
    handovers: u64,
    /// Set by an operator: the allocation this guest keeps, outside the policy.
    pinned_allocation: Option<u64>,
    /// The last reading's size was disputed (for logging the start and end of a dispute once).
    size_disputed: bool,
}

pub struct Engine {
    pub policy: PolicyConfig,
    pub actuator: ActuatorConfig,
    policy_state: PolicyState,
    guests: HashMap<String, GuestMemory>,
    /// The budget cannot hold the guests' minimums (see `Engine::feasibility`).
    infeasible: bool,
}

/// Once infeasible, the budget counts as feasible again only when it exceeds the minimums by
/// this fraction of them, so that a budget at the line is not reported on and off every tick.
const FEASIBLE_AGAIN_MARGIN: u64 = 100;

/// The outcome of a tick.
#[derive(Debug, Clone)]
pub struct TickOutcome {
    /// Per guest, in input order: the balloon target to send now, if any.
    pub send: Vec<Option<u64>>,
    pub snapshot: Snapshot,
    pub trace: TraceRecord,
}

impl Engine {
    pub fn new(policy: PolicyConfig, actuator: ActuatorConfig) -> Self {
        Engine {
            policy,
            actuator,
            policy_state: PolicyState::default(),
            guests: HashMap::new(),
            infeasible: false,
        }
    }

    /// Whether the budget cannot hold the guests' minimums (as of the latest tick).
    pub fn infeasible(&self) -> bool {
        self.infeasible
    }

    /// Checks the budget against the sum of the minimums; logs when that changes (once each
    /// way). A budget from host MemAvailable can fall below the minimums at run time.
    fn feasibility(&mut self, budget: u64, minimums: u64) -> bool {
        use crate::config::show_size;
        if !self.infeasible && budget < minimums {
            self.infeasible = true;
            log::error!(
                "the budget, {}, cannot hold the guests' minimums, {} together: every guest is \
                 held at its minimum until it can",
                show_size(budget),
                show_size(minimums)
            );
        } else if self.infeasible
            && budget >= minimums.saturating_add(minimums / FEASIBLE_AGAIN_MARGIN)
        {
            self.infeasible = false;
            log::info!(
                "the budget, {}, holds the guests' minimums ({}) again: back to the policy",
                show_size(budget),
                show_size(minimums)
            );
        }
        self.infeasible
    }

    /// Pins a guest at an allocation (memory it may use), outside the policy.
    pub fn pin(&mut self, name: &str, allocation_bytes: Option<u64>) {
        self.guests
            .entry(name.to_string())
            .or_default()
            .pinned_allocation = allocation_bytes;
    }

    pub fn pinned(&self, name: &str) -> Option<u64> {
        self.guests.get(name).and_then(|g| g.pinned_allocation)
    }

    /// The driver accepted a target: remember it.
    pub fn sent(&mut self, name: &str, balloon_bytes: u64) {
        self.guests
            .entry(name.to_string())
            .or_default()
            .target_bytes = Some(balloon_bytes);
    }

    pub fn tick(
        &mut self,
        time_s: f64,
        host: HostState,
        inputs: &[(GuestSpec, Option<DriverReading>)],
    ) -> TickOutcome {
        let mut guests = Vec::with_capacity(inputs.len());
        let mut disputed = Vec::with_capacity(inputs.len());
        for (spec, reading) in inputs {
            let mem = self.guests.entry(spec.name.clone()).or_default();
            let reading = reading.as_ref().map(|r| bounded(spec, r));
            let size_disputed = reading.is_some_and(|r| r.size_disputed);
            if size_disputed != mem.size_disputed {
                mem.size_disputed = size_disputed;
                if size_disputed {
                    log::warn!(
                        "{}: the guest's word for its balloon disagrees with what the host holds \
                         back (or is outside its memory): it is budgeted by the host's figure, \
                         {} MiB of balloon",
                        spec.name,
                        reading.map_or(0, |r| r.actual_bytes) >> 20
                    );
                } else {
                    log::info!(
                        "{}: the guest's balloon size agrees with the host's again",
                        spec.name
                    );
                }
            }
            disputed.push(size_disputed);
            // A hand-over since the last reading (however many readings were lost between).
            if let Some(split) = reading.as_ref().and_then(|r| r.split) {
                if split.handovers != mem.handovers {
                    mem.handovers = split.handovers;
                    mem.actuator.restart_progress(time_s);
                }
            }
            let limit = mem.actuator.limit_at(time_s);
            let state = match reading {
                Some(r) => {
                    if mem.target_bytes.is_none() {
                        // First sight (or a restart): adopt what the guest has now.
                        mem.target_bytes = Some(r.target_bytes.unwrap_or(r.actual_bytes));
                    }
                    let stats = r.stats.map(|s| {
                        let delta = |last: &mut Option<u64>, now: u64| {
                            let d = last.map_or(0, |l| now.saturating_sub(l));
                            *last = Some(now);
                            d
                        };
                        GuestMemoryStats {
                            available_bytes: s.available_bytes,
                            total_bytes: s.total_bytes,
                            swap_in_delta: delta(&mut mem.last_swap_in, s.swap_in),
                            major_faults_delta: delta(&mut mem.last_major_faults, s.major_faults),
                        }
                    });
                    GuestState {
                        spec: spec.clone(),
                        reachable: true,
                        balloon_target_bytes: mem.target_bytes.unwrap_or(r.actual_bytes),
                        balloon_actual_bytes: r.actual_bytes,
                        stats,
                        pinned: mem.pinned_allocation.is_some(),
                        balloon_limit_bytes: limit,
                    }
                }
                None => GuestState {
                    spec: spec.clone(),
                    reachable: false,
                    balloon_target_bytes: mem.target_bytes.unwrap_or(0),
                    balloon_actual_bytes: mem.target_bytes.unwrap_or(0),
                    stats: None,
                    pinned: mem.pinned_allocation.is_some(),
                    balloon_limit_bytes: limit,
                },
            };
            guests.push(state);
        }
        let minimums: u64 = inputs.iter().map(|(s, _)| s.min_allocation()).sum();
        let infeasible = self.feasibility(host.budget_bytes, minimums);
        let snapshot = Snapshot {
            time_s,
            host,
            guests,
        };
        let decided = policy::decide(&self.policy, &snapshot, &mut self.policy_state);
        let mut send = Vec::with_capacity(decided.len());
        let mut states = Vec::with_capacity(decided.len());
        let mut decisions = Vec::with_capacity(decided.len());
        for (g, decided) in snapshot.guests.iter().zip(decided) {
            let mem = self.guests.entry(g.spec.name.clone()).or_default();
            let (lo, hi) = g.bounds();
            let decided = match mem.pinned_allocation {
                Some(pinned) => pinned.clamp(lo.min(pinned), hi),
                // No policy can share out a budget below the minimums: each guest gets its
                // minimum (or what a stalled balloon leaves it), the same every tick.
                None if infeasible && g.reachable => lo,
                None => decided,
            };
            let (plan, state) = if !g.reachable {
                (None, GuestCondition::Unreachable)
            } else {
                let a = mem.actuator.plan(&self.actuator, g, decided, time_s);
                let state = if a.stalled {
                    GuestCondition::Stalled
                } else if g.pinned {
                    GuestCondition::Pinned
                } else {
                    GuestCondition::Ok
                };
                (a.send_bytes, state)
            };
            send.push(plan.and_then(|b| whole_pages(b, g)));
            states.push(state);
            decisions.push(decided);
        }
        if !infeasible {
            // Infeasible, the only growth is up to a guest's minimum, which the budget yields to.
            fund_growth(&snapshot, &mut send);
        }
        let trace_guests = snapshot
            .guests
            .iter()
            .zip(inputs.iter().zip(&disputed))
            .zip(send.iter().zip(states.iter().zip(&decisions)))
            .map(
                |((g, ((_, reading), disputed)), (plan, (state, decided)))| TraceGuest {
                    name: g.spec.name.clone(),
                    memory_bytes: g.spec.memory_bytes,
                    allocation_bytes: g.allocation_bytes(),
                    used_bytes: g.stats.map(|_| g.used_bytes()),
                    available_bytes: g.stats.map(|s| s.available_bytes),
                    balloon_target_bytes: g.balloon_target_bytes,
                    balloon_actual_bytes: g.balloon_actual_bytes,
                    decided_allocation_bytes: *decided,
                    sent_balloon_bytes: *plan,
                    state: *state,
                    balloon_split: reading.and_then(|r| r.split),
                    size_disputed: *disputed,
                },
            )
            .collect();
        let trace = TraceRecord {
            time_s,
            policy: self.policy.kind,
            host_state: self.policy_state.host_level.level,
            host_total_bytes: host.total_bytes,
            host_available_bytes: host.available_bytes,
            budget_bytes: host.budget_bytes,
            minimums_bytes: minimums,
            budget_infeasible: infeasible,
            guests: trace_guests,
        };
        TickOutcome {
            send,
            snapshot,
            trace,
        }
    }
}

/// A reading as a policy may see it: every size within the guest's configured memory, ages
/// finite. A VMM passes on what the guest kernel wrote (QEMU's built-in balloon reports the
/// driver's `actual`), and a guest can write anything there, so one guest's figure must not make
/// the others' budget. A balloon larger than the guest's memory is no balloon the host can have
/// taken: the guest counts as holding all of its memory (the host's worst case, and what a guest
/// that writes such a size while inflating nothing holds). Other sizes out of range are clamped.
/// Either way the reading is marked disputed.
fn bounded(spec: &GuestSpec, r: &DriverReading) -> DriverReading {
    let memory = spec.memory_bytes;
    let stats = r.stats.map(|s| RawGuestStats {
        available_bytes: s.available_bytes.min(memory),
        total_bytes: s.total_bytes.min(memory),
        age_seconds: s.age_seconds.filter(|a| a.is_finite() && *a >= 0.0),
        ..s
    });
    let out_of_range = r.actual_bytes > memory
        || r.target_bytes.is_some_and(|t| t > memory)
        || r.stats
            .is_some_and(|s| s.available_bytes > memory || s.total_bytes > memory);
    DriverReading {
        target_bytes: r.target_bytes.map(|t| t.min(memory)),
        actual_bytes: if r.actual_bytes > memory {
            0
        } else {
            r.actual_bytes
        },
        stats,
        size_disputed: r.size_disputed || out_of_range,
        ..*r
    }
}

/// A balloon target rounded up to whole balloon pages (at most the guest's size): a balloon
/// holds whole pages and a driver rounds a byte target down, which would leave each guest up
/// to a page over its allocation and the guests together over the budget. `None` when the
/// rounded target is the one already sent.
fn whole_pages(balloon_bytes: u64, g: &GuestState) -> Option<u64> {
    let page = balloon_protocol::PAGE_SIZE;
    let up = balloon_bytes
        .div_ceil(page)
        .saturating_mul(page)
        .min(g.spec.memory_bytes / page * page);
    // Rounding up must not take a guest under its minimum (one that is not whole pages).
    let memory = g.spec.memory_bytes;
    let min = g.bounds().0;
    let rounded = if memory.saturating_sub(up) < min && memory.saturating_sub(balloon_bytes) >= min
    {
        balloon_bytes / page * page
    } else {
        up
    };
    (rounded != g.balloon_target_bytes).then_some(rounded)
}

/// Growth is paid for with memory already free under the budget: a guest's balloon deflates
/// only as far as the other balloons have really inflated, so moving memory between guests
/// never takes the host over its budget (deflating is fast, inflating takes the guest's time).
/// When the free memory cannot cover every growth, each gets the same fraction of its own.
fn fund_growth(snap: &Snapshot, send: &mut [Option<u64>]) {
    let held: u64 = snap.guests.iter().map(GuestState::allocation_bytes).sum();
    let free = snap.host.budget_bytes.saturating_sub(held);
    let growth: Vec<u64> = snap
        .guests
        .iter()
        .zip(send.iter())
        .map(|(g, plan)| match plan {
            Some(b) => g.balloon_actual_bytes.saturating_sub(*b),
            None => 0,
        })
        .collect();
    let wanted: u64 = growth.iter().sum();
    if wanted <= free {
        return;
    }
    for ((g, plan), grow) in snap.guests.iter().zip(send.iter_mut()).zip(growth) {
        if grow == 0 {
            continue;
        }
        let funded = ((grow as u128 * free as u128 / wanted as u128) as u64)
            & !(balloon_protocol::PAGE_SIZE - 1);
        let balloon = g.balloon_actual_bytes - funded;
        *plan = (balloon != g.balloon_target_bytes).then_some(balloon);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyKind;

    const MIB: u64 = 1 << 20;

    fn spec(name: &str) -> GuestSpec {
        GuestSpec {
            name: name.into(),
            memory_bytes: 1024 * MIB,
            min_bytes: 256 * MIB,
            max_bytes: 1024 * MIB,
            shares: 1000,
            static_bytes: Some(512 * MIB),
        }
    }

    fn host() -> HostState {
        HostState {
            total_bytes: 8192 * MIB,
            available_bytes: 4096 * MIB,
            budget_bytes: 2048 * MIB,
        }
    }

    /// An engine under the static policy: each guest's size is its `static_bytes`.
    fn static_engine(actuator: ActuatorConfig) -> Engine {
        let policy = PolicyConfig {
            kind: PolicyKind::Static,
            ..Default::default()
        };
        Engine::new(policy, actuator)
    }

    #[test]
    fn a_restart_adopts_current_targets_and_moves_from_there() {
        let mut e = static_engine(ActuatorConfig::default());
        // The guest already has a 300 MiB balloon (reached 280) from a previous run.
        let reading = DriverReading {
            target_bytes: Some(300 * MIB),
            actual_bytes: 280 * MIB,
            stats: None,
            split: None,
            size_disputed: false,
        };
        let out = e.tick(0.0, host(), &[(spec("a"), Some(reading))]);
        // Static wants 512 MiB allocated: a 512 MiB balloon, reached from 300 in one capped
        // step, never from 0.
        assert_eq!(out.send, vec![Some(512 * MIB)]);
        assert_eq!(out.trace.guests[0].balloon_target_bytes, 300 * MIB);
    }

    #[test]
    fn unreachable_guests_are_reported_not_guessed() {
        let mut e = Engine::new(PolicyConfig::default(), ActuatorConfig::default());
        let out = e.tick(0.0, host(), &[(spec("a"), None)]);
        assert_eq!(out.send, vec![None]);
        assert_eq!(out.trace.guests[0].state, GuestCondition::Unreachable);
    }

    #[test]
    fn pinned_guests_keep_the_operators_size() {
        let mut e = Engine::new(PolicyConfig::default(), ActuatorConfig::default());
        e.pin("a", Some(900 * MIB));
        let reading = DriverReading {
            target_bytes: Some(0),
            actual_bytes: 0,
            stats: None,
            split: None,
            size_disputed: false,
        };
        let out = e.tick(0.0, host(), &[(spec("a"), Some(reading))]);
        assert_eq!(out.send, vec![Some(124 * MIB)]);
        assert_eq!(out.trace.guests[0].state, GuestCondition::Pinned);
    }

    #[test]
    fn an_infeasible_budget_holds_every_guest_at_its_minimum_tick_after_tick() {
        // Two 2 GiB guests with a 1280 MiB minimum each; the budget drops to 2 GiB.
        let mut e = Engine::new(PolicyConfig::default(), ActuatorConfig::default());
        let g = |name: &str| GuestSpec {
            name: name.into(),
            memory_bytes: 2048 * MIB,
            min_bytes: 1280 * MIB,
            max_bytes: 2048 * MIB,
            shares: 1000,
            static_bytes: None,
        };
        let (a, b) = (g("a"), g("b"));
        let budget = |mib: u64| HostState {
            budget_bytes: mib * MIB,
            ..host()
        };
        // The balloons as the guests hold them: every target reached by the next tick.
        let mut balloons = [0u64, 0];
        let mut tick = |e: &mut Engine, t: f64, host: HostState| {
            let reading = |b: u64| {
                Some(DriverReading {
                    target_bytes: Some(b),
                    actual_bytes: b,
                    stats: Some(crate::drivers::RawGuestStats {
                        available_bytes: 2048 * MIB - b - 300 * MIB,
                        total_bytes: 2048 * MIB - b,
                        ..Default::default()
                    }),
                    split: None,
                    size_disputed: false,
                })
            };
            let inputs = [
                (a.clone(), reading(balloons[0])),
                (b.clone(), reading(balloons[1])),
            ];
            let out = e.tick(t, host, &inputs);
            for (i, send) in out.send.iter().enumerate() {
                if let Some(bytes) = send {
                    e.sent(&inputs[i].0.name, *bytes);
                    balloons[i] = *bytes;
                }
            }
            out
        };
        let first = tick(&mut e, 0.0, budget(2048));
        assert!(e.infeasible());
        assert!(first.trace.budget_infeasible);
        assert_eq!(first.trace.minimums_bytes, 2560 * MIB);
        assert_eq!(first.trace.budget_bytes, 2048 * MIB);
        for t in 1..20 {
            let out = tick(&mut e, t as f64, budget(2048));
            let allocations: Vec<u64> = out
                .trace
                .guests
                .iter()
                .map(|g| g.allocation_bytes)
                .collect();
            if t >= 4 {
                // 768 MiB balloons in 256 MiB steps: there by the fourth tick, then no change.
                assert_eq!(allocations, [1280 * MIB, 1280 * MIB], "t={t}");
                assert_eq!(out.send, [None, None], "t={t}: targets must not move");
            }
            for g in &out.trace.guests {
                assert_eq!(g.decided_allocation_bytes, 1280 * MIB, "t={t}");
            }
        }
        // Just at the line it stays infeasible (no flapping); with room it is feasible again and
        // the policy shares the budget out.
        tick(&mut e, 20.0, budget(2560));
        assert!(e.infeasible());
        let out = tick(&mut e, 21.0, budget(3072));
        assert!(!e.infeasible() && !out.trace.budget_infeasible);
        assert!(out.send.iter().any(Option::is_some), "{:?}", out.send);
    }

    #[test]
    fn balloon_targets_are_whole_pages_so_the_guests_stay_inside_the_budget() {
        // Three guests share 2000 MiB + 1 byte: a third each is no whole number of pages.
        let unlimited = ActuatorConfig {
            max_step_bytes: 4096 * MIB,
            ..Default::default()
        };
        let mut e = Engine::new(PolicyConfig::default(), unlimited);
        let host = HostState {
            budget_bytes: 2000 * MIB + 1,
            ..host()
        };
        let idle = Some(DriverReading {
            target_bytes: Some(0),
            actual_bytes: 0,
            stats: Some(crate::drivers::RawGuestStats {
                available_bytes: 900 * MIB,
                total_bytes: 1024 * MIB,
                ..Default::default()
            }),
            split: None,
            size_disputed: false,
        });
        let inputs: Vec<_> = ["a", "b", "c"].iter().map(|n| (spec(n), idle)).collect();
        let out = e.tick(0.0, host, &inputs);
        let mut held = 0;
        for (sent, (s, _)) in out.send.iter().zip(&inputs) {
            let b = sent.expect("every guest inflates");
            assert_eq!(b % balloon_protocol::PAGE_SIZE, 0, "{b}");
            held += s.memory_bytes - b;
        }
        assert!(held <= host.budget_bytes, "{held} > {}", host.budget_bytes);
    }

    #[test]
    fn page_rounding_never_takes_a_guest_under_a_minimum_that_is_not_whole_pages() {
        let unlimited = ActuatorConfig {
            max_step_bytes: 4096 * MIB,
            ..Default::default()
        };
        let mut e = static_engine(unlimited);
        let mut a = spec("a");
        a.min_bytes = 512 * MIB + 100;
        a.static_bytes = Some(a.min_bytes);
        let reading = Some(DriverReading {
            target_bytes: Some(0),
            actual_bytes: 0,
            stats: None,
            split: None,
            size_disputed: false,
        });
        let out = e.tick(0.0, host(), &[(a.clone(), reading)]);
        let b = out.send[0].expect("it inflates");
        assert_eq!(b % balloon_protocol::PAGE_SIZE, 0);
        assert!(a.memory_bytes - b >= a.min_bytes, "balloon {b}");
    }

    #[test]
    fn growth_waits_for_memory_the_others_have_given_up() {
        // Budget 1536 MiB; a holds 1024 and b 512 (full). The policy moves 256 MiB from a to b:
        // b may only grow once a's balloon has really taken it.
        let mut e = static_engine(ActuatorConfig::default());
        let mut a = spec("a");
        a.static_bytes = Some(768 * MIB);
        let mut b = spec("b");
        b.static_bytes = Some(768 * MIB);
        let host = HostState {
            budget_bytes: 1536 * MIB,
            ..host()
        };
        let at = |target: u64, actual: u64| {
            Some(DriverReading {
                target_bytes: Some(target * MIB),
                actual_bytes: actual * MIB,
                stats: None,
                split: None,
                size_disputed: false,
            })
        };
        let out = e.tick(
            0.0,
            host,
            &[(a.clone(), at(0, 0)), (b.clone(), at(512, 512))],
        );
        assert_eq!(out.send, vec![Some(256 * MIB), None], "b waits");
        e.sent("a", 256 * MIB);
        // a's balloon has reached 128 MiB: b may take those 128.
        let out = e.tick(
            1.0,
            host,
            &[(a.clone(), at(256, 128)), (b.clone(), at(512, 512))],
        );
        assert_eq!(out.send, vec![None, Some(384 * MIB)]);
    }

    #[test]
    fn a_hand_over_whose_reading_was_lost_still_gives_the_new_holder_its_grace() {
        let mut e = static_engine(ActuatorConfig::default());
        let mut guest = spec("a");
        guest.static_bytes = Some(400 * MIB);
        // Our backend's balloon: the driver holds all 624 MiB of it ...
        let at = |actual: u64, handovers: u64| {
            Some(DriverReading {
                target_bytes: Some(624 * MIB),
                actual_bytes: actual * MIB,
                stats: None,
                split: Some(crate::drivers::split::BalloonSplit {
                    handovers,
                    ..Default::default()
                }),
                size_disputed: false,
            })
        };
        for t in 0..5 {
            e.tick(t as f64, host(), &[(guest.clone(), at(624, 0))]);
        }
        // ... then goes away, and the driver hands the balloon to the app, but the reading
        // that says so comes past the tick's deadline and is dropped.
        e.tick(5.0, host(), &[(guest.clone(), None)]);
        // The app holds nothing for a while (the guest is under pressure after the driver's
        // deflate); the readings after the lost one count one hand-over.
        for t in 6..30 {
            let out = e.tick(t as f64, host(), &[(guest.clone(), at(0, 1))]);
            assert_eq!(
                out.trace.guests[0].state,
                GuestCondition::Ok,
                "judged stalled at {t} s, within the new holder's grace"
            );
        }
    }
}
