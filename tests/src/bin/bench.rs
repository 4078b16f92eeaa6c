//! balloon-bench: the project's benchmarks. `balloon-bench [NAME...]` runs the named ones (all
//! when none is named); each writes target/bench/NAME.json and prints a one-line summary.

use balloon_lab::backend::Backend;
use balloon_lab::bench::{median, BenchResult};
use balloon_lab::frontend::{MemfdRam, TestFrontend};
use balloon_lab::wait::{wait_for, Poll};
use balloon_lab::{BuiltinBalloon, Result, Vm, VmConfig, MIB};
use serde_json::json;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const RUNS: usize = 5;
/// Touches nearly all free guest memory (tmpfs up to all but 48 MiB of MemAvailable), then
/// frees it.
const FILL_FREE_MEMORY: &str = "avail=$(awk '/MemAvailable/ {print int($2/1024) - 48}' /proc/meminfo); dd if=/dev/zero of=/tmp/fill bs=1M count=$avail 2>/dev/null; rm -f /tmp/fill";
/// Every balloon benchmark polls progress at this interval, so the timings compare.
const POLL: Duration = Duration::from_millis(20);

/// Waits until QEMU's built-in balloon reports `actual` on the right side of `target_bytes`.
fn wait_builtin(vm: &mut Vm, target_bytes: u64, inflating: bool) -> Result<()> {
    let qmp = &mut vm.qmp;
    wait_for(
        "the built-in balloon to reach its target",
        Duration::from_secs(300),
        POLL,
        || {
            let actual = qmp.balloon_actual()?;
            let done = if inflating {
                actual <= target_bytes
            } else {
                actual >= target_bytes
            };
            Ok(if done {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("actual {} MiB", actual / MIB))
            })
        },
    )
}

/// QEMU's built-in balloon, 1 GiB guest, inflate by 768 MiB after the guest touched and freed
/// 700 MiB. Timed from the QMP `balloon` command to `query-balloon` showing the target; the
/// deflate back is timed the same way in the same runs.
fn qemu_builtin_inflate() -> Result<()> {
    let mut config = VmConfig::new("bench-builtin");
    config.builtin_balloon = Some(BuiltinBalloon::default());
    let mut vm = Vm::start(config)?;
    let (full, target) = (1024 * MIB, 256 * MIB);
    let (mut inflate, mut deflate, mut shmem_drop) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..RUNS {
        vm.agent
            .sh("dd if=/dev/zero of=/tmp/fill bs=1M count=700 2>/dev/null && rm /tmp/fill")?;
        let before = vm.host_memory()?.rss_shmem;
        let t = Instant::now();
        vm.qmp.balloon(target)?;
        wait_builtin(&mut vm, target, true)?;
        inflate.push(t.elapsed().as_secs_f64());
        shmem_drop.push((before.saturating_sub(vm.host_memory()?.rss_shmem) / MIB) as f64);
        let t = Instant::now();
        vm.qmp.balloon(full)?;
        wait_builtin(&mut vm, full, false)?;
        deflate.push(t.elapsed().as_secs_f64());
        eprintln!(
            "run {run}: inflate {:.3} s, deflate {:.3} s, RssShmem -{} MiB",
            inflate[run], deflate[run], shmem_drop[run]
        );
    }
    let (value, baseline) = (median(&inflate), median(&deflate));
    BenchResult {
        name: "qemu_builtin_inflate".into(),
        metric: "inflate 768 MiB, QEMU built-in balloon".into(),
        unit: "s".into(),
        value,
        baseline,
        baseline_name: "deflate 768 MiB (same VM, same runs)".into(),
        ratio: value / baseline,
        runs: RUNS,
        goal: "record (the baseline the vhost-user backend is compared against)".into(),
        goal_met: None,
        samples: json!({
            "inflate_s": inflate,
            "deflate_s": deflate,
            "rss_shmem_drop_mib": shmem_drop,
            "accel": if balloon_lab::lab::use_kvm() { "kvm" } else { "tcg" },
        }),
    }
    .publish()
}

/// Punches `len` bytes at `offset` out of the memfd directly (the baselines).
fn punch(ram: &MemfdRam, offset: u64, len: u64) {
    // SAFETY: fallocate on our own memfd.
    let rc = unsafe {
        libc::fallocate(
            ram.file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
}

fn gib_per_s(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / (1u64 << 30) as f64 / t.as_secs_f64()
}

/// The discard path without a VM: the backend process behind its real vhost-user socket, fed
/// inflate buffers of 256 PFNs one at a time as the Linux driver sends them, over a 1 GiB memfd.
/// Compared in the same run with a page-by-page discard and with one fallocate of the whole
/// range (the limit).
fn discard_native() -> Result<()> {
    const GIB: u64 = 1 << 30;
    let backend = Backend::start("bench-native", &["--no-stats", "--no-free-page-reporting"])?;
    let ram = MemfdRam::new(GIB)?;
    let mut fe = TestFrontend::connect(&backend.socket, &ram)?;
    let pages = ram.data_pages() as u32;
    let contiguous: Vec<u32> = (0..pages).collect();
    // An odd stride: no two PFNs of a buffer are neighbours, every page is named once.
    let scattered: Vec<u32> = (0..pages as u64)
        .map(|i| ((i * 4099) % pages as u64) as u32)
        .collect();
    let (mut cont, mut scat, mut per_page, mut whole) = (vec![], vec![], vec![], vec![]);
    for run in 0..RUNS {
        for (pfns, out) in [(&contiguous, &mut cont), (&scattered, &mut scat)] {
            ram.populate();
            let t = Instant::now();
            fe.inflate(&ram, pfns)?;
            // Timed until the memory has really left: the backend discards beside the queue.
            let rings = ram.len - GIB;
            wait_for(
                "the inflated memory to leave",
                Duration::from_secs(60),
                Duration::from_micros(200),
                || {
                    let left = ram.allocated();
                    Ok(if left <= rings {
                        Poll::Ready(())
                    } else {
                        Poll::Pending(format!("{} MiB left", left / MIB))
                    })
                },
            )?;
            out.push(gib_per_s(GIB, t.elapsed()));
            fe.deflate(&ram, pfns)?;
        }
        ram.populate();
        let t = Instant::now();
        for off in (0..GIB).step_by(4096) {
            punch(&ram, off, 4096);
        }
        per_page.push(gib_per_s(GIB, t.elapsed()));
        ram.populate();
        let t = Instant::now();
        punch(&ram, 0, GIB);
        whole.push(gib_per_s(GIB, t.elapsed()));
        eprintln!(
            "run {run}: backend contiguous {:.2} GiB/s, scattered {:.2}; per-page fallocate {:.2}; one fallocate {:.2}",
            cont[run], scat[run], per_page[run], whole[run]
        );
    }
    let (c, sc, pp, w) = (
        median(&cont),
        median(&scat),
        median(&per_page),
        median(&whole),
    );
    BenchResult {
        name: "discard_native".into(),
        metric: "discard rate through the backend, contiguous 256-PFN buffers".into(),
        unit: "GiB/s".into(),
        value: c,
        baseline: pp,
        baseline_name: "page-by-page fallocate in-process".into(),
        ratio: c / pp,
        runs: RUNS,
        goal: ">= 7.5 GiB/s contiguous, >= 1.5 GiB/s scattered".into(),
        goal_met: Some(c >= 7.5 && sc >= 1.5),
        samples: json!({
            "contiguous_gib_s": cont,
            "scattered_gib_s": scat,
            "scattered_median_gib_s": sc,
            "per_page_fallocate_gib_s": per_page,
            "one_fallocate_gib_s": whole,
            "one_fallocate_median_gib_s": w,
            "contiguous_vs_limit": c / w,
        }),
    }
    .publish()
}

/// One guest under test in `vm_inflate`.
enum Subject {
    Builtin(Vm),
    Ours(Box<Backend>, Vm),
}

impl Subject {
    fn vm(&mut self) -> &mut Vm {
        match self {
            Subject::Builtin(vm) | Subject::Ours(_, vm) => vm,
        }
    }

    /// Sets the balloon to `balloon` bytes and waits until the driver reports it, polled at
    /// the same interval for both devices. Returns the time from the request to the report.
    fn resize(&mut self, balloon: u64) -> Result<Duration> {
        let t = Instant::now();
        match self {
            Subject::Builtin(vm) => {
                let size = (vm.config.mem_mib * MIB) - balloon;
                vm.qmp.balloon(size)?;
                wait_builtin(vm, size, balloon > 0)?;
            }
            Subject::Ours(backend, _) => {
                backend.set_target(balloon)?;
                wait_for(
                    "our balloon to reach its target",
                    Duration::from_secs(300),
                    POLL,
                    || {
                        let s = backend.status()?;
                        Ok(if s.actual_bytes == balloon {
                            Poll::Ready(())
                        } else {
                            Poll::Pending(format!("actual {} MiB", s.actual_bytes / MIB))
                        })
                    },
                )?;
            }
        }
        Ok(t.elapsed())
    }
}

fn boot_ours(name: &str, args: &[&str], behind_keeper: bool) -> Result<Subject> {
    let backend = if behind_keeper {
        Backend::start_behind_keeper(name, args)?
    } else {
        Backend::start(name, args)?
    };
    let mut config = VmConfig::new(name);
    config.vhost_user_balloon = Some(backend.device());
    let vm = Vm::start(config)?;
    Ok(Subject::Ours(Box::new(backend), vm))
}

/// Inflating 768 MiB of a 1 GiB guest: our backend against QEMU's built-in balloon, and against
/// our backend with discards off (the guest driver's own pace: the floor). Alternating, the same
/// image, the same timing (request to `actual` reached, polled every 20 ms).
fn vm_inflate() -> Result<()> {
    let balloon = 768 * MIB;
    let mut config = VmConfig::new("bench-qemu");
    config.builtin_balloon = Some(BuiltinBalloon::default());
    // Free page reporting stays off on ours, as on QEMU's by default, so both return the same
    // resident memory at inflate time.
    let mut subjects = [
        ("qemu", Subject::Builtin(Vm::start(config)?)),
        (
            "ours",
            boot_ours("bench-ours", &["--no-free-page-reporting"], false)?,
        ),
        (
            "floor",
            boot_ours(
                "bench-floor",
                &["--no-free-page-reporting", "--no-discard"],
                false,
            )?,
        ),
        // Not in the goal: what vhost-user-keeper costs (config reads and writes pass through
        // it; kicks and interrupts do not).
        (
            "keeper",
            boot_ours("bench-keeper", &["--no-free-page-reporting"], true)?,
        ),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); subjects.len()];
    let mut returned: Vec<Vec<f64>> = vec![Vec::new(); subjects.len()];
    let mut returned_mib: Vec<Vec<u64>> = vec![Vec::new(); subjects.len()];
    for run in 0..RUNS {
        for i in 0..subjects.len() {
            // Only the guest under test runs: idle guests under TCG still take CPU time (with
            // four of them on two cores the spread between runs doubled). A stopped and
            // continued VM renegotiates its vhost-user device; the balloon resumes as it was.
            for (j, (_, other)) in subjects.iter_mut().enumerate() {
                let command = if j == i { "cont" } else { "stop" };
                other.vm().qmp.execute(command, json!({}))?;
            }
            let (name, subject) = &mut subjects[i];
            // Make all of the guest's free memory resident first (fill tmpfs until it is
            // nearly full, then free it), so that every subject starts from the same state:
            // otherwise pages returned in the previous run are holes that the guest's
            // zero-on-allocate faults in again while the balloon grows, a cost the floor
            // (which never returns memory) does not pay.
            subject.vm().agent.sh(FILL_FREE_MEMORY)?;
            let resident = subject.vm().ram_allocated()?;
            let t = Instant::now();
            let took = subject.resize(balloon)?;
            times[i].push(took.as_secs_f64());
            // Also when the memory had really left the host (not the benchmark's metric, which
            // stops at `actual`; shown so deferred discards hide nothing): the moment of the
            // last drop of the guest RAM's allocation, once it has held still for 300 ms. (How
            // much can leave depends on how much of what the guest gives up was resident.)
            if *name != "floor" {
                let vm = subject.vm();
                let (mut last, mut last_drop) = (vm.ram_allocated()?, Instant::now());
                let returned_at = wait_for(
                    "the guest RAM's allocation to settle",
                    Duration::from_secs(60),
                    POLL,
                    || {
                        let now = vm.ram_allocated()?;
                        if now < last {
                            (last, last_drop) = (now, Instant::now());
                        }
                        Ok(if last_drop.elapsed() >= Duration::from_millis(300) {
                            Poll::Ready(last_drop)
                        } else {
                            Poll::Pending(format!("{} MiB allocated", now / MIB))
                        })
                    },
                )?;
                let dropped = resident.saturating_sub(last);
                if dropped < balloon / 2 {
                    return Err(balloon_lab::LabError::Other(format!(
                        "{name}: only {} MiB of a {} MiB balloon left the host ({} MiB allocated before)",
                        dropped / MIB,
                        balloon / MIB,
                        resident / MIB
                    )));
                }
                returned[i].push(returned_at.duration_since(t).as_secs_f64());
                returned_mib[i].push(dropped / MIB);
            }
            subject.resize(0)?;
            eprintln!("run {run}: {name} {:.3} s", took.as_secs_f64());
        }
    }
    for (_, subject) in subjects.iter_mut() {
        subject.vm().qmp.execute("cont", json!({}))?;
        let kills = subject.vm().agent.oom_kills()?;
        if kills > 0 {
            return Err(balloon_lab::LabError::Other(format!(
                "{kills} OOM kills in a guest"
            )));
        }
    }
    let (qemu, ours, floor) = (median(&times[0]), median(&times[1]), median(&times[2]));
    BenchResult {
        name: "vm_inflate".into(),
        metric: "inflate 768 MiB of a 1 GiB guest, our backend".into(),
        unit: "s".into(),
        value: ours,
        baseline: qemu,
        baseline_name: "QEMU built-in virtio-balloon".into(),
        ratio: ours / qemu,
        runs: RUNS,
        goal: "ratio <= 0.55 and ours <= 1.15 x floor (discards off)".into(),
        goal_met: Some(ours / qemu <= 0.55 && ours / floor <= 1.15),
        samples: json!({
            "ours_s": times[1],
            "qemu_s": times[0],
            "floor_s": times[2],
            "floor_median_s": floor,
            "ours_vs_floor": ours / floor,
            "memory_returned_s": { "qemu": returned[0], "ours": returned[1], "keeper": returned[3] },
            "memory_returned_mib": { "qemu": returned_mib[0], "ours": returned_mib[1], "keeper": returned_mib[3] },
            "behind_keeper_s": times[3],
            "behind_keeper_vs_ours": median(&times[3]) / ours,
            "accel": if balloon_lab::lab::use_kvm() { "kvm" } else { "tcg" },
        }),
    }
    .publish()
}

/// One scheduling step (policy and actuator) for 10,000 simulated guests, shares policy,
/// against the static policy on the same input (the cost of the step without the solver).
fn scheduler_tick() -> Result<()> {
    use scheduler::actuator::ActuatorConfig;
    use scheduler::drivers::{DriverReading, RawGuestStats};
    use scheduler::engine::Engine;
    use scheduler::model::{GuestSpec, HostState};
    use scheduler::policy::{PolicyConfig, PolicyKind};
    const GUESTS: u64 = 10_000;
    let inputs: Vec<(GuestSpec, Option<DriverReading>)> = (0..GUESTS)
        .map(|i| {
            let memory = (2 + i % 7) << 30;
            let used = memory / 8 + (i * 7919 % 1000) * MIB;
            let balloon = (i * 104_729 % 512) * MIB;
            (
                GuestSpec {
                    name: format!("vm{i}"),
                    memory_bytes: memory,
                    min_bytes: 256 * MIB,
                    max_bytes: memory,
                    shares: 500 + (i % 4) * 500,
                    static_bytes: None,
                },
                Some(DriverReading {
                    target_bytes: Some(balloon),
                    actual_bytes: balloon,
                    stats: Some(RawGuestStats {
                        available_bytes: (memory - balloon).saturating_sub(used),
                        total_bytes: memory - balloon,
                        swap_in: i,
                        major_faults: i,
                        age_seconds: Some(1.0),
                    }),
                }),
            )
        })
        .collect();
    let total: u64 = inputs.iter().map(|(s, _)| s.memory_bytes).sum();
    let host = HostState {
        total_bytes: total,
        available_bytes: total / 10,
        budget_bytes: total * 6 / 10,
    };
    let time_ticks = |kind: PolicyKind| -> Vec<f64> {
        let policy = PolicyConfig {
            kind,
            ..Default::default()
        };
        let mut engine = Engine::new(policy, ActuatorConfig::default());
        (0..RUNS + 1)
            .map(|tick| {
                let t = Instant::now();
                let out = engine.tick(tick as f64, host, &inputs);
                assert_eq!(out.send.len(), GUESTS as usize);
                t.elapsed().as_secs_f64() * 1000.0
            })
            .skip(1) // the first tick allocates the engine's per-guest state
            .collect()
    };
    let (mut shares, mut fixed) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        shares.extend(time_ticks(PolicyKind::Shares));
        fixed.extend(time_ticks(PolicyKind::Static));
    }
    let (value, baseline) = (median(&shares), median(&fixed));
    BenchResult {
        name: "scheduler_tick".into(),
        metric: "one scheduling step for 10,000 guests, shares policy".into(),
        unit: "ms".into(),
        value,
        baseline,
        baseline_name: "the same step with the static policy".into(),
        ratio: value / baseline,
        runs: shares.len(),
        goal: "< 10 ms".into(),
        goal_met: Some(value < 10.0),
        samples: json!({ "shares_ms": shares, "static_ms": fixed }),
    }
    .publish()
}

/// The scheduler's real-socket tick (in-process, `daemon::tick`) over 200 guests, 20 of which
/// have control sockets that accept and never answer and 180 are real backend processes, each
/// with a native memfd frontend (no VMs), against the same tick over 200 real backends. Each configuration runs on a fresh
/// scheduler for 25 ticks every 0.5 s (12.5 s: the hung guests' drivers hit their own 10 s
/// timeout and are asked again within it), with the driver deadline `run` derives from the
/// default 2 s tick (1 s); every tick moves every reachable balloon by 1 MiB, so every tick
/// also writes. The medians leave out each run's first tick, which connects every driver and,
/// with hung guests, waits for them once until the end of the read window (reported apart).
fn scheduler_hung_guests() -> Result<()> {
    use balloon_lab::error::IoContext;
    use balloon_lab::LabError;
    use scheduler::actuator::ActuatorConfig;
    use scheduler::daemon::{self, Budget, Guest, Shared};
    use scheduler::drivers::backend::BackendDriver;
    use scheduler::drivers::fake_backend::FakeBackend;
    use scheduler::engine::Engine;
    use scheduler::model::GuestSpec;
    use scheduler::policy::{PolicyConfig, PolicyKind};
    const GUESTS: usize = 200;
    const HUNG: usize = 20;
    const TICKS: usize = 25;
    const PERIOD: Duration = Duration::from_millis(500);
    const DEADLINE: Duration = Duration::from_secs(1);
    let started_setup = Instant::now();
    let mut backends = Vec::with_capacity(GUESTS);
    let mut frontends = Vec::with_capacity(GUESTS);
    for i in 0..GUESTS {
        let b = Backend::start(
            &format!("hung{i}"),
            &["--no-stats", "--no-free-page-reporting"],
        )?;
        let ram = MemfdRam::new(256 * MIB)?;
        let fe = TestFrontend::connect(&b.socket, &ram)?;
        backends.push(b);
        frontends.push((fe, ram));
    }
    let memory = backends[0].status()?.guest_ram_bytes;
    if memory == 0 {
        return Err(balloon_lab::LabError::Other(
            "the backend has no memory table from its frontend".into(),
        ));
    }
    let hung: Vec<FakeBackend> = (0..HUNG)
        .map(|_| FakeBackend::hung())
        .collect::<std::io::Result<_>>()
        .ctx(|| "starting the hung control sockets".into())?;
    eprintln!(
        "{GUESTS} backends with memfd frontends and {HUNG} hung sockets up in {:.1} s",
        started_setup.elapsed().as_secs_f64()
    );
    let budget = Budget {
        fixed: Some(1 << 40),
        reserve: 0,
    };
    let actuator = ActuatorConfig {
        max_step_bytes: MIB,
        // The frontends never report an actual size: no stall detection.
        stall_window_s: 1e9,
        ..Default::default()
    };
    // One run: a fresh scheduler over the 200 backends, or over 180 of them and the hung
    // sockets, its balloons moving up or down by 1 MiB a tick. Returns the tick times (ms).
    let mut expected_targets = vec![0u64; GUESTS];
    let mut run = |index: usize, with_hung: bool| -> Result<Vec<f64>> {
        let answering = if with_hung { GUESTS - HUNG } else { GUESTS };
        // The runs alternate, healthy then hung: up in the one, back down in the other.
        let up = !with_hung;
        let spec = |name: String| GuestSpec {
            name,
            memory_bytes: memory,
            min_bytes: 0,
            max_bytes: memory,
            shares: 1000,
            static_bytes: Some(if up { MIB } else { memory }),
        };
        let mut guests: Vec<Guest> = backends[..answering]
            .iter()
            .enumerate()
            .map(|(i, b)| Guest {
                spec: spec(format!("vm{i}")),
                driver: Box::new(BackendDriver::new(b.control_socket.clone())),
            })
            .collect();
        if with_hung {
            guests.extend(hung.iter().enumerate().map(|(i, h)| Guest {
                spec: spec(format!("hung{i}")),
                driver: Box::new(BackendDriver::new(h.socket.clone())),
            }));
        }
        let policy = PolicyConfig {
            kind: PolicyKind::Static,
            ..Default::default()
        };
        let shared = Shared::new(Engine::new(policy, actuator.clone()), guests, DEADLINE)
            .map_err(|e| LabError::Other(e.to_string()))?;
        let started = Instant::now();
        let mut times = Vec::with_capacity(TICKS);
        for tick in 0..TICKS {
            let next = started + PERIOD * (tick as u32 + 1);
            let t = Instant::now();
            daemon::tick(&shared, budget, started);
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            let last = shared
                .status()
                .last
                .ok_or_else(|| LabError::Other("a tick without a record (host figures?)".into()))?;
            let unreachable: Vec<&str> = last
                .guests
                .iter()
                .filter(|g| g.state == "unreachable")
                .map(|g| g.name.as_str())
                .collect();
            let hung_ones = unreachable.iter().filter(|n| n.starts_with("hung")).count();
            if hung_ones != if with_hung { HUNG } else { 0 } || unreachable.len() != hung_ones {
                return Err(LabError::Other(format!(
                    "run {index} tick {tick}: unreachable {unreachable:?}"
                )));
            }
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        // Every answering balloon moved one step a tick: no write was lost or late.
        for expected_target in &mut expected_targets[..answering] {
            *expected_target = if up {
                *expected_target + TICKS as u64 * MIB
            } else {
                expected_target.saturating_sub(TICKS as u64 * MIB)
            };
        }
        for ((i, b), &expected_target) in backends.iter().enumerate().zip(&expected_targets) {
            let target = b.status()?.target_bytes;
            if target != expected_target {
                return Err(LabError::Other(format!(
                    "run {index}: vm{i} has a {} MiB target, not {} MiB",
                    target / MIB,
                    expected_target / MIB
                )));
            }
        }
        let errors: u64 = shared.status().driver_errors.values().sum();
        eprintln!(
            "run {index} ({}): first tick {:.1} ms, then median {:.1} ms, max {:.1} ms; {errors} driver errors",
            if with_hung { "20 hung" } else { "all healthy" },
            times[0],
            median(&times[1..]),
            times[1..].iter().copied().fold(0.0, f64::max),
        );
        Ok(times)
    };
    let (mut healthy_runs, mut hung_runs) = (Vec::new(), Vec::new());
    for round in 0..2 {
        healthy_runs.push(run(2 * round, false)?);
        hung_runs.push(run(2 * round + 1, true)?);
    }
    let steady = |runs: &[Vec<f64>]| -> Vec<f64> {
        runs.iter().flat_map(|r| r[1..].iter().copied()).collect()
    };
    let first = |runs: &[Vec<f64>]| -> Vec<f64> { runs.iter().map(|r| r[0]).collect() };
    let (value, baseline) = (median(&steady(&hung_runs)), median(&steady(&healthy_runs)));
    let ratio = value / baseline;
    BenchResult {
        name: "scheduler_hung_guests".into(),
        metric: "scheduler tick over 200 guests: 180 real backends, 20 that never answer".into(),
        unit: "ms".into(),
        value,
        baseline,
        baseline_name: "the same tick over 200 real backends".into(),
        ratio,
        runs: steady(&hung_runs).len(),
        goal: "ratio < 1.5".into(),
        goal_met: Some(ratio < 1.5),
        samples: json!({
            "hung_ms": hung_runs,
            "healthy_ms": healthy_runs,
            "first_tick_hung_ms": first(&hung_runs),
            "first_tick_healthy_ms": first(&healthy_runs),
            "driver_deadline_ms": DEADLINE.as_millis() as u64,
            "tick_interval_ms": PERIOD.as_millis() as u64,
            "frontends": "native memfd vhost-user frontends (256 MiB each), one per backend",
        }),
    }
    .publish()
}

/// The overcommit scenario (examples/scenarios/overcommit.toml) in the simulator under each
/// policy: guest work completed, OOM events, time over budget.
fn policy_scenarios() -> Result<()> {
    use scheduler::sim::{self, Scenario};
    let path = balloon_lab::lab::repo_root().join("examples/scenarios/overcommit.toml");
    let mut scenario =
        Scenario::load(&path).map_err(|e| balloon_lab::LabError::Other(e.to_string()))?;
    let mut results = serde_json::Map::new();
    let mut work = std::collections::HashMap::new();
    for kind in ["static", "shares", "pressure", "mom"] {
        scenario.policy.kind = kind.parse().map_err(balloon_lab::LabError::Other)?;
        let out = sim::run(&scenario);
        eprintln!(
            "{kind:>8}: work {:.0} s, OOM events {}, over budget {:.0} s, host short {:.0} s",
            out.work_s, out.oom_events, out.over_budget_s, out.host_short_s
        );
        work.insert(kind, out.work_s);
        results.insert(
            kind.into(),
            json!({
                "work_s": out.work_s,
                "oom_events": out.oom_events,
                "over_budget_s": out.over_budget_s,
                "host_short_s": out.host_short_s,
                "guests": out.guests,
            }),
        );
    }
    let (value, baseline) = (work["shares"], work["static"]);
    BenchResult {
        name: "policy_scenarios".into(),
        metric: "guest work completed in the overcommit scenario, shares policy".into(),
        unit: "guest-seconds".into(),
        value,
        baseline,
        baseline_name: "static policy".into(),
        ratio: value / baseline,
        runs: 1,
        goal: "record (compare work, OOM events, time over budget per policy)".into(),
        goal_met: None,
        samples: serde_json::Value::Object(results),
    }
    .publish()
}

/// The user-level balloon inflating 512 MiB of a 1 GiB guest: adaptive rate against a fixed
/// rate, and the kernel driver inflating the same amount on the same guest; plus how fast the
/// app resolves physical page numbers.
fn guest_app_inflate() -> Result<()> {
    use balloon_protocol::ControlRequest;
    const APP_RUNS: usize = 3;
    let amount = 512 * MIB;
    let backend = Backend::start("bench-app", &["--no-free-page-reporting"])?;
    let mut config = VmConfig::new("bench-app");
    config.vhost_user_balloon = Some(backend.device());
    config.serial_ports = vec![("org.balloon.app".into(), backend.app_socket.clone())];
    let mut vm = Vm::start(config)?;
    let wait = |what: &str, cond: &dyn Fn(&balloon_protocol::BackendStatus) -> bool| {
        wait_for(what, Duration::from_secs(300), POLL, || {
            let s = backend.status()?;
            Ok(if cond(&s) {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("{:?}", s.app))
            })
        })
    };
    let app_target = |bytes: u64| -> Result<()> {
        let r = backend.request(ControlRequest::SetAppTarget {
            target_bytes: bytes,
        })?;
        if r.ok {
            Ok(())
        } else {
            Err(balloon_lab::LabError::Other(format!("{:?}", r.error)))
        }
    };
    let time_app = |vm: &mut Vm, args: &str| -> Result<f64> {
        vm.agent
            .sh("dd if=/dev/zero of=/tmp/fill bs=1M count=700 2>/dev/null && rm /tmp/fill")?;
        vm.agent.spawn(&format!(
            "balloon-guest --connect serial:/dev/virtio-ports/org.balloon.app {args} > /tmp/app.log 2>&1"
        ))?;
        wait("the app to connect", &|s| s.app.connected)?;
        let t = Instant::now();
        app_target(amount)?;
        wait("the app to hold 512 MiB", &|s| {
            s.app.ballooned_bytes == amount
        })?;
        let took = t.elapsed().as_secs_f64();
        app_target(0)?;
        wait("the app to give it back", &|s| s.app.ballooned_bytes == 0)?;
        vm.agent.sh(
            "kill $(pidof balloon-guest); while pidof balloon-guest >/dev/null; do sleep 0.1; done",
        )?;
        wait("the app to be gone", &|s| !s.app.connected)?;
        Ok(took)
    };
    let (mut adaptive, mut fixed, mut driver) = (vec![], vec![], vec![]);
    for run in 0..APP_RUNS {
        adaptive.push(time_app(&mut vm, "")?);
        // Fixed: the rate pinned at the adaptive controller's starting point.
        fixed.push(time_app(&mut vm, "--min-rate 64M --max-rate 64M")?);
        vm.agent
            .sh("dd if=/dev/zero of=/tmp/fill bs=1M count=700 2>/dev/null && rm /tmp/fill")?;
        let t = Instant::now();
        backend.set_target(amount)?;
        backend.wait_actual(amount, Duration::from_secs(300))?;
        driver.push(t.elapsed().as_secs_f64());
        backend.set_target(0)?;
        backend.wait_actual(0, Duration::from_secs(300))?;
        eprintln!(
            "run {run}: app adaptive {:.3} s, app fixed 64 MiB/s {:.3} s, kernel driver {:.3} s",
            adaptive[run], fixed[run], driver[run]
        );
    }
    let pagemap_rate: Vec<f64> = (0..3)
        .map(|_| {
            vm.agent
                .sh("balloon-guest --measure-pagemap 256M")
                .ok()
                .and_then(|o| o.trim().parse().ok())
                .unwrap_or(f64::NAN)
        })
        .collect();
    let ooms = vm.agent.oom_kills()?;
    let (a, f, d) = (median(&adaptive), median(&fixed), median(&driver));
    BenchResult {
        name: "guest_app_inflate".into(),
        metric: "user-level balloon inflating 512 MiB, adaptive rate".into(),
        unit: "s".into(),
        value: a,
        baseline: d,
        baseline_name: "kernel virtio_balloon driver, same guest and amount".into(),
        ratio: a / d,
        runs: APP_RUNS,
        goal: "PFN resolution >= 1 GiB/s; record app vs driver".into(),
        goal_met: Some(median(&pagemap_rate) >= 1.0 && ooms == 0),
        samples: json!({
            "adaptive_s": adaptive,
            "fixed_64mib_s": fixed,
            "fixed_median_s": f,
            "driver_s": driver,
            "pagemap_gib_s": pagemap_rate,
            "oom_kills": ooms,
        }),
    }
    .publish()
}

/// The control socket under a connection flood: the release backend with LimitNOFILE 1024
/// (applied with prlimit(2) on it right after it started: its connection cap, 64, is the same
/// under either limit), 2000 idle connections to its control socket held open all along by
/// one thread (each one the server closes is connected again at once, so 2000 keep coming
/// back), and meanwhile a status request every 100 ms for 30 s on a new connection (2 s
/// timeout; connect and exchange timed; a reply after 2 s counts as unanswered). Compared with
/// the same requests for 5 s before the flood, in the same run.
fn control_flood() -> Result<()> {
    use balloon_lab::flood::{self, Flood, Probe};
    use balloon_lab::LabError;
    const IDLE: usize = 2000;
    const LIMIT_NOFILE: u64 = 1024;
    const PERIOD: Duration = Duration::from_millis(100);
    const FLOOD_FOR: Duration = Duration::from_secs(30);
    const QUIET_FOR: Duration = Duration::from_secs(5);
    const TIMEOUT: Duration = Duration::from_secs(2);
    const MAX_LOG_BYTES: u64 = 1_000_000;
    let own_limit = flood::raise_own_fd_limit(8192);
    if own_limit < IDLE as u64 + 256 {
        return Err(LabError::Other(format!(
            "this process may open only {own_limit} descriptors, too few for {IDLE} connections"
        )));
    }
    let own_fds_before = flood::fd_count(std::process::id())?;
    let backend = Backend::start("bench-flood", &["--no-stats", "--no-free-page-reporting"])?;
    let pid = backend
        .pid()
        .ok_or_else(|| LabError::Other("the backend has no pid".into()))?;
    flood::set_fd_limit(pid, LIMIT_NOFILE)?;
    let limit = flood::fd_limit(pid)?;
    let socket = &backend.control_socket;
    let quiet = flood::status_loop(socket, PERIOD, QUIET_FOR, TIMEOUT, |_| {});
    let (fds_quiet, threads_quiet) = (flood::fd_count(pid)?, flood::thread_count(pid)?);
    let log_path = backend.dir.join("backend.log");
    let log_len = || std::fs::metadata(&log_path).map_or(0, |m| m.len());
    let log_before = log_len();
    let flooding = Flood::start(socket, IDLE)?;
    let ramp = flooding.wait_open(IDLE, Duration::from_secs(20))?;
    eprintln!(
        "{IDLE} idle connections open in {:.0} ms (backend limit {limit} descriptors)",
        ramp.as_secs_f64() * 1000.0
    );
    let (mut max_fds, mut max_threads, mut min_open) = (0u64, 0u64, u64::MAX);
    let cpu_before = flood::cpu_seconds(pid)?;
    let probes = flood::status_loop(socket, PERIOD, FLOOD_FOR, TIMEOUT, |sent| {
        max_fds = max_fds.max(flood::fd_count(pid).unwrap_or(0));
        max_threads = max_threads.max(flood::thread_count(pid).unwrap_or(0));
        let c = flooding.counts();
        min_open = min_open.min(c.open);
        if sent % 50 == 0 {
            eprintln!(
                "{sent} requests sent; flood: {} open, {} reconnects",
                c.open, c.reconnects
            );
        }
    });
    let backend_cpu = flood::cpu_seconds(pid)? - cpu_before;
    let (fds_end, threads_end) = (flood::fd_count(pid)?, flood::thread_count(pid)?);
    let counts = flooding.stop();
    let log_bytes = log_len().saturating_sub(log_before);
    // The backend's connections end as the flood's close; give its threads a moment.
    let settled = wait_for(
        "the backend to let go of the flood",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let fds = flood::fd_count(pid)?;
            Ok(if fds <= fds_quiet {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("{fds} descriptors"))
            })
        },
    );
    let (fds_after, threads_after) = (flood::fd_count(pid)?, flood::thread_count(pid)?);
    let answers_after = backend.status().is_ok();
    let new_log = std::fs::read(&log_path).unwrap_or_default();
    let new_log = String::from_utf8_lossy(&new_log[(log_before as usize).min(new_log.len())..]);
    for line in new_log.lines().take(20) {
        eprintln!("backend.log: {line}");
    }
    let mut failures = std::collections::BTreeMap::<String, usize>::new();
    for p in &probes {
        if let Some(f) = &p.failure {
            *failures.entry(f.clone()).or_default() += 1;
        }
    }
    let unanswered = probes.iter().filter(|p| p.failure.is_some()).count();
    let (p50, p99, max) = (
        flood::latency_quantile(&probes, 0.5),
        flood::latency_quantile(&probes, 0.99),
        flood::latency_quantile(&probes, 1.0),
    );
    let baseline = flood::latency_quantile(&quiet, 0.99);
    let latencies = |ps: &[Probe]| -> Vec<f64> { ps.iter().map(|p| p.latency_ms).collect() };
    let samples = json!({
        "unanswered": unanswered,
        "p99_ms": p99,
        "log_bytes": log_bytes,
        "p50_ms": p50,
        "max_ms": max,
        "requests": probes.len(),
        "reconnects": counts.reconnects,
        "backend_fds": fds_end,
        "backend_cpu_s_during_flood": backend_cpu,
        "backend_threads": threads_end,
        "backend_fds_max": max_fds,
        "backend_threads_max": max_threads,
        "backend_fds_quiet": fds_quiet,
        "backend_threads_quiet": threads_quiet,
        "backend_fds_after": fds_after,
        "backend_threads_after": threads_after,
        "backend_fds_settled": settled.is_ok(),
        "backend_answers_after": answers_after,
        "backend_fd_limit": limit,
        "limit_applied": "prlimit(2) RLIMIT_NOFILE 1024/1024 on the backend right after it started",
        "idle_connections": IDLE,
        "flood_min_open": min_open,
        "flood_ramp_ms": ramp.as_secs_f64() * 1000.0,
        "flood": counts,
        "failures": failures,
        "latencies_ms": latencies(&probes),
        "quiet_requests": quiet.len(),
        "quiet_unanswered": quiet.iter().filter(|p| p.failure.is_some()).count(),
        "quiet_p50_ms": flood::latency_quantile(&quiet, 0.5),
        "quiet_latencies_ms": latencies(&quiet),
        "timeout_ms": TIMEOUT.as_millis() as u64,
        "period_ms": PERIOD.as_millis() as u64,
        "flood_s": FLOOD_FOR.as_secs(),
    });
    let runs = probes.len();
    drop(backend);
    let own_fds_after = flood::fd_count(std::process::id())?;
    if own_fds_after > own_fds_before {
        eprintln!("this process holds {own_fds_after} descriptors, {own_fds_before} before");
    }
    let mut samples = samples;
    samples["bench_fds_before"] = json!(own_fds_before);
    samples["bench_fds_after"] = json!(own_fds_after);
    BenchResult {
        name: "control_flood".into(),
        metric: "p99 status latency (connect + exchange) under 2000 idle connections".into(),
        unit: "ms".into(),
        value: p99,
        baseline,
        baseline_name: "p99 of the same status requests without the flood".into(),
        ratio: p99 / baseline,
        runs,
        goal: "unanswered == 0 and log_bytes < 1 MB".into(),
        goal_met: Some(unanswered == 0 && log_bytes < MAX_LOG_BYTES),
        samples,
    }
    .publish()
}

type Bench = (&'static str, fn() -> Result<()>);
const BENCHES: &[Bench] = &[
    ("qemu_builtin_inflate", qemu_builtin_inflate),
    ("discard_native", discard_native),
    ("vm_inflate", vm_inflate),
    ("scheduler_tick", scheduler_tick),
    ("scheduler_hung_guests", scheduler_hung_guests),
    ("policy_scenarios", policy_scenarios),
    ("guest_app_inflate", guest_app_inflate),
    ("control_flood", control_flood),
];

fn main() {
    let _ = env_logger::try_init();
    let names: Vec<String> = std::env::args().skip(1).collect();
    for name in &names {
        if !BENCHES.iter().any(|(n, _)| n == name) {
            let known: Vec<&str> = BENCHES.iter().map(|(n, _)| *n).collect();
            eprintln!("unknown benchmark {name}; known: {}", known.join(", "));
            std::process::exit(2);
        }
    }
    let mut failed = false;
    for (name, run) in BENCHES {
        if names.is_empty() || names.iter().any(|n| n == name) {
            if let Err(e) = run() {
                eprintln!("{name}: FAILED: {e}");
                failed = true;
            }
        }
    }
    std::process::exit(i32::from(failed));
}
