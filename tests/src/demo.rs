//! The three-guest setup the demo and its VM test share: three 512 MiB mini guests behind our
//! backend, and balloon-scheduler over them with examples/demo/scheduler.toml.

use crate::backend::Backend;
use crate::scheduler::SchedulerProcess;
use crate::{Result, Vm, VmConfig, MIB};
use scheduler::api::SchedulerStatus;

pub const GUESTS: [&str; 3] = ["a", "b", "c"];
pub const MEMORY_MIB: u64 = 512;
/// Below the guests' 1536 MiB together.
pub const BUDGET_MIB: u64 = 1100;
const CONFIG: &str = include_str!("../../examples/demo/scheduler.toml");

pub struct ThreeGuests {
    pub backends: Vec<Backend>,
    pub vms: Vec<Vm>,
    pub scheduler: SchedulerProcess,
}

impl ThreeGuests {
    /// Boots the guests and starts the scheduler; `on_boot` is told as each guest comes up.
    pub fn start(mut on_boot: impl FnMut(&str)) -> Result<Self> {
        let mut backends = Vec::new();
        let mut vms = Vec::new();
        for name in GUESTS {
            let backend = Backend::start(name, &["--stats-interval", "1"])?;
            let mut config = VmConfig::new(name);
            config.mem_mib = MEMORY_MIB;
            config.vhost_user_balloon = Some(backend.device());
            vms.push(Vm::start(config)?);
            backends.push(backend);
            on_boot(name);
        }
        let mut config = CONFIG.replace("{budget}", &format!("{BUDGET_MIB}M"));
        for (name, b) in GUESTS.iter().zip(&backends) {
            config = config.replace(
                &format!("{{{name}_control}}"),
                &b.control_socket.display().to_string(),
            );
        }
        let scheduler = SchedulerProcess::start("demo", &config)?;
        Ok(ThreeGuests {
            backends,
            vms,
            scheduler,
        })
    }

    pub fn vm(&mut self, name: &str) -> &mut Vm {
        let i = GUESTS.iter().position(|g| *g == name).unwrap_or(0);
        &mut self.vms[i]
    }
}

/// A guest's allocation (memory it may use) in the latest tick.
pub fn alloc(s: &SchedulerStatus, name: &str) -> u64 {
    s.last
        .as_ref()
        .and_then(|r| r.guests.iter().find(|g| g.name == name))
        .map_or(0, |g| g.allocation_bytes)
}

/// All guests' allocations together (u64::MAX before the first tick).
pub fn total(s: &SchedulerStatus) -> u64 {
    s.last.as_ref().map_or(u64::MAX, |r| {
        r.guests.iter().map(|g| g.allocation_bytes).sum()
    })
}

/// Every guest's allocation in the latest tick, for progress messages.
pub fn describe(s: &SchedulerStatus) -> String {
    s.last.as_ref().map_or("no tick yet".into(), |r| {
        r.guests
            .iter()
            .map(|g| format!("{}={}M", g.name, g.allocation_bytes / MIB))
            .collect::<Vec<_>>()
            .join(" ")
    })
}

/// A guest's workload: grow to `mib` MiB of tmpfs in 100 MiB steps.
pub fn grow_command(mib: u64) -> String {
    format!(
        "i=0; while [ $i -lt {} ]; do i=$((i+1)); dd if=/dev/zero of=/tmp/ws$i bs=1M count=100 2>/dev/null; sleep 3; done; touch /tmp/ws.done",
        mib / 100
    )
}

pub const SHRINK_COMMAND: &str = "rm -f /tmp/ws*";
