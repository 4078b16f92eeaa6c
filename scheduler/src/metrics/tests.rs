use super::*;
use crate::policy::PolicyKind;
use crate::trace::TraceRecord;
use std::collections::{BTreeMap, HashSet};

const WEIRD: &str = "we\"ird\\na\nme";

fn guest(name: &str, state: GuestCondition, available: Option<u64>) -> TraceGuest {
    TraceGuest {
        name: name.into(),
        memory_bytes: 1 << 30,
        allocation_bytes: 3 << 28,
        used_bytes: available.map(|a| (3 << 28) - a),
        available_bytes: available,
        balloon_target_bytes: 1 << 28,
        balloon_actual_bytes: (1 << 28) + 4096,
        decided_allocation_bytes: 3 << 28,
        sent_balloon_bytes: None,
        state,
        balloon_split: None,
        size_disputed: false,
    }
}

fn status() -> SchedulerStatus {
    SchedulerStatus {
        ticks: 3,
        uptime_s: 6.5,
        last: Some(TraceRecord {
            time_s: 6.0,
            policy: PolicyKind::Shares,
            host_state: HostLevel::Soft,
            // Above 2^53: must not lose precision.
            host_total_bytes: (1 << 60) + 1,
            host_available_bytes: 1 << 30,
            budget_bytes: 4 << 30,
            minimums_bytes: 3 << 30,
            budget_infeasible: false,
            guests: vec![
                guest("a", GuestCondition::Ok, Some(1 << 27)),
                guest(WEIRD, GuestCondition::Stalled, None),
                guest("c", GuestCondition::Unreachable, Some(5 << 20)),
            ],
        }),
        drivers: ["a", WEIRD, "c", "d"]
            .iter()
            .map(|g| (g.to_string(), "backend".to_string()))
            .collect(),
        pinned: BTreeMap::from([("c".to_string(), 1 << 29)]),
        driver_errors: BTreeMap::from([("c".to_string(), 7)]),
    }
}

fn is_name(s: &str, colon: bool) -> bool {
    let mut chars = s.chars();
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':');
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
        && chars.all(ok)
}

/// Parses `{name="value",...}` with the format's escapes; None if malformed.
fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
    let mut rest = s.strip_prefix('{')?;
    let mut labels = Vec::new();
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return r.is_empty().then_some(labels);
        }
        let eq = rest.find('=')?;
        let name = &rest[..eq];
        if !is_name(name, false) {
            return None;
        }
        let mut chars = rest[eq + 1..].strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => value.push(match chars.next()?.1 {
                    '\\' => '\\',
                    '"' => '"',
                    'n' => '\n',
                    _ => return None,
                }),
                (_, '\n') => return None,
                (_, c) => value.push(c),
            }
        };
        labels.push((name.to_string(), value));
        rest = &rest[eq + 1 + 1 + end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// A sample: metric name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// Checks the whole text against the exposition format and returns its samples.
fn parse(text: &str) -> Vec<Sample> {
    assert!(text.ends_with('\n'), "no final line feed");
    let mut samples = Vec::new();
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = HashSet::new();
    let mut current: Option<String> = None;
    let mut series = HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let (kw, rest) = rest.split_once(' ').expect(line);
            let (name, arg) = rest.split_once(' ').expect(line);
            assert!(is_name(name, true), "{line}");
            match kw {
                "HELP" => {
                    assert!(helped.insert(name.to_string()), "second HELP: {line}");
                    assert!(!arg.is_empty());
                }
                "TYPE" => {
                    assert!(["counter", "gauge"].contains(&arg), "{line}");
                    let old = typed.insert(name.to_string(), arg.to_string());
                    assert!(old.is_none(), "second TYPE: {line}");
                    current = Some(name.to_string());
                }
                _ => panic!("unknown comment {line}"),
            }
            continue;
        }
        let (name_labels, value) = line.rsplit_once(' ').expect(line);
        let value: f64 = value.parse().expect(line);
        let (name, labels) = match name_labels.find('{') {
            Some(i) => (
                &name_labels[..i],
                parse_labels(&name_labels[i..]).unwrap_or_else(|| panic!("labels: {line}")),
            ),
            None => (name_labels, Vec::new()),
        };
        assert!(is_name(name, true), "{line}");
        assert_eq!(
            current.as_deref(),
            Some(name),
            "sample outside its family: {line}"
        );
        assert!(helped.contains(name), "no HELP: {line}");
        if typed[name] == "counter" {
            assert!(name.ends_with("_total"), "{line}");
        }
        assert!(series.insert(name_labels.to_string()), "repeated: {line}");
        samples.push((name.to_string(), labels, value));
    }
    samples
}

fn value(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && match label {
                    Some((k, v)) => l.len() == 1 && l[0].0 == k && l[0].1 == v,
                    None => l.is_empty(),
                }
        })
        .map(|s| s.2)
}

#[test]
fn every_line_follows_the_exposition_format() {
    let text = render(&status());
    let samples = parse(&text);
    // ticks; errors for a, WEIRD, c, d; 5 host and budget gauges; 4 levels; 8 gauges for each
    // of 3 guests and available for the 2 with statistics.
    assert_eq!(samples.len(), 1 + 4 + 5 + 4 + 3 * 8 + 2, "{text}");
    for (name, _, _) in &samples {
        assert!(name.starts_with("balloon_scheduler_"), "{name}");
    }
    // Integers are written as integers, even above 2^53.
    assert!(text.contains("\nballoon_scheduler_host_total_bytes 1152921504606846977\n"));
}

#[test]
fn label_values_are_escaped() {
    let text = render(&status());
    assert!(
        text.contains("balloon_scheduler_guest_stalled{guest=\"we\\\"ird\\\\na\\nme\"} 1\n"),
        "{text}"
    );
    // Escaped, the name stays on one line and reads back as itself.
    let samples = parse(&text);
    let weird: Vec<_> = samples
        .iter()
        .filter(|(_, l, _)| l.iter().any(|(_, v)| v == WEIRD))
        .collect();
    assert_eq!(weird.len(), 9, "{text}");
}

#[test]
fn values_follow_the_status() {
    let samples = parse(&render(&status()));
    let v = |name: &str, label: Option<(&str, &str)>| {
        value(&samples, &format!("balloon_scheduler_{name}"), label)
    };
    let g = |name| Some(("guest", name));
    assert_eq!(v("ticks_total", None), Some(3.0));
    assert_eq!(v("budget_bytes", None), Some((4u64 << 30) as f64));
    assert_eq!(v("minimums_bytes", None), Some((3u64 << 30) as f64));
    assert_eq!(v("budget_infeasible", None), Some(0.0));
    assert_eq!(v("host_available_bytes", None), Some((1u64 << 30) as f64));
    for (level, on) in [("high", 0.0), ("soft", 1.0), ("hard", 0.0), ("low", 0.0)] {
        assert_eq!(v("host_level", Some(("level", level))), Some(on), "{level}");
    }
    assert_eq!(v("guest_memory_bytes", g("a")), Some((1u64 << 30) as f64));
    assert_eq!(
        v("guest_allocation_bytes", g("a")),
        Some((3u64 << 28) as f64)
    );
    assert_eq!(
        v("guest_balloon_target_bytes", g("a")),
        Some((1u64 << 28) as f64)
    );
    assert_eq!(
        v("guest_balloon_actual_bytes", g("a")),
        Some(((1u64 << 28) + 4096) as f64)
    );
    assert_eq!(
        v("guest_available_bytes", g("a")),
        Some((1u64 << 27) as f64)
    );
    assert_eq!(v("guest_available_bytes", g(WEIRD)), None);
    // a: ok; WEIRD: stalled; c: pinned by the operator but unreachable.
    assert_eq!(v("guest_stalled", g("a")), Some(0.0));
    assert_eq!(v("guest_stalled", g(WEIRD)), Some(1.0));
    assert_eq!(v("guest_pinned", g("a")), Some(0.0));
    assert_eq!(v("guest_pinned", g("c")), Some(1.0));
    assert_eq!(v("guest_reachable", g("a")), Some(1.0));
    assert_eq!(v("guest_reachable", g(WEIRD)), Some(1.0));
    assert_eq!(v("guest_reachable", g("c")), Some(0.0));
    // Every known guest has an error counter, also d (no tick data yet) and those without
    // errors.
    assert_eq!(v("driver_errors_total", g("c")), Some(7.0));
    assert_eq!(v("driver_errors_total", g("a")), Some(0.0));
    assert_eq!(v("driver_errors_total", g("d")), Some(0.0));
    assert_eq!(v("guest_memory_bytes", g("d")), None);
}

#[test]
fn an_infeasible_budget_shows_as_a_gauge() {
    let mut st = status();
    if let Some(last) = st.last.as_mut() {
        last.budget_infeasible = true;
        last.minimums_bytes = 5 << 30;
    }
    let text = render(&st);
    assert!(
        text.contains("\nballoon_scheduler_budget_infeasible 1\n"),
        "{text}"
    );
    let samples = parse(&text);
    assert_eq!(
        value(&samples, "balloon_scheduler_minimums_bytes", None),
        Some((5u64 << 30) as f64)
    );
}

#[test]
fn before_the_first_tick_only_counters() {
    let mut st = status();
    st.last = None;
    let text = render(&st);
    let names: BTreeSet<String> = parse(&text).into_iter().map(|s| s.0).collect();
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        [
            "balloon_scheduler_driver_errors_total",
            "balloon_scheduler_ticks_total"
        ]
    );
    let empty = render(&SchedulerStatus::default());
    assert_eq!(parse(&empty).len(), 1, "{empty}");
}

#[test]
fn the_driver_and_app_parts_are_gauges_for_guests_that_have_them() {
    use crate::drivers::split::{BalloonMechanism, BalloonSplit};
    let mut st = status();
    if let Some(last) = st.last.as_mut() {
        last.guests[0].balloon_split = Some(BalloonSplit {
            mechanism: BalloonMechanism::Both,
            driver_target_bytes: 100 << 20,
            driver_actual_bytes: 90 << 20,
            app_target_bytes: 60 << 20,
            app_actual_bytes: 50 << 20,
            driver_stalled: true,
            app_stalled: false,
            handovers: 0,
        });
    }
    let samples = parse(&render(&st));
    let v = |name: &str, guest: &str| {
        value(
            &samples,
            &format!("balloon_scheduler_guest_{name}"),
            Some(("guest", guest)),
        )
    };
    assert_eq!(v("driver_balloon_bytes", "a"), Some((90u64 << 20) as f64));
    assert_eq!(v("app_balloon_bytes", "a"), Some((50u64 << 20) as f64));
    assert_eq!(v("app_target_bytes", "a"), Some((60u64 << 20) as f64));
    assert_eq!(v("driver_stalled", "a"), Some(1.0));
    assert_eq!(v("app_stalled", "a"), Some(0.0));
    // A guest whose driver has no parts (QMP, cloud-hypervisor, libvirt) has none of these.
    assert_eq!(v("app_balloon_bytes", "c"), None);
}
