//! Giving guest memory back to the host. Guest RAM is shared memory (memfd, hugetlbfs, shm), so
//! MADV_DONTNEED would only drop this process's view and free nothing; punching a hole in the
//! backing file (or MADV_REMOVE, which does the same through a mapping) frees the pages for
//! every process that maps them, QEMU included. The guest sees zeros when it touches them again.

use std::fs::File;
use std::io;

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
    /// MADV_REMOVE on the mapping when there is no file.
    ///
    /// With a file, never through the mapping: MADV_REMOVE punches the same hole through the
    /// same filesystem call, so it cannot succeed where fallocate refused, and a discard the
    /// worker runs after a memory table change may outlive the old table's mapping (the
    /// vhost-user crate drops it before the backend hears of the new table), its address then
    /// free or another mapping's.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if let Some((file, file_offset)) = &self.file {
            let pos = file_offset
                .checked_add(offset)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            use rustix::fs::{fallocate, FallocateFlags};
            return fallocate(
                file,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                pos,
                len,
            )
            .map_err(io::Error::from);
        }
        if self.host_addr == 0 {
            // Neither a file nor a mapping to discard through.
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        let addr = self
            .host_addr
            .checked_add(offset as usize)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the range lies inside the region's mapping (the caller checked it against the
        // region's size); MADV_REMOVE only frees the pages, the mapping stays valid and reads
        // as zeros. (Unsafe in any crate: it changes what memory reads as.)
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
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    let base = (rustix::param::page_size() as u64).max(4096);
    let Some(file) = file else { return base };
    match rustix::fs::fstatfs(file) {
        Ok(fs) if fs.f_type == HUGETLBFS_MAGIC => fs.f_bsize as u64,
        _ => base,
    }
}
