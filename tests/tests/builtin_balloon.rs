//! QEMU's built-in virtio-balloon with the stock guest driver: the ground every later comparison
//! stands on, and the first proof that the harness measures what a user would check.

use balloon_lab::wait::{wait_for, Poll};
use balloon_lab::{BuiltinBalloon, Vm, VmConfig, MIB};
use std::time::Duration;

fn mib(bytes: u64) -> u64 {
    bytes / MIB
}

#[test]
fn stock_driver_binds_and_builtin_balloon_returns_memory() {
    let _ = env_logger::builder().is_test(true).try_init();
    let mut config = VmConfig::new("builtin");
    config.builtin_balloon = Some(BuiltinBalloon::default());
    let mut vm = Vm::start(config).expect("boot the mini guest");

    let bound = vm.balloon_driver_devices().unwrap();
    assert!(
        !bound.is_empty(),
        "virtio_balloon did not bind to a device: {bound:?}"
    );

    // Make the guest touch 700 MiB and free it, so the host holds memory the guest does not use.
    vm.touch_and_free(700).unwrap();
    let before = vm.host_memory().unwrap();
    assert!(
        before.rss_shmem >= 700 * MIB,
        "the guest's 700 MiB should be resident in QEMU's shared memory first: {before:?}"
    );

    vm.qmp.balloon(256 * MIB).unwrap();
    let qmp = &mut vm.qmp;
    wait_for(
        "query-balloon actual to reach 256 MiB",
        Duration::from_secs(120),
        Duration::from_millis(100),
        || {
            let actual = qmp.balloon_actual()?;
            Ok(if actual <= 256 * MIB {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("actual {} MiB", mib(actual)))
            })
        },
    )
    .unwrap();
    let after = vm.host_memory().unwrap();
    let dropped = before.rss_shmem.saturating_sub(after.rss_shmem);
    eprintln!(
        "RssShmem {} -> {} MiB (dropped {} MiB), VmRSS {} -> {} MiB",
        mib(before.rss_shmem),
        mib(after.rss_shmem),
        mib(dropped),
        mib(before.vm_rss),
        mib(after.vm_rss)
    );
    assert!(
        dropped >= 600 * MIB,
        "RssShmem dropped only {} MiB",
        mib(dropped)
    );
    let mem_total = vm.agent.meminfo().unwrap()["MemTotal"];
    assert!(
        mem_total <= 300 * MIB,
        "MemTotal {} MiB: the balloon should have taken it down to about 256 MiB",
        mib(mem_total)
    );

    // Deflate: the guest gets its memory back and can use it.
    vm.qmp.balloon(1024 * MIB).unwrap();
    let qmp = &mut vm.qmp;
    wait_for(
        "query-balloon actual to return to 1 GiB",
        Duration::from_secs(120),
        Duration::from_millis(100),
        || {
            let actual = qmp.balloon_actual()?;
            Ok(if actual >= 1024 * MIB {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("actual {} MiB", mib(actual)))
            })
        },
    )
    .unwrap();
    vm.touch_and_free(600).unwrap();
    assert_eq!(
        vm.agent.oom_kills().unwrap(),
        0,
        "the guest OOM-killed something"
    );
    assert!(vm.is_running());
}
