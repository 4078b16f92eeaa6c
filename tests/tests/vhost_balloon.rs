//! Our vhost-user balloon backend behind QEMU 11's generic vhost-user device, with the stock
//! Linux virtio_balloon driver in the guest.

use balloon_lab::backend::Backend;
use balloon_lab::wait::{wait_for, Poll};
use balloon_lab::{Vm, VmConfig, MIB};
use std::time::Duration;

fn mib(bytes: u64) -> u64 {
    bytes / MIB
}

/// Waits until QEMU's RssShmem has dropped by 90% of `balloon` from `before` (the backend
/// discards beside the queue, so the memory may leave a moment after `actual`).
fn wait_memory_returned(
    vm: &Vm,
    before: &balloon_lab::host::ProcMemory,
    balloon: u64,
) -> balloon_lab::host::ProcMemory {
    wait_for(
        "RssShmem to drop by 90% of the balloon",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || {
            let now = vm.host_memory()?;
            Ok(
                if before.rss_shmem.saturating_sub(now.rss_shmem) >= balloon * 9 / 10 {
                    Poll::Ready(now)
                } else {
                    Poll::Pending(format!("RssShmem {} MiB", mib(now.rss_shmem)))
                },
            )
        },
    )
    .unwrap()
}

fn boot(name: &str, backend: &Backend) -> Vm {
    let mut config = VmConfig::new(name);
    config.vhost_user_balloon = Some(backend.device());
    Vm::start(config).expect("boot the mini guest with our balloon device")
}

#[test]
fn inflate_returns_memory_and_deflate_gives_it_back() {
    let _ = env_logger::builder().is_test(true).try_init();
    // Free page reporting off: it would return the freed memory on its own, racing the
    // measurement of what the balloon returns (it has its own test below).
    let backend = Backend::start("inflate", &["--no-free-page-reporting"]).unwrap();
    let mut vm = boot("inflate", &backend);
    let bound = vm.balloon_driver_devices().unwrap();
    assert!(!bound.is_empty(), "driver not bound: {bound:?}");
    let status = backend.status().unwrap();
    assert!(status.device_started, "{status:?}");
    assert!(status.config_change_channel, "{status:?}");

    vm.touch_and_free(700).unwrap();
    let before = vm.host_memory().unwrap();
    // A 1 GiB guest left with 256 MiB: the balloon holds 768 MiB.
    let balloon = 768 * MIB;
    backend.set_target(balloon).unwrap();
    let status = backend
        .wait_actual(balloon, Duration::from_secs(120))
        .unwrap();
    let after = wait_memory_returned(&vm, &before, balloon);
    let dropped = before.rss_shmem - after.rss_shmem;
    eprintln!(
        "RssShmem {} -> {} MiB (dropped {} MiB); status {status:?}",
        mib(before.rss_shmem),
        mib(after.rss_shmem),
        mib(dropped)
    );
    assert_eq!(status.ballooned_bytes, balloon);
    assert!(vm.agent.sh("echo alive").unwrap().contains("alive"));

    backend.set_target(0).unwrap();
    let status = backend.wait_actual(0, Duration::from_secs(120)).unwrap();
    assert_eq!(status.ballooned_bytes, 0);
    vm.touch_and_free(600).unwrap();
    assert_eq!(vm.agent.oom_kills().unwrap(), 0);
    assert_eq!(status.rejected, Default::default());
}

#[test]
fn free_page_reporting_returns_freed_memory_without_a_target() {
    let backend = Backend::start("report", &[]).unwrap();
    let mut vm = boot("report", &backend);
    vm.agent
        .sh("dd if=/dev/zero of=/tmp/fill bs=1M count=600 2>/dev/null")
        .unwrap();
    let full = vm.host_memory().unwrap().rss_shmem;
    vm.agent.sh("rm /tmp/fill").unwrap();
    let start = std::time::Instant::now();
    let after = wait_for(
        "RssShmem to drop by 400 MiB after the guest freed 600 MiB",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let now = vm.host_memory()?.rss_shmem;
            Ok(if full.saturating_sub(now) >= 400 * MIB {
                Poll::Ready(now)
            } else {
                Poll::Pending(format!("RssShmem {} MiB (from {})", mib(now), mib(full)))
            })
        },
    )
    .unwrap();
    let status = backend.status().unwrap();
    eprintln!(
        "RssShmem {} -> {} MiB in {:.1} s; reported free {} MiB",
        mib(full),
        mib(after),
        start.elapsed().as_secs_f64(),
        mib(status.reported_free_bytes)
    );
    assert_eq!(status.target_bytes, 0);
    assert_eq!(status.ballooned_bytes, 0);
    assert!(status.reported_free_bytes >= 400 * MIB, "{status:?}");
    // The guest still has all its memory and can use it again.
    vm.touch_and_free(600).unwrap();
    assert_eq!(vm.agent.oom_kills().unwrap(), 0);
}

#[test]
fn statistics_arrive_and_agree_with_the_guest() {
    let backend = Backend::start("stats", &["--stats-interval", "1"]).unwrap();
    let mut vm = boot("stats", &backend);
    // Fresh figures: newer than the moment we look at the guest's own.
    let stats = wait_for(
        "statistics younger than 1.5 s",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let s = backend.status()?;
            Ok(match s.stats {
                Some(st) if st.age_seconds < 1.5 && st.values.contains_key("available_memory") => {
                    Poll::Ready(st)
                }
                other => Poll::Pending(format!("{other:?}")),
            })
        },
    )
    .unwrap();
    let meminfo = vm.agent.meminfo().unwrap();
    eprintln!(
        "stats {:?}\nMemTotal {} MemAvailable {}",
        stats.values, meminfo["MemTotal"], meminfo["MemAvailable"]
    );
    assert_eq!(stats.values["total_memory"], meminfo["MemTotal"]);
    let avail = stats.values["available_memory"];
    assert!(
        avail.abs_diff(meminfo["MemAvailable"]) < 32 * MIB,
        "available_memory {} MiB vs MemAvailable {} MiB",
        mib(avail),
        mib(meminfo["MemAvailable"])
    );
    assert!(stats.values["free_memory"] <= stats.values["total_memory"]);
    // They keep coming: a snapshot that arrived (host clock: now - age) well after this one.
    let origin = std::time::Instant::now();
    let arrival = |age: f64| origin.elapsed().as_secs_f64() - age;
    let first = arrival(stats.age_seconds);
    wait_for(
        "a newer statistics snapshot",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let s = backend.status()?.stats.map(|s| arrival(s.age_seconds));
            Ok(match s {
                Some(t) if t > first + 0.5 => Poll::Ready(()),
                other => Poll::Pending(format!("arrival {other:?} vs {first}")),
            })
        },
    )
    .unwrap();
    assert_eq!(backend.status().unwrap().rejected.bad_stats, 0);
}

#[test]
fn a_backend_killed_mid_inflate_restarts_behind_the_keeper_and_the_inflation_completes() {
    // QEMU 11.1's generic device cannot reconnect (docs/qemu-vhost-user-base-reconnect.md):
    // behind vhost-user-keeper it never has to, its connection stays open.
    let mut backend = Backend::start_behind_keeper(
        "kill9",
        &["--no-free-page-reporting", "--stats-interval", "1"],
    )
    .unwrap();
    let mut vm = boot("kill9", &backend);
    vm.touch_and_free(700).unwrap();
    let before = vm.host_memory().unwrap();
    let balloon = 768 * MIB;
    backend.set_target(balloon).unwrap();
    let moving = wait_for(
        "the balloon to be on its way (64 MiB in)",
        Duration::from_secs(60),
        Duration::from_millis(2),
        || {
            let s = backend.status()?;
            Ok(if s.actual_bytes >= 64 * MIB {
                Poll::Ready(s.actual_bytes)
            } else {
                Poll::Pending(format!("actual {} MiB", mib(s.actual_bytes)))
            })
        },
    )
    .unwrap();
    backend.kill();
    assert!(
        moving < balloon,
        "the inflation had finished before the kill: not a mid-inflate crash"
    );
    let killed_at = std::time::Instant::now();
    backend.restart().unwrap();
    let status = backend.status().unwrap();
    assert_eq!(status.target_bytes, balloon, "the target must hold");
    let status = backend
        .wait_actual(balloon, Duration::from_secs(120))
        .unwrap();
    eprintln!(
        "killed at actual {} MiB; target reached {:.2} s after the kill",
        mib(moving),
        killed_at.elapsed().as_secs_f64()
    );
    assert!(status.device_started, "{status:?}");
    // Exact accounting across the crash: the page tracking lives in a file beside the state.
    assert_eq!(status.ballooned_bytes, balloon, "{status:?}");
    let after = wait_memory_returned(&vm, &before, balloon);
    eprintln!(
        "RssShmem {} -> {} MiB",
        mib(before.rss_shmem),
        mib(after.rss_shmem)
    );
    assert!(vm.is_running(), "QEMU must survive the backend's crash");
    assert!(vm.agent.sh("echo alive").unwrap().contains("alive"));
    // The statistics queue resumed too: a fresh snapshot from the new process.
    wait_for(
        "statistics from the restarted backend",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || {
            let s = backend.status()?;
            Ok(match s.stats {
                Some(st) if st.age_seconds < 1.5 => Poll::Ready(()),
                other => Poll::Pending(format!("{other:?}")),
            })
        },
    )
    .unwrap();

    backend.set_target(0).unwrap();
    let status = backend.wait_actual(0, Duration::from_secs(120)).unwrap();
    assert_eq!(status.ballooned_bytes, 0, "{status:?}");
    vm.touch_and_free(600).unwrap();
    assert_eq!(vm.agent.oom_kills().unwrap(), 0);
    let log = backend.keeper_log();
    assert_eq!(log.matches("frontend connected").count(), 1, "{log}");
    assert!(log.contains("replayed"), "{log}");
}

#[test]
fn behind_the_keeper_the_guest_reads_the_balloon_config_while_the_backend_is_down() {
    // QEMU serves a guest's config read in the vCPU thread by asking the backend: with the
    // backend down the keeper answers, or the guest would stop until a backend is back.
    let mut backend =
        Backend::start_behind_keeper("config-read", &["--no-free-page-reporting"]).unwrap();
    let mut config = VmConfig::new("config-read");
    config.vhost_user_balloon = Some(backend.device());
    // Lets the test read the device's registers through /dev/mem beside the driver.
    config.kernel_args = vec!["iomem=relaxed".into()];
    let mut vm = Vm::start(config).expect("boot");
    let balloon = 256 * MIB;
    backend.set_target(balloon).unwrap();
    backend
        .wait_actual(balloon, Duration::from_secs(120))
        .unwrap();
    let pages = (balloon / 4096) as u32;
    let read = vm.balloon_config(Duration::from_secs(60)).unwrap();
    assert_eq!(
        read,
        (pages, pages),
        "num_pages and actual from the backend"
    );

    backend.kill();
    let read = vm
        .balloon_config(Duration::from_secs(20))
        .expect("the guest's config read answered within 20 s while no backend is attached");
    assert_eq!(
        read,
        (pages, pages),
        "the keeper's answer: the last values seen"
    );
    assert!(vm.agent.sh("echo alive").unwrap().contains("alive"));

    backend.restart().unwrap();
    backend.set_target(0).unwrap();
    let status = backend.wait_actual(0, Duration::from_secs(120)).unwrap();
    assert_eq!(status.ballooned_bytes, 0, "{status:?}");
    assert_eq!(vm.balloon_config(Duration::from_secs(60)).unwrap(), (0, 0));
    vm.touch_and_free(600).unwrap();
    assert_eq!(vm.agent.oom_kills().unwrap(), 0);
    assert!(vm.is_running());
    let log = backend.keeper_log();
    assert_eq!(log.matches("frontend connected").count(), 1, "{log}");
}

#[test]
fn after_a_guest_reboot_only_the_new_kernels_balloon_is_tracked_and_discarded() {
    // A guest that reboots does not give its balloon back: the backend only sees the device
    // start again. The pages the old kernel ballooned are the new kernel's; if the backend
    // still counted them as ballooned, switching discards back on would punch holes in them.
    let backend = Backend::start("reboot", &["--no-free-page-reporting"]).unwrap();
    let mut config = VmConfig::new("reboot");
    config.vhost_user_balloon = Some(backend.device());
    config.allow_reboot = true;
    let mut vm = Vm::start(config).expect("boot");
    let set_discard = |enabled| {
        let reply = backend
            .request(balloon_protocol::ControlRequest::SetDiscard { enabled })
            .unwrap();
        assert!(reply.ok, "{reply:?}");
    };
    set_discard(false);
    backend.set_target(256 * MIB).unwrap();
    backend
        .wait_actual(256 * MIB, Duration::from_secs(120))
        .unwrap();

    // An abrupt reboot (no driver removal, no deflate), then a smaller balloon.
    vm.reboot_abruptly(|| {
        backend.set_target(64 * MIB).unwrap();
    })
    .unwrap();
    let up = vm.agent.sh("cat /proc/uptime").unwrap();
    assert!(
        up.split('.').next().unwrap().parse::<u64>().unwrap() < 60,
        "{up}"
    );
    let status = backend
        .wait_actual(64 * MIB, Duration::from_secs(120))
        .unwrap();
    assert_eq!(status.ballooned_bytes, 64 * MIB, "{status:?}");

    // The new kernel fills most of its memory with a checksummed file, discards come back
    // on, and the file is intact: only the new balloon's pages were discarded.
    vm.agent
        .sh("dd if=/dev/urandom of=/tmp/data bs=1M count=600 2>/dev/null && sha256sum /tmp/data > /tmp/data.sum")
        .unwrap();
    let before = vm.host_memory().unwrap();
    set_discard(true);
    let after = vm.host_memory().unwrap();
    eprintln!(
        "discards on: RssShmem {} -> {} MiB",
        mib(before.rss_shmem),
        mib(after.rss_shmem)
    );
    let check = vm.agent.run("sha256sum -c /tmp/data.sum").unwrap();
    assert!(check.success(), "{check:?}");
    assert!(before.rss_shmem - after.rss_shmem <= 64 * MIB + 4 * MIB);
    assert_eq!(vm.agent.oom_kills().unwrap(), 0);
}

#[test]
fn behind_the_keeper_a_backend_restarted_after_a_guest_reboot_resumes_the_new_rings() {
    // The keeper's journal after a reboot: the rings were stopped and started again, the new
    // kernel's setup is what a restarted backend must be told.
    let mut backend =
        Backend::start_behind_keeper("reboot-keeper", &["--no-free-page-reporting"]).unwrap();
    let mut config = VmConfig::new("reboot-keeper");
    config.vhost_user_balloon = Some(backend.device());
    config.allow_reboot = true;
    let mut vm = Vm::start(config).expect("boot");
    backend.set_target(128 * MIB).unwrap();
    backend
        .wait_actual(128 * MIB, Duration::from_secs(120))
        .unwrap();
    vm.reboot_abruptly(|| {}).unwrap();
    // The new kernel's driver inflates to the same target.
    backend
        .wait_actual(128 * MIB, Duration::from_secs(120))
        .unwrap();

    backend.kill();
    backend.restart().unwrap();
    backend.set_target(320 * MIB).unwrap();
    let status = backend
        .wait_actual(320 * MIB, Duration::from_secs(120))
        .unwrap();
    assert_eq!(status.ballooned_bytes, 320 * MIB, "{status:?}");
    assert!(vm.is_running());
    assert!(vm.agent.sh("echo alive").unwrap().contains("alive"));
    let log = backend.keeper_log();
    assert_eq!(log.matches("frontend connected").count(), 1, "{log}");
    assert!(log.contains("replayed"), "{log}");
}
