//! Both of our backend's mechanisms on one guest, driven by the scheduler (`balloon = "both"`).
//! 1. The guest's memory is mostly in use (swappable tmpfs data, a swap file, page cache): the
//!    virtio_balloon driver goes first and takes the whole balloon, the guest making room with
//!    its own algorithms (page cache dropped, tmpfs swapped out). Measured on Linux 6.12: the
//!    stock driver's allocations (__GFP_NORETRY) reclaim clean page cache and swap without
//!    stalling, so the app is not needed there.
//! 2. The driver goes away (unbound in the guest): its part stalls at zero, the scheduler's
//!    backend driver hands the balloon to the app, and the app holds it.

use balloon_lab::backend::Backend;
use balloon_lab::scheduler::SchedulerProcess;
use balloon_lab::wait::{wait_for, Poll};
use balloon_lab::{Vm, MIB};
use scheduler::drivers::split::BalloonSplit;
use std::time::Duration;

fn split(s: &scheduler::api::SchedulerStatus) -> Option<BalloonSplit> {
    s.last.as_ref()?.guests.first()?.balloon_split
}

#[test]
fn with_both_the_driver_goes_first_and_the_app_takes_over_when_it_stalls() {
    let _ = env_logger::builder().is_test(true).try_init();
    // Free page reporting off: it would hand the freed page cache back on its own.
    let backend = Backend::start(
        "both",
        &["--no-free-page-reporting", "--stats-interval", "1"],
    )
    .unwrap();
    let config = backend.debian_guest_with_app("both");
    let mut vm = Vm::start(config).unwrap();
    // The app's unit starts it at boot.
    backend
        .wait_app("the app to connect", |s| s.app.connected)
        .unwrap();
    // Most of its memory in use by something swappable (tmpfs pages, with a swap file), the
    // rest in page cache.
    let out = vm
        .agent
        .sh("dd if=/dev/zero of=/var/tmp/swap bs=1M count=1024 2>/dev/null && chmod 600 /var/tmp/swap && \
             mkswap /var/tmp/swap >/dev/null && swapon /var/tmp/swap && \
             mkdir -p /run/hold && mount -t tmpfs -o size=700M hold /run/hold && \
             dd if=/dev/urandom of=/run/hold/data bs=1M count=600 2>/dev/null && \
             dd if=/dev/zero of=/var/tmp/cache bs=1M count=200 2>/dev/null && sync && \
             grep -E 'MemFree|MemAvailable|^Cached|Shmem:|Swap' /proc/meminfo")
        .unwrap();
    eprintln!("{out}");
    let file_cache = |vm: &mut Vm| {
        let m = vm.agent.meminfo().unwrap();
        m["Active(file)"] + m["Inactive(file)"]
    };
    let swapped = |vm: &mut Vm| {
        let m = vm.agent.meminfo().unwrap();
        m["SwapTotal"] - m["SwapFree"]
    };
    let cache_before = file_cache(&mut vm);
    let swap_before = swapped(&mut vm);
    eprintln!(
        "page cache: {} MiB, swap used {} MiB",
        cache_before / MIB,
        swap_before / MIB
    );

    // The scheduler gives the guest 400 MiB of its 1 GiB: a 624 MiB balloon.
    let config = format!(
        "tick_seconds = 1\nbudget = {{ bytes = \"4G\" }}\n[policy]\nkind = \"static\"\n\
         [[guest]]\nname = \"both\"\nmemory = \"1G\"\nmin = \"256M\"\nstatic = \"400M\"\n\
         driver = {{ kind = \"backend\", control_socket = \"{}\", balloon = \"both\" }}\n",
        backend.control_socket.display()
    );
    let sched = SchedulerProcess::start("both", &config).unwrap();
    let balloon = 624 * MIB;
    let done = wait_for(
        "the balloon to reach 624 MiB between the driver and the app",
        Duration::from_secs(240),
        Duration::from_millis(500),
        || {
            let s = sched.status()?;
            Ok(match split(&s) {
                Some(b) if b.driver_actual_bytes + b.app_actual_bytes + 4 * MIB >= balloon => {
                    Poll::Ready(b)
                }
                other => Poll::Pending(format!("{other:?}")),
            })
        },
    )
    .unwrap();
    let cache_after = file_cache(&mut vm);
    let swap_after = swapped(&mut vm);
    eprintln!(
        "phase 1: driver {} MiB, app {} MiB; page cache {} -> {} MiB, swap used {} -> {} MiB",
        done.driver_actual_bytes / MIB,
        done.app_actual_bytes / MIB,
        cache_before / MIB,
        cache_after / MIB,
        swap_before / MIB,
        swap_after / MIB
    );
    assert!(
        done.app_actual_bytes < 4 * MIB,
        "the driver could take it all, yet the app was asked: {done:?}"
    );
    // The guest made the room with its own algorithms: page cache dropped, tmpfs swapped.
    assert!(
        cache_after + 100 * MIB <= cache_before,
        "page cache {} -> {} MiB",
        cache_before / MIB,
        cache_after / MIB
    );
    assert!(
        swap_after >= swap_before + 100 * MIB,
        "swap {swap_before} -> {swap_after}"
    );
    assert_eq!(vm.agent.oom_kills().unwrap(), 0);

    // 2. The driver goes away (unbound in the guest: it deflates everything and never comes
    // back): its part stalls at zero and the app takes the whole balloon.
    let devices = vm.balloon_driver_devices().unwrap();
    assert_eq!(devices.len(), 1, "{devices:?}");
    vm.agent
        .sh(&format!(
            "echo {} > /sys/bus/virtio/drivers/virtio_balloon/unbind",
            devices[0]
        ))
        .unwrap();
    let unbound = std::time::Instant::now();
    // What the app waits out before it inflates (PSI over its threshold, 10%).
    eprintln!(
        "after the unbind: {}",
        vm.agent.sh("head -1 /proc/pressure/memory").unwrap().trim()
    );
    let handed = wait_for(
        // Well before the actuator's 60 s stall hold would end: a hand-over restarts its
        // judgement of progress and gives the app a grace (without that, the app's first
        // seconds, while the guest's PSI average is still high, read as a stall).
        "the app to take over the balloon the driver left",
        Duration::from_secs(45),
        Duration::from_millis(500),
        || {
            let s = sched.status()?;
            Ok(match split(&s) {
                // The scheduler's actuator may hold the size lower for a while after the
                // driver's part fell away (a stall, to it): the app's part is what counts.
                Some(b) if b.driver_target_bytes == 0 && b.app_actual_bytes >= 400 * MIB => {
                    Poll::Ready(b)
                }
                other => Poll::Pending(format!("{other:?}")),
            })
        },
    )
    .unwrap();
    eprintln!(
        "phase 2: driver {} MiB, app {} MiB, {:.1} s after the driver went away",
        handed.driver_actual_bytes / MIB,
        handed.app_actual_bytes / MIB,
        unbound.elapsed().as_secs_f64()
    );
    assert!(handed.driver_actual_bytes < 4 * MIB, "{handed:?}");
    assert_eq!(vm.agent.oom_kills().unwrap(), 0);
}
