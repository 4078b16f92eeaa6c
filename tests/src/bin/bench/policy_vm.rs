use super::*;
use balloon_lab::policy_vm::{self, PolicyFigures};
use scheduler::policy::PolicyKind;
use scheduler::sim::{self, Scenario};

/// examples/scenarios/policy_vm.toml.
pub(super) fn policy_vm_scenario() -> Result<Scenario> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/scenarios/policy_vm.toml");
    Scenario::load(&path).map_err(|e| balloon_lab::LabError::Other(e.to_string()))
}

/// The policies named in `var` (comma-separated), else `default`.
pub(super) fn policies_from_env(var: &str, default: &[PolicyKind]) -> Result<Vec<PolicyKind>> {
    match std::env::var(var) {
        Ok(list) => list
            .split(',')
            .map(|p| p.parse().map_err(balloon_lab::LabError::Other))
            .collect(),
        Err(_) => Ok(default.to_vec()),
    }
}

/// examples/scenarios/policy_vm.toml on real guests under each policy, one after another
/// (`POLICY_VM_POLICIES=a,b` runs some of them),
/// with the simulator's figures for the same schedule beside each: work, OOM kills, seconds
/// over budget after the first fit, time to fit. Each policy's scheduler trace is kept as
/// target/bench/policy_vm-POLICY.trace.jsonl.
pub(super) fn policy_vm() -> Result<()> {
    let mut scenario = policy_vm_scenario()?;
    let chosen = policies_from_env("POLICY_VM_POLICIES", &PolicyKind::ALL)?;
    let mut results = serde_json::Map::new();
    let mut measured: Vec<(PolicyFigures, sim::SimOutcome)> = Vec::new();
    for kind in chosen {
        scenario.policy.kind = kind;
        let simulated = sim::run(&scenario);
        let dir = balloon_protocol::bench::results_dir();
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        let trace = dir.join(format!("policy_vm-{kind}.trace.jsonl"));
        let vm = policy_vm::run(&scenario, kind, Some(&trace), &|m| {
            eprintln!("policy_vm: {m}")
        })?;
        eprintln!(
            "policy_vm: {kind:>8}: work {:.0} s (simulated {:.0}), OOM kills {} ({}), over budget {:.1} s ({:.0}), fit {}",
            vm.work,
            simulated.work_s,
            vm.oom_kills,
            simulated.oom_events,
            vm.over_budget_s,
            simulated.over_budget_after_fit_s,
            vm.fit_s.map_or("never".into(), |s| format!("{s:.1} s")),
        );
        results.insert(
            kind.to_string(),
            json!({
                "work": vm.work,
                "oom_kills": vm.oom_kills,
                "over_budget_s": vm.over_budget_s,
                "fit_s": vm.fit_s,
                "max_over_budget_bytes": vm.max_over_budget_bytes,
                "guests": vm.guests,
                "simulated": {
                    "work": simulated.work_s,
                    "oom_kills": simulated.oom_events,
                    "over_budget_s": simulated.over_budget_after_fit_s,
                    "fit_s": simulated.fit_s,
                    "guests": simulated.guests,
                },
            }),
        );
        measured.push((vm, simulated));
    }
    let vm_runs: Vec<(String, f64, bool)> = measured
        .iter()
        .map(|(vm, _)| (vm.policy.clone(), vm.work, vm.kept_budget()))
        .collect();
    let sim_runs: Vec<(String, f64, bool)> = measured
        .iter()
        .map(|(vm, s)| (vm.policy.clone(), s.work_s, s.kept_budget()))
        .collect();
    let (vm_rank, sim_rank) = (sim::rank(&vm_runs), sim::rank(&sim_runs));
    eprintln!("policy_vm: ranking on real guests: {}", vm_rank.join(" > "));
    eprintln!(
        "policy_vm: ranking in the simulator: {}",
        sim_rank.join(" > ")
    );
    let work = |k: PolicyKind| {
        measured
            .iter()
            .find(|(f, _)| f.policy == k.to_string())
            .map(|(f, _)| f.work)
    };
    let ours = [PolicyKind::Shares, PolicyKind::Pressure]
        .into_iter()
        .filter_map(work)
        .fold(f64::NAN, f64::max);
    let baseline = [PolicyKind::Static, PolicyKind::Mom, PolicyKind::Proxmox]
        .into_iter()
        .filter_map(work)
        .fold(f64::NAN, f64::max);
    let clean = measured
        .iter()
        .map(|(f, _)| f)
        .filter(|f| f.policy == "shares" || f.policy == "pressure")
        .any(|f| f.oom_kills == 0 && f.kept_budget() && f.work >= 1.1 * baseline);
    BenchResult {
        name: "policy_vm".into(),
        metric: "guest work on real guests, the better of shares and pressure".into(),
        unit: "guest-seconds".into(),
        value: ours,
        baseline,
        baseline_name: "the best of static, mom and proxmox".into(),
        ratio: ours / baseline,
        runs: 1,
        goal: "ratio >= 1.10 with 0 OOM kills and 0 s over budget after the first fit".into(),
        goal_met: Some(clean),
        samples: serde_json::Value::Object(results),
    }
    .publish()
    .ctx(|| "writing the result".into())
}
