use super::*;

/// Waits until QEMU's built-in balloon reports `actual` on the right side of `target_bytes`.
pub(super) fn wait_builtin(vm: &mut Vm, target_bytes: u64, inflating: bool) -> Result<()> {
    let qmp = &mut vm.qmp;
    wait_for(
        "the built-in balloon to reach its target",
        Duration::from_secs(300),
        POLL,
        || {
            let actual = qmp.balloon_actual()?;
            let done = if inflating {
                actual <= target_bytes
            } else {
                actual >= target_bytes
            };
            Ok(if done {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("actual {} MiB", actual / MIB))
            })
        },
    )
}

/// QEMU's built-in balloon, 1 GiB guest, inflate by 768 MiB after the guest touched and freed
/// 700 MiB. Timed from the QMP `balloon` command to `query-balloon` showing the target; the
/// deflate back is timed the same way in the same runs.
pub(super) fn qemu_builtin_inflate() -> Result<()> {
    let mut config = VmConfig::new("bench-builtin");
    config.builtin_balloon = Some(BuiltinBalloon::default());
    let mut vm = Vm::start(config)?;
    let (full, target) = (1024 * MIB, 256 * MIB);
    let (mut inflate, mut deflate, mut shmem_drop) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..RUNS {
        vm.touch_and_free(700)?;
        let before = vm.host_memory()?.rss_shmem;
        let t = Instant::now();
        vm.qmp.balloon(target)?;
        wait_builtin(&mut vm, target, true)?;
        inflate.push(t.elapsed().as_secs_f64());
        shmem_drop.push((before.saturating_sub(vm.host_memory()?.rss_shmem) / MIB) as f64);
        let t = Instant::now();
        vm.qmp.balloon(full)?;
        wait_builtin(&mut vm, full, false)?;
        deflate.push(t.elapsed().as_secs_f64());
        eprintln!(
            "run {run}: inflate {:.3} s, deflate {:.3} s, RssShmem -{} MiB",
            inflate[run], deflate[run], shmem_drop[run]
        );
    }
    let (value, baseline) = (median(&inflate), median(&deflate));
    BenchResult {
        name: "qemu_builtin_inflate".into(),
        metric: "inflate 768 MiB, QEMU built-in balloon".into(),
        unit: "s".into(),
        value,
        baseline,
        baseline_name: "deflate 768 MiB (same VM, same runs)".into(),
        ratio: value / baseline,
        runs: RUNS,
        goal: "record (the baseline the vhost-user backend is compared against)".into(),
        goal_met: None,
        samples: json!({
            "inflate_s": inflate,
            "deflate_s": deflate,
            "rss_shmem_drop_mib": shmem_drop,
            "accel": if balloon_lab::lab::use_kvm() { "kvm" } else { "tcg" },
        }),
    }
    .publish()
    .ctx(|| "publishing the result".into())
}
