//! The balloon device's state, independent of vhost-user: the vhost glue (vhu_balloon.rs) and
//! the unit tests on mock rings both drive it through `drain_queue`. Here: targets, settings
//! and their persistence, features and the lifecycle's effects; beside it, what each queue
//! does (queues.rs), the guest app's balloon (app.rs), the status (status.rs) and the
//! lifecycle's states and transitions (lifecycle.rs).

mod app;
pub mod claim;
pub mod lifecycle;
mod queues;
mod settings;
mod status;

pub use app::{app_ranges, refresh_app_file, AppBalloon, AppPeer, AppRam, AppRangeError};
use lifecycle::{Action, Event, Lifecycle};
pub use queues::{drain_chains, drain_queue, request_stats, Drained};

use crate::config_change::{self, ConfigChangeChannel};
use crate::device::features::{self, bit, FeatureChoice};
use crate::device::stats::GuestStats;
use crate::device::{BalloonConfig, QueueLayout};
use crate::memory::worker::DiscardWorker;
use crate::memory::{DiscardMode, GuestMemoryMap, PageOutcome, PfnRange};
use crate::state::StateStore;
use balloon_protocol::{bytes_to_pages, pages_to_bytes, RejectedInput};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

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

pub struct Balloon {
    pub config: BalloonConfig,
    pub memory: GuestMemoryMap,
    pub feature_choice: FeatureChoice,
    pub acked_features: u64,
    pub layout: QueueLayout,
    /// The frontend sent the driver's writes of `actual` (SET_CONFIG). The balloon is what the
    /// backend tracks either way; the driver's word is only checked against it (`claim`).
    pub actual_from_driver: bool,
    /// The driver's word against the tracked pages (see claim.rs).
    claim: claim::DriverClaim,
    pub discard_enabled: bool,
    pub stats_interval_seconds: u64,
    pub counters: Counters,
    pub stats: Option<(Instant, GuestStats)>,
    /// Head of the statistics buffer the device holds until it wants fresh figures.
    pub stats_held: Option<u16>,
    channel: Option<ConfigChangeChannel>,
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
    /// What the guest causes, logged at most once per interval per kind (see guest_log.rs).
    pub guest_log: crate::guest_log::GuestLog,
    /// Whether the device runs and whose the tracked pages are (see lifecycle.rs).
    lifecycle: Lifecycle,
}

/// Runs `op` with the discard mode the settings give: none when discards are off, deferred to
/// `worker` when there is one, else at once (only unit tests run without a worker).
fn discard_with(
    discard_enabled: bool,
    worker: Option<&DiscardWorker>,
    op: impl FnOnce(DiscardMode) -> PageOutcome,
) -> PageOutcome {
    match (discard_enabled, worker) {
        (false, _) => op(DiscardMode::Off),
        (true, Some(worker)) => {
            let mut jobs = Vec::new();
            let out = op(DiscardMode::Defer(&mut jobs));
            worker.submit(jobs);
            out
        }
        (true, None) => op(DiscardMode::Now),
    }
}

/// Logs `why` with how much of `ranges` the guest has back.
fn log_given_back(ranges: &[PfnRange], why: &str) {
    let pages: u64 = ranges.iter().map(|r| r.count).sum();
    if pages > 0 {
        log::info!(
            "{why}: {} MiB back to the guest",
            pages_to_bytes(pages) >> 20
        );
    }
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
            claim: claim::DriverClaim::default(),
            discard_enabled: true,
            stats_interval_seconds: 0,
            counters: Counters::default(),
            stats: None,
            stats_held: None,
            channel: None,
            state_store: state_file.clone().map(|p| Arc::new(StateStore::new(p))),
            settings_generation: 0,
            state_file,
            guest_log: Default::default(),
            discard_worker: None,
            app: AppBalloon::default(),
            lifecycle: Lifecycle::default(),
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
                self.transition(Event::TrackingAdopted {
                    rediscard: self.discard_enabled && pages > 0,
                });
            }
            Ok(None) => {}
            Err(e) => log::warn!(
                "cannot keep the page tracking in {}: {e}; a restart will not know the balloon's pages",
                path.display()
            ),
        }
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
        // A frontend switches dirty-page logging on and off by acking features again while the
        // device runs (a migration starting or ending): nothing else changes, the device goes
        // on as it was.
        let log_all = bit(features::VHOST_F_LOG_ALL);
        if self.acked_features != 0 && (acked ^ self.acked_features) == log_all {
            self.acked_features = acked;
            log::info!(
                "dirty-page logging {} (a migration {})",
                if acked & log_all != 0 { "on" } else { "off" },
                if acked & log_all != 0 {
                    "starts"
                } else {
                    "ends"
                }
            );
            return;
        }
        self.acked_features = acked;
        self.layout = QueueLayout::for_features(acked);
        self.stats_held = None;
        self.owner_unknown();
        log::info!(
            "driver acknowledged features {acked:#x}: {}",
            features::names(acked).join(" ")
        );
        let missing = features::device_features(self.feature_choice.offered()) & !acked;
        if acked != 0 && missing != 0 {
            log::warn!(
                "the guest did not take {}: its driver lacks them, or its VMM did not offer them \
                 (cloud-hypervisor's generic vhost-user device passes no device feature; see \
                 docs/upstream-cloud-hypervisor-generic-features.md)",
                features::names(missing).join(" ")
            );
        }
    }

    /// Moves the lifecycle on `event` and does what the transition says.
    fn transition(&mut self, event: Event) {
        let (next, actions) = self.lifecycle.on(event);
        // Not on every kick of a running inflate queue (no change, nothing to do).
        if next != self.lifecycle || !actions.is_empty() {
            log::debug!("lifecycle {:?} on {event:?}: {next:?}", self.lifecycle);
        }
        self.lifecycle = next;
        for action in actions {
            match action {
                Action::ForgetTracked => self.forget_tracked(),
                Action::DiscardTracked => self.discard_tracked(),
                Action::NotifyConfigChange => self.notify_config_change(),
            }
        }
    }

    /// The tracked pages may be the guest's again (see lifecycle.rs): discards still pending
    /// are dropped (and redone if the pages prove to be the balloon's).
    fn owner_unknown(&mut self) {
        let dropped = self
            .discard_worker
            .as_ref()
            .is_some_and(|worker| worker.cancel_all());
        self.transition(Event::OwnerInDoubt {
            dropped_discards: dropped && self.discard_enabled,
        });
    }

    /// The frontend stopped ring `index` (it stops them all to reset the device for a guest
    /// reboot or to pause the VM). Runs inside GET_VRING_BASE, before QEMU lets the guest run
    /// on. The statistics buffer held on that ring is forgotten: the ring resumes at its used
    /// index, where the buffer is taken again (see `VhostUserBalloon::resume_at_used_index`),
    /// and holding it twice would return it twice.
    pub fn ring_stopped(&mut self, index: usize) {
        if self.layout.kind(index) == Some(crate::device::QueueKind::Stats) {
            self.stats_held = None;
        }
        self.owner_unknown();
    }

    /// Whether `inflate_queue_running` has anything left to learn (it does not once the device
    /// runs: the common case, on every kick).
    pub fn watching_inflate_queue(&self) -> bool {
        self.lifecycle.watching_inflate_queue()
    }

    /// The inflate queue runs (ready, as the frontend set it up): the device is started, and
    /// where the queue resumed tells whose the tracked pages are. Its next index is 0 when
    /// the driver has inflated nothing since it started the device: a new instance (the guest
    /// rebooted or reloaded the driver). Otherwise (a VM resumed, a backend restarted behind
    /// the keeper) the tracked pages are still the balloon's. (The 16-bit index wrapping to
    /// exactly 0 would only lose tracking, never discard a page in use.)
    pub fn inflate_queue_running(&mut self, next_avail: u16) {
        self.transition(Event::InflateQueueRunning {
            new_driver: next_avail == 0,
        });
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

    /// Called from `set_backend_req_fd` with the channel found there (off the device lock, see
    /// config_change.rs): keeps it and tells the driver about the current target, which a
    /// restarted backend may hold.
    pub fn backend_channel_arrived(
        &mut self,
        found: Result<ConfigChangeChannel, config_change::ConfigChangeError>,
    ) {
        match found {
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
        if !self.lifecycle.running() {
            log::debug!("device stopped: the driver reads the target when it starts");
            return;
        }
        let Some(channel) = self.channel.as_mut() else {
            // cloud-hypervisor starts the rings before it sends the channel: the target goes
            // out when it arrives (`backend_channel_arrived`). One that never sends it shows in
            // the status (`config_change_channel` false).
            log::info!(
                "no backend request channel yet: the driver is told the target when one arrives"
            );
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
        let ram = self.guest_ram_bytes();
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

    /// Guest RAM as far as it is known: from the memory table, or the guest memory file.
    pub fn guest_ram_bytes(&self) -> u64 {
        self.memory.ram_bytes().max(self.app.memory.ram_bytes())
    }

    /// A balloon cannot be larger than guest RAM (once the memory table is known).
    fn check_target(&self, target_bytes: u64) -> Result<(), BalloonError> {
        let ram = self.guest_ram_bytes();
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
            if let Some(worker) = &self.discard_worker {
                worker.cancel_all();
            }
            self.transition(Event::DiscardOff);
        }
        self.changed();
        if enabled && !was {
            self.transition(Event::DiscardOn);
            if matches!(self.lifecycle, Lifecycle::OwnerUnknown { .. }) {
                log::info!(
                    "discards on; the tracked pages are discarded once the driver's inflate queue shows they are still its"
                );
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
        let worker = self.deferring_worker();
        let memory = &mut self.memory;
        let out = discard_with(true, worker.as_deref(), |mode| {
            memory.discard_all_ballooned(mode)
        });
        self.count_discards(out);
        self.counters.reclaimed_bytes += out.discarded_bytes;
    }

    /// A new driver instance: every tracked page is the guest's again. No discard of them is
    /// queued: the owner came in doubt first, which dropped them all (`owner_unknown`), and
    /// the driver inflates nothing before this.
    fn forget_tracked(&mut self) {
        let ranges = self.memory.clear_tracking();
        log_given_back(
            &ranges,
            "a new driver instance (guest reboot or driver reload)",
        );
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
        self.check_claim(Instant::now());
    }

    /// Compares the driver's word with the tracked pages; logs a dispute once when it starts
    /// and once when it ends (the guest decides how often it writes, so nothing per write).
    pub(crate) fn check_claim(&mut self, now: Instant) {
        let claimed = self
            .actual_from_driver
            .then_some(u64::from(self.config.actual));
        let tracked = self.memory.ballooned_pages();
        let before = self.claim;
        self.claim = before.observe(claimed, tracked, now);
        match (before.disputed(), self.claim.disputed()) {
            (false, true) => log::warn!(
                "the guest driver says its balloon is {} MiB, but it handed over {} MiB: the \
                 balloon counts as {} MiB (what the host holds back) until the two agree",
                pages_to_bytes(claimed.unwrap_or(0)) >> 20,
                pages_to_bytes(tracked) >> 20,
                pages_to_bytes(tracked) >> 20
            ),
            (true, false) => {
                log::info!("the guest driver's balloon size agrees with its pages again")
            }
            _ => {}
        }
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

    fn count_discards(&mut self, out: PageOutcome) {
        self.counters.discard_calls += out.discard_calls;
        self.counters.discard_errors += out.discard_errors;
        self.counters.rejected.pages_outside_ram += out.outside_pages;
    }
}
