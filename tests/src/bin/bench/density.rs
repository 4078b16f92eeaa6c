use super::*;
use balloon_lab::{host, LabError};

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&dir)
        .ctx(|| format!("reading {dir}"))?
        .count())
}

/// 200 backends on one host, each serving a native memfd frontend (no VM): what they cost
/// together (resident memory outside the guest RAM they map, descriptors), how long each takes
/// to start and take its frontend, and one scheduler tick over all of them through their real
/// control sockets (the first, which also connects to each, and the next one), every tick
/// moving every balloon by 1 MiB, checked on each backend.
pub(super) fn density() -> Result<()> {
    use scheduler::actuator::ActuatorConfig;
    use scheduler::daemon::{self, Budget, Guest, Shared};
    use scheduler::drivers::backend::BackendDriver;
    use scheduler::engine::Engine;
    use scheduler::model::GuestSpec;
    use scheduler::policy::{PolicyConfig, PolicyKind};
    const GUESTS: usize = 200;
    const TICKS: usize = 2;
    let started = Instant::now();
    let fleet = Fleet::start("dense", GUESTS, 256 * MIB)?;
    let startup_total = started.elapsed().as_secs_f64();
    let (mut own_bytes, mut rss_bytes, mut fds) = (vec![], vec![], vec![]);
    for b in &fleet.backends {
        let pid = b
            .pid()
            .ok_or_else(|| LabError::Other("a backend is not running".into()))?;
        let mem = host::proc_memory(pid)?;
        rss_bytes.push(mem.vm_rss as f64);
        own_bytes.push(mem.vm_rss.saturating_sub(mem.rss_shmem) as f64);
        fds.push(open_fds(pid)? as f64);
    }
    let memory = fleet.guest_ram_bytes;
    let guests: Vec<Guest> = fleet
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| Guest {
            spec: GuestSpec {
                name: format!("vm{i}"),
                memory_bytes: memory,
                min_bytes: 0,
                max_bytes: memory,
                shares: 1000,
                static_bytes: Some(MIB),
            },
            driver: Box::new(BackendDriver::new(b.control_socket.clone())),
        })
        .collect();
    let actuator = ActuatorConfig {
        max_step_bytes: MIB,
        // The frontends never report an actual size: no stall detection.
        stall_window_s: 1e9,
        ..Default::default()
    };
    let policy = PolicyConfig {
        kind: PolicyKind::Static,
        ..Default::default()
    };
    let shared = Shared::new(
        Engine::new(policy, actuator),
        guests,
        Duration::from_secs(1),
    )
    .map_err(|e| LabError::Other(e.to_string()))?;
    let budget = Budget {
        fixed: Some(1 << 40),
        reserve: 0,
    };
    let tick_start = Instant::now();
    let mut tick_ms = Vec::with_capacity(TICKS);
    for _ in 0..TICKS {
        let t = Instant::now();
        daemon::tick(&shared, budget, tick_start).ctx(|| "a scheduler tick".into())?;
        tick_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    for (i, b) in fleet.backends.iter().enumerate() {
        let target = b.status()?.target_bytes;
        if target != TICKS as u64 * MIB {
            return Err(LabError::Other(format!(
                "vm{i} has a {} MiB target after {TICKS} ticks of 1 MiB",
                target / MIB
            )));
        }
    }
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let own_total_mib = sum(&own_bytes) / MIB as f64;
    let per_backend_mib = median(&own_bytes) / MIB as f64;
    eprintln!(
        "{GUESTS} backends up in {startup_total:.1} s (each {:.1} ms median, {:.1} ms max); \
         own memory {own_total_mib:.0} MiB in all ({per_backend_mib:.2} MiB median each), \
         RSS with the mapped guest rings {:.0} MiB; {} descriptors in all ({} each); \
         ticks {:.1} ms (connecting) then {:.1} ms",
        median(&fleet.start_seconds) * 1000.0,
        max(&fleet.start_seconds) * 1000.0,
        sum(&rss_bytes) / MIB as f64,
        sum(&fds),
        median(&fds),
        tick_ms[0],
        tick_ms[1],
    );
    BenchResult {
        name: "density".into(),
        metric: "resident memory of 200 backends outside the guest RAM they map".into(),
        unit: "MiB".into(),
        value: own_total_mib,
        baseline: GUESTS as f64 * 4.0,
        baseline_name: "4 MiB per backend".into(),
        ratio: own_total_mib / (GUESTS as f64 * 4.0),
        runs: 1,
        goal: "<= 4 MiB per backend; one tick over all of them under the 2 s tick interval".into(),
        goal_met: Some(per_backend_mib <= 4.0 && max(&tick_ms) < 2000.0),
        samples: json!({
            "backends": GUESTS,
            "guest_ram_bytes_each": memory,
            "startup_total_s": startup_total,
            "startup_median_ms": median(&fleet.start_seconds) * 1000.0,
            "startup_max_ms": max(&fleet.start_seconds) * 1000.0,
            "own_memory_total_mib": own_total_mib,
            "own_memory_median_mib": per_backend_mib,
            "rss_total_mib": sum(&rss_bytes) / MIB as f64,
            "fds_total": sum(&fds),
            "fds_median": median(&fds),
            "tick_first_ms": tick_ms[0],
            "tick_next_ms": tick_ms[1],
        }),
    }
    .publish()
    .ctx(|| "publishing the result".into())
}
