use super::*;
use balloon_lab::policy_vm::{self, NativeGuest, PolicyFigures, Stance};
use scheduler::policy::PolicyKind;

/// A guest that lies costs its neighbours nothing. examples/scenarios/policy_vm.toml with its
/// "spiky" guest played by a native guest that holds all of its memory and never gives a page:
/// once truthful (it says its balloon is empty), once lying (it says every target is reached,
/// now and then 16 TiB, and floods its backend with out-of-RAM pages), while the three other
/// guests, real TCG guests, run their policy_vm workloads. Under shares and pressure
/// (`GUEST_LIES_POLICIES=a,b` to choose): the honest guests' work beside the liar against beside
/// the truthful one, seconds over budget with the liar, and what the liar's backend logged.
pub(super) fn guest_lies() -> Result<()> {
    let mut scenario = super::policy_vm::policy_vm_scenario()?;
    let chosen = super::policy_vm::policies_from_env(
        "GUEST_LIES_POLICIES",
        &[PolicyKind::Shares, PolicyKind::Pressure],
    )?;
    let mut samples = serde_json::Map::new();
    let mut worst_ratio = f64::INFINITY;
    let mut all_met = true;
    for kind in chosen {
        scenario.policy.kind = kind;
        let run = |stance| -> Result<PolicyFigures> {
            policy_vm::run_with(
                &scenario,
                kind,
                None,
                Some(NativeGuest {
                    name: "spiky",
                    stance,
                }),
                &|m| eprintln!("guest_lies: {m}"),
            )
        };
        let truthful = run(Stance::Truthful)?;
        let lying = run(Stance::Liar)?;
        let ratio = lying.work / truthful.work;
        let log_bytes = lying.native.as_ref().map_or(0, |n| n.log_bytes);
        let met = (ratio - 1.0).abs() <= 0.05
            && lying.kept_budget()
            && lying.oom_kills == 0
            && log_bytes < 1 << 20;
        eprintln!(
            "guest_lies: {kind:>8}: honest guests' work {:.0} s beside the liar, {:.0} s beside the truthful guest ({ratio:.3}); over budget {:.1} s (fit {}); OOM kills {}; the liar's backend logged {} bytes for {} junk buffers",
            lying.work,
            truthful.work,
            lying.over_budget_s,
            lying.fit_s.map_or("never".into(), |s| format!("{s:.1} s")),
            lying.oom_kills,
            log_bytes,
            lying.native.as_ref().map_or(0, |n| n.junk_buffers),
        );
        worst_ratio = worst_ratio.min(1.0 - (ratio - 1.0).abs());
        all_met &= met;
        samples.insert(
            kind.to_string(),
            json!({ "truthful": truthful, "lying": lying, "ratio": ratio, "goal_met": met }),
        );
    }
    BenchResult {
        name: "guest_lies".into(),
        metric: "honest guests' work beside a lying guest, against beside the same guest truthful"
            .into(),
        unit: "ratio".into(),
        value: worst_ratio,
        baseline: 1.0,
        baseline_name: "the same run with the guest truthful".into(),
        ratio: worst_ratio,
        runs: 1,
        goal: "work within 5% under every policy run, 0 s over budget after the first fit, 0 OOM kills, under 1 MB logged by the liar's backend".into(),
        goal_met: Some(all_met),
        samples: serde_json::Value::Object(samples),
    }
    .publish()
    .ctx(|| "writing the result".into())
}
