use super::*;
use balloon_lab::host;

/// What inflating 75% of one guest cost.
struct Inflate {
    guest_gib: u64,
    seconds_per_gib: f64,
    cpu_seconds_per_gib: f64,
    /// The backend's own memory: its resident set outside the guest mapping (shared memory),
    /// its mapped page-tracking file included.
    backend_own_bytes: u64,
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
    let reclaimed_before = backend.status()?.reclaimed_bytes;
    let cpu_before = host::cpu_seconds(pid)?;
    let t = Instant::now();
    backend.set_target(balloon)?;
    backend.wait_actual(balloon, Duration::from_secs(600))?;
    wait_for(
        "the backend to discard all of the balloon",
        Duration::from_secs(120),
        POLL,
        || {
            let discarded = backend.status()?.reclaimed_bytes - reclaimed_before;
            Ok(if discarded >= balloon {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("{} MiB discarded", discarded / MIB))
            })
        },
    )?;
    let seconds = t.elapsed().as_secs_f64();
    let cpu = host::cpu_seconds(pid)? - cpu_before;
    let mem = host::proc_memory(pid)?;
    let pages_file = std::fs::metadata(vhost_balloon_backend::state::beside(
        &backend.state_file,
        "pages",
    ))
    .map(|m| m.len())
    .unwrap_or(0);
    // The tracking file is mapped shared, so its resident pages are already in the RSS.
    let own = mem.vm_rss.saturating_sub(mem.rss_shmem);
    let ballooned_gib = balloon as f64 / (1u64 << 30) as f64;
    let result = Inflate {
        guest_gib: gib,
        seconds_per_gib: seconds / ballooned_gib,
        cpu_seconds_per_gib: cpu / ballooned_gib,
        backend_own_bytes: own,
    };
    eprintln!(
        "{gib} GiB guest: {:.3} s/GiB, backend CPU {:.3} s/GiB, backend own memory {:.2} MiB \
         (tracking file {} KiB)",
        result.seconds_per_gib,
        result.cpu_seconds_per_gib,
        own as f64 / MIB as f64,
        pages_file / 1024
    );
    Ok(result)
}

/// Inflating 75% of 1, 2, 4 and 8 GiB guests, one at a time: the cost per GiB at 8 GiB over
/// the cost per GiB at 1 GiB, and the backend's own memory against 4 MiB + 40 KiB per GiB.
pub(super) fn vm_scaling() -> Result<()> {
    let runs: Vec<Inflate> = [1, 2, 4, 8]
        .into_iter()
        .map(inflate)
        .collect::<Result<_>>()?;
    let (first, last) = (&runs[0], &runs[runs.len() - 1]);
    let growth = last.seconds_per_gib / first.seconds_per_gib;
    let cpu_growth = last.cpu_seconds_per_gib / first.cpu_seconds_per_gib.max(1e-9);
    let memory_ok = runs
        .iter()
        .all(|r| r.backend_own_bytes <= 4 * MIB + r.guest_gib * 40 * 1024);
    BenchResult {
        name: "vm_scaling".into(),
        metric: "seconds per GiB inflated, 8 GiB guest over 1 GiB guest".into(),
        unit: "ratio".into(),
        value: growth,
        baseline: 1.0,
        baseline_name: "the same cost per GiB".into(),
        ratio: growth,
        runs: 1,
        goal: "per_gib_growth <= 1.15 and backend memory <= 4 MiB + 40 KiB per GiB".into(),
        goal_met: Some(growth <= 1.15 && memory_ok),
        samples: json!({
            "per_gib_growth": growth,
            "cpu_per_gib_growth": cpu_growth,
            "guests": runs.iter().map(|r| json!({
                "guest_gib": r.guest_gib,
                "seconds_per_gib": r.seconds_per_gib,
                "backend_cpu_seconds_per_gib": r.cpu_seconds_per_gib,
                "backend_own_bytes": r.backend_own_bytes,
            })).collect::<Vec<_>>(),
        }),
    }
    .publish()
    .ctx(|| "publishing the result".into())
}
