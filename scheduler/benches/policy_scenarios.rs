//! `policy_scenarios`: the scenarios of examples/scenarios/ in the simulator under every
//! policy: guest work completed, OOM events, time over budget, and the policies ranked by work
//! (`sim::rank`: those that kept the budget first).
//! policy_vm.toml is the schedule the policy_vm benchmark runs on real guests, so its ranking
//! here is the one to compare with that benchmark's. No VM: `cargo bench -p scheduler --bench
//! policy_scenarios`, or `make bench BENCH=policy_scenarios`; writes
//! target/bench/policy_scenarios.json.

use balloon_protocol::bench::BenchResult;
use scheduler::policy::PolicyKind;
use serde_json::json;
use std::error::Error;
use std::path::Path;

const SCENARIOS: [&str; 3] = ["policy_vm", "overcommit", "spike"];

fn main() {
    balloon_protocol::bench::run_benchmark("policy_scenarios", policy_scenarios);
}

fn policy_scenarios() -> Result<(), Box<dyn Error>> {
    use scheduler::sim::{self, Scenario};
    let mut results = serde_json::Map::new();
    let mut headline = (f64::NAN, f64::NAN);
    for name in SCENARIOS {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../examples/scenarios/{name}.toml"));
        let mut scenario = Scenario::load(&path)?;
        let mut per_policy = serde_json::Map::new();
        let mut work = Vec::new();
        for kind in PolicyKind::ALL {
            scenario.policy.kind = kind;
            let out = sim::run(&scenario);
            eprintln!(
                "{name:>10} {kind:>8}: work {:.0} s, OOM events {}, over budget after the first fit {:.0} s, fit {}, host short {:.0} s",
                out.work_s,
                out.oom_events,
                out.over_budget_after_fit_s,
                out.fit_s.map_or("never".into(), |s| format!("{s:.0} s")),
                out.host_short_s
            );
            work.push((kind.to_string(), out.work_s, out.kept_budget()));
            per_policy.insert(
                kind.to_string(),
                json!({
                    "work": out.work_s,
                    "oom_kills": out.oom_events,
                    "over_budget_s": out.over_budget_after_fit_s,
                    "fit_s": out.fit_s,
                    "host_short_s": out.host_short_s,
                    "guests": out.guests,
                }),
            );
        }
        let ranking = sim::rank(&work);
        eprintln!("{name:>10} ranking by work: {}", ranking.join(" > "));
        per_policy.insert("ranking".into(), json!(ranking));
        if name == "policy_vm" {
            let of = |k: PolicyKind| {
                work.iter()
                    .find(|w| w.0 == k.to_string())
                    .map_or(f64::NAN, |w| w.1)
            };
            let ours = of(PolicyKind::Shares).max(of(PolicyKind::Pressure));
            let baseline = of(PolicyKind::Static)
                .max(of(PolicyKind::Mom))
                .max(of(PolicyKind::Proxmox));
            headline = (ours, baseline);
        }
        results.insert(name.into(), serde_json::Value::Object(per_policy));
    }
    let (value, baseline) = headline;
    BenchResult {
        name: "policy_scenarios".into(),
        metric: "simulated guest work on the policy_vm schedule, the better of shares and pressure"
            .into(),
        unit: "guest-seconds".into(),
        value,
        baseline,
        baseline_name: "the best of static, mom and proxmox".into(),
        ratio: value / baseline,
        runs: 1,
        goal: "record (the ranking is compared with policy_vm's on real guests)".into(),
        goal_met: None,
        samples: serde_json::Value::Object(results),
    }
    .publish()?;
    Ok(())
}
