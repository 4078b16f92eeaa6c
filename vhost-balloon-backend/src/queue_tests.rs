//! Every queue handler on virtio-queue's mock rings, over a memfd-backed guest memory mapped the
//! way vhost-user maps it (regions built by the same `regions_of` that `update_memory` uses), so
//! discards are real: the memfd's allocated size shows what left.
//!
//! Guest RAM is laid out as QEMU lays it out around the PCI hole: 16 MiB at 0 and 4 MiB at 4 GiB,
//! both in one memfd. Rings live at the bottom of RAM and buffers below 1 MiB; the pages the tests
//! balloon are above 8 MiB and in the high region, so no test discards its own rings or buffers.

use crate::balloon::{drain_queue, request_stats, Balloon, BalloonError};
use crate::device::features::{
    bit, FeatureChoice, MUST_TELL_HOST, REPORTING, STATS_VQ, VIRTIO_F_VERSION_1,
};
use crate::memory::worker::DiscardWorker;
use crate::testing::MemfdRam;
use crate::vhu_balloon::regions_of;
use std::sync::Arc;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// The low region: guest addresses [0, 16 MiB), memfd offset 0.
const LOW: u64 = 16 * MIB;
/// The high region: guest addresses [4 GiB, 4 GiB + 4 MiB), memfd offset 16 MiB.
const HIGH_GPA: u64 = 4 << 30;
const HIGH: u64 = 4 * MIB;
const HIGH_PFN: u32 = (HIGH_GPA / PAGE) as u32;
/// Bytes below this hold rings (and indirect tables); they are zeroed at start.
const RING_AREA: u64 = 256 * KIB;
/// Where the tests put PFN arrays and statistics buffers.
const BUF: u64 = 0x8_0000;
/// What every page of guest RAM holds at its first byte until it is discarded.
const MARK: u8 = 0xa5;

const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

const INFLATE: usize = 0;
const DEFLATE: usize = 1;

/// A guest's RAM: one memfd (the crate's test RAM), mapped again as vhost-user maps it.
struct Guest {
    ram: MemfdRam,
    mem: Mem,
}

impl Guest {
    fn new() -> Self {
        let ram = MemfdRam::new(LOW + HIGH).unwrap();
        let mem = ram
            .guest_memory(&[(0, 0, LOW), (HIGH_GPA, LOW, HIGH)])
            .unwrap();
        // Every page allocated and marked, so discards show in the allocated size and in the
        // data; the ring area starts zeroed (still allocated).
        ram.mark_pages(MARK);
        mem.write_slice(&vec![0u8; RING_AREA as usize], GuestAddress(0))
            .unwrap();
        let g = Guest { ram, mem };
        assert_eq!(g.allocated(), LOW + HIGH);
        g
    }

    fn allocated(&self) -> u64 {
        self.ram.allocated()
    }

    /// The first byte of guest page `pfn`: `MARK` while it holds data, 0 once discarded.
    fn first_byte(&self, pfn: u32) -> u8 {
        self.mem
            .read_obj(GuestAddress(u64::from(pfn) * PAGE))
            .unwrap()
    }

    /// A device as production builds it once the driver acknowledged `acked` (plus VERSION_1)
    /// and the frontend sent this memory table.
    fn balloon(&self, acked: u64) -> Balloon {
        let mut b = Balloon::new(FeatureChoice::default(), None);
        b.memory.replace_regions(regions_of(&self.mem));
        b.set_acked_features(acked | bit(VIRTIO_F_VERSION_1));
        assert!(b.device_started());
        assert_eq!(b.status().guest_ram_bytes, LOW + HIGH);
        b
    }

    /// A device with MUST_TELL_HOST, discarding through a worker the test runs by hand.
    fn balloon_with_worker(&self) -> (Balloon, Arc<DiscardWorker>) {
        let worker = Arc::new(DiscardWorker::new());
        let b = self
            .balloon(bit(MUST_TELL_HOST))
            .with_discard_worker(worker.clone());
        (b, worker)
    }

    /// Writes `pfns` as the driver does (little-endian u32s); returns their length in bytes.
    fn write_pfns(&self, at: u64, pfns: &[u32]) -> u32 {
        let bytes = pfn_bytes(pfns);
        self.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        bytes.len() as u32
    }
}

fn pfn_bytes(pfns: &[u32]) -> Vec<u8> {
    pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
}

fn stats_bytes(entries: &[(u16, u64)]) -> Vec<u8> {
    let mut buf = Vec::new();
    for (tag, value) in entries {
        buf.extend_from_slice(&tag.to_le_bytes());
        buf.extend_from_slice(&value.to_le_bytes());
    }
    buf
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// One virtqueue as the driver sees it (a mock split ring at guest address 0) and as the device
/// sees it (a `Queue` set up from it).
struct Ring<'m> {
    mem: &'m Mem,
    vq: MockSplitQueue<'m, Mem>,
    queue: Queue,
    next_desc: u16,
}

impl<'m> Ring<'m> {
    fn new(g: &'m Guest, size: u16) -> Self {
        let vq = MockSplitQueue::new(&g.mem, size);
        assert!(vq.end().0 <= RING_AREA);
        let queue = vq.create_queue().unwrap();
        Ring {
            mem: &g.mem,
            vq,
            queue,
            next_desc: 0,
        }
    }

    /// Makes a chain of `(addr, len, flags)` descriptors available (NEXT links added); returns
    /// its head.
    fn add(&mut self, chain: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        let descs: Vec<RawDescriptor> = chain
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                if i + 1 == chain.len() {
                    desc(addr, len, flags, 0)
                } else {
                    desc(addr, len, flags | F_NEXT, head + i as u16 + 1)
                }
            })
            .collect();
        self.vq.add_desc_chains(&descs, head).unwrap();
        self.next_desc += chain.len() as u16;
        head
    }

    /// Makes a chain available whose head is an indirect descriptor pointing at a table (built
    /// at `table`) of `chain`'s descriptors; returns the head.
    fn add_indirect(&mut self, table: u64, chain: &[(u64, u32, u16)]) -> u16 {
        assert!(table + 16 * chain.len() as u64 <= RING_AREA);
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let d = if i + 1 == chain.len() {
                desc(addr, len, flags, 0)
            } else {
                desc(addr, len, flags | F_NEXT, i as u16 + 1)
            };
            self.mem
                .write_obj(d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        self.add(&[(table, 16 * chain.len() as u32, F_INDIRECT)])
    }

    /// Writes a statistics buffer (`some_stats(free)`) at `BUF` and makes it available, as the
    /// driver posts its only one; returns its head.
    fn add_stats(&mut self, free: u64) -> u16 {
        let buf = some_stats(free);
        self.mem.write_slice(&buf, GuestAddress(BUF)).unwrap();
        self.add(&[(BUF, buf.len() as u32, 0)])
    }

    fn drain(&mut self, b: &mut Balloon, index: usize) -> Result<usize, BalloonError> {
        drain_queue(b, index, &mut self.queue, self.mem)
    }

    fn request_stats(&mut self, b: &mut Balloon) -> bool {
        request_stats(b, &mut self.queue, self.mem).unwrap()
    }

    /// The used ring as the driver reads it: (head, written length) in order.
    fn used(&self) -> Vec<(u32, u32)> {
        let n = self.vq.used().idx().load();
        (0..n)
            .map(|i| {
                let e = self.vq.used().ring().ref_at(usize::from(i)).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }
}

/// Puts one single-descriptor PFN buffer (at `BUF`) on a fresh queue and drains it as queue
/// `index`; returns the used ring, which must hold just that buffer.
fn send_pfns(g: &Guest, b: &mut Balloon, index: usize, pfns: &[u32]) {
    let len = g.write_pfns(BUF, pfns);
    let mut ring = Ring::new(g, 64);
    let head = ring.add(&[(BUF, len, 0)]);
    assert_eq!(ring.drain(b, index).unwrap(), 1);
    assert_eq!(ring.used(), vec![(u32::from(head), 0)]);
}

#[test]
fn inflate_discards_contiguous_and_scattered_pages_and_returns_the_buffer() {
    let g = Guest::new();
    let mut b = g.balloon(0);
    let full = g.allocated();

    // 256 contiguous PFNs (1 MiB at 8 MiB), as Linux sends them.
    let contiguous: Vec<u32> = (2048..2048 + 256).collect();
    let mut ring = Ring::new(&g, 64);
    let len = g.write_pfns(BUF, &contiguous);
    let head = ring.add(&[(BUF, len, 0)]);
    assert_eq!(ring.drain(&mut b, INFLATE).unwrap(), 1);
    assert_eq!(ring.used(), vec![(u32::from(head), 0)]);
    assert_eq!(full - g.allocated(), 256 * PAGE);

    // 256 scattered PFNs in both regions, out of order: every third page from 10 MiB and every
    // other page of the high region.
    let mut scattered: Vec<u32> = (0..128).map(|i| 2560 + 3 * i).collect();
    scattered.extend((0..128).map(|i| HIGH_PFN + 2 * i));
    scattered.reverse();
    let len = g.write_pfns(BUF + 4 * KIB, &scattered);
    let head2 = ring.add(&[(BUF + 4 * KIB, len, 0)]);
    assert_eq!(ring.drain(&mut b, INFLATE).unwrap(), 1);
    assert_eq!(
        ring.used(),
        vec![(u32::from(head), 0), (u32::from(head2), 0)]
    );
    assert_eq!(full - g.allocated(), 512 * PAGE);

    // Exactly the named pages: they read as zeros, their neighbours keep their data.
    for &pfn in contiguous.iter().chain(&scattered) {
        assert_eq!(g.first_byte(pfn), 0, "pfn {pfn}");
    }
    for pfn in [2047, 2048 + 256, 2561, 2562, HIGH_PFN + 1, HIGH_PFN + 255] {
        assert_eq!(g.first_byte(pfn), MARK, "pfn {pfn}");
    }
    let s = b.status();
    assert_eq!(s.ballooned_bytes, 512 * PAGE);
    assert_eq!(
        s.actual_bytes,
        512 * PAGE,
        "from tracking: no config writes"
    );
    assert_eq!(s.reclaimed_bytes, 512 * PAGE);
    assert_eq!(s.discard_errors, 0);
    assert_eq!(s.rejected, Default::default());
    assert_eq!(b.counters.inflate_chains, 2);
}

/// The driver's word for its balloon is never the balloon: a guest kernel that writes
/// `actual = u32::MAX` (16 TiB) after inflating 1 MiB has a 1 MiB balloon, and a lasting gap is a
/// dispute (the status flags it), which ends when the word agrees with the pages again.
#[test]
fn the_balloon_is_the_pages_handed_over_whatever_the_driver_writes() {
    use crate::balloon::claim::GRACE;
    use std::time::{Duration, Instant};
    let g = Guest::new();
    let mut b = g.balloon(0);
    let pages: Vec<u32> = (3000..3000 + 256).collect();
    send_pfns(&g, &mut b, INFLATE, &pages);
    b.write_config(4, &u32::MAX.to_le_bytes());
    let s = b.status();
    assert_eq!(s.actual_bytes, 256 * PAGE);
    assert_eq!(s.driver_actual_bytes, Some(u64::from(u32::MAX) * PAGE));
    assert!(!s.driver_claim_disputed, "not before the grace");
    b.check_claim(Instant::now() + GRACE + Duration::from_secs(1));
    let s = b.status();
    assert!(s.driver_claim_disputed);
    assert_eq!(s.actual_bytes, 256 * PAGE);
    // The other way: claiming none while holding 256 pages is a dispute too, and the balloon
    // is still the 256 pages.
    b.write_config(4, &0u32.to_le_bytes());
    assert_eq!(b.status().actual_bytes, 256 * PAGE);
    b.write_config(4, &256u32.to_le_bytes());
    assert!(!b.status().driver_claim_disputed);
}

#[test]
fn deflate_clears_tracking_and_discards_nothing() {
    let g = Guest::new();
    let mut b = g.balloon(0);
    let full = g.allocated();
    let pages: Vec<u32> = (3000..3000 + 256).collect();
    send_pfns(&g, &mut b, INFLATE, &pages);
    let after_inflate = g.allocated();
    assert_eq!(full - after_inflate, 256 * PAGE);

    // Take back the first 100, plus pages that were never ballooned.
    let mut back: Vec<u32> = pages[..100].to_vec();
    back.extend([2000, 2001]);
    send_pfns(&g, &mut b, DEFLATE, &back);
    let s = b.status();
    assert_eq!(s.ballooned_bytes, 156 * PAGE);
    assert_eq!(g.allocated(), after_inflate, "deflate discards nothing");
    assert_eq!(g.first_byte(2000), MARK);
    assert_eq!(s.rejected, Default::default());
    assert_eq!(b.counters.deflate_chains, 1);

    // The guest uses the pages again; ballooning them again returns their memory again.
    for &pfn in &pages[..100] {
        g.mem
            .write_obj(7u8, GuestAddress(u64::from(pfn) * PAGE))
            .unwrap();
    }
    assert_eq!(full - g.allocated(), 156 * PAGE);
    send_pfns(&g, &mut b, INFLATE, &pages[..100]);
    assert_eq!(full - g.allocated(), 256 * PAGE);
    assert_eq!(b.status().ballooned_bytes, 256 * PAGE);
}

#[test]
fn a_repeated_pfn_counts_once() {
    let g = Guest::new();
    let mut b = g.balloon(0);
    let full = g.allocated();
    send_pfns(&g, &mut b, INFLATE, &[3000, 3000, 3001, 3000, 3001]);
    let s = b.status();
    assert_eq!(s.ballooned_bytes, 2 * PAGE);
    assert_eq!(s.reclaimed_bytes, 2 * PAGE);
    assert_eq!(full - g.allocated(), 2 * PAGE);
    send_pfns(&g, &mut b, DEFLATE, &[3000, 3000]);
    assert_eq!(b.status().ballooned_bytes, PAGE);
}

#[test]
fn pfns_outside_guest_ram_are_counted_and_never_discarded() {
    let g = Guest::new();
    let mut b = g.balloon(0);
    let full = g.allocated();
    let low_end = (LOW / PAGE) as u32;
    let high_end = HIGH_PFN + (HIGH / PAGE) as u32;
    // The first pages of the hole, its middle, its last page, past the end of RAM, the largest
    // PFN a driver can name.
    let outside = [
        low_end,
        low_end + 1,
        1 << 19,
        HIGH_PFN - 1,
        high_end,
        u32::MAX,
    ];
    send_pfns(&g, &mut b, INFLATE, &outside);
    assert_eq!(g.allocated(), full, "nothing discarded");
    let s = b.status();
    assert_eq!(s.rejected.pages_outside_ram, outside.len() as u64);
    assert_eq!(s.ballooned_bytes, 0);
    assert_eq!(s.reclaimed_bytes, 0);

    // The last page of each region is inside.
    send_pfns(&g, &mut b, INFLATE, &[low_end - 1, high_end - 1, high_end]);
    assert_eq!(full - g.allocated(), 2 * PAGE);
    let s = b.status();
    assert_eq!(s.rejected.pages_outside_ram, outside.len() as u64 + 1);
    assert_eq!(s.ballooned_bytes, 2 * PAGE);

    // Deflating pages outside RAM is counted too and changes nothing.
    send_pfns(&g, &mut b, DEFLATE, &[u32::MAX]);
    let s = b.status();
    assert_eq!(s.rejected.pages_outside_ram, outside.len() as u64 + 2);
    assert_eq!(s.ballooned_bytes, 2 * PAGE);
}

#[test]
fn device_writable_descriptors_on_the_inflate_queue_are_not_read() {
    let g = Guest::new();
    let mut b = g.balloon(0);
    let full = g.allocated();
    let readable = g.write_pfns(BUF, &[2200, 2201]);
    let writable = g.write_pfns(BUF + 64, &[2300, 2301]);
    let mut ring = Ring::new(&g, 64);
    let head = ring.add(&[(BUF, readable, 0), (BUF + 64, writable, F_WRITE)]);
    // The chain still comes back, so a confused driver does not hang.
    assert_eq!(ring.drain(&mut b, INFLATE).unwrap(), 1);
    assert_eq!(ring.used(), vec![(u32::from(head), 0)]);
    let s = b.status();
    assert_eq!(s.rejected.bad_descriptors, 1);
    assert_eq!(s.ballooned_bytes, 2 * PAGE);
    assert_eq!(full - g.allocated(), 2 * PAGE);
    assert_eq!(g.first_byte(2300), MARK);
    assert_eq!(g.first_byte(2301), MARK);
}

#[test]
fn a_length_not_a_multiple_of_4_is_counted_but_its_whole_pfns_are_used() {
    let g = Guest::new();
    let mut b = g.balloon(0);
    let full = g.allocated();
    let len = g.write_pfns(BUF, &[2300, 2301, 2302]);
    let mut ring = Ring::new(&g, 64);
    ring.add(&[(BUF, len - 1, 0)]);
    assert_eq!(ring.drain(&mut b, INFLATE).unwrap(), 1);
    let s = b.status();
    assert_eq!(s.rejected.bad_descriptors, 1);
    assert_eq!(s.ballooned_bytes, 2 * PAGE, "the two whole PFNs count");
    assert_eq!(full - g.allocated(), 2 * PAGE);
    assert_eq!(g.first_byte(2302), MARK);
}

#[test]
fn a_pfn_split_across_descriptors_is_read_as_one_buffer() {
    // A chain is one buffer, scattered: a PFN may straddle two descriptors.
    let g = Guest::new();
    let mut b = g.balloon(0);
    let full = g.allocated();
    let bytes = pfn_bytes(&[2400, 2401]);
    g.mem.write_slice(&bytes[..6], GuestAddress(BUF)).unwrap();
    g.mem
        .write_slice(&bytes[6..], GuestAddress(BUF + 1000))
        .unwrap();
    let mut ring = Ring::new(&g, 64);
    ring.add(&[(BUF, 6, 0), (BUF + 1000, 2, 0)]);
    assert_eq!(ring.drain(&mut b, INFLATE).unwrap(), 1);
    let s = b.status();
    assert_eq!(s.rejected, Default::default());
    assert_eq!(s.ballooned_bytes, 2 * PAGE);
    assert_eq!(full - g.allocated(), 2 * PAGE);
}

#[test]
fn descriptors_outside_guest_memory_are_counted_bad() {
    let g = Guest::new();
    let mut b = g.balloon(0);
    let full = g.allocated();
    // Whatever lies just below the end of the low region reads as PFN 2100 twice...
    g.write_pfns(LOW - 8, &[2100, 2100]);
    let good = g.write_pfns(BUF, &[2500]);
    let mut ring = Ring::new(&g, 64);
    let head = ring.add(&[
        (1 << 40, 1024, 0),   // far outside guest memory
        (LOW - 8, 16, 0),     // ...but this descriptor runs into the hole: none of it is used
        (HIGH_GPA - 4, 4, 0), // entirely in the hole
        (BUF, good, 0),       // a good descriptor in the same chain still counts
    ]);
    assert_eq!(ring.drain(&mut b, INFLATE).unwrap(), 1);
    assert_eq!(ring.used(), vec![(u32::from(head), 0)]);
    let s = b.status();
    assert_eq!(s.rejected.bad_descriptors, 3);
    assert_eq!(s.ballooned_bytes, PAGE);
    assert_eq!(full - g.allocated(), PAGE);
    assert_eq!(g.first_byte(2100), MARK);
    assert_eq!(g.first_byte(2500), 0);
}

#[test]
fn long_direct_and_indirect_chains_are_handled() {
    let g = Guest::new();
    let mut b = g.balloon(0);
    let full = g.allocated();
    let mut ring = Ring::new(&g, 256);
    // 200 descriptors of one PFN each, scattered through the buffer area.
    let direct: Vec<(u64, u32, u16)> = (0..200u32)
        .map(|i| {
            let at = BUF + u64::from(i) * 64;
            (at, g.write_pfns(at, &[2600 + i]), 0)
        })
        .collect();
    // 100 descriptors in an indirect table (INDIRECT_DESC is offered).
    let indirect: Vec<(u64, u32, u16)> = (0..100u32)
        .map(|i| {
            let at = BUF + 0x4_0000 + u64::from(i) * 64;
            (at, g.write_pfns(at, &[HIGH_PFN + 2 * i]), 0)
        })
        .collect();
    let h1 = ring.add(&direct);
    let h2 = ring.add_indirect(0x2_0000, &indirect);
    let h3 = ring.add(&[(BUF + 0x3_0000, g.write_pfns(BUF + 0x3_0000, &[2900]), 0)]);
    assert_eq!(ring.drain(&mut b, INFLATE).unwrap(), 3);
    assert_eq!(
        ring.used(),
        vec![(h1.into(), 0), (h2.into(), 0), (h3.into(), 0)]
    );
    let s = b.status();
    assert_eq!(s.rejected, Default::default());
    assert_eq!(s.ballooned_bytes, 301 * PAGE);
    assert_eq!(full - g.allocated(), 301 * PAGE);
    assert_eq!(g.first_byte(HIGH_PFN + 198), 0);
    assert_eq!(g.first_byte(HIGH_PFN + 199), MARK);
}

#[test]
fn a_chain_stops_being_read_at_the_per_chain_limit() {
    use crate::device::pfn::MAX_PFNS_PER_CHAIN;
    let g = Guest::new();
    let mut b = g.balloon(0);
    let full = g.allocated();
    // MAX_PFNS_PER_CHAIN repeats of one page, then one more page past the limit.
    let mut pfns = vec![2100; MAX_PFNS_PER_CHAIN];
    pfns.push(2101);
    let len = g.write_pfns(BUF, &pfns);
    assert!(BUF + u64::from(len) <= MIB);
    let mut ring = Ring::new(&g, 64);
    ring.add(&[(BUF, len, 0)]);
    assert_eq!(ring.drain(&mut b, INFLATE).unwrap(), 1);
    assert_eq!(b.status().ballooned_bytes, PAGE);
    assert_eq!(full - g.allocated(), PAGE);
    assert_eq!(g.first_byte(2101), MARK, "past the limit: not read");
}

/// A statistics buffer as Linux fills it, plus a tag this device does not know.
fn some_stats(free: u64) -> Vec<u8> {
    stats_bytes(&[
        (0, 3),         // swap_in
        (4, free),      // free_memory
        (5, 512 * MIB), // total_memory
        (6, 222 * MIB), // available_memory
        (10, 1),        // oom_kills
        (77, 5),        // unknown
    ])
}

#[test]
fn statistics_are_parsed_and_held_until_fresh_ones_are_wanted() {
    let g = Guest::new();
    let mut b = g.balloon(bit(STATS_VQ));
    let stats_queue = 2;
    let mut ring = Ring::new(&g, 64);
    let head = ring.add_stats(111 * MIB);
    assert_eq!(ring.drain(&mut b, stats_queue).unwrap(), 0);
    assert!(ring.used().is_empty(), "held, not returned");
    let s = b.status().stats.expect("statistics");
    assert_eq!(s.values["free_memory"], 111 * MIB);
    assert_eq!(s.values["total_memory"], 512 * MIB);
    assert_eq!(s.values["available_memory"], 222 * MIB);
    assert_eq!(s.values["swap_in"], 3);
    assert_eq!(s.values["oom_kills"], 1);
    assert_eq!(s.values.len(), 5);
    assert_eq!(s.unknown.len(), 1);
    assert_eq!(s.unknown[&77], 5);
    assert_eq!(b.status().rejected, Default::default());

    // The timer asks for fresh figures by returning the buffer.
    assert!(ring.request_stats(&mut b));
    assert_eq!(ring.used(), vec![(u32::from(head), 0)]);
    assert!(!ring.request_stats(&mut b), "nothing held now");
    assert_eq!(ring.used().len(), 1);

    // The driver answers with fresh figures in the same buffer: held again, values replaced.
    let again = ring.add_stats(99 * MIB);
    assert_eq!(ring.drain(&mut b, stats_queue).unwrap(), 0);
    assert_eq!(ring.used().len(), 1);
    assert_eq!(b.status().stats.unwrap().values["free_memory"], 99 * MIB);
    assert!(ring.request_stats(&mut b));
    assert_eq!(ring.used()[1], (u32::from(again), 0));
}

#[test]
fn a_second_stats_buffer_returns_the_older_one() {
    let g = Guest::new();
    let mut b = g.balloon(bit(STATS_VQ));
    g.mem
        .write_slice(&some_stats(MIB), GuestAddress(BUF))
        .unwrap();
    g.mem
        .write_slice(&some_stats(2 * MIB), GuestAddress(BUF + 4 * KIB))
        .unwrap();
    let len = some_stats(0).len() as u32;
    let mut ring = Ring::new(&g, 64);
    let first = ring.add(&[(BUF, len, 0)]);
    let second = ring.add(&[(BUF + 4 * KIB, len, 0)]);
    assert_eq!(ring.drain(&mut b, 2).unwrap(), 1);
    assert_eq!(
        ring.used(),
        vec![(u32::from(first), 0)],
        "the older went back"
    );
    assert_eq!(b.status().stats.unwrap().values["free_memory"], 2 * MIB);
    assert!(ring.request_stats(&mut b));
    assert_eq!(ring.used()[1], (u32::from(second), 0));
}

#[test]
fn garbage_statistics_are_counted_and_the_whole_entries_kept() {
    let g = Guest::new();
    let mut b = g.balloon(bit(STATS_VQ));
    // One whole entry and three stray bytes.
    let mut buf = stats_bytes(&[(4, 123 * MIB)]);
    buf.extend([1, 2, 3]);
    g.mem.write_slice(&buf, GuestAddress(BUF)).unwrap();
    let mut ring = Ring::new(&g, 64);
    let head = ring.add(&[(BUF, buf.len() as u32, 0)]);
    assert_eq!(ring.drain(&mut b, 2).unwrap(), 0, "still held");
    let s = b.status();
    assert_eq!(s.rejected.bad_stats, 1);
    assert_eq!(s.stats.unwrap().values["free_memory"], 123 * MIB);

    // A device-writable statistics descriptor is not read.
    g.mem
        .write_slice(&stats_bytes(&[(4, 7)]), GuestAddress(BUF + 4 * KIB))
        .unwrap();
    ring.add(&[(BUF + 4 * KIB, 10, F_WRITE)]);
    assert_eq!(ring.drain(&mut b, 2).unwrap(), 1);
    assert_eq!(ring.used(), vec![(u32::from(head), 0)]);
    let s = b.status();
    assert_eq!(s.rejected.bad_descriptors, 1);
    assert_eq!(s.rejected.bad_stats, 1);
    assert!(!s.stats.unwrap().values.contains_key("free_memory"));
}

#[test]
fn a_stats_buffer_reposted_after_a_driver_restart_is_not_returned_at_once() {
    // A guest reboot reaches a vhost-user backend as stopped and restarted queues and a new
    // feature negotiation, never as a device reset: the device still holds the old stats head.
    // Linux posts its only stats buffer at head 0 every time. Returning the "older" buffer
    // there would return the new driver's buffer at once, which it answers with a new one,
    // which would be returned at once, and so on.
    let g = Guest::new();
    let mut b = g.balloon(bit(STATS_VQ));
    let mut ring = Ring::new(&g, 64);
    assert_eq!(ring.add_stats(5 * MIB), 0);
    assert_eq!(ring.drain(&mut b, 2).unwrap(), 0);

    // The reboot: a fresh ring in the same place, the features again.
    b.set_acked_features(bit(STATS_VQ) | bit(VIRTIO_F_VERSION_1));
    g.mem
        .write_slice(&vec![0u8; RING_AREA as usize], GuestAddress(0))
        .unwrap();
    let mut ring = Ring::new(&g, 64);
    assert_eq!(ring.add_stats(5 * MIB), 0);
    assert_eq!(ring.drain(&mut b, 2).unwrap(), 0);
    assert!(
        ring.used().is_empty(),
        "the driver's only buffer stays held"
    );
    assert!(ring.request_stats(&mut b));
    assert_eq!(ring.used(), vec![(0, 0)]);
}

#[test]
fn free_page_reports_discard_writable_ranges_and_refuse_the_rest() {
    let g = Guest::new();
    // Reporting alone: the driver numbers it queue 2 (indices compact over features).
    let mut b = g.balloon(bit(REPORTING));
    let full = g.allocated();
    let mut ring = Ring::new(&g, 64);
    let head = ring.add(&[
        (10 * MIB, MIB as u32, F_WRITE),       // 1 MiB free: discarded
        (12 * MIB, MIB as u32, 0),             // device-readable: refused
        (LOW - MIB, 2 * MIB as u32, F_WRITE),  // half in the hole: only the inside half
        (HIGH_GPA + MIB + 100, 8192, F_WRITE), // partial pages: only the whole one
        (64 << 30, 4 * MIB as u32, F_WRITE),   // entirely outside RAM: skipped
    ]);
    assert_eq!(ring.drain(&mut b, 2).unwrap(), 1);
    assert_eq!(ring.used(), vec![(u32::from(head), 0)]);
    assert_eq!(full - g.allocated(), 2 * MIB + PAGE);
    let s = b.status();
    assert_eq!(s.reported_free_bytes, 2 * MIB + PAGE);
    assert_eq!(s.rejected.bad_descriptors, 1);
    assert_eq!(s.rejected.pages_outside_ram, (MIB + 4 * MIB) / PAGE);
    assert_eq!(s.ballooned_bytes, 0, "reported pages are not ballooned");
    assert_eq!(s.reclaimed_bytes, 0);
    assert_eq!(g.first_byte((12 * MIB / PAGE) as u32), MARK);
    assert_eq!(g.first_byte((HIGH_GPA / PAGE) as u32 + 256), MARK);
    assert_eq!(g.first_byte((HIGH_GPA / PAGE) as u32 + 257), 0);
    assert_eq!(g.first_byte((HIGH_GPA / PAGE) as u32 + 258), MARK);
    assert_eq!(b.counters.report_chains, 1);

    // With discards off, reports are returned and nothing leaves.
    b.set_discard(false).unwrap();
    let before = g.allocated();
    ring.add(&[(9 * MIB, MIB as u32, F_WRITE)]);
    assert_eq!(ring.drain(&mut b, 2).unwrap(), 1);
    assert_eq!(g.allocated(), before);
    assert_eq!(b.status().reported_free_bytes, 2 * MIB + PAGE);
}

#[test]
fn with_stats_and_reporting_stats_is_queue_2_and_reporting_queue_3() {
    let g = Guest::new();
    let mut b = g.balloon(bit(STATS_VQ) | bit(REPORTING));
    let full = g.allocated();
    let mut stats = Ring::new(&g, 64);
    stats.add_stats(42 * MIB);
    assert_eq!(stats.drain(&mut b, 2).unwrap(), 0, "held as statistics");
    assert_eq!(b.status().stats.unwrap().values["free_memory"], 42 * MIB);

    let mut reports = Ring::new(&g, 64);
    reports.add(&[(10 * MIB, MIB as u32, F_WRITE)]);
    assert_eq!(reports.drain(&mut b, 3).unwrap(), 1);
    assert_eq!(full - g.allocated(), MIB);
    assert_eq!(b.status().reported_free_bytes, MIB);
    assert_eq!(b.status().rejected, Default::default());

    // The same statistics buffer on queue 3 is a (device-readable, so refused) report.
    let mut wrong = Ring::new(&g, 64);
    wrong.add_stats(42 * MIB);
    assert_eq!(wrong.drain(&mut b, 3).unwrap(), 1);
    assert_eq!(b.status().rejected.bad_descriptors, 1);
}

#[test]
fn a_queue_without_meaning_gets_its_chains_back_unread() {
    let g = Guest::new();
    let full = g.allocated();
    let len = g.write_pfns(BUF, &[2600, 2601]);
    for (acked, index) in [
        (0, 2), // no optional features: only 0 and 1
        (0, 3),
        (bit(REPORTING), 3), // reporting alone is queue 2
        (bit(STATS_VQ) | bit(REPORTING), 4),
    ] {
        let mut b = g.balloon(acked);
        let mut ring = Ring::new(&g, 64);
        let h1 = ring.add(&[(BUF, len, 0)]);
        let h2 = ring.add(&[(BUF, len, F_WRITE)]);
        assert_eq!(ring.drain(&mut b, index).unwrap(), 2);
        assert_eq!(ring.used(), vec![(h1.into(), 0), (h2.into(), 0)]);
        let s = b.status();
        assert_eq!(
            s.rejected.bad_descriptors, 2,
            "features {acked:#x} queue {index}"
        );
        assert_eq!(s.ballooned_bytes, 0);
        assert!(s.stats.is_none());
        assert_eq!(g.allocated(), full);
        g.mem
            .write_slice(&vec![0u8; RING_AREA as usize], GuestAddress(0))
            .unwrap();
    }
}

#[test]
fn a_broken_avail_ring_is_an_error_not_a_panic() {
    let g = Guest::new();
    let mut b = g.balloon(0);
    let full = g.allocated();
    let len = g.write_pfns(BUF, &[2700]);
    let mut ring = Ring::new(&g, 16);
    ring.add(&[(BUF, len, 0)]);
    // An avail index far beyond the queue size.
    ring.vq.avail().idx().store(u16::to_le(500));
    assert!(matches!(
        ring.drain(&mut b, INFLATE),
        Err(BalloonError::Queue(_))
    ));
    assert!(ring.used().is_empty());
    assert_eq!(b.status().ballooned_bytes, 0);
    assert_eq!(g.allocated(), full);
}

#[test]
fn an_avail_entry_naming_a_head_beyond_the_queue_is_an_error_not_a_panic() {
    let g = Guest::new();
    let mut b = g.balloon(0);
    let full = g.allocated();
    let len = g.write_pfns(BUF, &[2700]);
    let mut ring = Ring::new(&g, 16);
    let good = ring.add(&[(BUF, len, 0)]);
    // A second avail entry naming descriptor 40 of a 16-entry table.
    let avail = ring.vq.avail();
    avail.ring().ref_at(1).unwrap().store(u16::to_le(40));
    avail.idx().store(u16::to_le(2));
    assert!(ring.drain(&mut b, INFLATE).is_err());
    // The good chain before it was handled and returned.
    assert_eq!(ring.used(), vec![(u32::from(good), 0)]);
    assert_eq!(full - g.allocated(), PAGE);
}

#[test]
fn a_descriptor_loop_ends_and_the_chain_comes_back() {
    let g = Guest::new();
    let mut b = g.balloon(0);
    let full = g.allocated();
    let len = g.write_pfns(BUF, &[2800]);
    let len2 = g.write_pfns(BUF + 64, &[2801]);
    let ring = Ring::new(&g, 16);
    // 0 -> 1 -> 0 -> ...: the chain ends after as many descriptors as the queue holds.
    ring.vq
        .add_desc_chains(
            &[desc(BUF, len, F_NEXT, 1), desc(BUF + 64, len2, F_NEXT, 0)],
            0,
        )
        .unwrap();
    let mut ring = ring;
    assert_eq!(ring.drain(&mut b, INFLATE).unwrap(), 1);
    assert_eq!(ring.used(), vec![(0, 0)]);
    assert_eq!(b.status().ballooned_bytes, 2 * PAGE);
    assert_eq!(full - g.allocated(), 2 * PAGE);
}

#[test]
fn with_discards_off_pages_are_tracked_and_discarded_when_switched_back_on() {
    let g = Guest::new();
    let mut b = g.balloon(bit(MUST_TELL_HOST));
    b.set_discard(false).unwrap();
    let full = g.allocated();
    let pfns: Vec<u32> = (2700..2700 + 64).collect();
    send_pfns(&g, &mut b, INFLATE, &pfns);
    assert_eq!(g.allocated(), full);
    let s = b.status();
    assert_eq!(s.ballooned_bytes, 64 * PAGE);
    assert_eq!(s.reclaimed_bytes, 0);
    assert!(!s.discard_enabled);
    // Deflated meanwhile: not discarded later either.
    send_pfns(&g, &mut b, DEFLATE, &pfns[..16]);
    b.set_discard(true).unwrap();
    assert_eq!(full - g.allocated(), 48 * PAGE);
    assert_eq!(g.first_byte(2700), MARK);
    assert_eq!(g.first_byte(2716), 0);
    let s = b.status();
    assert_eq!(s.reclaimed_bytes, 48 * PAGE);
    assert!(s.discard_enabled);
}

#[test]
fn with_must_tell_host_discards_run_beside_the_queue_and_deflate_withdraws_them() {
    // The production path: a worker discards after the buffer went back (here without a
    // thread, run by hand), and a deflate drops the pending discards of its pages.
    let g = Guest::new();
    let (mut b, worker) = g.balloon_with_worker();
    let full = g.allocated();
    let pfns: Vec<u32> = (3100..3100 + 64).collect();
    send_pfns(&g, &mut b, INFLATE, &pfns);
    assert_eq!(g.allocated(), full, "deferred");
    assert_eq!(b.status().ballooned_bytes, 64 * PAGE);
    send_pfns(&g, &mut b, DEFLATE, &pfns[..16]);
    worker.process_pending();
    assert_eq!(full - g.allocated(), 48 * PAGE);
    assert_eq!(g.first_byte(3100), MARK, "deflated before its discard ran");
    assert_eq!(g.first_byte(3116), 0);
    let s = b.status();
    assert_eq!(s.reclaimed_bytes, 48 * PAGE);
    assert_eq!(s.ballooned_bytes, 48 * PAGE);
}

#[test]
fn switching_discards_off_drops_the_discards_the_worker_has_not_run() {
    // After `set_discard false` (before VFIO, postcopy or a snapshot) nothing may be discarded,
    // including what inflate handed to the worker just before.
    let g = Guest::new();
    let (mut b, worker) = g.balloon_with_worker();
    let full = g.allocated();
    let pfns: Vec<u32> = (3200..3200 + 64).collect();
    send_pfns(&g, &mut b, INFLATE, &pfns);
    b.set_discard(false).unwrap();
    worker.process_pending();
    assert_eq!(g.allocated(), full, "nothing discarded once switched off");
    assert_eq!(b.status().ballooned_bytes, 64 * PAGE);
    // Switched back on: the tracked pages go, counted once.
    b.set_discard(true).unwrap();
    worker.process_pending();
    assert_eq!(full - g.allocated(), 64 * PAGE);
    assert_eq!(b.status().reclaimed_bytes, 64 * PAGE);
}

#[test]
fn reset_drops_the_held_stats_buffer() {
    let g = Guest::new();
    let mut b = g.balloon(bit(STATS_VQ));
    let mut ring = Ring::new(&g, 64);
    ring.add_stats(5 * MIB);
    ring.drain(&mut b, 2).unwrap();
    b.reset();
    assert!(!ring.request_stats(&mut b));
    assert!(ring.used().is_empty());
    assert_eq!(b.layout.len(), 2);
}

#[test]
fn after_a_guest_reboot_pages_tracked_before_it_are_never_discarded() {
    // A reboot reaches the backend as a new negotiation and rings starting from 0. The pages
    // the old driver ballooned are the new kernel's; re-enabling discards must not touch them,
    // and discards still pending from before the reboot must not run.
    let g = Guest::new();
    let (mut b, worker) = g.balloon_with_worker();
    let full = g.allocated();
    let old: Vec<u32> = (3300..3300 + 64).collect();
    send_pfns(&g, &mut b, INFLATE, &old);
    assert_eq!(b.status().ballooned_bytes, 64 * PAGE);

    b.set_acked_features(bit(MUST_TELL_HOST) | bit(VIRTIO_F_VERSION_1));
    worker.process_pending();
    assert_eq!(g.allocated(), full, "a discard from before the reboot ran");
    b.set_discard(false).unwrap();
    b.set_discard(true).unwrap();
    worker.process_pending();
    assert_eq!(
        g.allocated(),
        full,
        "re-enabling discarded pages of unknown owner"
    );

    // The new driver inflates other pages on fresh rings.
    let new: Vec<u32> = (3400..3400 + 8).collect();
    send_pfns(&g, &mut b, INFLATE, &new);
    worker.process_pending();
    assert_eq!(full - g.allocated(), 8 * PAGE);
    assert_eq!(g.first_byte(3300), MARK);
    assert_eq!(g.first_byte(3400), 0);
    assert_eq!(b.status().ballooned_bytes, 8 * PAGE);
}

#[test]
fn a_resumed_vm_keeps_its_balloon_and_gets_deferred_discards() {
    // A VM stopped and continued (or a backend restarted behind the keeper) also renegotiates,
    // but its inflate queue resumes where it was: the tracked pages are still the balloon's.
    let g = Guest::new();
    let (mut b, worker) = g.balloon_with_worker();
    b.set_discard(false).unwrap();
    let full = g.allocated();
    let mut ring = Ring::new(&g, 64);
    let first: Vec<u32> = (3500..3500 + 64).collect();
    let len = g.write_pfns(BUF, &first);
    ring.add(&[(BUF, len, 0)]);
    assert_eq!(ring.drain(&mut b, INFLATE).unwrap(), 1);

    b.set_acked_features(bit(MUST_TELL_HOST) | bit(VIRTIO_F_VERSION_1));
    b.set_discard(true).unwrap();
    assert_eq!(g.allocated(), full, "deferred until the queue is seen");
    let more: Vec<u32> = (3600..3600 + 8).collect();
    let len = g.write_pfns(BUF + 4 * KIB, &more);
    ring.add(&[(BUF + 4 * KIB, len, 0)]);
    assert_eq!(ring.drain(&mut b, INFLATE).unwrap(), 1);
    worker.process_pending();
    assert_eq!(full - g.allocated(), 72 * PAGE);
    assert_eq!(b.status().ballooned_bytes, 72 * PAGE);
}

#[test]
fn a_restarted_backend_takes_over_the_tracked_pages_and_completes_their_discards() {
    // The first process inflates 64 pages and is killed before its worker discarded them; the
    // second finds them in the page file and discards them once the inflate queue (resumed
    // where it was, as behind the keeper) shows they are still the balloon's.
    let g = Guest::new();
    let dir = std::env::temp_dir().join(format!("pages-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state.json");
    let start = |worker: &Arc<DiscardWorker>| {
        let mut b = Balloon::new(FeatureChoice::default(), Some(state.clone()))
            .with_discard_worker(worker.clone());
        b.set_acked_features(bit(MUST_TELL_HOST) | bit(VIRTIO_F_VERSION_1));
        b.set_memory(regions_of(&g.mem));
        b
    };
    let full = g.allocated();
    let mut ring = Ring::new(&g, 64);
    let pfns: Vec<u32> = (3700..3700 + 64).collect();
    let len = g.write_pfns(BUF, &pfns);
    {
        let mut first = start(&Arc::new(DiscardWorker::new()));
        ring.add(&[(BUF, len, 0)]);
        assert_eq!(ring.drain(&mut first, INFLATE).unwrap(), 1);
        assert_eq!(first.status().ballooned_bytes, 64 * PAGE);
        // Killed: its pending discards never run.
    }
    assert_eq!(g.allocated(), full);
    let worker = Arc::new(DiscardWorker::new());
    let mut second = start(&worker);
    assert_eq!(second.status().ballooned_bytes, 64 * PAGE, "taken over");
    let more: Vec<u32> = (3800..3800 + 8).collect();
    let len = g.write_pfns(BUF + 4 * KIB, &more);
    ring.add(&[(BUF + 4 * KIB, len, 0)]);
    assert_eq!(ring.drain(&mut second, INFLATE).unwrap(), 1);
    worker.process_pending();
    assert_eq!(full - g.allocated(), 72 * PAGE);
    assert_eq!(second.status().ballooned_bytes, 72 * PAGE);
    drop(second);

    // A third process, but the guest rebooted meanwhile (its inflate queue starts at 0): the
    // pages in the file are the guest's and stay untouched; the file is emptied.
    g.mem
        .write_slice(&vec![MARK; PAGE as usize], GuestAddress(3700 * PAGE))
        .unwrap();
    let mut third = start(&Arc::new(DiscardWorker::new()));
    assert_eq!(third.status().ballooned_bytes, 72 * PAGE);
    send_pfns(&g, &mut third, INFLATE, &[3900]);
    assert_eq!(third.status().ballooned_bytes, PAGE);
    assert_eq!(g.first_byte(3700), MARK);
    drop(third);
    let mut fourth = start(&Arc::new(DiscardWorker::new()));
    assert_eq!(fourth.status().ballooned_bytes, PAGE);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Inflates `pfns` through `ring` (one buffer at `at`) and checks it came back.
fn inflate_on(ring: &mut Ring, g: &Guest, b: &mut Balloon, at: u64, pfns: &[u32]) {
    let len = g.write_pfns(at, pfns);
    ring.add(&[(at, len, 0)]);
    assert_eq!(ring.drain(b, INFLATE).unwrap(), 1);
}

#[test]
fn while_the_rings_are_stopped_for_a_reboot_no_tracked_page_is_discarded() {
    // QEMU stops every ring at the reset and negotiates again only when the new driver starts,
    // seconds later: meanwhile firmware and the new kernel use the old balloon's pages. Neither
    // the worker's pending discards nor discards switched back on may touch them.
    let g = Guest::new();
    let (mut b, worker) = g.balloon_with_worker();
    let old: Vec<u32> = (3000..3000 + 64).collect();
    send_pfns(&g, &mut b, INFLATE, &old);
    b.ring_stopped(INFLATE);
    g.mem.write_obj(0x5au8, GuestAddress(3000 * PAGE)).unwrap();
    worker.process_pending();
    assert_eq!(
        g.first_byte(3000),
        0x5a,
        "a pending discard ran after the reset"
    );

    b.set_discard(false).unwrap();
    b.set_discard(true).unwrap();
    worker.process_pending();
    assert_eq!(
        g.first_byte(3000),
        0x5a,
        "re-enabling discarded the rebooting guest's page"
    );
}

#[test]
fn a_paused_vm_gets_the_discards_dropped_at_the_pause_once_it_runs_again() {
    let g = Guest::new();
    let (mut b, worker) = g.balloon_with_worker();
    let full = g.allocated();
    let mut ring = Ring::new(&g, 64);
    inflate_on(
        &mut ring,
        &g,
        &mut b,
        BUF,
        &(3100..3100 + 64).collect::<Vec<_>>(),
    );
    // Stopped before the worker ran, then continued.
    b.ring_stopped(INFLATE);
    b.set_acked_features(bit(MUST_TELL_HOST) | bit(VIRTIO_F_VERSION_1));
    inflate_on(
        &mut ring,
        &g,
        &mut b,
        BUF + 4 * KIB,
        &(3200..3208).collect::<Vec<_>>(),
    );
    worker.process_pending();
    assert_eq!(b.status().ballooned_bytes, 72 * PAGE);
    assert_eq!(
        full - g.allocated(),
        72 * PAGE,
        "the dropped discards were not redone"
    );
}

#[test]
fn discards_switched_off_again_before_the_queue_is_seen_stay_off() {
    let g = Guest::new();
    let (mut b, worker) = g.balloon_with_worker();
    b.set_discard(false).unwrap();
    let full = g.allocated();
    let mut ring = Ring::new(&g, 64);
    inflate_on(
        &mut ring,
        &g,
        &mut b,
        BUF,
        &(3300..3300 + 64).collect::<Vec<_>>(),
    );
    b.ring_stopped(INFLATE);
    b.set_acked_features(bit(MUST_TELL_HOST) | bit(VIRTIO_F_VERSION_1));
    b.set_discard(true).unwrap(); // deferred
    b.set_discard(false).unwrap(); // before VFIO, postcopy or a snapshot
    inflate_on(
        &mut ring,
        &g,
        &mut b,
        BUF + 4 * KIB,
        &(3400..3408).collect::<Vec<_>>(),
    );
    worker.process_pending();
    assert_eq!(
        g.allocated(),
        full,
        "pages discarded while discards are off"
    );
}

#[test]
fn a_later_memory_table_never_takes_over_a_stale_page_file() {
    // The first persist of a process fails (here: a directory stands where the file goes); a
    // later table must not adopt the previous process's file over what this one tracks.
    let g = Guest::new();
    let dir = std::env::temp_dir().join(format!("stale-pages-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state.json");
    let pages = dir.join("state.json.pages");
    let start = || {
        let mut b = Balloon::new(FeatureChoice::default(), Some(state.clone()));
        b.set_acked_features(bit(MUST_TELL_HOST) | bit(VIRTIO_F_VERSION_1));
        b.set_memory(regions_of(&g.mem));
        b
    };
    let mut ring = Ring::new(&g, 64);
    {
        let mut first = start();
        inflate_on(
            &mut ring,
            &g,
            &mut first,
            BUF,
            &(3500..3500 + 64).collect::<Vec<_>>(),
        );
    }
    std::fs::rename(&pages, dir.join("hidden")).unwrap();
    std::fs::create_dir(&pages).unwrap();
    let mut second = start();
    inflate_on(
        &mut ring,
        &g,
        &mut second,
        BUF + 4 * KIB,
        &(3600..3608).collect::<Vec<_>>(),
    );
    // The guest takes the old pages back and uses them.
    second.memory.deflate(&[crate::memory::PfnRange {
        start: 3500,
        count: 64,
    }]);
    g.mem.write_obj(0x5au8, GuestAddress(3500 * PAGE)).unwrap();
    std::fs::remove_dir(&pages).unwrap();
    std::fs::rename(dir.join("hidden"), &pages).unwrap();
    second.set_memory(regions_of(&g.mem));
    assert_eq!(second.status().ballooned_bytes, 8 * PAGE);
    inflate_on(
        &mut ring,
        &g,
        &mut second,
        BUF + 8 * KIB,
        &(3700..3708).collect::<Vec<_>>(),
    );
    assert_eq!(
        g.first_byte(3500),
        0x5a,
        "a page the guest took back was discarded"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_backends_cannot_share_a_state_file() {
    let dir = std::env::temp_dir().join(format!("state-lock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state.json");
    let held = crate::memory::persist::StateLock::acquire(&state).unwrap();
    // flock locks belong to the open file: a second open, as a second process would, fails.
    let e = crate::memory::persist::StateLock::acquire(&state).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    drop(held);
    crate::memory::persist::StateLock::acquire(&state).unwrap();
    // A lock file another user planted is refused by name, not locked.
    if rustix::process::geteuid().is_root() {
        let lock = crate::state::beside(&state, "lock");
        std::os::unix::fs::chown(&lock, Some(65534), Some(65534)).unwrap();
        let e = crate::memory::persist::StateLock::acquire(&state).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
