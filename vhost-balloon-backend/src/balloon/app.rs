//! The guest app's balloon (the user-level alternative to the driver): its pages, tracked
//! apart from the driver's, and what the backend does with the app's messages (see
//! app_channel.rs for the connection). The app is trusted no further than its target.

use super::{Balloon, BalloonError};
use crate::memory::file::{MemoryFile, MemoryFileError};
use crate::memory::{merge_ranges, GuestMemoryMap, GuestRegion, PfnRange};
use balloon_protocol::app::{encode, GuestMemInfo, HostMessage, PageRange, MAX_RANGES_PER_MESSAGE};
use balloon_protocol::bytes_to_pages;
use balloon_protocol::lines::Outbox;
use std::sync::Mutex;

/// Where the app's pages are named.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum AppRam {
    /// In the vhost-user memory table (the driver started the device).
    #[default]
    Table,
    /// In the guest memory file given on the command line (memory::file), which a memory
    /// table must then agree with; the table never replaces it.
    File,
}

/// The guest app's side of the device (see app_channel.rs).
#[derive(Default)]
pub struct AppBalloon {
    pub memory: GuestMemoryMap,
    pub ram: AppRam,
    /// The app connection that said hello (and passed authentication), if any.
    pub peer: Option<AppPeer>,
    pub target_bytes: u64,
    pub held_bytes: u64,
    pub stalled: bool,
    pub psi_some_avg10: Option<f64>,
    /// The guest's memory figures from the app's last state, and when they came.
    pub meminfo: Option<(GuestMemInfo, std::time::Instant)>,
}

/// The authenticated app connection.
pub struct AppPeer {
    /// Which connection (a later one replaces it).
    pub session: u64,
    pub pid: u32,
    /// Where targets go; never blocks (a peer that does not read is dropped).
    pub outbox: Outbox,
}

/// Why the app's pages were refused; nothing changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AppRangeError {
    #[error(
        "no guest memory map: the guest has not started the balloon device and no guest \
         memory file is open"
    )]
    NoMemoryTable,
    #[error("{0} ranges in one message (at most {max})", max = MAX_RANGES_PER_MESSAGE)]
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
pub fn app_ranges(ranges: &[PageRange]) -> Result<Vec<PfnRange>, AppRangeError> {
    if ranges.len() > MAX_RANGES_PER_MESSAGE {
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
    Ok(merge_ranges(checked))
}

/// Opens or reopens the guest memory file (off the device lock: it is file I/O) and gives new
/// regions to the app's balloon. The regions are installed while the file's lock is still
/// held (the order is always file, then device; nothing takes the file's lock under the
/// device's), so two refreshes racing cannot install the older file last. A target cut to the
/// new RAM is saved after both locks are released.
pub fn refresh_app_file(
    file: &Mutex<MemoryFile>,
    balloon: &Mutex<Balloon>,
) -> Result<(), MemoryFileError> {
    let save = {
        let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
        match file.refresh()? {
            Some(regions) => {
                let mut balloon = crate::vhu_balloon::lock(balloon);
                balloon.set_app_file_regions(regions);
                balloon.unsaved_settings()
            }
            None => None,
        }
    };
    if let Some(Err(e)) = save.map(|job| job.run()) {
        log::error!("{e}");
    }
    Ok(())
}

impl Balloon {
    /// The app's pages are named in the guest memory file's regions from now on. A file the
    /// VMM replaced belongs to a new guest: whatever an app held in the old one is gone.
    pub fn set_app_file_regions(&mut self, regions: Vec<GuestRegion>) {
        if self.app.memory.ballooned_pages() > 0 {
            // An app still pinning pages named in the old view would be counted as holding
            // nothing: end its connection, so that it says hello again and starts over.
            if let Some(peer) = self.app.peer.take() {
                log::warn!(
                    "guest app (pid {}): the guest memory file changed; reconnecting it",
                    peer.pid
                );
                peer.outbox.close();
            }
            self.app_gone();
        }
        self.app.memory.replace_regions(regions);
        self.app.ram = AppRam::File;
        self.clamp_targets_to_ram();
        // The app may have been told a target before the file's RAM was known.
        self.send_app_target();
    }

    /// A memory table arrived: the app's pages are named in it unless the memory file names
    /// them (the table was checked against the file by then).
    pub fn set_app_table_regions(&mut self, regions: Vec<GuestRegion>) {
        if self.app.ram == AppRam::Table {
            self.app.memory.replace_regions(regions);
        }
    }

    /// Sends the app its target, if one is connected. Never blocks: a peer whose queue is
    /// full does not read, and is dropped (its pages are the guest's again).
    pub fn send_app_target(&mut self) {
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
    pub fn app_hello(&mut self, session: u64, pid: u32, outbox: Outbox) {
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
        // The guest reuses these pages at once, and the app's discards are queued while it
        // holds them: none may land now.
        self.withdraw_discards(&ranges);
        super::log_given_back(&ranges, "app balloon released");
        self.app.held_bytes = 0;
        self.app.stalled = false;
        self.app.meminfo = None;
    }

    /// The app holds these pinned pages. Trusted no further than its target: every page must
    /// be guest RAM, none may be in the driver's balloon, and the new ones must fit under the
    /// app target; otherwise the whole message is refused and nothing changes. The discards
    /// go to the worker, off this lock (the app asks before reusing a page, and `app_deflate`
    /// withdraws them first).
    pub fn app_inflated(&mut self, ranges: &[PageRange]) -> Result<(), AppRangeError> {
        if self.app.memory.is_empty() {
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
        // The app asks before reusing a page (and `app_deflate` withdraws its discards), so
        // they may always be deferred.
        let worker = self.discard_worker.clone();
        let memory = &mut self.app.memory;
        let out = super::discard_with(self.discard_enabled, worker.as_deref(), |mode| {
            memory.inflate(&ranges, mode)
        });
        self.count_discards(out);
        self.counters.reclaimed_bytes += out.discarded_bytes;
        if self.app.memory.ballooned_pages() >= bytes_to_pages(self.app.target_bytes) {
            if let Some(worker) = &self.discard_worker {
                worker.balloon_complete();
            }
        }
        Ok(())
    }

    /// The app wants these pages back: after this returns no discard touches them.
    pub fn app_deflate(&mut self, ranges: &[PageRange]) -> Result<(), AppRangeError> {
        let ranges = app_ranges(ranges)?;
        self.withdraw_discards(&ranges);
        let out = self.app.memory.deflate(&ranges);
        self.count_discards(out);
        Ok(())
    }
}
