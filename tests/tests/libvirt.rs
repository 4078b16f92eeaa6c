//! balloon-scheduler over domains that a real libvirtd runs (Debian's, started by the test:
//! scripts/libvirtd-lab.sh), with the domains from examples/libvirt/ under TCG on QEMU 11.

use balloon_lab::backend::Backend;
use balloon_lab::demo::{alloc, describe, grow_command, SHRINK_COMMAND, WORKLOAD_DONE_TEST};
use balloon_lab::libvirt::{Domain, Libvirtd, STOCK_BALLOON_XML, VHOST_BALLOON_XML};
use balloon_lab::scheduler::SchedulerProcess;
use balloon_lab::wait::{wait_for, Poll};
use balloon_lab::MIB;
use scheduler::api::SchedulerStatus;
use std::time::{Duration, Instant};

const MEMORY_MIB: u64 = 512;

/// What libvirt says the guest has (`virsh dommemstat` actual), in bytes.
fn libvirt_actual(d: &Domain) -> u64 {
    d.memstat().unwrap().get("actual").copied().unwrap_or(0) * 1024
}

/// Waits until libvirt reports the guest at the scheduler's allocation (within 4 MiB: the
/// driver rounds to pages) and returns the scheduler's status then.
fn libvirt_agrees(sched: &SchedulerProcess, d: &Domain) -> SchedulerStatus {
    wait_for(
        "virsh dommemstat to agree with the scheduler",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let s = sched.status()?;
            let (want, have) = (alloc(&s, &d.name), libvirt_actual(d));
            Ok(if want > 0 && want.abs_diff(have) <= 4 * MIB {
                Poll::Ready(s)
            } else {
                Poll::Pending(format!(
                    "scheduler {} MiB, libvirt {} MiB",
                    want / MIB,
                    have / MIB
                ))
            })
        },
    )
    .unwrap()
}

#[test]
fn the_scheduler_discovers_libvirt_domains_and_moves_memory_as_the_workload_moves() {
    let libvirtd = Libvirtd::start("lv").unwrap();
    let mut a = libvirtd
        .boot(STOCK_BALLOON_XML, "lv-a", MEMORY_MIB, None)
        .unwrap();
    let mut b = libvirtd
        .boot(STOCK_BALLOON_XML, "lv-b", MEMORY_MIB, None)
        .unwrap();
    let budget = 800 * MIB;
    let sched = SchedulerProcess::start(
        "lv",
        &format!(
            "tick_seconds = 1\nbudget = {{ bytes = \"{}M\" }}\n[policy]\nkind = \"shares\"\n\
             [actuator]\nmax_step_bytes = 134217728\n\
             [[libvirt]]\nuri = \"{}\"\ndomains = \"^lv-\"\nmin = \"160M\"\nstats_interval_seconds = 1\n",
            budget / MIB,
            libvirtd.uri
        ),
    )
    .unwrap();
    let started = Instant::now();
    let fits = |s: &SchedulerStatus| alloc(s, "lv-a") + alloc(s, "lv-b") <= budget + 8 * MIB;

    // 1. Both are found and brought down to the budget.
    let settled = wait_for(
        "the domains to fit the budget",
        Duration::from_secs(120),
        Duration::from_millis(500),
        || {
            let s = sched.status()?;
            Ok(if alloc(&s, "lv-a") > 0 && fits(&s) {
                Poll::Ready(s)
            } else {
                Poll::Pending(describe(&s))
            })
        },
    )
    .unwrap();
    let fit_s = started.elapsed().as_secs_f64();
    eprintln!("fit the budget after {fit_s:.1} s: {}", describe(&settled));
    libvirt_agrees(&sched, &b);

    // 2. b's workload grows by 300 MiB: memory moves to it, 100 MiB of it at least, or as much
    // as b can take (its memory less 16 MiB): the first fit can leave b at 410 MiB of its 512.
    let b_before = alloc(&settled, "lv-b");
    let b_grown = (b_before + 100 * MIB).min((MEMORY_MIB - 16) * MIB);
    b.agent().spawn(&grow_command(300)).unwrap();
    let grown = wait_for(
        "memory to move to lv-b",
        Duration::from_secs(180),
        Duration::from_millis(500),
        || {
            let s = sched.status()?;
            let done = b.agent().run(WORKLOAD_DONE_TEST)?.success();
            Ok(if done && alloc(&s, "lv-b") >= b_grown && fits(&s) {
                Poll::Ready(s)
            } else {
                Poll::Pending(describe(&s))
            })
        },
    )
    .unwrap();
    eprintln!("grown: {}", describe(&grown));
    let moved = alloc(&grown, "lv-b") - b_before;
    libvirt_agrees(&sched, &b);

    // 3. It shrinks: the memory goes back to a.
    b.agent().sh(SHRINK_COMMAND).unwrap();
    let shrunk = wait_for(
        "memory to move back to lv-a",
        Duration::from_secs(180),
        Duration::from_millis(500),
        || {
            let s = sched.status()?;
            Ok(
                if alloc(&s, "lv-a") > alloc(&grown, "lv-a") + 64 * MIB && fits(&s) {
                    Poll::Ready(s)
                } else {
                    Poll::Pending(describe(&s))
                },
            )
        },
    )
    .unwrap();
    eprintln!(
        "shrunk: {}; moved to lv-b and back: {} MiB",
        describe(&shrunk),
        moved / MIB
    );
    libvirt_agrees(&sched, &a);
    for d in [&mut a, &mut b] {
        assert_eq!(d.agent().oom_kills().unwrap(), 0, "OOM kill in {}", d.name);
    }
    // The guests' statistics came through libvirt.
    let last = shrunk.last.unwrap();
    assert!(
        last.guests.iter().all(|g| g.available_bytes.is_some()),
        "{last:?}"
    );
}

#[test]
fn our_backend_is_the_balloon_of_a_libvirt_domain() {
    let libvirtd = Libvirtd::start("lv-vhost").unwrap();
    // No free page reporting: the memory the guest frees below stays on the host until the
    // balloon takes it, which is what is measured.
    let backend = Backend::start(
        "lv-vhost",
        &["--stats-interval", "1", "--no-free-page-reporting"],
    )
    .unwrap();
    let mut d = libvirtd
        .boot(
            VHOST_BALLOON_XML,
            "lv-vhost",
            MEMORY_MIB,
            Some(&backend.socket),
        )
        .unwrap();
    let status = wait_for(
        "the device to start",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let s = backend.status()?;
            Ok(if s.device_started {
                Poll::Ready(s)
            } else {
                Poll::Pending(format!("{s:?}"))
            })
        },
    )
    .unwrap();
    assert_eq!(status.guest_ram_bytes, MEMORY_MIB * MIB);
    let qemu_pid: u32 = std::fs::read_to_string(libvirtd.dir.join("root/run/qemu/lv-vhost.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    d.agent()
        .sh("dd if=/dev/zero of=/tmp/fill bs=1M count=300 2>/dev/null && rm /tmp/fill")
        .unwrap();
    let before = balloon_lab::host::proc_memory(qemu_pid).unwrap();

    // The scheduler drives the backend while libvirt owns the VM.
    let sched = SchedulerProcess::start(
        "lv-vhost",
        &format!(
            "tick_seconds = 1\nbudget = {{ bytes = \"4G\" }}\n[policy]\nkind = \"static\"\n\
             [[guest]]\nname = \"lv-vhost\"\nmemory = \"512M\"\nstatic = \"256M\"\n\
             driver = {{ kind = \"backend\", control_socket = \"{}\" }}\n",
            backend.control_socket.display()
        ),
    )
    .unwrap();
    let s = backend
        .wait_actual(256 * MIB, Duration::from_secs(120))
        .unwrap();
    assert_eq!(s.ballooned_bytes, 256 * MIB, "{s:?}");
    let after = wait_for(
        "QEMU's shared memory to drop",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let m = balloon_lab::host::proc_memory(qemu_pid)?;
            Ok(if m.rss_shmem + 200 * MIB <= before.rss_shmem {
                Poll::Ready(m)
            } else {
                Poll::Pending(format!("RssShmem {} MiB", m.rss_shmem / MIB))
            })
        },
    )
    .unwrap();
    eprintln!(
        "libvirt domain behind our backend: RssShmem {} -> {} MiB",
        before.rss_shmem / MIB,
        after.rss_shmem / MIB
    );
    let meminfo = d.agent().meminfo().unwrap();
    eprintln!(
        "guest MemTotal {} MiB",
        meminfo.get("MemTotal").unwrap_or(&0) / MIB
    );
    assert_eq!(d.agent().oom_kills().unwrap(), 0);
    // libvirt sees a running domain with no balloon of its own.
    assert!(libvirtd
        .virsh(&["domstate", "lv-vhost"])
        .unwrap()
        .contains("running"));
    drop(sched);
}
