//! balloon-demo: the main job on built-in defaults. For now it boots one guest and shows a
//! balloon taking memory back from it and returning it; the full demo (three guests, our backend,
//! the scheduler) replaces this as those pieces land.

use balloon_lab::wait::{wait_for, Poll};
use balloon_lab::{BuiltinBalloon, Result, Vm, VmConfig, MIB};
use std::time::{Duration, Instant};

fn show(vm: &mut Vm, label: &str) -> Result<()> {
    let host = vm.host_memory()?;
    let guest = vm.agent.meminfo()?;
    let actual = vm.qmp.balloon_actual()?;
    println!(
        "{label:<28} guest MemTotal {:>5} MiB  MemAvailable {:>5} MiB  balloon actual {:>5} MiB  host RSS of QEMU {:>5} MiB",
        guest["MemTotal"] / MIB,
        guest["MemAvailable"] / MIB,
        actual / MIB,
        host.vm_rss / MIB
    );
    Ok(())
}

fn resize(vm: &mut Vm, target: u64) -> Result<Duration> {
    let t = Instant::now();
    vm.qmp.balloon(target)?;
    let qmp = &mut vm.qmp;
    wait_for(
        "the balloon to reach its target",
        Duration::from_secs(120),
        Duration::from_millis(50),
        || {
            let actual = qmp.balloon_actual()?;
            Ok(if actual.abs_diff(target) < MIB {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("actual {} MiB", actual / MIB))
            })
        },
    )?;
    Ok(t.elapsed())
}

fn run() -> Result<()> {
    println!("Booting a 1 GiB guest under QEMU 11 (TCG) with the stock virtio_balloon driver...");
    let mut config = VmConfig::new("demo");
    config.builtin_balloon = Some(BuiltinBalloon::default());
    let mut vm = Vm::start(config)?;
    show(&mut vm, "booted")?;
    vm.agent
        .sh("dd if=/dev/zero of=/tmp/fill bs=1M count=700 2>/dev/null && rm /tmp/fill")?;
    show(&mut vm, "guest used+freed 700 MiB")?;
    let took = resize(&mut vm, 256 * MIB)?;
    show(&mut vm, &format!("inflated in {:.2} s", took.as_secs_f64()))?;
    let took = resize(&mut vm, 1024 * MIB)?;
    show(&mut vm, &format!("deflated in {:.2} s", took.as_secs_f64()))?;
    println!(
        "OOM kills in the guest: {}. The host took back the memory behind the balloon and gave it back.",
        vm.agent.oom_kills()?
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}
