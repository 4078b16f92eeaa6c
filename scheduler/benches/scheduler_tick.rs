//! `scheduler_tick`: one scheduling step (policy and actuator) for 10,000 simulated guests,
//! shares policy, against the static policy on the same input (the cost of the step without
//! the solver). No VM: `cargo bench -p scheduler --bench scheduler_tick`, or
//! `make bench BENCH=scheduler_tick`; writes target/bench/scheduler_tick.json and prints one line.

use balloon_protocol::bench::{median, BenchResult};
use serde_json::json;
use std::time::Instant;

const RUNS: usize = 5;
const MIB: u64 = 1 << 20;

fn main() {
    balloon_protocol::bench::run_benchmark("scheduler_tick", scheduler_tick);
}

fn scheduler_tick() -> std::io::Result<()> {
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
                    split: None,
                    size_disputed: false,
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
