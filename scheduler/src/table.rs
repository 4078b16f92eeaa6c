//! The status table `balloonctl status` and `watch` print (and the demo shows).

use crate::api::SchedulerStatus;
use crate::drivers::split::{BalloonMechanism, BalloonSplit};

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
    if last.budget_infeasible {
        out.push_str(&format!(
            "INFEASIBLE: the budget {} is below the guests' minimums {}: every guest is held at its minimum\n",
            mib(last.budget_bytes),
            mib(last.minimums_bytes)
        ));
    }
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
            if g.size_disputed {
                format!("{} (size disputed: budgeted by the host's figure)", g.state)
            } else {
                g.state.to_string()
            }
        ));
        if let Some(line) = g.balloon_split.as_ref().and_then(split_line) {
            out.push_str(&line);
        }
    }
    out
}

/// The driver's and the app's parts of a balloon, under its guest's row, where an app takes
/// part.
fn split_line(s: &BalloonSplit) -> Option<String> {
    if s.mechanism == BalloonMechanism::Driver && s.app_target_bytes == 0 {
        return None;
    }
    let stalled = |yes: bool| if yes { " stalled" } else { "" };
    Some(format!(
        "  {}: driver {} of {}{}, app {} of {}{}\n",
        s.mechanism,
        mib(s.driver_actual_bytes),
        mib(s.driver_target_bytes),
        stalled(s.driver_stalled),
        mib(s.app_actual_bytes),
        mib(s.app_target_bytes),
        stalled(s.app_stalled)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::host_level::HostLevel;
    use crate::policy::PolicyKind;
    use crate::trace::{GuestCondition, TraceGuest, TraceRecord};

    fn status(infeasible: bool) -> SchedulerStatus {
        SchedulerStatus {
            ticks: 7,
            last: Some(TraceRecord {
                time_s: 14.0,
                policy: PolicyKind::Shares,
                host_state: HostLevel::High,
                host_total_bytes: 8 << 30,
                host_available_bytes: 1 << 30,
                budget_bytes: 2 << 30,
                minimums_bytes: 2560 << 20,
                budget_infeasible: infeasible,
                guests: vec![TraceGuest {
                    name: "a".into(),
                    memory_bytes: 2 << 30,
                    allocation_bytes: 1280 << 20,
                    used_bytes: None,
                    available_bytes: None,
                    balloon_target_bytes: 768 << 20,
                    balloon_actual_bytes: 768 << 20,
                    decided_allocation_bytes: 1280 << 20,
                    sent_balloon_bytes: None,
                    state: GuestCondition::Unreachable,
                    balloon_split: None,
                    size_disputed: false,
                }],
            }),
            ..Default::default()
        }
    }

    #[test]
    fn an_infeasible_budget_is_shown_in_the_header() {
        let text = table(&status(true));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1],
            "INFEASIBLE: the budget 2048M is below the guests' minimums 2560M: every guest is held at its minimum"
        );
        assert!(
            lines[3].starts_with("a ") && lines[3].ends_with("done  unreachable"),
            "{text}"
        );
        let feasible = table(&status(false));
        assert!(!feasible.contains("INFEASIBLE"), "{feasible}");
        assert!(feasible.lines().nth(1).unwrap().starts_with("GUEST"));
    }

    #[test]
    fn the_driver_and_app_parts_show_under_their_guest() {
        let mut s = status(false);
        let split = BalloonSplit {
            mechanism: BalloonMechanism::Both,
            driver_target_bytes: 151 << 20,
            driver_actual_bytes: 151 << 20,
            app_target_bytes: 249 << 20,
            app_actual_bytes: 200 << 20,
            driver_stalled: true,
            app_stalled: false,
            handovers: 0,
        };
        s.last.as_mut().unwrap().guests[0].balloon_split = Some(split);
        let text = table(&s);
        assert_eq!(
            text.lines().nth(3),
            Some("  both: driver 151M of 151M stalled, app 200M of 249M"),
            "{text}"
        );
        // A driver-only balloon adds no line.
        s.last.as_mut().unwrap().guests[0].balloon_split = Some(BalloonSplit {
            mechanism: BalloonMechanism::Driver,
            app_target_bytes: 0,
            ..split
        });
        assert_eq!(table(&s).lines().count(), 3);
    }
}
