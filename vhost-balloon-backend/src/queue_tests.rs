//! Every queue handler on virtio-queue's mock rings, over a memfd-backed guest memory mapped the
//! way vhost-user maps it, so discards are real: the memfd's allocated size shows what left.
//! Rings and buffers live in the first MiB; the pages the tests balloon are above 8 MiB.

use crate::balloon::{drain_queue, request_stats, Balloon};
use crate::device::features::{
    bit, FeatureChoice, MUST_TELL_HOST, REPORTING, STATS_VQ, VIRTIO_F_VERSION_1,
};
use crate::vhu_balloon::regions_of;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::MetadataExt;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;
const RAM: u64 = 16 * MIB;
const PAGE: u64 = 4096;
/// Where the tests put PFN arrays and statistics buffers.
const BUF: u64 = 0x8_0000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

struct Guest {
    file: File,
    mem: GuestMemoryMmap<()>,
}

impl Guest {
    fn new() -> Self {
        // SAFETY: memfd_create and ftruncate on a descriptor we then own.
        let file = unsafe {
            let fd = libc::memfd_create(c"queue-test".as_ptr(), 0);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, RAM as i64), 0);
            File::from_raw_fd(fd)
        };
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            RAM as usize,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        // Touch every page so that discards show in the allocated size.
        for off in (0..RAM).step_by(PAGE as usize) {
            mem.write_obj(1u8, GuestAddress(off)).unwrap();
        }
        Guest { file, mem }
    }

    fn allocated(&self) -> u64 {
        self.file.metadata().unwrap().blocks() * 512
    }

    fn balloon(&self, acked: u64) -> Balloon {
        let mut b = Balloon::new(FeatureChoice::default(), None);
        b.memory.replace_regions(regions_of(&self.mem));
        b.set_acked_features(acked | bit(VIRTIO_F_VERSION_1));
        b
    }

    fn write_pfns(&self, at: u64, pfns: &[u32]) -> u32 {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        bytes.len() as u32
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// Puts `chains` (each a list of descriptors) on a fresh queue and drains it as queue `index`.
/// Returns how many chains came back and the used ring's index.
fn run(
    guest: &Guest,
    balloon: &mut Balloon,
    index: usize,
    chains: &[Vec<(u64, u32, u16)>],
) -> (usize, u16) {
    let vq = MockSplitQueue::new(&guest.mem, 64);
    let mut table = Vec::new();
    for chain in chains {
        let base = table.len() as u16;
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            let flags = if last { flags } else { flags | F_NEXT };
            table.push(desc(
                addr,
                len,
                flags,
                if last { 0 } else { base + i as u16 + 1 },
            ));
        }
    }
    vq.add_desc_chains(&table, 0).unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    let used = drain_queue(balloon, index, &mut queue, &guest.mem).unwrap();
    (used, vq.used().idx().load())
}

const INFLATE: usize = 0;
const DEFLATE: usize = 1;

#[test]
fn inflate_discards_contiguous_and_scattered_pages_and_returns_the_buffer() {
    let g = Guest::new();
    let mut b = g.balloon(0);
    let before = g.allocated();
    let contiguous: Vec<u32> = (2048..2048 + 256).collect(); // 8 MiB..9 MiB
    let len = g.write_pfns(BUF, &contiguous);
    assert_eq!(run(&g, &mut b, INFLATE, &[vec![(BUF, len, 0)]]), (1, 1));
    assert_eq!(before - g.allocated(), 256 * PAGE);
    let scattered: Vec<u32> = (0..256).map(|i| 2560 + 3 * i).collect();
    let len = g.write_pfns(BUF, &scattered);
    run(&g, &mut b, INFLATE, &[vec![(BUF, len, 0)]]);
    assert_eq!(before - g.allocated(), 512 * PAGE);
    let s = b.status();
    assert_eq!(s.ballooned_bytes, 512 * PAGE);
    assert_eq!(s.reclaimed_bytes, 512 * PAGE);
    assert_eq!(s.rejected, Default::default());
    // Only the named pages: the neighbours of the scattered ones keep their data.
    assert_eq!(g.mem.read_obj::<u8>(GuestAddress(2561 * PAGE)).unwrap(), 1);
    assert_eq!(g.mem.read_obj::<u8>(GuestAddress(2560 * PAGE)).unwrap(), 0);
}

#[test]
fn a_repeated_pfn_counts_once_and_deflate_only_updates_tracking() {
    let g = Guest::new();
    let mut b = g.balloon(0);
    let len = g.write_pfns(BUF, &[3000, 3000, 3001, 3000]);
    run(&g, &mut b, INFLATE, &[vec![(BUF, len, 0)]]);
    assert_eq!(b.status().ballooned_bytes, 2 * PAGE);
    let after_inflate = g.allocated();
    let len = g.write_pfns(BUF, &[3000, 3000]);
    assert_eq!(run(&g, &mut b, DEFLATE, &[vec![(BUF, len, 0)]]).0, 1);
    assert_eq!(b.status().ballooned_bytes, PAGE);
    assert_eq!(g.allocated(), after_inflate, "deflate discards nothing");
}

#[test]
fn pfns_outside_guest_ram_are_counted_and_never_discarded() {
    let g = Guest::new();
    let mut b = g.balloon(0);
    let before = g.allocated();
    let ram_pages = (RAM / PAGE) as u32;
    let len = g.write_pfns(BUF, &[ram_pages, ram_pages + 1, u32::MAX, 2100]);
    assert_eq!(run(&g, &mut b, INFLATE, &[vec![(BUF, len, 0)]]).0, 1);
    assert_eq!(before - g.allocated(), PAGE);
    let s = b.status();
    assert_eq!(s.rejected.pages_outside_ram, 3);
    assert_eq!(s.ballooned_bytes, PAGE);
}

#[test]
fn device_writable_descriptors_on_the_inflate_queue_are_refused() {
    let g = Guest::new();
    let mut b = g.balloon(0);
    let before = g.allocated();
    let len = g.write_pfns(BUF, &[2200, 2201]);
    // The chain still comes back, so a confused driver does not hang.
    assert_eq!(run(&g, &mut b, INFLATE, &[vec![(BUF, len, F_WRITE)]]).0, 1);
    assert_eq!(g.allocated(), before);
    assert_eq!(b.status().rejected.bad_descriptors, 1);
    assert_eq!(b.status().ballooned_bytes, 0);
}

#[test]
fn odd_sized_buffers_keep_their_whole_pfns() {
    let g = Guest::new();
    let mut b = g.balloon(0);
    let len = g.write_pfns(BUF, &[2300, 2301]);
    run(&g, &mut b, INFLATE, &[vec![(BUF, len + 3, 0)]]);
    let s = b.status();
    assert_eq!(s.rejected.bad_descriptors, 1);
    assert_eq!(s.ballooned_bytes, 2 * PAGE, "the two whole PFNs count");
}

#[test]
fn descriptors_outside_guest_memory_are_counted_bad() {
    let g = Guest::new();
    let mut b = g.balloon(0);
    let before = g.allocated();
    assert_eq!(run(&g, &mut b, INFLATE, &[vec![(RAM + MIB, 1024, 0)]]).0, 1);
    assert_eq!(b.status().rejected.bad_descriptors, 1);
    assert_eq!(g.allocated(), before);
}

#[test]
fn long_chains_and_several_chains_are_handled() {
    let g = Guest::new();
    let mut b = g.balloon(0);
    // One chain of 16 descriptors of 4 PFNs each, then a second chain.
    let mut chain = Vec::new();
    for d in 0..16u64 {
        let pfns: Vec<u32> = (0..4).map(|i| 2400 + (d * 4 + i) as u32).collect();
        let len = g.write_pfns(BUF + d * 64, &pfns);
        chain.push((BUF + d * 64, len, 0));
    }
    let len = g.write_pfns(BUF + 0x1_0000, &[2500]);
    assert_eq!(
        run(
            &g,
            &mut b,
            INFLATE,
            &[chain, vec![(BUF + 0x1_0000, len, 0)]]
        ),
        (2, 2)
    );
    assert_eq!(b.status().ballooned_bytes, 65 * PAGE);
}

#[test]
fn statistics_are_parsed_and_held_until_fresh_ones_are_wanted() {
    let g = Guest::new();
    let mut b = g.balloon(bit(STATS_VQ));
    let stats_queue = 2;
    let mut buf = Vec::new();
    for (tag, value) in [(4u16, 111u64 << 20), (6, 222 << 20), (77, 5)] {
        buf.extend_from_slice(&tag.to_le_bytes());
        buf.extend_from_slice(&value.to_le_bytes());
    }
    g.mem.write_slice(&buf, GuestAddress(BUF)).unwrap();
    let vq = MockSplitQueue::new(&g.mem, 64);
    vq.add_desc_chains(&[desc(BUF, buf.len() as u32, 0, 0)], 0)
        .unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    assert_eq!(
        drain_queue(&mut b, stats_queue, &mut queue, &g.mem).unwrap(),
        0
    );
    assert_eq!(vq.used().idx().load(), 0, "held, not returned");
    let s = b.status().stats.unwrap();
    assert_eq!(s.values["free_memory"], 111 << 20);
    assert_eq!(s.values["available_memory"], 222 << 20);
    assert_eq!(s.unknown[&77], 5);
    // The timer asks for fresh figures by returning the buffer.
    assert!(request_stats(&mut b, &mut queue, &g.mem).unwrap());
    assert_eq!(vq.used().idx().load(), 1);
    assert!(
        !request_stats(&mut b, &mut queue, &g.mem).unwrap(),
        "nothing held now"
    );
}

#[test]
fn a_second_stats_buffer_returns_the_first_and_garbage_is_counted() {
    let g = Guest::new();
    let mut b = g.balloon(bit(STATS_VQ));
    g.mem.write_slice(&[1u8; 13], GuestAddress(BUF)).unwrap();
    // Two buffers, the second 13 bytes (not a whole number of 10-byte entries).
    let (used, idx) = run(&g, &mut b, 2, &[vec![(BUF, 10, 0)], vec![(BUF, 13, 0)]]);
    assert_eq!((used, idx), (1, 1), "the older buffer went back");
    assert_eq!(b.status().rejected.bad_stats, 1);
}

#[test]
fn free_page_reports_discard_writable_ranges_and_refuse_the_rest() {
    let g = Guest::new();
    // Reporting alone: the driver numbers it queue 2 (indices compact over features).
    let mut b = g.balloon(bit(REPORTING));
    let before = g.allocated();
    let (used, _) = run(
        &g,
        &mut b,
        2,
        &[vec![
            (10 * MIB, MIB as u32, F_WRITE),      // 1 MiB free: discarded
            (12 * MIB, MIB as u32, 0),            // device-readable: refused
            (RAM - MIB, 2 * MIB as u32, F_WRITE), // half outside RAM: only the inside half
        ]],
    );
    assert_eq!(used, 1);
    assert_eq!(before - g.allocated(), 2 * MIB);
    let s = b.status();
    assert_eq!(s.reported_free_bytes, 2 * MIB);
    assert_eq!(s.rejected.bad_descriptors, 1);
    assert_eq!(s.rejected.pages_outside_ram, MIB / PAGE);
    assert_eq!(s.ballooned_bytes, 0, "reported pages are not ballooned");
}

#[test]
fn a_queue_without_meaning_gets_its_buffers_back_unread() {
    let g = Guest::new();
    // No optional features: only queues 0 and 1 mean something.
    let mut b = g.balloon(0);
    let before = g.allocated();
    let len = g.write_pfns(BUF, &[2600]);
    assert_eq!(run(&g, &mut b, 3, &[vec![(BUF, len, 0)]]), (1, 1));
    assert_eq!(g.allocated(), before);
    assert_eq!(b.status().rejected.bad_descriptors, 1);
}

#[test]
fn a_broken_avail_ring_is_an_error_not_a_panic() {
    let g = Guest::new();
    let mut b = g.balloon(0);
    let vq = MockSplitQueue::new(&g.mem, 16);
    // An avail index far beyond the queue size.
    vq.avail().idx().store(u16::to_le(500));
    let mut queue: Queue = vq.create_queue().unwrap();
    assert!(drain_queue(&mut b, INFLATE, &mut queue, &g.mem).is_err());
}

#[test]
fn with_discards_off_pages_are_tracked_and_returned_when_switched_on() {
    let g = Guest::new();
    let mut b = g.balloon(bit(MUST_TELL_HOST));
    b.set_discard(false).unwrap();
    let before = g.allocated();
    let pfns: Vec<u32> = (2700..2700 + 64).collect();
    let len = g.write_pfns(BUF, &pfns);
    run(&g, &mut b, INFLATE, &[vec![(BUF, len, 0)]]);
    assert_eq!(g.allocated(), before);
    assert_eq!(b.status().ballooned_bytes, 64 * PAGE);
    b.set_discard(true).unwrap();
    assert_eq!(before - g.allocated(), 64 * PAGE);
}
