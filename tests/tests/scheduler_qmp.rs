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
    // A free port for the metrics endpoint.
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut sched = SchedulerProcess::start(
        "qmp",
        &format!(
            "tick_seconds = 1\nmetrics_listen = \"{metrics_addr}\"\nbudget = {{ bytes = \"4G\" }}\n[policy]\nkind = \"static\"\n\
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

    // The operator's tools against the live daemon, once a tick has seen the new size.
    wait_for(
        "a tick that saw the pinned size",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let s = sched.status()?;
            let alloc = s.last.as_ref().map_or(0, |r| r.guests[0].allocation_bytes);
            Ok(if alloc == 768 * MIB {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("{alloc}"))
            })
        },
    )
    .unwrap();
    let ctl = balloon_lab::lab::workspace_binary("balloonctl").unwrap();
    let out = std::process::Command::new(&ctl)
        .arg("--socket")
        .arg(&sched.api_socket)
        .arg("status")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("GUEST") && table.contains("pinned"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("q ") && l.contains("768M")),
        "{table}"
    );
    // watch redraws once per tick: two screens arrive.
    let mut watch = std::process::Command::new(&ctl)
        .arg("--socket")
        .arg(&sched.api_socket)
        .arg("watch")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut screen = std::io::BufReader::new(watch.stdout.take().unwrap());
    let mut screens = 0;
    let mut line = String::new();
    while screens < 2 {
        line.clear();
        let n = std::io::BufRead::read_line(&mut screen, &mut line).unwrap();
        assert!(n > 0, "watch ended early");
        if line.contains("\x1b[2J") {
            screens += 1;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    // Metrics.
    let mut http = std::net::TcpStream::connect(metrics_addr).unwrap();
    std::io::Write::write_all(&mut http, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    std::io::Read::read_to_string(&mut http, &mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains("balloon_scheduler_guest_allocation_bytes{guest=\"q\"} 805306368"),
        "{body}"
    );
    // The trace plots.
    let svg = dir.join("memory.svg");
    let out = std::process::Command::new(&ctl)
        .arg("plot")
        .arg(&sched.trace)
        .arg("-o")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read_to_string(&svg)
        .unwrap()
        .contains("q allocation"));
    // SIGTERM: a clean exit that removes the API socket.
    let status = sched.terminate().unwrap();
    assert!(status.success(), "{status}");
    assert!(!sched.api_socket.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
