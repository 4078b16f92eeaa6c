//! balloon-scheduler driving three guests behind our backend, with the budget below their sum
//! (the demo's setup): a workload in one guest grows and shrinks, and memory follows it there
//! and back.

use balloon_lab::demo::{
    alloc, describe, grow_command, total, ThreeGuests, BUDGET_MIB, GUESTS, SHRINK_COMMAND,
    WORKLOAD_DONE_TEST,
};
use balloon_lab::wait::{wait_for, Poll};
use balloon_lab::MIB;
use std::time::Duration;

#[test]
fn memory_follows_a_growing_and_shrinking_workload_within_budget() {
    let _ = env_logger::builder().is_test(true).try_init();
    let mut lab = ThreeGuests::start(|_| {}).unwrap();
    let budget = BUDGET_MIB * MIB;
    let slack = 8 * MIB;
    let sched = &lab.scheduler;

    // 1. Convergence: the guests come down to the budget, about a third each.
    let settled = wait_for(
        "the guests to fit the budget",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let s = sched.status()?;
            Ok(
                if total(&s) <= budget + slack && alloc(&s, "c") < 420 * MIB {
                    Poll::Ready(s)
                } else {
                    Poll::Pending(describe(&s))
                },
            )
        },
    )
    .unwrap();
    eprintln!("settled: {}", describe(&settled));

    // 2. c's workload grows to 300 MiB of tmpfs, in steps.
    lab.vm("c").agent.spawn(&grow_command(300)).unwrap();
    let grown = wait_for(
        "memory to move to c",
        Duration::from_secs(180),
        Duration::from_millis(500),
        || {
            let s = lab.scheduler.status()?;
            let done = lab.vms[2].agent.run(WORKLOAD_DONE_TEST)?.success();
            Ok(
                if done && alloc(&s, "c") >= 450 * MIB && total(&s) <= budget + slack {
                    Poll::Ready(s)
                } else {
                    Poll::Pending(describe(&s))
                },
            )
        },
    )
    .unwrap();
    eprintln!("grown: {}", describe(&grown));
    let c_peak = alloc(&grown, "c");

    // 3. It shrinks: the memory goes back to the others. c's allocation falls on one tick and
    // a's and b's rise on later ones, so the wait covers both.
    let others_grown = alloc(&grown, "a") + alloc(&grown, "b");
    lab.vm("c").agent.sh(SHRINK_COMMAND).unwrap();
    let sched = &lab.scheduler;
    let shrunk = wait_for(
        "memory to move back from c",
        Duration::from_secs(180),
        Duration::from_millis(500),
        || {
            let s = sched.status()?;
            Ok(
                if alloc(&s, "c") + 100 * MIB <= c_peak
                    && alloc(&s, "a") + alloc(&s, "b") > others_grown
                    && total(&s) <= budget + slack
                {
                    Poll::Ready(s)
                } else {
                    Poll::Pending(describe(&s))
                },
            )
        },
    )
    .unwrap();
    eprintln!("shrunk: {}", describe(&shrunk));

    for (name, vm) in GUESTS.iter().zip(lab.vms.iter_mut()) {
        assert_eq!(vm.agent.oom_kills().unwrap(), 0, "OOM kill in guest {name}");
        assert!(vm.agent.sh("echo ok").unwrap().contains("ok"));
    }
    // The trace recorded every tick.
    let trace = std::fs::read_to_string(&lab.scheduler.trace).unwrap();
    let ticks = trace.lines().count();
    assert!(
        ticks as u64 >= shrunk.ticks,
        "{ticks} trace lines for {} ticks",
        shrunk.ticks
    );
}
