//! The balloon device's state and what each queue's buffers do to it, independent of
//! vhost-user: the vhost glue (vhu_balloon.rs) and the unit tests on mock rings both drive it
//! through `drain_queue`.

use crate::config_change::{self, ConfigChangeChannel};
use crate::device::features::{self, bit, FeatureChoice};
use crate::device::pfn::{parse_pfns, MAX_PFNS_PER_CHAIN};
use crate::device::stats::{parse_stats, GuestStats};
use crate::device::{BalloonConfig, QueueKind, QueueLayout};
use crate::memory::worker::DiscardWorker;
use crate::memory::{merge_pfns, pages_within, DiscardMode, GuestMemoryMap, PageOutcome, PfnRange};
use crate::state::{PersistentState, SaveJob, StateStore};
use balloon_protocol::{
    bytes_to_pages, pages_to_bytes, BackendStatus, GuestStatsSnapshot, RejectedInput,
};
use std::collections::BTreeSet;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemory};

/// The most bytes read from one statistics chain (16 tags need 160).
const MAX_STATS_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    #[error("target of {requested} bytes exceeds guest RAM ({ram} bytes)")]
    TargetTooLarge { requested: u64, ram: u64 },
    #[error("target of {0} bytes does not fit the device's 32-bit page count")]
    TargetOutOfRange(u64),
    #[error("statistics interval of {0} s is above the limit of {max} s", max = crate::state::MAX_STATS_INTERVAL_SECONDS)]
    StatsIntervalTooLong(u64),
    #[error("persisting the state: {0}")]
    State(#[from] crate::state::StateError),
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
}

/// Running totals, for status and metrics.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub reclaimed_bytes: u64,
    pub reported_free_bytes: u64,
    pub discard_calls: u64,
    pub discard_errors: u64,
    pub inflate_chains: u64,
    pub deflate_chains: u64,
    pub report_chains: u64,
    pub stats_updates: u64,
    pub config_changes_sent: u64,
    pub rejected: RejectedInput,
}

/// What the device does with a chain once handled.
enum ChainDisposition {
    /// Return it to the driver now, with this many bytes written.
    Used(u32),
    /// Keep it (the statistics buffer, returned when fresh figures are wanted).
    Hold,
}

pub struct Balloon {
    pub config: BalloonConfig,
    pub memory: GuestMemoryMap,
    pub feature_choice: FeatureChoice,
    pub acked_features: u64,
    pub layout: QueueLayout,
    /// The frontend sent the driver's writes of `actual` (SET_CONFIG). If it never does, status
    /// derives `actual` from the tracked pages.
    pub actual_from_driver: bool,
    pub discard_enabled: bool,
    pub stats_interval_seconds: u64,
    pub counters: Counters,
    pub stats: Option<(Instant, GuestStats)>,
    /// Head of the statistics buffer the device holds until it wants fresh figures.
    pub stats_held: Option<u16>,
    channel: Option<ConfigChangeChannel>,
    sockets_before_channel: BTreeSet<RawFd>,
    state_file: Option<PathBuf>,
    /// Where the settings persist; written off the device lock (see `unsaved_settings`).
    state_store: Option<Arc<StateStore>>,
    /// Bumped at every change of what the state file holds.
    settings_generation: u64,
    /// Discards inflated pages off the queue's path (see memory::worker); without it, inflate
    /// discards before returning the buffer.
    discard_worker: Option<Arc<DiscardWorker>>,
    /// The user-level balloon app's pages, tracked apart from the driver's.
    pub app: AppBalloon,
    /// Set from the first ring stopped (and at each negotiation) until the inflate queue is
    /// seen running: only then is it known whether the tracked pages are still the balloon's
    /// (see `owner_unknown`, `check_driver_instance`).
    driver_instance_unknown: bool,
    /// Discards were switched back on while `driver_instance_unknown`: discard the tracked
    /// pages once they are known to be the balloon's.
    discard_tracked_when_known: bool,
    /// The inflate queue was seen ready for the current driver and no ring has stopped since.
    /// Config-change messages go out only then (see `inflate_queue_running`).
    device_running: bool,
}

/// The guest app's side of the device (see app_channel.rs).
#[derive(Default)]
pub struct AppBalloon {
    pub memory: GuestMemoryMap,
    /// The app connection that said hello (and passed authentication), if any.
    pub peer: Option<AppPeer>,
    pub target_bytes: u64,
    pub held_bytes: u64,
    pub stalled: bool,
    pub psi_some_avg10: Option<f64>,
}

/// The authenticated app connection.
pub struct AppPeer {
    /// Which connection (a later one replaces it).
    pub session: u64,
    pub pid: u32,
    /// Where targets go; never blocks (a peer that does not read is dropped).
    pub outbox: balloon_protocol::lines::Outbox,
}

/// Why the app's pages were refused; nothing changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AppRangeError {
    #[error("no memory table: the guest has not started the balloon device")]
    NoMemoryTable,
    #[error("{0} ranges in one message (at most {max})", max = balloon_protocol::app::MAX_RANGES_PER_MESSAGE)]
    TooManyRanges(usize),
    #[error("a range is empty or beyond 64-bit guest addresses (start {start}, count {count})")]
    BadRange { start: u64, count: u64 },
    #[error("{0} pages outside guest RAM")]
    OutsideRam(u64),
    #[error("{0} pages are in the driver's balloon")]
    DriverPages(u64),
    #[error("{new} more pages exceed the app target ({room} pages left under it)")]
    OverTarget { new: u64, room: u64 },
}

/// Checks ranges from the app (untrusted) and merges them: no page twice.
pub fn app_ranges(
    ranges: &[balloon_protocol::app::PageRange],
) -> Result<Vec<crate::memory::PfnRange>, AppRangeError> {
    use crate::memory::PfnRange;
    if ranges.len() > balloon_protocol::app::MAX_RANGES_PER_MESSAGE {
        return Err(AppRangeError::TooManyRanges(ranges.len()));
    }
    let checked = ranges
        .iter()
        .map(|r| {
            PfnRange::checked(r.start, r.count).ok_or(AppRangeError::BadRange {
                start: r.start,
                count: r.count,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(crate::memory::merge_ranges(checked))
}

impl Balloon {
    pub fn new(feature_choice: FeatureChoice, state_file: Option<PathBuf>) -> Self {
        Balloon {
            config: BalloonConfig::default(),
            memory: GuestMemoryMap::default(),
            feature_choice,
            acked_features: 0,
            layout: QueueLayout::for_features(0),
            actual_from_driver: false,
            discard_enabled: true,
            stats_interval_seconds: 0,
            counters: Counters::default(),
            stats: None,
            stats_held: None,
            channel: None,
            sockets_before_channel: BTreeSet::new(),
            state_store: state_file.clone().map(|p| Arc::new(StateStore::new(p))),
            settings_generation: 0,
            state_file,
            discard_worker: None,
            app: AppBalloon::default(),
            driver_instance_unknown: false,
            discard_tracked_when_known: false,
            device_running: false,
        }
    }

    /// Lets inflate hand its discards to `worker`.
    pub fn with_discard_worker(mut self, worker: Arc<DiscardWorker>) -> Self {
        self.discard_worker = Some(worker);
        self
    }

    /// The worker, when deferring is safe: only if the driver promised to tell the host before
    /// reusing a page (MUST_TELL_HOST), since a deferred discard must never land on a page the
    /// guest took back without saying so.
    fn deferring_worker(&self) -> Option<Arc<DiscardWorker>> {
        if self.acked_features & bit(features::MUST_TELL_HOST) != 0 {
            self.discard_worker.clone()
        } else {
            None
        }
    }

    /// The frontend's memory table. With a state file, the tracking of the balloon's pages
    /// lives beside it (`STATE.pages`, see memory::persist): a restarted backend given the same
    /// guest RAM takes over what the previous process held, to be discarded again (an
    /// interrupted discard is completed) once the driver's inflate queue shows the pages are
    /// still the balloon's.
    pub fn set_memory(&mut self, regions: Vec<crate::memory::GuestRegion>) {
        // Discards still queued address the old mappings, which go once this table is in.
        if let Some(worker) = &self.discard_worker {
            worker.flush();
        }
        self.memory.replace_regions(regions);
        self.clamp_targets_to_ram();
        let Some(path) = self
            .state_file
            .as_ref()
            .map(|p| crate::state::beside(p, "pages"))
        else {
            return;
        };
        match self.memory.persist_to(&path) {
            Ok(Some(pages)) => {
                log::info!(
                    "took over the tracking of {} MiB of balloon pages from {}",
                    pages_to_bytes(pages) >> 20,
                    path.display()
                );
                // Whose pages they are is decided at the inflate queue, as after a
                // renegotiation; until then nothing discards them.
                self.driver_instance_unknown = true;
                if self.discard_enabled && pages > 0 {
                    self.discard_tracked_when_known = true;
                }
            }
            Ok(None) => {}
            Err(e) => log::warn!(
                "cannot keep the page tracking in {}: {e}; a restart will not know the balloon's pages",
                path.display()
            ),
        }
    }

    /// Takes over what a previous run persisted.
    pub fn restore(&mut self, state: &PersistentState) {
        self.app.target_bytes = state.app_target_bytes;
        self.config.num_pages = state.target_pages.min(u64::from(u32::MAX)) as u32;
        self.stats_interval_seconds = state.stats_interval_seconds;
        self.discard_enabled = state.discard_enabled;
    }

    /// What the state file holds, as of now.
    pub fn settings(&self) -> PersistentState {
        PersistentState {
            version: crate::state::STATE_VERSION,
            target_pages: u64::from(self.config.num_pages),
            stats_interval_seconds: self.stats_interval_seconds,
            discard_enabled: self.discard_enabled,
            app_target_bytes: self.app.target_bytes,
        }
    }

    /// The settings changed: they are saved by whoever changed them, after releasing the
    /// device lock (`unsaved_settings`), so no file I/O happens under the lock the vring
    /// handlers and the VMM's config reads need.
    fn changed(&mut self) {
        self.settings_generation += 1;
    }

    /// A save of the current settings, to run after the device lock is released (a no-op
    /// when a later save already covered them).
    pub fn unsaved_settings(&self) -> Option<SaveJob> {
        self.state_store
            .as_ref()
            .map(|store| store.job(self.settings_generation, self.settings()))
    }

    /// The driver acknowledged features and the frontend sent guest RAM: the device runs.
    pub fn device_started(&self) -> bool {
        self.acked_features & bit(features::VIRTIO_F_VERSION_1) != 0 && !self.memory.is_empty()
    }

    /// A (re)negotiation: the frontend sends the features each time it starts the device, and
    /// a guest reboot reaches a vhost-user backend this way, never as a reset. The queues are
    /// new, so the statistics head held from the old ones means nothing any more (returning it
    /// would hand the new driver's buffer back at once).
    pub fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked;
        self.layout = QueueLayout::for_features(acked);
        self.stats_held = None;
        self.owner_unknown();
        log::info!(
            "driver acknowledged features {acked:#x}: {}",
            features::names(acked).join(" ")
        );
    }

    /// From here until the inflate queue is seen running again, the tracked pages may not be
    /// the balloon's: a guest that reboots has all its pages back, but the backend only sees
    /// the rings stop and, once the new driver starts, a new negotiation, just as for a VM
    /// that is paused and resumed and still holds its balloon. So nothing may discard a
    /// tracked page meanwhile: discards still pending are dropped (and redone once the pages
    /// prove to be the balloon's) and `set_discard(true)` waits.
    fn owner_unknown(&mut self) {
        self.device_running = false;
        self.driver_instance_unknown = true;
        let dropped = self
            .discard_worker
            .as_ref()
            .is_some_and(|worker| worker.cancel_all());
        if dropped && self.discard_enabled {
            self.discard_tracked_when_known = true;
        }
    }

    /// The frontend stopped a ring (it stops them all to reset the device for a guest reboot
    /// or to pause the VM). Runs inside GET_VRING_BASE, before QEMU lets the guest run on.
    pub fn ring_stopped(&mut self) {
        self.owner_unknown();
    }

    /// Whether `inflate_queue_running` has anything left to learn (it does not once the device
    /// runs and the pages' owner is known: the common case, on every kick).
    pub fn watching_inflate_queue(&self) -> bool {
        !self.device_running || self.driver_instance_unknown
    }

    /// The inflate queue runs (ready, as the frontend set it up): the device is started, and
    /// where the queue resumed tells whose the tracked pages are (see
    /// `check_driver_instance`). A config-change message goes out only while the device runs:
    /// QEMU 11.1 dereferences a null device on one that arrives while its vhost device is
    /// stopped (a reset, a paused VM). So one goes out at each start, whatever the target
    /// (it may have changed, to 0 too, while the device was stopped); a driver that has
    /// nothing to do just reads the config.
    pub fn inflate_queue_running(&mut self, next_avail: u16) {
        self.check_driver_instance(next_avail);
        if !self.device_running {
            self.device_running = true;
            self.notify_config_change();
        }
    }

    /// The driver reset the device or the frontend went away: the queues are gone.
    pub fn reset(&mut self) {
        self.owner_unknown();
        self.acked_features = 0;
        self.layout = QueueLayout::for_features(0);
        self.stats_held = None;
    }

    pub fn disconnected(&mut self) {
        self.reset();
        self.channel = None;
    }

    /// Called when the frontend asks for protocol features, before it may send the backend
    /// request channel: remembers which sockets exist now.
    pub fn before_backend_channel(&mut self) {
        self.sockets_before_channel = config_change::unnamed_unix_stream_sockets();
    }

    /// Called from `set_backend_req_fd`: finds the channel and tells the driver about the
    /// current target, which a restarted backend may hold.
    pub fn backend_channel_arrived(&mut self) {
        match config_change::find_new_channel(&self.sockets_before_channel) {
            Ok(channel) => {
                log::info!(
                    "backend request channel found (fd {}): config changes will reach the driver",
                    channel.raw_fd()
                );
                self.channel = Some(channel);
                if self.config.num_pages != 0 {
                    self.notify_config_change();
                }
            }
            Err(e) => log::error!(
                "cannot find the backend request channel ({e}); the driver will not learn target changes until it reads the config itself"
            ),
        }
    }

    fn notify_config_change(&mut self) {
        if !self.device_running {
            log::debug!("device stopped: the driver reads the target when it starts");
            return;
        }
        let Some(channel) = self.channel.as_mut() else {
            log::warn!("no backend request channel: the driver is not told about the new target");
            return;
        };
        match channel.notify(false) {
            Ok(()) => self.counters.config_changes_sent += 1,
            Err(e) => {
                log::error!("config-change message failed: {e}");
                self.channel = None;
            }
        }
    }

    /// Targets accepted while guest RAM was unknown (a restarted backend, a target set before
    /// the VM started) are cut to RAM once it is known; the cut is saved.
    fn clamp_targets_to_ram(&mut self) {
        let ram = self.memory.ram_bytes();
        if ram == 0 {
            return;
        }
        let target = pages_to_bytes(u64::from(self.config.num_pages));
        if target > ram {
            log::warn!(
                "target of {} MiB is above guest RAM ({} MiB): lowered to guest RAM",
                target >> 20,
                ram >> 20
            );
            self.config.num_pages = u32::try_from(bytes_to_pages(ram)).unwrap_or(u32::MAX);
            self.changed();
        }
        if self.app.target_bytes > ram {
            log::warn!(
                "app target of {} MiB is above guest RAM ({} MiB): lowered to guest RAM",
                self.app.target_bytes >> 20,
                ram >> 20
            );
            self.app.target_bytes = ram;
            self.changed();
        }
    }

    /// A balloon cannot be larger than guest RAM (once the memory table is known).
    fn check_target(&self, target_bytes: u64) -> Result<(), BalloonError> {
        let ram = self.memory.ram_bytes();
        if ram > 0 && target_bytes > ram {
            return Err(BalloonError::TargetTooLarge {
                requested: target_bytes,
                ram,
            });
        }
        Ok(())
    }

    /// Asks the guest for a balloon of `target_bytes`.
    pub fn set_target(&mut self, target_bytes: u64) -> Result<(), BalloonError> {
        self.check_target(target_bytes)?;
        let pages = u32::try_from(bytes_to_pages(target_bytes))
            .map_err(|_| BalloonError::TargetOutOfRange(target_bytes))?;
        let changed = pages != self.config.num_pages;
        self.config.num_pages = pages;
        self.changed();
        if changed {
            log::info!("target {} MiB", target_bytes >> 20);
            self.notify_config_change();
        }
        Ok(())
    }

    /// Checks a statistics interval before anything (the timer, the state file) takes it.
    pub fn check_stats_interval(seconds: u64) -> Result<(), BalloonError> {
        if seconds > crate::state::MAX_STATS_INTERVAL_SECONDS {
            return Err(BalloonError::StatsIntervalTooLong(seconds));
        }
        Ok(())
    }

    pub fn set_stats_interval(&mut self, seconds: u64) -> Result<(), BalloonError> {
        Self::check_stats_interval(seconds)?;
        self.stats_interval_seconds = seconds;
        self.changed();
        Ok(())
    }

    /// Switching discards off (before VFIO, postcopy or a snapshot) takes effect before this
    /// returns: discards the worker has not run yet are dropped and one in flight is waited
    /// for. Switching them back on returns the pages ballooned meanwhile (and those dropped).
    pub fn set_discard(&mut self, enabled: bool) -> Result<(), BalloonError> {
        let was = self.discard_enabled;
        self.discard_enabled = enabled;
        if !enabled {
            self.discard_tracked_when_known = false;
            if let Some(worker) = &self.discard_worker {
                worker.cancel_all();
            }
        }
        self.changed();
        if enabled && !was {
            if self.driver_instance_unknown {
                log::info!(
                    "discards on; the tracked pages are discarded once the driver's inflate queue shows they are still its"
                );
                self.discard_tracked_when_known = true;
            } else {
                self.discard_tracked();
            }
        }
        Ok(())
    }

    /// Discards every tracked page again (off the queue's path when a worker runs). Only with
    /// MUST_TELL_HOST: without it the driver may reuse a page before deflating it, so only the
    /// discard at inflate time is safe.
    fn discard_tracked(&mut self) {
        if !self.discard_enabled {
            return;
        }
        if self.acked_features & bit(features::MUST_TELL_HOST) == 0 {
            log::info!("the driver did not negotiate MUST_TELL_HOST: tracked pages are not discarded again");
            return;
        }
        let out = match self.deferring_worker() {
            Some(worker) => {
                let mut jobs = Vec::new();
                let out = self
                    .memory
                    .discard_all_ballooned(DiscardMode::Defer(&mut jobs));
                worker.submit(jobs);
                out
            }
            None => self.memory.discard_all_ballooned(DiscardMode::Now),
        };
        self.count_discards(out);
        self.counters.reclaimed_bytes += out.discarded_bytes;
    }

    /// The first look at the inflate queue after a negotiation. Its next index is where the
    /// frontend resumed it: 0 means the driver has inflated nothing since it started the
    /// device, so it is a new instance (the guest rebooted or reloaded the driver) and every
    /// tracked page is the guest's again. Otherwise (a VM resumed, a backend restarted behind
    /// the keeper) the tracked pages are still the balloon's. (The 16-bit index wrapping to
    /// exactly 0 would only lose tracking, never discard a page in use.)
    fn check_driver_instance(&mut self, inflate_next_avail: u16) {
        if !std::mem::take(&mut self.driver_instance_unknown) {
            return;
        }
        let discard = std::mem::take(&mut self.discard_tracked_when_known);
        if inflate_next_avail == 0 {
            let ranges = self.memory.clear_tracking();
            self.withdraw_discards(&ranges);
            let pages: u64 = ranges.iter().map(|r| r.count).sum();
            if pages > 0 {
                log::info!(
                    "a new driver instance (guest reboot or driver reload): the {} MiB tracked from before are the guest's again",
                    pages_to_bytes(pages) >> 20
                );
            }
        } else if discard {
            self.discard_tracked();
        }
    }

    /// A config read from the frontend.
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config.read(offset, size)
    }

    /// A config write from the frontend (the driver's `actual`).
    pub fn write_config(&mut self, offset: u32, data: &[u8]) {
        self.actual_from_driver = true;
        if self.config.write(offset, data) {
            log::debug!("driver reports actual {} pages", self.config.actual);
        }
    }

    pub fn status(&self) -> BackendStatus {
        BackendStatus {
            device_started: self.device_started(),
            guest_ram_bytes: self.memory.ram_bytes(),
            target_bytes: pages_to_bytes(u64::from(self.config.num_pages)),
            actual_bytes: if self.actual_from_driver {
                pages_to_bytes(u64::from(self.config.actual))
            } else {
                pages_to_bytes(self.memory.ballooned_pages())
            },
            actual_from_driver: self.actual_from_driver,
            ballooned_bytes: pages_to_bytes(self.memory.ballooned_pages()),
            reclaimed_bytes: self.counters.reclaimed_bytes
                + self.worker_count(|c| &c.discarded_bytes),
            reported_free_bytes: self.counters.reported_free_bytes,
            discard_enabled: self.discard_enabled,
            discard_errors: self.counters.discard_errors + self.worker_count(|c| &c.discard_errors),
            config_change_channel: self.channel.is_some(),
            stats_interval_seconds: self.stats_interval_seconds,
            stats: self.stats.as_ref().map(|(at, s)| GuestStatsSnapshot {
                age_seconds: at.elapsed().as_secs_f64(),
                values: s.values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                unknown: s.unknown.clone(),
            }),
            rejected: self.counters.rejected.clone(),
            features: features::names(self.acked_features),
            app: balloon_protocol::AppStatus {
                connected: self.app.peer.is_some(),
                target_bytes: self.app.target_bytes,
                ballooned_bytes: pages_to_bytes(self.app.memory.ballooned_pages()),
                held_bytes: self.app.held_bytes,
                stalled: self.app.stalled,
                psi_some_avg10: self.app.psi_some_avg10,
                reclaimable: !self.memory.is_empty(),
                note: self.memory.is_empty().then(|| {
                    "the guest has not started the balloon device, so the backend has no \
                     memory table: app pages cannot be reclaimed (load virtio_balloon in the guest)"
                        .to_string()
                }),
            },
        }
    }

    /// Sends the app its target, if one is connected. Never blocks: a peer whose queue is
    /// full does not read, and is dropped (its pages are the guest's again).
    pub fn send_app_target(&mut self) {
        use balloon_protocol::app::{encode, HostMessage};
        let line = encode(HostMessage::Target {
            bytes: self.app.target_bytes,
        });
        let Some(peer) = &self.app.peer else { return };
        if let Err(e) = peer.outbox.send(line) {
            log::warn!("guest app (pid {}): {e}", peer.pid);
            self.app.peer = None;
            self.app_gone();
        }
    }

    pub fn set_app_target(&mut self, target_bytes: u64) -> Result<(), BalloonError> {
        self.check_target(target_bytes)?;
        self.app.target_bytes = target_bytes;
        self.changed();
        self.send_app_target();
        Ok(())
    }

    /// An authenticated app said hello on connection `session`: it replaces any earlier one
    /// (whatever an earlier app held, the guest kernel freed when it exited).
    pub fn app_hello(&mut self, session: u64, pid: u32, outbox: balloon_protocol::lines::Outbox) {
        if let Some(old) = self.app.peer.take() {
            if old.session != session {
                old.outbox.close();
            }
        }
        self.app_gone();
        log::info!("guest app (pid {pid}) connected");
        self.app.peer = Some(AppPeer {
            session,
            pid,
            outbox,
        });
        self.send_app_target();
    }

    /// Whether `session` is the app's current connection.
    pub fn is_app_session(&self, session: u64) -> bool {
        self.app.peer.as_ref().is_some_and(|p| p.session == session)
    }

    /// Connection `session` ended; if it was the app's, its pages are the guest's again.
    pub fn app_closed(&mut self, session: u64) {
        if self.is_app_session(session) {
            log::info!("guest app channel closed: its pages are the guest's again");
            self.app.peer = None;
            self.app_gone();
        }
    }

    /// The app's pages are the guest's again (it exited, or a new one said hello).
    pub fn app_gone(&mut self) {
        let ranges = self.app.memory.clear_tracking();
        // The guest reuses these pages at once: no discard queued for them may land.
        self.withdraw_discards(&ranges);
        let pages: u64 = ranges.iter().map(|r| r.count).sum();
        if pages > 0 {
            log::info!(
                "app balloon released: {} MiB back to the guest",
                pages_to_bytes(pages) >> 20
            );
        }
        self.app.held_bytes = 0;
        self.app.stalled = false;
    }

    /// The app holds these pinned pages. Trusted no further than its target: every page must
    /// be guest RAM, none may be in the driver's balloon, and the new ones must fit under the
    /// app target; otherwise the whole message is refused and nothing changes. The discards
    /// go to the worker, off this lock (the app asks before reusing a page, and `app_deflate`
    /// withdraws them first).
    pub fn app_inflated(
        &mut self,
        ranges: &[balloon_protocol::app::PageRange],
    ) -> Result<(), AppRangeError> {
        if self.memory.is_empty() {
            return Err(AppRangeError::NoMemoryTable);
        }
        let ranges = app_ranges(ranges)?;
        let outside = self.app.memory.pages_outside(&ranges);
        if outside > 0 {
            self.counters.rejected.pages_outside_ram += outside;
            return Err(AppRangeError::OutsideRam(outside));
        }
        let driver = self.memory.tracked_pages(&ranges);
        if driver > 0 {
            return Err(AppRangeError::DriverPages(driver));
        }
        let total: u64 = ranges.iter().map(|r| r.count).sum();
        let new = total - self.app.memory.tracked_pages(&ranges);
        let room =
            bytes_to_pages(self.app.target_bytes).saturating_sub(self.app.memory.ballooned_pages());
        if new > room {
            return Err(AppRangeError::OverTarget { new, room });
        }
        let out = match (self.discard_enabled, self.discard_worker.clone()) {
            (false, _) => self.app.memory.inflate(&ranges, DiscardMode::Off),
            (true, Some(worker)) => {
                let mut jobs = Vec::new();
                let out = self
                    .app
                    .memory
                    .inflate(&ranges, DiscardMode::Defer(&mut jobs));
                worker.submit(jobs);
                out
            }
            // Only unit tests run without a worker.
            (true, None) => self.app.memory.inflate(&ranges, DiscardMode::Now),
        };
        self.count_discards(out);
        self.counters.reclaimed_bytes += out.discarded_bytes;
        Ok(())
    }

    /// The app wants these pages back: after this returns no discard touches them.
    pub fn app_deflate(
        &mut self,
        ranges: &[balloon_protocol::app::PageRange],
    ) -> Result<(), AppRangeError> {
        let ranges = app_ranges(ranges)?;
        self.withdraw_discards(&ranges);
        let out = self.app.memory.deflate(&ranges);
        self.count_discards(out);
        Ok(())
    }

    /// The guest takes these pages back: forgets their queued discards and waits for any in
    /// flight (one bounded piece at most).
    fn withdraw_discards(&self, ranges: &[PfnRange]) {
        if let Some(worker) = &self.discard_worker {
            let gpa: Vec<(u64, u64)> = ranges
                .iter()
                .map(|r| (r.gpa(), r.gpa().saturating_add(r.bytes())))
                .collect();
            worker.withdraw(&gpa);
        }
    }

    fn worker_count(
        &self,
        counter: impl Fn(&crate::memory::worker::WorkerCounters) -> &std::sync::atomic::AtomicU64,
    ) -> u64 {
        self.discard_worker.as_ref().map_or(0, |w| {
            counter(&w.counters).load(std::sync::atomic::Ordering::Relaxed)
        })
    }

    fn count_discards(&mut self, out: PageOutcome) {
        self.counters.discard_calls += out.discard_calls;
        self.counters.discard_errors += out.discard_errors;
        self.counters.rejected.pages_outside_ram += out.outside_pages;
    }

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

    fn handle_chain<M: GuestMemory>(
        &mut self,
        kind: QueueKind,
        chain: DescriptorChain<&M>,
    ) -> ChainDisposition {
        match kind {
            QueueKind::Inflate | QueueKind::Deflate => {
                let data = self.read_chain(chain, MAX_PFNS_PER_CHAIN * 4);
                let mut pfns = Vec::with_capacity(data.len() / 4);
                if parse_pfns(&data, &mut pfns) != 0 {
                    self.counters.rejected.bad_descriptors += 1;
                }
                let ranges = merge_pfns(&mut pfns);
                if kind == QueueKind::Inflate {
                    self.counters.inflate_chains += 1;
                    let out = match (self.discard_enabled, self.deferring_worker()) {
                        (false, _) => self.memory.inflate(&ranges, DiscardMode::Off),
                        (true, None) => self.memory.inflate(&ranges, DiscardMode::Now),
                        (true, Some(worker)) => {
                            let mut jobs = Vec::new();
                            let out = self.memory.inflate(&ranges, DiscardMode::Defer(&mut jobs));
                            worker.submit(jobs);
                            out
                        }
                    };
                    self.count_discards(out);
                    self.counters.reclaimed_bytes += out.discarded_bytes;
                    log_outside("inflate", out);
                } else {
                    self.counters.deflate_chains += 1;
                    // Before the guest may reuse these pages, no discard of them may be
                    // pending or running.
                    if let Some(worker) = &self.discard_worker {
                        let gpa: Vec<(u64, u64)> = ranges
                            .iter()
                            .map(|r| (r.gpa(), r.gpa() + r.bytes()))
                            .collect();
                        worker.withdraw(&gpa);
                    }
                    let out = self.memory.deflate(&ranges);
                    self.count_discards(out);
                    log_outside("deflate", out);
                }
                ChainDisposition::Used(0)
            }
            QueueKind::Stats => {
                let data = self.read_chain(chain.clone(), MAX_STATS_BYTES);
                let (stats, err) = parse_stats(&data);
                if let Some(e) = err {
                    self.counters.rejected.bad_stats += 1;
                    log::warn!("guest statistics: {e}");
                }
                self.counters.stats_updates += 1;
                self.stats = Some((Instant::now(), stats));
                ChainDisposition::Hold
            }
            QueueKind::Reporting => {
                // Free page reports are device-writable buffers whose addresses are the free
                // pages themselves; nothing is written back.
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
                    log_outside("free page report", out);
                }
                ChainDisposition::Used(0)
            }
            QueueKind::FreePageHint => {
                // Not offered; a driver that uses it anyway gets its buffers back untouched.
                self.counters.rejected.bad_descriptors += 1;
                ChainDisposition::Used(0)
            }
        }
    }
}

fn log_outside(what: &str, out: PageOutcome) {
    if out.outside_pages > 0 {
        log::warn!(
            "{what}: {} pages outside guest RAM skipped",
            out.outside_pages
        );
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
    let Some(kind) = balloon.layout.kind(index) else {
        // A queue the negotiated features do not give a meaning: return its buffers unread.
        let heads: Vec<u16> = queue.iter(mem)?.map(|c| c.head_index()).collect();
        for head in &heads {
            balloon.counters.rejected.bad_descriptors += 1;
            queue.add_used(mem, *head, 0)?;
        }
        return Ok(heads.len());
    };
    if kind == QueueKind::Inflate {
        balloon.inflate_queue_running(queue.next_avail());
    }
    let chains: Vec<DescriptorChain<&M>> = queue.iter(mem)?.collect();
    let mut used = 0;
    for chain in chains {
        let head = chain.head_index();
        match balloon.handle_chain(kind, chain) {
            ChainDisposition::Used(len) => {
                queue.add_used(mem, head, len)?;
                used += 1;
            }
            ChainDisposition::Hold => {
                if let Some(older) = balloon.stats_held.replace(head) {
                    queue.add_used(mem, older, 0)?;
                    used += 1;
                }
            }
        }
    }
    Ok(used)
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
