use super::*;

/// The user-level balloon inflating 512 MiB of a 1 GiB guest: adaptive rate against a fixed
/// rate, and the kernel driver inflating the same amount on the same guest; plus how fast the
/// app resolves physical page numbers.
pub(super) fn guest_app_inflate() -> Result<()> {
    use balloon_protocol::ControlRequest;
    const APP_RUNS: usize = 3;
    let amount = 512 * MIB;
    let backend = Backend::start("bench-app", &["--no-free-page-reporting"])?;
    let mut config = VmConfig::new("bench-app");
    config.vhost_user_balloon = Some(backend.device());
    config.serial_ports = vec![backend.app_port()];
    let mut vm = Vm::start(config)?;
    let wait = |what: &str, cond: &dyn Fn(&balloon_protocol::BackendStatus) -> bool| {
        wait_for(what, Duration::from_secs(300), POLL, || {
            let s = backend.status()?;
            Ok(if cond(&s) {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("{:?}", s.app))
            })
        })
    };
    let app_target = |bytes: u64| -> Result<()> {
        let r = backend.request(ControlRequest::SetAppTarget {
            target_bytes: bytes,
        })?;
        if r.ok {
            Ok(())
        } else {
            Err(balloon_lab::LabError::Other(format!("{:?}", r.error)))
        }
    };
    let time_app = |vm: &mut Vm, args: &str| -> Result<f64> {
        vm.touch_and_free(700)?;
        vm.agent
            .spawn(&balloon_lab::backend::app_as_its_unit(args))?;
        wait("the app to connect", &|s| s.app.connected)?;
        let t = Instant::now();
        app_target(amount)?;
        wait("the app to hold 512 MiB", &|s| {
            s.app.ballooned_bytes == amount
        })?;
        let took = t.elapsed().as_secs_f64();
        app_target(0)?;
        wait("the app to give it back", &|s| s.app.ballooned_bytes == 0)?;
        vm.agent.sh(
            "kill $(pidof balloon-guest); while pidof balloon-guest >/dev/null; do sleep 0.1; done",
        )?;
        wait("the app to be gone", &|s| !s.app.connected)?;
        Ok(took)
    };
    let (mut adaptive, mut fixed, mut driver) = (vec![], vec![], vec![]);
    for run in 0..APP_RUNS {
        adaptive.push(time_app(&mut vm, "")?);
        // Fixed: the rate pinned at the adaptive controller's starting point.
        fixed.push(time_app(&mut vm, "--min-rate 64M --max-rate 64M")?);
        vm.touch_and_free(700)?;
        let t = Instant::now();
        backend.set_target(amount)?;
        backend.wait_actual(amount, Duration::from_secs(300))?;
        driver.push(t.elapsed().as_secs_f64());
        backend.set_target(0)?;
        backend.wait_actual(0, Duration::from_secs(300))?;
        eprintln!(
            "run {run}: app adaptive {:.3} s, app fixed 64 MiB/s {:.3} s, kernel driver {:.3} s",
            adaptive[run], fixed[run], driver[run]
        );
    }
    let pagemap_rate: Vec<f64> = (0..3)
        .map(|_| {
            vm.agent
                .sh("balloon-guest --measure-pagemap 256M")
                .ok()
                .and_then(|o| o.trim().parse().ok())
                .unwrap_or(f64::NAN)
        })
        .collect();
    // A target the guest cannot give (all of its RAM): the app stops short, nothing is killed.
    vm.agent.spawn(&balloon_lab::backend::app_as_its_unit(""))?;
    wait("the app to connect", &|s| s.app.connected)?;
    app_target(1024 * MIB)?;
    wait("the app to stop short of 1 GiB", &|s| {
        s.app.stalled && s.app.ballooned_bytes > 0
    })?;
    let oversized_held = backend.status()?.app.ballooned_bytes;
    app_target(0)?;
    wait("the app to give it back", &|s| s.app.ballooned_bytes == 0)?;
    let ooms = vm.agent.oom_kills()?;
    eprintln!(
        "oversized target: the app stopped at {} MiB of 1024; OOM kills {ooms}",
        oversized_held / MIB
    );
    drop(vm);
    let both_vs_driver = both_vs_driver()?;
    let (a, f, d) = (median(&adaptive), median(&fixed), median(&driver));
    BenchResult {
        name: "guest_app_inflate".into(),
        metric: "user-level balloon inflating 512 MiB, adaptive rate".into(),
        unit: "s".into(),
        value: a,
        baseline: d,
        baseline_name: "kernel virtio_balloon driver, same guest and amount".into(),
        ratio: a / d,
        runs: APP_RUNS,
        goal: "app/driver <= 1.5; a target above what the guest can give stops short with 0 OOM kills; PFN resolution >= 1 GiB/s".into(),
        goal_met: Some(a / d <= 1.5 && median(&pagemap_rate) >= 1.0 && ooms == 0),
        samples: json!({
            "adaptive_s": adaptive,
            "fixed_64mib_s": fixed,
            "fixed_median_s": f,
            "driver_s": driver,
            "pagemap_gib_s": pagemap_rate,
            "oom_kills": ooms,
            "oversized_target_held_bytes": oversized_held,
            "both_vs_driver": both_vs_driver,
        }),
    }
    .publish()
    .ctx(|| "publishing the result".into())
}

/// `balloon = "both"` against the driver alone, through the scheduler's own backend driver, on
/// a 1 GiB Debian guest whose free memory is held in page cache (a 700 MiB file written and
/// synced): a 624 MiB balloon, its time, the memory the host got back and who held it.
fn both_vs_driver() -> Result<serde_json::Value> {
    use scheduler::drivers::backend::BackendDriver;
    use scheduler::drivers::split::BalloonMechanism;
    use scheduler::drivers::BalloonDriver;
    let balloon = 624 * MIB;
    let backend = Backend::start("bench-both", &["--no-free-page-reporting"])?;
    let mut vm = Vm::start(backend.debian_guest_with_app("bench-both"))?;
    wait_for(
        "the unit's app to connect",
        Duration::from_secs(120),
        POLL,
        || {
            Ok(if backend.status()?.app.connected {
                Poll::Ready(())
            } else {
                Poll::Pending(String::new())
            })
        },
    )?;
    let mut out = serde_json::Map::new();
    for mode in [BalloonMechanism::Driver, BalloonMechanism::Both] {
        // Every page the balloon may take resident on the host first, so both modes return
        // what they take.
        let available = vm.agent.meminfo()?["MemAvailable"] / MIB;
        vm.touch_and_free(available.saturating_sub(48))?;
        vm.agent.sh(
            "rm -f /var/tmp/cache; dd if=/dev/zero of=/var/tmp/cache bs=1M count=700 2>/dev/null && sync",
        )?;
        let cache = |vm: &mut Vm| -> Result<u64> {
            let m = vm.agent.meminfo()?;
            Ok(m["Active(file)"] + m["Inactive(file)"])
        };
        let cache_before = cache(&mut vm)?;
        let host_before = balloon_lab::hugepages::settled_allocation(&vm, &backend)?;
        let mut driver = BackendDriver::new(backend.control_socket.clone()).with_mechanism(mode);
        let drive_err =
            |e: scheduler::drivers::DriverError| balloon_lab::LabError::Other(e.to_string());
        driver.read().map_err(drive_err)?;
        let t = Instant::now();
        driver.set_balloon(balloon).map_err(drive_err)?;
        let reading = wait_for(
            "the balloon to be reached",
            Duration::from_secs(120),
            POLL,
            || {
                let r = driver.read().map_err(drive_err)?;
                Ok(if r.actual_bytes + 4 * MIB >= balloon {
                    Poll::Ready(r)
                } else {
                    Poll::Pending(format!("{:?}", r.split))
                })
            },
        )?;
        let took = t.elapsed().as_secs_f64();
        let split = reading.split.unwrap_or_default();
        let returned =
            host_before.saturating_sub(balloon_lab::hugepages::settled_allocation(&vm, &backend)?);
        let cache_after = cache(&mut vm)?;
        eprintln!(
            "{mode}: 624 MiB in {took:.2} s, driver {} MiB, app {} MiB, returned {} MiB, page cache {} -> {} MiB",
            split.driver_actual_bytes / MIB,
            split.app_actual_bytes / MIB,
            returned / MIB,
            cache_before / MIB,
            cache_after / MIB
        );
        out.insert(
            mode.to_string(),
            json!({
                "seconds": took,
                "returned_bytes": returned,
                "driver_bytes": split.driver_actual_bytes,
                "app_bytes": split.app_actual_bytes,
                "page_cache_before_bytes": cache_before,
                "page_cache_after_bytes": cache_after,
            }),
        );
        driver.set_balloon(0).map_err(drive_err)?;
        wait_for(
            "the balloon to deflate",
            Duration::from_secs(120),
            POLL,
            || {
                let r = driver.read().map_err(drive_err)?;
                Ok(if r.actual_bytes == 0 {
                    Poll::Ready(())
                } else {
                    Poll::Pending(format!("{:?}", r.split))
                })
            },
        )?;
    }
    out.insert("oom_kills".into(), json!(vm.agent.oom_kills()?));
    Ok(serde_json::Value::Object(out))
}
