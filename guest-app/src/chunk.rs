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
use io_uring::IoUring;
use memmap2::{MmapMut, MmapOptions};
use std::fs::File;

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

/// The guest's transparent huge page on x86-64 (the PMD size), and the host's usual huge page.
pub const HUGE_PAGE: u64 = 2 << 20;

/// How much of `len` to claim as one chunk: whole 2 MiB blocks when there is room for one, so
/// that the chunk can be made of huge pages; otherwise whole base pages.
pub fn claim_len(len: u64) -> u64 {
    if len >= HUGE_PAGE {
        len / HUGE_PAGE * HUGE_PAGE
    } else {
        len / PAGE * PAGE
    }
}

pub struct Chunk {
    /// The io_uring whose fixed buffer pins the pages; dropping it unpins them. Declared
    /// before `memory` so that it goes first: unpin, then unlock and unmap.
    pin: Option<IoUring>,
    memory: MmapMut,
    pub len: usize,
    pub ranges: Vec<PageRange>,
}

/// Pins `memory` by registering it as the one fixed buffer of a new io_uring.
fn pin(memory: &MmapMut) -> std::io::Result<IoUring> {
    let ring = IoUring::new(1)?;
    let iov = libc::iovec {
        iov_base: memory.as_ptr() as *mut libc::c_void,
        iov_len: memory.len(),
    };
    // SAFETY: the buffer is `memory`, which the Chunk keeps mapped for as long as the ring
    // (dropped first) lives. Unsafe in any crate: the kernel may write into the buffer.
    unsafe { ring.submitter().register_buffers(&[iov])? };
    Ok(ring)
}

impl Chunk {
    /// Claims `len` bytes from the guest OS, pins them and finds their PFNs.
    pub fn claim(len: usize, pagemap: &File) -> Result<Chunk, ChunkError> {
        // A fresh private anonymous mapping. Where the guest has transparent huge pages, ask
        // for them before the memory is faulted in (mlock does that): a huge page is 2 MiB of
        // physically contiguous, aligned guest memory, which a host on huge pages can take back
        // whole. (Linux aligns an anonymous mapping whose length is a multiple of 2 MiB to
        // 2 MiB; `claim_len` makes chunks such multiples.) Without THP the advice is refused
        // and base pages do.
        let mut memory = MmapOptions::new()
            .len(len)
            .map_anon()
            .map_err(ChunkError::NoMemory)?;
        if len as u64 >= HUGE_PAGE {
            if let Err(e) = memory.advise(memmap2::Advice::HugePage) {
                log::debug!("no transparent huge pages for the balloon: {e}");
            }
        }
        memory.lock().map_err(ChunkError::NoMemory)?;
        // Make sure every page is really there and the app's own (mlock faults them in; a write
        // leaves no page shared with the zero page).
        for page in memory.chunks_mut(PAGE as usize) {
            page[0] = 0xba;
        }
        let ring = pin(&memory).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOMEM) | Some(libc::EAGAIN) => ChunkError::NoMemory(e),
            _ => ChunkError::Pin(e),
        })?;
        let mut chunk = Chunk {
            pin: Some(ring),
            memory,
            len,
            ranges: Vec::new(),
        };
        let pfns = pagemap::pfns(pagemap, chunk.addr(), len / PAGE as usize)?;
        chunk.ranges = pagemap::coalesce(pfns);
        Ok(chunk)
    }

    fn addr(&self) -> u64 {
        self.memory.as_ptr() as u64
    }

    /// Re-reads the PFNs (to check that nothing moved).
    pub fn current_pfns(&self, pagemap: &File) -> Result<Vec<u64>, ChunkError> {
        Ok(pagemap::pfns(
            pagemap,
            self.addr(),
            self.len / PAGE as usize,
        )?)
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // Unpin first; then the mapping goes (munmap also unlocks): the guest gets the pages
        // back.
        self.pin = None;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_whole_huge_pages_when_they_can_be() {
        assert_eq!(claim_len(64 << 20), 64 << 20);
        assert_eq!(claim_len((5 << 20) + 4096), 4 << 20);
        assert_eq!(claim_len(HUGE_PAGE - 1), HUGE_PAGE - PAGE);
        assert_eq!(claim_len(PAGE + 1), PAGE);
        assert_eq!(claim_len(100), 0);
    }
}
