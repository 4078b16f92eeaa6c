//! Our vhost-user balloon backend behind QEMU 11's generic vhost-user device, with the stock
//! Linux virtio_balloon driver in the guest.

use balloon_lab::backend::Backend;
use balloon_lab::{Vm, VmConfig, MIB};
use std::time::Duration;

fn mib(bytes: u64) -> u64 {
    bytes / MIB
}

fn boot(name: &str, backend: &Backend) -> Vm {
    let mut config = VmConfig::new(name);
    config.vhost_user_balloon = Some(backend.device());
    Vm::start(config).expect("boot the mini guest with our balloon device")
}

#[test]
fn inflate_returns_memory_and_deflate_gives_it_back() {
    let _ = env_logger::builder().is_test(true).try_init();
    let backend = Backend::start("inflate", &[]).unwrap();
    let mut vm = boot("inflate", &backend);
    let bound = vm
        .agent
        .sh("ls /sys/bus/virtio/drivers/virtio_balloon/")
        .unwrap();
    assert!(bound.contains("virtio"), "driver not bound: {bound}");
    let status = backend.status().unwrap();
    assert!(status.device_started, "{status:?}");
    assert!(status.config_change_channel, "{status:?}");

    vm.agent
        .sh("dd if=/dev/zero of=/tmp/fill bs=1M count=700 2>/dev/null && rm /tmp/fill")
        .unwrap();
    let before = vm.host_memory().unwrap();
    // A 1 GiB guest left with 256 MiB: the balloon holds 768 MiB.
    let balloon = 768 * MIB;
    backend.set_target(balloon).unwrap();
    let status = backend
        .wait_actual(balloon, Duration::from_secs(120))
        .unwrap();
    let after = vm.host_memory().unwrap();
    let dropped = before.rss_shmem.saturating_sub(after.rss_shmem);
    eprintln!(
        "RssShmem {} -> {} MiB (dropped {} MiB); status {status:?}",
        mib(before.rss_shmem),
        mib(after.rss_shmem),
        mib(dropped)
    );
    assert_eq!(status.ballooned_bytes, balloon);
    assert!(
        dropped >= balloon * 9 / 10,
        "RssShmem dropped {} MiB, want >= 90% of {} MiB",
        mib(dropped),
        mib(balloon)
    );
    assert!(vm.agent.sh("echo alive").unwrap().contains("alive"));

    backend.set_target(0).unwrap();
    let status = backend.wait_actual(0, Duration::from_secs(120)).unwrap();
    assert_eq!(status.ballooned_bytes, 0);
    vm.agent
        .sh("dd if=/dev/zero of=/tmp/fill bs=1M count=600 2>/dev/null && rm /tmp/fill")
        .unwrap();
    assert_eq!(vm.agent.oom_kills().unwrap(), 0);
    assert_eq!(status.rejected, Default::default());
}
