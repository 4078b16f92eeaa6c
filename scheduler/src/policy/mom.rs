//! The comparison baseline: oVirt MoM's shipped balloon policy. Every `mom_interval_s`, when
//! host free memory is below `mom_pressure_threshold`, each guest shrinks toward its used memory
//! plus a share of its free memory scaled by how much the host has left, at most `mom_step` of
//! its size per step; otherwise every guest grows by `mom_step` of its size. Host free memory is
//! `baseline_free_fraction`: the budget counts as the host's RAM.

use super::{baseline_free_fraction, due, planned, PolicyConfig, PolicyState};
use crate::model::Snapshot;

pub fn allocate(config: &PolicyConfig, snap: &Snapshot, state: &mut PolicyState) -> Vec<u64> {
    let current: Vec<u64> = snap.guests.iter().map(planned).collect();
    if !due(&mut state.mom_last_s, snap.time_s, config.mom_interval_s) {
        return current;
    }
    let host_free = baseline_free_fraction(snap);
    let shrink = host_free < config.mom_pressure_threshold;
    snap.guests
        .iter()
        .zip(current)
        .map(|(g, cur)| {
            let (lo, hi) = g.bounds();
            let step = (config.mom_step * g.spec.memory_bytes as f64) as u64;
            let next = if shrink {
                let used = g.used_bytes();
                let free = cur.saturating_sub(used);
                let keep = (free as f64 * (host_free / config.mom_pressure_threshold)) as u64;
                cur.saturating_sub(step).max(used + keep).min(cur)
            } else {
                cur + step
            };
            next.clamp(lo, hi)
        })
        .collect()
}
