//! Ballooned-page tracking that survives the backend process: the bitmaps live in a shared
//! mapping of a file beside the state file, so every page the balloon takes or gives back is
//! recorded the moment it is, and a backend killed and started again (behind the keeper, with
//! the same guest RAM) knows exactly which pages the balloon holds.
//!
//! The file names the guest RAM it describes (each region's guest address, size, and the
//! backing file's device, inode and offset); a file describing other RAM is replaced. Whether
//! the pages are still the balloon's (the guest may have rebooted meanwhile) is decided later,
//! from the driver's inflate queue (the lifecycle, balloon/lifecycle.rs).
//!
//! The unsafe code here is the shared mapping itself, which no crate makes safe: a file
//! mapped shared can change under the process (memmap2's `map_mut` is unsafe for that
//! reason), and the regions' bitmaps are disjoint word ranges of one mapping, so their slices
//! are made by hand (the file is locked, so only this process writes it).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"VBALPGS1";

/// What identifies one region of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionIdentity {
    pub gpa: u64,
    pub len: u64,
    pub dev: u64,
    pub ino: u64,
    pub offset: u64,
}

impl RegionIdentity {
    pub fn of(gpa: u64, len: u64, file: &File, offset: u64) -> io::Result<Self> {
        let m = file.metadata()?;
        Ok(RegionIdentity {
            gpa,
            len,
            dev: m.dev(),
            ino: m.ino(),
            offset,
        })
    }
}

/// A shared mapping of the whole tracking file.
#[derive(Debug)]
struct Mapping {
    ptr: *mut u64,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory; each MappedWords touches only its own range
// (see the module: one mapping shared by regions is what no crate expresses safely).
unsafe impl Send for Mapping {}
// SAFETY: as above; no interior state besides the memory.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what mmap returned.
        unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
    }
}

/// One region's words in the mapping.
#[derive(Debug)]
pub struct MappedWords {
    map: Arc<Mapping>,
    start: usize,
    len: usize,
}

impl MappedWords {
    pub fn as_slice(&self) -> &[u64] {
        // SAFETY: [start, start + len) lies inside the mapping (checked when built), which
        // lives as long as `map`; ranges of different MappedWords do not overlap.
        unsafe { std::slice::from_raw_parts(self.map.ptr.add(self.start), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u64] {
        // SAFETY: as in as_slice; `&mut self` makes this the only reference to the range.
        unsafe { std::slice::from_raw_parts_mut(self.map.ptr.add(self.start), self.len) }
    }
}

fn header(ids: &[RegionIdentity]) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&(ids.len() as u64).to_le_bytes());
    for id in ids {
        for v in [id.gpa, id.len, id.dev, id.ino, id.offset] {
            h.extend_from_slice(&v.to_le_bytes());
        }
    }
    h
}

fn map(file: &File, bytes: usize) -> io::Result<Arc<Mapping>> {
    // SAFETY: a new shared mapping of a file we hold open, of its current size.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(Arc::new(Mapping {
        ptr: ptr.cast(),
        bytes,
    }))
}

/// Maps the tracking file at `path` for regions `ids`, region i's bits being `current[i]`.
/// With `may_adopt` and a file that describes exactly these regions, the file's bits are kept
/// (returns true: a previous process's); otherwise a new file holding `current` replaces it,
/// written and mapped before it is renamed into place, so that at every moment the file at
/// `path` is complete (and a mapping of the old one stays valid).
pub fn open(
    path: &Path,
    ids: &[RegionIdentity],
    current: &[&[u64]],
    may_adopt: bool,
) -> io::Result<(Vec<MappedWords>, bool)> {
    use std::os::unix::fs::FileExt;
    let head = header(ids);
    let total_words: usize = current.iter().map(|c| c.len()).sum();
    let bytes = head.len() + total_words * 8;
    let existing = may_adopt
        .then(|| crate::state::open_nofollow(path, true).ok())
        .flatten()
        .filter(|f| {
            let mut h = vec![0u8; head.len()];
            f.metadata().is_ok_and(|m| m.len() == bytes as u64)
                && f.read_exact_at(&mut h, 0).is_ok()
                && h == head
        });
    let adopted = existing.is_some();
    let (file, rename_from) = match existing {
        Some(f) => (f, None),
        None => {
            let tmp = crate::state::temp_beside(path)?;
            let f = tmp.as_file();
            f.set_len(bytes as u64)?;
            f.write_all_at(&head, 0)?;
            (tmp.as_file().try_clone()?, Some(tmp))
        }
    };
    // A temporary file not renamed into place is removed when `rename_from` drops.
    let map = map(&file, bytes)?;
    let mut start = head.len() / 8;
    let mut out = Vec::with_capacity(current.len());
    for bits in current {
        let mut words = MappedWords {
            map: map.clone(),
            start,
            len: bits.len(),
        };
        if !adopted {
            words.as_mut_slice().copy_from_slice(bits);
        }
        start += bits.len();
        out.push(words);
    }
    if let Some(tmp) = rename_from {
        tmp.persist(path).map_err(|e| e.error)?;
    }
    Ok((out, adopted))
}

/// Holds an exclusive lock on `STATE.lock` for as long as it lives: two backends must never
/// share a state file (each would take the other's pages for its own). The lock file is
/// never a symlink (O_NOFOLLOW).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    pub fn acquire(state_file: &Path) -> io::Result<Self> {
        let path = crate::state::beside(state_file, "lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)?;
        // One another user planted (in a state directory they can write) is not ours to lock.
        crate::state::check_ours(&file)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}: remove it", path.display())))?;
        if let Err(e) =
            rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        {
            let e = io::Error::from(e);
            return Err(if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{} is held by another running backend (it uses state file {})",
                        path.display(),
                        state_file.display()
                    ),
                )
            } else {
                e
            });
        }
        Ok(StateLock { _file: file })
    }
}
