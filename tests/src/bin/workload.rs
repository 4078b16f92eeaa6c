//! balloon-workload: the guest workload of the policy_vm benchmark. It keeps a working set
//! that follows a schedule (the simulator's: sizes at times, linear between them) and counts
//! work done on it: at full speed one pass over the whole set per period, each pass writing
//! every page of its anonymous part and reading its file part (a block device's page cache).
//! A pass that has to wait for reclaim, swap-ins or re-reads takes longer, so less work is
//! counted; an OOM kill ends it, and the supervisor that starts it again finds its clock and
//! counters in the status file.

use balloon_lab::workload::{WorkloadStatus, STATUS_PATH};
use balloon_protocol::Size;
use clap::Parser;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
/// File reads go in chunks of this many bytes.
const READ_CHUNK: usize = 256 << 10;

#[derive(Parser, Debug)]
#[command(about = "A working set that follows a schedule, counting the work done on it")]
struct Args {
    /// The working set over time: TIME_S:SIZE,... (seconds since the first start; linear
    /// between points, constant after the last).
    #[arg(long, value_parser = parse_point, value_delimiter = ',', required = true)]
    schedule: Vec<(f64, Size)>,
    /// A file or block device whose first bytes hold the file part of the working set.
    #[arg(long)]
    file: Option<PathBuf>,
    /// The file's share of the working set (the rest is anonymous memory).
    #[arg(long, default_value_t = 0.25)]
    file_share: f64,
    /// Seconds per pass at full speed.
    #[arg(long, default_value_t = 1.0)]
    period_s: f64,
    #[arg(long, default_value = STATUS_PATH)]
    status: PathBuf,
}

fn parse_point(s: &str) -> Result<(f64, Size), String> {
    let (t, size) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected TIME_S:SIZE"))?;
    let t: f64 = t.parse().map_err(|_| format!("{t:?}: not a time"))?;
    if !t.is_finite() || t < 0.0 {
        return Err(format!("{t}: a time is >= 0"));
    }
    Ok((t, size.parse().map_err(|e| format!("{e}"))?))
}

fn monotonic_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Anonymous memory reserved once for the largest size; pages past the current size are
/// given back with MADV_DONTNEED when the set shrinks.
struct AnonSet {
    base: *mut u8,
    capacity: usize,
    len: usize,
}

impl AnonSet {
    fn new(capacity: usize) -> std::io::Result<Self> {
        let capacity = capacity.max(PAGE);
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                capacity,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(AnonSet {
            base: base.cast(),
            capacity,
            len: 0,
        })
    }

    fn resize(&mut self, len: usize) {
        let len = len.min(self.capacity) / PAGE * PAGE;
        if len < self.len {
            // SAFETY: the range lies inside our mapping.
            unsafe {
                libc::madvise(
                    self.base.add(len).cast(),
                    self.len - len,
                    libc::MADV_DONTNEED,
                )
            };
        }
        self.len = len;
    }

    /// Writes one byte of every page: each page must be resident (or come back) for the pass.
    fn pass(&mut self, stamp: u8) {
        for off in (0..self.len).step_by(PAGE) {
            // SAFETY: off < len <= capacity, inside the mapping.
            unsafe { std::ptr::write_volatile(self.base.add(off), stamp) };
        }
    }
}

impl Drop for AnonSet {
    fn drop(&mut self) {
        // SAFETY: our mapping, unmapped once.
        unsafe { libc::munmap(self.base.cast(), self.capacity) };
    }
}

fn read_file_part(file: &File, len: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        let got = file.read_at(&mut buf[..n], off)?;
        if got == 0 {
            break;
        }
        off += got as u64;
    }
    Ok(())
}

fn write_status(path: &Path, status: &WorkloadStatus) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(status).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(tmp, path)
}

fn run(args: &Args) -> Result<(), String> {
    if !(0.0..=1.0).contains(&args.file_share) || args.period_s.is_nan() || args.period_s <= 0.0 {
        return Err("--file-share is in [0, 1] and --period-s > 0".into());
    }
    let file = match &args.file {
        Some(p) => Some(File::open(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    let file_len = match &file {
        Some(f) => {
            use std::io::Seek;
            let mut f = f;
            f.seek(std::io::SeekFrom::End(0))
                .map_err(|e| format!("file size: {e}"))?
        }
        None => 0,
    };
    let file_share = if file.is_some() { args.file_share } else { 0.0 };
    let largest = args.schedule.iter().map(|p| p.1 .0).max().unwrap_or(0);
    let mut anon = AnonSet::new(largest as usize).map_err(|e| format!("mmap: {e}"))?;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut status = match std::fs::read(&args.status)
        .ok()
        .and_then(|b| serde_json::from_slice::<WorkloadStatus>(&b).ok())
    {
        Some(previous) => WorkloadStatus {
            restarts: previous.restarts + 1,
            ..previous
        },
        None => WorkloadStatus {
            epoch_s: monotonic_s(),
            ..WorkloadStatus::default()
        },
    };
    let period = Duration::from_secs_f64(args.period_s);
    loop {
        let started = Instant::now();
        let t = monotonic_s() - status.epoch_s;
        let size = scheduler::sim::piecewise_linear(&args.schedule, t);
        let file_part = ((size as f64 * file_share) as u64).min(file_len);
        anon.resize((size - file_part) as usize);
        anon.pass(status.passes as u8);
        if let Some(f) = &file {
            read_file_part(f, file_part, &mut buf).map_err(|e| format!("reading: {e}"))?;
        }
        let took = started.elapsed();
        status.passes += 1;
        status.work_s += args.period_s;
        if took > period {
            status.slow_passes += 1;
        }
        status.size_bytes = size;
        status.last_pass_s = took.as_secs_f64();
        status.updated_s = monotonic_s();
        write_status(&args.status, &status)
            .map_err(|e| format!("{}: {e}", args.status.display()))?;
        if let Some(rest) = period.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("balloon-workload: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_points_parse_or_say_why_not() {
        assert_eq!(parse_point("30:512M"), Ok((30.0, Size(512 << 20))));
        assert_eq!(parse_point("2.5:4096"), Ok((2.5, Size(4096))));
        assert!(parse_point("512M").unwrap_err().contains("TIME_S:SIZE"));
        assert!(parse_point("-1:1M").unwrap_err().contains(">= 0"));
        assert!(parse_point("x:1M").unwrap_err().contains("not a time"));
        assert!(parse_point("1:lots").is_err());
    }

    #[test]
    fn the_anonymous_set_gives_back_what_it_no_longer_holds() {
        let resident = |set: &AnonSet| -> usize {
            let pages = set.capacity / PAGE;
            let mut vec = vec![0u8; pages];
            // SAFETY: mincore over our own mapping, one byte per page.
            unsafe { libc::mincore(set.base.cast(), set.capacity, vec.as_mut_ptr()) };
            vec.iter().filter(|b| **b & 1 == 1).count()
        };
        let mut set = AnonSet::new(64 * PAGE).unwrap();
        set.resize(48 * PAGE);
        set.pass(1);
        assert_eq!(resident(&set), 48);
        set.resize(16 * PAGE);
        assert_eq!(resident(&set), 16);
        set.resize(1 << 40);
        assert_eq!(set.len, 64 * PAGE, "capped at its capacity");
    }
}
