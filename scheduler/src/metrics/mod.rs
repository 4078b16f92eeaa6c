//! Prometheus metrics (text exposition format 0.0.4), served by a small HTTP server
//! (http.rs); off unless `metrics_listen` is set.

mod http;
#[cfg(test)]
mod tests;

pub use http::serve;

use crate::api::SchedulerStatus;
use crate::policy::host_level::HostLevel;
use crate::trace::{GuestCondition, TraceGuest};
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A label value as the exposition format writes it: `\`, `"` and line feeds escaped.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn guest_label(name: &str) -> String {
    format!("{{guest=\"{}\"}}", escape_label(name))
}

/// One metric family: `# HELP`, `# TYPE` and its samples (label set, value). Families without
/// samples are left out.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    if samples.is_empty() {
        return;
    }
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// The status as metrics. Host and guest gauges come from the latest tick and are absent before
/// the first one; the counters are always there.
pub fn render(status: &SchedulerStatus) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "balloon_scheduler_ticks_total",
        "counter",
        "Scheduling ticks run since start.",
        &[(String::new(), status.ticks)],
    );
    // Every known guest has an error counter from the start, at 0 until its first error.
    let mut guests: BTreeSet<&str> = status.drivers.keys().map(String::as_str).collect();
    guests.extend(status.driver_errors.keys().map(String::as_str));
    if let Some(last) = &status.last {
        guests.extend(last.guests.iter().map(|g| g.name.as_str()));
    }
    let errors: Vec<(String, u64)> = guests
        .iter()
        .map(|g| {
            let n = status.driver_errors.get(*g).copied().unwrap_or(0);
            (guest_label(g), n)
        })
        .collect();
    family(
        &mut out,
        "balloon_scheduler_driver_errors_total",
        "counter",
        "Driver errors per guest since start.",
        &errors,
    );
    let Some(last) = &status.last else {
        return out;
    };
    for (name, help, value) in [
        (
            "balloon_scheduler_host_total_bytes",
            "Host memory.",
            last.host_total_bytes,
        ),
        (
            "balloon_scheduler_host_available_bytes",
            "Host MemAvailable.",
            last.host_available_bytes,
        ),
        (
            "balloon_scheduler_budget_bytes",
            "Memory the guests may use together.",
            last.budget_bytes,
        ),
        (
            "balloon_scheduler_minimums_bytes",
            "The sum of the guests' minimums.",
            last.minimums_bytes,
        ),
        (
            "balloon_scheduler_budget_infeasible",
            "1 while the budget cannot hold the guests' minimums (every guest is held at its minimum).",
            u64::from(last.budget_infeasible),
        ),
    ] {
        family(&mut out, name, "gauge", help, &[(String::new(), value)]);
    }
    let levels: Vec<(String, u64)> = HostLevel::ALL
        .iter()
        .map(|l| {
            (
                format!("{{level=\"{l}\"}}"),
                u64::from(last.host_state == *l),
            )
        })
        .collect();
    family(
        &mut out,
        "balloon_scheduler_host_level",
        "gauge",
        "1 for the host's current free-memory level (high, soft, hard, low), 0 for the others.",
        &levels,
    );
    // A guest pinned by an operator may also be stalled or unreachable, which its state shows
    // instead; the pinned set says it either way.
    let pinned =
        |g: &TraceGuest| status.pinned.contains_key(&g.name) || g.state == GuestCondition::Pinned;
    type Field<'a> = Box<dyn Fn(&TraceGuest) -> Option<u64> + 'a>;
    let split = |g: &TraceGuest| g.balloon_split;
    let per_guest: [(&str, &str, Field); 14] = [
        (
            "memory_bytes",
            "Configured guest memory.",
            Box::new(|g| Some(g.memory_bytes)),
        ),
        (
            "allocation_bytes",
            "Memory the guest may use now (its memory minus the balloon's actual size).",
            Box::new(|g| Some(g.allocation_bytes)),
        ),
        (
            "balloon_target_bytes",
            "Balloon size asked for.",
            Box::new(|g| Some(g.balloon_target_bytes)),
        ),
        (
            "balloon_actual_bytes",
            "Balloon size reached.",
            Box::new(|g| Some(g.balloon_actual_bytes)),
        ),
        (
            "available_bytes",
            "The guest's MemAvailable, when it reports statistics.",
            Box::new(|g| g.available_bytes),
        ),
        (
            "pinned",
            "1 if an operator pinned the guest.",
            Box::new(|g| Some(u64::from(pinned(g)))),
        ),
        (
            "stalled",
            "1 if the guest's balloon stalled.",
            Box::new(|g| Some(u64::from(g.state == GuestCondition::Stalled))),
        ),
        (
            "reachable",
            "1 if the guest's driver answered.",
            Box::new(|g| Some(u64::from(g.state != GuestCondition::Unreachable))),
        ),
        (
            "size_disputed",
            "1 if the guest's word for its balloon disagrees with what the host holds back (it is budgeted by the host's figure).",
            Box::new(|g| Some(u64::from(g.size_disputed))),
        ),
        (
            "driver_balloon_bytes",
            "Our backend's guests: the part of the balloon the virtio_balloon driver holds.",
            Box::new(move |g| split(g).map(|s| s.driver_actual_bytes)),
        ),
        (
            "app_balloon_bytes",
            "Our backend's guests: the part of the balloon the guest app holds.",
            Box::new(move |g| split(g).map(|s| s.app_actual_bytes)),
        ),
        (
            "app_target_bytes",
            "Our backend's guests: the part of the balloon asked of the guest app.",
            Box::new(move |g| split(g).map(|s| s.app_target_bytes)),
        ),
        (
            "driver_stalled",
            "Our backend's guests: 1 if the driver stopped short of its part.",
            Box::new(move |g| split(g).map(|s| u64::from(s.driver_stalled))),
        ),
        (
            "app_stalled",
            "Our backend's guests: 1 if the guest app cannot take more.",
            Box::new(move |g| split(g).map(|s| u64::from(s.app_stalled))),
        ),
    ];
    for (suffix, help, field) in per_guest {
        let samples: Vec<(String, u64)> = last
            .guests
            .iter()
            .filter_map(|g| field(g).map(|v| (guest_label(&g.name), v)))
            .collect();
        family(
            &mut out,
            &format!("balloon_scheduler_guest_{suffix}"),
            "gauge",
            help,
            &samples,
        );
    }
    out
}
