//! Proportional share with an idle memory tax, after VMware ESX (Waldspurger, "Memory Resource
//! Management in VMware ESX Server", OSDI 2002).
//!
//! ESX reclaims from the guest with the fewest shares per page, where an idle page counts
//! k = 1/(1 - tax) times an active one. Done continuously, that equalises across guests
//! `shares / (active + k * idle)`: with a common price p, a guest may hold `c = shares * p` cost
//! units: if c is below its active memory it gets c bytes (all active), otherwise its active
//! memory plus (c - active)/k idle bytes. p is found by bisection so the allocations, each
//! clamped to its guest's bounds, fill the budget.
//!
//! Before sharing, every guest is given its working set (used memory plus a reserve) when the
//! budget can hold all of them: no guest is pushed below its working set while memory is free.

use super::{pressure_growth, under_pressure, PolicyConfig};
use crate::model::Snapshot;

fn allocation_at(price: f64, shares: f64, active: f64, k: f64) -> f64 {
    let c = shares * price;
    if c <= active {
        c
    } else {
        active + (c - active) / k
    }
}

pub fn allocate(config: &PolicyConfig, snap: &Snapshot) -> Vec<u64> {
    let budget = snap.host.budget_bytes as f64;
    let k = 1.0 / (1.0 - config.tax_rate.clamp(0.0, 0.99));
    let mut bounds: Vec<(f64, f64)> = snap
        .guests
        .iter()
        .map(|g| {
            let (lo, hi) = g.bounds();
            (lo as f64, hi as f64)
        })
        .collect();
    // Active memory: what the guest uses, and for a guest under pressure more, since its
    // used memory is capped by what it has and hides how much it wants.
    let active: Vec<f64> = snap
        .guests
        .iter()
        .map(|g| {
            let boost = if under_pressure(config, g) {
                pressure_growth(config, g.allocation_bytes())
            } else {
                0
            };
            (g.used_bytes() + boost) as f64
        })
        .collect();
    // Working-set protection, when everyone's working set fits: with the pressured guests'
    // growth if that fits too, else without it (a boost that does not fit must not cost the
    // other guests their protection).
    let floors = |demand: &dyn Fn(usize) -> f64| -> Vec<f64> {
        (0..bounds.len())
            .map(|i| {
                (demand(i) + config.guest_reserve_bytes as f64).clamp(bounds[i].0, bounds[i].1)
            })
            .collect()
    };
    let boosted = floors(&|i| active[i]);
    let plain = floors(&|i| snap.guests[i].used_bytes() as f64);
    let working = [boosted, plain]
        .into_iter()
        .find(|w| w.iter().sum::<f64>() <= budget);
    if let Some(working) = working {
        for (b, w) in bounds.iter_mut().zip(&working) {
            b.0 = *w;
        }
    }
    let shares: Vec<f64> = snap
        .guests
        .iter()
        .map(|g| g.spec.shares.max(1) as f64)
        .collect();
    let total_at = |price: f64| -> f64 {
        (0..bounds.len())
            .map(|i| allocation_at(price, shares[i], active[i], k).clamp(bounds[i].0, bounds[i].1))
            .sum()
    };
    let lows: f64 = bounds.iter().map(|b| b.0).sum();
    let highs: f64 = bounds.iter().map(|b| b.1).sum();
    let price = if lows >= budget {
        0.0
    } else if highs <= budget {
        f64::MAX
    } else {
        // total_at is non-decreasing in price; bracket then bisect.
        let mut hi = 1.0;
        while total_at(hi) < budget && hi < 1e30 {
            hi *= 2.0;
        }
        let mut lo = 0.0;
        for _ in 0..100 {
            let mid = (lo + hi) / 2.0;
            if total_at(mid) < budget {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    };
    (0..bounds.len())
        .map(|i| {
            let a = if price == f64::MAX {
                bounds[i].1
            } else {
                allocation_at(price, shares[i], active[i], k).clamp(bounds[i].0, bounds[i].1)
            };
            a as u64
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::MIB;
    use crate::model::GuestState;

    /// A 4 GiB guest with an empty balloon that uses `used_mib` of it.
    fn guest(name: &str, shares: u64, used_mib: u64, min_mib: u64, max_mib: u64) -> GuestState {
        crate::fixtures::guest(name, 4096)
            .bounded(min_mib, max_mib)
            .shares(shares)
            .available(4096 - used_mib)
    }

    fn snap(budget_mib: u64, guests: Vec<GuestState>) -> Snapshot {
        crate::fixtures::snapshot(16384, 8192, budget_mib, guests)
    }

    fn mib(v: &[u64]) -> Vec<u64> {
        v.iter().map(|b| b / MIB).collect()
    }

    #[test]
    fn fills_the_budget_and_honours_bounds() {
        let c = PolicyConfig::default();
        let s = snap(
            3000,
            vec![
                guest("a", 1000, 500, 1200, 4096),
                guest("b", 1000, 500, 0, 700),
                guest("c", 1000, 500, 0, 4096),
            ],
        );
        let a = allocate(&c, &s);
        assert!(a[0] >= 1200 * MIB, "{:?}", mib(&a));
        assert!(a[1] <= 700 * MIB, "{:?}", mib(&a));
        let total: u64 = a.iter().sum();
        assert!(total.abs_diff(3000 * MIB) < MIB, "{:?}", mib(&a));
    }

    #[test]
    fn idle_memory_is_taxed() {
        // Equal shares; a uses 2000 MiB, b only 500. Without the tax both get about half of
        // 4 GiB; with it the idle guest b pays for its idle memory and a gets more.
        let c = PolicyConfig::default();
        let s = snap(
            4096,
            vec![
                guest("a", 1000, 2000, 0, 4096),
                guest("b", 1000, 500, 0, 4096),
            ],
        );
        let a = allocate(&c, &s);
        assert!(a[0] > 2500 * MIB, "{:?}", mib(&a));
        assert!(a[1] >= 564 * MIB, "{:?}", mib(&a));
        let untaxed = PolicyConfig {
            tax_rate: 0.0,
            ..PolicyConfig::default()
        };
        let u = allocate(&untaxed, &s);
        assert!(
            a[1] < u[1],
            "the tax must take more from the idle guest: {:?} vs {:?}",
            mib(&a),
            mib(&u)
        );
    }

    #[test]
    fn shares_weigh_when_memory_is_short() {
        // Budget below the working sets: no protection, shares decide.
        let c = PolicyConfig::default();
        let s = snap(
            2000,
            vec![
                guest("a", 3000, 2000, 0, 4096),
                guest("b", 1000, 2000, 0, 4096),
            ],
        );
        let a = allocate(&c, &s);
        assert!(a[0] > 2 * a[1], "{:?}", mib(&a));
        assert!(a.iter().sum::<u64>().abs_diff(2000 * MIB) < MIB);
    }

    #[test]
    fn working_sets_are_protected_while_memory_is_free() {
        let c = PolicyConfig::default();
        // b has few shares but a large working set; the budget holds both working sets.
        let s = snap(
            3500,
            vec![
                guest("a", 10_000, 200, 0, 4096),
                guest("b", 10, 2500, 0, 4096),
            ],
        );
        let a = allocate(&c, &s);
        assert!(a[1] >= (2500 + 64) * MIB, "{:?}", mib(&a));
    }

    #[test]
    fn budget_below_the_minimums_gives_the_minimums() {
        let c = PolicyConfig::default();
        let s = snap(
            500,
            vec![guest("a", 1, 100, 400, 4096), guest("b", 1, 100, 400, 4096)],
        );
        assert_eq!(mib(&allocate(&c, &s)), vec![400, 400]);
    }
}
