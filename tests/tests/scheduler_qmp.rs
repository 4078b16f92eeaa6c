//! balloon-scheduler driving QEMU's built-in virtio-balloon over QMP.

use balloon_lab::scheduler::SchedulerProcess;
use balloon_lab::wait::{wait_for, Poll};
use balloon_lab::{BuiltinBalloon, Vm, VmConfig, MIB};
use scheduler::api::ApiRequest;
use std::time::Duration;

#[test]
fn the_qmp_driver_sizes_the_builtin_balloon_and_reads_its_statistics() {
    let dir = balloon_lab::lab::run_dir("qmp-sched").unwrap();
    let qmp2 = dir.join("qmp2.sock");
    let mut config = VmConfig::new("qmpvm");
    config.builtin_balloon = Some(BuiltinBalloon::default());
    // A second QMP monitor: the harness keeps the first.
    config.extra_args = vec![
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp2.display()),
    ];
    let mut vm = Vm::start(config).unwrap();
    let sched = SchedulerProcess::start(
        "qmp",
        &format!(
            "tick_seconds = 1\nbudget = {{ bytes = \"4G\" }}\n[policy]\nkind = \"static\"\n\
             [[guest]]\nname = \"q\"\nmemory = \"1G\"\nmin = \"256M\"\nstatic = \"512M\"\n\
             driver = {{ kind = \"qmp\", socket = \"{}\" }}\n",
            qmp2.display()
        ),
    )
    .unwrap();
    let qmp = &mut vm.qmp;
    let wait_memory = |want: u64, qmp: &mut balloon_lab::qmp::Qmp| {
        wait_for(
            "QEMU's balloon to reach the scheduler's size",
            Duration::from_secs(120),
            Duration::from_millis(200),
            || {
                let actual = qmp.balloon_actual()?;
                Ok(if actual == want {
                    Poll::Ready(())
                } else {
                    Poll::Pending(format!("{} MiB", actual / MIB))
                })
            },
        )
        .unwrap()
    };
    wait_memory(512 * MIB, qmp);
    // The guest's statistics reach the scheduler through QEMU's guest-stats.
    let status = wait_for(
        "guest statistics in the scheduler's status",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let s = sched.status()?;
            let g = s.last.as_ref().map(|r| r.guests[0].clone());
            Ok(match g {
                // Figures from after the inflation: less available than the guest now has.
                Some(g)
                    if g.allocation_bytes == 512 * MIB
                        && g.available_bytes.is_some_and(|a| a > 0 && a < 512 * MIB) =>
                {
                    Poll::Ready(g)
                }
                other => Poll::Pending(format!("{other:?}")),
            })
        },
    )
    .unwrap();
    eprintln!(
        "guest available: {} MiB",
        status.available_bytes.unwrap_or(0) / MIB
    );
    // An operator's size wins over the policy.
    let reply = sched
        .request(ApiRequest::Set {
            guest: "q".into(),
            memory_bytes: 768 * MIB,
        })
        .unwrap();
    assert!(reply.ok, "{reply:?}");
    wait_memory(768 * MIB, &mut vm.qmp);
    let bad = sched
        .request(ApiRequest::Set {
            guest: "nobody".into(),
            memory_bytes: MIB,
        })
        .unwrap();
    assert!(!bad.ok && bad.error.unwrap().contains("no guest"));
    assert_eq!(vm.agent.oom_kills().unwrap(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}
