//! What each queue's buffers do to the balloon: one handler per queue (as Firecracker's
//! `process_inflate_queue` and friends), and the drain loop the vhost glue and the mock-ring
//! tests both call.

use super::{Balloon, BalloonError};
use crate::device::pfn::{parse_pfns, MAX_PFNS_PER_CHAIN};
use crate::device::stats::parse_stats;
use crate::device::QueueKind;
use crate::guest_log::GuestEvent;
use crate::memory::{merge_pfns, pages_within, PageOutcome, PfnRange};
use std::time::Instant;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemory};

/// The most bytes read from one statistics chain (16 tags need 160).
const MAX_STATS_BYTES: usize = 4096;

/// What the device does with a chain once handled.
enum ChainDisposition {
    /// Return it to the driver now, with this many bytes written.
    Used(u32),
    /// Keep it (the statistics buffer, returned when fresh figures are wanted).
    Hold,
}

impl Balloon {
    /// Reads the device-readable part of a chain, up to `limit` bytes. Descriptors the device
    /// should not read (device-writable ones) or that point outside guest memory are counted
    /// as bad and skipped.
    fn read_chain<M: GuestMemory>(&mut self, chain: DescriptorChain<&M>, limit: usize) -> Vec<u8> {
        let mem = chain.memory();
        let mut data = Vec::new();
        for desc in chain.clone() {
            if desc.is_write_only() {
                self.counters.rejected.bad_descriptors += 1;
                continue;
            }
            let room = limit.saturating_sub(data.len());
            if room == 0 {
                self.counters.rejected.bad_descriptors += 1;
                break;
            }
            let len = (desc.len() as usize).min(room);
            let start = data.len();
            data.resize(start + len, 0);
            if mem.read_slice(&mut data[start..], desc.addr()).is_err() {
                self.counters.rejected.bad_descriptors += 1;
                data.truncate(start);
            }
        }
        data
    }

    /// The page frame numbers of an inflate or deflate chain, merged into ranges.
    fn chain_pfns<M: GuestMemory>(&mut self, chain: DescriptorChain<&M>) -> Vec<PfnRange> {
        let data = self.read_chain(chain, MAX_PFNS_PER_CHAIN * 4);
        let mut pfns = Vec::with_capacity(data.len() / 4);
        if parse_pfns(&data, &mut pfns) != 0 {
            self.counters.rejected.bad_descriptors += 1;
        }
        merge_pfns(&mut pfns)
    }

    /// The driver gives these pages to the balloon: tracked, and discarded (now, or on the
    /// worker when the driver promised to tell before reusing one).
    fn process_inflate<M: GuestMemory>(&mut self, chain: DescriptorChain<&M>) -> ChainDisposition {
        let ranges = self.chain_pfns(chain);
        self.counters.inflate_chains += 1;
        let worker = self.deferring_worker();
        let memory = &mut self.memory;
        let out = super::discard_with(self.discard_enabled, worker.as_deref(), |mode| {
            memory.inflate(&ranges, mode)
        });
        self.count_discards(out);
        self.counters.reclaimed_bytes += out.discarded_bytes;
        if self.memory.ballooned_pages() >= u64::from(self.config.num_pages) {
            if let Some(worker) = worker {
                worker.balloon_complete();
            }
        }
        self.log_outside("inflate", out);
        ChainDisposition::Used(0)
    }

    /// The driver takes these pages back: before it may reuse them, no discard of them may be
    /// pending or running.
    fn process_deflate<M: GuestMemory>(&mut self, chain: DescriptorChain<&M>) -> ChainDisposition {
        let ranges = self.chain_pfns(chain);
        self.counters.deflate_chains += 1;
        self.withdraw_discards(&ranges);
        let out = self.memory.deflate(&ranges);
        self.count_discards(out);
        self.log_outside("deflate", out);
        ChainDisposition::Used(0)
    }

    /// Fresh guest statistics; the buffer is held until fresh figures are wanted.
    fn process_stats<M: GuestMemory>(&mut self, chain: DescriptorChain<&M>) -> ChainDisposition {
        let data = self.read_chain(chain, MAX_STATS_BYTES);
        let (stats, err) = parse_stats(&data);
        if let Some(e) = err {
            self.counters.rejected.bad_stats += 1;
            self.guest_log.warn(GuestEvent::BadStatistics, || {
                format!("guest statistics: {e}")
            });
        }
        self.counters.stats_updates += 1;
        self.stats = Some((Instant::now(), stats));
        ChainDisposition::Hold
    }

    /// Free page reports are device-writable buffers whose addresses are the free pages
    /// themselves; nothing is written back.
    fn process_reporting<M: GuestMemory>(
        &mut self,
        chain: DescriptorChain<&M>,
    ) -> ChainDisposition {
        let mut ranges = Vec::new();
        for desc in chain.clone() {
            if !desc.is_write_only() {
                self.counters.rejected.bad_descriptors += 1;
                continue;
            }
            if let Some(r) = pages_within(desc.addr().0, u64::from(desc.len())) {
                ranges.push(r);
            }
        }
        self.counters.report_chains += 1;
        if self.discard_enabled {
            let out = self.memory.discard_free(&ranges);
            self.count_discards(out);
            self.counters.reported_free_bytes += out.discarded_bytes;
            self.log_outside("free page report", out);
        }
        ChainDisposition::Used(0)
    }

    fn log_outside(&mut self, what: &str, out: PageOutcome) {
        if out.outside_pages > 0 {
            self.guest_log.warn(GuestEvent::PagesOutsideRam, || {
                format!(
                    "{what}: {} pages outside guest RAM skipped",
                    out.outside_pages
                )
            });
        }
    }

    fn handle_chain<M: GuestMemory>(
        &mut self,
        kind: QueueKind,
        chain: DescriptorChain<&M>,
    ) -> ChainDisposition {
        match kind {
            QueueKind::Inflate => self.process_inflate(chain),
            QueueKind::Deflate => self.process_deflate(chain),
            QueueKind::Stats => self.process_stats(chain),
            QueueKind::Reporting => self.process_reporting(chain),
            QueueKind::FreePageHint => {
                // Not offered; a driver that uses it anyway gets its buffers back untouched.
                self.counters.rejected.bad_descriptors += 1;
                ChainDisposition::Used(0)
            }
        }
    }
}

/// Handles every available chain of the queue at `index`; returns how many chains went back to
/// the driver. The statistics buffer is kept (see `Balloon::stats_held`); a second one
/// arriving while one is held sends the older back.
pub fn drain_queue<M: GuestMemory>(
    balloon: &mut Balloon,
    index: usize,
    queue: &mut Queue,
    mem: &M,
) -> Result<usize, BalloonError> {
    drain_chains(balloon, index, queue, mem, usize::MAX).map(|d| d.used)
}

/// What `drain_chains` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Chains that went back to the driver.
    pub used: usize,
    /// Chains taken from the queue (the held statistics buffer is taken but not used).
    pub taken: usize,
}

/// As `drain_queue`, for at most `max_chains` chains: the vhost glue takes the device lock for
/// one chain at a time, so a status or config read waits for one chain at most (a chain is at
/// most `MAX_PFNS_PER_CHAIN` pages), however many the guest queued.
pub fn drain_chains<M: GuestMemory>(
    balloon: &mut Balloon,
    index: usize,
    queue: &mut Queue,
    mem: &M,
    max_chains: usize,
) -> Result<Drained, BalloonError> {
    // A ring the frontend stopped (GET_VRING_BASE: a reboot, a pause) gives nothing, and says
    // nothing of whose the tracked pages are.
    if !queue.ready() {
        return Ok(Drained { used: 0, taken: 0 });
    }
    let Some(kind) = balloon.layout.kind(index) else {
        // A queue the negotiated features do not give a meaning: return its buffers unread.
        let heads: Vec<u16> = queue
            .iter(mem)?
            .take(max_chains)
            .map(|c| c.head_index())
            .collect();
        for head in &heads {
            balloon.counters.rejected.bad_descriptors += 1;
            queue.add_used(mem, *head, 0)?;
        }
        return Ok(Drained {
            used: heads.len(),
            taken: heads.len(),
        });
    };
    let next_avail = queue.next_avail();
    let chains: Vec<DescriptorChain<&M>> = queue.iter(mem)?.take(max_chains).collect();
    if kind == QueueKind::Inflate {
        balloon.inflate_queue_running(next_avail);
    }
    let taken = chains.len();
    let mut used = 0;
    for chain in chains {
        let head = chain.head_index();
        match balloon.handle_chain(kind, chain) {
            ChainDisposition::Used(len) => {
                queue.add_used(mem, head, len)?;
                used += 1;
            }
            ChainDisposition::Hold => {
                // (The same head again, after a resume at the used index, is the one held.)
                if let Some(older) = balloon.stats_held.replace(head).filter(|&o| o != head) {
                    queue.add_used(mem, older, 0)?;
                    used += 1;
                }
            }
        }
    }
    Ok(Drained { used, taken })
}

/// Returns the held statistics buffer, which makes the driver send fresh figures.
pub fn request_stats<M: GuestMemory>(
    balloon: &mut Balloon,
    queue: &mut Queue,
    mem: &M,
) -> Result<bool, BalloonError> {
    match balloon.stats_held.take() {
        Some(head) => {
            queue.add_used(mem, head, 0)?;
            Ok(true)
        }
        None => Ok(false),
    }
}
