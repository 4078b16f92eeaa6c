//! The harness's own promises: no QEMU survives a failing test.

use balloon_lab::{Vm, VmConfig};
use std::process::Command;

const INNER_ENV: &str = "BALLOON_LAB_INNER_PID_FILE";

/// Boots a guest, records QEMU's pid and fails. Ignored unless run by the test below.
#[test]
#[ignore = "run only as the child of qemu_does_not_survive_a_failing_test"]
fn inner_failing_test_with_a_running_vm() {
    let Ok(pid_file) = std::env::var(INNER_ENV) else {
        return;
    };
    let vm = Vm::start(VmConfig::new("doomed")).expect("boot");
    std::fs::write(&pid_file, vm.pid().to_string()).expect("write pid");
    panic!("deliberate failure with QEMU {} running", vm.pid());
}

#[test]
fn qemu_does_not_survive_a_failing_test() {
    let pid_file =
        std::env::temp_dir().join(format!("balloon-lab-inner-{}.pid", std::process::id()));
    let _ = std::fs::remove_file(&pid_file);
    let exe = std::env::current_exe().expect("own test binary");
    let out = Command::new(exe)
        .args([
            "--exact",
            "inner_failing_test_with_a_running_vm",
            "--ignored",
            "--nocapture",
        ])
        .env(INNER_ENV, &pid_file)
        .output()
        .expect("run the inner test");
    assert!(
        !out.status.success(),
        "the inner test should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .expect("the inner test booted a VM and wrote QEMU's pid")
        .trim()
        .parse()
        .expect("pid");
    let _ = std::fs::remove_file(&pid_file);
    // The inner test process has exited; its QEMU must be gone. (Checking the command line
    // guards against the pid having been reused by another process meanwhile.)
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let alive = String::from_utf8_lossy(&cmdline).contains("doomed");
    assert!(!alive, "QEMU {pid} survived the failing test");
}

#[test]
fn debian_image_boots_systemd_with_the_balloon_driver() {
    let mut config = VmConfig::new("debian");
    config.image = balloon_lab::Image::Debian;
    config.cpus = 2;
    config.builtin_balloon = Some(balloon_lab::BuiltinBalloon::default());
    let mut vm = Vm::start(config).expect("boot the Debian image");
    let init = vm.agent.sh("cat /proc/1/comm").unwrap();
    assert_eq!(init.trim(), "systemd");
    // The agent itself runs as a systemd unit; virtio_balloon was loaded by modules-load.d.
    let unit = vm
        .agent
        .sh("systemctl is-active balloon-test-agent.service")
        .unwrap();
    assert_eq!(unit.trim(), "active");
    let bound = vm.balloon_driver_devices().unwrap();
    assert!(!bound.is_empty(), "virtio_balloon not bound: {bound:?}");
}
