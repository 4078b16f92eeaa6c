//! The status table `balloonctl status` and `watch` print (and the demo shows).

use crate::api::SchedulerStatus;

pub fn mib(b: u64) -> String {
    format!("{}M", b >> 20)
}

/// The status table. "target" and "actual" are memory the guest may use (its size minus the
/// balloon), as operators of QEMU's `balloon` command count.
pub fn table(s: &SchedulerStatus) -> String {
    let Some(last) = &s.last else {
        return "no tick yet\n".into();
    };
    let mut out = format!(
        "policy {}  host {}  available {}  budget {}  allocated {}  tick {}\n",
        last.policy,
        last.host_state,
        mib(last.host_available_bytes),
        mib(last.budget_bytes),
        mib(last.guests.iter().map(|g| g.allocation_bytes).sum()),
        s.ticks
    );
    out.push_str(&format!(
        "{:<16} {:>8} {:>8} {:>8} {:>10} {:>9}  {}\n",
        "GUEST", "MEMORY", "TARGET", "ACTUAL", "AVAILABLE", "PROGRESS", "STATE"
    ));
    for g in &last.guests {
        let target = g.memory_bytes.saturating_sub(g.balloon_target_bytes);
        let actual = g.allocation_bytes;
        let progress = if target == actual {
            "done".to_string()
        } else if target < actual {
            format!("-{}", mib(actual - target))
        } else {
            format!("+{}", mib(target - actual))
        };
        out.push_str(&format!(
            "{:<16} {:>8} {:>8} {:>8} {:>10} {:>9}  {}\n",
            g.name,
            mib(g.memory_bytes),
            mib(target),
            mib(actual),
            g.available_bytes.map_or("-".into(), mib),
            progress,
            g.state
        ));
    }
    out
}
