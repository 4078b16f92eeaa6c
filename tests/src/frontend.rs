//! An in-process vhost-user frontend (the vhost crate's `Frontend`) over a memfd "guest", playing
//! the driver's part with a minimal split ring: it sends inflate and deflate buffers of PFNs the
//! way the Linux driver does, one buffer at a time, waiting for each to come back. It drives the
//! real backend process through its real socket without a VM, for benchmarks and for tests of
//! what QEMU cannot do here (reconnecting to a restarted backend).

use crate::error::IoContext;
use crate::{LabError, Result};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const PAGE: u64 = 4096;
/// Ring size; the buffers posted at a time are far fewer.
const QUEUE_SIZE: u16 = 64;
/// Bytes reserved at the top of the memfd for rings and PFN buffers (never discarded).
const RING_AREA: u64 = 1 << 20;
/// The Linux driver's batch: VIRTIO_BALLOON_ARRAY_PFNS_MAX.
pub const PFNS_PER_BUFFER: usize = 256;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// The Linux driver negotiates it whenever offered: it always tells the host before reusing a
/// deflated page.
const VIRTIO_BALLOON_F_MUST_TELL_HOST: u64 = 1;

/// Guest RAM: the backend crate's test memfd, mapped here.
pub use vhost_balloon_backend::testing::MemfdRam;

/// Guest RAM for a [`TestFrontend`]: `data_len` bytes of data pages first, then the ring area
/// (rings and PFN buffers, never discarded) in the top `RING_AREA` bytes.
pub fn guest_ram(data_len: u64) -> Result<MemfdRam> {
    MemfdRam::new(data_len + RING_AREA).ctx(|| "creating the memfd guest RAM".into())
}

/// Bytes of data pages in `ram`: everything below the ring area.
pub fn data_len(ram: &MemfdRam) -> u64 {
    ram.len().saturating_sub(RING_AREA)
}

/// The data pages in `ram`.
pub fn data_pages(ram: &MemfdRam) -> u64 {
    data_len(ram) / PAGE
}

/// Waits until exactly `expected` bytes of `ram` are allocated: the backend discards beside
/// its queue (a buffer returns before its pages are punched), so memory leaves a little later.
pub fn wait_allocated(ram: &MemfdRam, expected: u64) -> Result<()> {
    crate::wait::wait_for(
        "the guest RAM's allocated size",
        Duration::from_secs(60),
        Duration::from_micros(200),
        || {
            let now = ram.allocated();
            Ok(if now == expected {
                crate::wait::Poll::Ready(())
            } else {
                crate::wait::Poll::Pending(format!(
                    "{} KiB, want {} KiB",
                    now >> 10,
                    expected >> 10
                ))
            })
        },
    )
}

fn vhost_err(what: &str, e: vhost::Error) -> LabError {
    LabError::Other(format!("vhost-user {what}: {e}"))
}

/// One split virtqueue laid out in the ring area.
struct SplitQueue {
    desc: u64,
    avail: u64,
    used: u64,
    /// Where this queue's PFN buffer lives.
    buffer: u64,
    next_avail: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

impl SplitQueue {
    fn new(base: u64) -> Result<Self> {
        let n = u64::from(QUEUE_SIZE);
        let desc = base;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n).next_multiple_of(4);
        let buffer = (used + 6 + 8 * n).next_multiple_of(PAGE);
        Ok(SplitQueue {
            desc,
            avail,
            used,
            buffer,
            next_avail: 0,
            last_used: 0,
            // Close-on-exec, as a VMM's are: the backends started after this frontend must
            // not inherit its descriptors (200 of them would each hold every earlier one's).
            kick: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).ctx(|| "eventfd".into())?,
            call: EventFd::new(libc::EFD_CLOEXEC).ctx(|| "eventfd".into())?,
        })
    }
}

/// The order in which a VMM sets the device up, message by message, as its source does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiation {
    /// A minimal frontend: features, protocol features, memory table, rings; no backend request
    /// channel.
    Minimal,
    /// QEMU 11 (vhost_user_backend_init, then vhost_dev_start): GET_FEATURES,
    /// GET/SET_PROTOCOL_FEATURES, SET_BACKEND_REQ_FD at once, then SET_FEATURES, SET_MEM_TABLE
    /// and the rings.
    Qemu,
    /// cloud-hypervisor v53 (vu_common_ctrl.rs): SET_OWNER, GET_FEATURES,
    /// GET/SET_PROTOCOL_FEATURES at VM creation; at activation SET_FEATURES, SET_MEM_TABLE, every
    /// ring's NUM, then each ring's ADDR, BASE (the guest's avail index), CALL, KICK, then
    /// SET_VRING_ENABLE for each, and SET_BACKEND_REQ_FD last.
    CloudHypervisor,
    /// cloud-hypervisor's own reconnect (reinitialize_vhost_user): as `CloudHypervisor` but
    /// without GET_PROTOCOL_FEATURES (it sets the ones acked before), over rings the guest
    /// already uses.
    CloudHypervisorReconnect,
}

/// A connected frontend with the inflate (0) and deflate (1) queues running.
pub struct TestFrontend {
    fe: Frontend,
    queues: Vec<SplitQueue>,
    /// The frontend's end of the backend request channel, when the negotiation sent one.
    backend_channel: Option<std::os::unix::net::UnixStream>,
    /// The features it acknowledged.
    features: u64,
}

/// A dirty-page log the backend marks (see `TestFrontend::start_dirty_log`).
pub struct DirtyLog {
    log: MemfdRam,
}

impl DirtyLog {
    /// The guest pages marked dirty, in order (bit `p % 8` of byte `p / 8` for page `p`).
    pub fn marked(&self) -> Vec<u64> {
        (0..self.log.len())
            .flat_map(|byte| {
                let b: u8 = self.log.read(byte);
                (0..8u64)
                    .filter(move |bit| b & (1 << bit) != 0)
                    .map(move |bit| byte * 8 + bit)
            })
            .collect()
    }
}

impl TestFrontend {
    /// Connects to a backend listening on `socket` and sets up the device over `ram`.
    pub fn connect(socket: &Path, ram: &MemfdRam) -> Result<Self> {
        Self::connect_as(socket, ram, Negotiation::Minimal)
    }

    /// As `connect`, in the order `negotiation` gives. A reconnect takes the rings where the
    /// guest left them in `ram`; the others start fresh rings.
    pub fn connect_as(socket: &Path, ram: &MemfdRam, negotiation: Negotiation) -> Result<Self> {
        use Negotiation::*;
        if data_len(ram) == 0 {
            return Err(LabError::Other(format!(
                "a guest RAM of {} bytes has no room for data below the ring area",
                ram.len()
            )));
        }
        let mut fe = Frontend::connect(socket, 4).map_err(|e| vhost_err("connect", e))?;
        fe.set_owner().map_err(|e| vhost_err("SET_OWNER", e))?;
        let offered = fe
            .get_features()
            .map_err(|e| vhost_err("GET_FEATURES", e))?;
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & VIRTIO_F_VERSION_1 == 0 || offered & protocol == 0 {
            return Err(LabError::Other(format!(
                "backend offers features {offered:#x} without VERSION_1/PROTOCOL_FEATURES"
            )));
        }
        // What a minimal Linux-like driver takes: no statistics, no reporting, no EVENT_IDX
        // (so the backend signals every used buffer). cloud-hypervisor offers the guest no
        // device feature of a generic device (only DEFAULT_VIRTIO_FEATURES' transport bits), so
        // under it not even MUST_TELL_HOST.
        let device = match negotiation {
            CloudHypervisor | CloudHypervisorReconnect => 0,
            Minimal | Qemu => offered & VIRTIO_BALLOON_F_MUST_TELL_HOST,
        };
        let features = VIRTIO_F_VERSION_1 | protocol | device;
        let set_features = |fe: &mut Frontend| {
            fe.set_features(features)
                .map_err(|e| vhost_err("SET_FEATURES", e))
        };
        if negotiation == Minimal {
            set_features(&mut fe)?;
        }
        // As QEMU: with REPLY_ACK every request waits for the backend's acknowledgement.
        let mut wanted = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::LOG_SHMFD;
        if negotiation != Minimal {
            wanted |= VhostUserProtocolFeatures::BACKEND_REQ;
        }
        let acked = if negotiation == CloudHypervisorReconnect {
            wanted
        } else {
            wanted
                & fe.get_protocol_features()
                    .map_err(|e| vhost_err("GET_PROTOCOL_FEATURES", e))?
        };
        fe.set_protocol_features(acked)
            .map_err(|e| vhost_err("SET_PROTOCOL_FEATURES", e))?;
        let mut backend_channel = None;
        let mut send_channel = |fe: &mut Frontend| -> Result<()> {
            let (ours, theirs) =
                std::os::unix::net::UnixStream::pair().ctx(|| "socketpair".into())?;
            fe.set_backend_request_fd(&theirs)
                .map_err(|e| vhost_err("SET_BACKEND_REQ_FD", e))?;
            backend_channel = Some(ours);
            Ok(())
        };
        if negotiation == Qemu {
            send_channel(&mut fe)?;
        }
        if negotiation != Minimal {
            set_features(&mut fe)?;
        }
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: ram.len(),
            userspace_addr: ram.host_addr() as u64,
            mmap_offset: 0,
            mmap_handle: ram.as_raw_fd(),
        }])
        .map_err(|e| vhost_err("SET_MEM_TABLE", e))?;
        let mut queues = Vec::new();
        for index in 0..2usize {
            let mut q = SplitQueue::new(data_len(ram) + index as u64 * (RING_AREA / 2))?;
            if negotiation == CloudHypervisorReconnect {
                // The guest's rings as it left them: it goes on from its own indices.
                q.next_avail = ram.read(q.avail + 2);
                q.last_used = ram.read(q.used + 2);
            } else {
                // A fresh ring: zero the avail and used headers.
                ram.write::<u32>(q.avail, 0);
                ram.write::<u32>(q.used, 0);
            }
            fe.set_vring_num(index, QUEUE_SIZE)
                .map_err(|e| vhost_err("SET_VRING_NUM", e))?;
            fe.set_vring_addr(
                index,
                &VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: 0,
                    // The backend translates these through the memory table's user addresses.
                    desc_table_addr: ram.host_addr() as u64 + q.desc,
                    used_ring_addr: ram.host_addr() as u64 + q.used,
                    avail_ring_addr: ram.host_addr() as u64 + q.avail,
                    log_addr: None,
                },
            )
            .map_err(|e| vhost_err("SET_VRING_ADDR", e))?;
            // cloud-hypervisor starts each ring at the guest's avail index.
            fe.set_vring_base(index, q.next_avail)
                .map_err(|e| vhost_err("SET_VRING_BASE", e))?;
            fe.set_vring_call(index, &q.call)
                .map_err(|e| vhost_err("SET_VRING_CALL", e))?;
            fe.set_vring_kick(index, &q.kick)
                .map_err(|e| vhost_err("SET_VRING_KICK", e))?;
            if matches!(negotiation, Minimal | Qemu) {
                fe.set_vring_enable(index, true)
                    .map_err(|e| vhost_err("SET_VRING_ENABLE", e))?;
            }
            queues.push(q);
        }
        if matches!(negotiation, CloudHypervisor | CloudHypervisorReconnect) {
            for index in 0..queues.len() {
                fe.set_vring_enable(index, true)
                    .map_err(|e| vhost_err("SET_VRING_ENABLE", e))?;
            }
            send_channel(&mut fe)?;
        }
        Ok(TestFrontend {
            fe,
            queues,
            backend_channel,
            features,
        })
    }

    /// Starts dirty-page logging as a migrating VMM does: a log of one bit per 4 KiB page of
    /// `ram` in a new memfd (SET_LOG_BASE), then the features again with VHOST_F_LOG_ALL.
    pub fn start_dirty_log(&mut self, ram: &MemfdRam) -> Result<DirtyLog> {
        let bytes = (ram.len() / PAGE).div_ceil(8).next_multiple_of(PAGE);
        let log = MemfdRam::new(bytes).ctx(|| "the dirty log memfd".into())?;
        self.fe
            .set_log_base(
                0,
                Some(vhost::VhostUserDirtyLogRegion {
                    mmap_size: bytes,
                    mmap_offset: 0,
                    mmap_handle: log.as_raw_fd(),
                }),
            )
            .map_err(|e| vhost_err("SET_LOG_BASE", e))?;
        self.fe
            .set_features(self.features | VhostUserVirtioFeatures::LOG_ALL.bits())
            .map_err(|e| vhost_err("SET_FEATURES (LOG_ALL)", e))?;
        Ok(DirtyLog { log })
    }

    /// Stops ring `index` as a VMM does for a guest reset or a pause (GET_VRING_BASE); returns
    /// where the backend stopped.
    pub fn stop_ring(&mut self, index: usize) -> Result<u32> {
        self.fe
            .get_vring_base(index)
            .map_err(|e| vhost_err("GET_VRING_BASE", e))
    }

    /// The guest page holding queue `index`'s used ring.
    pub fn used_ring_page(&self, index: usize) -> u64 {
        self.queues[index].used / PAGE
    }

    /// Waits up to `timeout` for a config-change message on the backend request channel (the
    /// interrupt that makes the Linux driver read a new target), and acknowledges it if asked.
    pub fn wait_config_change(&mut self, timeout: Duration) -> Result<()> {
        use std::io::{Read, Write};
        let chan = self
            .backend_channel
            .as_mut()
            .ok_or_else(|| LabError::Other("no backend request channel was sent".into()))?;
        chan.set_read_timeout(Some(timeout))
            .ctx(|| "backend channel".into())?;
        let mut header = [0u8; 12];
        chan.read_exact(&mut header)
            .map_err(|e| LabError::Timeout {
                what: "a config-change message on the backend request channel".into(),
                secs: timeout.as_secs_f64(),
                last: e.to_string(),
            })?;
        let word =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        if word(0) != 2 {
            return Err(LabError::Other(format!(
                "backend request {} where a config change (2) was expected",
                word(0)
            )));
        }
        if word(4) & 0x8 != 0 {
            let mut reply = Vec::with_capacity(20);
            reply.extend_from_slice(&2u32.to_le_bytes());
            reply.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
            reply.extend_from_slice(&8u32.to_le_bytes());
            reply.extend_from_slice(&0u64.to_le_bytes());
            chan.write_all(&reply).ctx(|| "backend channel".into())?;
        }
        Ok(())
    }

    /// Puts one buffer of PFNs on queue `index` without kicking or waiting: as a buffer the
    /// guest has made available when its VMM's connection drops.
    pub fn post_pfns(&mut self, ram: &MemfdRam, index: usize, pfns: &[u32]) {
        let buffer = self.queues[index].buffer;
        self.make_available(ram, index, buffer, &[pfns]);
    }

    /// Writes each chain's PFN array from guest address `buffers` on, one descriptor per
    /// chain, and makes them available on queue `index` (at most the ring's size of them).
    fn make_available<P: AsRef<[u32]>>(
        &mut self,
        ram: &MemfdRam,
        index: usize,
        buffers: u64,
        chains: &[P],
    ) {
        let q = &mut self.queues[index];
        let mut at = buffers;
        for (i, pfns) in chains.iter().enumerate() {
            let pfns = pfns.as_ref();
            for (j, pfn) in pfns.iter().enumerate() {
                ram.write::<u32>(at + 4 * j as u64, *pfn);
            }
            // Descriptor i: device-readable, the PFN array.
            let desc = q.desc + 16 * i as u64;
            ram.write::<u64>(desc, at);
            ram.write::<u32>(desc + 8, (pfns.len() * 4) as u32);
            ram.write::<u16>(desc + 12, 0);
            ram.write::<u16>(desc + 14, 0);
            let slot = u64::from(q.next_avail.wrapping_add(i as u16) % QUEUE_SIZE);
            ram.write::<u16>(q.avail + 4 + 2 * slot, i as u16);
            at += (pfns.len() * 4) as u64;
        }
        fence(Ordering::SeqCst);
        q.next_avail = q.next_avail.wrapping_add(chains.len() as u16);
        ram.write::<u16>(q.avail + 2, q.next_avail);
        fence(Ordering::SeqCst);
    }

    /// Makes `chains` available on queue `index` at once, one descriptor each (at most the ring's
    /// size), their PFN arrays laid out from guest address `buffers` (data pages the test does
    /// not inflate), and kicks once: as a guest that queues everything before the backend looks.
    pub fn post_chains(
        &mut self,
        ram: &MemfdRam,
        index: usize,
        buffers: u64,
        chains: &[Vec<u32>],
    ) -> Result<()> {
        if chains.len() > usize::from(QUEUE_SIZE) {
            return Err(LabError::Other(format!(
                "{} chains do not fit a ring of {QUEUE_SIZE}",
                chains.len()
            )));
        }
        self.make_available(ram, index, buffers, chains);
        let q = &self.queues[index];
        q.kick.write(1).ctx(|| "kick".into())
    }

    /// Whether queue `index` has returned every buffer put on it.
    pub fn all_returned(&self, ram: &MemfdRam, index: usize) -> bool {
        fence(Ordering::SeqCst);
        let q = &self.queues[index];
        ram.read::<u16>(q.used + 2) == q.next_avail
    }

    /// Sends one buffer of PFNs on queue `index` (0 inflate, 1 deflate) and waits until the
    /// backend returns it, as the Linux driver's tell_host does.
    pub fn send_pfns(&mut self, ram: &MemfdRam, index: usize, pfns: &[u32]) -> Result<()> {
        self.post_pfns(ram, index, pfns);
        let q = &mut self.queues[index];
        q.kick.write(1).ctx(|| "kick".into())?;
        // Wait for the used ring to move; the call eventfd wakes us.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            fence(Ordering::SeqCst);
            let used: u16 = ram.read(q.used + 2);
            if used != q.last_used {
                q.last_used = used;
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(LabError::Timeout {
                    what: "the backend to return a PFN buffer".into(),
                    secs: 30.0,
                    last: String::new(),
                });
            }
            let mut pfd = libc::pollfd {
                fd: q.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one descriptor we own.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            if pfd.revents & libc::POLLIN != 0 {
                let _ = q.call.read();
            }
        }
    }

    /// Inflates `pfns` in the driver's batches.
    pub fn inflate(&mut self, ram: &MemfdRam, pfns: &[u32]) -> Result<()> {
        for batch in pfns.chunks(PFNS_PER_BUFFER) {
            self.send_pfns(ram, 0, batch)?;
        }
        Ok(())
    }

    pub fn deflate(&mut self, ram: &MemfdRam, pfns: &[u32]) -> Result<()> {
        for batch in pfns.chunks(PFNS_PER_BUFFER) {
            self.send_pfns(ram, 1, batch)?;
        }
        Ok(())
    }

    /// Writes the config's `actual` (the balloon size in pages), as the driver does.
    pub fn set_actual(&mut self, pages: u32) -> Result<()> {
        self.fe
            .set_config(
                4,
                vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
                &pages.to_le_bytes(),
            )
            .map_err(|e| vhost_err("SET_CONFIG", e))
    }

    /// Reads the backend's config space (num_pages, actual).
    pub fn config(&mut self) -> Result<(u32, u32)> {
        let (_, buf) = self
            .fe
            .get_config(
                0,
                8,
                vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
                &[0u8; 8],
            )
            .map_err(|e| vhost_err("GET_CONFIG", e))?;
        let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        Ok((word(0), word(4)))
    }
}
