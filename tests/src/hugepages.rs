//! Huge pages for a test: reserved in the host's pool for the test's lifetime, given back after.
//! One reservation at a time in a process (tests run in parallel threads, and the pool and its
//! free count are the host's, not a test's).

use crate::backend::Backend;
use crate::error::IoContext;
use crate::host::parse_meminfo;
use crate::wait::{wait_for, Poll};
use crate::{LabError, Result, Vm, MIB};
use balloon_protocol::BackendStatus;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
/// The huge page size the tests use (QEMU `hugetlbsize=2M`), the x86 default.
pub const HUGE_PAGE: u64 = 2 << 20;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A reservation's record while it lasts: "PID POOL_BEFORE". A run killed before it could give
/// its huge pages back (SIGKILL, a CI timeout) leaves it, and the next reservation puts the
/// pool back first: 1 GiB of huge pages stays out of the host's memory otherwise.
fn stamp_path() -> std::path::PathBuf {
    std::env::temp_dir().join("balloon-lab/hugepages.reserved")
}

/// Gives back the huge pages of a run that died holding them (see `stamp_path`).
fn restore_after_killed_run(stamp: &std::path::Path) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(stamp) else {
        return Ok(());
    };
    let fields: Vec<u64> = text
        .split_whitespace()
        .map_while(|f| f.parse().ok())
        .collect();
    let [pid, pool_before] = fields[..] else {
        return Err(LabError::Other(format!(
            "{}: not \"PID POOL_BEFORE\": {text:?}; remove it once nr_hugepages is right",
            stamp.display()
        )));
    };
    if pid != u64::from(std::process::id())
        && std::path::Path::new(&format!("/proc/{pid}")).exists()
    {
        return Err(LabError::Other(format!(
            "process {pid} holds a huge-page reservation ({}): huge-page tests run one at a time",
            stamp.display()
        )));
    }
    eprintln!(
        "a killed run (pid {pid}) left huge pages reserved: nr_hugepages back to {pool_before}"
    );
    write_pool(pool_before).ctx(|| format!("writing {NR_HUGEPAGES}"))?;
    let _ = std::fs::remove_file(stamp);
    Ok(())
}

/// A reservation of huge pages. Dropping it puts the pool back to what it was.
pub struct HugePages {
    previous: u64,
    pub count: u64,
    _one_at_a_time: MutexGuard<'static, ()>,
}

/// Why huge pages could not be had. Only `Unavailable` may make a test skip.
#[derive(Debug)]
pub enum Reservation {
    Unavailable(String),
    Failed(LabError),
}

impl HugePages {
    /// Grows the pool by `count` 2 MiB pages and checks that they are free.
    pub fn reserve(count: u64) -> std::result::Result<HugePages, Reservation> {
        let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let stamp = stamp_path();
        restore_after_killed_run(&stamp).map_err(Reservation::Failed)?;
        let meminfo = meminfo().map_err(Reservation::Failed)?;
        if meminfo.get("Hugepagesize") != Some(&HUGE_PAGE) {
            return Err(Reservation::Unavailable(format!(
                "the default huge page size is {:?} bytes, not 2 MiB",
                meminfo.get("Hugepagesize")
            )));
        }
        let previous = read_pool().map_err(Reservation::Failed)?;
        let free_before = meminfo.get("HugePages_Free").copied().unwrap_or(0);
        if let Some(dir) = stamp.parent() {
            std::fs::create_dir_all(dir)
                .ctx(|| format!("creating {}", dir.display()))
                .map_err(Reservation::Failed)?;
        }
        std::fs::write(&stamp, format!("{} {previous}\n", std::process::id()))
            .ctx(|| format!("writing {}", stamp.display()))
            .map_err(Reservation::Failed)?;
        if let Err(e) = write_pool(previous + count) {
            let _ = std::fs::remove_file(&stamp);
            return Err(Reservation::Unavailable(format!(
                "cannot write {NR_HUGEPAGES} ({e}): huge pages need root"
            )));
        }
        let reservation = HugePages {
            previous,
            count,
            _one_at_a_time: guard,
        };
        let free = free_pages().map_err(Reservation::Failed)?;
        if free < free_before + count {
            // Dropping the reservation restores the pool.
            return Err(Reservation::Unavailable(format!(
                "the kernel found only {} of {count} huge pages (memory too fragmented?)",
                free.saturating_sub(free_before)
            )));
        }
        Ok(reservation)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        match write_pool(self.previous) {
            Ok(()) => {
                let _ = std::fs::remove_file(stamp_path());
            }
            // The stamp stays, so the next reservation tries again.
            Err(e) => eprintln!("giving back huge pages: {e}"),
        }
    }
}

fn meminfo() -> Result<std::collections::BTreeMap<String, u64>> {
    let text = std::fs::read_to_string("/proc/meminfo").ctx(|| "reading /proc/meminfo".into())?;
    Ok(parse_meminfo(&text))
}

/// Free huge pages in the host's pool (HugePages_Free).
pub fn free_pages() -> Result<u64> {
    meminfo()?
        .get("HugePages_Free")
        .copied()
        .ok_or_else(|| LabError::Other("no HugePages_Free in /proc/meminfo".into()))
}

fn read_pool() -> Result<u64> {
    let text = std::fs::read_to_string(NR_HUGEPAGES).ctx(|| format!("reading {NR_HUGEPAGES}"))?;
    text.trim()
        .parse()
        .map_err(|e| LabError::Other(format!("{NR_HUGEPAGES}: {e}")))
}

fn write_pool(pages: u64) -> std::io::Result<()> {
    std::fs::write(NR_HUGEPAGES, pages.to_string())
}

/// A hugetlbfs of 2 MiB pages mounted for one guest's RAM file (QEMU memory-backend-file),
/// unmounted when dropped.
pub struct HugetlbfsMount {
    pub dir: std::path::PathBuf,
}

impl HugetlbfsMount {
    pub fn mount(dir: &std::path::Path) -> Result<HugetlbfsMount> {
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        let status = std::process::Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "none"])
            .arg(dir)
            .status()
            .ctx(|| "running mount".into())?;
        if !status.success() {
            return Err(LabError::Other(format!(
                "mount -t hugetlbfs on {} failed ({status}): mounting needs root",
                dir.display()
            )));
        }
        Ok(HugetlbfsMount {
            dir: dir.to_path_buf(),
        })
    }

    /// Bytes of huge pages allocated to `file` in this mount.
    pub fn allocated(&self, file: &str) -> Result<u64> {
        crate::host::file_allocated(&self.dir.join(file))
    }
}

impl Drop for HugetlbfsMount {
    fn drop(&mut self) {
        // The files go first: their huge pages return to the pool only then.
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        // Lazily (MNT_DETACH): the backend may still map the RAM file; the mount goes when it
        // lets go.
        let unmounted = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if unmounted {
            let _ = std::fs::remove_dir(&self.dir);
        } else {
            eprintln!("could not unmount {}", self.dir.display());
        }
    }
}

/// What a balloon gave back on a huge-page guest: the host memory behind the guest before and
/// after it took `balloon` bytes. Only whole huge pages can leave.
#[derive(Debug, Clone, Copy)]
pub struct Returned {
    pub balloon: u64,
    pub before: u64,
    pub after: u64,
}

impl Returned {
    pub fn bytes(&self) -> u64 {
        self.before.saturating_sub(self.after)
    }

    /// The share of the balloon that really left the host.
    pub fn share(&self) -> f64 {
        self.bytes() as f64 / self.balloon.max(1) as f64
    }
}

/// Host memory behind the guest once the backend's discards have settled: the guest RAM
/// allocated on the host and the backend's reclaimed count read twice alike, 200 ms apart.
pub fn settled_allocation(vm: &Vm, backend: &Backend) -> Result<u64> {
    let mut last = None;
    wait_for(
        "the discards to settle",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let now = (vm.ram_allocated()?, backend.status()?.reclaimed_bytes);
            let settled = last == Some(now);
            last = Some(now);
            Ok(if settled {
                Poll::Ready(now.0)
            } else {
                Poll::Pending(format!("allocated {} MiB", now.0 / MIB))
            })
        },
    )
}

/// Inflates the driver's balloon to `balloon` bytes and measures what left the host.
pub fn driver_returns(
    vm: &Vm,
    backend: &Backend,
    balloon: u64,
) -> Result<(Returned, BackendStatus)> {
    let before = settled_allocation(vm, backend)?;
    backend.set_target(balloon)?;
    let status = backend.wait_actual(balloon, Duration::from_secs(120))?;
    let after = settled_allocation(vm, backend)?;
    Ok((
        Returned {
            balloon,
            before,
            after,
        },
        status,
    ))
}

pub use crate::backend::APP_PORT;

/// Starts the app in the guest (its port wired to the backend's app socket) with its free
/// memory scattered, as a guest that has run a while has it, asks it to hold `held` bytes and
/// measures what left the host. Transparent huge pages are set to `madvise` first, as many
/// distributions ship them: only programs that ask get them, and the app asks.
pub fn app_returns(vm: &mut Vm, backend: &Backend, held: u64) -> Result<Returned> {
    vm.agent
        .sh("echo madvise > /sys/kernel/mm/transparent_hugepage/enabled")?;
    // 120 MiB of one-page files, every other one removed, leave 60 MiB of single free pages
    // among used ones, which base-page claims pick up first.
    vm.agent.sh(
        "mkdir -p /tmp/frag && cd /tmp/frag && i=0; while [ $i -lt 30720 ]; do echo > $i; i=$((i+1)); done; rm -f *[02468]",
    )?;
    vm.agent.spawn(&crate::backend::app_as_its_unit(""))?;
    backend.wait_app("the app to connect", |s| s.app.connected)?;
    let before = settled_allocation(vm, backend)?;
    backend.set_app_target(held)?;
    backend.wait_app(&format!("the app to hold {} MiB", held / MIB), |s| {
        s.app.ballooned_bytes == held && s.app.held_bytes == held
    })?;
    let after = settled_allocation(vm, backend)?;
    Ok(Returned {
        balloon: held,
        before,
        after,
    })
}
