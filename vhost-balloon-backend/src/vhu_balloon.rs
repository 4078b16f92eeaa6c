//! The vhost-user glue: the `VhostUserBackend` implementation that moves chains from the vrings
//! into the device model (balloon.rs) and results back, nothing more.

use crate::balloon::{drain_chains, refresh_app_file, request_stats, Balloon};
use crate::config_change::{self, SocketId};
use crate::device::QueueKind;
use crate::guest_log::GuestEvent;
use crate::memory::file::MemoryFile;
use crate::memory::{discard::host_page_size, Backing, GuestRegion};
use std::collections::BTreeSet;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Backend;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::timerfd::TimerFd;

/// Guest RAM with the dirty-page log a migrating frontend gives (SET_LOG_BASE): every write
/// through it (used rings, the only guest memory the backend writes) is marked there, so that a
/// live migration carries it. Until a log is given, marking is a check of an empty slot.
pub type GuestBitmap = vhost_user_backend::bitmap::BitmapMmapRegion;
pub type GuestRam = GuestMemoryMmap<GuestBitmap>;
pub type GuestMemoryMmapAtomic = GuestMemoryAtomic<GuestRam>;
pub type Vring = VringRwLock<GuestMemoryMmapAtomic>;

/// Queues the device exposes: inflate, deflate, statistics, free page reporting.
pub const MAX_QUEUES: usize = 4;

/// The largest virtqueue the device accepts (QEMU's vhost-user-test-device uses 64 by default).
pub const MAX_QUEUE_SIZE: usize = 1024;

/// Threads waiting for the device lock (one device per process), so that the vring thread,
/// which takes it again and again while it drains, lets them in between chains (see
/// `VhostUserBalloon::drain_in_pieces`): std's mutex is not fair, and a thread that unlocks and
/// locks again at once keeps it from a waiter that was only woken.
static WAITING: AtomicUsize = AtomicUsize::new(0);

/// Locks the device state; a panic elsewhere while holding it must not take the device down.
pub fn lock(balloon: &Mutex<Balloon>) -> MutexGuard<'_, Balloon> {
    match balloon.try_lock() {
        Ok(guard) => return guard,
        Err(std::sync::TryLockError::Poisoned(e)) => return e.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => {}
    }
    WAITING.fetch_add(1, Ordering::SeqCst);
    let guard = balloon.lock().unwrap_or_else(|e| e.into_inner());
    WAITING.fetch_sub(1, Ordering::SeqCst);
    guard
}

/// Between two pieces of work under the device lock: lets the threads waiting for it take it
/// first (for at most a few milliseconds, should one never manage to).
fn let_waiters_in() {
    let until = std::time::Instant::now() + Duration::from_millis(5);
    while WAITING.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < until {
        std::thread::yield_now();
    }
}

/// The timer that asks the guest for fresh statistics, shared with the control socket.
pub struct StatsTimer {
    timer: Mutex<TimerFd>,
}

impl StatsTimer {
    pub fn new() -> io::Result<Self> {
        Ok(StatsTimer {
            timer: Mutex::new(TimerFd::new()?),
        })
    }

    pub fn set_interval(&self, seconds: u64) -> io::Result<()> {
        let mut t = self.timer.lock().unwrap_or_else(|e| e.into_inner());
        let result = if seconds == 0 {
            t.clear()
        } else {
            let d = Duration::from_secs(seconds);
            t.reset(d, Some(d))
        };
        result.map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn fd(&self) -> i32 {
        self.timer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_raw_fd()
    }

    fn consume(&self) {
        let _ = self.timer.lock().unwrap_or_else(|e| e.into_inner()).wait();
    }
}

#[derive(Clone)]
pub struct VhostUserBalloon {
    pub balloon: Arc<Mutex<Balloon>>,
    pub stats_timer: Arc<StatsTimer>,
    mem: Arc<Mutex<Option<GuestMemoryMmapAtomic>>>,
    event_idx: Arc<AtomicBool>,
    /// Kept so the vhost crate's end of the channel stays open as long as ours.
    backend_req: Arc<Mutex<Option<Backend>>>,
    /// The process's unnamed sockets at the latest negotiation message, to find the backend
    /// request channel among (see config_change.rs). Taken off the device lock.
    sockets_before_channel: Arc<Mutex<BTreeSet<SocketId>>>,
    /// Rings (one bit each) whose start has been checked for buffers in flight (see
    /// `resume_at_used_index`); a ring's bit clears when it stops.
    resumed: Arc<AtomicU8>,
    /// The guest memory file, when given: every memory table must agree with it.
    memory_file: Option<Arc<Mutex<MemoryFile>>>,
}

impl VhostUserBalloon {
    pub fn new(
        balloon: Arc<Mutex<Balloon>>,
        stats_timer: Arc<StatsTimer>,
        memory_file: Option<Arc<Mutex<MemoryFile>>>,
    ) -> Self {
        VhostUserBalloon {
            balloon,
            stats_timer,
            mem: Arc::new(Mutex::new(None)),
            event_idx: Arc::new(AtomicBool::new(false)),
            backend_req: Arc::new(Mutex::new(None)),
            sockets_before_channel: Arc::new(Mutex::new(BTreeSet::new())),
            resumed: Arc::new(AtomicU8::new(0)),
            memory_file,
        }
    }

    /// A table must describe the guest memory file given on the command line, if one was:
    /// otherwise the app's pages and the driver's could name different memory.
    fn check_table_against_file(&self, regions: &[GuestRegion]) -> io::Result<()> {
        let Some(file) = &self.memory_file else {
            return Ok(());
        };
        // The VMM created (or recreated) the file by the time it sends a table.
        if let Err(e) = refresh_app_file(file, &self.balloon) {
            log::warn!("{e}");
        }
        let checked = file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check_table(regions);
        checked.map_err(|e| {
            log::error!("{e}");
            io::Error::other(e.to_string())
        })
    }

    /// The event id of the statistics timer in the worker's epoll set (ids up to num_queues
    /// are the queues' and the exit event's).
    pub fn stats_timer_event(&self) -> u64 {
        self.num_queues() as u64 + 1
    }

    /// Registers the statistics timer with a daemon's worker.
    pub fn stats_timer_fd(&self) -> i32 {
        self.stats_timer.fd()
    }

    /// The frontend went away: forget what only lived with that connection.
    pub fn disconnected(&self) {
        self.resumed.store(0, Ordering::Relaxed);
        lock(&self.balloon).disconnected();
        *self.backend_req.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Notes which sockets exist now: called at every negotiation message that may come before
    /// the backend request channel, whichever a frontend sends (see config_change.rs).
    fn note_sockets(&self) {
        let now = config_change::unnamed_unix_stream_sockets();
        *self
            .sockets_before_channel
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = now;
    }

    fn memory(&self) -> Option<GuestMemoryMmapAtomic> {
        self.mem.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn process_vring(&self, index: usize, vring: &Vring) {
        let Some(atomic) = self.memory() else {
            log::warn!("queue {index} kicked before the memory table arrived");
            return;
        };
        let mem = atomic.memory();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                if let Err(e) = vring.disable_notification() {
                    log::warn!("queue {index}: {e}");
                }
            }
            let (used, broken) = Self::drain_in_pieces(&self.balloon, index, vring, &mem);
            if used > 0 {
                self.signal(vring, index);
            }
            match broken {
                None => {}
                // A broken ring (e.g. an avail index beyond the queue size) comes from the
                // guest: log it and leave the queue alone; the daemon stays up.
                Some(e) => {
                    let mut balloon = lock(&self.balloon);
                    balloon.counters.rejected.bad_descriptors += 1;
                    balloon
                        .guest_log
                        .warn(GuestEvent::BrokenRing, || format!("queue {index}: {e}"));
                    return;
                }
            }
            if !event_idx {
                return;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    log::warn!("queue {index}: {e}");
                    return;
                }
            }
        }
    }

    /// Drains queue `index` one chain per hold of the device lock (and of the vring's), so a
    /// status or a config read (under QEMU, in a vCPU thread under its big lock) waits for one
    /// chain at most, however many the guest queued. Returns the chains that went back to the
    /// driver and the ring's error, if one ended the drain.
    fn drain_in_pieces(
        balloon: &Mutex<Balloon>,
        index: usize,
        vring: &Vring,
        mem: &GuestRam,
    ) -> (usize, Option<crate::balloon::BalloonError>) {
        let mut used = 0;
        loop {
            let (drained, more) = {
                let mut balloon = lock(balloon);
                let mut state = vring.get_mut();
                // Between two pieces the frontend may have stopped the ring (GET_VRING_BASE, a
                // guest reboot: the tracked pages may be the guest's again) or disabled it
                // (SET_VRING_ENABLE false, cloud-hypervisor's pause): nothing more is taken.
                if !(state.get_queue().ready() && state.is_enabled()) {
                    return (used, None);
                }
                let queue = state.get_queue_mut();
                let drained = drain_chains(&mut balloon, index, queue, mem, 1);
                let more = queue
                    .avail_idx(mem, Ordering::Acquire)
                    .is_ok_and(|avail| avail.0 != queue.next_avail());
                (drained, more)
            };
            match drained {
                Ok(d) if d.taken == 0 => return (used, None),
                Ok(d) => used += d.used,
                Err(e) => return (used, Some(e)),
            }
            if more {
                let_waiters_in();
                // The frontend's own thread (GET_VRING_BASE, SET_VRING_ENABLE) waits for the
                // vring's lock, which no count shows: a moment off the CPU lets a woken waiter
                // take it before the next chain. Only when chains are left: a driver that sends
                // one buffer at a time (Linux) pays nothing.
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// A ring that has just started resumes at the used index in guest memory, taking again
    /// the buffers the device took and never returned. A frontend that reconnects by itself
    /// (cloud-hypervisor) starts each ring at the guest's avail index, so a buffer in flight at
    /// the disconnect would never be returned: the Linux driver waits for every inflate and
    /// deflate buffer (`tell_host`), so its balloon would hang for good, and the statistics
    /// buffer, which the device always holds, would never come back. Taking them again is safe
    /// because this device returns buffers in order and each is idempotent: tracking is a set,
    /// a deflate of untracked pages changes nothing, and reported pages stay isolated until
    /// their buffer is returned. (vhost-user-keeper does the same for the backends it replays
    /// to, so there the rings already start at the used index.)
    fn resume_at_used_index(&self, vrings: &[Vring]) {
        for (index, vring) in vrings.iter().enumerate().take(8) {
            let bit = 1u8 << index;
            if self.resumed.load(Ordering::Relaxed) & bit != 0 {
                continue;
            }
            // On every kick while a ring is not started (one the driver does not use stays so):
            // a read lock, and nothing more.
            let started = {
                let state = vring.get_ref();
                state.get_queue().ready() && state.is_enabled()
            };
            if !started {
                continue;
            }
            let Some(atomic) = self.memory() else {
                return;
            };
            let mem = atomic.memory();
            let mut state = vring.get_mut();
            if !(state.get_queue().ready() && state.is_enabled()) {
                continue;
            }
            self.resumed.fetch_or(bit, Ordering::Relaxed);
            let queue = state.get_queue_mut();
            let Ok(used) = queue.used_idx(&*mem, Ordering::Acquire) else {
                continue;
            };
            let next = queue.next_avail();
            let in_flight = next.wrapping_sub(used.0);
            // More than a ring's worth is no state a device leaves: a guest's scribble.
            if in_flight == 0 || in_flight > queue.size() {
                continue;
            }
            queue.set_next_avail(used.0);
            queue.set_next_used(used.0);
            log::info!(
                "queue {index} started at {next}, {in_flight} buffer(s) past what was returned: \
                 resuming at {} to take them again",
                used.0
            );
        }
    }

    /// The inflate queue, once ready, tells the device model that the device runs and where
    /// the queue resumed (see `Balloon::inflate_queue_running`). vhost-user-backend raises an
    /// event for each ring it registers, so this runs as soon as the frontend starts the rings,
    /// kick or no kick.
    fn observe_inflate_queue(&self, vrings: &[Vring]) {
        let mut balloon = lock(&self.balloon);
        if !balloon.watching_inflate_queue() {
            return;
        }
        let Some(vring) = balloon
            .layout
            .index(QueueKind::Inflate)
            .and_then(|i| vrings.get(i))
        else {
            return;
        };
        // Copied out: the vring lock is not held while the device model works.
        let (running, next_avail) = {
            let state = vring.get_ref();
            (
                state.get_queue().ready() && state.is_enabled(),
                state.get_queue().next_avail(),
            )
        };
        // An event the old connection's thread handles late sees stale rings: only a device
        // the current driver started counts.
        if running && balloon.device_started() {
            balloon.inflate_queue_running(next_avail);
        }
    }

    fn signal(&self, vring: &Vring, index: usize) {
        let needed =
            !self.event_idx.load(Ordering::Relaxed) || vring.needs_notification().unwrap_or(true);
        if needed {
            if let Err(e) = vring.signal_used_queue() {
                log::warn!("queue {index}: signalling the guest failed: {e}");
            }
        }
    }

    fn stats_tick(&self, vrings: &[Vring]) {
        self.stats_timer.consume();
        let Some(atomic) = self.memory() else { return };
        let mem = atomic.memory();
        let mut balloon = lock(&self.balloon);
        let Some(index) = balloon.layout.index(QueueKind::Stats) else {
            return;
        };
        let Some(vring) = vrings.get(index) else {
            return;
        };
        let returned = {
            let mut state = vring.get_mut();
            request_stats(&mut balloon, state.get_queue_mut(), &*mem)
        };
        drop(balloon);
        match returned {
            Ok(true) => self.signal(vring, index),
            Ok(false) => {}
            Err(e) => log::warn!("statistics queue: {e}"),
        }
    }
}

/// The guest memory map as the device model sees it: each region's guest address, size,
/// mapping in this process, backing file and offset, and host page size.
pub fn regions_of<B: vm_memory::bitmap::Bitmap>(mem: &GuestMemoryMmap<B>) -> Vec<GuestRegion> {
    mem.iter()
        .map(|r| {
            let file = r.file_offset().map(|fo| (fo.arc().clone(), fo.start()));
            let page = host_page_size(file.as_ref().map(|(f, _)| &**f));
            GuestRegion::new(
                r.start_addr().0,
                r.len(),
                Backing {
                    host_addr: r.as_ptr() as usize,
                    file,
                },
                page,
            )
        })
        .collect()
}

impl VhostUserBackend for VhostUserBalloon {
    type Bitmap = GuestBitmap;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        // Every queue the driver can set up for the features this device can offer (inflate,
        // deflate, stats, reporting), whatever the operator switched off: the frontend's queue
        // count (QEMU's num_vqs) then never depends on the options. The driver compacts indices
        // over what it negotiates (see device::queues) and leaves the rest unused.
        MAX_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.note_sockets();
        lock(&self.balloon).feature_choice.offered()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn acked_features(&self, features: u64) {
        self.note_sockets();
        lock(&self.balloon).set_acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.note_sockets();
        // LOG_SHMFD: the frontend may give a dirty-page log (see `GuestBitmap`), which
        // cloud-hypervisor needs to migrate the VM at all.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(bit) = 1u8.checked_shl(queue_index) {
            self.resumed.fetch_and(!bit, Ordering::Relaxed);
        }
        lock(&self.balloon).ring_stopped(queue_index as usize);
        Ok(())
    }

    fn reset_device(&self) {
        self.resumed.store(0, Ordering::Relaxed);
        lock(&self.balloon).reset();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        lock(&self.balloon).read_config(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        lock(&self.balloon).write_config(offset, buf);
        Ok(())
    }

    fn update_memory(&self, atomic: GuestMemoryMmapAtomic) -> io::Result<()> {
        self.note_sockets();
        let regions = regions_of(&atomic.memory());
        self.check_table_against_file(&regions)?;
        let save = {
            let mut balloon = lock(&self.balloon);
            for r in &regions {
                log::info!(
                    "guest RAM region: gpa {:#x}, {} MiB, host pages of {} KiB, {}",
                    r.gpa,
                    r.len >> 20,
                    r.host_page_size >> 10,
                    if r.backing.file.is_some() {
                        "fd-backed"
                    } else {
                        "no fd"
                    }
                );
            }
            balloon.set_memory(regions);
            balloon.set_app_table_regions(regions_of(&atomic.memory()));
            balloon.unsaved_settings()
        };
        // Targets cut to guest RAM are saved off the device lock.
        if let Some(Err(e)) = save.map(|job| job.run()) {
            log::error!("{e}");
        }
        // (The vhost-user crate has already swapped the new table into this same atomic, so the
        // old mappings may be gone by now: discards of the old table's regions go through
        // their files, never their addresses; see memory::discard.)
        *self.mem.lock().unwrap_or_else(|e| e.into_inner()) = Some(atomic);
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        let found = {
            let before = self
                .sockets_before_channel
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            config_change::find_new_channel(&before)
        };
        lock(&self.balloon).backend_channel_arrived(found);
        *self.backend_req.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend);
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            log::warn!("unexpected event set {evset:?} for event {device_event}");
        }
        self.resume_at_used_index(vrings);
        self.observe_inflate_queue(vrings);
        let event = u64::from(device_event);
        if event == self.stats_timer_event() {
            self.stats_tick(vrings);
        } else if let Some(vring) = vrings.get(device_event as usize) {
            self.process_vring(device_event as usize, vring);
        } else {
            log::warn!("event for unknown queue {device_event}");
        }
        Ok(())
    }
}
