//! Huge pages for a test: reserved in the host's pool for the test's lifetime, given back after.
//! One reservation at a time in a process (tests run in parallel threads, and the pool and its
//! free count are the host's, not a test's).

use crate::error::IoContext;
use crate::host::parse_meminfo;
use crate::{LabError, Result};
use std::sync::{Mutex, MutexGuard};

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
/// The huge page size the tests use (QEMU `hugetlbsize=2M`), the x86 default.
pub const HUGE_PAGE: u64 = 2 << 20;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

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
        let meminfo = meminfo().map_err(Reservation::Failed)?;
        if meminfo.get("Hugepagesize") != Some(&HUGE_PAGE) {
            return Err(Reservation::Unavailable(format!(
                "the default huge page size is {:?} bytes, not 2 MiB",
                meminfo.get("Hugepagesize")
            )));
        }
        let previous = read_pool().map_err(Reservation::Failed)?;
        let free_before = meminfo.get("HugePages_Free").copied().unwrap_or(0);
        if let Err(e) = write_pool(previous + count) {
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
        if let Err(e) = write_pool(self.previous) {
            eprintln!("giving back huge pages: {e}");
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
        use std::os::unix::fs::MetadataExt;
        let path = self.dir.join(file);
        Ok(std::fs::metadata(&path)
            .ctx(|| format!("stat {}", path.display()))?
            .blocks()
            * 512)
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
