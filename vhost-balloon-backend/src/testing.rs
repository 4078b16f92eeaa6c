//! Test support (the `test-support` feature, and this crate's own tests): a memfd standing for
//! a guest's RAM, mapped shared in this process as a VMM maps it.
//!
//! The memfd is what discards act on, so its allocated size ([`MemfdRam::allocated`]) shows
//! what really left, and a discarded page reads as zeros. Everything goes through vm-memory's
//! safe types: the mapping is a [`MmapRegion`], every access a bounds-checked volatile one.

use crate::memory::{Backing, GuestRegion};
use balloon_protocol::PAGE_SIZE;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use vm_memory::{
    ByteValued, FileOffset, GuestAddress, GuestMemoryMmap, MmapRegion, VolatileMemory,
    VolatileSlice,
};

/// Guest RAM for tests: a memfd of `len()` bytes, mapped shared here.
#[derive(Debug)]
pub struct MemfdRam {
    file: Arc<File>,
    map: MmapRegion<()>,
}

impl MemfdRam {
    /// A memfd of `len` bytes (a whole number of pages), mapped; no page is allocated yet.
    pub fn new(len: u64) -> io::Result<Self> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("test RAM of {len} bytes: not a positive number of pages"),
            ));
        }
        let size = usize::try_from(len).map_err(io::Error::other)?;
        let fd = rustix::fs::memfd_create("test-guest-ram", rustix::fs::MemfdFlags::CLOEXEC)?;
        let file = Arc::new(File::from(fd));
        file.set_len(len)?;
        let map = MmapRegion::from_file(FileOffset::from_arc(file.clone(), 0), size)
            .map_err(io::Error::other)?;
        Ok(MemfdRam { file, map })
    }

    pub fn len(&self) -> u64 {
        self.map.size() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.size() == 0
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.len() / PAGE_SIZE
    }

    /// The memfd (what a discard punches, and what a vhost-user frontend sends).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Where the memory is mapped in this process: the `userspace_addr` a vhost-user frontend
    /// puts in its memory table.
    pub fn host_addr(&self) -> usize {
        self.map.as_ptr() as usize
    }

    /// Bytes the host really holds for this memory (the memfd's allocated blocks).
    pub fn allocated(&self) -> u64 {
        self.file
            .metadata()
            .expect("fstat on the test memfd")
            .blocks()
            * 512
    }

    /// All the memory, for vm-memory's `Bytes` and `VolatileMemory` accessors.
    pub fn memory(&self) -> VolatileSlice<'_> {
        self.map.as_volatile_slice()
    }

    /// One volatile read of a `T` at `offset`. Panics outside the memory.
    pub fn read<T: ByteValued>(&self, offset: u64) -> T {
        self.map
            .get_ref::<T>(index(offset))
            .expect("read inside the test RAM")
            .load()
    }

    /// One volatile write of `value` at `offset`. Panics outside the memory.
    pub fn write<T: ByteValued>(&self, offset: u64, value: T) {
        self.map
            .get_ref::<T>(index(offset))
            .expect("write inside the test RAM")
            .store(value)
    }

    pub fn byte(&self, offset: u64) -> u8 {
        self.read(offset)
    }

    /// Writes `value` to the first byte of every page: every page is then allocated and holds
    /// data until it is discarded (reads as zeros).
    pub fn mark_pages(&self, value: u8) {
        for off in (0..self.len()).step_by(PAGE_SIZE as usize) {
            self.write(off, value);
        }
    }

    /// Allocates every page (writes to each), so that the allocated size then moves only with
    /// discards.
    pub fn populate(&self) {
        self.mark_pages(1);
    }

    fn page(&self, pfn: u64) -> VolatileSlice<'_> {
        self.map
            .get_slice(index(pfn * PAGE_SIZE), PAGE_SIZE as usize)
            .expect("page inside the test RAM")
    }

    /// Fills page `pfn` with `value` (what a guest keeps there).
    pub fn fill_page(&self, pfn: u64, value: u8) {
        self.page(pfn).copy_from(&[value; PAGE_SIZE as usize]);
    }

    /// Whether every byte of page `pfn` is `value` (a discarded page reads as zeros).
    pub fn page_is(&self, pfn: u64, value: u8) -> bool {
        let mut buf = [0u8; PAGE_SIZE as usize];
        self.page(pfn).copy_to(&mut buf[..]);
        buf.iter().all(|&b| b == value)
    }

    /// Punches `[offset, offset + len)` out of the memfd directly, as the backend's discards do.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        fallocate(
            &*self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )?;
        Ok(())
    }

    /// The backend's region for `[offset, offset + len)` of this memory at guest address `gpa`,
    /// as `update_memory` builds it from a memory table (mapping and file), with host pages of
    /// `host_page_size` bytes.
    pub fn region(&self, gpa: u64, offset: u64, len: u64, host_page_size: u64) -> GuestRegion {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len()),
            "region [{offset:#x}, +{len:#x}) outside the test RAM"
        );
        GuestRegion::new(
            gpa,
            len,
            Backing {
                host_addr: self.host_addr() + index(offset),
                file: Some((self.file.clone(), offset)),
            },
            host_page_size,
        )
    }

    /// The memfd mapped again as a vhost-user backend maps a memory table: one region per
    /// `(guest address, offset in the memfd, length)`.
    pub fn guest_memory(&self, layout: &[(u64, u64, u64)]) -> io::Result<GuestMemoryMmap<()>> {
        let ranges = layout.iter().map(|&(gpa, offset, len)| {
            (
                GuestAddress(gpa),
                index(len),
                Some(FileOffset::from_arc(self.file.clone(), offset)),
            )
        });
        GuestMemoryMmap::from_ranges_with_files(ranges).map_err(io::Error::other)
    }
}

fn index(offset: u64) -> usize {
    usize::try_from(offset).expect("offset fits in usize")
}

impl AsFd for MemfdRam {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for MemfdRam {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_writes_and_discards_through_the_mapping() {
        let ram = MemfdRam::new(16 * PAGE_SIZE).unwrap();
        assert_eq!(
            (ram.len(), ram.pages(), ram.allocated()),
            (16 * PAGE_SIZE, 16, 0)
        );
        ram.mark_pages(0xa5);
        assert_eq!(ram.allocated(), 16 * PAGE_SIZE);
        ram.write::<u32>(PAGE_SIZE + 2, 0xdead_beef);
        assert_eq!(ram.read::<u32>(PAGE_SIZE + 2), 0xdead_beef);
        ram.fill_page(3, 7);
        assert!(ram.page_is(3, 7) && !ram.page_is(2, 7));
        ram.punch_hole(3 * PAGE_SIZE, PAGE_SIZE).unwrap();
        assert_eq!(ram.allocated(), 15 * PAGE_SIZE);
        // (Reading a hole through a shared mapping allocates the page again.)
        assert!(ram.page_is(3, 0));
        // A second mapping of the memfd sees the same memory.
        let mem = ram
            .guest_memory(&[(1 << 32, PAGE_SIZE, 2 * PAGE_SIZE)])
            .unwrap();
        let at = GuestAddress((1 << 32) + 2);
        assert_eq!(
            vm_memory::Bytes::read_obj::<u32>(&mem, at).unwrap(),
            0xdead_beef
        );
        assert!(MemfdRam::new(PAGE_SIZE + 1).is_err());
    }

    #[test]
    #[should_panic(expected = "inside the test RAM")]
    fn accesses_are_bounds_checked() {
        let ram = MemfdRam::new(PAGE_SIZE).unwrap();
        ram.write::<u16>(PAGE_SIZE - 1, 1);
    }
}
