//! One policy over real guests on a simulator scenario's schedule: the guests of the
//! scenario as TCG mini guests behind our backends (each with a swap disk of its `swap` and a
//! disk whose page cache holds its `file_share` of the working set), balloon-scheduler over them with the scenario's
//! budget, policy and actuator, and balloon-workload in every guest following its working set.
//! The policy_vm benchmark runs it once per policy; the figures are those the simulator gives
//! for the same scenario, so the two can be put side by side.

use crate::backend::Backend;
use crate::error::IoContext;
use crate::scheduler::SchedulerProcess;
use crate::workload::{WorkloadStatus, STATUS_PATH};
use crate::{lab, LabError, Result, Vm, VmConfig, MIB};
use scheduler::policy::PolicyKind;
use scheduler::sim::Scenario;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The least a workload's schedule asks for, whatever its guest's kernel already uses.
const MIN_WORKLOAD: u64 = 16 * MIB;
/// How often the run samples the balloons.
const SAMPLE: Duration = Duration::from_millis(500);
/// How often it reads the guests' swap use and reports progress.
const REPORT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default, Serialize)]
pub struct GuestFigures {
    pub name: String,
    /// Seconds of full-speed work (balloon-workload's count).
    pub work: f64,
    pub oom_kills: usize,
    pub slow_passes: u64,
    /// What the guest used at boot, before its workload (taken off its schedule).
    pub boot_used_bytes: u64,
    pub swap_used_peak_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PolicyFigures {
    pub policy: String,
    /// Seconds of full-speed work, all guests together.
    pub work: f64,
    pub oom_kills: usize,
    /// Seconds the guests' memory (their size less the balloons' actual) exceeded the budget
    /// after the first fit.
    pub over_budget_s: f64,
    /// Seconds from the scheduler's start until the guests first fit the budget (null: never).
    pub fit_s: Option<f64>,
    pub max_over_budget_bytes: u64,
    pub guests: Vec<GuestFigures>,
    /// The native guest's, when the run has one (see `NativeGuest`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub native: Option<NativeFigures>,
}

/// How a native guest speaks of its balloon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Stance {
    /// It writes `actual = 0`: the truth, as it never inflates.
    Truthful,
    /// It writes `actual` as whatever the target is ("done"), now and then 16 TiB, and floods
    /// its backend with inflate buffers of pages outside its RAM.
    Liar,
}

/// A scenario guest played by an in-process frontend over a memfd instead of a VM: it touches all
/// of its memory and never gives a page back, whatever it is asked; only what it says differs
/// with its `Stance`.
#[derive(Debug, Clone, Copy)]
pub struct NativeGuest<'a> {
    /// The scenario guest it plays.
    pub name: &'a str,
    pub stance: Stance,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct NativeFigures {
    pub name: String,
    /// Bytes its backend logged during the run.
    pub log_bytes: u64,
    /// Inflate buffers of pages outside its RAM it sent, and config writes it made.
    pub junk_buffers: u64,
    pub config_writes: u64,
}

impl PolicyFigures {
    /// Whether the guests fit the budget and never left it after.
    pub fn kept_budget(&self) -> bool {
        self.fit_s.is_some() && self.over_budget_s == 0.0
    }
}

/// A running native guest: its backend and the thread playing its driver.
struct Native {
    name: String,
    memory: u64,
    backend: Backend,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, u64)>>,
    log_at_start: u64,
}

impl Native {
    fn start(g: &scheduler::sim::SimGuest, stance: Stance) -> Result<Native> {
        use crate::frontend::{data_pages, guest_ram, TestFrontend};
        use std::sync::atomic::Ordering;
        let name = format!("pv-{}", g.name);
        let backend = Backend::start(&name, &["--no-stats", "--no-free-page-reporting"])?;
        let ram = guest_ram(g.memory.0)?;
        // All of it held, as by a guest that uses all its memory.
        ram.populate();
        let mut fe = TestFrontend::connect(&backend.socket, &ram)?;
        let outside = u32::try_from(data_pages(&ram) + 1024).unwrap_or(u32::MAX);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-driver"))
            .spawn(move || {
                let (mut junk, mut writes) = (0u64, 0u64);
                let mut round = 0u64;
                while !stopped.load(Ordering::Relaxed) {
                    round += 1;
                    let target = fe.config().map_or(0, |(num_pages, _)| num_pages);
                    let word = match stance {
                        Stance::Truthful => 0,
                        Stance::Liar if round.is_multiple_of(10) => u32::MAX,
                        Stance::Liar => target,
                    };
                    if fe.set_actual(word).is_ok() {
                        writes += 1;
                    }
                    if stance == Stance::Liar
                        && fe
                            .inflate(&ram, &[outside; crate::frontend::PFNS_PER_BUFFER])
                            .is_ok()
                    {
                        junk += 1;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                (junk, writes)
            })
            .ctx(|| "starting a native guest's driver".into())?;
        let log_at_start = backend.log().len() as u64;
        Ok(Native {
            name: g.name.clone(),
            memory: g.memory.0,
            backend,
            stop,
            thread: Some(thread),
            log_at_start,
        })
    }

    fn finish(&mut self) -> NativeFigures {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (junk_buffers, config_writes) = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        NativeFigures {
            name: self.name.clone(),
            log_bytes: (self.backend.log().len() as u64).saturating_sub(self.log_at_start),
            junk_buffers,
            config_writes,
        }
    }
}

impl Drop for Native {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A scenario guest in a VM: its backend, its VM, its disks.
struct Guest {
    name: String,
    memory: u64,
    backend: Backend,
    vm: Vm,
    disks: PathBuf,
    boot_used: u64,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.disks);
    }
}

fn sparse_file(path: &Path, bytes: u64) -> Result<()> {
    let f = std::fs::File::create(path).ctx(|| format!("creating {}", path.display()))?;
    f.set_len(bytes)
        .ctx(|| format!("sizing {}", path.display()))
}

fn boot(g: &scheduler::sim::SimGuest) -> Result<Guest> {
    let name = format!("pv-{}", g.name);
    let backend = Backend::start(&name, &["--stats-interval", "1"])?;
    let disks = lab::run_dir(&format!("{name}-disks"))?;
    let swap = disks.join("swap.img");
    let data = disks.join("data.img");
    sparse_file(&swap, g.driver.swap.map_or(0, |s| s.0).max(MIB))?;
    sparse_file(
        &data,
        ((g.driver.peak() as f64 * g.driver.file_share) as u64 + MIB) / MIB * MIB,
    )?;
    let mut config = VmConfig::new(&name);
    config.mem_mib = g.memory.0 / MIB;
    config.vhost_user_balloon = Some(backend.device());
    config.modules = vec!["virtio_balloon".into(), "virtio_blk".into()];
    for (disk, extra) in [(&swap, ""), (&data, ",readonly=on")] {
        config.extra_args.extend([
            "-drive".into(),
            format!(
                "file={},if=virtio,format=raw,cache=unsafe{extra}",
                disk.display()
            ),
        ]);
    }
    let mut vm = Vm::start(config)?;
    // The first disk is swap, the second the workload's file; their sizes say which is which.
    let sizes = vm.agent.sh("cat /sys/block/vda/size /sys/block/vdb/size")?;
    let sectors: Vec<u64> = sizes
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    let expected = [
        std::fs::metadata(&swap).map_or(0, |m| m.len()) / 512,
        std::fs::metadata(&data).map_or(0, |m| m.len()) / 512,
    ];
    if sectors != expected {
        return Err(LabError::Other(format!(
            "{name}: disks vda, vdb have {sectors:?} sectors, expected {expected:?} (swap, data)"
        )));
    }
    // The agent must outlive any OOM: it is how the run reads the guest.
    vm.agent
        .sh("mkswap /dev/vda >/dev/null && swapon /dev/vda && \
         for p in $(pidof balloon-test-agent); do echo -1000 > /proc/$p/oom_score_adj; done")?;
    let m = vm.agent.meminfo()?;
    let boot_used = m["MemTotal"].saturating_sub(m["MemAvailable"]);
    Ok(Guest {
        name: g.name.clone(),
        memory: g.memory.0,
        backend,
        vm,
        disks,
        boot_used,
    })
}

/// The scheduler's configuration for the scenario under `kind`, over the guests' backends'
/// control sockets (in the scenario's order).
fn scheduler_config(scenario: &Scenario, kind: PolicyKind, controls: &[PathBuf]) -> Result<String> {
    let mut policy = scenario.policy.clone();
    policy.kind = kind;
    let mut top = toml::Table::new();
    top.insert("tick_seconds".into(), scenario.tick_s.into());
    let mut budget = toml::Table::new();
    budget.insert("bytes".into(), (scenario.budget.0 as i64).into());
    top.insert("budget".into(), budget.into());
    top.insert("policy".into(), to_value(&policy)?);
    top.insert("actuator".into(), to_value(&scenario.actuator)?);
    let mut entries = Vec::new();
    for (g, control) in scenario.guests.iter().zip(controls) {
        let mut e = toml::Table::new();
        e.insert("name".into(), g.name.clone().into());
        e.insert("memory".into(), (g.memory.0 as i64).into());
        for (key, size) in [("min", g.min), ("max", g.max), ("static", g.static_size)] {
            if let Some(s) = size {
                e.insert(key.into(), (s.0 as i64).into());
            }
        }
        e.insert("shares".into(), (g.shares as i64).into());
        let mut driver = toml::Table::new();
        driver.insert("kind".into(), "backend".into());
        driver.insert(
            "control_socket".into(),
            control.display().to_string().into(),
        );
        e.insert("driver".into(), driver.into());
        entries.push(toml::Value::Table(e));
    }
    top.insert("guest".into(), toml::Value::Array(entries));
    toml::to_string(&top).map_err(|e| LabError::Other(format!("scheduler config: {e}")))
}

/// A serialisable config section as a TOML value.
fn to_value<T: Serialize>(v: &T) -> Result<toml::Value> {
    toml::Value::try_from(v).map_err(|e| LabError::Other(format!("scheduler config: {e}")))
}

/// The workload's schedule for a guest: the scenario's working set less what its kernel and
/// image already use.
fn workload_schedule(g: &scheduler::sim::SimGuest, boot_used: u64) -> String {
    g.driver
        .working_set
        .iter()
        .map(|(t, s)| format!("{t}:{}", s.0.saturating_sub(boot_used).max(MIN_WORKLOAD)))
        .collect::<Vec<_>>()
        .join(",")
}

/// The workload's file share: the scenario's is of the whole working set, the workload's of
/// its own part (the working set less what the kernel uses), so it is scaled to give the same
/// page cache at the peak, where memory is short.
fn workload_file_share(g: &scheduler::sim::SimGuest, boot_used: u64) -> f64 {
    let peak = g.driver.peak();
    let own = peak.saturating_sub(boot_used).max(MIN_WORKLOAD);
    (g.driver.file_share * peak as f64 / own as f64).min(1.0)
}

/// Runs the scenario's schedule on real guests under `kind`; `progress` hears what happens.
/// With `keep_trace`, the scheduler's trace (JSON lines, for `balloon-scheduler plot`) is
/// copied there.
pub fn run(
    scenario: &Scenario,
    kind: PolicyKind,
    keep_trace: Option<&Path>,
    progress: &dyn Fn(&str),
) -> Result<PolicyFigures> {
    run_with(scenario, kind, keep_trace, None, progress)
}

/// As `run`, with one of the scenario's guests played by a native guest (no VM, no workload:
/// its figures are `PolicyFigures::native`, and its memory counts toward the budget as the
/// others').
pub fn run_with(
    scenario: &Scenario,
    kind: PolicyKind,
    keep_trace: Option<&Path>,
    native: Option<NativeGuest>,
    progress: &dyn Fn(&str),
) -> Result<PolicyFigures> {
    let mut guests = Vec::new();
    let mut native_guest = None;
    let mut controls = Vec::new();
    for g in &scenario.guests {
        match native {
            Some(n) if n.name == g.name => {
                let started = Native::start(g, n.stance)?;
                controls.push(started.backend.control_socket.clone());
                native_guest = Some(started);
                progress(&format!(
                    "{kind}: {} started natively ({:?})",
                    g.name, n.stance
                ));
            }
            _ => {
                let guest = boot(g)?;
                controls.push(guest.backend.control_socket.clone());
                guests.push(guest);
                progress(&format!("{kind}: {} booted", g.name));
            }
        }
    }
    let config = scheduler_config(scenario, kind, &controls)?;
    let scheduler = SchedulerProcess::start(&format!("pv-{kind}"), &config)?;
    let started = Instant::now();
    let booted = scenario
        .guests
        .iter()
        .filter(|g| native.is_none_or(|n| n.name != g.name));
    for (g, guest) in booted.zip(guests.iter_mut()) {
        let schedule = workload_schedule(g, guest.boot_used);
        let file_share = workload_file_share(g, guest.boot_used);
        // The supervisor is never the OOM killer's choice; the workload it restarts is.
        guest.vm.agent.spawn(&format!(
            "echo -1000 > /proc/self/oom_score_adj; while :; do \
             sh -c 'echo 0 > /proc/self/oom_score_adj; exec balloon-workload --schedule {schedule} \
             --file /dev/vdb --file-share {file_share}'; sleep 1; done"
        ))?;
    }
    let budget = scenario.budget.0;
    let mut figures = PolicyFigures {
        policy: kind.to_string(),
        ..PolicyFigures::default()
    };
    let mut swap_peak = vec![0u64; guests.len()];
    let end = started + Duration::from_secs_f64(scenario.duration_s);
    let mut next_sample = Instant::now();
    let mut next_report = Instant::now();
    // What the guests hold, read backend by backend: not one instant, so an overrun counts
    // only when a second reading right after it confirms it (a tick that moves memory from
    // one guest to another between two reads would otherwise count it twice).
    let held = |guests: &[Guest]| -> Result<u64> {
        let mut total = 0;
        for g in guests {
            total += g.memory.saturating_sub(g.backend.status()?.actual_bytes);
        }
        if let Some(n) = &native_guest {
            total += n.memory.saturating_sub(n.backend.status()?.actual_bytes);
        }
        Ok(total)
    };
    while Instant::now() < end {
        let mut total = held(&guests)?;
        if total > budget {
            total = total.min(held(&guests)?);
        }
        let now = started.elapsed().as_secs_f64();
        match figures.fit_s {
            None if total <= budget => figures.fit_s = Some(now),
            Some(_) if total > budget => {
                figures.over_budget_s += SAMPLE.as_secs_f64();
                figures.max_over_budget_bytes = figures.max_over_budget_bytes.max(total - budget);
            }
            _ => {}
        }
        if Instant::now() >= next_report {
            next_report += REPORT;
            for (i, g) in guests.iter_mut().enumerate() {
                let m = g.vm.agent.meminfo()?;
                let field = |k: &str| m.get(k).copied().unwrap_or(0);
                swap_peak[i] =
                    swap_peak[i].max(field("SwapTotal").saturating_sub(field("SwapFree")));
            }
            progress(&format!(
                "{kind}: {now:.0} s, guests at {} MiB of {} MiB",
                total / MIB,
                budget / MIB
            ));
        }
        next_sample += SAMPLE;
        std::thread::sleep(next_sample.saturating_duration_since(Instant::now()));
    }
    // The work done by the end, not after: every workload stops before any is read.
    for g in guests.iter_mut() {
        g.vm.agent
            .sh("kill -STOP $(pidof balloon-workload) 2>/dev/null; true")?;
    }
    if let Some(to) = keep_trace {
        std::fs::copy(&scheduler.trace, to)
            .ctx(|| format!("copying the trace to {}", to.display()))?;
    }
    drop(scheduler);
    for (i, g) in guests.iter_mut().enumerate() {
        let status = read_status(&mut g.vm)?;
        let oom_kills = g.vm.agent.oom_kills()?;
        figures.guests.push(GuestFigures {
            name: g.name.clone(),
            work: status.work_s,
            oom_kills,
            slow_passes: status.slow_passes,
            boot_used_bytes: g.boot_used,
            swap_used_peak_bytes: swap_peak[i],
        });
    }
    figures.native = native_guest.as_mut().map(Native::finish);
    figures.work = figures.guests.iter().map(|g| g.work).sum();
    figures.oom_kills = figures.guests.iter().map(|g| g.oom_kills).sum();
    Ok(figures)
}

fn read_status(vm: &mut Vm) -> Result<WorkloadStatus> {
    let text = vm.agent.sh(&format!("cat {STATUS_PATH}"))?;
    serde_json::from_str(&text).map_err(|e| LabError::Other(format!("{STATUS_PATH} {text:?}: {e}")))
}
