use super::*;

/// One guest under test in `vm_inflate`.
enum Subject {
    Builtin(Vm),
    Ours(Box<Backend>, Vm),
}

impl Subject {
    fn vm(&mut self) -> &mut Vm {
        match self {
            Subject::Builtin(vm) | Subject::Ours(_, vm) => vm,
        }
    }

    /// Sets the balloon to `balloon` bytes and waits until the driver reports it, polled at
    /// the same interval for both devices. Returns the time from the request to the report.
    fn resize(&mut self, balloon: u64) -> Result<Duration> {
        let t = Instant::now();
        match self {
            Subject::Builtin(vm) => {
                let size = (vm.config.mem_mib * MIB) - balloon;
                vm.qmp.balloon(size)?;
                wait_builtin(vm, size, balloon > 0)?;
            }
            Subject::Ours(backend, _) => {
                backend.set_target(balloon)?;
                wait_for(
                    "our balloon to reach its target",
                    Duration::from_secs(300),
                    POLL,
                    || {
                        let s = backend.status()?;
                        Ok(if s.actual_bytes == balloon {
                            Poll::Ready(())
                        } else {
                            Poll::Pending(format!("actual {} MiB", s.actual_bytes / MIB))
                        })
                    },
                )?;
            }
        }
        Ok(t.elapsed())
    }
}

fn boot_ours(name: &str, args: &[&str], behind_keeper: bool) -> Result<Subject> {
    let backend = if behind_keeper {
        Backend::start_behind_keeper(name, args)?
    } else {
        Backend::start(name, args)?
    };
    let mut config = VmConfig::new(name);
    config.vhost_user_balloon = Some(backend.device());
    let vm = Vm::start(config)?;
    Ok(Subject::Ours(Box::new(backend), vm))
}

/// Inflating 768 MiB of a 1 GiB guest: our backend against QEMU's built-in balloon, and against
/// our backend with discards off (the guest driver's own pace: the floor). Alternating, the same
/// image, the same timing (request to `actual` reached, polled every 20 ms).
pub(super) fn vm_inflate() -> Result<()> {
    let balloon = 768 * MIB;
    let mut config = VmConfig::new("bench-qemu");
    config.builtin_balloon = Some(BuiltinBalloon::default());
    // Free page reporting stays off on ours, as on QEMU's by default, so both return the same
    // resident memory at inflate time.
    let mut subjects = [
        ("qemu", Subject::Builtin(Vm::start(config)?)),
        (
            "ours",
            boot_ours("bench-ours", &["--no-free-page-reporting"], false)?,
        ),
        (
            "floor",
            boot_ours(
                "bench-floor",
                &["--no-free-page-reporting", "--no-discard"],
                false,
            )?,
        ),
        // Not in the goal: what vhost-user-keeper costs (config reads and writes pass through
        // it; kicks and interrupts do not).
        (
            "keeper",
            boot_ours("bench-keeper", &["--no-free-page-reporting"], true)?,
        ),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); subjects.len()];
    let mut returned: Vec<Vec<f64>> = vec![Vec::new(); subjects.len()];
    let mut returned_mib: Vec<Vec<u64>> = vec![Vec::new(); subjects.len()];
    for run in 0..RUNS {
        for i in 0..subjects.len() {
            // Only the guest under test runs: idle guests under TCG still take CPU time (with
            // four of them on two cores the spread between runs doubled). A stopped and
            // continued VM renegotiates its vhost-user device; the balloon resumes as it was.
            for (j, (_, other)) in subjects.iter_mut().enumerate() {
                let command = if j == i { "cont" } else { "stop" };
                other.vm().qmp.execute(command, json!({}))?;
            }
            let (name, subject) = &mut subjects[i];
            // Make all of the guest's free memory resident first (fill tmpfs until it is
            // nearly full, then free it), so that every subject starts from the same state:
            // otherwise pages returned in the previous run are holes that the guest's
            // zero-on-allocate faults in again while the balloon grows, a cost the floor
            // (which never returns memory) does not pay.
            subject.vm().agent.sh(FILL_FREE_MEMORY)?;
            let resident = subject.vm().ram_allocated()?;
            let t = Instant::now();
            let took = subject.resize(balloon)?;
            times[i].push(took.as_secs_f64());
            // Also when the memory had really left the host (not the benchmark's metric, which
            // stops at `actual`; shown so deferred discards hide nothing): the moment of the
            // last drop of the guest RAM's allocation, once it has held still for 300 ms. (How
            // much can leave depends on how much of what the guest gives up was resident.)
            if *name != "floor" {
                let vm = subject.vm();
                let (mut last, mut last_drop) = (vm.ram_allocated()?, Instant::now());
                let returned_at = wait_for(
                    "the guest RAM's allocation to settle",
                    Duration::from_secs(60),
                    POLL,
                    || {
                        let now = vm.ram_allocated()?;
                        if now < last {
                            (last, last_drop) = (now, Instant::now());
                        }
                        Ok(if last_drop.elapsed() >= Duration::from_millis(300) {
                            Poll::Ready(last_drop)
                        } else {
                            Poll::Pending(format!("{} MiB allocated", now / MIB))
                        })
                    },
                )?;
                let dropped = resident.saturating_sub(last);
                if dropped < balloon / 2 {
                    return Err(balloon_lab::LabError::Other(format!(
                        "{name}: only {} MiB of a {} MiB balloon left the host ({} MiB allocated before)",
                        dropped / MIB,
                        balloon / MIB,
                        resident / MIB
                    )));
                }
                returned[i].push(returned_at.duration_since(t).as_secs_f64());
                returned_mib[i].push(dropped / MIB);
            }
            subject.resize(0)?;
            eprintln!("run {run}: {name} {:.3} s", took.as_secs_f64());
        }
    }
    for (_, subject) in subjects.iter_mut() {
        subject.vm().qmp.execute("cont", json!({}))?;
        let kills = subject.vm().agent.oom_kills()?;
        if kills > 0 {
            return Err(balloon_lab::LabError::Other(format!(
                "{kills} OOM kills in a guest"
            )));
        }
    }
    let (qemu, ours, floor) = (median(&times[0]), median(&times[1]), median(&times[2]));
    BenchResult {
        name: "vm_inflate".into(),
        metric: "inflate 768 MiB of a 1 GiB guest, our backend".into(),
        unit: "s".into(),
        value: ours,
        baseline: qemu,
        baseline_name: "QEMU built-in virtio-balloon".into(),
        ratio: ours / qemu,
        runs: RUNS,
        goal: "ratio <= 0.55 and ours <= 1.15 x floor (discards off)".into(),
        goal_met: Some(ours / qemu <= 0.55 && ours / floor <= 1.15),
        samples: json!({
            "ours_s": times[1],
            "qemu_s": times[0],
            "floor_s": times[2],
            "floor_median_s": floor,
            "ours_vs_floor": ours / floor,
            "memory_returned_s": { "qemu": returned[0], "ours": returned[1], "keeper": returned[3] },
            "memory_returned_mib": { "qemu": returned_mib[0], "ours": returned_mib[1], "keeper": returned_mib[3] },
            "behind_keeper_s": times[3],
            "behind_keeper_vs_ours": median(&times[3]) / ours,
            "accel": if balloon_lab::lab::use_kvm() { "kvm" } else { "tcg" },
        }),
    }
    .publish()
    .ctx(|| "publishing the result".into())
}
