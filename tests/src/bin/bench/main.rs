//! balloon-bench: the project's benchmarks that drive VMs or backend processes.
//! `balloon-bench [NAME...]` runs the named ones (all when none is named); each writes
//! target/bench/NAME.json and prints a one-line summary. The scheduler's benchmarks that need
//! neither (`scheduler_tick`, `policy_scenarios`) are `cargo bench -p scheduler` targets
//! (scheduler/benches/); `make bench` runs both kinds.

use balloon_lab::backend::Backend;
use balloon_lab::bench::{median, BenchResult};
use balloon_lab::error::IoContext;
use balloon_lab::frontend::{
    data_len, data_pages, guest_ram, wait_allocated, MemfdRam, TestFrontend,
};
use balloon_lab::wait::{wait_for, Poll};
use balloon_lab::{BuiltinBalloon, Result, Vm, VmConfig, MIB};
use serde_json::json;
use std::time::{Duration, Instant};

const RUNS: usize = 5;
/// Touches nearly all free guest memory (tmpfs up to all but 48 MiB of MemAvailable), then
/// frees it.
const FILL_FREE_MEMORY: &str = "avail=$(awk '/MemAvailable/ {print int($2/1024) - 48}' /proc/meminfo); dd if=/dev/zero of=/tmp/fill bs=1M count=$avail 2>/dev/null; rm -f /tmp/fill";
/// Every balloon benchmark polls progress at this interval, so the timings compare.
const POLL: Duration = Duration::from_millis(20);

mod control_flood;
mod density;
mod discard_native;
mod fleet;
mod guest_app_inflate;
mod guest_lies;
mod policy_vm;
mod qemu_builtin;
mod scheduler_hung_guests;
mod vm_inflate;
mod vm_scaling;

use control_flood::control_flood;
use density::density;
use discard_native::discard_native;
use fleet::Fleet;
use guest_app_inflate::guest_app_inflate;
use guest_lies::guest_lies;
use policy_vm::policy_vm;
use qemu_builtin::{qemu_builtin_inflate, wait_builtin};
use scheduler_hung_guests::scheduler_hung_guests;
use vm_inflate::vm_inflate;
use vm_scaling::vm_scaling;

type Bench = (&'static str, fn() -> Result<()>);
const BENCHES: &[Bench] = &[
    ("qemu_builtin_inflate", qemu_builtin_inflate),
    ("discard_native", discard_native),
    ("vm_inflate", vm_inflate),
    ("scheduler_hung_guests", scheduler_hung_guests),
    ("guest_app_inflate", guest_app_inflate),
    ("control_flood", control_flood),
    ("vm_scaling", vm_scaling),
    ("density", density),
    ("policy_vm", policy_vm),
    ("guest_lies", guest_lies),
];

fn main() {
    let _ = env_logger::try_init();
    let names: Vec<String> = std::env::args().skip(1).collect();
    for name in &names {
        if !BENCHES.iter().any(|(n, _)| n == name) {
            let known: Vec<&str> = BENCHES.iter().map(|(n, _)| *n).collect();
            eprintln!(
                "unknown benchmark {name}; known: {} (and the scheduler's: `cargo bench -p scheduler`)",
                known.join(", ")
            );
            std::process::exit(2);
        }
    }
    let mut failed = false;
    for (name, run) in BENCHES {
        if names.is_empty() || names.iter().any(|n| n == name) {
            if let Err(e) = run() {
                eprintln!("{name}: FAILED: {e}");
                failed = true;
            }
        }
    }
    std::process::exit(i32::from(failed));
}
