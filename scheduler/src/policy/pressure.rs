//! Reactive policy, in the manner of oVirt MoM with ESX's host levels: when host free memory
//! falls through the levels (or the guests exceed the budget), take memory from the guests with
//! the most to spare, harder at lower levels; when the host has room, give memory to guests that
//! show pressure (little available memory, swap-ins, major faults).

use super::{planned, pressure_growth, under_pressure, HostLevel, PolicyConfig};
use crate::model::{GuestState, Snapshot};

pub fn allocate(config: &PolicyConfig, snap: &Snapshot, level: HostLevel) -> Vec<u64> {
    let mut alloc: Vec<u64> = snap.guests.iter().map(planned).collect();
    let bounds: Vec<(u64, u64)> = snap.guests.iter().map(GuestState::bounds).collect();
    let pressured: Vec<bool> = snap
        .guests
        .iter()
        .map(|g| under_pressure(config, g))
        .collect();
    let host = &snap.host;
    // What each guest can spare at this level: at high and soft, only free memory above its
    // reserve; at hard, above half the reserve; at low, anything above its minimum. A guest
    // under pressure spares nothing unless the host is low.
    let reserve = match level {
        HostLevel::High | HostLevel::Soft => config.guest_reserve_bytes,
        HostLevel::Hard => config.guest_reserve_bytes / 2,
        HostLevel::Low => 0,
    };
    // Above the high level a donor also keeps the free share below which it would itself
    // count as under pressure: squeezed to its reserve alone, a large guest shows pressure on
    // the next tick, takes its memory back, and two guests hand the same memory back and forth
    // while the one that needs it waits.
    let keep = |alloc: u64| match level {
        HostLevel::High => reserve.max((config.guest_pressure_free * alloc as f64) as u64),
        _ => reserve,
    };
    let mut spare: Vec<u64> = snap
        .guests
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let free = match (level, g.stats) {
                (HostLevel::Low, _) => alloc[i],
                (_, _) if pressured[i] => 0,
                // Available memory is the guest's now; a balloon still inflating will take
                // the rest of its target from it.
                (_, Some(s)) => s
                    .available_bytes
                    .saturating_sub(
                        g.balloon_target_bytes
                            .saturating_sub(g.balloon_actual_bytes),
                    )
                    .saturating_sub(keep(alloc[i])),
                (_, None) => 0,
            };
            free.min(alloc[i].saturating_sub(bounds[i].0))
        })
        .collect();
    // Takes up to `amount` from the guests with the most to spare; returns what it got.
    let take = |amount: u64, alloc: &mut Vec<u64>, spare: &mut Vec<u64>| -> u64 {
        let mut order: Vec<usize> = (0..alloc.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(spare[i]));
        let mut got = 0;
        for i in order {
            let t = spare[i].min(amount - got);
            alloc[i] -= t;
            spare[i] -= t;
            got += t;
            if got == amount {
                break;
            }
        }
        got
    };
    // 1. Whatever the budget or the host's free level needs back.
    let total: u64 = alloc.iter().sum();
    let host_short = if level > HostLevel::High {
        ((config.high_free * host.total_bytes as f64) as u64).saturating_sub(host.available_bytes)
    } else {
        0
    };
    let need = total.saturating_sub(host.budget_bytes) + host_short;
    if need > 0 {
        take(need, &mut alloc, &mut spare);
    }
    // 2. Guests under pressure grow, from the budget's room while the host is at high, and
    //    otherwise (or beyond it) from what other guests can spare.
    let mut room = if level == HostLevel::High {
        host.budget_bytes.saturating_sub(alloc.iter().sum())
    } else {
        0
    };
    // The guests with the least memory free (as a share of what they have) come first.
    let mut needy: Vec<usize> = (0..alloc.len()).filter(|&i| pressured[i]).collect();
    needy.sort_by(|&a, &b| free_share(&snap.guests[a]).total_cmp(&free_share(&snap.guests[b])));
    for i in needy {
        let want = pressure_growth(config, alloc[i]).min(bounds[i].1.saturating_sub(alloc[i]));
        if room < want {
            // Donors are the unpressured guests; this one's own spare is already 0.
            room += take(want - room, &mut alloc, &mut spare);
        }
        let give = want.min(room);
        alloc[i] += give;
        room -= give;
    }
    alloc
        .iter()
        .zip(&bounds)
        .map(|(a, (lo, hi))| (*a).clamp(*lo, *hi))
        .collect()
}

/// Available memory as a share of the allocation (0 without statistics).
fn free_share(g: &GuestState) -> f64 {
    let alloc = g.allocation_bytes().max(1) as f64;
    g.stats.map_or(0.0, |s| s.available_bytes as f64 / alloc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::MIB;

    /// A 2 GiB guest (minimum 256 MiB) with a balloon of `balloon_mib` and `available_mib`
    /// MemAvailable.
    fn guest(balloon_mib: u64, available_mib: u64) -> GuestState {
        crate::fixtures::guest("g", 2048)
            .bounded(256, 2048)
            .balloon(balloon_mib, balloon_mib)
            .available(available_mib)
    }

    fn snap(available_mib: u64, budget_mib: u64, guests: Vec<GuestState>) -> Snapshot {
        crate::fixtures::snapshot(10_000, available_mib, budget_mib, guests)
    }

    #[test]
    fn over_budget_takes_from_the_guest_with_most_to_spare() {
        let c = PolicyConfig::default();
        let s = snap(5000, 3596, vec![guest(0, 1500), guest(0, 300)]);
        let a = allocate(&c, &s, HostLevel::High);
        // 500 MiB over budget, all from the first guest.
        assert_eq!(a, vec![1548 * MIB, 2048 * MIB]);
    }

    #[test]
    fn lower_levels_squeeze_harder() {
        let c = PolicyConfig::default();
        // Host at 1% free: at low, guests go toward their minimum even without free memory.
        let s = snap(100, 100_000, vec![guest(0, 10), guest(0, 10)]);
        let soft = allocate(&c, &s, HostLevel::Soft);
        let low = allocate(&c, &s, HostLevel::Low);
        assert_eq!(
            soft,
            vec![2048 * MIB, 2048 * MIB],
            "nothing free to give at soft"
        );
        assert!(low.iter().sum::<u64>() < 4096 * MIB - 400 * MIB, "{low:?}");
        assert!(low.iter().all(|a| *a >= 256 * MIB));
    }

    #[test]
    fn a_donor_is_not_squeezed_into_pressure_and_the_neediest_guest_grows_first() {
        // At the budget: a (2048 MiB, 300 free, not under pressure at 10%) can spare memory;
        // b has nothing free. a gives only down to 10% free of what it keeps, so it is not
        // under pressure next tick (before, it went to its 64 MiB reserve, showed pressure,
        // and took the memory back, tick after tick).
        let c = PolicyConfig::default();
        let s = snap(8000, 3072, vec![guest(0, 300), guest(1024, 0)]);
        let a = allocate(&c, &s, HostLevel::High);
        let a_free = 300 * MIB - (2048 * MIB - a[0]);
        assert!(a[0] < 2048 * MIB && a[1] > 1024 * MIB, "{a:?}");
        assert!(
            a_free as f64 >= c.guest_pressure_free * a[0] as f64,
            "a left with {} MiB free of {} MiB",
            a_free / MIB,
            a[0] / MIB
        );
        // Both under pressure (a has 100 MiB free of 1536), 200 MiB of room: it goes to b,
        // the one with nothing free, though a comes first.
        let s = snap(
            8000,
            1536 + 1024 + 200,
            vec![guest(512, 100), guest(1024, 0)],
        );
        let a = allocate(&c, &s, HostLevel::High);
        assert_eq!(a, [1536 * MIB, 1224 * MIB]);
    }

    #[test]
    fn a_guest_under_pressure_gets_memory_when_the_host_has_room() {
        let c = PolicyConfig::default();
        let s = snap(8000, 8000, vec![guest(1024, 20), guest(1024, 600)]);
        let a = allocate(&c, &s, HostLevel::High);
        assert!(a[0] > 1024 * MIB, "{a:?}");
        assert_eq!(a[1], 1024 * MIB);
        // While the host is short, only from what the other guest can spare.
        let b = allocate(&c, &s, HostLevel::Soft);
        assert!(b[0] > 1024 * MIB, "{b:?}");
        assert_eq!(b[0] + b[1], 2048 * MIB, "{b:?}");
    }
}
