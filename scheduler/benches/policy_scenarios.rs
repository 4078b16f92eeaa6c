//! `policy_scenarios`: the overcommit scenario (examples/scenarios/overcommit.toml) in the
//! simulator under each policy: guest work completed, OOM events, time over budget. No VM:
//! `cargo bench -p scheduler --bench policy_scenarios`, or `make bench BENCH=policy_scenarios`;
//! writes target/bench/policy_scenarios.json and prints one line.

use balloon_protocol::bench::BenchResult;
use serde_json::json;
use std::error::Error;
use std::path::Path;

fn main() {
    balloon_protocol::bench::run_benchmark("policy_scenarios", policy_scenarios);
}

fn policy_scenarios() -> Result<(), Box<dyn Error>> {
    use scheduler::sim::{self, Scenario};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/scenarios/overcommit.toml");
    let mut scenario = Scenario::load(&path)?;
    let mut results = serde_json::Map::new();
    let mut work = std::collections::HashMap::new();
    for kind in ["static", "shares", "pressure", "mom"] {
        scenario.policy.kind = kind.parse()?;
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
    .publish()?;
    Ok(())
}
