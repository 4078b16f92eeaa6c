//! Physical page frame numbers of this process's pages, from /proc/self/pagemap: one u64 per
//! virtual page, bit 63 "present", bits 0-54 the PFN (reads as 0 without CAP_SYS_ADMIN).

use balloon_protocol::app::PageRange;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// The page the app protocol counts in (4 KiB), which must be this guest's page: pagemap has
/// one entry per system page and its PFNs count system pages (see `pfns`).
pub const PAGE: u64 = balloon_protocol::PAGE_SIZE;
const PRESENT: u64 = 1 << 63;
const PFN_MASK: u64 = (1 << 55) - 1;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PagemapError {
    #[error("reading /proc/self/pagemap: {0}")]
    Read(String),
    #[error("page at {0:#x} is not present")]
    NotPresent(u64),
    #[error("pagemap shows PFN 0: the process lacks CAP_SYS_ADMIN")]
    Hidden,
    #[error("this guest's pages are {0} bytes; the app protocol counts 4 KiB pages")]
    PageSize(u64),
}

/// The PFN in one pagemap entry.
pub fn entry_pfn(entry: u64, vaddr: u64) -> Result<u64, PagemapError> {
    if entry & PRESENT == 0 {
        return Err(PagemapError::NotPresent(vaddr));
    }
    match entry & PFN_MASK {
        0 => Err(PagemapError::Hidden),
        pfn => Ok(pfn),
    }
}

/// The PFNs of `pages` pages from `vaddr` (page aligned), in address order.
pub fn pfns(pagemap: &File, vaddr: u64, pages: usize) -> Result<Vec<u64>, PagemapError> {
    let system_page = rustix::param::page_size() as u64;
    if system_page != PAGE {
        return Err(PagemapError::PageSize(system_page));
    }
    let mut raw = vec![0u8; pages * 8];
    pagemap
        .read_exact_at(&mut raw, vaddr / PAGE * 8)
        .map_err(|e| PagemapError::Read(e.to_string()))?;
    raw.chunks_exact(8)
        .enumerate()
        .map(|(i, b)| {
            let mut e = [0u8; 8];
            e.copy_from_slice(b);
            entry_pfn(u64::from_le_bytes(e), vaddr + i as u64 * PAGE)
        })
        .collect()
}

/// Sorted, merged ranges of consecutive PFNs.
pub fn coalesce(mut pfns: Vec<u64>) -> Vec<PageRange> {
    pfns.sort_unstable();
    pfns.dedup();
    let mut out: Vec<PageRange> = Vec::new();
    for p in pfns {
        match out.last_mut() {
            Some(r) if r.start + r.count == p => r.count += 1,
            _ => out.push(PageRange { start: p, count: 1 }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries() {
        assert_eq!(entry_pfn(PRESENT | 1234, 0), Ok(1234));
        assert_eq!(
            entry_pfn(1234, 0x1000),
            Err(PagemapError::NotPresent(0x1000))
        );
        assert_eq!(entry_pfn(PRESENT, 0), Err(PagemapError::Hidden));
        // Soft-dirty and exclusive bits (55, 56) are not part of the PFN.
        assert_eq!(entry_pfn(PRESENT | (3 << 55) | 7, 0), Ok(7));
    }

    #[test]
    fn coalescing() {
        let r = coalesce(vec![10, 11, 12, 3, 4, 11, 20]);
        assert_eq!(
            r,
            vec![
                PageRange { start: 3, count: 2 },
                PageRange {
                    start: 10,
                    count: 3
                },
                PageRange {
                    start: 20,
                    count: 1
                }
            ]
        );
        assert!(coalesce(vec![]).is_empty());
    }

    #[test]
    fn own_pages_have_pfns_when_privileged() {
        let f = File::open("/proc/self/pagemap").unwrap();
        let v = vec![1u8; 8192];
        let addr = v.as_ptr() as u64 & !(PAGE - 1);
        match pfns(&f, addr, 1) {
            Ok(p) => assert!(p[0] > 0),
            Err(PagemapError::Hidden) => {} // unprivileged test runs see zeros
            Err(e) => panic!("{e}"),
        }
    }
}
