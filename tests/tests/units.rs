//! The shipped systemd units, scored as `systemd-analyze security` scores them (offline: the
//! units are read, not installed): the host daemons' at most 2.5 ("OK"; they run as root with
//! no capabilities, a system-call filter, no devices, a read-only system and their own
//! directories writable), the guest app's at most 3.0 (it needs mlock, pagemap's page numbers
//! and /proc/sys, which keep it above the daemons).

use std::path::Path;
use std::process::Command;

/// The unit's overall exposure, from `systemd-analyze security --offline=yes`.
fn exposure(unit: &Path, instance_name: &str) -> f64 {
    let dir = balloon_lab::lab::run_dir("units").unwrap();
    let copy = dir.join(instance_name);
    std::fs::copy(unit, &copy).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze (Debian's systemd package)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no score for {}: {text}{}",
                unit.display(),
                String::from_utf8_lossy(&out.stderr)
            )
        });
    line.rsplit(": ")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"))
}

#[test]
fn every_shipped_unit_is_hardened() {
    let top = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let units = [
        (
            "examples/systemd/vhost-balloon-backend@.service",
            "vhost-balloon-backend@vm1.service",
            2.5,
        ),
        (
            "examples/systemd/vhost-balloon-backend-kept@.service",
            "vhost-balloon-backend-kept@vm1.service",
            2.5,
        ),
        (
            "examples/systemd/vhost-user-keeper@.service",
            "vhost-user-keeper@vm1.service",
            2.5,
        ),
        (
            "examples/systemd/balloon-scheduler.service",
            "balloon-scheduler.service",
            2.5,
        ),
        (
            "guest-app/balloon-guest.service",
            "balloon-guest.service",
            3.0,
        ),
    ];
    let mut report = Vec::new();
    for (path, instance, limit) in units {
        let score = exposure(&top.join(path), instance);
        report.push(format!("{instance}: {score}"));
        assert!(score <= limit, "{instance} scores {score}, above {limit}");
    }
    eprintln!("{}", report.join("\n"));
}
