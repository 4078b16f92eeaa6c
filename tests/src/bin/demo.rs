//! balloon-demo (`make demo`): three guests under QEMU 11 with our vhost-user balloon, the
//! scheduler sharing a budget below their total, and a workload that moves memory demand from
//! one guest to another. It shows the scheduler's status table while it runs, ends with a
//! summary computed from the scheduler's trace, and draws the trace as an SVG.
//! Ctrl-C stops everything (every process it started dies with it).

use balloon_lab::demo::{
    alloc, grow_command, total, ThreeGuests, APP_GUEST, BUDGET_MIB, GUESTS, MEMORY_MIB,
    SHRINK_COMMAND, WORKLOAD_DONE_TEST,
};
use balloon_lab::{LabError, Result, MIB};
use scheduler::api::SchedulerStatus;
use scheduler::drivers::split::BalloonSplit;
use scheduler::trace::TraceRecord;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static STOP: AtomicBool = AtomicBool::new(false);

/// Ctrl-C and SIGTERM end the demo at the next poll; the VMs and daemons are then dropped,
/// which kills them (and PR_SET_PDEATHSIG kills them if this process dies any other way).
fn handle_signals() {
    // SAFETY: signal-mask calls on a set we own, before other threads start.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: sigwait on the set blocked above.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            STOP.store(true, Ordering::Relaxed);
        }
    });
}

struct Screen {
    tty: bool,
    started: Instant,
    last_tick: u64,
}

impl Screen {
    fn show(&mut self, phase: &str, s: &SchedulerStatus) {
        if s.ticks == self.last_tick || s.last.is_none() {
            return;
        }
        self.last_tick = s.ticks;
        let t = self.started.elapsed().as_secs();
        if self.tty {
            print!(
                "\x1b[2J\x1b[H[{t:>3} s] {phase}\n\n{}",
                scheduler::table::table(s)
            );
        } else {
            let guests: Vec<String> = GUESTS
                .iter()
                .map(|g| format!("{g} {:>4}M", alloc(s, g) / MIB))
                .collect();
            println!(
                "[{t:>3} s] {phase:<34} {}  total {:>4}M / budget {BUDGET_MIB}M",
                guests.join("  "),
                total(s) / MIB
            );
        }
        let _ = std::io::stdout().flush();
    }
}

/// Polls the scheduler until `done` holds, showing the table; stops on Ctrl-C.
fn phase(
    lab: &mut ThreeGuests,
    screen: &mut Screen,
    name: &str,
    timeout: Duration,
    mut done: impl FnMut(&mut ThreeGuests, &SchedulerStatus) -> Result<bool>,
) -> Result<SchedulerStatus> {
    let start = Instant::now();
    loop {
        if STOP.load(Ordering::Relaxed) {
            return Err(LabError::Other("interrupted".into()));
        }
        let s = lab.scheduler.status()?;
        screen.show(name, &s);
        if done(lab, &s)? {
            return Ok(s);
        }
        if start.elapsed() > timeout {
            return Err(LabError::Timeout {
                what: name.to_string(),
                secs: timeout.as_secs_f64(),
                last: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// What the summary reports, all from the trace.
struct Summary {
    converged_at_s: Option<f64>,
    /// The largest balloon the drivers together, and the app, held in one tick.
    peak_driver: u64,
    peak_app: u64,
    moved_to: Vec<(String, u64)>,
    peak_total: u64,
    over_budget_after_convergence: usize,
    ticks: usize,
}

fn summarize(trace: &[TraceRecord], budget: u64) -> Summary {
    let total = |r: &TraceRecord| r.guests.iter().map(|g| g.allocation_bytes).sum::<u64>();
    let slack = 8 * MIB;
    let converged = trace.iter().position(|r| total(r) <= budget + slack);
    let after = converged.map_or(&trace[..0], |i| &trace[i..]);
    let moved_to = GUESTS
        .iter()
        .map(|g| {
            let allocs: Vec<u64> = after
                .iter()
                .filter_map(|r| r.guests.iter().find(|x| x.name == *g))
                .map(|x| x.allocation_bytes)
                .collect();
            let first = allocs.first().copied().unwrap_or(0);
            let peak = allocs.iter().copied().max().unwrap_or(0);
            (g.to_string(), peak.saturating_sub(first))
        })
        .collect();
    let peak = |part: fn(&BalloonSplit) -> u64| {
        trace
            .iter()
            .map(|r| {
                r.guests
                    .iter()
                    .filter_map(|g| g.balloon_split.as_ref())
                    .map(part)
                    .sum()
            })
            .max()
            .unwrap_or(0)
    };
    Summary {
        converged_at_s: converged.map(|i| trace[i].time_s),
        peak_driver: peak(|s| s.driver_actual_bytes),
        peak_app: peak(|s| s.app_actual_bytes),
        moved_to,
        peak_total: after.iter().map(total).max().unwrap_or(0),
        over_budget_after_convergence: after.iter().filter(|r| total(r) > budget + slack).count(),
        ticks: trace.len(),
    }
}

fn run() -> Result<()> {
    let out_dir = balloon_lab::lab::repo_root().join("target/demo");
    std::fs::create_dir_all(&out_dir).map_err(|e| LabError::Other(e.to_string()))?;
    println!(
        "Three {MEMORY_MIB} MiB guests on QEMU 11 under TCG, each with its own vhost-balloon-backend: a and b \
         ballooned by the stock Linux virtio_balloon driver, {APP_GUEST} (a Debian guest with virtio_balloon \
         blacklisted) by the user-level app alone, started by its systemd unit; balloon-scheduler (shares \
         policy) keeps them within {BUDGET_MIB} MiB together."
    );
    let started = Instant::now();
    let mut lab = ThreeGuests::start(|g| {
        println!(
            "  guest {g} booted ({:.0} s)",
            started.elapsed().as_secs_f64()
        )
    })?;
    let mut screen = Screen {
        tty: std::io::stdout().is_terminal(),
        started: Instant::now(),
        last_tick: u64::MAX,
    };
    let budget = BUDGET_MIB * MIB;
    let fits = |s: &SchedulerStatus| total(s) <= budget + 8 * MIB;
    phase(
        &mut lab,
        &mut screen,
        "balloons inflate to fit the budget",
        Duration::from_secs(120),
        |_, s| Ok(fits(s) && GUESTS.iter().all(|g| alloc(s, g) < 420 * MIB)),
    )?;
    lab.vm("b").agent.spawn(&grow_command(300))?;
    phase(
        &mut lab,
        &mut screen,
        "b's workload grows to 300 MiB",
        Duration::from_secs(180),
        |lab, s| {
            Ok(lab.vm("b").agent.run(WORKLOAD_DONE_TEST)?.success()
                && alloc(s, "b") >= 450 * MIB
                && fits(s))
        },
    )?;
    lab.vm("b").agent.sh(SHRINK_COMMAND)?;
    lab.vm("c").agent.spawn(&grow_command(300))?;
    phase(
        &mut lab,
        &mut screen,
        "b frees its memory, c's grows",
        Duration::from_secs(180),
        |lab, s| {
            Ok(lab.vm("c").agent.run(WORKLOAD_DONE_TEST)?.success()
                && alloc(s, "c") >= 450 * MIB
                && alloc(s, "b") < 420 * MIB
                && fits(s))
        },
    )?;
    lab.vm("c").agent.sh(SHRINK_COMMAND)?;
    phase(
        &mut lab,
        &mut screen,
        "c frees its memory",
        Duration::from_secs(180),
        |_, s| Ok(fits(s) && GUESTS.iter().all(|g| alloc(s, g) < 420 * MIB)),
    )?;

    // The summary, from the scheduler's trace and the backends' own counters.
    let records = scheduler::plot::read_trace(&lab.scheduler.trace)
        .map_err(|e| LabError::Other(e.to_string()))?;
    let trace_copy = out_dir.join("trace.jsonl");
    std::fs::copy(&lab.scheduler.trace, &trace_copy).map_err(|e| LabError::Other(e.to_string()))?;
    let summary = summarize(&records, budget);
    let mut reclaimed = 0;
    let mut reported = 0;
    for b in &lab.backends {
        let s = b.status()?;
        reclaimed += s.reclaimed_bytes;
        reported += s.reported_free_bytes;
    }
    let mut ooms = 0;
    for vm in lab.vms.iter_mut() {
        ooms += vm.agent.oom_kills()?;
    }
    let svg = out_dir.join("memory.svg");
    scheduler::plot::plot_trace(&records, &svg).map_err(|e| LabError::Other(e.to_string()))?;
    println!(
        "\nSummary ({} ticks in {:.0} s):",
        summary.ticks,
        screen.started.elapsed().as_secs_f64()
    );
    match summary.converged_at_s {
        Some(t) => {
            println!("  time to fit the budget:        {t:.0} s after the scheduler started")
        }
        None => println!("  time to fit the budget:        never"),
    }
    for (g, moved) in &summary.moved_to {
        println!("  memory moved to {g} at its peak: {:>4} MiB", moved / MIB);
    }
    println!(
        "  guests together at most:       {} MiB (budget {BUDGET_MIB} MiB; {} ticks over it after fitting)",
        summary.peak_total / MIB,
        summary.over_budget_after_convergence
    );
    println!(
        "  returned to the host:          {} MiB by ballooning, {} MiB by free page reporting",
        reclaimed / MIB,
        reported / MIB
    );
    println!(
        "  balloons at their largest:     {} MiB by the drivers (a, b), {} MiB by the app ({APP_GUEST})",
        summary.peak_driver / MIB,
        summary.peak_app / MIB
    );
    println!("  OOM kills in the guests:       {ooms}");
    println!("  trace: {}", trace_copy.display());
    println!("  plot:  {}", svg.display());
    if ooms > 0 || summary.converged_at_s.is_none() || summary.peak_app == 0 {
        return Err(LabError::Other("the demo did not go as it should".into()));
    }
    Ok(())
}

fn main() {
    handle_signals();
    if let Err(e) = run() {
        eprintln!("demo: {e}");
        std::process::exit(1);
    }
}
