//! The settings a restart keeps (the state file, see state.rs): what is saved, and when. Saves
//! run after the device lock is released, so no file I/O happens under the lock the vring
//! handlers and the VMM's config reads need.

use super::Balloon;
use crate::state::{PersistentState, SaveJob};

impl Balloon {
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
    pub(super) fn changed(&mut self) {
        self.settings_generation += 1;
    }

    /// A save of the current settings, to run after the device lock is released (a no-op
    /// when a later save already covered them).
    pub fn unsaved_settings(&self) -> Option<SaveJob> {
        self.state_store
            .as_ref()
            .map(|store| store.job(self.settings_generation, self.settings()))
    }
}
