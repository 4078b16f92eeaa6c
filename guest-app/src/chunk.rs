//! A chunk of ballooned memory: anonymous memory, populated, mlocked, and pinned so that its
//! physical pages cannot move while the host may discard them.
//!
//! mlock alone does not pin: compaction (vm.compact_unevictable_allowed defaults to 1),
//! khugepaged, NUMA balancing and memory offlining may migrate a locked page, and if that
//! happened between reading pagemap and the host's discard, the host would wipe whatever the
//! guest put in the old frame next. Registering the chunk as an io_uring fixed buffer pins its
//! pages with FOLL_LONGTERM, which migration respects; pagemap is read only after that, and the
//! pin is dropped only after the host acknowledged the deflate.

use crate::pagemap::{self, PAGE};
use balloon_protocol::app::PageRange;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The guest could not give the memory now (mmap or mlock: ENOMEM, EAGAIN).
    #[error("the guest cannot spare the memory now: {0}")]
    NoMemory(std::io::Error),
    #[error("pinning the chunk (io_uring buffer registration): {0}")]
    Pin(std::io::Error),
    #[error("{0}")]
    Pagemap(#[from] pagemap::PagemapError),
    #[error("{0}")]
    Other(std::io::Error),
}

pub struct Chunk {
    addr: *mut libc::c_void,
    pub len: usize,
    /// The io_uring instance whose fixed buffer pins the pages; closing it unpins them.
    pin: Option<OwnedFd>,
    pub ranges: Vec<PageRange>,
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Pins [addr, addr+len) by registering it as the one fixed buffer of a new io_uring.
fn pin(addr: *mut libc::c_void, len: usize) -> std::io::Result<OwnedFd> {
    // struct io_uring_params is 120 bytes; all zero asks for defaults.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup writes into the params buffer we own.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(last_error());
    }
    // SAFETY: a fresh descriptor we now own.
    let ring = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let iov = libc::iovec {
        iov_base: addr,
        iov_len: len,
    };
    const IORING_REGISTER_BUFFERS: u32 = 0;
    // SAFETY: the iovec describes memory this process owns for the chunk's lifetime.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            fd as i32,
            IORING_REGISTER_BUFFERS,
            &iov as *const libc::iovec,
            1u32,
        )
    };
    if rc < 0 {
        return Err(last_error());
    }
    Ok(ring)
}

impl Chunk {
    /// Claims `len` bytes from the guest OS, pins them and finds their PFNs.
    pub fn claim(len: usize, pagemap: &File) -> Result<Chunk, ChunkError> {
        // SAFETY: a fresh private anonymous mapping; MAP_POPULATE faults it in.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(ChunkError::NoMemory(last_error()));
        }
        let mut chunk = Chunk {
            addr,
            len,
            pin: None,
            ranges: Vec::new(),
        };
        // SAFETY: locking our own mapping.
        if unsafe { libc::mlock(addr, len) } != 0 {
            return Err(ChunkError::NoMemory(last_error()));
        }
        // Make sure every page is really there (MAP_POPULATE is best effort).
        for off in (0..len).step_by(PAGE as usize) {
            // SAFETY: inside the mapping.
            unsafe { std::ptr::write_volatile((addr as *mut u8).add(off), 0xba) };
        }
        chunk.pin = Some(pin(addr, len).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOMEM) | Some(libc::EAGAIN) => ChunkError::NoMemory(e),
            _ => ChunkError::Pin(e),
        })?);
        let pfns = pagemap::pfns(pagemap, addr as u64, len / PAGE as usize)?;
        chunk.ranges = pagemap::coalesce(pfns);
        Ok(chunk)
    }

    /// Re-reads the PFNs (to check that nothing moved).
    pub fn current_pfns(&self, pagemap: &File) -> Result<Vec<u64>, ChunkError> {
        Ok(pagemap::pfns(
            pagemap,
            self.addr as u64,
            self.len / PAGE as usize,
        )?)
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // Unpin first, then unlock and unmap: the guest gets the pages back.
        self.pin = None;
        // SAFETY: our own mapping.
        unsafe {
            libc::munlock(self.addr, self.len);
            libc::munmap(self.addr, self.len);
        }
    }
}

/// Claims `len` bytes, then times reading their PFNs from pagemap (GiB of memory resolved per
/// second).
pub fn measure_pagemap(len: usize) -> Result<f64, ChunkError> {
    let pagemap = File::open("/proc/self/pagemap").map_err(ChunkError::Other)?;
    let chunk = Chunk::claim(len, &pagemap)?;
    let start = std::time::Instant::now();
    let rounds = 5;
    for _ in 0..rounds {
        let pfns = chunk.current_pfns(&pagemap)?;
        std::hint::black_box(pagemap::coalesce(pfns));
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(rounds as f64 * len as f64 / (1u64 << 30) as f64 / secs)
}
