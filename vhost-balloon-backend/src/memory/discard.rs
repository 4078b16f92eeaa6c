//! Giving guest memory back to the host. Guest RAM is shared memory (memfd, hugetlbfs, shm), so
//! MADV_DONTNEED would only drop this process's view and free nothing; punching a hole in the
//! backing file (or MADV_REMOVE, which does the same through a mapping) frees the pages for
//! every process that maps them, QEMU included. The guest sees zeros when it touches them again.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Where a region's memory lives.
#[derive(Debug, Clone)]
pub struct Backing {
    /// Start of this process's mapping of the region.
    pub host_addr: usize,
    /// The backing file and the region's offset in it, when the frontend shared one (vhost-user
    /// always does).
    pub file: Option<(std::sync::Arc<File>, u64)>,
}

impl Backing {
    /// Discards `len` bytes at `offset` into the region: a hole punched in the backing file, or
    /// MADV_REMOVE on the mapping when there is no file or it refuses.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if let Some((file, file_offset)) = &self.file {
            let pos = file_offset
                .checked_add(offset)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            // SAFETY: fallocate on a descriptor we own; it does not touch our memory.
            let rc = unsafe {
                libc::fallocate64(
                    file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    pos as libc::off64_t,
                    len as libc::off64_t,
                )
            };
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(err);
            }
        }
        let addr = self
            .host_addr
            .checked_add(offset as usize)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the range lies inside the region's mapping (the caller checked it against the
        // region's size); MADV_REMOVE only frees the pages, the mapping stays valid and reads
        // as zeros.
        let rc =
            unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_REMOVE) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// The page size of the memory behind `file`: the huge page size on hugetlbfs, otherwise the
/// host's base page size. Only whole host pages can be discarded.
pub fn host_page_size(file: Option<&File>) -> u64 {
    const HUGETLBFS_MAGIC: libc::c_long = 0x9584_58f6;
    // SAFETY: sysconf has no memory effects.
    let base = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let Some(file) = file else { return base };
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into the struct we own.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } == 0
        && fs.f_type as libc::c_long == HUGETLBFS_MAGIC
    {
        fs.f_bsize as u64
    } else {
        base
    }
}
