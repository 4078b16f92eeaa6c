//! A fast spike on real guests: one guest's working set jumps by more than half its memory in
//! 3 s while the other holds idle memory, under a budget that holds both working sets only if
//! the idle guest gives up its memory. Under shares and pressure the spiking guest must not
//! be OOM-killed, must keep doing its work, and the guests must stay within the budget.

use balloon_lab::policy_vm;
use scheduler::policy::PolicyKind;
use scheduler::sim::Scenario;

/// Two 1 GiB guests (their kernels use about 150 MiB), a 1.5 GiB budget: "spiky" goes from
/// 250 to 850 MiB in 3 s at 20 s and back at 50 s, "idle" needs 250 MiB but starts with all
/// its memory. 64 MiB of swap each: more would let a slow policy page through.
const SCENARIO: &str = r#"
duration_s = 60
tick_s = 1
host_memory = "24G"
budget = "1536M"
[actuator]
max_step_bytes = 134217728
[[guest]]
name = "spiky"
memory = "1G"
min = "256M"
[guest.driver]
swap = "64M"
working_set = [[0, "250M"], [20, "250M"], [23, "850M"], [50, "850M"], [53, "250M"]]
[[guest]]
name = "idle"
memory = "1G"
min = "256M"
[guest.driver]
swap = "64M"
working_set = [[0, "250M"]]
"#;

fn spike(kind: PolicyKind) {
    let _ = env_logger::builder().is_test(true).try_init();
    let scenario = Scenario::parse(SCENARIO).unwrap();
    let f = policy_vm::run(&scenario, kind, None, &|m| eprintln!("{m}")).unwrap();
    eprintln!("{kind}: {f:?}");
    assert_eq!(f.oom_kills, 0, "{kind}: {:?}", f.guests);
    assert!(f.fit_s.is_some(), "{kind}: the guests never fit the budget");
    assert_eq!(
        f.over_budget_s, 0.0,
        "{kind}: {} bytes over",
        f.max_over_budget_bytes
    );
    // The spiking guest: at most a few seconds of its work lost while memory moved to it.
    let spiky = &f.guests[0];
    assert!(
        spiky.work >= scenario.duration_s - 10.0,
        "{kind}: spiky did {} s of work in {} s",
        spiky.work,
        scenario.duration_s
    );
}

#[test]
fn under_shares_a_guest_jumping_by_600_mib_in_3_s_keeps_working_without_oom() {
    spike(PolicyKind::Shares);
}

#[test]
fn under_pressure_a_guest_jumping_by_600_mib_in_3_s_keeps_working_without_oom() {
    spike(PolicyKind::Pressure);
}
