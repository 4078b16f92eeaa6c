//! The user-level balloon (balloon-guest) in a mini guest, served by our backend over
//! virtio-serial: its pinned pages go back to the host, it gives them back on request, and a
//! killed app's pages are the guest's again.

use balloon_lab::backend::Backend;
use balloon_lab::wait::{wait_for, Poll};
use balloon_lab::{Vm, VmConfig, MIB};
use balloon_protocol::{BackendStatus, ControlRequest};
use std::time::Duration;

const APP_PORT: &str = "org.balloon.app";

fn set_app_target(backend: &Backend, bytes: u64) {
    let reply = backend
        .request(ControlRequest::SetAppTarget {
            target_bytes: bytes,
        })
        .unwrap();
    assert!(reply.ok, "{reply:?}");
}

fn wait_app(backend: &Backend, what: &str, cond: impl Fn(&BackendStatus) -> bool) -> BackendStatus {
    wait_for(
        what,
        Duration::from_secs(120),
        Duration::from_millis(100),
        || {
            let s = backend.status()?;
            Ok(if cond(&s) {
                Poll::Ready(s)
            } else {
                Poll::Pending(format!("{:?}", s.app))
            })
        },
    )
    .unwrap()
}

#[test]
fn the_app_balloon_returns_memory_gives_it_back_and_is_released_when_killed() {
    let _ = env_logger::builder().is_test(true).try_init();
    // Free page reporting off, so that only the app returns the memory measured here.
    let backend = Backend::start("app", &["--no-free-page-reporting"]).unwrap();
    let mut config = VmConfig::new("app");
    config.vhost_user_balloon = Some(backend.device());
    config.serial_ports = vec![(APP_PORT.into(), backend.app_socket.clone())];
    let mut vm = Vm::start(config).unwrap();
    // Make the guest's free memory resident on the host, so that giving it up shows.
    vm.agent
        .sh("dd if=/dev/zero of=/tmp/fill bs=1M count=700 2>/dev/null && rm /tmp/fill")
        .unwrap();
    let start_app =
        "balloon-guest --connect serial:/dev/virtio-ports/org.balloon.app > /tmp/app.log 2>&1";
    vm.agent.spawn(start_app).unwrap();
    wait_app(&backend, "the app to connect", |s| s.app.connected);
    let before = vm.host_memory().unwrap().rss_shmem;

    set_app_target(&backend, 256 * MIB);
    let s = wait_app(&backend, "the app to hold 256 MiB", |s| {
        s.app.ballooned_bytes == 256 * MIB && s.app.held_bytes == 256 * MIB
    });
    assert!(s.app.reclaimable);
    assert_eq!(s.ballooned_bytes, 0, "the driver's balloon is separate");
    let after = vm.host_memory().unwrap().rss_shmem;
    eprintln!("RssShmem {} -> {} MiB", before / MIB, after / MIB);
    assert!(
        before.saturating_sub(after) >= 230 * MIB,
        "RssShmem dropped only {} MiB",
        before.saturating_sub(after) / MIB
    );

    // Deflate: the app gives everything back, and the guest can use it.
    set_app_target(&backend, 0);
    wait_app(&backend, "the app to give everything back", |s| {
        s.app.ballooned_bytes == 0 && s.app.held_bytes == 0
    });
    vm.agent
        .sh("dd if=/dev/zero of=/tmp/fill bs=1M count=600 2>/dev/null && rm /tmp/fill")
        .unwrap();

    // Inflate again, then kill -9 the app: the backend stops counting its pages and the guest
    // has the memory again.
    set_app_target(&backend, 256 * MIB);
    wait_app(&backend, "the app to hold 256 MiB again", |s| {
        s.app.ballooned_bytes == 256 * MIB
    });
    let avail_held = vm.agent.meminfo().unwrap()["MemAvailable"];
    vm.agent.sh("kill -9 $(pidof balloon-guest)").unwrap();
    wait_app(
        &backend,
        "the backend to release the killed app's pages",
        |s| s.app.ballooned_bytes == 0 && !s.app.connected,
    );
    let avail_after = vm.agent.meminfo().unwrap()["MemAvailable"];
    assert!(
        avail_after >= avail_held + 200 * MIB,
        "MemAvailable {} -> {} MiB",
        avail_held / MIB,
        avail_after / MIB
    );
    assert_eq!(vm.agent.oom_kills().unwrap(), 0);
    let log = vm.agent.sh("cat /tmp/app.log").unwrap();
    assert!(!log.contains("ERROR"), "{log}");
}
