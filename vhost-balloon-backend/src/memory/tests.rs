//! Tests on real shared memory: a memfd mapped here stands for guest RAM, and its allocated
//! blocks show what really left.

use super::*;
use crate::testing::MemfdRam;

const MIB: u64 = 1 << 20;

/// A memfd of `len` bytes mapped shared (the crate's test RAM), every page allocated and
/// holding 0xa5 at its first byte.
pub(crate) struct TestRam {
    ram: MemfdRam,
}

impl TestRam {
    pub fn new(len: u64) -> Self {
        let ram = MemfdRam::new(len).expect("test RAM");
        ram.mark_pages(0xa5);
        TestRam { ram }
    }
}

impl std::ops::Deref for TestRam {
    type Target = MemfdRam;

    fn deref(&self) -> &MemfdRam {
        &self.ram
    }
}

fn r(start: u64, count: u64) -> PfnRange {
    PfnRange { start, count }
}

/// Two regions, as QEMU lays out RAM around the PCI hole: 8 MiB at 0 and 8 MiB at 4 GiB,
/// backed by one 16 MiB memfd.
fn two_regions() -> (TestRam, GuestMemoryMap) {
    let ram = TestRam::new(16 * MIB);
    let mut map = GuestMemoryMap::default();
    map.replace_regions(vec![
        ram.region(4 << 30, 8 * MIB, 8 * MIB, PAGE_SIZE),
        ram.region(0, 0, 8 * MIB, PAGE_SIZE),
    ]);
    (ram, map)
}

#[test]
fn inflate_discards_exactly_the_named_pages() {
    let (ram, mut map) = two_regions();
    assert_eq!(ram.allocated(), 16 * MIB);
    // 1 MiB in the low region and 1 MiB in the high one.
    let high = (4u64 << 30) / PAGE_SIZE;
    let out = map.inflate(&[r(256, 256), r(high + 512, 256)], DiscardMode::Now);
    assert_eq!(out.changed_pages, 512);
    assert_eq!(out.outside_pages, 0);
    assert_eq!(out.discarded_bytes, 2 * MIB);
    assert_eq!(out.discard_calls, 2);
    assert_eq!(ram.allocated(), 14 * MIB);
    // Discarded pages read as zeros; their neighbours keep their data.
    assert_eq!(ram.byte(MIB), 0);
    assert_eq!(ram.byte(MIB - PAGE_SIZE), 0xa5);
    assert_eq!(ram.byte(2 * MIB), 0xa5);
    assert_eq!(ram.byte(8 * MIB + 2 * MIB), 0);
    assert_eq!(ram.byte(8 * MIB + 2 * MIB - PAGE_SIZE), 0xa5);
    assert_eq!(ram.byte(8 * MIB + 3 * MIB), 0xa5);
    assert_eq!(ram.byte(8 * MIB + 3 * MIB - PAGE_SIZE), 0);
    assert_eq!(map.ballooned_pages(), 512);
}

#[test]
fn pages_outside_ram_are_counted_and_never_discarded() {
    let (ram, mut map) = two_regions();
    let high_end = (4u64 << 30) / PAGE_SIZE + 2048;
    // Straddles the end of the low region into the hole; then entirely in the hole; then past
    // the end of RAM; then the largest PFN a driver can name.
    let out = map.inflate(
        &[
            r(2040, 16),
            r(10_000, 5),
            r(high_end - 1, 3),
            r(u32::MAX as u64, 1),
        ],
        DiscardMode::Now,
    );
    assert_eq!(out.changed_pages, 8 + 1);
    assert_eq!(out.outside_pages, 8 + 5 + 2 + 1);
    assert_eq!(out.discarded_bytes, 9 * PAGE_SIZE);
    assert_eq!(ram.allocated(), 16 * MIB - 9 * PAGE_SIZE);
    let out = map.deflate(&[r(10_000, 5)]);
    assert_eq!((out.changed_pages, out.outside_pages), (0, 5));
}

#[test]
fn repeats_are_harmless_and_deflate_releases() {
    let (_ram, mut map) = two_regions();
    assert_eq!(map.inflate(&[r(0, 10)], DiscardMode::Now).changed_pages, 10);
    assert_eq!(map.inflate(&[r(5, 10)], DiscardMode::Now).changed_pages, 5);
    assert_eq!(map.ballooned_pages(), 15);
    let out = map.deflate(&[r(0, 3), r(0, 3), r(100, 1)]);
    assert_eq!(out.changed_pages, 3);
    assert_eq!(out.discarded_bytes, 0);
    assert_eq!(map.ballooned_pages(), 12);
}

#[test]
fn tracking_without_discard_and_catching_up_later() {
    let (ram, mut map) = two_regions();
    let out = map.inflate(&[r(0, 256)], DiscardMode::Off);
    assert_eq!((out.changed_pages, out.discarded_bytes), (256, 0));
    assert_eq!(ram.allocated(), 16 * MIB);
    let out = map.discard_all_ballooned(DiscardMode::Now);
    assert_eq!((out.changed_pages, out.discarded_bytes), (0, MIB));
    assert_eq!(ram.allocated(), 15 * MIB);
}

#[test]
fn free_reports_discard_without_tracking() {
    let (ram, mut map) = two_regions();
    let out = map.discard_free(&[r(1024, 1024)]);
    assert_eq!(out.discarded_bytes, 4 * MIB);
    assert_eq!(map.ballooned_pages(), 0);
    assert_eq!(ram.allocated(), 12 * MIB);
}

#[test]
fn huge_host_pages_are_discarded_only_whole() {
    // Pretend the host pages are 2 MiB (as on hugetlbfs); the memfd still punches what it is
    // told, so the allocated size shows which spans were chosen.
    let ram = TestRam::new(8 * MIB);
    let mut map = GuestMemoryMap::default();
    map.replace_regions(vec![ram.region(0, 0, 8 * MIB, 2 * MIB)]);
    let per_hp = 2 * MIB / PAGE_SIZE;
    // Half a host page: tracked, nothing discarded.
    let out = map.inflate(&[r(0, per_hp / 2)], DiscardMode::Now);
    assert_eq!((out.changed_pages, out.discarded_bytes), (per_hp / 2, 0));
    // The other half completes it: the whole host page goes.
    let out = map.inflate(&[r(per_hp / 2, per_hp / 2)], DiscardMode::Now);
    assert_eq!(out.discarded_bytes, 2 * MIB);
    assert_eq!(ram.allocated(), 6 * MIB);
    // A free report from the middle of host page 1 to the end of host page 2 frees only page 2.
    let out = map.discard_free(&[r(per_hp + 7, 2 * per_hp - 7)]);
    assert_eq!(out.discarded_bytes, 2 * MIB);
    assert_eq!(ram.allocated(), 4 * MIB);
}

#[test]
fn a_resent_memory_table_keeps_the_accounting() {
    let (ram, mut map) = two_regions();
    map.inflate(&[r(0, 100)], DiscardMode::Now);
    map.replace_regions(vec![
        ram.region(0, 0, 8 * MIB, PAGE_SIZE),
        ram.region(4 << 30, 8 * MIB, 8 * MIB, PAGE_SIZE),
    ]);
    assert_eq!(map.ballooned_pages(), 100);
    assert_eq!(map.ram_bytes(), 16 * MIB);
}
