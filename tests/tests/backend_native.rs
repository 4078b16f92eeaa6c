//! The backend process driven through its real vhost-user socket by an in-process frontend over
//! a memfd "guest": exact accounting, hostile PFNs, and restarts, which QEMU 11.1's generic
//! vhost-user device cannot survive (see docs/qemu-vhost-user-base-reconnect.md).

use balloon_lab::backend::Backend;
use balloon_lab::frontend::{guest_ram, wait_allocated, MemfdRam, TestFrontend};
use balloon_lab::wait::{wait_for, Poll};
use balloon_lab::MIB;
use std::time::Duration;

const PAGE: u64 = 4096;

const NO_EXTRA_QUEUES: &[&str] = &["--no-stats", "--no-free-page-reporting"];

/// Half of a 32 MiB balloon in a 64 MiB memfd guest, inflated and returned.
struct HalfInflated {
    ram: MemfdRam,
    fe: TestFrontend,
    full: u64,
    target: u64,
    pfns: Vec<u32>,
}

impl HalfInflated {
    fn new(backend: &Backend) -> Self {
        let ram = guest_ram(64 * MIB).unwrap();
        ram.populate();
        let full = ram.allocated();
        let target = 32 * MIB;
        backend.set_target(target).unwrap();
        let mut fe = TestFrontend::connect(&backend.socket, &ram).unwrap();
        let pfns: Vec<u32> = (0..(target / PAGE) as u32).collect();
        fe.inflate(&ram, &pfns[..pfns.len() / 2]).unwrap();
        wait_allocated(&ram, full - target / 2).unwrap();
        HalfInflated {
            ram,
            fe,
            full,
            target,
            pfns,
        }
    }
}

#[test]
fn inflate_discards_exactly_the_named_pages_and_skips_hostile_ones() {
    let backend = Backend::start("native", &["--no-stats", "--no-free-page-reporting"]).unwrap();
    let ram = guest_ram(64 * MIB).unwrap();
    ram.populate();
    let full = ram.allocated();
    let mut fe = TestFrontend::connect(&backend.socket, &ram).unwrap();

    // 16 MiB contiguous, then 1000 scattered pages (every other page after 32 MiB).
    let contiguous: Vec<u32> = (0..4096).collect();
    fe.inflate(&ram, &contiguous).unwrap();
    let scattered: Vec<u32> = (0..1000).map(|i| 8192 + 2 * i).collect();
    fe.inflate(&ram, &scattered).unwrap();
    wait_allocated(&ram, full - (4096 + 1000) * PAGE).unwrap();
    let s = backend.status().unwrap();
    assert_eq!(s.ballooned_bytes, (4096 + 1000) * PAGE);
    assert_eq!(s.reclaimed_bytes, (4096 + 1000) * PAGE);

    // Repeats change nothing; pages past the end of RAM are counted and never discarded.
    let before = ram.allocated();
    let total_pages = (ram.len() / PAGE) as u32;
    fe.inflate(&ram, &[0, 1, 2, total_pages, total_pages + 7, u32::MAX])
        .unwrap();
    assert_eq!(ram.allocated(), before);
    let s = backend.status().unwrap();
    assert_eq!(s.ballooned_bytes, (4096 + 1000) * PAGE);
    assert_eq!(s.rejected.pages_outside_ram, 3);

    // Deflate: tracking drops, nothing else is discarded.
    fe.deflate(&ram, &contiguous).unwrap();
    let s = backend.status().unwrap();
    assert_eq!(s.ballooned_bytes, 1000 * PAGE);
    assert_eq!(ram.allocated(), before);
    assert!(!s.actual_from_driver);
    assert_eq!(s.actual_bytes, 1000 * PAGE);
}

/// A guest kernel that writes a balloon size it never inflated (16 TiB on a 64 MiB guest, as
/// `actual = u32::MAX`) moves nothing: the balloon is the pages handed over, the word is
/// reported apart, and the disagreement is flagged once it outlasts an honest driver's lag.
#[test]
fn a_drivers_false_balloon_size_is_not_the_balloon_and_is_flagged() {
    let backend = Backend::start("liar", NO_EXTRA_QUEUES).unwrap();
    let ram = guest_ram(64 * MIB).unwrap();
    backend.set_target(32 * MIB).unwrap();
    let mut fe = TestFrontend::connect(&backend.socket, &ram).unwrap();
    // A real handful of pages, then the lie.
    let pfns: Vec<u32> = (0..256).collect();
    fe.inflate(&ram, &pfns).unwrap();
    fe.set_actual(u32::MAX).unwrap();
    // (The frontend does not wait for SET_CONFIG to be handled.)
    let word = |pages: u32| {
        wait_for(
            "the driver's word to arrive",
            Duration::from_secs(20),
            Duration::from_millis(10),
            || {
                let s = backend.status()?;
                Ok(if s.driver_actual_bytes == Some(u64::from(pages) * PAGE) {
                    Poll::Ready(s)
                } else {
                    Poll::Pending(format!("{s:?}"))
                })
            },
        )
        .unwrap()
    };
    let s = word(u32::MAX);
    assert_eq!(s.actual_bytes, 256 * PAGE, "{s:?}");
    let s = wait_for(
        "the false size to be flagged",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let s = backend.status()?;
            Ok(if s.driver_claim_disputed {
                Poll::Ready(s)
            } else {
                Poll::Pending(format!("{s:?}"))
            })
        },
    )
    .unwrap();
    assert_eq!(s.actual_bytes, 256 * PAGE, "{s:?}");
    // Once the word agrees with the pages, the flag goes.
    fe.set_actual(256).unwrap();
    let s = word(256);
    assert!(!s.driver_claim_disputed, "{s:?}");
    assert_eq!(s.actual_bytes, 256 * PAGE);
    let log = backend.log();
    assert_eq!(log.matches("handed over").count(), 1, "logged once: {log}");
}

#[test]
fn a_killed_backend_restarts_with_its_target_and_serves_a_new_connection() {
    let mut backend = Backend::start("restart", NO_EXTRA_QUEUES).unwrap();
    let HalfInflated {
        ram,
        fe,
        full,
        target,
        pfns,
    } = HalfInflated::new(&backend);
    let rest = &pfns[pfns.len() / 2..];

    // A crash in the middle of inflating.
    backend.kill();
    drop(fe);
    backend.restart().unwrap();
    let s = backend.status().unwrap();
    assert_eq!(
        s.target_bytes, target,
        "the target must survive the restart"
    );

    // The frontend comes back (as cloud-hypervisor's reconnect does) and sees the same target.
    let mut fe = TestFrontend::connect(&backend.socket, &ram).unwrap();
    let (num_pages, _) = fe.config().unwrap();
    assert_eq!(u64::from(num_pages) * PAGE, target);
    fe.inflate(&ram, rest).unwrap();
    wait_allocated(&ram, full - target).unwrap();
    let s = backend.status().unwrap();
    assert!(s.device_started);
    // A new connection whose rings start at 0 is a new driver: the pages the old process
    // tracked (taken over from its page file) are forgotten, the new ones counted.
    assert_eq!(s.ballooned_bytes, rest.len() as u64 * PAGE);
    assert!(backend.log().contains("took over the tracking of 16 MiB"));
}

#[test]
fn behind_the_keeper_a_killed_backend_is_replaced_on_the_same_frontend_connection() {
    let mut backend = Backend::start_behind_keeper("keeper", NO_EXTRA_QUEUES).unwrap();
    let HalfInflated {
        ram,
        mut fe,
        full,
        target,
        pfns,
    } = HalfInflated::new(&backend);
    let rest = &pfns[pfns.len() / 2..];

    // A crash; the frontend keeps its connection (to the keeper) and does not reconnect.
    backend.kill();
    backend.restart().unwrap();
    assert_eq!(backend.status().unwrap().target_bytes, target);
    // The new process answers on the old connection, with the persisted target.
    let (num_pages, _) = fe.config().unwrap();
    assert_eq!(u64::from(num_pages) * PAGE, target);
    // Its rings resume where the old process left them: the next buffers come back.
    fe.inflate(&ram, rest).unwrap();
    wait_allocated(&ram, full - target).unwrap();
    let s = backend.status().unwrap();
    assert!(s.device_started, "{s:?}");
    // The tracking survived the crash (it lives in the page file beside the state file).
    assert_eq!(s.ballooned_bytes, target);
    fe.deflate(&ram, &pfns).unwrap();
    assert_eq!(backend.status().unwrap().ballooned_bytes, 0);
    let log = backend.keeper_log();
    assert!(log.contains("replayed"), "{log}");
    // 16 MiB in buffers of 256 pages: 16 buffers went back before the crash.
    assert!(log.contains("ring 0 resumes at 16"), "{log}");
    assert_eq!(log.matches("frontend connected").count(), 1, "{log}");
}

#[test]
fn behind_the_keeper_config_reads_and_writes_are_answered_while_no_backend_is_attached() {
    // QEMU reads the config space through the backend in a vCPU thread, cloud-hypervisor
    // panics when such a read fails: neither may wait for a backend to come back.
    let mut backend = Backend::start_behind_keeper("keeper-config", NO_EXTRA_QUEUES).unwrap();
    let HalfInflated {
        ram,
        mut fe,
        full,
        target,
        pfns,
    } = HalfInflated::new(&backend);
    let (target_pages, half) = ((target / PAGE) as u32, (pfns.len() / 2) as u32);
    fe.set_actual(half).unwrap();
    assert_eq!(fe.config().unwrap(), (target_pages, half));

    backend.kill();
    let (tx, rx) = std::sync::mpsc::channel();
    let frontend = std::thread::spawn(move || {
        let mut accesses = || -> balloon_lab::Result<_> {
            let before = fe.config()?;
            fe.set_actual(half + 1)?;
            Ok((before, fe.config()?))
        };
        let _ = tx.send(accesses().map_err(|e| e.to_string()));
        fe
    });
    let (before, after) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("config accesses answered within 20 s while no backend is attached")
        .unwrap();
    assert_eq!(before, (target_pages, half), "the last values seen");
    assert_eq!(after, (target_pages, half + 1), "the write made meanwhile");
    let mut fe = frontend.join().unwrap();

    // The write made while no backend was attached reaches the next one: the keeper replays
    // it once the backend has taken the connection, a moment after its control socket is up.
    backend.restart().unwrap();
    let s = wait_for(
        "the restarted backend to have the driver's actual",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || {
            let s = backend.status()?;
            Ok(if s.actual_from_driver {
                Poll::Ready(s)
            } else {
                Poll::Pending(format!("{s:?}"))
            })
        },
    )
    .unwrap();
    // The driver's word arrives; the balloon is still what was handed over (the state file's
    // pages), which that word exceeds only by one page: no dispute.
    assert_eq!(
        s.driver_actual_bytes,
        Some(u64::from(half + 1) * PAGE),
        "{s:?}"
    );
    assert_eq!(s.actual_bytes, u64::from(half) * PAGE, "{s:?}");
    // And the device goes on.
    fe.inflate(&ram, &pfns[pfns.len() / 2..]).unwrap();
    wait_allocated(&ram, full - target).unwrap();
    assert_eq!(fe.config().unwrap().0, target_pages);
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let mut backend = Backend::start("sigterm", &[]).unwrap();
    let status = backend.terminate().unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(!backend.control_socket.exists());
    assert!(!backend.socket.exists());
}

#[test]
fn a_memory_table_that_disagrees_with_the_guest_memory_file_is_refused_and_one_that_agrees_is_taken(
) {
    use std::os::fd::AsRawFd;
    let ram = guest_ram(64 * MIB).unwrap();
    // The frontend's own memfd, named through /proc as a VMM's memory file would be by path.
    let file = format!("/proc/{}/fd/{}", std::process::id(), ram.as_raw_fd());
    let mut args = NO_EXTRA_QUEUES.to_vec();
    args.extend(["--guest-memory-file", &file, "--guest-memory-layout", "q35"]);
    let backend = Backend::start("memfile", &args).unwrap();
    // Opened at startup: the app could name pages before any table.
    let s = backend.status().unwrap();
    assert!(s.app.reclaimable && s.guest_ram_bytes == ram.len(), "{s:?}");

    // Another file behind the table: refused, and nothing of it is taken.
    let other = guest_ram(64 * MIB).unwrap();
    // (The backend ends the connection; whether SET_MEM_TABLE itself or a later request
    // fails depends on the acknowledgements negotiated.)
    if let Ok(mut refused) = TestFrontend::connect(&backend.socket, &other) {
        assert!(
            refused.config().is_err(),
            "a table on another file was accepted"
        );
    }
    assert!(
        backend.log().contains("disagrees with --guest-memory-file"),
        "{}",
        backend.log()
    );
    assert!(!backend.status().unwrap().device_started);

    // The backend stays up and takes the table that describes the file.
    let mut fe = TestFrontend::connect(&backend.socket, &ram).unwrap();
    ram.populate();
    let full = ram.allocated();
    backend.set_target(MIB).unwrap();
    let pfns: Vec<u32> = (0..(MIB / PAGE) as u32).collect();
    fe.inflate(&ram, &pfns).unwrap();
    wait_allocated(&ram, full - MIB).unwrap();
    assert!(backend.status().unwrap().device_started);
}

/// A target set after any VMM's negotiation reaches the driver as a config-change message: QEMU
/// sends the backend request channel right after the protocol features, cloud-hypervisor at the
/// end of its set-up, and when it reconnects by itself to a restarted backend it sends no
/// GET_PROTOCOL_FEATURES at all (found 3 candidate sockets and sent nothing before).
#[test]
fn a_new_target_reaches_the_driver_after_every_vmms_negotiation() {
    use balloon_lab::frontend::Negotiation;
    for negotiation in [Negotiation::Qemu, Negotiation::CloudHypervisor] {
        let mut backend = Backend::start("negotiation", NO_EXTRA_QUEUES).unwrap();
        let ram = guest_ram(64 * MIB).unwrap();
        let mut fe = TestFrontend::connect_as(&backend.socket, &ram, negotiation).unwrap();
        backend.set_target(8 * MIB).unwrap();
        fe.wait_config_change(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{negotiation:?}: {e}\n{}", backend.log()));
        let s = backend.status().unwrap();
        assert!(s.config_change_channel);
        if negotiation != Negotiation::CloudHypervisor {
            continue;
        }
        // What cloud-hypervisor let through is what the status says the guest has, beside
        // what was offered, and the log says why the rest is missing.
        assert!(!s.features.iter().any(|f| f == "MUST_TELL_HOST"), "{s:?}");
        assert!(
            s.offered_features.iter().any(|f| f == "MUST_TELL_HOST"),
            "{s:?}"
        );
        assert!(backend
            .log()
            .contains("the guest did not take MUST_TELL_HOST"));
        // The backend restarts; cloud-hypervisor reconnects on its own.
        backend.kill();
        drop(fe);
        backend.restart().unwrap();
        let mut fe =
            TestFrontend::connect_as(&backend.socket, &ram, Negotiation::CloudHypervisorReconnect)
                .unwrap();
        backend.set_target(16 * MIB).unwrap();
        fe.wait_config_change(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("after the reconnect: {e}\n{}", backend.log()));
        let s = backend.status().unwrap();
        assert!(s.config_change_channel, "{s:?}");
    }
}

/// cloud-hypervisor starts each ring at the guest's avail index when it reconnects, so a buffer
/// the old backend had not returned would never come back and the Linux driver, which waits
/// for each (`tell_host`), would hang its balloon for good. The restarted backend takes it
/// again: it comes back, and its pages are discarded.
#[test]
fn a_buffer_in_flight_when_cloud_hypervisor_reconnects_is_returned_and_its_pages_discarded() {
    use balloon_lab::frontend::Negotiation;
    let mut backend = Backend::start("in-flight", NO_EXTRA_QUEUES).unwrap();
    let ram = guest_ram(64 * MIB).unwrap();
    ram.populate();
    let full = ram.allocated();
    backend.set_target(2 * MIB).unwrap();
    let mut fe =
        TestFrontend::connect_as(&backend.socket, &ram, Negotiation::CloudHypervisor).unwrap();
    let pfns: Vec<u32> = (0..512).collect();
    fe.inflate(&ram, &pfns[..256]).unwrap();
    wait_allocated(&ram, full - 256 * PAGE).unwrap();
    // The next buffer is made available as the backend dies: never taken, never returned.
    backend.kill();
    fe.post_pfns(&ram, 0, &pfns[256..]);
    drop(fe);
    backend.restart().unwrap();
    let fe = TestFrontend::connect_as(&backend.socket, &ram, Negotiation::CloudHypervisorReconnect)
        .unwrap();
    wait_for(
        "the buffer in flight to come back",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || {
            Ok(if fe.all_returned(&ram, 0) {
                Poll::Ready(())
            } else {
                Poll::Pending(backend.log())
            })
        },
    )
    .unwrap();
    wait_allocated(&ram, full - 512 * PAGE).unwrap();
    assert_eq!(backend.status().unwrap().ballooned_bytes, 512 * PAGE);
}

/// A guest that queues many large inflate chains at once does not hold the device for all of
/// them: the backend takes its lock for one chain at a time, so a status (and, under QEMU, a
/// config read in a vCPU thread) gets in between chains. Before, one drain held the lock for
/// everything waiting: 255 chains of 65,536 scattered pages kept a status waiting 11.6 s.
#[test]
fn a_status_gets_in_between_the_chains_of_a_long_drain() {
    // Chains of the most pages one may carry, scattered: each takes the device a while, so the
    // drain lasts far longer than a status's round trip, even on a loaded machine.
    const CHAINS: usize = 32;
    const PFNS: u32 = 65_536;
    let backend = Backend::start("long-drain", NO_EXTRA_QUEUES).unwrap();
    // Every other page of 512 MiB per chain (16 GiB of sparse memfd in all), and the chains'
    // arrays above all of it.
    let span = u64::from(PFNS) * 2 * PAGE;
    let arrays = CHAINS as u64 * u64::from(PFNS) * 4;
    let ram = guest_ram(CHAINS as u64 * span + arrays).unwrap();
    let mut fe = TestFrontend::connect(&backend.socket, &ram).unwrap();
    backend
        .set_target(CHAINS as u64 * u64::from(PFNS) * PAGE)
        .unwrap();
    let chains: Vec<Vec<u32>> = (0..CHAINS as u32)
        .map(|c| (0..PFNS).map(|i| c * 2 * PFNS + 2 * i).collect())
        .collect();
    let total = CHAINS as u64 * u64::from(PFNS) * PAGE;
    let seen = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut seen = std::collections::BTreeSet::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            loop {
                let b = backend.status().unwrap().ballooned_bytes;
                seen.insert(b);
                if b == total || std::time::Instant::now() > deadline {
                    return seen;
                }
            }
        });
        fe.post_chains(&ram, 0, CHAINS as u64 * span, &chains)
            .unwrap();
        watcher.join().unwrap()
    });
    assert!(seen.contains(&total), "the drain did not finish: {seen:?}");
    let between = seen.iter().filter(|&&b| b > 0 && b < total).count();
    assert!(
        between > 0,
        "no status between the chains: ballooned_bytes seen {seen:?}"
    );
}

/// A migrating frontend gives a dirty-page log (LOG_SHMFD, SET_LOG_BASE) and turns on LOG_ALL:
/// every guest page the backend writes from then on is marked (the used rings, the only guest
/// memory it writes), nothing it does not write is, the device goes on as before (LOG_ALL
/// resets nothing), and a new log given later is marked afresh. Without it cloud-hypervisor
/// refuses to migrate the VM (MigrationNotSupported), and a migration would carry stale rings.
#[test]
fn a_dirty_log_marks_every_page_the_backend_writes_and_nothing_else() {
    let backend = Backend::start("dirty-log", NO_EXTRA_QUEUES).unwrap();
    let ram = guest_ram(64 * MIB).unwrap();
    ram.populate();
    let full = ram.allocated();
    backend.set_target(8 * MIB).unwrap();
    let mut fe = TestFrontend::connect(&backend.socket, &ram).unwrap();
    let pfns: Vec<u32> = (0..2048).collect();
    fe.inflate(&ram, &pfns[..1024]).unwrap();
    let log = fe.start_dirty_log(&ram).unwrap();
    assert!(log.marked().is_empty(), "nothing written yet");
    fe.inflate(&ram, &pfns[1024..]).unwrap();
    wait_allocated(&ram, full - 2048 * PAGE).unwrap();
    let inflate_ring = fe.used_ring_page(0);
    assert_eq!(
        log.marked(),
        vec![inflate_ring],
        "only the inflate queue's used ring"
    );
    fe.deflate(&ram, &pfns[..256]).unwrap();
    let mut both = vec![inflate_ring, fe.used_ring_page(1)];
    both.sort();
    assert_eq!(log.marked(), both);
    // Logging on changed nothing else: tracking, target and discards go on. (SET_FEATURES is
    // not waited for by the frontend, and the rings run on their own thread: wait for it.)
    let s = wait_for(
        "LOG_ALL among the acknowledged features",
        Duration::from_secs(20),
        Duration::from_millis(10),
        || {
            let s = backend.status()?;
            Ok(if s.features.iter().any(|f| f == "LOG_ALL") {
                Poll::Ready(s)
            } else {
                Poll::Pending(format!("{:?}", s.features))
            })
        },
    )
    .unwrap();
    assert_eq!(s.ballooned_bytes, (2048 - 256) * PAGE, "{s:?}");
    assert!(backend.log().contains("dirty-page logging on"));
    // A second log (the next round of a migration) is marked afresh.
    let second = fe.start_dirty_log(&ram).unwrap();
    fe.deflate(&ram, &pfns[256..512]).unwrap();
    assert_eq!(second.marked(), vec![fe.used_ring_page(1)]);
}

/// A guest that reboots while the backend drains a long inflate: the VMM stops the ring
/// (GET_VRING_BASE) between two chains, and the rebooted guest writes pages the old balloon held.
/// The backend takes no more chains from the stopped ring and discards none of the tracked pages
/// (they may be the guest's again). Before, the piece after the stop moved the lifecycle back to
/// running and redid the dropped discards: every page of the balloon was zeroed under the guest.
#[test]
fn a_ring_stopped_in_the_middle_of_a_drain_discards_nothing_after() {
    const CHAINS: usize = 32;
    const PFNS: u32 = 65_536;
    let backend = Backend::start("stop-drain", NO_EXTRA_QUEUES).unwrap();
    let span = u64::from(PFNS) * 2 * PAGE;
    let arrays = CHAINS as u64 * u64::from(PFNS) * 4;
    let ram = guest_ram(CHAINS as u64 * span + arrays).unwrap();
    let mut fe = TestFrontend::connect(&backend.socket, &ram).unwrap();
    let total = CHAINS as u64 * u64::from(PFNS) * PAGE;
    backend.set_target(total).unwrap();
    let chains: Vec<Vec<u32>> = (0..CHAINS as u32)
        .map(|c| (0..PFNS).map(|i| c * 2 * PFNS + 2 * i).collect())
        .collect();
    fe.post_chains(&ram, 0, CHAINS as u64 * span, &chains)
        .unwrap();
    wait_for(
        "the drain to be under way",
        Duration::from_secs(60),
        Duration::from_millis(1),
        || {
            let b = backend.status()?.ballooned_bytes;
            Ok(if b > 0 {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("{b}"))
            })
        },
    )
    .unwrap();
    fe.stop_ring(0).unwrap();
    let stopped_at = backend.status().unwrap().ballooned_bytes;
    assert!(
        stopped_at < total,
        "the drain ended before the ring was stopped"
    );
    // The rebooted guest uses pages of the old balloon.
    let reused: Vec<u32> = chains[0][..1024].to_vec();
    for &pfn in &reused {
        ram.fill_page(u64::from(pfn), 0x5a);
    }
    // Whatever the backend would do next, it does within its discard worker's gathering
    // (100 ms) and a piece or two: watch for two seconds, failing at the first page lost.
    let watch = std::time::Instant::now();
    while watch.elapsed() < Duration::from_secs(2) {
        for &pfn in &reused {
            assert_eq!(
                ram.read::<u8>(u64::from(pfn) * PAGE),
                0x5a,
                "page {pfn} of the stopped balloon was discarded under the guest"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = backend.status().unwrap();
    assert_eq!(
        s.ballooned_bytes, stopped_at,
        "chains were taken after the stop: {s:?}"
    );
    assert_eq!(
        s.rejected.bad_descriptors, 0,
        "a stopped ring is no guest error: {s:?}"
    );
}
