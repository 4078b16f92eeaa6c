//! Host-side figures of a QEMU process: what a user checks to see memory really leave.

use crate::error::IoContext;
use crate::{LabError, Result};
use std::os::unix::fs::MetadataExt;

/// Memory figures from /proc/PID/status, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcMemory {
    pub vm_rss: u64,
    pub rss_anon: u64,
    pub rss_file: u64,
    pub rss_shmem: u64,
}

pub fn proc_memory(pid: u32) -> Result<ProcMemory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).ctx(|| format!("reading {path}"))?;
    let mut mem = ProcMemory::default();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(kib) = value.parse::<u64>() else {
            continue;
        };
        let bytes = kib * 1024;
        match key {
            "VmRSS:" => mem.vm_rss = bytes,
            "RssAnon:" => mem.rss_anon = bytes,
            "RssFile:" => mem.rss_file = bytes,
            "RssShmem:" => mem.rss_shmem = bytes,
            _ => {}
        }
    }
    Ok(mem)
}

/// Resident bytes per mapped file (or `[heap]`, `[stack]`, `[anon]`, ...) of a process, from
/// /proc/PID/smaps, largest first: where its resident set is.
pub fn rss_by_mapping(pid: u32) -> Result<Vec<(String, u64)>> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).ctx(|| format!("reading {path}"))?;
    let mut by_name: std::collections::BTreeMap<String, u64> = Default::default();
    let mut name = String::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let Some(first) = parts.next() else { continue };
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: range, perms, offset, dev, inode, then the name if any.
            name = parts.nth(4).unwrap_or("[anon]").to_string();
        } else if first == "Rss:" {
            let kib: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *by_name.entry(name.clone()).or_default() += kib * 1024;
        }
    }
    let mut out: Vec<(String, u64)> = by_name.into_iter().filter(|(_, b)| *b > 0).collect();
    out.sort_by_key(|(_, b)| std::cmp::Reverse(*b));
    Ok(out)
}

/// CPU time the process has used, user and system, in seconds (/proc/PID/stat).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).ctx(|| format!("reading {path}"))?;
    // The command name may hold spaces and parentheses: the fields follow its last ')'.
    let fields: Vec<&str> = text
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15; `fields` starts at field 3.
    let ticks = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<u64>().ok());
    match (ticks(14), ticks(15)) {
        (Some(user), Some(system)) => Ok((user + system) as f64 / CLOCK_TICKS_PER_SECOND),
        _ => Err(LabError::Other(format!("{path}: no utime/stime"))),
    }
}

/// USER_HZ, which /proc reports times in: 100 on every Linux architecture the lab runs.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// Bytes allocated to the process's memfd files (guest RAM with memory-backend-memfd): the
/// memory a discard returns to the host, independent of what is mapped where.
pub fn memfd_allocated(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/fd");
    let mut total = 0;
    let mut seen = std::collections::HashSet::new();
    for entry in std::fs::read_dir(&dir).ctx(|| format!("reading {dir}"))? {
        let Ok(entry) = entry else { continue };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("/memfd:") {
            continue;
        }
        // The same memfd may be open on several descriptors; count each inode once.
        if let Ok(meta) = std::fs::metadata(entry.path()) {
            if seen.insert((meta.dev(), meta.ino())) {
                total += meta.blocks() * 512;
            }
        }
    }
    if !seen.is_empty() {
        Ok(total)
    } else {
        Err(LabError::Other(format!("process {pid} has no memfd open")))
    }
}

/// Bytes allocated to a file (a guest RAM file on tmpfs or hugetlbfs): what its holes gave back.
pub fn file_allocated(path: &std::path::Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .ctx(|| format!("stat {}", path.display()))?
        .blocks()
        * 512)
}

/// Parses /proc/meminfo-style text into (key, bytes) pairs.
pub fn parse_meminfo(text: &str) -> std::collections::BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (key, rest) = line.split_once(':')?;
            let mut parts = rest.split_whitespace();
            let value: u64 = parts.next()?.parse().ok()?;
            let scale = if parts.next() == Some("kB") { 1024 } else { 1 };
            Some((key.trim().to_string(), value * scale))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parses_kib_and_plain_counts() {
        let m = parse_meminfo("MemTotal:       1004512 kB\nHugePages_Total:       0\nbad line\n");
        assert_eq!(m["MemTotal"], 1004512 * 1024);
        assert_eq!(m["HugePages_Total"], 0);
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn own_cpu_time_grows_with_work() {
        let before = cpu_seconds(std::process::id()).unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        assert!(cpu_seconds(std::process::id()).unwrap() > before);
    }

    #[test]
    fn own_process_memory_is_readable() {
        let m = proc_memory(std::process::id()).unwrap();
        assert!(m.vm_rss > 0);
    }
}
