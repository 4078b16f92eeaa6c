//! The backend's status as the control protocol reports it (balloon_protocol::BackendStatus).

use super::Balloon;
use crate::device::features;
use crate::memory::worker::WorkerCounters;
use balloon_protocol::{pages_to_bytes, AppStatus, BackendStatus, GuestStatsSnapshot};
use std::sync::atomic::{AtomicU64, Ordering};

impl Balloon {
    /// The status now (`&mut`: it also brings the check of the driver's word up to date, which
    /// only the passing of time may change).
    pub fn status(&mut self) -> BackendStatus {
        self.check_claim(std::time::Instant::now());
        BackendStatus {
            device_started: self.device_started(),
            guest_ram_bytes: self.guest_ram_bytes(),
            target_bytes: pages_to_bytes(u64::from(self.config.num_pages)),
            actual_bytes: pages_to_bytes(self.memory.ballooned_pages()),
            actual_from_driver: self.actual_from_driver,
            driver_actual_bytes: self
                .actual_from_driver
                .then(|| pages_to_bytes(u64::from(self.config.actual))),
            driver_claim_disputed: self.claim.disputed(),
            ballooned_bytes: pages_to_bytes(self.memory.ballooned_pages()),
            reclaimed_bytes: self.counters.reclaimed_bytes
                + self.worker_count(|c| &c.discarded_bytes),
            reported_free_bytes: self.counters.reported_free_bytes,
            discard_enabled: self.discard_enabled,
            discard_errors: self.counters.discard_errors + self.worker_count(|c| &c.discard_errors),
            discard_calls: self.counters.discard_calls + self.worker_count(|c| &c.discard_calls),
            config_change_channel: self.channel.is_some(),
            stats_interval_seconds: self.stats_interval_seconds,
            stats: self.stats.as_ref().map(|(at, s)| GuestStatsSnapshot {
                age_seconds: at.elapsed().as_secs_f64(),
                values: s.values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                unknown: s.unknown.clone(),
            }),
            rejected: self.counters.rejected.clone(),
            features: features::names(self.acked_features),
            offered_features: features::names(self.feature_choice.offered()),
            app: AppStatus {
                connected: self.app.peer.is_some(),
                target_bytes: self.app.target_bytes,
                ballooned_bytes: pages_to_bytes(self.app.memory.ballooned_pages()),
                held_bytes: self.app.held_bytes,
                stalled: self.app.stalled,
                psi_some_avg10: self.app.psi_some_avg10,
                meminfo: self
                    .app
                    .meminfo
                    .map(|(m, at)| (m, at.elapsed().as_secs_f64())),
                reclaimable: !self.app.memory.is_empty(),
                note: self.app.memory.is_empty().then(|| {
                    "the guest has not started the balloon device and no --guest-memory-file \
                     is open, so app pages cannot be named: load virtio_balloon in the guest or \
                     give the backend the VMM's memory file and its layout"
                        .to_string()
                }),
            },
        }
    }

    fn worker_count(&self, counter: impl Fn(&WorkerCounters) -> &AtomicU64) -> u64 {
        self.discard_worker
            .as_ref()
            .map_or(0, |w| counter(&w.counters).load(Ordering::Relaxed))
    }
}
