//! What survives a backend restart: the target (so a restarted backend resumes it and the
//! guest never sees it jump), the stats interval and whether discarding is on. Written
//! atomically: a temporary file, fsync, rename over the old one, fsync of the directory.

use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The state file's format version.
pub const STATE_VERSION: u32 = 1;

/// The longest statistics interval accepted: a day (the guest's figures are useless older).
pub const MAX_STATS_INTERVAL_SECONDS: u64 = 86_400;

/// A state file is small; anything bigger is not one.
const MAX_STATE_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading state file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("state file {path}: {reason}; fix or remove it")]
    Invalid { path: PathBuf, reason: String },
    #[error("writing state file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistentState {
    pub version: u32,
    pub target_pages: u64,
    pub stats_interval_seconds: u64,
    pub discard_enabled: bool,
    /// The guest app's target (absent in files from before the app existed).
    #[serde(default)]
    pub app_target_bytes: u64,
}

/// A file beside the state file: `STATE.SUFFIX` (appended, so `vm1.state` gives
/// `vm1.state.lock`, and `s.state` and `s.json` never share one).
pub fn beside(state_file: &Path, suffix: &str) -> PathBuf {
    let mut name: OsString = state_file.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

/// A new temporary file in the state file's directory, named `STATE.XXXXXX.tmp`, created
/// exclusively (never an existing file or a symlink planted there) with mode 0600.
pub fn temp_beside(state_file: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    let dir = state_file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let prefix = format!(
        "{}.",
        state_file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(dir)
}

/// Opens an existing file of this backend's own (the state file, `STATE.pages`) without
/// following a symlink at its last component, non-blocking (a FIFO in its place cannot hang the
/// open), and refuses what it finds unless it is a regular file owned by this process's user:
/// one another user planted (in a state directory they can write) is never read as ours.
pub fn open_nofollow(path: &Path, write: bool) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    check_ours(&file)?;
    // Reads and writes block as usual from here on.
    rustix::fs::fcntl_setfl(&file, rustix::fs::OFlags::empty())?;
    Ok(file)
}

/// Whether an open file beside the state is this backend's: a regular file of this process's
/// user (not one another user planted in a state directory they can write).
pub fn check_ours(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("owned by uid {}, not this backend's ({me})", meta.uid()),
        ));
    }
    Ok(())
}

impl PersistentState {
    /// Whether a state could have been written by this backend: the version it writes, and
    /// values every setter accepts.
    pub fn validate(&self) -> Result<(), String> {
        if self.version != STATE_VERSION {
            return Err(format!(
                "version {} (this backend reads version {STATE_VERSION})",
                self.version
            ));
        }
        if self.target_pages > u64::from(u32::MAX) {
            return Err(format!(
                "target of {} pages does not fit the device's 32-bit page count",
                self.target_pages
            ));
        }
        if self.stats_interval_seconds > MAX_STATS_INTERVAL_SECONDS {
            return Err(format!(
                "statistics interval of {} s is above the limit of {MAX_STATS_INTERVAL_SECONDS} s",
                self.stats_interval_seconds
            ));
        }
        Ok(())
    }

    /// Loads the state, or `None` if the file does not exist yet. A file this backend could
    /// not have written is an error naming what is wrong.
    pub fn load(path: &Path) -> Result<Option<Self>, StateError> {
        let read_err = |source| StateError::Read {
            path: path.into(),
            source,
        };
        let file = match open_nofollow(path, false) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(read_err(source)),
        };
        let mut text = String::new();
        file.take(MAX_STATE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_STATE_BYTES {
            return Err(StateError::Invalid {
                path: path.into(),
                reason: format!("larger than {MAX_STATE_BYTES} bytes"),
            });
        }
        let state: PersistentState =
            serde_json::from_str(&text).map_err(|source| StateError::Parse {
                path: path.into(),
                source,
            })?;
        state.validate().map_err(|reason| StateError::Invalid {
            path: path.into(),
            reason,
        })?;
        Ok(Some(state))
    }

    /// Writes the state atomically: a new temporary file beside it, fsync, rename over the
    /// old one, fsync of the directory.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let err = |source| StateError::Write {
            path: path.into(),
            source,
        };
        let text = serde_json::to_string_pretty(self)
            .map_err(std::io::Error::from)
            .map_err(err)?;
        let mut tmp = temp_beside(path).map_err(err)?;
        tmp.write_all(text.as_bytes()).map_err(err)?;
        tmp.write_all(b"\n").map_err(err)?;
        tmp.as_file().sync_all().map_err(err)?;
        tmp.persist(path).map_err(|e| err(e.error))?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)
    }
}

/// The state file, written by one thread at a time and never with an older generation over a
/// newer one (saves run off the device lock, so two may race).
#[derive(Debug)]
pub struct StateStore {
    path: PathBuf,
    saved_generation: std::sync::Mutex<Option<u64>>,
}

/// A save to run after the device lock is released.
#[must_use = "the settings are only saved when the job runs"]
pub struct SaveJob {
    store: std::sync::Arc<StateStore>,
    generation: u64,
    state: PersistentState,
}

impl StateStore {
    pub fn new(path: PathBuf) -> Self {
        StateStore {
            path,
            saved_generation: std::sync::Mutex::new(None),
        }
    }

    pub fn job(self: &std::sync::Arc<Self>, generation: u64, state: PersistentState) -> SaveJob {
        SaveJob {
            store: self.clone(),
            generation,
            state,
        }
    }
}

impl SaveJob {
    /// Writes the settings unless a save of the same or a later generation already did.
    pub fn run(self) -> Result<(), StateError> {
        let mut saved = self
            .store
            .saved_generation
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if saved.is_some_and(|g| g >= self.generation) {
            return Ok(());
        }
        self.state.save(&self.store.path)?;
        *saved = Some(self.generation);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_missing_and_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.state");
        let _ = std::fs::remove_file(&path);
        assert_eq!(PersistentState::load(&path).unwrap(), None);
        let s = PersistentState {
            version: 1,
            target_pages: 65536,
            stats_interval_seconds: 5,
            discard_enabled: true,
            app_target_bytes: 1 << 28,
        };
        s.save(&path).unwrap();
        assert_eq!(PersistentState::load(&path).unwrap(), Some(s));
        std::fs::write(&path, "{ garbage").unwrap();
        assert!(matches!(
            PersistentState::load(&path),
            Err(StateError::Parse { .. })
        ));
    }

    /// A state file (or STATE.pages) another user owns is not this backend's, whatever it says.
    #[test]
    fn a_state_file_of_another_user_is_refused() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root to give the file to another user");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.state");
        good_state().save(&path).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        let err = PersistentState::load(&path).unwrap_err().to_string();
        assert!(err.contains("owned by uid 65534"), "{err}");
        assert!(open_nofollow(&path, true).is_err());
    }

    /// A state this backend could have written.
    fn good_state() -> PersistentState {
        PersistentState {
            version: 1,
            target_pages: 1,
            stats_interval_seconds: 5,
            discard_enabled: true,
            app_target_bytes: 0,
        }
    }

    #[test]
    fn a_file_this_backend_could_not_have_written_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.state");
        let good = good_state();
        for (bad, what) in [
            (
                PersistentState {
                    version: 2,
                    ..good.clone()
                },
                "version 2",
            ),
            (
                PersistentState {
                    stats_interval_seconds: u64::MAX,
                    ..good.clone()
                },
                "statistics interval",
            ),
            (
                PersistentState {
                    target_pages: 1 << 40,
                    ..good.clone()
                },
                "32-bit",
            ),
        ] {
            std::fs::write(&path, serde_json::to_string(&bad).unwrap()).unwrap();
            let e = PersistentState::load(&path).unwrap_err().to_string();
            assert!(e.contains(what) && e.contains("vm.state"), "{e}");
        }
    }

    #[test]
    fn saving_never_follows_a_planted_link_and_derived_names_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm1.state");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        // The names a predictable temporary file could have had.
        for name in ["vm1.tmp", "vm1.state.tmp"] {
            std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
        }
        let s = PersistentState {
            version: 1,
            target_pages: 7,
            stats_interval_seconds: 5,
            discard_enabled: true,
            app_target_bytes: 0,
        };
        s.save(&path).unwrap();
        s.save(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(PersistentState::load(&path).unwrap(), Some(s));
        // A state file that is a symlink is not read through.
        let link = dir.path().join("link.state");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(PersistentState::load(&link).is_err());
        assert_eq!(beside(&path, "lock"), dir.path().join("vm1.state.lock"));
        assert_ne!(
            beside(&dir.path().join("s.state"), "lock"),
            beside(&dir.path().join("s.json"), "lock")
        );
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name().to_string_lossy().ends_with(".tmp")
                    && e.file_type().is_ok_and(|t| t.is_file())
            })
            .collect();
        assert!(left.is_empty());
    }
}
