//! Guests whose RAM lives on 2 MiB huge pages (a memfd with hugetlb=on, and a file on a
//! hugetlbfs mount), as vhost-user deployments usually run them. The host can take back only
//! whole huge pages: these tests measure how much of what the guest gives really returns, and
//! check that no huge page the guest still uses is ever discarded.
//!
//! Each test reserves its huge pages and gives them back when it ends; they run one at a time.

use balloon_lab::backend::Backend;
use balloon_lab::hugepages::{
    app_returns, driver_returns, settled_allocation, HugePages, Reservation, HUGE_PAGE,
};
use balloon_lab::wait::{wait_for, Poll};
use balloon_lab::{GuestRam, Vm, VmConfig, MIB};
use std::time::Duration;

const GUEST_MIB: u64 = 1024;

/// The huge pages a guest of GUEST_MIB needs, or `None` (with the reason printed) where the
/// kernel cannot reserve them; any other failure fails the test.
fn reserve() -> Option<HugePages> {
    match HugePages::reserve(GUEST_MIB * MIB / HUGE_PAGE + 8) {
        Ok(pages) => Some(pages),
        Err(Reservation::Unavailable(why)) => {
            eprintln!("SKIPPED: no huge pages for the guest: {why}");
            None
        }
        Err(Reservation::Failed(e)) => panic!("reserving huge pages: {e}"),
    }
}

fn config(name: &str, ram: GuestRam, backend: &Backend) -> VmConfig {
    let mut config = VmConfig::new(name);
    config.mem_mib = GUEST_MIB;
    config.ram = ram;
    config.vhost_user_balloon = Some(backend.device());
    config
}

fn boot(name: &str, ram: GuestRam, backend: &Backend) -> Vm {
    let config = config(name, ram, backend);
    Vm::start(config).expect("boot the mini guest on huge pages")
}

/// Writes `mib` MiB of random data to /tmp/NAME in the guest and returns its checksum.
fn keep(vm: &mut Vm, name: &str, mib: u64) -> String {
    vm.agent
        .sh(&format!(
            "dd if=/dev/urandom of=/tmp/{name} bs=1M count={mib} 2>/dev/null && md5sum /tmp/{name}"
        ))
        .unwrap()
}

fn checksum(vm: &mut Vm, name: &str) -> String {
    vm.agent.sh(&format!("md5sum /tmp/{name}")).unwrap()
}

fn the_driver_returns_whole_huge_pages_and_deflate_never_loses_guest_data(ram: GuestRam) {
    let _ = env_logger::builder().is_test(true).try_init();
    let Some(_pages) = reserve() else { return };
    // Free page reporting off: it would return freed blocks on its own (its own test below).
    let backend = Backend::start(
        &format!("huge-driver-{ram:?}"),
        &["--no-free-page-reporting"],
    )
    .unwrap();
    let mut vm = boot(&format!("huge-driver-{ram:?}"), ram.clone(), &backend);
    let status = backend.status().unwrap();
    assert!(status.device_started, "{status:?}");

    // The guest touches most of its memory and keeps 64 MiB of data through all that follows.
    vm.touch_and_free(700).unwrap();
    let kept = keep(&mut vm, "kept", 64);
    let pool_free_before = balloon_lab::hugepages::free_pages().unwrap();
    let balloon = 512 * MIB;
    let (measured, status) = driver_returns(&vm, &backend, balloon).unwrap();
    assert_eq!(status.ballooned_bytes, balloon);
    let (before, after, returned, share) = (
        measured.before,
        measured.after,
        measured.bytes(),
        measured.share(),
    );
    let pool_freed = balloon_lab::hugepages::free_pages()
        .unwrap()
        .saturating_sub(pool_free_before);
    eprintln!(
        "driver on 2 MiB pages ({ram:?}): balloon {} MiB, host memory {} -> {} MiB, returned {} MiB \
         (share {share:.3}), HugePages_Free +{pool_freed}, reclaimed_bytes {} MiB",
        balloon / MIB,
        before / MIB,
        after / MIB,
        returned / MIB,
        status.reclaimed_bytes / MIB
    );
    assert_eq!(
        pool_freed * HUGE_PAGE,
        returned,
        "the host's pool got back what left"
    );
    // Only whole huge pages leave, so what returned is a whole number of them, and never
    // more than the balloon holds.
    assert_eq!(returned % HUGE_PAGE, 0, "{returned}");
    assert!(returned <= balloon, "{returned} > {balloon}");

    // Half back: pieces of huge pages whose other pieces stay ballooned go back to the guest,
    // which writes new data over all it has.
    backend.set_target(256 * MIB).unwrap();
    backend
        .wait_actual(256 * MIB, Duration::from_secs(120))
        .unwrap();
    let more = keep(&mut vm, "more", 400);
    assert_eq!(checksum(&mut vm, "kept"), kept);
    backend.set_target(0).unwrap();
    let status = backend.wait_actual(0, Duration::from_secs(120)).unwrap();
    assert_eq!(status.ballooned_bytes, 0);
    assert_eq!(
        checksum(&mut vm, "more"),
        more,
        "data written while pieces of its huge pages were ballooned"
    );
    vm.agent.sh("rm /tmp/more").unwrap();
    vm.touch_and_free(700).unwrap();
    assert_eq!(
        checksum(&mut vm, "kept"),
        kept,
        "data kept across the balloon"
    );
    assert_eq!(vm.agent.oom_kills().unwrap(), 0);
    assert_eq!(status.rejected, Default::default());
    assert_eq!(status.discard_errors, 0);
}

fn free_page_reporting_returns_whole_huge_pages_the_guest_freed(ram: GuestRam) {
    let _ = env_logger::builder().is_test(true).try_init();
    let Some(_pages) = reserve() else { return };
    let backend = Backend::start(&format!("huge-report-{ram:?}"), &[]).unwrap();
    let mut vm = boot(&format!("huge-report-{ram:?}"), ram.clone(), &backend);
    vm.agent
        .sh("dd if=/dev/zero of=/tmp/fill bs=1M count=600 2>/dev/null")
        .unwrap();
    let full = settled_allocation(&vm, &backend).unwrap();
    let kept = keep(&mut vm, "kept", 32);
    vm.agent.sh("rm /tmp/fill").unwrap();
    let after = wait_for(
        "host memory to drop by 400 MiB after the guest freed 600 MiB",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || {
            let now = vm.ram_allocated()?;
            Ok(if full.saturating_sub(now) >= 400 * MIB {
                Poll::Ready(now)
            } else {
                Poll::Pending(format!("allocated {} MiB", now / MIB))
            })
        },
    )
    .unwrap();
    let status = backend.status().unwrap();
    eprintln!(
        "free page reporting on 2 MiB pages ({ram:?}): host memory {} -> {} MiB after 600 MiB freed; \
         reported_free_bytes {} MiB",
        full / MIB,
        after / MIB,
        status.reported_free_bytes / MIB
    );
    // The guest reuses reported memory freely.
    vm.touch_and_free(600).unwrap();
    assert_eq!(checksum(&mut vm, "kept"), kept);
    assert_eq!(vm.agent.oom_kills().unwrap(), 0);
    assert_eq!(status.discard_errors, 0);
}

fn the_app_returns_nearly_all_it_holds_in_whole_huge_pages(ram: GuestRam) {
    let _ = env_logger::builder().is_test(true).try_init();
    let Some(_pages) = reserve() else { return };
    let backend =
        Backend::start(&format!("huge-app-{ram:?}"), &["--no-free-page-reporting"]).unwrap();
    let mut config = config(&format!("huge-app-{ram:?}"), ram.clone(), &backend);
    config.serial_ports = vec![backend.app_port()];
    let mut vm = Vm::start(config).expect("boot the mini guest on huge pages");
    vm.touch_and_free(700).unwrap();
    let kept = keep(&mut vm, "kept", 64);
    let held = 256 * MIB;
    let measured = app_returns(&mut vm, &backend, held).unwrap();
    let (before, after, returned, share) = (
        measured.before,
        measured.after,
        measured.bytes(),
        measured.share(),
    );
    let thp = vm
        .agent
        .sh("cat /sys/kernel/mm/transparent_hugepage/enabled")
        .unwrap();
    let guest_thp = vm
        .agent
        .sh("grep AnonHugePages /proc/meminfo")
        .unwrap_or_default();
    eprintln!(
        "app on 2 MiB pages ({ram:?}; guest THP: {}; {}): holds {} MiB, host memory {} -> {} MiB, \
         returned {} MiB (share {share:.3})",
        thp.trim(),
        guest_thp.trim(),
        held / MIB,
        before / MIB,
        after / MIB,
        returned / MIB
    );
    assert!(
        share >= 0.9,
        "the app returned only {share:.3} of what it holds"
    );

    vm.agent.sh("rm -rf /tmp/frag").unwrap();
    backend.deflate_app().unwrap();
    vm.touch_and_free(700).unwrap();
    assert_eq!(
        checksum(&mut vm, "kept"),
        kept,
        "data kept across the balloon"
    );
    assert_eq!(vm.agent.oom_kills().unwrap(), 0);
    let log = vm.agent.sh("cat /tmp/app.log").unwrap();
    assert!(!log.contains("ERROR"), "{log}");
}

/// The guest reboots abruptly with its balloon inflated (whole huge pages discarded, others
/// partly ballooned) and a smaller target: the new kernel's driver starts over, and what the
/// new kernel writes stays intact through a later inflate and deflate. A huge page left
/// discarded, or discarded later for pieces the old kernel had ballooned, would lose it.
fn a_reboot_with_the_balloon_inflated_leaves_the_new_kernels_memory_intact(ram: GuestRam) {
    let _ = env_logger::builder().is_test(true).try_init();
    let Some(_pages) = reserve() else { return };
    let name = format!("huge-reboot-{ram:?}");
    let backend = Backend::start(&name, &["--no-free-page-reporting"]).unwrap();
    let mut config = config(&name, ram, &backend);
    config.allow_reboot = true;
    let mut vm = Vm::start(config).expect("boot the mini guest on huge pages");
    // Free memory touched and freed first, so the balloon holds pieces of many huge pages.
    vm.touch_and_free(600).unwrap();
    backend.set_target(400 * MIB).unwrap();
    backend
        .wait_actual(400 * MIB, Duration::from_secs(120))
        .unwrap();
    let s = backend.status().unwrap();
    assert!(
        s.reclaimed_bytes >= 2 * HUGE_PAGE,
        "no whole huge page went: {s:?}"
    );

    vm.reboot_abruptly(|| {
        backend.set_target(64 * MIB).unwrap();
    })
    .unwrap();
    let s = backend
        .wait_actual(64 * MIB, Duration::from_secs(120))
        .unwrap();
    assert_eq!(
        s.ballooned_bytes,
        64 * MIB,
        "only the new kernel's balloon: {s:?}"
    );
    let sum = keep(&mut vm, "data", 600);
    backend.set_target(200 * MIB).unwrap();
    backend
        .wait_actual(200 * MIB, Duration::from_secs(120))
        .unwrap();
    backend.set_target(0).unwrap();
    backend.wait_actual(0, Duration::from_secs(120)).unwrap();
    assert_eq!(checksum(&mut vm, "data"), sum, "the new kernel's data");
    let s = backend.status().unwrap();
    assert_eq!(s.discard_errors, 0, "{s:?}");
    assert_eq!(vm.agent.oom_kills().unwrap(), 0);
}

/// Each test on both kinds of huge-page RAM QEMU offers.
macro_rules! on_hugetlb_memfd_and_hugetlbfs {
    ($($test:ident),*) => {
        mod memfd {
            $(#[test]
            fn $test() {
                super::$test(balloon_lab::GuestRam::HugetlbMemfd)
            })*
        }
        mod hugetlbfs_file {
            $(#[test]
            fn $test() {
                super::$test(balloon_lab::GuestRam::HugetlbfsFile)
            })*
        }
    };
}

on_hugetlb_memfd_and_hugetlbfs!(
    the_driver_returns_whole_huge_pages_and_deflate_never_loses_guest_data,
    free_page_reporting_returns_whole_huge_pages_the_guest_freed,
    the_app_returns_nearly_all_it_holds_in_whole_huge_pages,
    a_reboot_with_the_balloon_inflated_leaves_the_new_kernels_memory_intact
);
