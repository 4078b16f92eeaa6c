//! The trace file the daemon appends a line to every tick, rotated by size: at `max_bytes` the
//! file becomes `PATH.1` (the older ones `PATH.2` .. `PATH.KEEP`, the oldest dropped) and a new
//! one starts, so 30 guests at 2 s ticks (about 700 MB a day) never fill a disk. Written here
//! rather than with a crate: file-rotate, the one that fits, brings chrono for date-based
//! rotation, and this needs only a rename chain at a size. The file is opened without following
//! a symlink (a planted link in a log directory must not make the daemon append elsewhere).

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Rotated files kept beside the current one.
pub const KEEP: u32 = 3;
/// The default size at which the trace rotates.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

pub struct TraceFile {
    path: PathBuf,
    max_bytes: u64,
    file: File,
    size: u64,
}

fn open(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

impl TraceFile {
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<Self> {
        let file = open(path)?;
        let size = file.metadata()?.len();
        Ok(TraceFile {
            path: path.to_path_buf(),
            max_bytes: max_bytes.max(1),
            file,
            size,
        })
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    /// Appends one line (a newline is added), rotating first if it would take the file past its
    /// size (a file never rotates empty, so one line longer than the limit is still written).
    pub fn append_line(&mut self, line: &str) -> io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(line.as_bytes())?;
        self.file.write_all(b"\n")?;
        self.size += len;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        for n in (1..KEEP).rev() {
            match std::fs::rename(self.rotated(n), self.rotated(n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, self.rotated(1))?;
        self.file = open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_at_its_size_and_keeps_a_few() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("trace.jsonl");
        let mut t = TraceFile::open(&p, 100).unwrap();
        let line = "x".repeat(39); // 40 bytes a line: two fit in 100
        for _ in 0..20 {
            t.append_line(&line).unwrap();
        }
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
        assert_eq!(size(&p), Some(80));
        for n in 1..=KEEP {
            assert_eq!(size(&t.rotated(n)), Some(80), "{n}");
        }
        assert_eq!(size(&t.rotated(KEEP + 1)), None, "only {KEEP} kept");
        // A restart appends to what is there and rotates on from its size.
        drop(t);
        let mut t = TraceFile::open(&p, 100).unwrap();
        t.append_line(&line).unwrap();
        assert_eq!(size(&p), Some(40));
    }

    #[test]
    fn a_planted_symlink_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("elsewhere");
        std::fs::write(&target, "keep").unwrap();
        let p = d.path().join("trace.jsonl");
        std::os::unix::fs::symlink(&target, &p).unwrap();
        assert!(TraceFile::open(&p, 100).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }
}
