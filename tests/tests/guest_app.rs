//! The user-level balloon (balloon-guest) in a mini guest, served by our backend over
//! virtio-serial: its pinned pages go back to the host, it gives them back on request, and a
//! killed app's pages are the guest's again.

use balloon_lab::backend::{app_as_its_unit, Backend};
use balloon_lab::wait::{wait_for, Poll};
use balloon_lab::{Vm, VmConfig, MIB};
use std::time::Duration;

#[test]
fn the_app_balloon_returns_memory_gives_it_back_and_is_released_when_killed() {
    let _ = env_logger::builder().is_test(true).try_init();
    // Free page reporting off, so that only the app returns the memory measured here.
    let backend = Backend::start("app", &["--no-free-page-reporting"]).unwrap();
    let mut config = VmConfig::new("app");
    config.vhost_user_balloon = Some(backend.device());
    config.serial_ports = vec![backend.app_port()];
    let mut vm = Vm::start(config).unwrap();
    // Make the guest's free memory resident on the host, so that giving it up shows.
    vm.touch_and_free(700).unwrap();
    let start_app =
        "balloon-guest --connect serial:/dev/virtio-ports/org.balloon.app > /tmp/app.log 2>&1";
    vm.agent.spawn(start_app).unwrap();
    backend
        .wait_app("the app to connect", |s| s.app.connected)
        .unwrap();
    let before = vm.host_memory().unwrap().rss_shmem;

    backend.set_app_target(256 * MIB).unwrap();
    let s = backend
        .wait_app("the app to hold 256 MiB", |s| {
            s.app.ballooned_bytes == 256 * MIB && s.app.held_bytes == 256 * MIB
        })
        .unwrap();
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
    backend.deflate_app().unwrap();
    vm.touch_and_free(600).unwrap();

    // Inflate again, then kill -9 the app: the backend stops counting its pages and the guest
    // has the memory again.
    backend.set_app_target(256 * MIB).unwrap();
    backend
        .wait_app("the app to hold 256 MiB again", |s| {
            s.app.ballooned_bytes == 256 * MIB
        })
        .unwrap();
    let avail_held = vm.agent.meminfo().unwrap()["MemAvailable"];
    vm.agent.sh("kill -9 $(pidof balloon-guest)").unwrap();
    backend
        .wait_app("the backend to release the killed app's pages", |s| {
            s.app.ballooned_bytes == 0 && !s.app.connected
        })
        .unwrap();
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

/// Boots a 1 GiB mini guest with the app's port and starts the app with `args`.
fn boot_with_app(name: &str, app_args: &str) -> (Backend, Vm) {
    let backend = Backend::start(name, &["--no-free-page-reporting"]).unwrap();
    let mut config = VmConfig::new(name);
    config.vhost_user_balloon = Some(backend.device());
    config.serial_ports = vec![backend.app_port()];
    let mut vm = Vm::start(config).unwrap();
    vm.agent.spawn(&app_as_its_unit(app_args)).unwrap();
    backend
        .wait_app("the app to connect", |s| s.app.connected)
        .unwrap();
    (backend, vm)
}

#[test]
fn compaction_moves_nothing_the_app_holds_and_corrupts_nothing() {
    let (backend, mut vm) = boot_with_app("compact", "--pfn-file /tmp/pfns.json");
    // A guest program's data, checksummed.
    vm.agent
        .sh("dd if=/dev/urandom of=/tmp/data bs=1M count=100 2>/dev/null && md5sum /tmp/data > /tmp/data.md5")
        .unwrap();
    backend.set_app_target(256 * MIB).unwrap();
    backend
        .wait_app("the app to hold 256 MiB", |s| s.app.held_bytes == 256 * MIB)
        .unwrap();
    assert_eq!(
        vm.agent
            .sh("cat /proc/sys/vm/compact_unevictable_allowed")
            .unwrap()
            .trim(),
        "0",
        "the app keeps compaction off its locked pages"
    );
    let pfns = |vm: &mut Vm| -> serde_json::Value {
        // The file is rewritten every second; read it once it covers all 256 MiB.
        let v: serde_json::Value =
            serde_json::from_str(&vm.agent.sh("cat /tmp/pfns.json").unwrap()).unwrap();
        v
    };
    let pages = |ranges: &serde_json::Value| -> u64 {
        ranges
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["count"].as_u64().unwrap())
            .sum()
    };
    let before = wait_for(
        "the PFN file to cover 256 MiB",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let v = pfns(&mut vm);
            Ok(if pages(&v["reported"]) == 65536 {
                Poll::Ready(v)
            } else {
                Poll::Pending(v.to_string())
            })
        },
    )
    .unwrap();
    assert_eq!(before["reported"], before["current"]);
    for _ in 0..5 {
        vm.agent
            .sh("sync; echo 3 > /proc/sys/vm/drop_caches; echo 1 > /proc/sys/vm/compact_memory")
            .unwrap();
    }
    // A fresh snapshot, written after the compaction runs.
    vm.agent.sh("rm -f /tmp/pfns.json").unwrap();
    let after = wait_for(
        "a new PFN file",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            Ok(match vm.agent.run("cat /tmp/pfns.json")? {
                out if out.success() => {
                    Poll::Ready(serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap())
                }
                _ => Poll::Pending("not yet".into()),
            })
        },
    )
    .unwrap();
    assert_eq!(after["current"], before["current"], "a held page moved");
    assert_eq!(after["reported"], after["current"]);
    assert!(vm
        .agent
        .sh("md5sum -c /tmp/data.md5")
        .unwrap()
        .contains("OK"));
    assert_eq!(vm.agent.oom_kills().unwrap(), 0);
}

#[test]
fn a_target_larger_than_the_guest_can_give_stops_short_without_oom() {
    let (backend, mut vm) = boot_with_app("greedy", "");
    // The guest keeps 400 MiB in tmpfs (no swap): it cannot give 900 MiB of its 1 GiB.
    vm.agent
        .sh("dd if=/dev/zero of=/tmp/keep bs=1M count=400 2>/dev/null")
        .unwrap();
    backend.set_app_target(900 * MIB).unwrap();
    let s = backend
        .wait_app("the app to stop short and say so", |s| {
            s.app.stalled && s.app.held_bytes > 0
        })
        .unwrap();
    eprintln!("app holds {} MiB of 900", s.app.held_bytes / MIB);
    assert!(s.app.held_bytes < 900 * MIB);
    assert_eq!(vm.agent.oom_kills().unwrap(), 0);
    // The guest still works and its data is there.
    assert_eq!(
        vm.agent
            .sh("ls -l /tmp/keep | awk '{print $5}'")
            .unwrap()
            .trim(),
        "419430400"
    );
}

#[test]
fn the_systemd_unit_starts_at_boot_follows_targets_and_stops_cleanly() {
    let backend = Backend::start("unit", &[]).unwrap();
    let config = backend.debian_guest_with_app("unit");
    let mut vm = Vm::start(config).unwrap();
    // Started by systemd at boot, nobody asked.
    backend
        .wait_app("the unit's app to connect", |s| s.app.connected)
        .unwrap();
    assert_eq!(
        vm.agent
            .sh("systemctl is-active balloon-guest.service")
            .unwrap()
            .trim(),
        "active"
    );
    backend.set_app_target(128 * MIB).unwrap();
    backend
        .wait_app("the unit's app to hold 128 MiB", |s| {
            s.app.held_bytes == 128 * MIB && s.app.ballooned_bytes == 128 * MIB
        })
        .unwrap();
    vm.agent.sh("systemctl stop balloon-guest.service").unwrap();
    let result = vm
        .agent
        .sh("systemctl show -p Result -p ExecMainStatus balloon-guest.service")
        .unwrap();
    assert!(
        result.contains("Result=success") && result.contains("ExecMainStatus=0"),
        "{result}"
    );
    // It gave everything back before exiting.
    let s = backend.status().unwrap();
    assert_eq!(s.app.ballooned_bytes, 0, "{:?}", s.app);
}

#[test]
fn the_app_talks_over_vsock_with_the_hybrid_convention_and_only_with_the_vms_secret() {
    let vsock = balloon_lab::backend::VsockDevice::start("appvsock").unwrap();
    // The per-VM secret: the backend requires it, QEMU hands it to the guest over fw_cfg.
    let secret = vsock.socket.with_file_name("app-secret");
    std::fs::write(&secret, "7e0c9b1d2f3a4b5c6d7e8f9012345678\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // The backend listens where a guest connection to host port 1234 arrives.
    let backend = Backend::start_with_app_socket(
        "appvsock",
        &[
            "--no-free-page-reporting",
            "--app-secret-file",
            secret.to_str().unwrap(),
        ],
        Some(vsock.port_path(1234)),
    )
    .unwrap();
    let mut config = VmConfig::new("appvsock");
    config.vhost_user_balloon = Some(backend.device());
    config.vsock = Some(vsock.socket.clone());
    config.modules = [
        "virtio_balloon",
        "vsock",
        "vmw_vsock_virtio_transport_common",
        "vmw_vsock_virtio_transport",
        "qemu_fw_cfg",
    ]
    .map(String::from)
    .to_vec();
    config.extra_args = vec![
        "-fw_cfg".into(),
        format!(
            "name={},file={}",
            balloon_protocol::app::FW_CFG_SECRET_NAME,
            secret.display()
        ),
    ];
    let mut vm = Vm::start(config).unwrap();
    let raw = balloon_protocol::app::FW_CFG_SECRET_PATH;
    // Only root in the guest can read it; an unprivileged user cannot.
    assert_eq!(
        vm.agent
            .sh(&format!("stat -c '%a %u' {raw}"))
            .unwrap()
            .trim(),
        "400 0"
    );
    let nobody = vm
        .agent
        .run(&format!("chpst -u :65534:65534 cat {raw}"))
        .unwrap();
    assert!(!nobody.success(), "an unprivileged user read the secret");
    // An app without the secret is refused and holds nothing.
    let refused = vm
        .agent
        .run("echo guess-guess-guess-guess > /tmp/wrong; balloon-guest --connect vsock:2:1234 --secret-file /tmp/wrong")
        .unwrap();
    assert!(!refused.success());
    assert!(refused.stderr.contains("refused"), "{refused:?}");
    assert!(!backend.status().unwrap().app.connected);
    // The real app reads the secret from fw_cfg by default.
    vm.agent
        .spawn("balloon-guest --connect vsock:2:1234 > /tmp/app.log 2>&1")
        .unwrap();
    backend
        .wait_app("the app to connect over vsock", |s| s.app.connected)
        .unwrap();
    backend.set_app_target(128 * MIB).unwrap();
    backend
        .wait_app("the app to hold 128 MiB", |s| {
            s.app.ballooned_bytes == 128 * MIB
        })
        .unwrap();
    // A vsock connection closes with the app: the backend releases at once.
    vm.agent.sh("kill -9 $(pidof balloon-guest)").unwrap();
    backend
        .wait_app("the backend to release the app's pages", |s| {
            s.app.ballooned_bytes == 0 && !s.app.connected
        })
        .unwrap();
    assert_eq!(vm.agent.oom_kills().unwrap(), 0);
}

/// The app alone: a guest whose kernel refuses virtio_balloon (blacklisted), with the app
/// started by its systemd unit and the backend given the guest's memory file, since no memory
/// table ever arrives without a driver. Memory goes out and comes back, and an app killed with
/// -9 mid-inflate leaves nothing counted.
#[test]
fn without_a_balloon_driver_the_app_returns_memory_through_the_guest_memory_file() {
    let _ = env_logger::builder().is_test(true).try_init();
    let ram = balloon_lab::vm::shm_ram_file("nodriver");
    let ram_arg = ram.display().to_string();
    let backend = Backend::start(
        "nodriver",
        &[
            "--guest-memory-file",
            &ram_arg,
            "--guest-memory-layout",
            "q35",
        ],
    )
    .unwrap();
    // The device is there, but no driver binds it.
    let mut config = backend.debian_guest_with_app("nodriver");
    config.ram = balloon_lab::GuestRam::File(ram);
    config.kernel_args = vec!["modprobe.blacklist=virtio_balloon".into()];
    let mut vm = Vm::start(config).unwrap();
    backend
        .wait_app("the unit's app to connect", |s| s.app.connected)
        .unwrap();
    assert!(vm.balloon_driver_devices().unwrap().is_empty());
    let s = backend.status().unwrap();
    assert!(!s.device_started, "no driver, so no memory table: {s:?}");
    assert!(s.app.reclaimable, "{:?}", s.app);
    vm.touch_and_free(600).unwrap();
    let before = vm.host_memory().unwrap().rss_shmem;

    let app_balloon = 400 * MIB;
    backend.set_app_target(app_balloon).unwrap();
    backend
        .wait_app("the app to hold 400 MiB", |s| {
            s.app.ballooned_bytes == app_balloon && s.app.held_bytes == app_balloon
        })
        .unwrap();
    let after = vm.host_memory().unwrap().rss_shmem;
    let dropped = before.saturating_sub(after);
    eprintln!(
        "RssShmem {} -> {} MiB: {:.3} of the app balloon",
        before / MIB,
        after / MIB,
        dropped as f64 / app_balloon as f64
    );
    assert!(
        dropped * 10 >= app_balloon * 9,
        "RssShmem dropped by {} MiB",
        dropped / MIB
    );

    // Deflate: everything back, and the guest uses it again.
    backend.deflate_app().unwrap();
    vm.touch_and_free(600).unwrap();

    // Killed with -9 mid-inflate: the kernel frees what it pinned and the backend stops
    // counting it, so the app the unit restarts can hold the whole target again (were the
    // killed app's pages still counted, the new one's would be refused as over the target).
    backend.set_app_target(app_balloon).unwrap();
    backend
        .wait_app("the app to be inflating", |s| s.app.ballooned_bytes > 0)
        .unwrap();
    let main_pid = |vm: &mut Vm| {
        vm.agent
            .sh("systemctl show -p MainPID --value balloon-guest.service")
            .unwrap()
            .trim()
            .to_string()
    };
    let killed = main_pid(&mut vm);
    vm.agent
        .sh("systemctl kill -s KILL balloon-guest.service")
        .unwrap();
    let restarted = wait_for(
        "the unit to restart the app",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let pid = main_pid(&mut vm);
            Ok(if pid != "0" && pid != killed {
                Poll::Ready(pid)
            } else {
                Poll::Pending(pid)
            })
        },
    )
    .unwrap();
    // The new process's hello reached the backend (not the old session's figures), then it
    // holds exactly the target.
    let hello = format!("guest app (pid {restarted}) connected");
    wait_for(
        "the restarted app's hello in the backend's log",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            Ok(if backend.log().contains(&hello) {
                Poll::Ready(())
            } else {
                Poll::Pending(hello.clone())
            })
        },
    )
    .unwrap();
    let s = backend
        .wait_app("the restarted app to hold exactly the target", |s| {
            s.app.ballooned_bytes == app_balloon && s.app.held_bytes == app_balloon
        })
        .unwrap();
    assert!(s.app.connected, "{:?}", s.app);
    backend.deflate_app().unwrap();
    vm.touch_and_free(600).unwrap();
    assert_eq!(vm.agent.oom_kills().unwrap(), 0);
    let s = backend.status().unwrap();
    assert_eq!(s.rejected.pages_outside_ram, 0, "{s:?}");
}
