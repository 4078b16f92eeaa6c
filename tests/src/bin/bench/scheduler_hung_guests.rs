use super::*;

/// The scheduler's real-socket tick (in-process, `daemon::tick`) over 200 guests, 20 of which
/// have control sockets that accept and never answer and 180 are real backend processes, each
/// with a native memfd frontend (no VMs), against the same tick over 200 real backends. Each configuration runs on a fresh
/// scheduler for 25 ticks every 0.5 s (12.5 s: the hung guests' drivers hit their own 10 s
/// timeout and are asked again within it), with the driver deadline `run` derives from the
/// default 2 s tick (1 s); every tick moves every reachable balloon by 1 MiB, so every tick
/// also writes. The medians leave out each run's first tick, which connects every driver and,
/// with hung guests, waits for them once until the end of the read window (reported apart).
pub(super) fn scheduler_hung_guests() -> Result<()> {
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
    let fleet = Fleet::start("hung", GUESTS, 256 * MIB)?;
    let (backends, memory) = (&fleet.backends, fleet.guest_ram_bytes);
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
            daemon::tick(&shared, budget, started).ctx(|| "a scheduler tick".into())?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            let last = shared
                .status()
                .last
                .ok_or_else(|| LabError::Other("a tick without a record (host figures?)".into()))?;
            let unreachable: Vec<&str> = last
                .guests
                .iter()
                .filter(|g| g.state == scheduler::trace::GuestCondition::Unreachable)
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
    .ctx(|| "publishing the result".into())
}
