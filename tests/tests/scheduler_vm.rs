//! balloon-scheduler driving three guests behind our backend, with the budget below their sum:
//! a workload in one guest grows and shrinks, and memory follows it there and back.

use balloon_lab::backend::Backend;
use balloon_lab::scheduler::SchedulerProcess;
use balloon_lab::wait::{wait_for, Poll};
use balloon_lab::{Vm, VmConfig, MIB};
use scheduler::api::SchedulerStatus;
use std::time::Duration;

const GUESTS: [&str; 3] = ["a", "b", "c"];
const MEMORY_MIB: u64 = 512;
const BUDGET_MIB: u64 = 1100;

fn alloc(s: &SchedulerStatus, name: &str) -> u64 {
    s.last
        .as_ref()
        .and_then(|r| r.guests.iter().find(|g| g.name == name))
        .map_or(0, |g| g.allocation_bytes)
}

fn total(s: &SchedulerStatus) -> u64 {
    s.last.as_ref().map_or(u64::MAX, |r| {
        r.guests.iter().map(|g| g.allocation_bytes).sum()
    })
}

fn describe(s: &SchedulerStatus) -> String {
    GUESTS
        .iter()
        .map(|g| format!("{g}={}M", alloc(s, g) / MIB))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn memory_follows_a_growing_and_shrinking_workload_within_budget() {
    let _ = env_logger::builder().is_test(true).try_init();
    let mut backends = Vec::new();
    let mut vms = Vec::new();
    for name in GUESTS {
        let backend = Backend::start(name, &["--stats-interval", "1"]).unwrap();
        let mut config = VmConfig::new(name);
        config.mem_mib = MEMORY_MIB;
        config.vhost_user_balloon = Some(backend.device());
        vms.push(Vm::start(config).unwrap());
        backends.push(backend);
    }
    let mut guests = String::new();
    for (name, backend) in GUESTS.iter().zip(&backends) {
        guests.push_str(&format!(
            "[[guest]]\nname = \"{name}\"\nmemory = \"{MEMORY_MIB}M\"\nmin = \"160M\"\n\
             driver = {{ kind = \"backend\", control_socket = \"{}\" }}\n",
            backend.control_socket.display()
        ));
    }
    let config = format!(
        "tick_seconds = 1\nbudget = {{ bytes = \"{BUDGET_MIB}M\" }}\n\
         [policy]\nkind = \"shares\"\n[actuator]\nmax_step_bytes = 134217728\n{guests}"
    );
    let sched = SchedulerProcess::start("sched", &config).unwrap();
    let budget = BUDGET_MIB * MIB;
    let slack = 8 * MIB;

    // 1. Convergence: the guests come down to the budget.
    let settled = wait_for(
        "the guests to fit the budget",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let s = sched.status()?;
            // Equal shares and idle guests: about a third each, so c's growth shows.
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
    vms[2]
        .agent
        .spawn("for i in 1 2 3; do dd if=/dev/zero of=/tmp/ws$i bs=1M count=100 2>/dev/null; sleep 3; done")
        .unwrap();
    let grown = wait_for(
        "memory to move to c",
        Duration::from_secs(180),
        Duration::from_millis(500),
        || {
            let s = sched.status()?;
            let done = vms[2].agent.sh("ls /tmp/ws3 2>/dev/null || true")?;
            Ok(
                // 300 MiB of tmpfs on top of what the guest already used.
                if alloc(&s, "c") >= 450 * MIB
                    && !done.trim().is_empty()
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
    eprintln!("grown: {}", describe(&grown));
    let c_peak = alloc(&grown, "c");

    // 3. It shrinks: the memory goes back to the others.
    vms[2].agent.sh("rm -f /tmp/ws1 /tmp/ws2 /tmp/ws3").unwrap();
    let shrunk = wait_for(
        "memory to move back from c",
        Duration::from_secs(180),
        Duration::from_millis(500),
        || {
            let s = sched.status()?;
            Ok(
                if alloc(&s, "c") + 100 * MIB <= c_peak && total(&s) <= budget + slack {
                    Poll::Ready(s)
                } else {
                    Poll::Pending(describe(&s))
                },
            )
        },
    )
    .unwrap();
    eprintln!("shrunk: {}", describe(&shrunk));
    assert!(alloc(&shrunk, "a") + alloc(&shrunk, "b") > alloc(&grown, "a") + alloc(&grown, "b"));

    for (name, vm) in GUESTS.iter().zip(vms.iter_mut()) {
        assert_eq!(vm.agent.oom_kills().unwrap(), 0, "OOM kill in guest {name}");
        assert!(vm.agent.sh("echo ok").unwrap().contains("ok"));
    }
    // The trace recorded every tick with every guest.
    let trace = std::fs::read_to_string(&sched.trace).unwrap();
    let ticks = trace.lines().count();
    assert!(
        ticks as u64 >= shrunk.ticks,
        "{ticks} trace lines for {} ticks",
        shrunk.ticks
    );
}
