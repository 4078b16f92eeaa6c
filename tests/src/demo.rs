//! The three-guest setup the demo and its VM test share: three 512 MiB guests behind our
//! backend, and balloon-scheduler over them with examples/demo/scheduler.toml. Guests a and b
//! are mini guests ballooned by the virtio_balloon driver; c is a Debian guest whose kernel
//! refuses virtio_balloon, ballooned by the user-level app alone (started by its systemd unit,
//! its pages named in the guest's memory file).

use crate::backend::Backend;
use crate::scheduler::SchedulerProcess;
use crate::{GuestRam, Image, Result, Vm, VmConfig, MIB};
use scheduler::api::SchedulerStatus;

pub const GUESTS: [&str; 3] = ["a", "b", "c"];
/// The guest ballooned by the app alone.
pub const APP_GUEST: &str = "c";
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
            let mut args = vec!["--stats-interval".to_string(), "1".into()];
            let mut config = VmConfig::new(name);
            if name == APP_GUEST {
                let ram = crate::vm::shm_ram_file(name);
                args.extend([
                    "--guest-memory-file".into(),
                    ram.display().to_string(),
                    "--guest-memory-layout".into(),
                    "q35".into(),
                ]);
                config.ram = GuestRam::File(ram);
                config.image = Image::Debian;
                config.kernel_args = vec!["modprobe.blacklist=virtio_balloon".into()];
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let backend = Backend::start(name, &args)?;
            config.mem_mib = MEMORY_MIB;
            config.vhost_user_balloon = Some(backend.device());
            if name == APP_GUEST {
                config.serial_ports = vec![backend.app_port()];
            }
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

/// A guest's workload: grow to `mib` MiB of tmpfs in 100 MiB steps, on a tmpfs of its own
/// (an image's /tmp may be capped, Debian's at half of RAM); `WORKLOAD_DONE` exists once it
/// is all written.
pub fn grow_command(mib: u64) -> String {
    format!(
        "mkdir -p /run/ws && {{ grep -q ' /run/ws ' /proc/mounts || mount -t tmpfs -o size=100% ws /run/ws; }} && \
         i=0; while [ $i -lt {} ]; do i=$((i+1)); dd if=/dev/zero of=/run/ws/$i bs=1M count=100 2>/dev/null; sleep 3; done; touch {WORKLOAD_DONE}",
        mib / 100
    )
}

/// The guest command that says whether the workload is all written.
pub const WORKLOAD_DONE_TEST: &str = "test -e /run/ws.done";
const WORKLOAD_DONE: &str = "/run/ws.done";

pub const SHRINK_COMMAND: &str = "rm -f /run/ws/* /run/ws.done";
