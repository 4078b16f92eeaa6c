use super::*;

/// The overcommit scenario (examples/scenarios/overcommit.toml) in the simulator under each
/// policy: guest work completed, OOM events, time over budget.
pub(super) fn policy_scenarios() -> Result<()> {
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
