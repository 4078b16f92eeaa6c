//! The comparison baseline after Proxmox VE's auto-ballooning (pvestatd): every
//! `proxmox_interval_s` it compares the memory in use with its target (`proxmox_target_used` of
//! the host's memory; here of the budget, which is the host's memory for guests, and never
//! more than the host itself has) and spreads the difference over the guests in proportion to
//! their shares of the room above their minimums, moving no guest by more than
//! `proxmox_max_change_bytes` per decision. Guest pressure only orders them: growth goes first
//! to the guests with little free memory (a quarter of their minimum or less, or no
//! statistics), shrinking first to the others; when that group cannot move, every guest does.
//! It never looks at what a guest uses, so all guests drift toward the same share-weighted
//! split, a busy guest included, and one at its minimum stays there however hard it pages.

use super::{due, planned, PolicyConfig, PolicyState};
use crate::model::{GuestState, Snapshot};

/// A difference from the target smaller than this is left alone.
const DEAD_BAND: i128 = 10 << 20;

pub fn allocate(config: &PolicyConfig, snap: &Snapshot, state: &mut PolicyState) -> Vec<u64> {
    let mut alloc: Vec<u64> = snap.guests.iter().map(planned).collect();
    if !due(
        &mut state.proxmox_last_s,
        snap.time_s,
        config.proxmox_interval_s,
    ) {
        return alloc;
    }
    let target = config.proxmox_target_used;
    let host = &snap.host;
    let in_budget = (target * host.budget_bytes as f64) as i128 - alloc.iter().sum::<u64>() as i128;
    let on_host = host.available_bytes as i128 - ((1.0 - target) * host.total_bytes as f64) as i128;
    let goal = in_budget.min(on_host);
    if goal.abs() < DEAD_BAND {
        return alloc;
    }
    let short: Vec<bool> = snap.guests.iter().map(short_of_memory).collect();
    let first: Vec<usize> = (0..alloc.len())
        .filter(|&i| short[i] == (goal > 0))
        .collect();
    if spread(config, snap, goal, &first, &mut alloc) == 0 {
        let all: Vec<usize> = (0..alloc.len()).collect();
        spread(config, snap, goal, &all, &mut alloc);
    }
    alloc
}

/// pvestatd's ordering signal: free memory at most a quarter of the guest's minimum.
fn short_of_memory(g: &GuestState) -> bool {
    let (min, _) = g.bounds();
    g.stats.is_none_or(|s| s.available_bytes <= min / 4)
}

/// Moves each guest of `group` toward its share of the group's room above the minimums plus
/// `goal`, by at most the per-decision change; returns the bytes moved.
fn spread(
    config: &PolicyConfig,
    snap: &Snapshot,
    goal: i128,
    group: &[usize],
    alloc: &mut [u64],
) -> u64 {
    let bounds: Vec<(u64, u64)> = snap.guests.iter().map(GuestState::bounds).collect();
    let shares = |i: usize| snap.guests[i].spec.shares.max(1) as i128;
    let room: i128 = group
        .iter()
        .map(|&i| alloc[i].saturating_sub(bounds[i].0) as i128)
        .sum();
    let pool = (room + goal).max(0);
    // Share-weighted split of the pool; a guest the split puts past its maximum gets its
    // maximum and the rest is split again among the others.
    let mut desired = vec![0i128; alloc.len()];
    let mut open: Vec<usize> = group.to_vec();
    let mut left = pool;
    loop {
        let total: i128 = open.iter().map(|&i| shares(i)).sum();
        if total == 0 {
            break;
        }
        let over: Vec<usize> = open
            .iter()
            .copied()
            .filter(|&i| left * shares(i) / total > (bounds[i].1 - bounds[i].0) as i128)
            .collect();
        if over.is_empty() {
            for &i in &open {
                desired[i] = left * shares(i) / total;
            }
            break;
        }
        for i in over {
            desired[i] = (bounds[i].1 - bounds[i].0) as i128;
            left -= desired[i];
            open.retain(|&j| j != i);
        }
    }
    let step = config.proxmox_max_change_bytes as i128;
    let mut moved = 0;
    for &i in group {
        let want = bounds[i].0 as i128 + desired[i];
        let now = alloc[i] as i128;
        // As pvestatd: while shrinking no guest grows; while growing, one above its share
        // still comes down toward it.
        let change = (want - now).clamp(-step, step);
        let next = if goal < 0 {
            now + change.min(0)
        } else {
            now + change
        };
        moved += next.abs_diff(now) as u64;
        alloc[i] = next.clamp(bounds[i].0 as i128, bounds[i].1 as i128) as u64;
    }
    moved
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::MIB;

    /// A 2 GiB guest (minimum 512 MiB) with a balloon of `balloon_mib` and `available_mib`.
    fn guest(balloon_mib: u64, available_mib: u64) -> GuestState {
        crate::fixtures::guest("g", 2048)
            .bounded(512, 2048)
            .balloon(balloon_mib, balloon_mib)
            .available(available_mib)
    }

    fn decide(budget_mib: u64, guests: Vec<GuestState>) -> Vec<u64> {
        let s = crate::fixtures::snapshot(100_000, 90_000, budget_mib, guests);
        let a = allocate(&PolicyConfig::default(), &s, &mut PolicyState::default());
        a.iter().map(|b| b / MIB).collect()
    }

    #[test]
    fn over_its_target_it_shrinks_the_guests_with_free_memory_first() {
        // 4096 MiB allocated, target 80% of 4000: 896 MiB to give back. The first guest has
        // free memory, the second none: only the first moves, by one step.
        assert_eq!(
            decide(4000, vec![guest(0, 1000), guest(0, 10)]),
            [1948, 2048]
        );
    }

    #[test]
    fn a_guest_under_pressure_shrinks_too_when_no_other_can() {
        // Both short of memory: both shrink, pressure or not.
        assert_eq!(decide(3000, vec![guest(0, 10), guest(0, 20)]), [1948, 1948]);
    }

    #[test]
    fn room_goes_first_to_the_guests_short_of_memory() {
        assert_eq!(
            decide(8000, vec![guest(1024, 100), guest(1024, 600)]),
            [1124, 1024]
        );
    }

    #[test]
    fn while_shrinking_no_guest_grows() {
        // 2048 + 600 + 600 MiB against a target of 80% of 4000: 48 MiB to give back. The
        // shares split would move 1048 out of the first guest and 500 into each other one;
        // a shrink request only takes, so the total cannot rise over the target.
        let a = decide(
            4000,
            vec![guest(0, 1500), guest(1448, 500), guest(1448, 500)],
        );
        assert_eq!(a, [1948, 600, 600]);
    }

    #[test]
    fn it_decides_every_interval_only() {
        let c = PolicyConfig::default();
        let mut state = PolicyState::default();
        let mut s = crate::fixtures::snapshot(100_000, 90_000, 2000, vec![guest(0, 1000)]);
        assert_eq!(allocate(&c, &s, &mut state)[0], 1948 * MIB);
        s.time_s += 5.0;
        assert_eq!(allocate(&c, &s, &mut state)[0], 2048 * MIB, "5 s later");
        s.time_s += 5.0;
        assert_eq!(allocate(&c, &s, &mut state)[0], 1948 * MIB, "10 s later");
    }
}
