use super::*;
use balloon_lab::hugepages::{app_returns, driver_returns, HugePages, HUGE_PAGE};
use balloon_lab::{host, GuestRam, LabError};

/// What inflating 75% of one guest cost.
struct Inflate {
    seconds_per_gib: f64,
    cpu_seconds_per_gib: f64,
    /// The backend's own memory: its resident set outside the guest mapping (shared memory),
    /// its mapped page-tracking file included.
    backend_own_bytes: u64,
    /// Discard calls per GiB inflated: each costs a TLB-shootdown round on QEMU's CPUs.
    discard_calls_per_gib: f64,
}

/// Inflates 75% of a guest of `gib` GiB whose memory is mostly resident (70% touched), timed
/// from the request until the backend has discarded all of the balloon.
fn inflate(gib: u64) -> Result<Inflate> {
    let name = format!("bench-scale-{gib}g");
    let backend = Backend::start(&name, &["--no-free-page-reporting", "--no-stats"])?;
    let mut config = VmConfig::new(&name);
    config.mem_mib = gib * 1024;
    config.vhost_user_balloon = Some(backend.device());
    let mut vm = Vm::start(config)?;
    vm.touch_and_free(gib * 1024 * 70 / 100)?;
    let pid = backend
        .pid()
        .ok_or_else(|| balloon_lab::LabError::Other("the backend is not running".into()))?;
    let balloon = gib * 768 * MIB;
    let status_before = backend.status()?;
    let cpu_before = host::cpu_seconds(pid)?;
    let t = Instant::now();
    backend.set_target(balloon)?;
    backend.wait_actual(balloon, Duration::from_secs(600))?;
    wait_for(
        "the backend to discard all of the balloon",
        Duration::from_secs(120),
        POLL,
        || {
            let discarded = backend.status()?.reclaimed_bytes - status_before.reclaimed_bytes;
            Ok(if discarded >= balloon {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("{} MiB discarded", discarded / MIB))
            })
        },
    )?;
    let seconds = t.elapsed().as_secs_f64();
    let cpu = host::cpu_seconds(pid)? - cpu_before;
    let calls = backend.status()?.discard_calls - status_before.discard_calls;
    let mem = host::proc_memory(pid)?;
    let pages_file = std::fs::metadata(vhost_balloon_backend::state::beside(
        &backend.state_file,
        "pages",
    ))
    .map(|m| m.len())
    .unwrap_or(0);
    // The tracking file is mapped shared, so its resident pages are already in the RSS.
    let own = mem.vm_rss.saturating_sub(mem.rss_shmem);
    let where_resident: Vec<String> = host::rss_by_mapping(pid)?
        .iter()
        .take(6)
        .map(|(name, bytes)| {
            let short = name.rsplit('/').next().unwrap_or(name);
            format!("{short} {} KiB", bytes / 1024)
        })
        .collect();
    eprintln!("  backend resident: {}", where_resident.join(", "));
    let ballooned_gib = balloon as f64 / (1u64 << 30) as f64;
    let result = Inflate {
        seconds_per_gib: seconds / ballooned_gib,
        cpu_seconds_per_gib: cpu / ballooned_gib,
        backend_own_bytes: own,
        discard_calls_per_gib: calls as f64 / ballooned_gib,
    };
    eprintln!(
        "{gib} GiB guest: {:.3} s/GiB, backend CPU {:.3} s/GiB, backend own memory {:.2} MiB \
         (tracking file {} KiB); {calls} discard calls ({:.1} MiB each)",
        result.seconds_per_gib,
        result.cpu_seconds_per_gib,
        own as f64 / MIB as f64,
        pages_file / 1024,
        balloon as f64 / MIB as f64 / calls.max(1) as f64,
    );
    Ok(result)
}

/// The share of the balloon that really leaves the host on a 1 GiB guest on 2 MiB huge pages
/// (a hugetlb memfd): the driver's at 512 MiB, then, with the driver's balloon back in the
/// guest, the app's at 256 MiB among scattered free memory (what tests/tests/hugepages.rs
/// asserts on, measured the same way).
fn shares_on_2m_pages() -> Result<(f64, f64)> {
    const GUEST_MIB: u64 = 1024;
    let _pages = HugePages::reserve(GUEST_MIB * MIB / HUGE_PAGE + 8)
        .map_err(|e| LabError::Other(format!("reserving huge pages: {e:?}")))?;
    let name = "bench-scale-2m";
    let backend = Backend::start(name, &["--no-free-page-reporting", "--no-stats"])?;
    let mut config = VmConfig::new(name);
    config.mem_mib = GUEST_MIB;
    config.ram = GuestRam::HugetlbMemfd;
    config.vhost_user_balloon = Some(backend.device());
    config.serial_ports = vec![backend.app_port()];
    let mut vm = Vm::start(config)?;
    vm.touch_and_free(700)?;
    let (driver, _) = driver_returns(&vm, &backend, 512 * MIB)?;
    backend.set_target(0)?;
    backend.wait_actual(0, Duration::from_secs(120))?;
    vm.touch_and_free(700)?;
    let app = app_returns(&mut vm, &backend, 256 * MIB)?;
    eprintln!(
        "2 MiB pages: the driver returned {} of {} MiB ({:.3}), the app {} of {} MiB ({:.3})",
        driver.bytes() / MIB,
        driver.balloon / MIB,
        driver.share(),
        app.bytes() / MIB,
        app.balloon / MIB,
        app.share()
    );
    backend.set_app_target(0)?;
    Ok((driver.share(), app.share()))
}

/// One guest size's runs, summed up: medians of the costs, the largest own memory.
struct Size {
    guest_gib: u64,
    seconds_per_gib: f64,
    seconds_per_gib_runs: Vec<f64>,
    cpu_seconds_per_gib: f64,
    backend_own_bytes: u64,
    discard_calls_per_gib: f64,
}

impl Size {
    fn of(guest_gib: u64, runs: &[Inflate]) -> Size {
        let pick = |f: fn(&Inflate) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        Size {
            guest_gib,
            seconds_per_gib: pick(|r| r.seconds_per_gib),
            seconds_per_gib_runs: runs.iter().map(|r| r.seconds_per_gib).collect(),
            cpu_seconds_per_gib: pick(|r| r.cpu_seconds_per_gib),
            backend_own_bytes: runs.iter().map(|r| r.backend_own_bytes).max().unwrap_or(0),
            discard_calls_per_gib: pick(|r| r.discard_calls_per_gib),
        }
    }
}

/// Inflating 75% of 1, 2, 4 and 8 GiB guests (or `VM_SCALING_SIZES`), one at a time, each size
/// `RUNS` times on a fresh guest: the median cost per GiB at 8 GiB over that at 1 GiB, and the
/// backend's own memory (the largest of the runs) against 4 MiB + 40 KiB per GiB.
pub(super) fn vm_scaling() -> Result<()> {
    const RUNS: usize = 3;
    // `VM_SCALING_SIZES=1,8` measures some sizes only (growth is the last over the first).
    let chosen: Vec<u64> = match std::env::var("VM_SCALING_SIZES") {
        Ok(list) => list
            .split(',')
            .map(|g| {
                g.trim().parse().ok().filter(|&g| g > 0).ok_or_else(|| {
                    LabError::Other(format!("VM_SCALING_SIZES: {g:?} is not a GiB count"))
                })
            })
            .collect::<Result<_>>()?,
        Err(_) => vec![1, 2, 4, 8],
    };
    let mut sizes = Vec::new();
    for gib in chosen {
        let runs: Vec<Inflate> = (0..RUNS).map(|_| inflate(gib)).collect::<Result<_>>()?;
        sizes.push(Size::of(gib, &runs));
    }
    let (driver_share_2m, app_share_2m) = shares_on_2m_pages()?;
    let (first, last) = (&sizes[0], &sizes[sizes.len() - 1]);
    let growth = last.seconds_per_gib / first.seconds_per_gib;
    let cpu_growth = last.cpu_seconds_per_gib / first.cpu_seconds_per_gib.max(1e-9);
    let memory_ok = sizes
        .iter()
        .all(|r| r.backend_own_bytes <= 4 * MIB + r.guest_gib * 40 * 1024);
    for r in &sizes {
        eprintln!(
            "{} GiB: {:.3} s/GiB (runs {:.3?}), CPU {:.3} s/GiB, own memory {:.2} MiB \
             (limit {:.2}), {:.0} discard calls per GiB",
            r.guest_gib,
            r.seconds_per_gib,
            r.seconds_per_gib_runs,
            r.cpu_seconds_per_gib,
            r.backend_own_bytes as f64 / MIB as f64,
            4.0 + r.guest_gib as f64 * 40.0 / 1024.0,
            r.discard_calls_per_gib
        );
    }
    BenchResult {
        name: "vm_scaling".into(),
        metric: "seconds per GiB inflated, 8 GiB guest over 1 GiB guest".into(),
        unit: "ratio".into(),
        value: growth,
        baseline: 1.0,
        baseline_name: "the same cost per GiB".into(),
        ratio: growth,
        runs: RUNS,
        goal: "per_gib_growth <= 1.15, backend memory <= 4 MiB + 40 KiB per GiB, \
               app_share_2m >= 0.9"
            .into(),
        goal_met: Some(growth <= 1.15 && memory_ok && app_share_2m >= 0.9),
        samples: json!({
            "per_gib_growth": growth,
            "cpu_per_gib_growth": cpu_growth,
            "driver_share_2m": driver_share_2m,
            "app_share_2m": app_share_2m,
            "guests": sizes.iter().map(|r| json!({
                "guest_gib": r.guest_gib,
                "seconds_per_gib": r.seconds_per_gib,
                "seconds_per_gib_runs": r.seconds_per_gib_runs,
                "backend_cpu_seconds_per_gib": r.cpu_seconds_per_gib,
                "backend_own_bytes": r.backend_own_bytes,
                "discard_calls_per_gib": r.discard_calls_per_gib,
            })).collect::<Vec<_>>(),
        }),
    }
    .publish()
    .ctx(|| "publishing the result".into())
}
